package ltx_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// crashChildEnv, when set, makes the test binary run crashChild instead of
// the tests. Its value is "DIR SEED PRUNE FAILPOINT N SEGMENT": FAILPOINT
// is a failpoint name at whose Nth pass the child kills itself, or "-";
// SEGMENT is the log's SegmentSize (0: a file per transaction).
const crashChildEnv = "MERIDIAN_LTX_CRASH_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(crashChildEnv); v != "" {
		if err := crashChild(v); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	testingutil.Main(m)
}

// crashChild commits random transactions to a log until it is killed,
// compacting (and, if asked, pruning) every 25 commits. Before each commit
// it prints "intent TXID CHECKSUM SHA256" for the transaction it is about to
// commit, and after Commit returns "ack TXID".
func crashChild(arg string) error {
	var (
		dir, point string
		seed       uint64
		prune      bool
		n          int
		segment    int64
	)
	if _, err := fmt.Sscanf(arg, "%s %d %t %s %d %d", &dir, &seed, &prune, &point, &n, &segment); err != nil {
		return err
	}
	ltx.SetFailpoint(func(name string) {
		if name == point {
			if n--; n == 0 {
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
		}
	})
	ctx := context.Background()
	dbPath := filepath.Join(dir, "db")
	l := ltx.NewLog("db", filepath.Join(dir, "ltx"), dbPath)
	l.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	l.CompactionSize, l.Retention, l.SegmentSize = 32<<10, 0, segment
	if err := l.Open(ctx); err != nil {
		return err
	}

	rng := rand.New(rand.NewPCG(seed, 2))
	const pageSize = 4096
	data := make([]byte, 8*pageSize)
	copy(data, "SQLite format 3\x00")
	binary.BigEndian.PutUint16(data[16:], pageSize)
	out := bufio.NewWriter(os.Stdout)
	for txid := 1; ; txid++ {
		var pgnos []uint32
		if pages := len(data) / pageSize; rng.IntN(5) == 0 && pages < 64 {
			data = append(data, make([]byte, pageSize)...)
		} else if rng.IntN(5) == 0 && pages > 8 {
			data = data[:len(data)-pageSize]
		}
		for i := rng.IntN(6) + 1; i > 0; i-- {
			pgno := 2 + rng.IntN(len(data)/pageSize-1)
			binary.BigEndian.PutUint64(data[(pgno-1)*pageSize+rng.IntN(pageSize-8):], rng.Uint64())
			pgnos = append(pgnos, uint32(pgno))
		}
		if err := os.WriteFile(dbPath, data, 0o644); err != nil {
			return err
		}
		table, err := ltx.ReadChecksumTable(dbPath)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		fmt.Fprintf(out, "intent %d %s %s\n", txid, table.Checksum(), hex.EncodeToString(sum[:]))
		if err := out.Flush(); err != nil {
			return err
		}
		if _, err := l.Commit(ctx, ltx.Tx{DB: bytes.NewReader(data), PageSize: pageSize, Commit: uint32(len(data) / pageSize), Pgnos: pgnos}); err != nil {
			return err
		}
		fmt.Fprintf(out, "ack %d\n", txid)
		if err := out.Flush(); err != nil {
			return err
		}
		if txid%25 == 0 {
			if _, err := l.Compact(ctx, time.Now().Add(time.Hour)); err != nil {
				return err
			}
			if prune {
				if _, err := l.Prune(ctx, ltx.TXID(txid-30), time.Now().Add(time.Hour)); err != nil {
					return err
				}
			}
		}
	}
}

// intent is what the child said about a transaction before committing it.
type intent struct {
	checksum ltx.Checksum
	sha      string
}

// crashRunTimeout bounds one run of TestLog_Crash, a child process that
// commits until it is killed. A deadline against hangs, not a measure of
// speed.
const crashRunTimeout = time.Minute

// TestLog_Crash kills a child process with SIGKILL at random points while
// it commits, compacts and prunes, then checks that the log opens at the
// last acknowledged transaction or the one being committed, that the
// checksum there is the one the child computed, that the directory
// verifies, and that the log rebuilds the child's database at that point.
func TestLog_Crash(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 3))
	// Random kills, then two kills at each failpoint, at a random pass.
	type kill struct {
		point string
		n     int
	}
	var kills []kill
	for i := 0; i < 30; i++ {
		kills = append(kills, kill{"-", 0})
	}
	for _, p := range []string{"write", "seal", "sync", "rename", "syncdir", "compact-written", "compact", "compact-remove", "prune"} {
		kills = append(kills, kill{p, 1 + rng.IntN(80)}, kill{p, 1 + rng.IntN(10)})
	}
	var atAck, atIntent, inFlight int
	for run, k := range kills {
		dir := t.TempDir()
		prune := run%3 == 2 || k.point == "prune"
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		// Every other run writes a file per transaction, the others
		// segments small enough to roll and be pruned.
		segment := 0
		if run%2 == 1 {
			segment = 64 << 10
		}
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %t %s %d %d", crashChildEnv, dir, rng.Uint64(), prune, k.point, k.n, segment))
		testingutil.DieWithParent(cmd)
		cmd.Stderr = os.Stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill() })
		// A child nobody kills (its failpoint never passes n times)
		// commits for ever: kill it after a deadline and fail the test.
		var timedOut atomic.Bool
		watchdog := time.AfterFunc(crashRunTimeout, func() {
			timedOut.Store(true)
			_ = cmd.Process.Kill()
		})

		// Kill after a random number of acknowledged commits, at a random
		// moment of the next ones; keep reading what the child printed
		// before it died.
		killAfter := ltx.TXID(1 + rng.IntN(100))
		intents := map[ltx.TXID]intent{}
		var lastAck ltx.TXID
		killed := false
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			txid, _ := strconv.ParseUint(f[1], 10, 64)
			switch f[0] {
			case "intent":
				sum, err := strconv.ParseUint(f[2], 16, 64)
				if err != nil {
					t.Fatal(err)
				}
				intents[ltx.TXID(txid)] = intent{ltx.Checksum(sum), f[3]}
			case "ack":
				lastAck = ltx.TXID(txid)
			}
			if k.point == "-" && lastAck == killAfter && !killed {
				time.Sleep(time.Duration(rng.IntN(20000)) * time.Microsecond)
				if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				killed = true
			}
		}
		watchdog.Stop()
		if timedOut.Load() {
			t.Fatalf("run %d (%v): child still committing after %v (last acknowledged txid %d), never killed", run, k, crashRunTimeout, lastAck)
		}
		if err := cmd.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
			t.Fatalf("run %d (%v): child ended with %v before it was killed", run, k, err)
		}

		l := testingutil.MustOpenLog(t, "db", filepath.Join(dir, "ltx"), "")
		pos := l.Pos()
		if pos.TXID != lastAck && pos.TXID != lastAck+1 {
			t.Fatalf("run %d (%v): log reopened at txid %d; last acknowledged %d", run, k, pos.TXID, lastAck)
		}
		if pos.TXID == 0 { // killed in the first commit: an empty log
			if len(l.Files()) != 0 {
				t.Fatalf("run %d (%v): position zero with files %v", run, k, l.Files())
			}
			atAck++
			continue
		}
		want, ok := intents[pos.TXID]
		if !ok || want.checksum != pos.PostApplyChecksum {
			t.Fatalf("run %d (%v): log reopened at %s; the child meant checksum %s at that txid", run, k, pos, want.checksum)
		}
		if pos.TXID == lastAck {
			atAck++
		} else {
			atIntent++
		}
		if _, ok := intents[lastAck+1]; ok {
			inFlight++
		}
		if r, err := ltx.VerifyDir(l.Dir); err != nil || !r.OK() {
			t.Fatalf("run %d (%v): log directory does not verify: %v %v", run, k, err, r.Err())
		}
		if prune {
			mustReadAll(t, l)
		} else if got := mustRestoreSHA(t, l); got != want.sha {
			t.Fatalf("run %d (%v): log at %s restores to sha256 %s, the child's database was %s", run, k, pos, got, want.sha)
		}
	}
	t.Logf("%d kills, %d with a commit in flight: the log reopened at the last acknowledged transaction %d times, at the one in flight %d times",
		len(kills), inFlight, atAck, atIntent)
	if atIntent == 0 {
		t.Fatal("no kill landed after a commit's rename: the in-flight recovery path was not exercised")
	}
}

// mustReadAll reads every file of the log through a cursor, verifying each.
func mustReadAll(tb testing.TB, l *ltx.Log) {
	tb.Helper()
	c, err := l.Cursor(l.First())
	if err != nil {
		tb.Fatal(err)
	}
	for c.Pos() != l.Pos() {
		r := mustNext(tb, c)
		if _, err := io.Copy(io.Discard, r); err != nil {
			tb.Fatalf("read %s: %v", r.Info.Name, err)
		}
		_ = r.Close()
	}
}

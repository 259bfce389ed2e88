package fs_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// Rounds of the crash tests, per journal mode, and with -short.
const (
	appRounds          = 15 // kills of the app at a random moment
	appAtRounds        = 5  // kills of the app as it writes the database file
	daemonRandomRounds = 20 // kills of the daemon at a random moment
	daemonAtRounds     = 6  // kills of the daemon at an LTX file event

	appRoundsShort          = 8
	daemonRandomRoundsShort = 10
)

// Blob sizes of the writer's rows, before rowBlobSize's variation: most
// transactions write 6 to 14 pages; some write about 260, which keeps a
// transaction's LTX file being written long enough for an outside kill to
// land in it.
const (
	smallBlob = 16 << 10
	largeBlob = 1 << 20
)

// TestCrash_App kills an app (a child process) with SIGKILL while it
// commits to a database through the mount, in every journal mode, at random
// moments and as it writes pages to the database file (in rollback modes,
// with the journal hot; in WAL mode, checkpointing), and checks after each
// kill that the database, read through the mount, holds every acknowledged
// transaction and at most the one in flight besides, whole, and that the
// log holds exactly one LTX file per committed transaction.
func TestCrash_App(t *testing.T) {
	t.Parallel()
	for _, mode := range journalModes {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			testCrashApp(t, mode)
		})
	}
}

func testCrashApp(t *testing.T, mode string) {
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 1))
	dir := t.TempDir()
	fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	fsys.Logger = infoLogger(t)
	testingutil.MustOpenFS(t, fsys)
	path := filepath.Join(fsys.MountDir, "app.db")

	db := testingutil.MustOpenSQLite(t, path, mode)
	if _, err := db.Exec(crashSchema); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	captured := fsys.DB("app.db") // its Pos waits for LTX files still being written
	schemaTXID := captured.Pos().TXID
	if got, want := schemaTXID, schemaTransactions(mode); got != want {
		t.Fatalf("schema: got %d LTX files, want %d", got, want)
	}

	plan := randomKills(appRounds, appRoundsShort)
	for i := 0; i < appAtRounds; i++ {
		k := killAtDatabaseWrite
		k.nth = 1 + rng.IntN(20)
		plan = append(plan, k)
	}
	rng.Shuffle(len(plan), func(i, j int) { plan[i], plan[j] = plan[j], plan[i] })

	dbDir := filepath.Join(fsys.DataDir, "dbs", "app.db")
	var rows rowState
	var st crashStats
	hot := map[string]int{}
	for round, k := range plan {
		w := startChild(t, "writer", path, mode, strconv.Itoa(smallBlob))
		ready := w.mustReadLine(t, "ready")
		run := killWriter(t, w, ready, k, dbDir, rng, round)
		if hotJournal(t, dbDir) {
			st.hotJournal++
			hot[k.name]++
		}

		db := testingutil.MustOpenSQLite(t, path, mode)
		rows.check(t, db, run, smallBlob, &st)
		_ = db.Close()
		if got, want := captured.Pos().TXID-schemaTXID, ltx.TXID(rows.max); got != want {
			t.Fatalf("round %d: got %d LTX files after the schema, want %d, one per committed transaction (seed %d)", round, got, want, seed)
		}
	}

	db = testingutil.MustOpenSQLite(t, path, mode)
	checkLog(t, fsys, "app.db", db, mode == "wal")
	if got, want := captured.Pos().TXID, schemaTXID+ltx.TXID(rows.max); got != want {
		t.Fatalf("after the rounds: log at txid %d, want %d (schema %d + %d rows)", got, want, schemaTXID, rows.max)
	}
	t.Logf("%s: %d kills (%d random, %d at database writes), %d with a transaction in flight (%d of those committed, %d left a hot journal: %v), %d rows (seed %d)",
		mode, len(plan), len(plan)-appAtRounds, appAtRounds, st.inFlight, st.inFlightCommitted, st.hotJournal, hot, rows.max, seed)
	if mode != "wal" && hot[killAtDatabaseWrite.name] == 0 {
		t.Fatalf("%s: got 0 of the %d kills at database writes leaving a hot journal, want at least 1: the rollback of a crashed app's transaction by the next one was not exercised", mode, appAtRounds)
	}
}

// killWriter kills writer child w, which found rows up to ready, at kill
// point k of round: after a random pause, or at k's event in dbDir; and
// returns what it said before it died.
func killWriter(t *testing.T, w *child, ready int64, k killPoint, dbDir string, rng *rand.Rand, round int) writerRun {
	t.Helper()
	if k.mask == 0 {
		time.Sleep(time.Duration(5000+rng.IntN(195000)) * time.Microsecond)
	} else {
		tr := killOnEvent(t, dbDir, k, w.cmd.Process.Pid)
		select {
		case <-w.done:
		case <-time.After(10 * time.Second):
		}
		tr.stop(t)
		if !tr.fired {
			t.Fatalf("round %d: no %s event: the writer wrote nothing?\n%s", round, k.name, w.stderr.String())
		}
	}
	w.mustKill(t)
	return w.writerRun(t, ready)
}

// schemaTransactions is how many LTX files a new database holds once the
// schema is created: one for crashSchema, and in WAL mode one more for
// switching the new database to WAL.
func schemaTransactions(mode string) ltx.TXID {
	if mode == "wal" {
		return 2
	}
	return 1
}

// killPoint is where a crash-test round kills the app or the daemon: at a
// random moment, or at the nth event mask on a file of the directory
// watched whose name ends in suffix.
type killPoint struct {
	name   string
	mask   uint32
	suffix string
	nth    int
}

var (
	// (a) in rollback mode: the LTX file is in the log (its segment index
	// record written), the journal not yet finalized. (b) in WAL mode: the
	// commit frame is in the WAL, its LTX file is being written to its
	// segment.
	killAtLTXRenamed = killPoint{name: "ltx-committed", mask: syscall.IN_MODIFY, suffix: ".index"}
	killAtLTXCreated = killPoint{name: "ltx-writing", mask: syscall.IN_MODIFY, suffix: ".segment"}
	// An app writing pages to the database file: in rollback modes the
	// journal is hot and the transaction not committed; in WAL mode it is
	// checkpointing.
	killAtDatabaseWrite = killPoint{name: "database-write", mask: syscall.IN_MODIFY, suffix: "database"}
)

// What the daemon logs when recovery takes each path (fs/recover.go). If
// these change, no precise kill is seen landing and TestCrash_Daemon fails
// saying so.
const (
	logJournalRemoved = "removing the journal of a transaction the log already holds"
	logRolledBack     = "rolling back a hot journal"
	logWALRecovered   = "recovered WAL transactions into the log"
)

// TestCrash_Daemon kills the daemon (a child process serving the mount)
// with SIGKILL while an app commits through it, in every journal mode, at
// random moments and at LTX file events, restarts it on the same
// directories, and checks that it comes up, that every acknowledged
// transaction is in the database and at most the one in flight besides,
// that the log holds exactly one LTX file per committed transaction, and,
// with the daemon stopped, that the log's position is the checksum of the
// database file and the log rebuilds it byte for byte.
// randomKills plans rounds killed at a random moment: n of them, or short
// with -short.
func randomKills(n, short int) []killPoint {
	if testing.Short() {
		n = short
	}
	plan := make([]killPoint, n)
	for i := range plan {
		plan[i] = killPoint{name: "random"}
	}
	return plan
}

func TestCrash_Daemon(t *testing.T) {
	t.Parallel()
	for _, mode := range journalModes {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			testCrashDaemon(t, mode, true)
		})
	}
	t.Run("wal-without-passthrough", func(t *testing.T) {
		t.Parallel()
		testCrashDaemon(t, "wal", false)
	})
}

func testCrashDaemon(t *testing.T, mode string, passthrough bool) {
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 2))
	d, path, dbDir, schemaTXID := newCrashDaemon(t, mode, passthrough)

	// The precise points: (a) in rollback modes, (b) in WAL mode, and the
	// other event of each for good measure.
	precise, other := killAtLTXRenamed, killAtLTXCreated
	if mode == "wal" {
		precise, other = killAtLTXCreated, killAtLTXRenamed
	}
	plan := randomKills(daemonRandomRounds, daemonRandomRoundsShort)
	for i := 0; i < daemonAtRounds; i++ {
		k := precise
		if i%3 == 2 {
			k = other
		}
		k.nth = 1 + rng.IntN(3)
		plan = append(plan, k)
	}
	rng.Shuffle(len(plan), func(i, j int) { plan[i], plan[j] = plan[j], plan[i] })

	var rows rowState
	var st crashStats
	recovered := map[string]int{}
	landed := map[string]int{}
	for round, k := range plan {
		d.start(t)
		blob := smallBlob
		if k.name == killAtLTXCreated.name {
			blob = largeBlob
		}
		var tr *trigger
		if k.mask != 0 {
			tr = killOnEvent(t, filepath.Join(dbDir, "ltx"), k, d.proc.cmd.Process.Pid)
		}
		w := startChild(t, "writer", path, mode, strconv.Itoa(blob))
		ready := w.mustReadLine(t, "ready")
		if tr == nil {
			time.Sleep(time.Duration(5000+rng.IntN(195000)) * time.Microsecond)
		}
		dead := d.proc
		killed := d.kill(t, tr)
		w.mustOutliveDaemon(t, killed, dead)
		run := w.writerRun(t, ready)
		if hotJournal(t, dbDir) {
			st.hotJournal++
		}

		d.start(t)
		db := testingutil.MustOpenSQLite(t, path, mode)
		last := rows.check(t, db, run, blob, &st)
		if mode == "wal" {
			checkpoint(t, db)
		}
		_ = db.Close()
		stderr := d.stop(t)
		pos := verifyStopped(t, dbDir)
		if got, want := pos.TXID-schemaTXID, ltx.TXID(last); got != want {
			t.Fatalf("round %d (%s kill, seed %d): got %d LTX files after the schema, want %d, one per committed transaction\ndaemon log after restart:\n%s",
				round, k.name, seed, got, want, stderr)
		}

		// What recovery did, and whether the in-flight transaction's fate
		// agrees with it. A hot journal is removed when the database file
		// is at the log's position: its transaction is in the log, or it had
		// not written the database file yet. WAL transactions recovered into
		// the log are the one in flight, or acknowledged ones whose LTX files
		// were not written yet.
		how := "none"
		switch {
		case strings.Contains(stderr, logJournalRemoved):
			how = "journal removed"
		case strings.Contains(stderr, logRolledBack):
			how = "journal rolled back"
		case strings.Contains(stderr, logWALRecovered):
			how = "WAL recovered"
		}
		recovered[how]++
		if how == "journal rolled back" {
			if got, want := last, run.lastAck; got != want {
				t.Fatalf("round %d (%s kill): recovery: %s; got rows up to %d, want %d, the last acknowledged", round, k.name, how, got, want)
			}
		}
		inFlightCommitted := run.lastBegin > run.lastAck && last == run.lastBegin
		if k.name == killAtLTXRenamed.name && how == "journal removed" && inFlightCommitted || k.name == killAtLTXCreated.name && how == "WAL recovered" {
			landed[k.name]++
		}
	}

	t.Logf("%s: %d kills (%d random, %d at LTX events), %d with a transaction in flight (%d of those committed, %d left a hot journal); recovery: %v; precise kills landed: %v; %d rows (seed %d)",
		mode, len(plan), len(plan)-daemonAtRounds, daemonAtRounds, st.inFlight, st.inFlightCommitted, st.hotJournal, recovered, landed, rows.max, seed)
	if landed[precise.name] == 0 {
		t.Fatalf("%s: got 0 of the %s kills landing where they aim, want at least 1: the recovery path of a crash between the %s was not exercised (recovery: %v)",
			mode, precise.name, map[string]string{"ltx-committed": "LTX file and the journal's finalizing", "ltx-writing": "commit frame and its LTX file"}[precise.name], recovered)
	}
}

// crashStats counts the kills that landed with a transaction in flight.
type crashStats struct {
	inFlight          int // a transaction was begun and not acknowledged
	inFlightCommitted int // ... and it is in the database after recovery
	hotJournal        int // the kill left a hot rollback journal
}

// hotJournal reports whether the backing journal in dbDir is hot: it
// starts with the journal magic.
func hotJournal(tb testing.TB, dbDir string) bool {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(dbDir, "journal"))
	if errors.Is(err, os.ErrNotExist) {
		return false
	} else if err != nil {
		tb.Fatal(err)
	}
	return len(b) >= len(journalMagic) && bytes.Equal(b[:len(journalMagic)], journalMagic)
}

// journalMagic starts a hot rollback journal.
var journalMagic = []byte{0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7}

// rowState is what a crash test knows of table t: rows 1..max were seen
// committed.
type rowState struct{ max int64 }

// check asserts what a crash after the writer run must leave in table t of
// db: rows 1..N, whole, for one N from the last acknowledged seq to the one
// in flight; and SQLite finds the database intact. It returns N.
func (s *rowState) check(t *testing.T, db *sql.DB, run writerRun, blob int, st *crashStats) int64 {
	t.Helper()
	if got, want := run.ready, s.max; got != want {
		t.Fatalf("the writer started after seq %d, want %d, the last seq seen committed", got, want)
	}
	var ok string
	if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil {
		t.Fatal(err)
	} else if got, want := ok, "ok"; got != want {
		t.Fatalf("integrity_check: got %q, want %q", got, want)
	}
	var count, last int64
	if err := db.QueryRow(`SELECT count(*), coalesce(max(seq), 0) FROM t`).Scan(&count, &last); err != nil {
		t.Fatal(err)
	}
	if got, want := count, last; got != want {
		t.Fatalf("got %d rows, want %d, the largest seq: a transaction is missing or partial", got, want)
	}
	if last < run.lastAck {
		t.Fatalf("got rows up to seq %d, want at least %d, the last acknowledged", last, run.lastAck)
	}
	if last > run.lastAck+1 || last > run.lastBegin {
		t.Fatalf("got rows up to seq %d, want at most %d (acknowledged %d, begun %d)", last, min(run.lastAck+1, run.lastBegin), run.lastAck, run.lastBegin)
	}
	r, err := db.Query(`SELECT seq, h, b FROM t WHERE seq > ? ORDER BY seq`, s.max)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	for r.Next() {
		var seq int64
		var h string
		var b []byte
		if err := r.Scan(&seq, &h, &b); err != nil {
			t.Fatal(err)
		}
		if want := rowBlob(seq, rowBlobSize(seq, blob)); !bytes.Equal(b, want) || h != rowHash(want) {
			t.Fatalf("row %d: got blob of %d bytes, hash %s (%s), want %d bytes, hash %s", seq, len(b), rowHash(b), h, len(want), rowHash(want))
		}
	}
	if err := r.Err(); err != nil {
		t.Fatal(err)
	}
	if run.lastBegin > run.lastAck {
		st.inFlight++
		if last == run.lastBegin {
			st.inFlightCommitted++
		}
	}
	s.max = last
	return last
}

// checkpoint checkpoints the WAL of db into the database file and truncates
// the WAL.
func checkpoint(tb testing.TB, db *sql.DB) {
	tb.Helper()
	var busy, logFrames, ckpt int
	if err := db.QueryRow(`PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &logFrames, &ckpt); err != nil {
		tb.Fatal(err)
	} else if got, want := busy, 0; got != want {
		tb.Fatalf("wal_checkpoint(TRUNCATE): got busy %d, want %d", got, want)
	}
}

// verifyStopped checks, with no daemon running, the database of dbDir
// against its log, independently of the fs package: the checksum of the
// backing file is the log's position, the log directory verifies, and the
// log alone rebuilds the backing file byte for byte. The database must have
// no WAL frames and no hot journal. It returns the log's position.
func verifyStopped(t *testing.T, dbDir string) ltx.Pos {
	t.Helper()
	if fi, err := os.Stat(filepath.Join(dbDir, "wal")); err == nil && fi.Size() != 0 {
		t.Fatalf("backing WAL: got %d bytes, want none after a TRUNCATE checkpoint", fi.Size())
	}
	if hotJournal(t, dbDir) {
		t.Fatalf("backing journal: got a hot journal, want none with the daemon stopped cleanly")
	}
	logDir := filepath.Join(dbDir, "ltx")
	if r, err := ltx.VerifyDir(logDir); err != nil {
		t.Fatal(err)
	} else if len(r.Problems) > 0 {
		t.Fatalf("log verify: got problems %v, want none", r.Problems)
	}
	backing := filepath.Join(dbDir, "database")
	table, err := ltx.ReadChecksumTable(backing)
	if err != nil {
		t.Fatal(err)
	}
	l := testingutil.MustOpenLog(t, "app.db", logDir, "")
	pos := l.Pos()
	if got, want := table.Checksum(), pos.PostApplyChecksum; got != want {
		t.Fatalf("backing database checksum: got %s, want %s, the log's position %s", got, want, pos)
	}
	files := l.Files()
	if len(files) == 0 {
		t.Fatalf("log %s: got no files, want the schema's at least", logDir)
	}
	if got, want := table.Pages(), files[len(files)-1].Header.Commit; got != want {
		t.Fatalf("backing database: got %d pages, want %d, the size at the log's position %s", got, want, pos)
	}
	restored := filepath.Join(t.TempDir(), "restored.db")
	if got, err := l.Restore(context.Background(), restored); err != nil {
		t.Fatal(err)
	} else if got != pos {
		t.Fatalf("restored to %s, want %s", got, pos)
	}
	if got, want := testingutil.FileSHA256(t, restored), testingutil.FileSHA256(t, backing); got != want {
		t.Fatalf("database rebuilt from the log at %s: got sha256 %s, want %s, the backing file's", pos, got, want)
	}
	_ = l.Close()
	return pos
}

// daemon is the daemon of a crash test: a child process serving the mount.
type daemon struct {
	data, mnt string
	// noPassthrough has WAL writes go through the daemon (fs.Passthrough
	// off).
	noPassthrough bool
	// noKernelPassthrough serves the WAL and the -shm through the daemon,
	// as on a kernel without FUSE passthrough.
	noKernelPassthrough bool
	proc                *child // nil when not running
}

// newCrashDaemon makes a daemon on a new data directory whose app.db, in
// journal mode, holds crashSchema, and stops it. It returns the daemon,
// app.db's path on the mount, its backing directory and the schema's
// last TXID.
func newCrashDaemon(t *testing.T, mode string, passthrough bool) (d *daemon, path, dbDir string, schemaTXID ltx.TXID) {
	t.Helper()
	dir := t.TempDir()
	d = &daemon{data: filepath.Join(dir, "data"), mnt: filepath.Join(dir, "mnt"), noPassthrough: !passthrough}
	t.Cleanup(func() { d.cleanup(t) })
	path = filepath.Join(d.mnt, "app.db")
	dbDir = filepath.Join(d.data, "dbs", "app.db")
	d.start(t)
	db := testingutil.MustOpenSQLite(t, path, mode)
	if _, err := db.Exec(crashSchema); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	d.stop(t)
	schemaTXID = verifyStopped(t, dbDir).TXID
	if got, want := schemaTXID, schemaTransactions(mode); got != want {
		t.Fatalf("schema: got %d LTX files, want %d", got, want)
	}
	return d, path, dbDir, schemaTXID
}

// start starts the daemon and waits until it has recovered and mounted.
func (d *daemon) start(t *testing.T) {
	t.Helper()
	passthrough := strconv.FormatBool(!d.noPassthrough)
	if d.noKernelPassthrough {
		passthrough = "no-kernel"
	}
	d.proc = startChild(t, "daemon", d.data, d.mnt, passthrough)
	var line string
	select {
	case line = <-d.proc.lines:
	case <-time.After(20 * time.Second):
	}
	if line != "mounted" {
		_ = d.proc.kill()
		t.Fatalf("daemon did not come up: got %q, %v; want \"mounted\"\n%s", line, d.proc.err, d.proc.stderr.String())
	}
	for deadline := time.Now().Add(10 * time.Second); !mounted(t, d.mnt); {
		if time.Now().After(deadline) {
			t.Fatalf("daemon said it mounted, but %s is not in /proc/self/mountinfo as fuse.meridian", d.mnt)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// kill kills the daemon with SIGKILL (or waits for tr to have), removes
// its dead mount, and returns when the signal was sent.
func (d *daemon) kill(t *testing.T, tr *trigger) time.Time {
	t.Helper()
	p := d.proc
	killed := time.Now()
	if tr != nil {
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
		}
		tr.stop(t)
		if !tr.fired {
			t.Fatalf("no %s event: the writer committed nothing?\ndaemon log:\n%s", tr.k.name, p.stderr.String())
		}
		killed = tr.firedAt
	}
	p.mustKill(t)
	d.proc = nil
	if err := syscall.Unmount(d.mnt, syscall.MNT_DETACH); err != nil {
		t.Fatalf("unmount the dead mount %s: %v", d.mnt, err)
	}
	if mounted(t, d.mnt) {
		t.Fatalf("%s: got mounted after a lazy unmount, want not mounted", d.mnt)
	}
	return killed
}

// stop stops the daemon cleanly with SIGTERM and returns what it logged.
func (d *daemon) stop(t *testing.T) string {
	t.Helper()
	p := d.proc
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("daemon did not stop on SIGTERM\n%s", p.stderr.String())
	}
	d.proc = nil
	if p.err != nil {
		t.Fatalf("daemon stopped with %v, want a clean exit\n%s", p.err, p.stderr.String())
	}
	if mounted(t, d.mnt) {
		t.Fatalf("%s: got mounted after the daemon stopped, want not mounted", d.mnt)
	}
	return p.stderr.String()
}

// cleanup kills a daemon still running and removes its mount.
func (d *daemon) cleanup(t *testing.T) {
	if d.proc != nil {
		if err := d.proc.kill(); err != nil {
			t.Error(err)
		}
	}
	if mounted(t, d.mnt) {
		if err := syscall.Unmount(d.mnt, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", d.mnt, err)
		}
	}
}

// mounted reports whether dir is a mount point of a Meridian filesystem.
func mounted(tb testing.TB, dir string) bool {
	tb.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		tb.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 1 && f[4] == dir && g[0] == "fuse.meridian" {
			return true
		}
	}
	return false
}

// trigger is a watcher child process that kills a process at an inotify
// event in a directory. Watching from a process of its own, at real-time
// priority, the kill follows the event by the time it takes one thread to
// wake, however busy the test process is.
type trigger struct {
	k       killPoint
	proc    *child
	fired   bool      // the watcher sent the kill; set by stop
	firedAt time.Time // when, by the wall clock; set by stop
}

// killOnEvent starts a watcher of dir that kills the process pid with
// SIGKILL at the k.nth event of k.mask on a file whose name ends in
// k.suffix, and waits until it watches.
func killOnEvent(t *testing.T, dir string, k killPoint, pid int) *trigger {
	t.Helper()
	c := startChild(t, "watch", dir, strconv.FormatUint(uint64(k.mask), 10), k.suffix, strconv.Itoa(k.nth), strconv.Itoa(pid))
	c.mustReadLine(t, "ready")
	return &trigger{k: k, proc: c}
}

// stop ends the watcher, and records whether and when it sent the kill.
func (tr *trigger) stop(t *testing.T) {
	t.Helper()
	if err := tr.proc.kill(); err != nil {
		t.Fatal(err)
	}
	for line := range tr.proc.lines {
		var ns int64
		if _, err := fmt.Sscanf(line, "fired %d", &ns); err != nil {
			t.Fatalf("watcher: bad line %q: %v", line, err)
		}
		tr.fired, tr.firedAt = true, time.Unix(0, ns)
	}
}

// infoLogger returns a logger writing records of level Info and above to
// tb's log.
func infoLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tbLogWriter{tb}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tbLogWriter struct{ tb testing.TB }

func (w tbLogWriter) Write(p []byte) (int, error) {
	w.tb.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

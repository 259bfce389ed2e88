package fs_test

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// bank is a source database outside any mount whose transactions move
// money between accounts, keeping the total, and sometimes add a large
// row; each is committed to its log as the primary's capture would.
type bank struct {
	tb   testing.TB
	path string
	db   *sql.DB
	log  *ltx.Log
	rng  *rand.Rand
	wal  bool
}

func newBank(tb testing.TB, mode string) *bank {
	dir := tb.TempDir()
	b := &bank{tb: tb, path: filepath.Join(dir, "bank.db"), rng: rand.New(rand.NewPCG(1, 2)), wal: mode == "wal"}
	b.db = testingutil.MustOpenSQLite(tb, b.path, mode)
	b.log = testingutil.MustOpenLog(tb, "bank.db", filepath.Join(dir, "ltx"), b.path)
	b.tx(func(tx *sql.Tx) error {
		if _, err := tx.Exec(`CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER); CREATE TABLE blob (b)`); err != nil {
			return err
		}
		for i := range accounts {
			if _, err := tx.Exec(`INSERT INTO accounts VALUES (?, 1000)`, i); err != nil {
				return err
			}
		}
		return nil
	})
	return b
}

// tx runs fn in a transaction and commits the pages it changed to the log.
func (b *bank) tx(fn func(*sql.Tx) error) {
	b.tb.Helper()
	before, _ := os.ReadFile(b.path)
	tx, err := b.db.Begin()
	if err != nil {
		b.tb.Fatal(err)
	}
	if err := fn(tx); err != nil {
		b.tb.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		b.tb.Fatal(err)
	}
	if b.wal {
		// The log is made from the database file: move the WAL into it.
		if _, err := b.db.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
			b.tb.Fatal(err)
		}
	}
	if _, err := testingutil.CommitChanged(b.log, before, testingutil.MustReadFile(b.tb, b.path)); err != nil {
		b.tb.Fatal(err)
	}
}

// step moves money, or adds a row large enough to grow the database.
func (b *bank) step() {
	b.tx(func(tx *sql.Tx) error {
		if b.rng.IntN(10) == 0 {
			_, err := tx.Exec(`INSERT INTO blob VALUES (randomblob(?))`, 1000+b.rng.IntN(9000))
			return err
		}
		from, to, amount := b.rng.IntN(accounts), b.rng.IntN(accounts), b.rng.IntN(100)
		if _, err := tx.Exec(`UPDATE accounts SET balance = balance - ? WHERE id = ?`, amount, from); err != nil {
			return err
		}
		_, err := tx.Exec(`UPDATE accounts SET balance = balance + ? WHERE id = ?`, amount, to)
		return err
	})
}

// TestFileSystem_Apply applies a primary's transactions to a read-only
// mount while readers on it check, in every read transaction, that the
// total is what every transaction keeps: a reader never sees half of one,
// whether files come one at a time or in groups.
//
// With kernel locks the readers' locks never reach the daemon, and the
// lock holder takes the applier's (fs.RunLockHolder).
func TestFileSystem_Apply(t *testing.T) {
	for _, tc := range []struct {
		mode   string
		kernel bool
	}{{"delete", false}, {"wal", false}, {"delete", true}, {"wal", true}} {
		name := tc.mode
		if tc.kernel {
			name += "-kernel-locks"
		}
		mode := tc.mode
		t.Run(name, func(t *testing.T) {
			src := newBank(t, mode)
			for range 300 {
				src.step()
			}
			f := newReplicaFS(t, tc.kernel)
			f.SetCheckpointFrames(20)
			ctx := context.Background()
			files := src.log.Files()
			// The first files make the database and its tables (in WAL mode
			// the switch to WAL comes first, alone); readers start then.
			first := 0
			for ; !hasAccounts(t, f); first++ {
				if first == len(files) {
					t.Fatalf("none of the %d files makes the accounts table", len(files))
				}
				if _, err := f.Apply(ctx, "bank.db", filepath.Join(src.log.Dir, files[first].Name), false); err != nil {
					t.Fatal(err)
				}
			}
			var (
				stop          atomic.Bool
				wg            sync.WaitGroup
				reads, busies atomic.Int64
				failure       atomic.Value
				// While paused, readers start no read transaction: every
				// few groups two apply with none in, so that a checkpoint
				// copies every frame and the WAL starts over, which
				// readers always in would hold off.
				paused atomic.Bool
				active atomic.Int64
			)
			var readers []*sql.DB
			for r := range 3 {
				db, err := sql.Open("sqlite3", "file:"+filepath.Join(f.MountDir, "bank.db")+"?_busy_timeout=5000")
				if err != nil {
					t.Fatal(err)
				}
				db.SetMaxOpenConns(1)
				t.Cleanup(func() { _ = db.Close() })
				readers = append(readers, db)
				wg.Go(func() {
					for !stop.Load() {
						active.Add(1)
						if paused.Load() {
							active.Add(-1)
							time.Sleep(100 * time.Microsecond)
							continue
						}
						var sum, n int
						err := db.QueryRow(`SELECT sum(balance), count(*) FROM accounts`).Scan(&sum, &n)
						active.Add(-1)
						if err != nil && strings.Contains(err.Error(), "locked") {
							busies.Add(1)
							continue
						}
						if err != nil || sum != accountsSum || n != accounts {
							failure.CompareAndSwap(nil, fmt.Sprintf("reader %d: sum %d of %d accounts, %v; want %d of %d", r, sum, n, err, accountsSum, accounts))
							return
						}
						reads.Add(1)
					}
				})
			}
			// Single files and groups, as a replica catching up applies.
			sizes := []int{1, 3, 1, 7, 2, 20}
			groups := 0
			for i := first; i < len(files); groups++ {
				group := files[i:min(i+sizes[groups%len(sizes)], len(files))]
				var paths []string
				for _, file := range group {
					paths = append(paths, filepath.Join(src.log.Dir, file.Name))
				}
				pause := groups%10 >= 8
				if pause {
					paused.Store(true)
					for active.Load() != 0 {
						time.Sleep(100 * time.Microsecond)
					}
				}
				infos, err := f.ApplyFiles(ctx, "bank.db", paths, fs.ApplyOptions{})
				paused.Store(false)
				if err != nil {
					t.Fatal(err)
				}
				if last := group[len(group)-1]; len(infos) != len(group) || infos[len(infos)-1].Pos() != last.Pos() {
					t.Fatalf("applied %d files up to %s, want %d up to %s", len(infos), infos[len(infos)-1].Pos(), len(group), last.Pos())
				}
				i += len(group)
				// Readers get in between groups: wait for one read.
				for r0, deadline := reads.Load(), time.Now().Add(2*time.Second); reads.Load() == r0 && time.Now().Before(deadline); {
					time.Sleep(100 * time.Microsecond)
				}
			}
			stop.Store(true)
			testingutil.Within(t, 30*time.Second, "the readers to stop", wg.Wait)
			if msg := failure.Load(); msg != nil {
				t.Fatal(msg)
			}
			t.Logf("%d files applied in %d groups under %d reads (%d busy)", len(files), groups, reads.Load(), busies.Load())
			if reads.Load() < int64(groups) {
				t.Fatalf("only %d reads ran during %d applies", reads.Load(), groups)
			}
			if got := f.DB("bank.db").Pos(); got != src.log.Pos() {
				t.Fatalf("replica at %s, want %s", got, src.log.Pos())
			}
			if pos := testingutil.MustReadFile(t, filepath.Join(f.MountDir, "bank.db-pos")); !bytes.Contains(pos, []byte(src.log.Pos().String())) {
				t.Fatalf("bank.db-pos says %q, want %s", pos, src.log.Pos())
			}
			// A fresh reader through the mount sees the last transaction.
			db, err := sql.Open("sqlite3", "file:"+filepath.Join(f.MountDir, "bank.db"))
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			var blobs, want int
			if err := db.QueryRow(`SELECT count(*) FROM blob`).Scan(&blobs); err != nil {
				t.Fatal(err)
			}
			if err := src.db.QueryRow(`SELECT count(*) FROM blob`).Scan(&want); err != nil || blobs != want {
				t.Fatalf("replica has %d blobs, source %d (%v)", blobs, want, err)
			}
			// The readers that ran all along see it too: no page of theirs
			// stayed cached, in the kernel or in SQLite.
			for i, r := range readers {
				var n int
				if err := r.QueryRow(`SELECT count(*) FROM blob`).Scan(&n); err != nil || n != want {
					t.Fatalf("reader %d sees %d blobs (%v), want %d", i, n, err, want)
				}
			}
			var ok string
			if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
				t.Fatalf("integrity_check: %q, %v", ok, err)
			}
			if mode == "wal" {
				// Applied as WAL frames, checkpointed and started over
				// along the way.
				frames, done, gens := f.WALFrames("bank.db")
				if frames == 0 || done > frames || gens < 3 {
					t.Fatalf("the replica's WAL holds %d frames, %d checkpointed, in its generation %d; want several generations", frames, done, gens)
				}
				// A replica made writable copies its WAL into the database
				// file first.
				f.SetReadOnly(false)
				if b := testingutil.MustReadFile(t, filepath.Join(f.DataDir, "dbs", "bank.db", "wal")); len(b) != 0 {
					t.Fatalf("the WAL holds %d bytes after the replica became writable", len(b))
				}
			}
			backing := filepath.Join(f.DataDir, "dbs", "bank.db", "database")
			if !bytes.Equal(testingutil.MustReadFile(t, backing), testingutil.MustReadFile(t, src.path)) {
				t.Fatal("the replica's database differs from the source's")
			}
		})
	}
}

// newReplicaFS mounts a read-only filesystem, as on a replica; with
// kernelLocks, SQLite's locks on it are the kernel's and this test binary
// is its lock holder.
func newReplicaFS(t *testing.T, kernelLocks bool) *fs.FileSystem {
	t.Helper()
	dir := t.TempDir()
	f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	f.Logger = testingutil.Logger(t)
	if kernelLocks {
		f.KernelLocks = true
		f.LockHolder = lockHolderCommand
	}
	f.SetReadOnly(true)
	testingutil.MustOpenFS(t, f)
	return f
}

// hasAccounts reports whether the replica's bank.db has its accounts yet.
func hasAccounts(t *testing.T, f *fs.FileSystem) bool {
	t.Helper()
	if f.DB("bank.db") == nil {
		return false
	}
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(f.MountDir, "bank.db")+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM sqlite_schema WHERE name = 'accounts'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// TestFileSystem_SetAcked checks that Maintain keeps the LTX files a
// replica has not acknowledged, and removes them once it has.
func TestFileSystem_SetAcked(t *testing.T) {
	dir := t.TempDir()
	f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	f.Logger = testingutil.Logger(t)
	f.Retention = time.Nanosecond
	testingutil.MustOpenFS(t, f)
	db := testingutil.MustOpenSQLite(t, filepath.Join(f.MountDir, "app.db"), "delete")
	for i := range 10 {
		if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS t (x); INSERT INTO t VALUES (?)`, i); err != nil {
			t.Fatal(err)
		}
	}
	l := f.DB("app.db").Log()
	last := l.Pos().TXID
	ctx := context.Background()
	f.SetAcked(func(name string) ltx.TXID {
		if name != "app.db" {
			t.Errorf("acked asked for %q", name)
		}
		return 4
	})
	if err := f.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if first := l.Files()[0].Header.MinTXID; first != 5 {
		t.Fatalf("with TXID 4 acknowledged the log starts at TXID %d, want 5", first)
	}
	f.SetAcked(nil)
	if err := f.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if files := l.Files(); len(files) != 1 || files[0].Header.MaxTXID != last {
		t.Fatalf("with everything acknowledged the log holds %d files, want only the newest (TXID %d)", len(files), last)
	}
}

// TestFileSystem_ApplyOverlappingReaders applies a primary's WAL-mode
// transactions to a replica while two processes read it in transactions
// of 50 ms, back to back, the second started half a transaction after the
// first, so that one of them always holds SQLite's read lock. The applies
// are WAL frames, which wait for no reader (an apply into the database
// file, which must wait for a moment when neither reads, gets in within
// one of their transactions: once it waits, new read transactions wait
// for it; TestLockTable_WriterWaitsFirst checks that rule). Every apply
// must end, and the readers, checking the invariant in every transaction,
// must never fail.
func TestFileSystem_ApplyOverlappingReaders(t *testing.T) {
	src := newBank(t, "wal")
	for range 60 {
		src.step()
	}
	f := testingutil.MustMount(t)
	f.SetReadOnly(true)
	files := src.log.Files()
	first := 0
	for ; !hasAccounts(t, f); first++ {
		if first == len(files) {
			t.Fatalf("none of the %d files makes the accounts table", len(files))
		}
		if _, err := f.Apply(context.Background(), "bank.db", filepath.Join(src.log.Dir, files[first].Name), false); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(f.MountDir, "bank.db")
	var readers []*child
	for range 2 {
		r := startChild(t, "bank-reader", path, "50")
		r.mustReadLine(t, "ready")
		readers = append(readers, r)
		time.Sleep(25 * time.Millisecond)
	}
	for i := first; i < len(files); i++ {
		// Bounded so that the test fails rather than hangs.
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, err := f.Apply(ctx, "bank.db", filepath.Join(src.log.Dir, files[i].Name), false)
		cancel()
		if err != nil {
			t.Fatalf("apply %d of %d under overlapping readers: %v", i+1, len(files), err)
		}
	}
	for i, r := range readers {
		if err := r.kill(); err != nil {
			t.Fatal(err)
		}
		if out := r.stderr.String(); out != "" {
			t.Fatalf("reader %d: %s", i, out)
		}
	}
	if got := f.DB("bank.db").Pos(); got != src.log.Pos() {
		t.Fatalf("replica at %s, want %s", got, src.log.Pos())
	}
	t.Logf("%d files applied one at a time under two overlapping readers", len(files)-first)
}

// bankReaderChild reads bank.db at path in read transactions of about
// hold, back to back, checking the accounts' total at their start and end,
// until killed. It prints "ready 0" after its first transaction and exits
// at the first error.
func bankReaderChild(path string, hold time.Duration) error {
	db, err := sql.Open("sqlite3", fmt.Sprintf("file:%s?_busy_timeout=5000", path))
	if err != nil {
		return err
	}
	defer func() { _ = db.Close() }()
	db.SetMaxOpenConns(1)
	check := func(tx *sql.Tx) error {
		var sum, n int
		if err := tx.QueryRow(`SELECT sum(balance), count(*) FROM accounts`).Scan(&sum, &n); err != nil {
			return err
		}
		if sum != accountsSum || n != accounts {
			return fmt.Errorf("sum %d of %d accounts, want %d of %d", sum, n, accountsSum, accounts)
		}
		return nil
	}
	for first := true; ; first = false {
		tx, err := db.Begin()
		if err != nil {
			return err
		}
		if err := check(tx); err != nil {
			return err
		}
		time.Sleep(hold)
		if err := check(tx); err != nil {
			return err
		}
		if err := tx.Rollback(); err != nil {
			return err
		}
		if first {
			if _, err := fmt.Println("ready 0"); err != nil {
				return err
			}
		}
	}
}

// bankReaderStepChild reads bank.db at path in one read transaction for
// each line on its stdin, checking the accounts' total, and prints "saw N"
// after each, N the rows of table blob it saw. It exits at EOF or at the
// first error.
func bankReaderStepChild(path string) error {
	db, err := sql.Open("sqlite3", fmt.Sprintf("file:%s?_busy_timeout=5000", path))
	if err != nil {
		return err
	}
	defer func() { _ = db.Close() }()
	db.SetMaxOpenConns(1)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		tx, err := db.Begin()
		if err != nil {
			return err
		}
		var sum, n, blobs int
		if err := tx.QueryRow(`SELECT sum(balance), count(*) FROM accounts`).Scan(&sum, &n); err != nil {
			return err
		}
		if sum != accountsSum || n != accounts {
			return fmt.Errorf("sum %d of %d accounts, want %d of %d", sum, n, accountsSum, accounts)
		}
		if err := tx.QueryRow(`SELECT count(*) FROM blob`).Scan(&blobs); err != nil {
			return err
		}
		if err := tx.Rollback(); err != nil {
			return err
		}
		if _, err := fmt.Println("saw", blobs); err != nil {
			return err
		}
	}
	return in.Err()
}

// replicaBeforeLastRow makes a source database whose last transaction adds
// a row to blob, and a replica of it (newReplicaFS) with every file but
// that last one applied. It returns them and the source's files.
func replicaBeforeLastRow(t *testing.T, mode string, kernelLocks bool) (*bank, *fs.FileSystem, []ltx.FileInfo) {
	t.Helper()
	src := newBank(t, mode)
	src.tx(func(tx *sql.Tx) error {
		_, err := tx.Exec(`INSERT INTO blob VALUES (1)`)
		return err
	})
	f := newReplicaFS(t, kernelLocks)
	files := src.log.Files()
	for _, file := range files[:len(files)-1] {
		if _, err := f.Apply(context.Background(), "bank.db", filepath.Join(src.log.Dir, file.Name), false); err != nil {
			t.Fatal(err)
		}
	}
	return src, f, files
}

// TestFileSystem_ApplyReadBeforeFsync: in rollback-journal mode a group
// applied into the database file is published to the readers once its
// pages are written, before the file's fsync: a reader whose cache holds
// the database as it was sees the new row in that window (page 1 is
// served with the group's change counter before the log's position
// moves), and after the apply.
func TestFileSystem_ApplyReadBeforeFsync(t *testing.T) {
	for _, kernel := range []bool{false, true} {
		name := "mount-locks"
		if kernel {
			name = "kernel-locks"
		}
		t.Run(name, func(t *testing.T) {
			src, f, files := replicaBeforeLastRow(t, "delete", kernel)
			r, err := sql.Open("sqlite3", "file:"+filepath.Join(f.MountDir, "bank.db")+"?_busy_timeout=5000")
			if err != nil {
				t.Fatal(err)
			}
			r.SetMaxOpenConns(1)
			defer r.Close()
			count := func() int {
				t.Helper()
				var n int
				if err := r.QueryRow(`SELECT count(*) FROM blob`).Scan(&n); err != nil {
					t.Fatal(err)
				}
				return n
			}
			if n := count(); n != 0 {
				t.Fatalf("blob has %d rows before the last file, want 0", n)
			}
			inWindow := -1
			fs.SetEarlyPublished(t, func() { inWindow = count() })
			if _, err := f.Apply(context.Background(), "bank.db", filepath.Join(src.log.Dir, files[len(files)-1].Name), false); err != nil {
				t.Fatal(err)
			}
			if inWindow != 1 {
				t.Fatalf("between the publish and the fsync the reader saw %d rows in blob, want 1", inWindow)
			}
			if n := count(); n != 1 {
				t.Fatalf("after the apply the reader sees %d rows in blob, want 1", n)
			}
		})
	}
}

// stepReader is a bank-reader-step child on a replica's bank.db: each
// step makes it run one read transaction and print "saw N", the rows of
// blob it saw.
type stepReader struct{ *child }

func startStepReader(t *testing.T, f *fs.FileSystem) stepReader {
	t.Helper()
	return stepReader{startChild(t, "bank-reader-step", filepath.Join(f.MountDir, "bank.db"))}
}

func (r stepReader) step(t *testing.T) {
	t.Helper()
	if _, err := io.WriteString(r.stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
}

// TestFileSystem_ApplyFailsPartWay fills the replica's disk in the middle
// of an apply (a 2 MiB tmpfs under its data directory, a transaction that
// grows the database by 4 MiB of zeros, whose LTX file is small): the
// database file then holds part of the transaction, so readers on the
// mount must stay held off (SQLite says the database is locked) rather
// than read it, until the same file is applied again with room to spare;
// then they read the whole transaction.
func TestFileSystem_ApplyFailsPartWay(t *testing.T) {
	src := newBank(t, "delete")
	for range 20 {
		src.step()
	}
	dir, data := smallDataDir(t, "2m")
	f := fs.New(data, filepath.Join(dir, "mnt"))
	f.Logger = testingutil.Logger(t)
	f.SetReadOnly(true)
	testingutil.MustOpenFS(t, f)
	ctx := context.Background()
	for _, file := range src.log.Files() {
		if _, err := f.Apply(ctx, "bank.db", filepath.Join(src.log.Dir, file.Name), false); err != nil {
			t.Fatal(err)
		}
	}
	reader, err := sql.Open("sqlite3", "file:"+filepath.Join(f.MountDir, "bank.db")+"?_busy_timeout=200")
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	reader.SetMaxOpenConns(1)
	read := func() (blobs int, err error) {
		var sum, n int
		if err := reader.QueryRow(`SELECT sum(balance), count(*) FROM accounts`).Scan(&sum, &n); err != nil {
			return 0, err
		}
		if sum != accountsSum || n != accounts {
			return 0, fmt.Errorf("sum %d of %d accounts, want %d of %d", sum, n, accountsSum, accounts)
		}
		var ok string
		if err := reader.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
			return 0, fmt.Errorf("integrity_check: %q, %v", ok, err)
		}
		err = reader.QueryRow(`SELECT count(*) FROM blob`).Scan(&blobs)
		return blobs, err
	}
	before, err := read()
	if err != nil {
		t.Fatalf("read before: %v", err)
	}

	src.tx(func(tx *sql.Tx) error {
		_, err := tx.Exec(`INSERT INTO blob VALUES (zeroblob(4 << 20))`)
		return err
	})
	files := src.log.Files()
	big := filepath.Join(src.log.Dir, files[len(files)-1].Name)
	_, err = f.Apply(ctx, "bank.db", big, false)
	var partly *ltx.PartlyAppliedError
	if !errors.As(err, &partly) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("apply onto a full disk: %v, want a partly applied error with ENOSPC", err)
	}
	for range 3 {
		if _, err := read(); err == nil || !strings.Contains(err.Error(), "database is locked") {
			t.Fatalf("read after an apply that failed part way: %v, want the database locked", err)
		}
	}
	if err := syscall.Mount("tmpfs", data, "tmpfs", syscall.MS_REMOUNT, "size=32m"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Apply(ctx, "bank.db", big, false); err != nil {
		t.Fatalf("apply again with room: %v", err)
	}
	after, err := read()
	if err != nil || after != before+1 {
		t.Fatalf("read after the apply: %d blobs, %v; want %d", after, err, before+1)
	}
	backing := filepath.Join(f.DataDir, "dbs", "bank.db", "database")
	if !bytes.Equal(testingutil.MustReadFile(t, backing), testingutil.MustReadFile(t, src.path)) {
		t.Fatal("the replica's database differs from the source's")
	}
}

// TestFileSystem_ApplyQueuesReaders: an app's read transaction that meets
// a replica's apply waits in the mount for the apply to end, rather than
// fail with EAGAIN and sleep in SQLite's back-off while applies follow one
// another, and it goes before the next apply. The reader runs in another
// process, one read transaction each time it is told to.
func TestFileSystem_ApplyQueuesReaders(t *testing.T) {
	for _, mode := range []string{"delete", "wal"} {
		t.Run(mode, func(t *testing.T) {
			// The last file, applied while the reader waits, adds a row to
			// blob.
			src, f, files := replicaBeforeLastRow(t, mode, false)
			r := startStepReader(t, f)
			step := func() { r.step(t) }
			step() // opens the database and reads its schema
			if blobs := r.mustReadLine(t, "saw"); blobs != 0 {
				t.Fatalf("the reader saw %d rows in blob before the last file, want 0", blobs)
			}

			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			release, err := f.HoldReaders(ctx, "bank.db")
			if err != nil {
				t.Fatal(err)
			}
			d := f.DB("bank.db")
			step()
			deadline := time.Now().Add(10 * time.Second)
			for d.QueuedLocks() == 0 {
				if time.Now().After(deadline) {
					release()
					t.Fatal("the reader's lock request did not wait in the mount's lock table in 10s")
				}
				time.Sleep(time.Millisecond)
			}
			// The hold ends and the apply of the last file begins at once:
			// the reader, queued first, reads before it. In WAL mode an
			// apply holds no reader off (it appends WAL frames); the next
			// hold (a snapshot's, or a replica's that becomes writable) is
			// taken instead, and kept until the read is done.
			release()
			applied, readDone := make(chan error, 1), make(chan struct{})
			var once sync.Once
			done := func() { once.Do(func() { close(readDone) }) }
			defer done()
			go func() {
				if mode == "wal" {
					release, err := f.HoldReaders(ctx, "bank.db")
					if err == nil {
						select {
						case <-readDone:
						case <-ctx.Done():
						}
						release()
					}
					applied <- err
					return
				}
				_, err := f.Apply(ctx, "bank.db", filepath.Join(src.log.Dir, files[len(files)-1].Name), false)
				applied <- err
			}()
			blobs := r.mustReadLine(t, "saw")
			done()
			if blobs != 0 {
				t.Fatalf("the queued read saw %d rows in blob, want 0: the apply went first", blobs)
			}
			if err := <-applied; err != nil {
				t.Fatal(err)
			}
			if mode == "wal" {
				if _, err := f.Apply(ctx, "bank.db", filepath.Join(src.log.Dir, files[len(files)-1].Name), false); err != nil {
					t.Fatal(err)
				}
			}
			step()
			if blobs := r.mustReadLine(t, "saw"); blobs != 1 {
				t.Fatalf("the read after the apply saw %d rows in blob, want 1", blobs)
			}
			if err := r.stdin.Close(); err != nil {
				t.Fatal(err)
			}
			testingutil.Within(t, 10*time.Second, "the reader to exit", func() { <-r.done })
			if r.err != nil {
				t.Fatalf("reader: %v\n%s", r.err, r.stderr.String())
			}
		})
	}
}

// TestFileSystem_ApplyKernelLocks: on a replica with kernel locks the
// readers' locks never reach the daemon; the lock holder, a child process,
// takes the applier's write locks in the kernel. A read transaction made
// during a hold must not run until the hold ends, and it then sees the
// database as it was. The reader runs in another process.
func TestFileSystem_ApplyKernelLocks(t *testing.T) {
	for _, mode := range []string{"delete", "wal"} {
		t.Run(mode, func(t *testing.T) {
			src, f, files := replicaBeforeLastRow(t, mode, true)
			// The lock holder's own opens of the files make no reader.
			if f.ReadersOpen("bank.db") {
				t.Fatal("readers open before any reader started")
			}
			r := startStepReader(t, f)
			step := func() { r.step(t) }
			step()
			if blobs := r.mustReadLine(t, "saw"); blobs != 0 {
				t.Fatalf("the reader saw %d rows in blob before the last file, want 0", blobs)
			}
			if !f.ReadersOpen("bank.db") {
				t.Fatal("no reader open while the reader has the database open")
			}

			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			release, err := f.HoldReaders(ctx, "bank.db")
			if err != nil {
				t.Fatal(err)
			}
			pid := f.LockHolderPid()
			if pid == 0 || pid == os.Getpid() {
				release()
				t.Fatalf("lock holder pid %d: want a child process", pid)
			}
			if n := writeLocksOf(t, pid); n == 0 {
				release()
				t.Fatalf("/proc/locks has no write lock of the lock holder (pid %d) during a hold", pid)
			}
			step()
			select {
			case line := <-r.lines:
				release()
				t.Fatalf("the reader read during the hold: %q", line)
			case <-time.After(500 * time.Millisecond):
			}
			release()
			if blobs := r.mustReadLine(t, "saw"); blobs != 0 {
				t.Fatalf("the read made during the hold saw %d rows in blob, want 0", blobs)
			}
			if _, err := f.Apply(ctx, "bank.db", filepath.Join(src.log.Dir, files[len(files)-1].Name), false); err != nil {
				t.Fatal(err)
			}
			step()
			if blobs := r.mustReadLine(t, "saw"); blobs != 1 {
				t.Fatalf("the read after the apply saw %d rows in blob, want 1", blobs)
			}
			// The holds are over: the lock holder keeps no lock once it has
			// done what it was asked (unlocks are not waited for, and a WAL
			// reader does not wait for the applier's write lock to go),
			// but the WAL write lock, which the applier of WAL frames keeps
			// from one apply to the next.
			kept := 0
			if mode == "wal" {
				kept = 1
			}
			for deadline := time.Now().Add(10 * time.Second); writeLocksOf(t, pid) != kept; time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("/proc/locks has %d write locks of the lock holder (pid %d) 10s after the apply, want %d", writeLocksOf(t, pid), pid, kept)
				}
			}
			if err := r.stdin.Close(); err != nil {
				t.Fatal(err)
			}
			testingutil.Within(t, 10*time.Second, "the reader to exit", func() { <-r.done })
			if r.err != nil {
				t.Fatalf("reader: %v\n%s", r.err, r.stderr.String())
			}
			// The kernel sends the exited process's releases on its own
			// time: they arrive soon, not necessarily before its exit.
			for deadline := time.Now().Add(10 * time.Second); f.ReadersOpen("bank.db"); time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("readers open 10s after the reader exited")
				}
			}
			// A replica made writable drops every lock the applier kept,
			// and the app writes (its COMMIT would wait for the WAL write
			// lock until its busy timeout).
			if err := f.EndApplying(); err != nil {
				t.Fatal(err)
			}
			f.SetReadOnly(false)
			for deadline := time.Now().Add(10 * time.Second); writeLocksOf(t, pid) != 0; time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("/proc/locks has %d write locks of the lock holder (pid %d) 10s after the replica became writable", writeLocksOf(t, pid), pid)
				}
			}
			app := testingutil.MustOpenSQLite(t, filepath.Join(f.MountDir, "bank.db"), mode)
			if _, err := app.Exec(`INSERT INTO blob VALUES (x'00')`); err != nil {
				t.Fatalf("write on the replica made writable: %v", err)
			}
			var n int
			if err := app.QueryRow(`SELECT count(*) FROM blob`).Scan(&n); err != nil || n != 2 {
				t.Fatalf("blob has %d rows (%v), want 2", n, err)
			}
		})
	}
}

// TestFileSystem_ApplyLockHolderKilled: a lock holder that dies (killed
// here between two applies) is replaced at the next apply, which works.
func TestFileSystem_ApplyLockHolderKilled(t *testing.T) {
	src := newBank(t, "wal")
	for range 5 {
		src.step()
	}
	f := newReplicaFS(t, true)
	files := src.log.Files()
	apply := func(file ltx.FileInfo) {
		t.Helper()
		if _, err := f.Apply(context.Background(), "bank.db", filepath.Join(src.log.Dir, file.Name), false); err != nil {
			t.Fatal(err)
		}
	}
	for _, file := range files[:3] {
		apply(file)
	}
	first := f.LockHolderPid()
	if first == 0 {
		t.Fatal("no lock holder after three applies")
	}
	if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); f.LockHolderPid() != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("lock holder %d still counts as running 10s after SIGKILL", first)
		}
	}
	for _, file := range files[3:] {
		apply(file)
	}
	if second := f.LockHolderPid(); second == 0 || second == first {
		t.Fatalf("lock holder after the kill: pid %d, want a new one (the killed one was %d)", second, first)
	}
	if got := f.DB("bank.db").Pos(); got != src.log.Pos() {
		t.Fatalf("replica at %s, want %s", got, src.log.Pos())
	}
	mustMatchSource(t, f, src)
}

// TestFileSystem_ChildrenWithoutFUSEConnection: a child process started
// after a mount (as the lock holder is) must not inherit the /dev/fuse
// descriptor. One that did would keep the connection alive after the
// daemon died, and its exit would hang for good in the FLUSH of a file
// it had open on the mount.
func TestFileSystem_ChildrenWithoutFUSEConnection(t *testing.T) {
	testingutil.MustMount(t)
	c := startChild(t, "lock-holder")
	dir := fmt.Sprintf("/proc/%d/fd", c.cmd.Process.Pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		if target, _ := os.Readlink(filepath.Join(dir, fd.Name())); target == "/dev/fuse" {
			t.Fatalf("the child's fd %s is /dev/fuse: it inherited the mount's FUSE connection", fd.Name())
		}
	}
	if err := c.stdin.Close(); err != nil {
		t.Fatal(err)
	}
	testingutil.Within(t, 10*time.Second, "the child to exit", func() { <-c.done })
}

// TestFileSystem_SpareFill: a filesystem keeps SpareFill spare files
// ready, and makes more once the pool falls below a quarter of it.
func TestFileSystem_SpareFill(t *testing.T) {
	dir := t.TempDir()
	f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	f.Logger = testingutil.Logger(t)
	f.SpareFill = 64
	testingutil.MustOpenFS(t, f)
	spares := func() int {
		entries, err := os.ReadDir(filepath.Join(f.DataDir, "spare"))
		if err != nil {
			t.Fatal(err)
		}
		return len(entries)
	}
	// Taken spares stay in the directory until their taker renames them.
	var taken []string
	waitFor := func(want int) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); f.Spares().Len() != want || spares() != want+len(taken); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("pool holds %d, directory %d files, want %d and %d", f.Spares().Len(), spares(), want, want+len(taken))
			}
		}
	}
	waitFor(64)
	// The filler may still be between its last file and its check
	// that the pool is full: let it finish.
	time.Sleep(100 * time.Millisecond)
	waitFor(64)
	// Taken down to 16, a quarter: it stays so.
	for range 48 {
		taken = append(taken, f.Spares().Take())
	}
	time.Sleep(1500 * time.Millisecond) // past the filler's next look
	if n := f.Spares().Len(); n != 16 {
		t.Fatalf("pool holds %d after 48 of 64 were taken, want 16: it refills only below a quarter", n)
	}
	taken = append(taken, f.Spares().Take())
	waitFor(64)
	for _, p := range taken {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("a taken spare is gone: %v", err)
		}
	}
}

// writeLocksOf counts the POSIX write locks of process pid in /proc/locks.
func writeLocksOf(t *testing.T, pid int) int {
	return locksOf(t, pid, "WRITE")
}

// readLocksOf counts the POSIX read locks of process pid in /proc/locks.
func readLocksOf(t *testing.T, pid int) int {
	return locksOf(t, pid, "READ")
}

func locksOf(t *testing.T, pid int, typ string) int {
	t.Helper()
	n := 0
	for line := range strings.Lines(string(testingutil.MustReadFile(t, "/proc/locks"))) {
		f := strings.Fields(line)
		if len(f) >= 5 && f[1] == "POSIX" && f[3] == typ && f[4] == strconv.Itoa(pid) {
			n++
		}
	}
	return n
}

// TestFileSystem_ApplyExclusiveWriter: a primary's writer in
// locking_mode=EXCLUSIVE with a rollback journal moves page 1's change
// counter only in the first transaction of its lock, and SQLite's readers
// in that mode keep their page cache while the counter stays the same. A
// replica's reader that keeps its connection must still see every
// transaction as it is applied.
func TestFileSystem_ApplyExclusiveWriter(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.db")
	src := testingutil.MustOpenSQLite(t, path, "delete")
	log := testingutil.MustOpenLog(t, "x.db", filepath.Join(dir, "ltx"), path)
	var counters []uint32 // page 1's change counter after each commit
	commit := func(stmt string) {
		t.Helper()
		before, _ := os.ReadFile(path)
		if _, err := src.Exec(stmt); err != nil {
			t.Fatal(err)
		}
		after := testingutil.MustReadFile(t, path)
		if _, err := testingutil.CommitChanged(log, before, after); err != nil {
			t.Fatal(err)
		}
		counters = append(counters, binary.BigEndian.Uint32(after[24:]))
	}
	commit(`CREATE TABLE t (x INTEGER)`)
	commit(`INSERT INTO t VALUES (0)`)
	if _, err := src.Exec(`PRAGMA locking_mode=EXCLUSIVE`); err != nil {
		t.Fatal(err)
	}
	const updates = 30
	for i := 1; i <= updates; i++ {
		commit(fmt.Sprintf(`UPDATE t SET x = %d`, i))
	}
	// The case under test: updates after the first leave the counter.
	if last := counters[len(counters)-1]; last != counters[len(counters)-updates+1] {
		t.Fatalf("page 1's change counter went from %d to %d over the exclusive updates: SQLite no longer leaves it, the test tests nothing", counters[len(counters)-updates+1], last)
	}

	f := testingutil.MustMount(t)
	f.SetReadOnly(true)
	files := log.Files()
	apply := func(i int) {
		t.Helper()
		if _, err := f.Apply(context.Background(), "x.db", filepath.Join(log.Dir, files[i].Name), false); err != nil {
			t.Fatal(err)
		}
	}
	first := len(files) - updates
	for i := range first {
		apply(i)
	}
	reader, err := sql.Open("sqlite3", "file:"+filepath.Join(f.MountDir, "x.db")+"?_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	reader.SetMaxOpenConns(1)
	t.Cleanup(func() { _ = reader.Close() })
	read := func() int {
		t.Helper()
		var x int
		if err := reader.QueryRow(`SELECT x FROM t`).Scan(&x); err != nil {
			t.Fatal(err)
		}
		return x
	}
	if x := read(); x != 0 {
		t.Fatalf("before the updates the reader sees x = %d, want 0", x)
	}
	for i := first; i < len(files); i++ {
		apply(i)
		if x, want := read(), i-first+1; x != want {
			t.Fatalf("after update %d of %d the reader sees x = %d, want %d (stale page cache)", want, updates, x, want)
		}
	}
	// The file keeps the primary's bytes.
	if got, want := testingutil.MustReadFile(t, filepath.Join(f.DataDir, "dbs", "x.db", "database")), testingutil.MustReadFile(t, path); !bytes.Equal(got, want) {
		t.Fatal("the replica's database file differs from the primary's")
	}
}

// TestFileSystem_ApplyLongReader: an apply held off by a read transaction
// on the mount says so in the log, while it waits (every 100 ms here; 5 s
// by default): naming the reader's process with the mount's locks.
func TestFileSystem_ApplyLongReader(t *testing.T) {
	for _, kernel := range []bool{false, true} {
		name := "mount-locks"
		if kernel {
			name = "kernel-locks"
		}
		t.Run(name, func(t *testing.T) { testApplyLongReader(t, kernel) })
	}
}

// testApplyLongReader is TestFileSystem_ApplyLongReader with the mount's
// locks or, with kernel, the kernel's: the log cannot name the readers
// then, it points to /proc/locks.
func testApplyLongReader(t *testing.T, kernel bool) {
	src := newBank(t, "delete")
	src.step()
	var logged testingutil.LockedBuffer
	dir := t.TempDir()
	f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	f.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logged, testingutil.LogWriter(t)), nil))
	f.SetReadHoldWarning(100 * time.Millisecond)
	if kernel {
		f.KernelLocks, f.LockHolder = true, lockHolderCommand
	}
	testingutil.MustOpenFS(t, f)
	f.SetReadOnly(true)
	files := src.log.Files()
	for _, file := range files[:len(files)-1] {
		if _, err := f.Apply(context.Background(), "bank.db", filepath.Join(src.log.Dir, file.Name), false); err != nil {
			t.Fatal(err)
		}
	}
	// Read transactions of a second, back to back: the apply waits for
	// one to end.
	r := startChild(t, "bank-reader", filepath.Join(f.MountDir, "bank.db"), "1000")
	r.mustReadLine(t, "ready")
	// Apply while the reader is in a transaction.
	d := f.DB("bank.db")
	locked := func() bool {
		if kernel {
			return readLocksOf(t, r.cmd.Process.Pid) > 0
		}
		return len(d.Locks.Locks()) > 0
	}
	for deadline := time.Now().Add(10 * time.Second); !locked(); {
		if time.Now().After(deadline) {
			t.Fatal("the reader took no lock in 10s")
		}
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := f.Apply(ctx, "bank.db", filepath.Join(src.log.Dir, files[len(files)-1].Name), false); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("reader_pids=[%d]", r.cmd.Process.Pid)
	if kernel {
		want = "/proc/locks"
	}
	var warned bool
	for line := range strings.SplitSeq(logged.String(), "\n") {
		if strings.Contains(line, "an apply waits for read transactions") && strings.Contains(line, want) {
			warned = true
		}
	}
	if !warned {
		t.Fatalf("no warning with %q in the log:\n%s", want, logged.String())
	}
}

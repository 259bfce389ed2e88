package fs_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
)

func TestFileSystem_ReadOnly(t *testing.T) {
	for _, mode := range journalModes {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
			var logs testingutil.LockedBuffer
			fsys.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			testingutil.MustOpenFS(t, fsys)
			path := filepath.Join(fsys.MountDir, "app.db")
			writer := testingutil.MustOpenSQLite(t, path, mode)
			if _, err := writer.Exec(`CREATE TABLE t (x); INSERT INTO t VALUES (1), (2)`); err != nil {
				t.Fatal(err)
			}
			reader := testingutil.MustOpenSQLite(t, path, mode)
			count := func() int {
				t.Helper()
				var n int
				if err := reader.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil {
					t.Fatalf("read: %v", err)
				}
				return n
			}
			if got := count(); got != 2 {
				t.Fatalf("got %d rows, want 2", got)
			}
			log := fsys.DB("app.db")
			pos := log.Pos()

			fsys.SetReadOnly(true)
			if _, err := writer.Exec(`INSERT INTO t VALUES (3)`); err == nil {
				t.Fatal("write on a read-only mount succeeded")
			}
			if got := log.Pos(); got != pos {
				t.Fatalf("got position %s after a refused write, want %s", got, pos)
			}
			if got := count(); got != 2 {
				t.Fatalf("reader got %d rows after switching, want 2", got)
			}
			_, err := os.OpenFile(path, os.O_RDWR, 0)
			if !errors.Is(err, syscall.EROFS) {
				t.Fatalf("open for writing: got %v, want EROFS", err)
			}
			if err := os.Remove(path); !errors.Is(err, syscall.EROFS) {
				t.Fatalf("delete: got %v, want EROFS", err)
			}
			if err := os.WriteFile(filepath.Join(fsys.MountDir, "new.db"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
				t.Fatalf("create: got %v, want EROFS", err)
			}
			if got := logs.String(); !strings.Contains(got, "write refused") || !strings.Contains(got, "pid=") {
				t.Fatalf("no log line names who tried to write:\n%s", got)
			}
			// The same thread again, within the minute a process's refused
			// writes are logged once: logged again once the primary changed.
			runtime.LockOSThread()
			for _, primary := range []string{"iad-1", "iad-1", "fra-1"} {
				fsys.SetPrimary(primary)
				if _, err := os.OpenFile(path, os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
					t.Fatalf("open for writing: got %v, want EROFS", err)
				}
			}
			runtime.UnlockOSThread()
			fsys.SetPrimary("")
			if got := logs.String(); strings.Count(got, "primary=iad-1") != 1 || strings.Count(got, "primary=fra-1") != 1 {
				t.Fatalf("refused writes of one thread: want one log line naming iad-1, then one naming fra-1:\n%s", got)
			}

			// A new connection opens the database read-only and reads.
			fresh := testingutil.MustOpenSQLite(t, path, mode)
			var n int
			if err := fresh.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil || n != 2 {
				t.Fatalf("fresh reader: got %d, %v; want 2 rows", n, err)
			}

			// With every connection closed (in WAL mode SQLite then
			// deletes the WAL), a new reader still opens the database.
			for _, db := range []*sql.DB{writer, reader, fresh} {
				_ = db.Close()
			}
			fsys.SetReadOnly(false)
			fsys.SetReadOnly(true)
			last := testingutil.MustOpenSQLite(t, path, mode)
			if err := last.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil || n != 2 {
				t.Fatalf("reader after every connection closed: got %d, %v; want 2 rows", n, err)
			}

			// Switched back with that read-only connection still open (in
			// WAL mode it opened the WAL first, read-only), a new writer
			// writes.
			fsys.SetReadOnly(false)
			writer = testingutil.MustOpenSQLite(t, path, mode)
			reader = testingutil.MustOpenSQLite(t, path, mode)
			if _, err := writer.Exec(`INSERT INTO t VALUES (3)`); err != nil {
				t.Fatalf("write after switching back: %v", err)
			}
			_ = last.Close()
			if got := count(); got != 3 {
				t.Fatalf("got %d rows, want 3", got)
			}
			if got, want := log.Pos().TXID, pos.TXID+1; got != want {
				t.Fatalf("got TXID %s, want %s", got, want)
			}
		})
	}
}

// TestFileSystem_WriteDeadline: past the write deadline a primary's
// lease may have run out. A transaction begun before it does not commit
// after it (its fsync fails), new writes are refused, the log gains
// nothing and readers see what was committed; cleared or moved forward,
// the deadline lets writes in again.
func TestFileSystem_WriteDeadline(t *testing.T) {
	for _, mode := range journalModes {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
			var logs testingutil.LockedBuffer
			fsys.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			testingutil.MustOpenFS(t, fsys)
			path := filepath.Join(fsys.MountDir, "app.db")
			writer := testingutil.MustOpenSQLite(t, path, mode)
			if _, err := writer.Exec(`CREATE TABLE t (x); INSERT INTO t VALUES (1)`); err != nil {
				t.Fatal(err)
			}
			// A second writer that gives up after 200 ms of SQLITE_BUSY.
			other, err := sql.Open("sqlite3", "file:"+path+"?_synchronous=FULL&_busy_timeout=200")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = other.Close() })
			reader := testingutil.MustOpenSQLite(t, path, mode)
			count := func() int {
				t.Helper()
				var n int
				if err := reader.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil {
					t.Fatalf("read: %v", err)
				}
				return n
			}
			log := fsys.DB("app.db")
			pos := log.Pos()

			// In rollback-journal modes the COMMIT waits out its busy
			// timeout for the lock it needs to write the database file.
			if _, err := writer.Exec(`PRAGMA busy_timeout = 200`); err != nil {
				t.Fatal(err)
			}
			tx, err := writer.Begin()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(`INSERT INTO t VALUES (2)`); err != nil {
				t.Fatal(err)
			}
			fsys.SetWriteDeadline(time.Now().Add(-time.Millisecond))
			if err := tx.Commit(); err == nil {
				t.Fatal("a transaction begun before the write deadline committed after it")
			}
			if _, err := other.Exec(`INSERT INTO t VALUES (3)`); err == nil {
				t.Fatal("a write past the deadline succeeded")
			}
			if got := log.Pos(); got != pos {
				t.Fatalf("position %s after refused writes, want %s", got, pos)
			}
			if got := count(); got != 1 {
				t.Fatalf("reader got %d rows after refused writes, want 1", got)
			}
			if got := logs.String(); !strings.Contains(got, "lease ran out") {
				t.Fatalf("no log line says the writes were refused for the lease:\n%s", got)
			}

			// A renewed lease moves the deadline forward; a node without one
			// clears it.
			for i, deadline := range []time.Time{time.Now().Add(time.Hour), {}} {
				fsys.SetWriteDeadline(deadline)
				if _, err := other.Exec(`INSERT INTO t VALUES (?)`, 4+i); err != nil {
					t.Fatalf("write with the deadline at %v: %v", deadline, err)
				}
			}
			if got := count(); got != 3 {
				t.Fatalf("reader got %d rows, want 3", got)
			}
			if got, want := log.Pos().TXID, pos.TXID+2; got != want {
				t.Fatalf("TXID %s after two writes, want %s", got, want)
			}
		})
	}
}

func TestFileSystem_SpecialFiles(t *testing.T) {
	fsys := testingutil.MustMount(t)
	read := func(name string) (string, error) {
		b, err := os.ReadFile(filepath.Join(fsys.MountDir, name))
		return string(b), err
	}
	db := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, "app.db"), "wal")
	log := fsys.DB("app.db")
	for i := 0; i < 20; i++ {
		if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS t (x); INSERT INTO t VALUES (1)`); err != nil {
			t.Fatal(err)
		}
		got, err := read("app.db-pos")
		if err != nil {
			t.Fatal(err)
		}
		if want := log.Pos().String() + "\n"; got != want {
			t.Fatalf("app.db-pos: got %q, want %q", got, want)
		}
	}
	if err := os.WriteFile(filepath.Join(fsys.MountDir, "app.db-pos"), []byte("x"), 0o644); err == nil {
		t.Fatal("wrote app.db-pos")
	}

	if _, err := read(".primary"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf(".primary on a primary: got %v, want not exist", err)
	}
	fsys.SetPrimary("iad-1")
	if got, err := read(".primary"); err != nil || got != "iad-1\n" {
		t.Fatalf(".primary: got %q, %v; want %q", got, err, "iad-1\n")
	}
	if _, err := read(".lag"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf(".lag unset: got %v, want not exist", err)
	}
	lag := "17"
	fsys.SetLag(func() string { return lag })
	if got, err := read(".lag"); err != nil || got != "17\n" {
		t.Fatalf(".lag: got %q, %v; want %q", got, err, "17\n")
	}
	lag = "4"
	if got, _ := read(".lag"); got != "4\n" {
		t.Fatalf(".lag after change: got %q, want %q", got, "4\n")
	}
	entries, err := os.ReadDir(fsys.MountDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	for _, want := range []string{".lag", ".primary", "app.db", "app.db-pos", "app.db-shm", "app.db-wal"} {
		if !slices.Contains(names, want) {
			t.Fatalf("directory %v lacks %s", names, want)
		}
	}
}

func TestFileSystem_Databases(t *testing.T) {
	fsys := testingutil.MustMount(t)
	dbs := map[string]int{"a.db": 5, "b.db": 9, "c.sqlite": 3}
	for name, n := range dbs {
		db := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, name), "delete")
		if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
			t.Fatal(err)
		}
		for i := 1; i < n; i++ {
			if _, err := db.Exec(`INSERT INTO t VALUES (?)`, i); err != nil {
				t.Fatal(err)
			}
		}
		_ = db.Close()
	}
	if got, want := fsys.DBs(), []string{"a.db", "b.db", "c.sqlite"}; !slices.Equal(got, want) {
		t.Fatalf("got databases %v, want %v", got, want)
	}
	for name, n := range dbs {
		if got := fsys.DB(name).Pos().TXID; int(got) != n {
			t.Fatalf("%s: got TXID %d, want %d", name, got, n)
		}
	}

	// Deleting a database removes it and its log; the others stay.
	if err := os.Remove(filepath.Join(fsys.MountDir, "b.db")); err != nil {
		t.Fatal(err)
	}
	if fsys.DB("b.db") != nil {
		t.Fatal("b.db still there after delete")
	}
	if _, err := os.Stat(filepath.Join(fsys.DataDir, "dbs", "b.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("backing directory of b.db: got %v, want not exist", err)
	}
	if _, err := os.Stat(filepath.Join(fsys.MountDir, "b.db-pos")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("b.db-pos: got %v, want not exist", err)
	}
	// Created again, it starts a new TXID sequence.
	db := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, "b.db"), "delete")
	if _, err := db.Exec(`CREATE TABLE u (y)`); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	if got := fsys.DB("b.db").Pos().TXID; got != 1 {
		t.Fatalf("new b.db: got TXID %d, want 1", got)
	}
	if got := fsys.DB("a.db").Pos().TXID; got != 5 {
		t.Fatalf("a.db: got TXID %d, want 5", got)
	}

	// Names that cannot be databases are refused.
	for _, name := range []string{".hidden", "x.db-pos"} {
		if err := os.WriteFile(filepath.Join(fsys.MountDir, name), nil, 0o644); err == nil {
			t.Fatalf("created %s", name)
		}
	}
	if err := os.WriteFile(filepath.Join(fsys.MountDir, "nodb-journal"), nil, 0o644); err == nil {
		t.Fatal("created a journal without its database")
	}

	// The databases and positions survive a remount.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := fsys.Close(ctx); err != nil {
		t.Fatal(err)
	}
	again := fs.New(fsys.DataDir, fsys.MountDir)
	again.Logger = testingutil.Logger(t)
	testingutil.MustOpenFS(t, again)
	for name, want := range map[string]int{"a.db": 5, "b.db": 1, "c.sqlite": 3} {
		if got := again.DB(name).Pos().TXID; int(got) != want {
			t.Fatalf("%s after remount: got TXID %d, want %d", name, got, want)
		}
	}
}

// TestFileSystem_PageCache shows the kernel keeps pages read through the
// mount (a change made to the backing file underneath is not seen) until
// they are invalidated, precisely: other pages stay cached.
func TestFileSystem_PageCache(t *testing.T) {
	fsys := testingutil.MustMount(t)
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, "delete")
	if _, err := db.Exec(`CREATE TABLE t (b); INSERT INTO t VALUES (randomblob(20000))`); err != nil {
		t.Fatal(err)
	}
	before := testingutil.MustReadFile(t, path)
	if len(before) < 4*4096 {
		t.Fatalf("database is %d bytes, want at least 4 pages", len(before))
	}
	backing, err := os.OpenFile(filepath.Join(fsys.DataDir, "dbs", "app.db", "database"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = backing.Close() }()
	// Change pages 3 and 4 underneath the mount.
	marker := bytes.Repeat([]byte{0xAB}, 4096)
	for _, pgno := range []int64{3, 4} {
		if _, err := backing.WriteAt(marker, (pgno-1)*4096); err != nil {
			t.Fatal(err)
		}
	}
	page := func(b []byte, pgno int) []byte { return b[(pgno-1)*4096 : pgno*4096] }
	cached := testingutil.MustReadFile(t, path)
	if !bytes.Equal(cached, before) {
		t.Fatal("read through the mount saw a change made underneath: pages are not cached")
	}
	if err := fsys.InvalidatePages("app.db", 4096, []uint32{3}); err != nil {
		t.Fatal(err)
	}
	after := testingutil.MustReadFile(t, path)
	if !bytes.Equal(page(after, 3), marker) {
		t.Fatal("page 3 still cached after invalidation")
	}
	if !bytes.Equal(page(after, 4), page(before, 4)) {
		t.Fatal("page 4 was dropped from the cache too; invalidation is not precise")
	}
	if !bytes.Equal(page(after, 2), page(before, 2)) {
		t.Fatal("page 2 changed")
	}
}

// TestFileSystem_Flock: flock(2) works on the mount: per open file, whole
// file, apart from POSIX locks, released when the file is closed (soon
// after close returns: FUSE releases files asynchronously).
func TestFileSystem_Flock(t *testing.T) {
	fsys := testingutil.MustMount(t)
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, "delete")
	if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
		t.Fatal(err)
	}
	open := func() *os.File {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	a, b := open(), open()
	defer func() { _ = b.Close() }()
	if err := syscall.Flock(int(a.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatalf("flock a: %v", err)
	}
	if err := syscall.Flock(int(b.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Fatalf("flock b while a holds it: got %v, want EWOULDBLOCK", err)
	}
	// flock and POSIX locks do not conflict.
	if _, err := db.Exec(`INSERT INTO t VALUES (1)`); err != nil {
		t.Fatalf("SQLite write while a flock is held: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	// The kernel sends FUSE's release, which drops a's flock, after close
	// returns: wait for it, boundedly.
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := syscall.Flock(int(b.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			t.Fatalf("flock b after a closed: %v", err)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestFileSystem_Maintain: the logs are compacted and pruned while the
// mount serves, and the database still agrees with its log.
func TestFileSystem_Maintain(t *testing.T) {
	fsys := testingutil.MustMount(t)
	fsys.Retention, fsys.CompactAge = time.Nanosecond, 0
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, "wal")
	if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(500))`); err != nil {
			t.Fatal(err)
		}
	}
	d := fsys.DB("app.db")
	pos := d.Pos()
	if err := fsys.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	files := d.Log().Files()
	if len(files) != 1 {
		t.Fatalf("got %d files after pruning, want 1 (the newest)", len(files))
	}
	if got := d.Pos(); got != pos {
		t.Fatalf("got position %s after maintenance, want %s", got, pos)
	}
	if _, err := db.Exec(`INSERT INTO t VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	if got, want := d.Pos().TXID, pos.TXID+1; got != want {
		t.Fatalf("got TXID %s, want %s", got, want)
	}
	// The database and the log still agree after a remount.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = db.Close()
	if err := fsys.Close(ctx); err != nil {
		t.Fatal(err)
	}
	again := fs.New(fsys.DataDir, fsys.MountDir)
	again.Logger = testingutil.Logger(t)
	testingutil.MustOpenFS(t, again)
	if got, want := again.DB("app.db").Pos().TXID, pos.TXID+1; got != want {
		t.Fatalf("after remount: got TXID %s, want %s", got, want)
	}
}

// TestFileSystem_HoldWrites: in every journal mode, a write transaction
// under way when HoldWrites is called commits; one that begins after it
// waits at its first write lock, and WaitWritesIdle returns once the
// first has committed, with it in the log and the second not. Released,
// the second commits on a writable mount; on a mount made read-only
// meanwhile (as a primary that handed its lease off) it fails, and the
// log does not move.
func TestFileSystem_HoldWrites(t *testing.T) {
	for _, mode := range journalModes {
		for _, handedOff := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/handed_off=%v", mode, handedOff), func(t *testing.T) {
				fsys := testingutil.MustMount(t)
				path := filepath.Join(fsys.MountDir, "app.db")
				first := testingutil.MustOpenSQLite(t, path, mode)
				if _, err := first.Exec(`CREATE TABLE t (x); INSERT INTO t VALUES (1)`); err != nil {
					t.Fatal(err)
				}
				second, err := sql.Open("sqlite3", "file:"+path+"?_synchronous=FULL&_busy_timeout=10000")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = second.Close() })
				log := fsys.DB("app.db")
				pos := log.Pos()

				tx, err := first.Begin()
				if err != nil {
					t.Fatal(err)
				}
				if _, err := tx.Exec(`INSERT INTO t VALUES (2)`); err != nil {
					t.Fatal(err)
				}
				if !fsys.HoldWrites() {
					t.Fatal("HoldWrites: writes held already")
				}
				defer fsys.ReleaseWrites()
				if fsys.HoldWrites() {
					t.Fatal("HoldWrites twice: want false the second time")
				}
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				err = fsys.WaitWritesIdle(ctx)
				cancel()
				if err == nil || !strings.Contains(err.Error(), "app.db") {
					t.Fatalf("WaitWritesIdle with a transaction under way: %v, want an error naming app.db", err)
				}
				done := make(chan error, 1)
				go func() {
					_, err := second.Exec(`INSERT INTO t VALUES (3)`)
					done <- err
				}()
				// Committed in a goroutine of its own: SQLite serializes a
				// process's lock calls on a file under one mutex, held
				// during the call, so once the commit has released its
				// write lock, the second connection's held request for it
				// can keep the first's last unlock (of its read lock)
				// waiting, and Commit from returning, until the release.
				committed := make(chan error, 1)
				go func() { committed <- tx.Commit() }()
				ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
				err = fsys.WaitWritesIdle(ctx)
				cancel()
				if err != nil {
					t.Fatalf("WaitWritesIdle after the commit: %v", err)
				}
				if got, want := log.Pos().TXID, pos.TXID+1; got != want {
					t.Fatalf("TXID %s with the second writer held, want %s", got, want)
				}
				time.Sleep(200 * time.Millisecond)
				select {
				case err := <-done:
					t.Fatalf("a write transaction begun while writes were held ended: %v", err)
				default:
				}
				if handedOff {
					fsys.SetReadOnly(true)
				}
				fsys.ReleaseWrites()
				if err := <-committed; err != nil {
					t.Fatalf("commit of the transaction under way: %v", err)
				}
				err = <-done
				switch {
				case handedOff && err == nil:
					t.Fatal("a held write committed on a mount made read-only")
				case !handedOff && err != nil:
					t.Fatalf("a held write, released: %v", err)
				}
				want := pos.TXID + 2
				if handedOff {
					want--
				}
				if got := log.Pos().TXID; got != want {
					t.Fatalf("TXID %s at the end, want %s", got, want)
				}
			})
		}
	}
}

package fs_test

import (
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// TestCapture_Unaligned: a write to a database file that is not whole
// pages, which SQLite never makes, is refused and changes nothing.
func TestCapture_Unaligned(t *testing.T) {
	fsys := testingutil.MustMount(t)
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, "delete")
	if _, err := db.Exec(`CREATE TABLE t (x); INSERT INTO t VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	before := testingutil.MustReadFile(t, path)
	pos := fsys.DB("app.db").Pos()

	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		off int64
		n   int
	}{{5000, 100}, {4096, 100}, {100, 4096}} {
		if _, err := f.WriteAt(make([]byte, w.n), w.off); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("write of %d bytes at %d: got %v, want EINVAL", w.n, w.off, err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if got := testingutil.MustReadFile(t, path); string(got) != string(before) {
		t.Fatal("refused writes changed the database")
	}
	if got := fsys.DB("app.db").Pos(); got != pos {
		t.Fatalf("got position %s, want %s", got, pos)
	}
	checkLog(t, fsys, "app.db", db, false)
}

// TestCapture_CopyIn: a database written into the mount by a program that
// does not use SQLite's locks (cp) is committed when the file is closed.
func TestCapture_CopyIn(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src.db")
	sdb := testingutil.MustOpenSQLite(t, src, "delete")
	if _, err := sdb.Exec(`CREATE TABLE t (b); INSERT INTO t VALUES (randomblob(50000))`); err != nil {
		t.Fatal(err)
	}
	_ = sdb.Close()
	fsys := testingutil.MustMount(t)
	dst := filepath.Join(fsys.MountDir, "copy.db")
	if err := os.WriteFile(dst, testingutil.MustReadFile(t, src), 0o644); err != nil {
		t.Fatal(err)
	}
	log := fsys.DB("copy.db")
	if got := log.Pos().TXID; got != 1 {
		t.Fatalf("got TXID %d after the copy, want 1", got)
	}
	db := testingutil.MustOpenSQLite(t, dst, "delete")
	checkLog(t, fsys, "copy.db", db, false)
}

// TestCapture_ExclusiveLocking: locking_mode=EXCLUSIVE keeps the lock and
// (in rollback modes) the journal between transactions; every transaction
// is still captured once.
func TestCapture_ExclusiveLocking(t *testing.T) {
	for _, mode := range journalModes {
		t.Run(mode, func(t *testing.T) {
			fsys := testingutil.MustMount(t)
			path := filepath.Join(fsys.MountDir, "app.db")
			db := testingutil.MustOpenSQLite(t, path, mode)
			if _, err := db.Exec(`PRAGMA locking_mode=EXCLUSIVE; CREATE TABLE t (x)`); err != nil {
				t.Fatal(err)
			}
			log := fsys.DB("app.db")
			start := log.Pos().TXID
			const n = 50
			for i := 0; i < n; i++ {
				if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(3000))`); err != nil {
					t.Fatal(err)
				}
			}
			if got := log.Pos().TXID - start; got != n {
				t.Fatalf("got %d LTX files for %d transactions", got, n)
			}
			// Another connection cannot read while the lock is held.
			other, err := sql.Open("sqlite3", "file:"+path+"?_busy_timeout=0")
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = other.Close() }()
			var c int
			if err := other.QueryRow(`SELECT count(*) FROM t`).Scan(&c); err == nil || !strings.Contains(err.Error(), "locked") {
				t.Fatalf("another connection: got %d rows, %v; want database is locked", c, err)
			}
			if _, err := db.Exec(`PRAGMA locking_mode=NORMAL; SELECT 1`); err != nil {
				t.Fatal(err)
			}
			checkLog(t, fsys, "app.db", db, mode == "wal")
		})
	}
}

// TestCapture_PageSizeChange: VACUUM with a new page size in a rollback
// mode rewrites the database; the log records it as a full image.
func TestCapture_PageSizeChange(t *testing.T) {
	fsys := testingutil.MustMount(t)
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, "delete")
	if _, err := db.Exec(`CREATE TABLE t (b); INSERT INTO t VALUES (randomblob(100000)), (randomblob(300))`); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int{8192, 1024, 65536, 4096} {
		if _, err := db.Exec(`PRAGMA page_size=` + strconv.Itoa(size) + `; VACUUM`); err != nil {
			t.Fatal(err)
		}
		var got int
		if err := db.QueryRow(`PRAGMA page_size`).Scan(&got); err != nil || got != size {
			t.Fatalf("page_size: got %d, %v; want %d", got, err, size)
		}
		files := fsys.DB("app.db").Log().Files()
		last := files[len(files)-1].Header
		if last.PageSize != uint32(size) {
			t.Fatalf("last LTX page size %d, want %d", last.PageSize, size)
		}
		checkLog(t, fsys, "app.db", db, false)
	}
}

// TestCapture_DiskFull: with the data directory full, a commit fails with
// SQLite's "database or disk is full", the log gains nothing SQLite did
// not commit, and once space is freed writing goes on.
func TestCapture_DiskFull(t *testing.T) {
	for _, mode := range journalModes {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			data := filepath.Join(dir, "data")
			if err := os.Mkdir(data, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := syscall.Mount("tmpfs", data, "tmpfs", 0, "size=3m"); err != nil {
				t.Fatalf("mount tmpfs (this test needs root): %v", err)
			}
			t.Cleanup(func() { _ = syscall.Unmount(data, syscall.MNT_DETACH) })
			fsys := fs.New(data, filepath.Join(dir, "mnt"))
			fsys.Logger = testingutil.Logger(t)
			testingutil.MustOpenFS(t, fsys)

			path := filepath.Join(fsys.MountDir, "app.db")
			db := testingutil.MustOpenSQLite(t, path, mode)
			if _, err := db.Exec(`CREATE TABLE t (b)`); err != nil {
				t.Fatal(err)
			}
			log := fsys.DB("app.db")
			var full error
			rows := 0
			for i := 0; i < 1000 && full == nil; i++ {
				before := log.Pos()
				if _, full = db.Exec(`INSERT INTO t VALUES (randomblob(20000))`); full == nil {
					rows++
					continue
				}
				if got := log.Pos(); got != before {
					t.Fatalf("failed commit moved the log from %s to %s", before, got)
				}
			}
			if full == nil || !strings.Contains(full.Error(), "full") && !strings.Contains(full.Error(), "I/O") {
				t.Fatalf("got %v after %d rows, want a disk-full error", full, rows)
			}
			t.Logf("%s: %d rows, then %v", mode, rows, full)
			var n int
			if err := db.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil || n != rows {
				t.Fatalf("got %d rows, %v; want %d", n, err, rows)
			}
			// Make room and go on: the database and the log still agree.
			if err := syscall.Mount("tmpfs", data, "tmpfs", syscall.MS_REMOUNT, "size=32m"); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 5; i++ {
				if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(20000))`); err != nil {
					t.Fatalf("write after freeing space: %v", err)
				}
			}
			if err := db.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil || n != rows+5 {
				t.Fatalf("got %d rows, %v; want %d", n, err, rows+5)
			}
			checkLog(t, fsys, "app.db", db, mode == "wal")
		})
	}
}

// TestCapture_NoJournalFile: with journal_mode=MEMORY or OFF no journal
// file marks the end of a transaction; the writer's unlock does.
func TestCapture_NoJournalFile(t *testing.T) {
	for _, mode := range []string{"memory", "off"} {
		t.Run(mode, func(t *testing.T) {
			fsys := testingutil.MustMount(t)
			path := filepath.Join(fsys.MountDir, "app.db")
			db := testingutil.MustOpenSQLite(t, path, mode)
			if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
				t.Fatal(err)
			}
			d := fsys.DB("app.db")
			start := d.Pos().TXID
			const n = 40
			for i := 0; i < n; i++ {
				if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(5000))`); err != nil {
					t.Fatal(err)
				}
				if got, want := d.Pos().TXID, start+ltx.TXID(i+1); got != want {
					t.Fatalf("after insert %d: got TXID %s, want %s", i, got, want)
				}
			}
			checkLog(t, fsys, "app.db", db, false)
		})
	}
}

// TestCapture_JournalSizeLimit: with journal_size_limit SQLite trims the
// WAL after a restart while it holds frames of the new generation.
func TestCapture_JournalSizeLimit(t *testing.T) {
	fsys := testingutil.MustMount(t)
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, "wal")
	if _, err := db.Exec(`PRAGMA journal_size_limit=8192; PRAGMA wal_autocheckpoint=20; CREATE TABLE t (x)`); err != nil {
		t.Fatal(err)
	}
	d := fsys.DB("app.db")
	start := d.Pos().TXID
	const n = 300
	for i := 0; i < n; i++ {
		if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(3000))`); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := d.Pos().TXID-start, ltx.TXID(n); got != want {
		t.Fatalf("got %d LTX files for %d transactions", got, want)
	}
	checkLog(t, fsys, "app.db", db, true)
}

package fs_test

import (
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
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
			dir, data := smallDataDir(t, "3m")
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

// TestCapture_NoJournalFile: journal_mode=MEMORY and OFF are refused. No
// file marks the end of such a transaction, and a writer killed half-way
// through one leaves half its pages in the database file with nothing to
// roll them back: the log would take them as committed. A write in those
// modes fails (a disk I/O error in SQLite) and changes nothing, on a new
// database as on one switched to them; the daemon says why; switched back
// to DELETE, the database and its log go on as before.
func TestCapture_NoJournalFile(t *testing.T) {
	for _, mode := range []string{"memory", "off"} {
		t.Run(mode, func(t *testing.T) {
			var logged testingutil.LockedBuffer
			dir := t.TempDir()
			fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
			fsys.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logged, testingutil.LogWriter(t)), nil))
			testingutil.MustOpenFS(t, fsys)

			// A new database: its first transaction is refused.
			fresh := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, "new.db"), mode)
			if _, err := fresh.Exec(`CREATE TABLE t (x)`); err == nil || !strings.Contains(err.Error(), "disk I/O error") {
				t.Fatalf("CREATE TABLE in journal_mode=%s: %v, want a disk I/O error", mode, err)
			}
			if pos := fsys.DB("new.db").Pos(); pos.TXID != 0 {
				t.Fatalf("new.db: log at %v after a refused transaction, want empty", pos)
			}

			// A database made in DELETE mode, then switched.
			path := filepath.Join(fsys.MountDir, "app.db")
			db := testingutil.MustOpenSQLite(t, path, "delete")
			if _, err := db.Exec(`CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(5000))`); err != nil {
				t.Fatal(err)
			}
			d := fsys.DB("app.db")
			before := d.Pos()
			if _, err := db.Exec(`PRAGMA journal_mode=` + mode); err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(5000))`); err == nil || !strings.Contains(err.Error(), "disk I/O error") {
					t.Fatalf("insert %d in journal_mode=%s: %v, want a disk I/O error", i, mode, err)
				}
			}
			if got := d.Pos(); got != before {
				t.Fatalf("log moved from %v to %v with every write refused", before, got)
			}
			if !strings.Contains(logged.String(), "journal_mode=MEMORY or OFF") {
				t.Fatalf("the daemon did not say why it refused the writes:\n%s", logged.String())
			}
			if _, err := db.Exec(`PRAGMA journal_mode=delete`); err != nil {
				t.Fatal(err)
			}
			var n int
			if err := db.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil || n != 1 {
				t.Fatalf("rows after the refused inserts: %d, %v; want 1", n, err)
			}
			if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(5000))`); err != nil {
				t.Fatalf("insert back in DELETE mode: %v", err)
			}
			if got, want := d.Pos().TXID, before.TXID+1; got != want {
				t.Fatalf("log at txid %v after one more transaction, want %v", got, want)
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

// TestCapture_Attach: a transaction over two databases of the mount
// (ATTACH, one COMMIT) in a rollback-journal mode needs SQLite's
// super-journal, which the mount refuses: each database has a log of its
// own, which cannot commit such a transaction atomically. The COMMIT fails,
// neither database nor log changes, no stray database appears, and the
// daemon says why. A transaction that writes one attached database, and a
// two-database transaction in WAL mode (atomic per database only, SQLite
// uses no super-journal then), give one LTX file per database written.
func TestCapture_Attach(t *testing.T) {
	var logged testingutil.LockedBuffer
	dir := t.TempDir()
	fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	fsys.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logged, testingutil.LogWriter(t)), nil))
	testingutil.MustOpenFS(t, fsys)

	for _, mode := range []string{"delete", "wal"} {
		a, b := mode+"-a.db", mode+"-b.db"
		for _, name := range []string{a, b} {
			db := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, name), mode)
			if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
				t.Fatal(err)
			}
			_ = db.Close()
		}
		db := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, a), mode)
		if _, err := db.Exec(`ATTACH ? AS b`, filepath.Join(fsys.MountDir, b)); err != nil {
			t.Fatal(err)
		}
		da, dbb := fsys.DB(a), fsys.DB(b)
		posA, posB := da.Pos(), dbb.Pos()

		// One database written: an ordinary transaction.
		if _, err := db.Exec(`INSERT INTO b.t VALUES (1)`); err != nil {
			t.Fatalf("%s: insert into the attached database: %v", mode, err)
		}
		if err := dbb.Flush(); err != nil {
			t.Fatal(err)
		}
		if got, want := dbb.Pos().TXID, posB.TXID+1; got != want || da.Pos() != posA {
			t.Fatalf("%s: after a transaction on %s: logs at %v and %v, want %v unchanged and txid %v", mode, b, da.Pos(), dbb.Pos(), posA, want)
		}
		posB = dbb.Pos()

		_, err := db.Exec(`BEGIN; INSERT INTO main.t VALUES (2); INSERT INTO b.t VALUES (2); COMMIT`)
		if mode == "wal" {
			if err != nil {
				t.Fatalf("wal: a transaction over two databases: %v", err)
			}
			for _, d := range []*fs.DB{da, dbb} {
				if err := d.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			if da.Pos().TXID != posA.TXID+1 || dbb.Pos().TXID != posB.TXID+1 {
				t.Fatalf("wal: logs at %v and %v after a transaction over both, want one more file each than %v and %v", da.Pos(), dbb.Pos(), posA, posB)
			}
			continue
		}
		if err == nil {
			t.Fatalf("%s: a transaction over two databases committed, want it refused", mode)
		}
		t.Logf("%s: a transaction over two databases: %v", mode, err)
		_, _ = db.Exec(`ROLLBACK`)
		var n int
		if err := db.QueryRow(`SELECT (SELECT count(*) FROM main.t) + (SELECT count(*) FROM b.t)`).Scan(&n); err != nil || n != 1 {
			t.Fatalf("%s: rows after the refused commit: %d, %v; want 1", mode, n, err)
		}
		if da.Pos() != posA || dbb.Pos() != posB {
			t.Fatalf("%s: logs moved to %v and %v with the commit refused, want %v and %v", mode, da.Pos(), dbb.Pos(), posA, posB)
		}
		if !strings.Contains(logged.String(), "refused a transaction over several databases") {
			t.Fatalf("%s: the daemon did not say why it refused the commit:\n%s", mode, logged.String())
		}
		checkLog(t, fsys, a, db, false)
	}
	if got := fsys.DBs(); len(got) != 4 {
		t.Fatalf("databases on the mount: %q, want the four the test made", got)
	}
}

// TestCapture_SectorPadding: with powersafe overwrite off (psow=0) and
// synchronous=FULL, SQLite pads each WAL commit to a sector boundary with
// copies of its commit frame, each a valid commit frame in itself. They
// are one transaction, not several: exactly one LTX file per COMMIT.
func TestCapture_SectorPadding(t *testing.T) {
	for _, passthrough := range []bool{true, false} {
		t.Run(fmt.Sprintf("passthrough=%v", passthrough), func(t *testing.T) {
			dir := t.TempDir()
			fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
			fsys.Logger = testingutil.Logger(t)
			fsys.Passthrough = passthrough
			testingutil.MustOpenFS(t, fsys)
			path := filepath.Join(fsys.MountDir, "app.db")
			db, err := sql.Open("sqlite3", "file:"+path+"?psow=0&_journal_mode=wal&_synchronous=FULL&_busy_timeout=5000")
			if err != nil {
				t.Fatal(err)
			}
			db.SetMaxOpenConns(1)
			t.Cleanup(func() { _ = db.Close() })
			if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
				t.Fatal(err)
			}
			d := fsys.DB("app.db")
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			start := d.Pos().TXID
			const n = 30
			for i := range n {
				if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(100 + 700 * ?))`, i%7); err != nil {
					t.Fatal(err)
				}
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			if got := d.Pos().TXID - start; got != n {
				t.Fatalf("%d LTX files for %d transactions", got, n)
			}
			checkLog(t, fsys, "app.db", db, true)
		})
	}
}

// TestCapture_CellSizeCheck: PRAGMA cell_size_check, which makes SQLite
// check every cell it reads, changes nothing in what is captured: one LTX
// file per COMMIT, and the log rebuilds the database.
func TestCapture_CellSizeCheck(t *testing.T) {
	for _, mode := range []string{"delete", "wal"} {
		t.Run(mode, func(t *testing.T) {
			fsys := testingutil.MustMount(t)
			db := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, "app.db"), mode)
			if _, err := db.Exec(`PRAGMA cell_size_check=ON; CREATE TABLE t (x); CREATE INDEX t_x ON t (x)`); err != nil {
				t.Fatal(err)
			}
			d := fsys.DB("app.db")
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			start := d.Pos().TXID
			const n = 50
			for i := range n {
				if _, err := db.Exec(`INSERT INTO t VALUES (randomblob(50 + 300 * ?))`, i%11); err != nil {
					t.Fatal(err)
				}
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			if got := d.Pos().TXID - start; got != n {
				t.Fatalf("%d LTX files for %d transactions", got, n)
			}
			var ok string
			if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
				t.Fatalf("integrity_check: %q, %v", ok, err)
			}
			checkLog(t, fsys, "app.db", db, mode == "wal")
		})
	}
}

// smallDataDir returns a new directory and, in it, a data directory on a
// tmpfs of size (e.g. "3m"), unmounted at cleanup: a disk that fills.
func smallDataDir(t *testing.T, size string) (dir, data string) {
	t.Helper()
	dir = t.TempDir()
	data = filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", data, "tmpfs", 0, "size="+size); err != nil {
		t.Fatalf("mount tmpfs (this test needs root): %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(data, syscall.MNT_DETACH) })
	return dir, data
}

package fs_test

import (
	"context"
	"database/sql"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// snapshotTestRows is how many rows of about a page each the database of
// TestDB_SnapshotWhileWriting has: 32 MB.
const snapshotTestRows = 8000

// TestDB_SnapshotWhileWriting reads a snapshot of a 32 MB database, in
// DELETE and in WAL mode, while an app updates random rows all over it as
// fast as it can. Commits go on while the snapshot is read; pages the app
// changes before the snapshot reads them are kept for it; and the
// snapshot is the database at its position: its pages add up to the log's
// checksum there (WriteSnapshot checks, and fails with a mismatch
// otherwise), and SQLite finds it intact, with every row.
//
// In "wal-bounded" a snapshot keeps at most 8 pages, and then holds the
// writers off for the rest of its read: it is the database at its
// position all the same.
func TestDB_SnapshotWhileWriting(t *testing.T) {
	for _, name := range []string{"delete", "wal", "wal-bounded"} {
		t.Run(name, func(t *testing.T) {
			mode, bounded := strings.CutSuffix(name, "-bounded")
			if bounded {
				old := fs.SetSnapshotKeepMax(8 * 4096)
				t.Cleanup(func() { fs.SetSnapshotKeepMax(old) })
			}
			dir := t.TempDir()
			f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
			f.Logger = testingutil.Logger(t)
			testingutil.MustOpenFS(t, f)
			path := filepath.Join(f.MountDir, "s.db")
			db := testingutil.MustOpenSQLite(t, path, mode)
			if _, err := db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)`); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < snapshotTestRows; i += 1000 {
				if _, err := db.Exec(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 1000)
					INSERT INTO t (v) SELECT randomblob(3900) FROM n`); err != nil {
					t.Fatal(err)
				}
			}

			// The writer: one row per transaction, anywhere in the file.
			var (
				mu        sync.Mutex
				commits   []commitSpan
				writerErr error
			)
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(1, 2))
				for {
					select {
					case <-stop:
						return
					default:
					}
					began := time.Now()
					_, err := db.Exec(`UPDATE t SET v = randomblob(3900) WHERE id = ?`, 1+rng.IntN(snapshotTestRows))
					mu.Lock()
					commits = append(commits, commitSpan{began, time.Now()})
					writerErr = err
					mu.Unlock()
					if err != nil {
						return
					}
				}
			})
			stopWriter := sync.OnceFunc(func() {
				close(stop)
				testingutil.Within(t, time.Minute, "the writer to stop", wg.Wait)
			})
			t.Cleanup(stopWriter)
			for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
				mu.Lock()
				n, err := len(commits), writerErr
				mu.Unlock()
				if err != nil {
					t.Fatal(err)
				} else if n >= 20 {
					break
				} else if time.Now().After(deadline) {
					t.Fatalf("the writer committed %d transactions in a minute", n)
				}
			}

			d := f.DB("s.db")
			out, err := os.Create(filepath.Join(dir, "snapshot.ltx"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			began := time.Now()
			var info *ltx.FileInfo
			testingutil.Within(t, time.Minute, "the snapshot to be read", func() { info, err = d.Snapshot(context.Background(), out) })
			ended := time.Now()
			stopWriter()
			if err != nil {
				t.Fatalf("snapshot while the app writes: %v", err)
			}
			if writerErr != nil {
				t.Fatal(writerErr)
			}

			// Commits went on while the snapshot was read.
			var during int
			var before, overlapping []time.Duration
			for _, c := range commits {
				if c.end.After(began) && c.began.Before(ended) {
					overlapping = append(overlapping, c.end.Sub(c.began))
				} else if c.end.Before(began) {
					before = append(before, c.end.Sub(c.began))
				}
				if c.began.After(began) && c.end.Before(ended) {
					during++
				}
			}
			slices.Sort(before)
			slices.Sort(overlapping)
			if during == 0 {
				t.Fatalf("no commit began and ended in the %v the snapshot took, want the app's writes to go on", ended.Sub(began))
			}
			kept := d.SnapshotPagesKept()
			if bounded && kept < 8 {
				t.Fatalf("the snapshot kept %d pages, want the bound of 8 reached: the test did not test it", kept)
			}
			if kept == 0 {
				t.Fatalf("the snapshot kept no page, with %d commits of random rows while it was read: the test did not test copy on write", during)
			}
			t.Logf("%s: snapshot of %d bytes at txid %v read in %v; %d commits meanwhile, p50 %v, slowest %v (before it: p50 %v, slowest %v); %d pages kept before a change",
				name, info.Size, info.Header.MaxTXID, ended.Sub(began).Round(time.Millisecond), during,
				overlapping[len(overlapping)/2].Round(time.Microsecond), overlapping[len(overlapping)-1].Round(time.Microsecond),
				before[len(before)/2].Round(time.Microsecond), before[len(before)-1].Round(time.Microsecond), kept)

			// The snapshot, applied to an empty file, is a sound
			// database with every row.
			restored := filepath.Join(dir, "restored.db")
			checkSnapshotRestores(t, out.Name(), restored, info)
			r, err := sql.Open("sqlite3", "file:"+restored+"?mode=ro")
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			var ok string
			var rows int
			if err := r.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
				t.Fatalf("integrity_check of the restored snapshot: %q, %v", ok, err)
			}
			if err := r.QueryRow(`SELECT count(*) FROM t WHERE length(v) = 3900`).Scan(&rows); err != nil || rows != snapshotTestRows {
				t.Fatalf("restored snapshot: %d rows, %v; want %d", rows, err, snapshotTestRows)
			}
		})
	}
}

// commitSpan is when one commit of TestDB_SnapshotWhileWriting began and
// ended.
type commitSpan struct{ began, end time.Time }

// checkSnapshotRestores applies the snapshot file at path to a new
// database file at dst and checks it ends at the snapshot's position.
func checkSnapshotRestores(t *testing.T, path, dst string, info *ltx.FileInfo) {
	t.Helper()
	src, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	db, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	pos, err := ltx.Apply(context.Background(), db, ltx.NewChecksumTable(info.Header.PageSize), ltx.Pos{}, src)
	if err != nil {
		t.Fatal(err)
	}
	if pos != info.Pos() {
		t.Fatalf("the snapshot applies to %v, want %v", pos, info.Pos())
	}
}

// TestDB_SnapshotMidTransaction asks for a snapshot of a DELETE-mode
// database while a transaction has spilled pages into the database file
// but not committed. The snapshot waits for the transaction to end rather
// than read its pages, which made it fail as a database "changed outside
// regiond": a warning that cried wolf.
func TestDB_SnapshotMidTransaction(t *testing.T) {
	dir := t.TempDir()
	f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	f.Logger = testingutil.Logger(t)
	testingutil.MustOpenFS(t, f)
	db := testingutil.MustOpenSQLite(t, filepath.Join(f.MountDir, "m.db"), "delete")
	if _, err := db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
		INSERT INTO t (v) SELECT randomblob(3900) FROM n`); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// A cache of 10 pages: the update spills its pages into the database
	// file long before it commits.
	for _, q := range []string{`PRAGMA cache_size = 10`, `BEGIN`, `UPDATE t SET v = randomblob(3900)`} {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	d := f.DB("m.db")
	before := d.Log().Pos()
	type result struct {
		info *ltx.FileInfo
		err  error
	}
	done := make(chan result, 1)
	go func() {
		info, err := d.Snapshot(ctx, io.Discard)
		done <- result{info, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("the snapshot returned (%v, %v) while a transaction had pages in the database file, want it to wait for the transaction", r.info, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	if _, err := conn.ExecContext(ctx, `COMMIT`); err != nil {
		t.Fatal(err)
	}
	r := testingutil.Recv(t, done, time.Minute, "the snapshot once the transaction committed")
	if r.err != nil {
		t.Fatalf("snapshot after the transaction committed: %v", r.err)
	}
	if after := d.Log().Pos(); r.info.Pos() != after || after.TXID != before.TXID+1 {
		t.Fatalf("snapshot at %v; the log went from %v to %v, want the snapshot at the committed transaction", r.info.Pos(), before, after)
	}
}

package ltx_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// capture commits each SQLite transaction to a log by diffing the database
// file against its previous image, as the FUSE layer does by watching
// writes.
type capture struct {
	tb     testing.TB
	dbPath string
	log    *ltx.Log
	prev   []byte
}

func newCapture(tb testing.TB, dbPath string, l *ltx.Log) *capture {
	return &capture{tb: tb, dbPath: dbPath, log: l, prev: testingutil.MustReadFile(tb, dbPath)}
}

// commit records the changes since the last commit as one transaction.
func (c *capture) commit() *ltx.FileInfo {
	c.tb.Helper()
	cur := testingutil.MustReadFile(c.tb, c.dbPath)
	pageSize, err := ltx.ReadPageSize(bytes.NewReader(cur))
	if err != nil {
		c.tb.Fatal(err)
	}
	info, err := c.log.Commit(context.Background(), ltx.Tx{
		DB:       bytes.NewReader(cur),
		PageSize: pageSize,
		Commit:   uint32(len(cur)) / pageSize,
		Pgnos:    testingutil.ChangedPages(c.prev, cur, int(pageSize)),
	})
	if err != nil {
		c.tb.Fatal(err)
	}
	c.prev = cur
	return info
}

// newSQLiteLog returns a fresh SQLite database in DELETE journal mode, its
// log and a capture, in a temporary directory.
func newSQLiteLog(tb testing.TB) (*sql.DB, *capture) {
	dir := tb.TempDir()
	dbPath := filepath.Join(dir, "db")
	db := testingutil.MustOpenSQLite(tb, dbPath, "delete")
	l := testingutil.MustOpenLog(tb, "db", filepath.Join(dir, "ltx"), dbPath)
	return db, newCapture(tb, dbPath, l)
}

// mustRun runs n workload steps, committing each to the capture.
func mustRun(tb testing.TB, w *testingutil.Workload, c *capture, n int) {
	tb.Helper()
	for i := 0; i < n; i++ {
		if _, err := w.Step(); err != nil {
			tb.Fatal(err)
		}
		c.commit()
	}
}

func mustRestoreSHA(tb testing.TB, l *ltx.Log) string {
	tb.Helper()
	dst := filepath.Join(tb.TempDir(), "restored")
	if _, err := l.Restore(context.Background(), dst); err != nil {
		tb.Fatal(err)
	}
	return testingutil.FileSHA256(tb, dst)
}

// TestLog_RandomTransactions runs 1,000 random transactions through a real
// SQLite database and checks after every one that the incremental checksum
// equals a full rescan, and every 100 that the log alone rebuilds the
// database byte for byte.
func TestLog_RandomTransactions(t *testing.T) {
	t.Parallel()
	db, c := newSQLiteLog(t)
	w := testingutil.NewWorkload(db, 1)
	if err := w.Init(); err != nil {
		t.Fatal(err)
	}
	if info := c.commit(); !info.Header.IsSnapshot() || info.Header.MinTXID != 1 {
		t.Fatalf("first file = %s, want a snapshot at txid 1", info)
	}

	var shrinks, growths, pageSizeChanges int
	kinds := map[string]int{}
	const n = 1000
	for i := 1; i <= n; i++ {
		var kind string
		var err error
		if i == n/2 {
			kind = "page size"
			_, err = db.Exec(`PRAGMA page_size = 8192; VACUUM`)
		} else {
			kind, err = w.Step()
		}
		if err != nil {
			t.Fatalf("tx %d (%s): %v", i, kind, err)
		}
		kinds[kind]++
		prevInfo := c.log.Files()[len(c.log.Files())-1]
		info := c.commit()

		table, err := ltx.ReadChecksumTable(c.dbPath)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := info.PostApplyChecksum, table.Checksum(); got != want {
			t.Fatalf("tx %d (%s): incremental checksum %s, rescan %s", i, kind, got, want)
		}
		if sum, pages := c.log.Checksum(); sum != table.Checksum() || pages != table.Pages() {
			t.Fatalf("tx %d (%s): table checksum %s/%d pages, rescan %s/%d", i, kind, sum, pages, table.Checksum(), table.Pages())
		}
		if got, want := info.Header.PreApplyChecksum, prevInfo.PostApplyChecksum; got != want {
			t.Fatalf("tx %d: pre-apply checksum %s, previous post-apply %s", i, got, want)
		}
		if info.Header.MinTXID != ltx.TXID(i+1) || info.Header.MaxTXID != ltx.TXID(i+1) {
			t.Fatalf("tx %d: txid range %s-%s", i, info.Header.MinTXID, info.Header.MaxTXID)
		}
		switch {
		case info.Header.PageSize != prevInfo.Header.PageSize:
			pageSizeChanges++
		case info.Header.Commit < prevInfo.Header.Commit:
			shrinks++
		case info.Header.Commit > prevInfo.Header.Commit:
			growths++
		}
		if i%100 == 0 {
			if got, want := mustRestoreSHA(t, c.log), testingutil.FileSHA256(t, c.dbPath); got != want {
				t.Fatalf("tx %d: restored sha256 %s, database %s", i, got, want)
			}
		}
	}
	t.Logf("transactions: %v; grew %d, shrank %d, page size changes %d", kinds, growths, shrinks, pageSizeChanges)
	if shrinks == 0 || growths == 0 || pageSizeChanges != 1 || kinds["schema"] == 0 || kinds["insert blob"] == 0 {
		t.Fatalf("workload did not cover growth (%d), shrink (%d), page size change (%d), schema (%d) and blobs (%d)",
			growths, shrinks, pageSizeChanges, kinds["schema"], kinds["insert blob"])
	}
	var check string
	if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&check); err != nil || check != "ok" {
		t.Fatalf("integrity_check = %q, %v", check, err)
	}
}

// TestLog_SnapshotRestore checks that a snapshot of a live database, alone
// and followed by later transactions, restores byte-identical databases.
func TestLog_SnapshotRestore(t *testing.T) {
	ctx := context.Background()
	db, c := newSQLiteLog(t)
	w := testingutil.NewWorkload(db, 2)
	if err := w.Init(); err != nil {
		t.Fatal(err)
	}
	c.commit()
	mustRun(t, w, c, 150)

	snapPath := filepath.Join(t.TempDir(), "snapshot.ltx")
	snap, err := os.Create(snapPath)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.log.Snapshot(ctx, snap, bytes.NewReader(testingutil.MustReadFile(t, c.dbPath)))
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Close(); err != nil {
		t.Fatal(err)
	}
	if got, want := info.Pos(), c.log.Pos(); got != want {
		t.Fatalf("snapshot position %s, log %s", got, want)
	}
	if !info.Header.IsSnapshot() || info.Header.MaxTXID != c.log.Pos().TXID {
		t.Fatalf("snapshot header txid %s-%s", info.Header.MinTXID, info.Header.MaxTXID)
	}
	snapSHA := testingutil.FileSHA256(t, c.dbPath)

	dst := filepath.Join(t.TempDir(), "from-snapshot")
	pos, err := ltx.Restore(ctx, dst, bytes.NewReader(testingutil.MustReadFile(t, snapPath)))
	if err != nil {
		t.Fatal(err)
	}
	if got := testingutil.FileSHA256(t, dst); got != snapSHA || pos != info.Pos() {
		t.Fatalf("restored from snapshot: sha256 %s at %s, want %s at %s", got, pos, snapSHA, info.Pos())
	}

	// Later transactions on top of the snapshot.
	snapTXID := info.Header.MaxTXID
	mustRun(t, w, c, 150)
	paths := []string{snapPath}
	for _, fi := range c.log.Files() {
		if fi.Header.MinTXID > snapTXID {
			paths = append(paths, filepath.Join(c.log.Dir, fi.Name))
		}
	}
	if len(paths) != 151 {
		t.Fatalf("%d files after the snapshot, want 150", len(paths)-1)
	}
	dst2 := filepath.Join(t.TempDir(), "from-snapshot-and-log")
	pos, err = ltx.Restore(ctx, dst2, readers(t, paths...)...)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := testingutil.FileSHA256(t, dst2), testingutil.FileSHA256(t, c.dbPath); got != want || pos != c.log.Pos() {
		t.Fatalf("restored from snapshot and log: sha256 %s at %s, want %s at %s", got, pos, want, c.log.Pos())
	}

	// A restore must start from a snapshot, and the chain must hold; a
	// failed restore leaves no file behind.
	bad := filepath.Join(t.TempDir(), "x")
	if _, err := ltx.Restore(ctx, bad, readers(t, paths[1:]...)...); err == nil || !strings.Contains(err.Error(), "starts from a snapshot") {
		t.Fatalf("restore without snapshot: err = %v", err)
	}
	if _, err := ltx.Restore(ctx, bad, readers(t, paths[0], paths[2])...); err == nil || !strings.Contains(err.Error(), "applies at") {
		t.Fatalf("restore with a gap: err = %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(bad)); len(entries) != 0 {
		t.Fatalf("failed restores left %d files behind", len(entries))
	}
}

// readers returns readers of the contents of the files at paths.
func readers(tb testing.TB, paths ...string) []io.Reader {
	a := make([]io.Reader, len(paths))
	for i, p := range paths {
		a[i] = bytes.NewReader(testingutil.MustReadFile(tb, p))
	}
	return a
}

// TestLog_Snapshot_DatabaseMismatch checks that a snapshot of a database
// that is not in the state the log describes fails and says so.
func TestLog_Snapshot_DatabaseMismatch(t *testing.T) {
	db, c := newSQLiteLog(t)
	w := testingutil.NewWorkload(db, 3)
	if err := w.Init(); err != nil {
		t.Fatal(err)
	}
	c.commit()
	mustRun(t, w, c, 5)
	if _, err := w.Step(); err != nil { // not committed to the log
		t.Fatal(err)
	}
	_, err := c.log.Snapshot(context.Background(), &bytes.Buffer{}, bytes.NewReader(testingutil.MustReadFile(t, c.dbPath)))
	var mismatch *ltx.DatabaseMismatchError
	if !errors.As(err, &mismatch) {
		t.Fatalf("err = %v, want DatabaseMismatchError", err)
	}
	if mismatch.Log != c.log.Pos() {
		t.Fatalf("mismatch reports log at %s, want %s", mismatch.Log, c.log.Pos())
	}
}

func TestEncodeSnapshot_ShortFile(t *testing.T) {
	_, err := ltx.EncodeSnapshot(context.Background(), &bytes.Buffer{}, bytes.NewReader(make([]byte, 4096*3)), 4096, 5, 1, time.Now())
	if err == nil || !strings.Contains(err.Error(), "ends before page 5 of 5") {
		t.Fatalf("err = %v, want one saying the file ends before page 5", err)
	}
}

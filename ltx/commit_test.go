package ltx_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// imageDB is a database held in memory, as an ltx.Database.
type imageDB struct{ b []byte }

func (d *imageDB) ReadAt(p []byte, off int64) (int, error) {
	return bytes.NewReader(d.b).ReadAt(p, off)
}
func (d *imageDB) Size() (int64, error) { return int64(len(d.b)), nil }

func TestLog_Commit_SkipUnchanged(t *testing.T) {
	db, c := newSQLiteLog(t)
	if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
		t.Fatal(err)
	}
	first := c.commit()
	img := testingutil.MustReadFile(t, c.dbPath)

	// Pages written back with the content they had: a rolled-back
	// transaction as the filesystem sees it.
	info, err := c.log.Commit(context.Background(), ltx.Tx{
		DB: bytes.NewReader(img), PageSize: 4096, Commit: uint32(len(img) / 4096),
		Pgnos: []uint32{1, 2}, SkipUnchanged: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if info != nil {
		t.Fatalf("got file %s for an unchanged transaction, want none", info.Name)
	}
	if got, want := c.log.Pos(), first.Pos(); got != want {
		t.Fatalf("got position %s, want %s", got, want)
	}
	if got := len(c.log.Files()); got != 1 {
		t.Fatalf("got %d files, want 1", got)
	}

	// Without the flag the same transaction is recorded.
	info, err = c.log.Commit(context.Background(), ltx.Tx{
		DB: bytes.NewReader(img), PageSize: 4096, Commit: uint32(len(img) / 4096), Pgnos: []uint32{1},
	})
	if err != nil {
		t.Fatal(err)
	}
	if info == nil || info.Header.MinTXID != 2 || info.PostApplyChecksum != first.PostApplyChecksum {
		t.Fatalf("got %+v, want TXID 2 with the same checksum", info)
	}
}

func TestLog_Commit_NoSyncAndWAL(t *testing.T) {
	db, c := newSQLiteLog(t)
	if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
		t.Fatal(err)
	}
	img := testingutil.MustReadFile(t, c.dbPath)
	seg := ltx.WALSegment{Offset: 32, Size: 4120, Salt1: 7, Salt2: 9}
	info, err := c.log.Commit(context.Background(), ltx.Tx{
		DB: bytes.NewReader(img), PageSize: 4096, Commit: uint32(len(img) / 4096),
		WAL: seg, NoSync: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.log.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	got, err := ltx.ReadFileInfo(filepath.Join(c.log.Dir, info.Name))
	if err != nil {
		t.Fatal(err)
	}
	h := got.Header
	if h.WALOffset != seg.Offset || h.WALSize != seg.Size || h.WALSalt1 != seg.Salt1 || h.WALSalt2 != seg.Salt2 {
		t.Fatalf("got WAL fields %d/%d/%d/%d, want %+v", h.WALOffset, h.WALSize, h.WALSalt1, h.WALSalt2, seg)
	}
	if got.Seal != info.Seal || got.Seal == 0 {
		t.Fatalf("got seal %s, want %s", got.Seal, info.Seal)
	}
}

func TestLog_Open_Database(t *testing.T) {
	db, c := newSQLiteLog(t)
	if _, err := db.Exec(`CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(9000))`); err != nil {
		t.Fatal(err)
	}
	info := c.commit()
	img := testingutil.MustReadFile(t, c.dbPath)
	if err := c.log.Close(); err != nil {
		t.Fatal(err)
	}

	l := testingutil.NewLog(t, "db", c.log.Dir, "in memory")
	l.DB = &imageDB{img}
	if err := l.Open(context.Background()); err != nil {
		t.Fatal(err)
	}
	sum, pages := l.Checksum()
	if sum != info.PostApplyChecksum || pages != info.Header.Commit {
		t.Fatalf("got %s with %d pages, want %s with %d", sum, pages, info.PostApplyChecksum, info.Header.Commit)
	}
	_ = l.Close()

	// A database that differs from the log is refused.
	img[len(img)-1] ^= 1
	l = testingutil.NewLog(t, "db", c.log.Dir, "in memory")
	l.DB = &imageDB{img}
	if err := l.Open(context.Background()); err == nil {
		t.Fatal("opened a log over a database that differs from it")
	}

	// A log started from a database read through DB.
	dir := filepath.Join(t.TempDir(), "ltx")
	l = testingutil.NewLog(t, "db", dir, "in memory")
	l.DB = &imageDB{img}
	if err := l.Open(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	if got := l.Pos().TXID; got != 1 {
		t.Fatalf("got TXID %s, want 1", got)
	}
	if _, err := os.Stat(filepath.Join(dir, ltx.FormatName(1, 1))); err != nil {
		t.Fatal(err)
	}
}

// TestLog_Prepare checks the two halves of a commit: a prepared file is in
// the log only once committed, an aborted one leaves nothing, and one
// prepared before another commit is refused.
func TestLog_Prepare(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDB(t, dir, 3)
	t0 := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	d.run(2, t0, nil)
	ctx := context.Background()
	before := d.log.Pos()
	names := func() []string {
		entries, err := os.ReadDir(d.log.Dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range entries {
			out = append(out, e.Name())
		}
		return out
	}
	ltxNames := func() []string {
		return slices.DeleteFunc(names(), func(n string) bool { return filepath.Ext(n) != ".ltx" })
	}
	files := names()

	tx := func() ltx.Tx {
		pgnos := d.step()
		return ltx.Tx{DB: bytes.NewReader(d.data), PageSize: d.pageSize, Commit: uint32(len(d.data)) / d.pageSize, Pgnos: pgnos, Timestamp: t0, SkipUnchanged: true}
	}
	p, err := d.log.Prepare(ctx, tx())
	if err != nil {
		t.Fatal(err)
	}
	if d.log.Pos() != before || !slices.Equal(ltxNames(), files) {
		t.Fatalf("prepared: log at %s with files %v, want %s and %v", d.log.Pos(), ltxNames(), before, files)
	}
	p.Abort()
	if d.log.Pos() != before || !slices.Equal(names(), files) {
		t.Fatalf("aborted: log at %s with files %v, want %s and %v", d.log.Pos(), names(), before, files)
	}

	p, err = d.log.Prepare(ctx, tx())
	if err != nil {
		t.Fatal(err)
	}
	info, err := p.Commit()
	if err != nil {
		t.Fatal(err)
	}
	if info.Header.MinTXID != before.TXID+1 || d.log.Pos() != info.Pos() || info.Name != p.Info().Name {
		t.Fatalf("committed %s at %s; log at %s, was at %s", info.Name, info.Pos(), d.log.Pos(), before)
	}
	if got, err := ltx.VerifyFile(filepath.Join(d.log.Dir, info.Name)); err != nil || got.FileChecksum != info.FileChecksum {
		t.Fatalf("committed file does not verify: %v", err)
	}

	// Prepared, then overtaken by a commit.
	stale, err := d.log.Prepare(ctx, tx())
	if err != nil {
		t.Fatal(err)
	}
	d.commit(d.step(), t0)
	at := d.log.Pos()
	if _, err := stale.Commit(); err == nil {
		t.Fatal("a file prepared before another commit was committed")
	}
	if d.log.Pos() != at {
		t.Fatalf("refused commit moved the log from %s to %s", at, d.log.Pos())
	}

	// Nothing changed: nothing prepared.
	same := ltx.Tx{DB: bytes.NewReader(d.data), PageSize: d.pageSize, Commit: uint32(len(d.data)) / d.pageSize, Pgnos: []uint32{2}, SkipUnchanged: true}
	if p, err := d.log.Prepare(ctx, same); err != nil || p != nil {
		t.Fatalf("unchanged transaction prepared: %v, %v", p, err)
	}
	if n := len(names()); n != len(d.log.Files()) {
		t.Fatalf("%d files in the directory, %d in the log", n, len(d.log.Files()))
	}
}

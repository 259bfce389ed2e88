package ltx_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

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

package ltx_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	codec "github.com/superfly/ltx"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// lockPageDB is a sparse database file of 64 KiB pages that can grow past
// SQLite's lock page, the page holding byte 2^30 (page 16385 at this size),
// which SQLite never writes and the LTX checksum skips.
type lockPageDB struct {
	tb   testing.TB
	path string
	f    *os.File
}

const lockPageSize = 65536

func newLockPageDB(tb testing.TB, path string, pages uint32) *lockPageDB {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = f.Close() })
	d := &lockPageDB{tb: tb, path: path, f: f}
	hdr := make([]byte, 100)
	copy(hdr, "SQLite format 3\x00")
	binary.BigEndian.PutUint16(hdr[16:], 1) // 1 means 65536
	d.write(1, hdr)
	d.resize(pages)
	return d
}

func (d *lockPageDB) write(pgno uint32, data []byte) {
	if _, err := d.f.WriteAt(data, int64(pgno-1)*lockPageSize); err != nil {
		d.tb.Fatal(err)
	}
}

func (d *lockPageDB) resize(pages uint32) {
	if err := d.f.Truncate(int64(pages) * lockPageSize); err != nil {
		d.tb.Fatal(err)
	}
}

// fill writes a page of recognizable bytes.
func (d *lockPageDB) fill(pgno uint32) {
	d.write(pgno, bytes.Repeat([]byte{byte(pgno), byte(pgno >> 8), 0x5a}, lockPageSize/3+1)[:lockPageSize])
}

// rescan returns the database checksum computed by the codec's own serial
// reader, independent of the checksum table.
func (d *lockPageDB) rescan() ltx.Checksum {
	if _, err := d.f.Seek(0, 0); err != nil {
		d.tb.Fatal(err)
	}
	sum, err := codec.ChecksumReader(d.f, lockPageSize)
	if err != nil {
		d.tb.Fatal(err)
	}
	return sum
}

func TestLog_LockPage(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lockPgno := codec.LockPgno(lockPageSize)
	if lockPgno != 16385 {
		t.Fatalf("lock page %d, want 16385", lockPgno)
	}
	dir := t.TempDir()
	d := newLockPageDB(t, filepath.Join(dir, "db"), lockPgno-5)
	d.fill(lockPgno - 6)
	l := testingutil.MustOpenLog(t, "db", filepath.Join(dir, "ltx"), d.path) // snapshot at txid 1
	before := l.Pos()

	// Grow over the lock page, which stays a hole.
	var pgnos []uint32
	for pgno := lockPgno - 5; pgno <= lockPgno+5; pgno++ {
		if pgno != lockPgno {
			d.fill(pgno)
			pgnos = append(pgnos, pgno)
		}
	}
	grow, err := l.Commit(ctx, ltx.Tx{DB: d.f, PageSize: lockPageSize, Commit: lockPgno + 5, Pgnos: pgnos})
	if err != nil {
		t.Fatal(err)
	}
	table, err := ltx.ReadChecksumTable(d.path)
	if err != nil {
		t.Fatal(err)
	}
	if sum, pages := l.Checksum(); sum != table.Checksum() || sum != d.rescan() || grow.PostApplyChecksum != sum || pages != lockPgno+5 {
		t.Fatalf("after growing past the lock page: log %s (%d pages), table rescan %s, codec rescan %s", sum, pages, table.Checksum(), d.rescan())
	}
	if table.Page(lockPgno) != 0 {
		t.Fatalf("lock page checksum %s, want 0", table.Page(lockPgno))
	}

	// The file applies over the lock page on a second database, to the same
	// bytes and checksum, and does not carry the lock page.
	d2 := newLockPageDB(t, filepath.Join(t.TempDir(), "db"), lockPgno-5)
	d2.fill(lockPgno - 6)
	table2, err := ltx.ReadChecksumTable(d2.path)
	if err != nil {
		t.Fatal(err)
	}
	c, err := l.Cursor(before)
	if err != nil {
		t.Fatal(err)
	}
	r := mustNext(t, c)
	pos, err := ltx.Apply(ctx, d2.f, table2, before, r)
	_ = r.Close()
	if err != nil {
		t.Fatal(err)
	}
	if pos != grow.Pos() || d2.rescan() != grow.PostApplyChecksum {
		t.Fatalf("applied to %s with checksum %s, want %s", pos, d2.rescan(), grow.Pos())
	}
	if got, want := testingutil.FileSHA256(t, d2.path), testingutil.FileSHA256(t, d.path); got != want {
		t.Fatal("database after apply differs from the original")
	}
	spec := codec.FileSpec{}
	if _, err := spec.ReadFrom(bytes.NewReader(testingutil.MustReadFile(t, filepath.Join(l.Dir, grow.Name)))); err != nil {
		t.Fatal(err)
	}
	if len(spec.Pages) != len(pgnos) {
		t.Fatalf("file carries %d pages, want the %d written (not the lock page)", len(spec.Pages), len(pgnos))
	}

	// Shrink back below the lock page.
	d.resize(lockPgno - 2)
	d.fill(2)
	shrink, err := l.Commit(ctx, ltx.Tx{DB: d.f, PageSize: lockPageSize, Commit: lockPgno - 2, Pgnos: []uint32{2}})
	if err != nil {
		t.Fatal(err)
	}
	if sum, _ := l.Checksum(); sum != d.rescan() || shrink.PostApplyChecksum != sum {
		t.Fatalf("after shrinking: log %s, codec rescan %s", sum, d.rescan())
	}
}

package ltx

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"

	"github.com/superfly/ltx"
	"golang.org/x/sync/errgroup"
)

// sqliteMagic starts every SQLite database file.
const sqliteMagic = "SQLite format 3\x00"

// sqliteHeaderSize is the size of the SQLite database header on page 1.
const sqliteHeaderSize = 100

// parallelChecksumBytes is the database size from which ReadChecksumTable
// uses every CPU.
const parallelChecksumBytes = 64 << 20

// ReadPageSize returns the page size recorded in the SQLite header at the
// start of r, or 0 if r is empty (a database not yet written).
func ReadPageSize(r io.ReaderAt) (uint32, error) {
	hdr := make([]byte, sqliteHeaderSize)
	n, err := r.ReadAt(hdr, 0)
	if n == 0 && errors.Is(err, io.EOF) {
		return 0, nil
	} else if n < len(hdr) {
		if err == nil || errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("not a SQLite database: %d bytes is shorter than the %d-byte header", n, sqliteHeaderSize)
		}
		return 0, err
	}
	if !bytes.Equal(hdr[:len(sqliteMagic)], []byte(sqliteMagic)) {
		return 0, fmt.Errorf("not a SQLite database: header starts %q", hdr[:len(sqliteMagic)])
	}
	pageSize := uint32(binary.BigEndian.Uint16(hdr[16:18]))
	if pageSize == 1 {
		pageSize = 65536
	}
	if !ltx.IsValidPageSize(pageSize) {
		return 0, fmt.Errorf("SQLite header has invalid page size %d", pageSize)
	}
	return pageSize, nil
}

// ChecksumTable holds the checksum of every page of a database, so the
// database checksum can be updated per transaction by XOR-ing out the old
// checksums of the pages it changed and XOR-ing in the new ones.
//
// The database checksum is ChecksumFlag | XOR of all page checksums, where a
// page checksum is ltx.ChecksumPage(pgno, data) and SQLite's lock page
// counts as zero. A ChecksumTable is not safe for concurrent use.
type ChecksumTable struct {
	pageSize uint32
	sums     []Checksum // sums[pgno-1]
	xor      Checksum   // XOR of sums
	// gen counts the changes made to the table, for a copy to tell that
	// it still mirrors it (see Log.scratchTable).
	gen uint64
	// journal, if not nil, records the changes made to the table.
	journal *[]tableChange
}

// tableChange is one apply of changes to a table, recorded to make the
// same changes to a copy.
type tableChange struct {
	changes []pageSum
	commit  uint32
}

// NewChecksumTable returns the table of an empty database.
func NewChecksumTable(pageSize uint32) *ChecksumTable {
	return &ChecksumTable{pageSize: pageSize}
}

// ReadChecksumTable computes the table of the database file at path from
// scratch, in parallel for files over 64 MiB. A missing or empty file is an
// empty database.
func ReadChecksumTable(path string) (*ChecksumTable, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return NewChecksumTable(0), nil
	} else if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()

	pageSize, err := ReadPageSize(f)
	if err != nil {
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	t := NewChecksumTable(pageSize)
	if pageSize == 0 {
		return t, nil
	}
	if fi.Size()%int64(pageSize) != 0 {
		return nil, fmt.Errorf("database %s: size %d is not a whole number of %d-byte pages", path, fi.Size(), pageSize)
	}
	if fi.Size()/int64(pageSize) > int64(^uint32(0)) {
		return nil, fmt.Errorf("database %s: %d pages is more than SQLite allows", path, fi.Size()/int64(pageSize))
	}
	nPages := uint32(fi.Size() / int64(pageSize))

	workers := uint32(1)
	if fi.Size() >= parallelChecksumBytes {
		workers = uint32(runtime.GOMAXPROCS(0))
	}
	t.sums = make([]Checksum, nPages)
	if _, err := ltx.ChecksumPages(path, pageSize, nPages, workers, t.sums); err != nil {
		return nil, fmt.Errorf("checksum database %s: %w", path, err)
	}
	for _, sum := range t.sums {
		t.xor ^= sum
	}
	return t, nil
}

// Database reads a database whose content is not simply one file.
type Database interface {
	io.ReaderAt
	// Size returns the database size in bytes.
	Size() (int64, error)
}

// ReadChecksumTableFrom computes the table of the database db reads, named
// name in errors, from scratch, in parallel for databases over 64 MiB.
func ReadChecksumTableFrom(ctx context.Context, name string, db Database) (*ChecksumTable, error) {
	size, err := db.Size()
	if err != nil {
		return nil, fmt.Errorf("database %s: %w", name, err)
	}
	if size == 0 {
		return NewChecksumTable(0), nil
	}
	pageSize, err := ReadPageSize(db)
	if err != nil {
		return nil, fmt.Errorf("database %s: %w", name, err)
	}
	t := NewChecksumTable(pageSize)
	if size%int64(pageSize) != 0 {
		return nil, fmt.Errorf("database %s: size %d is not a whole number of %d-byte pages", name, size, pageSize)
	}
	if size/int64(pageSize) > int64(^uint32(0)) {
		return nil, fmt.Errorf("database %s: %d pages is more than SQLite allows", name, size/int64(pageSize))
	}
	n := uint32(size / int64(pageSize))
	t.sums = make([]Checksum, n)
	workers := uint32(1)
	if size >= parallelChecksumBytes {
		workers = uint32(runtime.GOMAXPROCS(0))
	}
	per := (n + workers - 1) / workers
	g, ctx := errgroup.WithContext(ctx)
	for first := uint32(0); first < n; first += per {
		last := min(first+per, n)
		g.Go(func() error { return checksumRange(ctx, db, pageSize, first, last, t.sums) })
	}
	if err := g.Wait(); err != nil {
		return nil, fmt.Errorf("checksum database %s: %w", name, err)
	}
	for _, sum := range t.sums {
		t.xor ^= sum
	}
	return t, nil
}

// checksumRange fills sums[first:last] with the checksums of those pages
// (0-based) of db, leaving the lock page zero.
func checksumRange(ctx context.Context, db io.ReaderAt, pageSize, first, last uint32, sums []Checksum) error {
	lockPgno := ltx.LockPgno(pageSize)
	hash := ltx.NewHasher()
	buf := make([]byte, pageSize)
	for i := first; i < last; i++ {
		if i%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		pgno := i + 1
		if pgno == lockPgno {
			continue
		}
		if _, err := db.ReadAt(buf, int64(i)*int64(pageSize)); err != nil {
			return fmt.Errorf("read page %d: %w", pgno, err)
		}
		sums[i] = ltx.ChecksumPageWithHasher(hash, pgno, buf)
	}
	return nil
}

// Clone returns a copy of t.
func (t *ChecksumTable) Clone() *ChecksumTable {
	return &ChecksumTable{pageSize: t.pageSize, sums: slices.Clone(t.sums), xor: t.xor}
}

// PageSize returns the database page size; 0 for a database never written.
func (t *ChecksumTable) PageSize() uint32 { return t.pageSize }

// Pages returns the database size in pages.
func (t *ChecksumTable) Pages() uint32 { return uint32(len(t.sums)) }

// Checksum returns the database checksum.
func (t *ChecksumTable) Checksum() Checksum { return ChecksumFlag | t.xor }

// Page returns the checksum of page pgno, or 0 past the end and for the lock
// page.
func (t *ChecksumTable) Page(pgno uint32) Checksum {
	if pgno == 0 || pgno > t.Pages() {
		return 0
	}
	return t.sums[pgno-1]
}

// pageSum is the new checksum of one page changed by a transaction.
type pageSum struct {
	pgno uint32
	sum  Checksum
}

// next returns the database checksum after the pages in changes take their
// new checksums and the database is resized to commit pages. Every page
// beyond the current size up to commit, but the lock page, must be in
// changes. It does not modify t.
func (t *ChecksumTable) next(changes []pageSum, commit uint32) Checksum {
	x := t.xor
	for pgno := commit + 1; pgno <= t.Pages(); pgno++ {
		x ^= t.sums[pgno-1]
	}
	for _, c := range changes {
		if c.pgno <= t.Pages() {
			x ^= t.sums[c.pgno-1]
		}
		x ^= c.sum
	}
	return ChecksumFlag | x
}

// Commit makes t the table of the database after a transaction that
// wrote pages, by page number, and left it commit pages long. Every page
// beyond t's size up to commit, but the lock page, must be among pages;
// pages past commit and the lock page are ignored.
func (t *ChecksumTable) Commit(pages map[uint32][]byte, commit uint32) {
	lockPgno := ltx.LockPgno(t.pageSize)
	hash := ltx.NewHasher()
	changes := make([]pageSum, 0, len(pages))
	for pgno, data := range pages {
		if pgno != lockPgno && pgno <= commit {
			changes = append(changes, pageSum{pgno: pgno, sum: ltx.ChecksumPageWithHasher(hash, pgno, data)})
		}
	}
	t.apply(changes, commit)
}

// apply makes the changes that next describes.
func (t *ChecksumTable) apply(changes []pageSum, commit uint32) {
	if t.journal != nil {
		*t.journal = append(*t.journal, tableChange{changes: slices.Clone(changes), commit: commit})
	}
	t.gen++
	t.xor = t.next(changes, commit) &^ ChecksumFlag
	if commit <= t.Pages() {
		t.sums = t.sums[:commit]
	} else {
		t.sums = append(t.sums, make([]Checksum, commit-t.Pages())...)
	}
	for _, c := range changes {
		t.sums[c.pgno-1] = c.sum
	}
}

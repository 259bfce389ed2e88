package ltx

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/pierrec/lz4/v4"
	"github.com/superfly/ltx"
	"golang.org/x/sync/errgroup"
)

// EncodeSnapshot writes a snapshot LTX file of the database read from db to
// w: every page from 1 to commit except the lock page, MinTXID 1, MaxTXID
// txid, and as post-apply checksum the database checksum computed from the
// pages read.
func EncodeSnapshot(ctx context.Context, w io.Writer, db io.ReaderAt, pageSize, commit uint32, txid TXID, ts time.Time) (*FileInfo, error) {
	enc := getEncoder(w)
	defer putEncoder(enc)
	hdr := ltx.Header{
		Version:   ltx.Version,
		PageSize:  pageSize,
		Commit:    commit,
		MinTXID:   1,
		MaxTXID:   txid,
		Timestamp: ts.UnixMilli(),
	}
	if err := enc.EncodeHeader(hdr); err != nil {
		return nil, fmt.Errorf("encode snapshot header: %w", err)
	}
	chksum := ChecksumFlag
	pool, batches := newBatchPool(3), make(chan *pageBatch, 1)
	defer pool.release() // after g.Wait below
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(batches)
		if err := readPages(gctx, db, pageSize, commit, pool, batches); err != nil {
			return fmt.Errorf("read database: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		for b := range batches {
			for i, pgno := range b.pgnos {
				chksum ^= b.sums[i]
				if err := enc.EncodePage(ltx.PageHeader{Pgno: pgno}, b.page(i, pageSize)); err != nil {
					return fmt.Errorf("encode page %d: %w", pgno, err)
				}
			}
			pool <- b
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	enc.SetPostApplyChecksum(ChecksumFlag | chksum)
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("close snapshot: %w", err)
	}
	t := enc.Trailer()
	return &FileInfo{Name: FormatName(1, txid), Header: enc.Header(), PostApplyChecksum: t.PostApplyChecksum, FileChecksum: t.FileChecksum, Size: enc.N()}, nil
}

// Snapshot writes a snapshot of the database at the log's current position
// to w, reading the pages from db. The caller keeps writers out of the
// database meanwhile. If the pages do not add up to the log's checksum it
// fails with a *DatabaseMismatchError.
func (l *Log) Snapshot(ctx context.Context, w io.Writer, db io.ReaderAt) (*FileInfo, error) {
	at, err := l.SnapshotPoint()
	if err != nil {
		return nil, err
	}
	return l.WriteSnapshot(ctx, w, db, at)
}

// SnapshotPoint is a position of the log a snapshot is taken at, with
// what the snapshot needs to know of the database there.
type SnapshotPoint struct {
	Pos      Pos
	PageSize uint32
	Pages    uint32 // the database's size there
	Time     time.Time
}

// SnapshotPoint returns the log's current position as a SnapshotPoint. A
// caller that reads the database while it changes takes it at the moment
// its reader's view of the database is the log's.
func (l *Log) SnapshotPoint() (SnapshotPoint, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if err := l.checkOpen(); err != nil {
		return SnapshotPoint{}, err
	}
	if l.table == nil {
		return SnapshotPoint{}, fmt.Errorf("log %s has no database to snapshot", l.Dir)
	}
	at := SnapshotPoint{Pos: l.pos(), PageSize: l.table.PageSize(), Pages: l.table.Pages()}
	if len(l.files) > 0 {
		at.Time = l.files[len(l.files)-1].info.Time()
	}
	if at.Pos.TXID == 0 {
		return SnapshotPoint{}, fmt.Errorf("snapshot %s: the database has no transactions yet", l.Name)
	}
	return at, nil
}

// WriteSnapshot writes a snapshot of the database at point at to w,
// reading the pages from db, which must read the database as it was
// there. If the pages do not add up to its checksum it fails with a
// *DatabaseMismatchError.
func (l *Log) WriteSnapshot(ctx context.Context, w io.Writer, db io.ReaderAt, at SnapshotPoint) (*FileInfo, error) {
	info, err := EncodeSnapshot(ctx, w, db, at.PageSize, at.Pages, at.Pos.TXID, at.Time)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", l.Name, err)
	}
	if info.PostApplyChecksum != at.Pos.PostApplyChecksum {
		return nil, &DatabaseMismatchError{DB: l.Name, Path: l.DBPath, Dir: l.Dir, Log: at.Pos, Checksum: info.PostApplyChecksum, Pages: at.Pages}
	}
	return info, nil
}

// DatabaseFile is the part of *os.File that Apply writes through.
type DatabaseFile interface {
	io.WriterAt
	Truncate(size int64) error
}

// Apply writes the LTX file read from r into the database file db, which is
// at position pos with page checksums t. The file must apply at pos, or be
// a snapshot. It checks that the file decodes with a matching file checksum,
// that it carries every page it grows the database by (all of them for a
// snapshot or a change of page size), and that the database checksum
// afterwards equals the file's post-apply checksum, and then updates t and
// returns the new position. On error the
// database file may be partly written (never past the file's commit size)
// and t is unchanged: the caller discards the file or applies the same LTX
// file again. A caller that must not touch the database with a damaged file
// verifies the file first (VerifyReader); a log's files are verified as
// cursors read them.
func Apply(ctx context.Context, db DatabaseFile, t *ChecksumTable, pos Pos, r io.Reader) (Pos, error) {
	post, _, err := applyFile(ctx, db, t, pos, r, true)
	return post, err
}

// applyFile is Apply, returning also the pages written, ascending. With a
// nil db it writes nothing: it only checks that the file would leave a
// database whose page checksums are t at its post-apply checksum, and
// updates t as if it had. Unless check, the post-apply checksum is not
// checked (the caller checks a later file's).
func applyFile(ctx context.Context, db DatabaseFile, t *ChecksumTable, pos Pos, r io.Reader, check bool) (Pos, []uint32, error) {
	dec := NewDecoder(r)
	defer dec.Release() // after g.Wait below: nothing decodes any more
	if err := dec.DecodeHeader(); err != nil {
		return pos, nil, fmt.Errorf("%w: header: %v", ErrCorrupt, err)
	}
	hdr := dec.Header()
	if !hdr.IsSnapshot() && hdr.PreApplyPos() != pos {
		return pos, nil, fmt.Errorf("file txid %s-%s applies at %s, but the database is at %s", hdr.MinTXID, hdr.MaxTXID, hdr.PreApplyPos(), pos)
	}
	base := t
	if hdr.IsSnapshot() || hdr.PageSize != t.PageSize() {
		base = NewChecksumTable(hdr.PageSize)
	}

	// Decode on one goroutine; checksum and write on another.
	var changes []pageSum
	pool, batches := newBatchPool(3), make(chan *pageBatch, 1)
	defer pool.release() // after g.Wait below
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(batches)
		return decodePages(gctx, dec, base.Pages(), pool, batches)
	})
	g.Go(func() error {
		for b := range batches {
			b.checksum(hdr.PageSize)
			if db != nil {
				if err := writePages(db, b, hdr.PageSize); err != nil {
					return fmt.Errorf("write pages %d-%d: %w", b.pgnos[0], b.pgnos[len(b.pgnos)-1], err)
				}
			}
			for i, pgno := range b.pgnos {
				changes = append(changes, pageSum{pgno, b.sums[i]})
			}
			pool <- b
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return pos, nil, err
	}
	if db != nil {
		if err := db.Truncate(int64(hdr.Commit) * int64(hdr.PageSize)); err != nil {
			return pos, nil, fmt.Errorf("truncate database to %d pages: %w", hdr.Commit, err)
		}
	}
	post := dec.PostApplyPos()
	if got := base.next(changes, hdr.Commit); check && got != post.PostApplyChecksum {
		return pos, nil, fmt.Errorf("%w: file txid %s-%s should leave the database at checksum %s, but it is %s", ErrCorrupt,
			hdr.MinTXID, hdr.MaxTXID, post.PostApplyChecksum, got)
	}
	base.apply(changes, hdr.Commit)
	*t = *base
	pgnos := make([]uint32, len(changes))
	for i, c := range changes {
		pgnos[i] = c.pgno
	}
	return post, pgnos, nil
}

// decodePages decodes the page frames of dec in batches and sends them to
// out, then checks the rest of the file. The database has `have` pages
// before the file: a file that grows it must carry every page it grows by.
// A page outside the database, or past a page the file skips while growing
// it, is refused before it goes anywhere near a write.
func decodePages(ctx context.Context, dec *Decoder, have uint32, pool batchPool, out chan<- *pageBatch) error {
	hdr := dec.Header()
	lockPgno := hdr.LockPgno()
	next := have + 1 // first page past the end, which the file must carry next
	if next == lockPgno {
		next++
	}
	var ph ltx.PageHeader
	for n := 1; ; {
		b, err := pool.get(ctx)
		if err != nil {
			return err
		}
		for ; len(b.pgnos) < batchPages; n++ {
			if err := dec.DecodePage(&ph, b.page(len(b.pgnos), hdr.PageSize)); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return fmt.Errorf("%w: page frame %d: %v", ErrCorrupt, n, err)
			}
			if ph.Pgno > hdr.Commit || ph.Pgno == lockPgno {
				return fmt.Errorf("%w: page frame %d: page %d is outside the database (commit %d, lock page %d)",
					ErrCorrupt, n, ph.Pgno, hdr.Commit, lockPgno)
			}
			if ph.Pgno > next {
				return fmt.Errorf("%w: page frame %d: page %d grows the database past page %d, which the file does not carry",
					ErrCorrupt, n, ph.Pgno, next)
			} else if ph.Pgno == next {
				if next++; next == lockPgno {
					next++
				}
			}
			b.pgnos = append(b.pgnos, ph.Pgno)
		}
		if len(b.pgnos) == 0 {
			break
		}
		if err := send(ctx, out, b); err != nil {
			return err
		}
	}
	if next <= hdr.Commit {
		return fmt.Errorf("%w: the file grows the database to %d pages but does not carry page %d", ErrCorrupt, hdr.Commit, next)
	}
	if err := dec.Close(); err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return nil
}

// Restore builds the database file dst from a snapshot followed by LTX files
// that continue from it, each read from one of files, in order. It writes a
// temporary file beside dst and renames it over dst only once every file has
// applied and the result is synced; on error dst is untouched.
func Restore(ctx context.Context, dst string, files ...io.Reader) (Pos, error) {
	f, err := createTemp(filepath.Dir(dst), filepath.Base(dst))
	if err != nil {
		return Pos{}, err
	}
	defer func() {
		_ = f.Close()
		_ = os.Remove(f.Name())
	}()

	var pos Pos
	t := NewChecksumTable(0)
	for i, r := range files {
		if i == 0 {
			hdr, pr, err := ltx.PeekHeader(r)
			if err == nil && !hdr.IsSnapshot() {
				return Pos{}, fmt.Errorf("restore %s: the first file starts at txid %s; a restore starts from a snapshot (txid 1)", dst, hdr.MinTXID)
			}
			r = pr
		}
		if pos, err = Apply(ctx, f, t, pos, r); err != nil {
			return Pos{}, fmt.Errorf("restore %s: file %d: %w", dst, i+1, err)
		}
	}
	if err := f.Sync(); err != nil {
		return Pos{}, diskError("sync", f.Name(), err)
	}
	if err := os.Rename(f.Name(), dst); err != nil {
		return Pos{}, err
	}
	return pos, syncDirectory(filepath.Dir(dst))
}

// Restore builds the database file dst from the log alone, which must
// still start with a snapshot. See Restore.
func (l *Log) Restore(ctx context.Context, dst string) (Pos, error) {
	l.mu.RLock()
	if err := l.checkOpen(); err != nil {
		l.mu.RUnlock()
		return Pos{}, err
	}
	if len(l.files) == 0 {
		l.mu.RUnlock()
		return Pos{}, fmt.Errorf("restore %s: log %s is empty", dst, l.Dir)
	}
	if first := l.files[0].info; !first.Header.IsSnapshot() {
		l.mu.RUnlock()
		return Pos{}, fmt.Errorf("restore %s: log %s starts at txid %s, not at a snapshot (txid 1): restore from a snapshot and the log together", dst, l.Dir, first.Header.MinTXID)
	}
	var rdrs []io.Reader
	for _, f := range l.files {
		fh, err := l.open(f)
		if err != nil {
			l.mu.RUnlock()
			return Pos{}, err
		}
		defer func() { _ = fh.Close() }()
		rdrs = append(rdrs, fh)
	}
	l.mu.RUnlock()
	return Restore(ctx, dst, rdrs...)
}

// SnapshotBound returns the most bytes an LTX file of every page of a
// database whose header is h can take: each page compressed as badly as
// LZ4 can, with its frame header and size and its page index entry, plus
// the file's header, end-of-pages marker, index end and trailer. A
// snapshot sent while it is encoded is announced with it.
func SnapshotBound(h Header) int64 {
	const perPage = ltx.PageHeaderSize + 4 + 3*binary.MaxVarintLen64
	pages := int64(h.Commit)
	return ltx.HeaderSize + pages*(perPage+int64(lz4.CompressBlockBound(int(h.PageSize)))) +
		ltx.PageHeaderSize + binary.MaxVarintLen64 + 8 + ltx.TrailerSize
}

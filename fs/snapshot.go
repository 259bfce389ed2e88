package fs

import (
	"context"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/meridian-db/meridian/ltx"
)

// Snapshots of a database that goes on being written.
//
// A snapshot for a joining replica reads every page of the database as it
// was at one position of the log, however large the database, without
// holding its writers off for more than the read of one batch of pages:
// the daemon's lock is held for each batch (128 KiB), not for the whole
// encode. Between batches the app commits on. Before a page the snapshot
// has not read yet changes, as the log sees the database (walView), its
// content at the snapshot's position is kept for the snapshot: copy on
// write. The database changes, as walView reads it, in two places only:
//
//   - a write of the database file, for a page the WAL does not hold (in
//     rollback-journal mode, every page SQLite writes; in WAL mode, none
//     that a checkpoint copies, as walView reads those from the WAL), and
//     a truncation of it;
//   - a WAL transaction entering the log (loggedWALTx), for its pages.
//
// A snapshot in rollback-journal mode starts only when no transaction is
// half written into the database file: the pages it wrote are not the
// log's, and their committed content is in the app's journal.

// snapshotKeepMax bounds the bytes of pages a snapshot keeps: past it,
// the snapshot holds the database's writers off for the rest of its read,
// as it did all along before it kept pages, rather than keep more.
var snapshotKeepMax atomic.Int64

func init() { snapshotKeepMax.Store(64 << 20) }

// snapshotReadMax bounds the wait for a write transaction to end before a
// snapshot of a rollback-journal database starts.
const snapshotReadMax = 10 * time.Second

// snapshotCOW is what a snapshot being read needs kept: the pages at its
// position that change before it reads them.
type snapshotCOW struct {
	pageSize uint32
	pages    uint32            // the database's size at the snapshot's position
	next     uint32            // every page before it is read
	saved    map[uint32][]byte // pages kept at the snapshot's position
	kept     int               // pages kept, in all
	longest  time.Duration     // the longest the reader held writers off
	// holding is set once the pages kept reached snapshotKeepMax: the
	// reader holds d.mu from then to the end of the read, since holdStart.
	holding   bool
	holdStart time.Time
	err       error // a page could not be kept: the snapshot fails
}

// Snapshot writes a snapshot of the database at its log's position to w,
// for a replica that cannot continue from its own position. Every
// transaction SQLite committed is in the log first. Writers go on
// meanwhile, held off only while a batch of pages is read; one snapshot
// of a database is read at a time.
func (d *DB) Snapshot(ctx context.Context, w io.Writer) (*ltx.FileInfo, error) {
	d.snapMu.Lock()
	defer d.snapMu.Unlock()
	at, err := d.startSnapshot(ctx)
	if err != nil {
		return nil, err
	}
	began := time.Now()
	info, err := d.log.WriteSnapshot(ctx, w, snapshotReader{d}, at)
	if s := d.snap; s.holding {
		s.longest = max(s.longest, time.Since(s.holdStart)) // d.mu is held
	} else {
		d.mu.Lock()
	}
	kept, longest := d.snap.kept, d.snap.longest
	d.snapKept += kept
	d.snap = nil
	d.mu.Unlock()
	if err == nil {
		d.logger.Info("snapshot read", "pos", at.Pos.String(), "pages", at.Pages, "kept_before_a_change", kept, "longest_hold", longest, "took", time.Since(began))
	}
	return info, err
}

// startSnapshot takes the log's position for a snapshot, once every commit
// is in the log and (in rollback-journal mode) no transaction is half
// written, and starts keeping the pages the snapshot will need.
func (d *DB) startSnapshot(ctx context.Context) (ltx.SnapshotPoint, error) {
	deadline := time.Now().Add(snapshotReadMax)
	for {
		d.mu.Lock()
		err := d.scanWAL(ctx)
		if err == nil {
			err = d.drain()
		}
		if err != nil {
			d.mu.Unlock()
			return ltx.SnapshotPoint{}, err
		}
		if len(d.dirty) == 0 || walMode(d.file) {
			break
		}
		d.mu.Unlock()
		if time.Now().After(deadline) {
			return ltx.SnapshotPoint{}, fmt.Errorf("snapshot of %s: a write transaction has been writing the database file for %v; try again once it ends", d.Name, snapshotReadMax)
		}
		select {
		case <-ctx.Done():
			return ltx.SnapshotPoint{}, ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	defer d.mu.Unlock()
	at, err := d.log.SnapshotPoint()
	if err != nil {
		return at, err
	}
	d.snap = &snapshotCOW{pageSize: at.PageSize, pages: at.Pages, next: 1, saved: make(map[uint32][]byte)}
	return at, nil
}

// snapshotReader reads the database at the position of the snapshot being
// read: the pages kept for it, else as walView reads them now. It reads in
// ascending order, as ltx.EncodeSnapshot does.
type snapshotReader struct{ d *DB }

func (r snapshotReader) ReadAt(p []byte, off int64) (int, error) {
	// A few pages at a time, each under the lock: writers wait for one
	// read of 128 KiB at most.
	const step = 128 << 10
	n := 0
	for n < len(p) {
		m, err := r.readAt(p[n:min(len(p), n+step)], off+int64(n))
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (r snapshotReader) readAt(p []byte, off int64) (int, error) {
	d := r.d
	s := d.snap // set and cleared by the reader's goroutine, as is holding
	if !s.holding {
		d.mu.Lock()
	}
	held := time.Now()
	defer func() {
		if s.holding {
			return
		}
		if len(s.saved)*int(s.pageSize) >= int(snapshotKeepMax.Load()) {
			s.holding, s.holdStart = true, held
			d.logger.Warn("the app changed more pages than a snapshot keeps before it read them: its writers wait for the rest of the read",
				"pages_kept", len(s.saved), "bound_bytes", snapshotKeepMax.Load(), "read_pages", s.next-1, "of", s.pages)
			return
		}
		s.longest = max(s.longest, time.Since(held))
		d.mu.Unlock()
	}()
	if s.err != nil {
		return 0, s.err
	}
	ps := int64(s.pageSize)
	if off%ps != 0 || int64(len(p))%ps != 0 {
		return 0, fmt.Errorf("snapshot of %s: read of %d bytes at %d is not in whole pages", d.Name, len(p), off)
	}
	n, err := walView{d: d}.ReadAt(p, off)
	// Pages read whole, then the kept ones over them: a page kept past
	// the end of a file truncated since extends what was read only where
	// it follows it.
	first, pages := uint32(off/ps)+1, len(p)/int(ps)
	whole := n / int(ps)
	for i := range pages {
		if b, ok := s.saved[first+uint32(i)]; ok {
			copy(p[int64(i)*ps:], b)
			delete(s.saved, first+uint32(i))
			if i == whole {
				whole++
			}
		}
	}
	s.next = max(s.next, first+uint32(pages))
	if whole == pages {
		return len(p), nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return whole * int(ps), err
}

// keepForSnapshot keeps pages first to last, as walView reads them now,
// for the snapshot being read, if it still needs them; before a change.
// walToo says whether the change is to pages the WAL holds (a WAL
// transaction) or to the database file, which walView does not read for
// those. A page that cannot be read fails the snapshot, not the change.
// Caller holds d.mu.
func (d *DB) keepForSnapshot(first, last uint32, walToo bool) {
	s := d.snap
	if s == nil || s.err != nil {
		return
	}
	first, last = max(first, s.next), min(last, s.pages)
	for pgno := first; pgno <= last; pgno++ {
		d.keepPage(s, pgno, walToo)
	}
}

// keepPage is keepForSnapshot for one page. Caller holds d.mu.
func (d *DB) keepPage(s *snapshotCOW, pgno uint32, walToo bool) {
	if pgno < s.next || pgno > s.pages || s.err != nil {
		return
	}
	if _, ok := s.saved[pgno]; ok {
		return
	}
	if !walToo && d.wal.valid {
		if _, ok := d.wal.committed[pgno]; ok {
			return
		}
	}
	b := make([]byte, s.pageSize)
	if _, err := (walView{d: d}).ReadAt(b, int64(pgno-1)*int64(s.pageSize)); err != nil && err != io.EOF {
		s.err = fmt.Errorf("snapshot of %s: keep page %d before it changes: %w", d.Name, pgno, err)
		return
	}
	s.saved[pgno] = b
	s.kept++
}

// keepWALTx keeps the pages of a WAL transaction about to enter walView.
// Caller holds d.mu.
func (d *DB) keepWALTx(frames map[uint32]int64) {
	if s := d.snap; s != nil {
		for pgno := range frames {
			d.keepPage(s, pgno, true)
		}
	}
}

// keepFileRange keeps the pages of the database file bytes off to end
// before they are written, or cut off by a truncation (end < 0: to the
// end of the database). Caller holds d.mu.
func (d *DB) keepFileRange(off, end int64) {
	s := d.snap
	if s == nil {
		return
	}
	ps := int64(s.pageSize)
	last := uint32(s.pages)
	if end >= 0 {
		last = uint32((end + ps - 1) / ps)
	}
	d.keepForSnapshot(uint32(off/ps)+1, last, false)
}

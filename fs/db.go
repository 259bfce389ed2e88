package fs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"

	"github.com/meridian-db/meridian/ltx"
)

// Names of a database's backing files in its directory data_dir/dbs/<name>/.
const (
	databaseFile = "database"
	journalFile  = "journal"
	walFile      = "wal"
	shmFile      = "shm"
	logDir       = "ltx"
)

// SQLite's rollback journal starts with this magic once it is hot.
var journalMagic = []byte{0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7}

// DB is one database of the mount: its backing files and its LTX log.
//
// Capture works from the writes SQLite makes through the mount. In a
// rollback-journal mode the pages written to the database file are
// recorded, and the transaction is committed to the log when the journal is
// finalized (deleted, truncated to zero, or its header zeroed), before that
// operation reaches the disk: the LTX file is durable before SQLite's
// commit point. In WAL mode a transaction is committed to the log when its
// commit frame has been written, from the frames since the previous commit;
// its LTX file is written but not fsynced, since the frames are durable in
// the WAL (under synchronous=FULL) and recovery rebuilds the file from them.
// Files not yet synced are synced before the WAL is restarted, truncated or
// deleted, the only moments its frames stop being a copy.
type DB struct {
	Name string

	// Locks and ShmLocks are the POSIX advisory locks on the database file
	// and on its -shm file, held by apps through the mount and by the
	// daemon.
	Locks, ShmLocks LockTable

	dir    string
	log    *ltx.Log
	logger *slog.Logger

	mu    sync.Mutex // guards the fields below and orders writes to the backing files
	file  *os.File   // the backing database file, for reading pages
	dirty []span     // byte ranges of the database file written since the last commit
	wal   walState
}

// minPageSize is SQLite's smallest page size: it writes the database file
// only in whole pages, so in multiples of this at offsets aligned to it.
const minPageSize = 512

// errNotPages refuses a write to a database file that SQLite would never
// make, which could only tear pages.
var errNotPages = errors.New("not a write of whole database pages")

// span is a byte range [off, end) of a file.
type span struct{ off, end int64 }

// walState is what capture knows of the current WAL.
type walState struct {
	file      *os.File // the backing WAL, for reading frames; nil when absent
	hdr       walHeader
	valid     bool             // hdr holds a header written in this WAL generation
	committed map[uint32]int64 // page → offset of its latest committed frame
	mxFrame   int64            // frames up to the last commit
	tx        map[uint32]int64 // frames of the transaction being committed
	scanned   int64            // frames examined for commits
	// invalid is a commit frame whose transaction the log could not take,
	// made invalid to SQLite by zeroing its salts (kept in salts); -1 if
	// none.
	invalid int64
	salts   [8]byte
}

func (d *DB) path(name string) string { return filepath.Join(d.dir, name) }

// Log returns the database's LTX log.
func (d *DB) Log() *ltx.Log { return d.log }

// resetWAL forgets the WAL's frames: they are all in the database file.
// Caller holds d.mu.
func (d *DB) resetWAL() {
	d.wal.committed = map[uint32]int64{}
	d.wal.tx = nil
	d.wal.mxFrame = 0
	d.wal.scanned = 0
	d.wal.invalid = -1
	d.dirty = d.dirty[:0]
}

// walActive reports whether the database has committed frames in the WAL.
// Caller holds d.mu.
func (d *DB) walActive() bool { return d.wal.valid && d.wal.mxFrame > 0 }

// writeDatabase writes data at off in the database file through f.
// Caller holds d.mu.
func (d *DB) writeDatabase(f *os.File, data []byte, off int64) (int, error) {
	if off%minPageSize != 0 || len(data)%minPageSize != 0 {
		return 0, fmt.Errorf("%w: %d bytes at offset %d", errNotPages, len(data), off)
	}
	n, err := f.WriteAt(data, off)
	if n > 0 {
		d.addDirty(span{off, off + int64(n)})
	}
	return n, err
}

func (d *DB) addDirty(s span) {
	if k := len(d.dirty); k > 0 && d.dirty[k-1].end == s.off {
		d.dirty[k-1].end = s.end
		return
	}
	d.dirty = append(d.dirty, s)
}

// writeJournal writes data at off in the rollback journal through f. A
// zeroed header ends a transaction in PERSIST mode (and in exclusive
// locking mode): the transaction is committed to the log first.
// Caller holds d.mu.
func (d *DB) writeJournal(ctx context.Context, f *os.File, data []byte, off int64) (int, error) {
	if off == 0 && len(data) >= len(journalMagic) && isZero(data[:len(journalMagic)]) {
		if err := d.commitRollback(ctx); err != nil {
			return 0, err
		}
	}
	return f.WriteAt(data, off)
}

// endJournal is called before the journal is deleted or truncated to zero,
// the commit point of DELETE and TRUNCATE modes. Caller holds d.mu.
func (d *DB) endJournal(ctx context.Context) error { return d.commitRollback(ctx) }

// unlocked is called after a lock on the database file is released. With
// journal_mode=OFF or MEMORY no journal marks the end of a transaction;
// the writer giving up its lock does. Caller holds d.mu.
func (d *DB) unlocked(ctx context.Context) error {
	if len(d.dirty) == 0 || d.walActive() {
		return nil
	}
	if d.Locks.Held(reservedByte, reservedByte) {
		return nil // a writer is still in its transaction
	}
	if _, ok := d.Locks.Test(0, syscall.F_RDLCK, sharedFirst, sharedFirst+sharedSize-1); ok {
		return nil // a writer holds EXCLUSIVE
	}
	if _, err := os.Lstat(d.path(journalFile)); err == nil {
		return nil // the journal decides
	}
	return d.commitRollback(ctx)
}

// commitRollback records the pages written to the database file since the
// last commit as one transaction, unless they were written back unchanged
// (a rollback). Caller holds d.mu.
func (d *DB) commitRollback(ctx context.Context) error {
	if len(d.dirty) == 0 {
		return nil
	}
	fi, err := d.file.Stat()
	if err != nil {
		return err
	}
	if fi.Size() == 0 {
		d.dirty = d.dirty[:0]
		return nil
	}
	pageSize, err := ltx.ReadPageSize(d.file)
	if err != nil {
		return fmt.Errorf("database %s: %w", d.Name, err)
	}
	commit, err := databaseSize(d.file, fi.Size(), pageSize)
	if err != nil {
		return err
	}
	var pgnos []uint32
	ps := int64(pageSize)
	for _, s := range d.dirty {
		for p := s.off / ps; p*ps < s.end; p++ {
			pgnos = append(pgnos, uint32(p+1))
		}
	}
	info, err := d.log.Commit(ctx, ltx.Tx{
		DB:            d.file,
		PageSize:      pageSize,
		Commit:        commit,
		Pgnos:         pgnos,
		SkipUnchanged: true,
	})
	if err != nil {
		return err
	}
	d.dirty = d.dirty[:0]
	if info != nil {
		d.logger.Debug("commit", "txid", info.Header.MaxTXID, "pages", len(pgnos), "commit", info.Header.Commit)
	}
	return nil
}

// writeWAL writes data at off in the WAL through f and commits a
// transaction to the log once its commit frame is whole. A header write
// starts a new WAL generation: the files of the old one are synced first.
//
// The kernel splits writes at page boundaries, so a frame header may
// arrive in two writes: frames are examined in the backing file once a
// write has reached their end. SQLite writes a transaction's frames in
// order from the frame after the last commit, so a write before the
// examined frames (a rolled-back transaction's frames being overwritten, or
// a frame rewritten in place) moves the examination back.
// Caller holds d.mu.
func (d *DB) writeWAL(ctx context.Context, f *os.File, data []byte, off int64) (int, error) {
	if off == 0 {
		if err := d.syncLog(ctx); err != nil {
			return 0, err
		}
		d.resetWAL()
		d.wal.valid = false
		n, err := f.WriteAt(data, off)
		if err == nil && len(data) >= walHeaderSize {
			if h, herr := parseWALHeader(data); herr == nil {
				d.wal.hdr, d.wal.valid = h, true
			}
		}
		return n, err
	}
	n, err := f.WriteAt(data, off)
	if err != nil || !d.wal.valid || off < walHeaderSize {
		return n, err
	}
	h := d.wal.hdr
	if i := (off - walHeaderSize) / h.frameSize(); i < d.wal.scanned {
		d.wal.scanned = max(i, d.wal.mxFrame)
	}
	end := off + int64(n)
	if c := d.wal.invalid; c >= 0 {
		saltsAt := h.frameOffset(c) + 8
		switch {
		case off < saltsAt+8 && end > saltsAt:
			d.wal.invalid = -1 // SQLite wrote a new frame header there
		case c == d.wal.scanned && end >= h.frameOffset(c+1):
			// SQLite retries the rest of a short write that completed the
			// frame: it still means to commit, so try again.
			if _, err := d.wal.file.WriteAt(d.wal.salts[:], saltsAt); err != nil {
				return 0, err
			}
			d.wal.invalid = -1
		}
	}
	b := make([]byte, walFrameHeaderSize)
	for ; h.frameOffset(d.wal.scanned+1) <= end; d.wal.scanned++ {
		i := d.wal.scanned
		if _, err := d.wal.file.ReadAt(b, h.frameOffset(i)); err != nil {
			return 0, fmt.Errorf("read WAL frame %d: %w", i, err)
		}
		fh := parseWALFrameHeader(b)
		if fh.commit == 0 || fh.salt1 != h.salt1 || fh.salt2 != h.salt2 {
			continue
		}
		if err := d.commitWAL(ctx, i); err != nil {
			return 0, err
		}
	}
	return n, nil
}

// commitWAL records the transaction whose commit frame is frame c.
// Caller holds d.mu.
func (d *DB) commitWAL(ctx context.Context, c int64) error {
	h := d.wal.hdr
	first := d.wal.mxFrame
	tx := map[uint32]int64{}
	var commit uint32
	b := make([]byte, walFrameHeaderSize)
	for i := first; i <= c; i++ {
		off := h.frameOffset(i)
		if _, err := d.wal.file.ReadAt(b, off); err != nil {
			return fmt.Errorf("database %s: read WAL frame %d: %w", d.Name, i, err)
		}
		fh := parseWALFrameHeader(b)
		if fh.salt1 != h.salt1 || fh.salt2 != h.salt2 || fh.pgno == 0 {
			return fmt.Errorf("database %s: WAL frame %d does not belong to the current WAL", d.Name, i)
		}
		tx[fh.pgno], commit = off, fh.commit
	}
	d.wal.tx = tx
	defer func() { d.wal.tx = nil }()
	_, err := d.log.Commit(ctx, ltx.Tx{
		DB:       walView{d},
		PageSize: h.pageSize,
		Commit:   commit,
		Pgnos:    slices.Collect(maps.Keys(tx)),
		NoSync:   true,
		WAL: ltx.WALSegment{
			Offset: h.frameOffset(first),
			Size:   (c - first + 1) * h.frameSize(),
			Salt1:  h.salt1,
			Salt2:  h.salt2,
		},
	})
	if err != nil {
		// SQLite must not find this commit frame valid later (in recovery
		// after the app dies), or the database would hold a transaction
		// the log does not. If SQLite retries the write, the salts are
		// put back and the commit tried again.
		var zero [8]byte
		if _, rerr := d.wal.file.ReadAt(d.wal.salts[:], h.frameOffset(c)+8); rerr != nil {
			d.logger.Error("invalidate WAL commit frame after a failed commit", "frame", c, "err", rerr)
		} else if _, werr := d.wal.file.WriteAt(zero[:], h.frameOffset(c)+8); werr != nil {
			d.logger.Error("invalidate WAL commit frame after a failed commit", "frame", c, "err", werr)
		} else {
			d.wal.invalid = c
		}
		return err
	}
	maps.Copy(d.wal.committed, tx)
	d.wal.mxFrame = c + 1
	d.wal.scanned = max(d.wal.scanned, c+1)
	return nil
}

// endWAL is called before the WAL is truncated or deleted, which SQLite
// does only once every frame is in the database file. Caller holds d.mu.
func (d *DB) endWAL(ctx context.Context, size int64) error {
	if err := d.syncLog(ctx); err != nil {
		return err
	}
	d.resetWAL()
	if size < walHeaderSize {
		d.wal.valid = false
	}
	return nil
}

// syncLog makes the log's files durable. Caller holds d.mu.
func (d *DB) syncLog(ctx context.Context) error {
	if err := d.log.Sync(ctx); err != nil {
		return fmt.Errorf("database %s: %w", d.Name, err)
	}
	return nil
}

// walView reads the database as SQLite sees it in WAL mode: the latest
// committed frame of a page, else the database file. Caller holds d.mu.
type walView struct{ d *DB }

func (v walView) ReadAt(p []byte, off int64) (int, error) {
	d := v.d
	if d.wal.valid && len(p) > 0 {
		ps := int64(d.wal.hdr.pageSize)
		pgno := uint32(off/ps + 1)
		frame, ok := d.wal.tx[pgno]
		if !ok {
			frame, ok = d.wal.committed[pgno]
		}
		if ok && (off%ps)+int64(len(p)) <= ps {
			return d.wal.file.ReadAt(p, frame+walFrameHeaderSize+off%ps)
		}
	}
	return d.file.ReadAt(p, off)
}

// Size returns the database size: the commit size of the last committed
// WAL transaction, else the file's.
func (v walView) Size() (int64, error) {
	d := v.d
	if d.walActive() {
		b := make([]byte, walFrameHeaderSize)
		if _, err := d.wal.file.ReadAt(b, d.wal.hdr.frameOffset(d.wal.mxFrame-1)); err != nil {
			return 0, err
		}
		return int64(parseWALFrameHeader(b).commit) * int64(d.wal.hdr.pageSize), nil
	}
	fi, err := d.file.Stat()
	if err != nil || fi.Size() == 0 {
		return 0, err
	}
	pageSize, err := ltx.ReadPageSize(d.file)
	if err != nil {
		return 0, err
	}
	pages, err := databaseSize(d.file, fi.Size(), pageSize)
	return int64(pages) * int64(pageSize), err
}

// databaseSize returns the size in pages of the database in f, of size
// bytes: the size in its header when the header says it is valid (SQLite
// truncates a shrunk file only after the commit point), else the file's.
func databaseSize(f io.ReaderAt, size int64, pageSize uint32) (uint32, error) {
	var hdr [100]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return 0, fmt.Errorf("read database header: %w", err)
	}
	pages := uint32(size / int64(pageSize))
	inHeader := binary.BigEndian.Uint32(hdr[28:])
	valid := binary.BigEndian.Uint32(hdr[24:]) == binary.BigEndian.Uint32(hdr[92:])
	if valid && inHeader != 0 && inHeader <= pages {
		return inHeader, nil
	}
	return pages, nil
}

var _ ltx.Database = walView{}

// openWALFile opens the backing WAL for reading frames, if it exists.
// Caller holds d.mu.
func (d *DB) openWALFile() error {
	if d.wal.file != nil {
		return nil
	}
	f, err := os.OpenFile(d.path(walFile), os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	d.wal.file = f
	return nil
}

// closeFiles closes the backing files capture reads.
func (d *DB) closeFiles() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.wal.file != nil {
		_ = d.wal.file.Close()
		d.wal.file = nil
	}
	if d.file != nil {
		_ = d.file.Close()
		d.file = nil
	}
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

var _ io.ReaderAt = walView{}

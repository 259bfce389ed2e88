package fs

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/meridian-db/meridian/ltx"
)

// walState is what capture knows of the current WAL.
type walState struct {
	file      *os.File // the backing WAL, for reading frames; nil when absent
	hdr       walHeader
	valid     bool             // hdr holds a header written in this WAL generation
	committed map[uint32]int64 // page → offset of its latest committed frame
	mxFrame   int64            // frames up to the last commit
	pgnos     []uint32         // page of each frame scanned since the last commit

	// passthrough: the kernel writes the WAL without the daemon. Either
	// way the daemon finds commits by scanning it (see scanWAL), with the
	// checksum after the last commit in sum1, sum2.
	passthrough bool
	sum1, sum2  uint32
	sumAt       int64  // the frame count sum1, sum2 are for; -1: not known
	frame       []byte // scan buffer

	// uncommitted is the transaction a scan found whole in the WAL,
	// commit frame included, past the wal-index's last frame, while its
	// fate was open (see scanWAL).
	uncommitted uncommittedTx

	// precommitted is the frame count up to the end of the transactions
	// taken into the log at their writer's fsync, before the wal-index
	// counts them (sync durability: see precommitWAL); 0 when none
	// waits for the wal-index.
	precommitted int64
}

// uncommittedTx is a transaction found in the WAL that SQLite has not
// committed: frames first to last, and the checksum chain after its
// commit frame, which tells it from another transaction written over it
// that ends at the same frame.
type uncommittedTx struct {
	found       bool
	first, last int64
	sum1, sum2  uint32
}

// resetWAL forgets the WAL's frames: they are all in the database file.
// Caller holds d.mu.
func (d *DB) resetWAL() {
	d.wal.committed = map[uint32]int64{}
	d.wal.mxFrame = 0
	d.wal.sumAt = -1
	d.wal.pgnos = d.wal.pgnos[:0]
	d.wal.uncommitted = uncommittedTx{}
	d.wal.precommitted = 0
	d.clearDirty()
}

// walActive reports whether the database has committed frames in the WAL.
// Caller holds d.mu.
func (d *DB) walActive() bool { return d.wal.valid && d.wal.mxFrame > 0 }

// writeWAL writes data at off in the WAL through f, for an app whose WAL
// is not written by passthrough. A header write starts a new WAL
// generation: the files of the old one are synced first. Transactions are
// taken by scanWAL, as with passthrough, once the wal-index counts them:
// a commit frame written is not yet a commit. With kernel locks the daemon
// sees no end of a write transaction, so a write schedules a scan.
// Caller holds d.mu.
func (d *DB) writeWAL(ctx context.Context, f *os.File, data []byte, off int64) (int, error) {
	if off == 0 {
		if err := d.scanWAL(ctx); err != nil {
			return 0, err
		}
		if err := d.drain(); err != nil {
			return 0, err
		}
		if err := d.syncLog(ctx); err != nil {
			return 0, err
		}
		d.writtenOver(d.wal.uncommitted, "the WAL was restarted")
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
	if err == nil && d.kernelLocks {
		d.scanLater()
	}
	return n, err
}

// walCommit is a transaction SQLite committed in the WAL.
type walCommit struct {
	frames map[uint32]int64 // page → offset of its frame in the transaction
	commit uint32           // database size in pages after it
	seg    ltx.WALSegment
	time   time.Time // when SQLite committed it
	txid   ltx.TXID  // the TXID its LTX file gets, once queued
}

// newWALCommit describes the transaction in frames first to last of the
// current WAL. Caller holds d.mu.
func (d *DB) newWALCommit(first, last int64, commit uint32, frames map[uint32]int64) walCommit {
	h := d.wal.hdr
	return walCommit{
		frames: frames,
		commit: commit,
		time:   time.Now(),
		seg: ltx.WALSegment{
			Offset: h.frameOffset(first),
			Size:   (last - first + 1) * h.frameSize(),
			Salt1:  h.salt1,
			Salt2:  h.salt2,
		},
	}
}

// maxQueue bounds the WAL transactions waiting for their LTX files; a
// writer that gets this far ahead waits.
const maxQueue = 1024

// committedWAL takes the transaction whose commit frame the wal-index
// counts, the last of the frames scanned since the previous commit. It is
// queued for the worker, which writes its LTX file off the app's commit
// path: until the WAL is reset, the frames are the transaction's durable
// copy. The first transaction of a log, which holds every page, is
// recorded at once. Caller holds d.mu.
func (d *DB) committedWAL(ctx context.Context, commit uint32) error {
	h := d.wal.hdr
	first := d.wal.mxFrame
	if len(d.wal.pgnos) == 1 && first > 0 {
		if pad, err := isPadding(d.wal.file, h, first); err != nil {
			return err
		} else if pad {
			d.wal.mxFrame, d.wal.pgnos = first+1, d.wal.pgnos[:0]
			return nil
		}
	}
	frames := make(map[uint32]int64, len(d.wal.pgnos))
	for k, pgno := range d.wal.pgnos {
		frames[pgno] = h.frameOffset(first + int64(k))
	}
	last := first + int64(len(d.wal.pgnos)) - 1
	tx := d.newWALCommit(first, last, commit, frames)
	if d.log.Pos().TXID == 0 || h.pageSize != d.pageSize {
		if err := d.drain(); err != nil {
			return err
		}
		if err := d.logWALTx(ctx, tx); err != nil {
			return err
		}
		d.loggedWALTx(tx)
		d.committed = commitMark{d.committed.n + 1, d.log.Pos().TXID}
	} else {
		// Wait for room, even while the worker is failing: the frames are
		// on disk, so failing this write would leave SQLite a commit it
		// would find again in recovery.
		for len(d.queue) >= maxQueue {
			d.cond.Wait()
		}
		// The worker writes the queue in order: this transaction's TXID
		// follows the last queued, or the log's position if none is.
		txid := d.log.Pos().TXID + 1
		if len(d.queue) > 0 {
			txid = d.queue[len(d.queue)-1].txid + 1
		}
		tx.txid = txid
		d.committed = commitMark{d.committed.n + 1, txid}
		d.queue = append(d.queue, tx)
		d.cond.Broadcast()
	}
	d.wal.mxFrame, d.wal.pgnos = last+1, d.wal.pgnos[:0]
	return nil
}

// logWALTx records tx in the log, reading its pages from the WAL. Either
// the caller holds d.mu and the worker is idle, or the caller is the
// worker: the WAL state it reads changes only when both hold.
func (d *DB) logWALTx(ctx context.Context, tx walCommit) error {
	pageSize := d.wal.hdr.pageSize
	cs := d.beginCommit(tx.time)
	info, err := d.log.Commit(ctx, ltx.Tx{
		DB:        walView{d, tx.frames},
		PageSize:  pageSize,
		Commit:    tx.commit,
		Pgnos:     slices.Collect(maps.Keys(tx.frames)),
		Timestamp: tx.time,
		NoSync:    true,
		WAL:       tx.seg,
	})
	d.endCommit(cs, len(tx.frames), info)
	return err
}

// loggedWALTx updates the WAL state once tx is in the log. Caller holds
// d.mu.
func (d *DB) loggedWALTx(tx walCommit) {
	d.keepWALTx(tx.frames)
	maps.Copy(d.wal.committed, tx.frames)
	d.pageSize = d.wal.hdr.pageSize
}

// endWAL is called before the WAL is truncated or deleted, which SQLite
// does only once every frame is in the database file. Caller holds d.mu.
func (d *DB) endWAL(ctx context.Context, size int64) error {
	if err := d.scanWAL(ctx); err != nil {
		return err
	}
	if err := d.drain(); err != nil {
		return err
	}
	if err := d.syncLog(ctx); err != nil {
		return err
	}
	if d.wal.valid && size >= walHeaderSize && size >= d.wal.hdr.frameOffset(d.wal.mxFrame) {
		// journal_size_limit: SQLite trims a WAL past its frames after a
		// restart; the frames of this generation stay.
		return nil
	}
	d.resetWAL()
	if size < walHeaderSize {
		d.wal.valid = false
	}
	return nil
}

// syncWAL fsyncs the WAL through f, as SQLite asks at every commit under
// synchronous=FULL, then takes what it committed if the WAL is written by
// passthrough. With precommit, the fsync is the WAL writer's, at its
// commit: the transaction it ends is taken too (see precommitWAL).
func (d *DB) syncWAL(f *os.File, datasync, precommit bool) error {
	var err error
	if datasync {
		err = syscall.Fdatasync(int(f.Fd()))
	} else {
		err = f.Sync()
	}
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.scan(context.Background(), precommit)
}

// Sync durability in WAL mode: a transaction taken at its writer's fsync.
//
// SQLite's commit point in WAL mode is the wal-index, which the writer
// updates in shared memory after its fsync (synchronous=FULL), without
// asking the mount. A commit held at the release of the WAL write lock
// is past it: if the daemon dies there, or the node steps down, SQLite
// takes the failed unlock for nothing and the app's COMMIT returns
// success for a transaction no replica acknowledged. So under sync
// durability, when the writer fsyncs the WAL at its commit (the fsync's
// caller is the process that holds the WAL write lock), the transaction
// it wrote, commit frame included, is taken into the log then, before
// the wal-index counts it, and the fsync waits for the replicas. If they
// acknowledge, SQLite commits it as usual. If the wait fails, or the
// daemon dies, the fsync fails and SQLite does not update the wal-index;
// yet the frames are durable and whole, and the log holds the
// transaction, so it must stay committed: when the writer gives up the
// WAL write lock (the mount holds any other writer off until then) and
// the wal-index still does not count the frames, the daemon marks the
// wal-index header uninitialized, and the next connection to read it
// rebuilds it from the WAL, as SQLite's recovery does after a crash,
// which counts them. A daemon that died leaves that to the restart: the
// first connection of a new mount rebuilds the wal-index from the WAL,
// and capture takes the frames as recovery does.

// precommitWAL reports whether an fsync of d's WAL by thread caller is its
// writer's, at a commit that sync durability must hold before SQLite's
// commit point: the WAL write lock is held by caller's process and the
// daemon can reach the wal-index to rebuild it (the -shm passed through).
func (d *DB) precommitWAL(caller uint32) bool {
	if !d.shmPassthrough.Load() || d.kernelLocks {
		return false
	}
	for _, l := range d.ShmLocks.Locks() {
		if l.Typ == syscall.F_WRLCK && l.Start <= walLockOffset && walLockOffset <= l.End {
			return sameProcess(l.Pid, caller)
		}
	}
	return false
}

// sameProcess reports whether thread tid belongs to process pid.
func sameProcess(pid, tid uint32) bool {
	if pid == 0 || tid == 0 {
		return false
	}
	if pid == tid {
		return true
	}
	_, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", pid, tid))
	return err == nil
}

// settlePrecommitted is called once the writer of transactions taken at
// its fsync gives up the WAL write lock: if the wal-index does not count
// them (the fsync failed, or the writer died before its update), the
// wal-index header is marked uninitialized, so that the next connection
// rebuilds it from the WAL and counts them, as the log does. Caller holds
// d.mu.
func (d *DB) settlePrecommitted() {
	w := &d.wal
	if w.precommitted == 0 {
		return
	}
	end := w.precommitted
	w.precommitted = 0
	limit, gated, err := d.walIndexLimit()
	if err != nil {
		d.logger.Error("read the wal-index after a commit taken at its fsync", "err", err)
	}
	if err == nil && (!gated || limit >= end) {
		return // counted, or no wal-index: the frames decide
	}
	if err := uninitWalIndex(d.path(shmFile)); err != nil {
		d.logger.Error("a transaction in the log is not in the wal-index, and the wal-index could not be marked for recovery: readers do not see it until SQLite recovers the WAL",
			"frames", end, "err", err)
		return
	}
	d.logger.Warn("a transaction taken into the log at its writer's WAL fsync was not committed by the writer (its fsync failed or it died): the wal-index is marked for recovery, which commits it from the WAL, as the log has it",
		"wal_index_frames", limit, "logged_frames", end)
}

// walView reads the database as SQLite sees it in WAL mode: the latest
// committed frame of a page, else the database file. Caller holds d.mu.
type walView struct {
	d  *DB
	tx map[uint32]int64 // frames of the transaction being recorded
}

func (v walView) ReadAt(p []byte, off int64) (int, error) {
	d := v.d
	if ps := int64(d.wal.hdr.pageSize); d.wal.valid && ps > 0 && (off%ps)+int64(len(p)) > ps {
		// Several pages (a snapshot reads in large blocks): each may be
		// in the WAL.
		n := 0
		for n < len(p) {
			end := min(len(p), n+int(ps-(off+int64(n))%ps))
			m, err := v.ReadAt(p[n:end], off+int64(n))
			n += m
			if err != nil {
				return n, err
			}
		}
		return n, nil
	}
	if d.wal.valid && len(p) > 0 {
		ps := int64(d.wal.hdr.pageSize)
		pgno := uint32(off/ps + 1)
		frame, ok := v.tx[pgno]
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
	pageSize, pages, err := databaseSize(d.file, fi.Size())
	return int64(pages) * int64(pageSize), err
}

var _ ltx.Database = walView{}

// openWALFile opens the backing WAL for reading frames, if it exists.
// Caller holds d.mu.
func (d *DB) openWALFile() error {
	if d.wal.file != nil {
		return nil
	}
	f, err := os.OpenFile(d.path(walFile), os.O_RDWR, 0)
	if errors.Is(err, syscall.EPERM) {
		// Left immutable by a read-only daemon that stopped (see fenceWAL).
		if err = unfence(d.path(walFile)); err == nil {
			f, err = os.OpenFile(d.path(walFile), os.O_RDWR, 0)
		}
	}
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	d.wal.file = f
	return nil
}

// createWAL creates an empty WAL at path if there is none. One that is
// there is left for openWALFile, which lifts a fence a stopped daemon
// left on it.
func createWAL(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if errors.Is(err, os.ErrExist) {
		return nil
	} else if err != nil {
		return err
	}
	return f.Close()
}

// unfence clears the immutable flag of the file at path.
func unfence(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	return setImmutable(f, false)
}

// ensureWAL creates an empty WAL for a WAL-mode database that has none. A
// read-only SQLite connection cannot create the WAL, and without one it
// cannot open a WAL-mode database at all; an empty WAL changes nothing it
// reads.
func (d *DB) ensureWAL() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !walMode(d.file) {
		return nil
	}
	if err := createWAL(d.path(walFile)); err != nil {
		return err
	}
	return d.openWALFile()
}

package fs

import (
	"bytes"
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
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/meridian-db/meridian/internal/durable"
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
// commit point. In WAL mode a transaction is taken once the wal-index
// counts its commit frame (see scanWAL), from the frames since the
// previous commit, and queued:
// the database's worker writes its LTX file, in order, off the app's commit
// path, and does not fsync it, since the frames are durable in the WAL
// (under synchronous=FULL) and recovery rebuilds missing files from them.
// The queue is written and the log synced before the WAL is restarted,
// truncated or deleted, the only moments its frames stop being a copy, and
// before a checkpoint writes the database file, so the file is never ahead
// of the log, even after a power failure.
type DB struct {
	Name string

	// Locks and ShmLocks are the POSIX advisory locks on the database file
	// and on its -shm file, held by apps through the mount and by the
	// daemon.
	Locks, ShmLocks LockTable

	flocks, shmFlocks LockTable // flock(2) locks, apart from POSIX ones

	dir    string
	log    *ltx.Log
	logger *slog.Logger

	snapMu sync.Mutex   // held while a snapshot is read: one at a time
	mu     sync.Mutex   // guards the fields below and orders writes to the backing files
	cond   *sync.Cond   // on mu: the queue or the worker's state changed
	file   *os.File     // the backing database file, for reading pages
	dirty  []span       // byte ranges of the database file written since the last commit
	snap   *snapshotCOW // the snapshot being read, if any (snapshot.go)
	// snapKept counts the pages snapshots kept before a change.
	snapKept int
	// hasDirty is whether dirty is not empty, readable without mu: every
	// unlock of the database file asks, and readers unlock all the time.
	hasDirty atomic.Bool
	dirtyGen uint64 // counts writes to dirty
	// prepared is the LTX file of the pages in dirty, written when SQLite
	// fsynced the database file, if dirty has not changed since
	// (preparedGen).
	prepared    *ltx.Prepared
	preparedGen uint64
	wal         walState
	pageSize    uint32      // page size of the log's last transaction
	queue       []walCommit // WAL transactions whose LTX files the worker has yet to write
	busy        bool        // the worker is writing queue[0]
	werr        error       // why the worker's last attempt failed
	failures    int         // attempts that failed
	kick        bool        // retry now
	stopping    bool
	done        sync.WaitGroup // the worker

	// dirDirty: a file was created or deleted in dir since it was last
	// fsynced.
	dirDirty atomic.Bool

	// committed counts the transactions committed (logged, or queued for
	// the worker) while the daemon runs, with the TXID of the last: an
	// app's operation that moves it is held by the FileSystem's commit
	// wait. Guarded by mu.
	committed commitMark
	// walHeld is where commits stood at the last release of the WAL write
	// lock, which the commit wait holds for every WAL transaction
	// committed since. Guarded by mu.
	walHeld commitMark

	noJournalLogged time.Time // when a write without a journal was last logged; guarded by mu

	// shmPassthrough: the -shm is served by passthrough, so the daemon
	// reads the wal-index as SQLite writes it in the backing file.
	// Otherwise shmNode is the -shm's node, whose pages SQLite writes in
	// the kernel's page cache, which retrieve reads (see walIndexLimit).
	shmPassthrough atomic.Bool
	shmNode        atomic.Uint64
	retrieve       func(node uint64, off int64, dest []byte) (int, fuse.Status)
	// kernelLocks: the kernel implements SQLite's locks; the daemon sees
	// no end of a write transaction.
	kernelLocks bool
	// rescan is set while a scan found a commit frame past the wal-index's
	// last frame and a later scan is due; guarded by mu.
	rescan     *time.Timer
	rescanWait time.Duration // the wait before the last rescan; 0 after a scan that deferred nothing

	// torn is set while an apply that failed part way keeps the readers
	// out (see ApplyFiles).
	torn atomic.Pointer[tornApply]
	// holdFree is when, in Unix nanoseconds, the next kernel-locks hold
	// of the readers may begin (see holdReadersKernel).
	holdFree atomic.Int64

	// applied is what the applier knows of a WAL it writes as frames
	// (see apply_wal.go), walGenerations how many it started, walFenced
	// whether the backing WAL is immutable (fenceWAL); guarded by mu.
	// dmsHolder is the lock holder holding the -shm's DMS byte for the
	// applier.
	applied        appliedWAL
	walGenerations uint64
	walFenced      bool
	dmsHolder      atomic.Pointer[lockHolder]
	// shmResized tells the kernel that the backing -shm changed size
	// (see growShm); nil outside a mount.
	shmResized func()
}

// commitMark is where a database's commits stand.
type commitMark struct {
	n    uint64
	txid ltx.TXID
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

func (d *DB) path(name string) string { return filepath.Join(d.dir, name) }

// Log returns the database's LTX log.
func (d *DB) Log() *ltx.Log { return d.log }

// resetWAL forgets the WAL's frames: they are all in the database file.
// Caller holds d.mu.
func (d *DB) resetWAL() {
	d.wal.committed = map[uint32]int64{}
	d.wal.mxFrame = 0
	d.wal.sumAt = -1
	d.wal.pgnos = d.wal.pgnos[:0]
	d.wal.uncommitted = uncommittedTx{}
	d.clearDirty()
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
	// A checkpoint must not put transactions in the database file before
	// they are in the log, durably: recovery reads the database file plus
	// the WAL from the log's position, and a power failure may empty LTX
	// files never fsynced while the kernel has written these pages.
	if err := d.scanWAL(context.Background()); err != nil {
		return 0, err
	}
	if err := d.drain(); err != nil {
		return 0, err
	}
	if d.walActive() {
		if err := d.syncLog(context.Background()); err != nil {
			return 0, err
		}
	}
	if len(d.dirty) == 0 && d.unjournaled() {
		return 0, errNoJournal
	}
	d.keepFileRange(off, off+int64(len(data)))
	n, err := f.WriteAt(data, off)
	if n > 0 {
		d.addDirty(span{off, off + int64(n)})
	}
	return n, err
}

// errNoJournal refuses the writes of journal_mode=MEMORY and OFF. No file
// marks such a transaction's end, and nothing can roll back one cut short
// (a writer killed half-way leaves half its pages in the database file):
// the log would take it as committed.
var errNoJournal = errors.New("journal_mode=MEMORY and OFF are not supported: a transaction cut short could not be told from a committed one")

// unjournaled reports whether SQLite is writing the database file without
// a rollback journal: a writer holds EXCLUSIVE, the file is not in WAL
// mode and no journal exists. In DELETE, TRUNCATE and PERSIST modes SQLite
// creates the journal before it writes the database file; checkpoints in
// WAL mode write it without one, and so does a program copying a database
// in (cp), which takes no lock. With kernel locks the mount sees no lock
// and cannot tell. Caller holds d.mu.
func (d *DB) unjournaled() bool {
	if _, exclusive := d.Locks.Test(0, syscall.F_RDLCK, sharedFirst, sharedFirst+sharedSize-1); !exclusive {
		return false
	}
	if walMode(d.file) {
		return false
	}
	return !d.journalExists()
}

func (d *DB) addDirty(s span) {
	d.hasDirty.Store(true)
	d.dirtyGen++
	if k := len(d.dirty); k > 0 && d.dirty[k-1].end == s.off {
		d.dirty[k-1].end = s.end
		return
	}
	d.dirty = append(d.dirty, s)
}

// clearDirty forgets the recorded writes. Caller holds d.mu.
func (d *DB) clearDirty() {
	d.dirty = d.dirty[:0]
	d.hasDirty.Store(false)
	if d.prepared != nil {
		d.prepared.Abort()
		d.prepared = nil
	}
}

// writeJournal writes data at off in the rollback journal through f. A
// zeroed header ends a transaction in PERSIST mode (and in exclusive
// locking mode): the transaction is committed to the log first.
// Caller holds d.mu.
func (d *DB) writeJournal(ctx context.Context, f *os.File, data []byte, off int64) (int, error) {
	if off == 0 && len(data) >= len(journalMagic) && binary.BigEndian.Uint64(data) == 0 {
		if err := d.commitRollback(ctx); err != nil {
			return 0, err
		}
	}
	return f.WriteAt(data, off)
}

// endJournal is called before the journal is deleted or truncated to zero,
// the commit point of DELETE and TRUNCATE modes. Caller holds d.mu.
func (d *DB) endJournal(ctx context.Context) error { return d.commitRollback(ctx) }

// unlocked is called after a lock on the database file is released. A
// program that wrote the database file without a journal (a copy made
// under SQLite's locks; SQLite's own journal_mode=MEMORY and OFF are
// refused, see unjournaled) has made its change when it gives up its
// lock. Caller holds d.mu.
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
// (a rollback). Its LTX file may have been prepared when SQLite fsynced
// the database file. Caller holds d.mu.
func (d *DB) commitRollback(ctx context.Context) error {
	if len(d.dirty) == 0 {
		return nil
	}
	if err := d.drain(); err != nil {
		return err
	}
	if p := d.prepared; p != nil && d.preparedGen == d.dirtyGen {
		d.prepared = nil
		info, err := p.Commit()
		if err == nil {
			d.committedRollback(info)
			return nil
		}
		d.logger.Warn("prepared LTX file not committed; writing it again", "err", err)
	}
	tx, ok, err := d.rollbackTx()
	if err != nil || !ok {
		return err
	}
	info, err := d.log.Commit(ctx, tx)
	if err != nil {
		return err
	}
	d.committedRollback(info)
	return nil
}

// committedRollback records that the pages written since the last commit
// are in the log as info, or were unchanged if info is nil. Caller holds
// d.mu.
func (d *DB) committedRollback(info *ltx.FileInfo) {
	d.clearDirty()
	if info != nil {
		d.committed = commitMark{d.committed.n + 1, info.Header.MaxTXID}
		d.pageSize = info.Header.PageSize
		d.logger.Debug("commit", "txid", info.Header.MaxTXID, "commit", info.Header.Commit, "bytes", info.Size)
	}
}

// rollbackTx describes the transaction made of the pages written to the
// database file since the last commit; ok is false if the file is empty
// (nothing to record). Caller holds d.mu.
func (d *DB) rollbackTx() (tx ltx.Tx, ok bool, err error) {
	fi, err := d.file.Stat()
	if err != nil {
		return tx, false, err
	}
	if fi.Size() == 0 {
		d.clearDirty()
		return tx, false, nil
	}
	pageSize, commit, err := databaseSize(d.file, fi.Size())
	if err != nil {
		return tx, false, fmt.Errorf("database %s: %w", d.Name, err)
	}
	var pgnos []uint32
	ps := int64(pageSize)
	for _, s := range d.dirty {
		for p := s.off / ps; p*ps < s.end; p++ {
			pgnos = append(pgnos, uint32(p+1))
		}
	}
	return ltx.Tx{
		DB:            d.file,
		PageSize:      pageSize,
		Commit:        commit,
		Pgnos:         pgnos,
		SkipUnchanged: true,
		// The file is fsynced before SQLite's commit point (the journal's
		// deletion); the directory is not, as SQLite does not fsync it
		// after deleting the journal under synchronous=FULL. Under EXTRA
		// it does, and FsyncDir syncs the log's directory then.
		NoSyncDir: true,
	}, true, nil
}

// syncDatabase fsyncs the database file through f, as SQLite asks once it
// has written a transaction's pages and before it deletes (or truncates,
// or zeroes) the journal. In a rollback-journal mode the transaction's LTX
// file is written and fsynced meanwhile, to be renamed into the log at the
// commit point; if the transaction goes on writing instead, it is written
// again then. Caller does not hold d.mu.
func (d *DB) syncDatabase(f *os.File, datasync bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var (
		wg       sync.WaitGroup
		prepared *ltx.Prepared
		perr     error
	)
	if d.prepared != nil && d.preparedGen != d.dirtyGen {
		d.prepared.Abort()
		d.prepared = nil
	}
	if d.prepared == nil && len(d.dirty) > 0 && !d.walActive() && d.journalExists() && d.drain() == nil {
		if tx, ok, err := d.rollbackTx(); err == nil && ok {
			gen := d.dirtyGen
			wg.Go(func() { prepared, perr = d.log.Prepare(context.Background(), tx) })
			defer func() {
				if prepared != nil {
					d.prepared, d.preparedGen = prepared, gen
				}
			}()
		}
	}
	var err error
	if datasync {
		err = syscall.Fdatasync(int(f.Fd()))
	} else {
		err = f.Sync()
	}
	wg.Wait()
	if err == nil && d.wal.passthrough && d.walActive() {
		// The end of a checkpoint: once SQLite has recorded it, it may
		// restart the WAL, which passthrough does not show the daemon.
		if err = d.scanWAL(context.Background()); err == nil {
			if err = d.drain(); err == nil {
				err = d.syncLog(context.Background())
			}
		}
	}
	if perr != nil {
		d.logger.Debug("prepare LTX file at the database's fsync", "err", perr)
	}
	return err
}

// journalExists reports whether the database has a rollback journal.
func (d *DB) journalExists() bool {
	_, err := os.Lstat(d.path(journalFile))
	return err == nil
}

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
	_, err := d.log.Commit(ctx, ltx.Tx{
		DB:        walView{d, tx.frames},
		PageSize:  pageSize,
		Commit:    tx.commit,
		Pgnos:     slices.Collect(maps.Keys(tx.frames)),
		Timestamp: tx.time,
		NoSync:    true,
		WAL:       tx.seg,
	})
	return err
}

// loggedWALTx updates the WAL state once tx is in the log. Caller holds
// d.mu.
func (d *DB) loggedWALTx(tx walCommit) {
	d.keepWALTx(tx.frames)
	maps.Copy(d.wal.committed, tx.frames)
	d.pageSize = d.wal.hdr.pageSize
}

// run is the database's worker: it writes the LTX files of queued WAL
// transactions, in order. A failure (a full disk) is retried, with the
// error kept in d.werr so that whoever waits for the queue fails instead
// of waiting: the transaction is committed in SQLite and stays in the WAL,
// which cannot be reset until its file is written.
func (d *DB) run(ctx context.Context) {
	d.mu.Lock()
	defer d.mu.Unlock()
	backoff := 10 * time.Millisecond
	for {
		for len(d.queue) == 0 && !d.stopping {
			d.cond.Wait()
		}
		if len(d.queue) == 0 {
			return
		}
		tx := d.queue[0]
		d.busy = true
		d.mu.Unlock()
		err := d.logWALTx(ctx, tx)
		d.mu.Lock()
		d.busy = false
		if err != nil {
			if d.werr == nil {
				d.logger.Error("write LTX file of a WAL transaction; retrying", "err", err)
			}
			d.werr = err
			d.failures++
			d.cond.Broadcast()
			if d.stopping {
				return
			}
			d.pause(backoff)
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		if d.werr != nil {
			d.logger.Info("LTX files are being written again")
		}
		d.loggedWALTx(tx)
		d.werr, backoff = nil, 10*time.Millisecond
		d.queue = d.queue[1:]
		d.cond.Broadcast()
	}
}

// pause waits for d, or until someone waiting for the queue kicks the
// worker or it is stopped. Caller (the worker) holds d.mu.
func (d *DB) pause(d0 time.Duration) {
	deadline := time.Now().Add(d0)
	t := time.AfterFunc(d0, func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.cond.Broadcast()
	})
	defer t.Stop()
	for time.Now().Before(deadline) && !d.kick && !d.stopping {
		d.cond.Wait()
	}
	d.kick = false
}

// drain waits until the worker has written every queued transaction. If
// the worker is failing, it has the worker try once more and returns the
// error if that fails too. Caller holds d.mu.
func (d *DB) drain() error {
	start := d.failures
	for len(d.queue) > 0 || d.busy {
		if d.werr != nil {
			if d.failures > start {
				return d.werr
			}
			d.kick = true
			d.cond.Broadcast()
		}
		d.cond.Wait()
	}
	return nil
}

// Flush waits until every transaction SQLite has committed is in the log.
func (d *DB) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.scanWAL(context.Background()); err != nil {
		return err
	}
	return d.drain()
}

// stop ends the worker once the queue is written (or it fails).
func (d *DB) stop() {
	d.mu.Lock()
	d.stopping = true
	if d.rescan != nil {
		d.rescan.Stop()
		d.rescan = nil
	}
	d.cond.Broadcast()
	d.mu.Unlock()
	d.done.Wait()
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
// passthrough.
func (d *DB) syncWAL(f *os.File, datasync bool) error {
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
	return d.scanWAL(context.Background())
}

// syncDir makes the creation and deletion of d's files durable, as an
// fsync of the mount's directory asks: its journal, WAL and log files. The
// two directories are synced at once.
func (d *DB) syncDir() error {
	var dirErr error
	var wg sync.WaitGroup
	if d.dirDirty.Swap(false) {
		wg.Go(func() {
			if dirErr = durable.SyncDir(d.dir); dirErr != nil {
				d.dirDirty.Store(true)
			}
		})
	}
	err := d.log.Sync(context.Background())
	wg.Wait()
	return errors.Join(err, dirErr)
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

// databaseSize reads the header of the database in f, of size bytes, and
// returns its page size and its size in pages: the size in the header when
// the header says it is valid (SQLite truncates a shrunk file only after
// the commit point), else the file's.
func databaseSize(f io.ReaderAt, size int64) (pageSize, pages uint32, err error) {
	var hdr [100]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return 0, 0, fmt.Errorf("read database header: %w", err)
	}
	if pageSize, err = ltx.ReadPageSize(bytes.NewReader(hdr[:])); err != nil {
		return 0, 0, err
	}
	pages = uint32(size / int64(pageSize))
	inHeader := binary.BigEndian.Uint32(hdr[28:])
	valid := binary.BigEndian.Uint32(hdr[24:]) == binary.BigEndian.Uint32(hdr[92:])
	if valid && inHeader != 0 && inHeader <= pages {
		return pageSize, inHeader, nil
	}
	return pageSize, pages, nil
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

// closeFiles closes the backing files capture reads.
func (d *DB) closeFiles() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.prepared != nil {
		d.prepared.Abort()
		d.prepared = nil
	}
	if d.wal.file != nil {
		_ = d.wal.file.Close()
		d.wal.file = nil
	}
	if d.applied.shm != nil {
		_ = d.applied.shm.Close()
		d.applied.shm = nil
	}
	if d.file != nil {
		_ = d.file.Close()
		d.file = nil
	}
}

// Pos returns the log's position once every transaction SQLite has
// committed is in it (see Flush); if the worker is failing, the position
// it has reached.
func (d *DB) Pos() ltx.Pos {
	if err := d.Flush(); err != nil {
		d.logger.Warn("position asked while LTX files are behind", "err", err)
	}
	return d.log.Pos()
}

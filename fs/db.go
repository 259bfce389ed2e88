package fs

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
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

// SQLite's lock bytes in the database file.
const (
	pendingByte  = 0x40000000
	reservedByte = pendingByte + 1
	sharedFirst  = pendingByte + 2
	sharedSize   = 510
)

// SQLite's lock bytes in the -shm file in WAL mode: WRITE, CKPT, RECOVER,
// READ0-4.
const (
	walLockOffset = 120
	walLockCount  = 8
)

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
	// tracing, if not nil, traces commits; traces are the recent ones.
	tracing *tracing
	traces  traceRing

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
	// walWriteHeld: the applier of WAL frames holds the -shm's WRITE lock,
	// which with kernel locks it keeps from one apply to the next, as
	// SQLite's readers on a replica never write. A hold of the readers drops it with every
	// other lock (readerHold.release); a replica made writable drops it
	// for the app's writers (foldForWriting).
	walWriteHeld atomic.Bool
	// publishedTXID, if not 0, is the TXID a group's readers see in page
	// 1 while its fsync runs, before the log's position moves to it (see
	// earlyTarget).
	publishedTXID atomic.Uint64
	// shmResized tells the kernel that the backing -shm changed size
	// (see growShm); nil outside a mount.
	shmResized func()
}

// commitMark is where a database's commits stand.
type commitMark struct {
	n    uint64
	txid ltx.TXID
}

func (d *DB) path(name string) string { return filepath.Join(d.dir, name) }

// Log returns the database's LTX log.
func (d *DB) Log() *ltx.Log { return d.log }

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

// walMode reports whether the database file's header says WAL mode.
func walMode(db io.ReaderAt) bool {
	var hdr [20]byte
	n, _ := db.ReadAt(hdr[:], 0)
	return n == len(hdr) && hdr[18] == 2
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

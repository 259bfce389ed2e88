package fs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/ltx"
)

// Apply applies the LTX file at path, received whole from the primary, to
// database name, creating the database if this node does not have it yet.
// The file goes into the database's log and its pages into the backing
// file (see ltx.Log.Apply) while SQLite's readers on the mount are held
// off through the locks SQLite itself uses, so no reader sees half a
// transaction; the kernel's cache of the pages it changed is dropped
// before they go on. A snapshot replaces the database; with keepLost its
// log's files are moved to DataDir/lost/<name>/ first.
//
// The mount must be open; Apply is for a replica, whose apps cannot write.
func (f *FileSystem) Apply(ctx context.Context, name, path string, keepLost bool) (*ltx.FileInfo, error) {
	d, err := f.dbForApply(ctx, name)
	if err != nil {
		return nil, err
	}
	if f.server != nil {
		// An app that looked for the database before it arrived had the
		// kernel remember that it does not exist, for an hour.
		if st := f.server.EntryNotify(fuse.FUSE_ROOT_ID, name); !st.Ok() && st != fuse.ENOENT {
			f.Logger.Warn("forget that the database did not exist", "db", name, "status", st)
		}
	}
	hold, err := f.holdReaders(ctx, d)
	if err != nil {
		return nil, fmt.Errorf("apply to %s: %w", name, err)
	}
	defer hold.release()
	lost := ""
	if keepLost {
		lost = filepath.Join(f.DataDir, "lost", name)
	}
	info, pgnos, err := d.log.Apply(ctx, path, lost)
	if err != nil {
		return nil, err
	}
	if f.readOnly.Load() {
		// A file that switched the database to WAL mode: readers need a
		// WAL they cannot create on a read-only mount.
		if err := d.ensureWAL(); err != nil {
			return nil, fmt.Errorf("apply to %s: %w", name, err)
		}
	}
	if err := f.invalidate(d, info, pgnos); err != nil {
		return nil, err
	}
	if err := hold.changed(); err != nil {
		return nil, fmt.Errorf("apply to %s: tell WAL readers: %w", name, err)
	}
	return info, nil
}

// dbForApply returns database name, created empty if it does not exist.
func (f *FileSystem) dbForApply(ctx context.Context, name string) (*DB, error) {
	if !validDBName(name) {
		return nil, fmt.Errorf("apply to %q: not a valid database name", name)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if d := f.dbs[name]; d != nil {
		return d, nil
	}
	d, err := f.createDB(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("create database %s: %w", name, err)
	}
	f.dbs[name] = d
	f.changedLocked()
	f.Logger.Info("database created by replication", "db", name)
	return d, nil
}

// invalidate drops the kernel's cache of the pages info wrote, and of the
// file's size; of all of it for a snapshot.
func (f *FileSystem) invalidate(d *DB, info *ltx.FileInfo, pgnos []uint32) error {
	f.mu.Lock()
	n := f.names[d.Name]
	f.mu.Unlock()
	if n == nil || f.server == nil {
		return nil // nobody has looked it up: nothing cached
	}
	if info.Header.IsSnapshot() {
		if st := f.server.InodeNotify(n.id, 0, 0); !st.Ok() && st != fuse.ENOENT {
			return fmt.Errorf("invalidate the cache of %s: %v", d.Name, st)
		}
		return nil
	}
	if err := f.InvalidatePages(d.Name, info.Header.PageSize, pgnos); err != nil {
		return err
	}
	if st := f.server.InodeNotify(n.id, -1, 0); !st.Ok() && st != fuse.ENOENT {
		return fmt.Errorf("invalidate the attributes of %s: %v", d.Name, st)
	}
	return nil
}

// SQLite's lock bytes in the -shm file in WAL mode: WRITE, CKPT, RECOVER,
// READ0-4 (those of the database file are in raw.go).
const (
	walLockOffset = 120
	walLockCount  = 8
)

// readerHold is SQLite's readers held off one database: write locks taken
// through the mount, exactly where a SQLite writer takes them, so they
// work whether the mount or the kernel implements locks.
type readerHold struct {
	db  *os.File // the database through the mount
	shm *os.File // its -shm through the mount, in WAL mode
}

// holdReaders waits until no reader is in a transaction on d and keeps new
// ones out: in rollback-journal mode with the PENDING byte then the SHARED
// range of the database file, in WAL mode with every WAL lock of the -shm
// file.
func (f *FileSystem) holdReaders(ctx context.Context, d *DB) (*readerHold, error) {
	path := filepath.Join(f.MountDir, d.Name)
	db, err := f.openOwn(path, os.O_RDWR)
	if err != nil {
		return nil, err
	}
	h := &readerHold{db: db}
	if walMode(db) {
		if h.shm, err = f.openOwn(path+"-shm", os.O_RDWR|os.O_CREATE); err != nil {
			h.release()
			return nil, err
		}
		// One at a time: a reader that finds a READ lock taken uses
		// another, so the daemon collects them as readers finish instead
		// of waiting for a moment when no reader holds any.
		for i := int64(0); i < walLockCount && err == nil; i++ {
			err = lockWait(ctx, h.shm, walLockOffset+i, 1)
		}
	} else if err = lockWait(ctx, db, pendingByte, 1); err == nil {
		err = lockWait(ctx, db, sharedFirst, sharedSize)
	}
	if err != nil {
		h.release()
		return nil, fmt.Errorf("hold readers off: %w", err)
	}
	return h, nil
}

// walMode reports whether the database file's header says WAL mode.
func walMode(db *os.File) bool {
	var hdr [20]byte
	n, _ := db.ReadAt(hdr[:], 0)
	return n == len(hdr) && hdr[18] == 2
}

// lockWait takes a write lock on n bytes at off of f, an open file
// description lock, retrying until ctx is done: like SQLite, it does not
// queue behind readers in the kernel.
func lockWait(ctx context.Context, f *os.File, off, n int64) error {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: off, Len: n}
	wait := 20 * time.Microsecond
	for {
		err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, syscall.EACCES) {
			return fmt.Errorf("lock bytes %d-%d of %s: %w", off, off+n-1, f.Name(), err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lock bytes %d-%d of %s: readers hold them: %w", off, off+n-1, f.Name(), ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 200*time.Microsecond)
	}
}

// changed tells WAL-mode readers that the database file changed under
// them: SQLite keeps its page cache across read transactions as long as
// the wal-index header in the -shm is unchanged, so the header's change
// counter is bumped (both copies, checksum redone), as a checkpoint does.
// In rollback-journal mode readers see the change counter of page 1,
// which the primary's transaction wrote.
func (h *readerHold) changed() error {
	if h.shm == nil {
		return nil
	}
	var hdr [96]byte // two copies of the 48-byte header
	if n, _ := h.shm.ReadAt(hdr[:], 0); n < len(hdr) || hdr[12] == 0 {
		return nil // not initialized: the next reader builds it from scratch
	}
	// The header is in the machine's byte order, its checksum too
	// (SQLite's walIndexWriteHdr); bigEndCksum is about WAL frames.
	w := hdr[:48]
	order := binary.NativeEndian
	order.PutUint32(w[8:], order.Uint32(w[8:])+1) // iChange
	order.PutUint32(w[20:], 0)                    // nPage: 0 lets readers size the file itself
	var s1, s2 uint32
	for i := 0; i < 40; i += 8 {
		s1 += order.Uint32(w[i:]) + s2
		s2 += order.Uint32(w[i+4:]) + s1
	}
	order.PutUint32(w[40:], s1)
	order.PutUint32(w[44:], s2)
	// Copy 2 first, as SQLite writes it, then copy 1.
	if _, err := h.shm.WriteAt(w, 48); err != nil {
		return err
	}
	_, err := h.shm.WriteAt(w, 0)
	return err
}

// release lets readers go on. The locks are dropped one by one: closing
// the file would not drop them in a FUSE filesystem's own lock table,
// because the kernel sends the owner of open file description locks
// neither with FLUSH nor with RELEASE.
func (h *readerHold) release() {
	unlock := func(f *os.File) {
		lk := unix.Flock_t{Type: unix.F_UNLCK}
		_ = unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
		_ = f.Close()
	}
	if h.shm != nil {
		unlock(h.shm)
	}
	unlock(h.db)
}

// Snapshot writes a snapshot of the database at its log's position to w,
// for a replica that cannot continue from its own position. Every
// transaction SQLite committed is in the log first, and the database's
// writers wait while its pages are read.
func (d *DB) Snapshot(ctx context.Context, w io.Writer) (*ltx.FileInfo, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.scanWAL(ctx); err != nil {
		return nil, err
	}
	if err := d.drain(); err != nil {
		return nil, err
	}
	return d.log.Snapshot(ctx, w, walView{d: d})
}

// openOwn opens a file of the mount for the daemon itself, which a
// read-only mount lets write: FUSE names the calling thread, so the open
// runs on a thread of its own whose ID the mount knows meanwhile.
func (f *FileSystem) openOwn(path string, flag int) (*os.File, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := uint32(unix.Gettid())
	f.mu.Lock()
	f.ownTIDs[tid]++
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		if f.ownTIDs[tid]--; f.ownTIDs[tid] == 0 {
			delete(f.ownTIDs, tid)
		}
		f.mu.Unlock()
	}()
	return os.OpenFile(path, flag, 0o644)
}

// ownOpen reports whether the FUSE caller pid (a thread ID) is in
// openOwn.
func (f *FileSystem) ownOpen(pid uint32) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ownTIDs[pid] > 0
}

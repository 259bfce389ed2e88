package fs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

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
	infos, err := f.ApplyFiles(ctx, name, []string{path}, ApplyOptions{KeepLost: keepLost})
	if err != nil {
		return nil, err
	}
	return &infos[0], nil
}

// ApplyOptions are how ApplyFiles treats the files it applies.
type ApplyOptions struct {
	// KeepLost moves the files a snapshot replaces to
	// DataDir/lost/<name>/<time>/ instead of removing them.
	KeepLost bool
	// Move moves the files into the database's log instead of copying
	// them, and Verified describes them as the caller verified them (see
	// ltx.ApplyOptions).
	Move     bool
	Verified []ltx.FileInfo
	// Data holds the bytes of files in memory in place of their paths (see
	// ltx.ApplyOptions).
	Data [][]byte
}

// ApplyFiles is Apply for files that follow one another, applied as one
// group (see ltx.Log.ApplyFiles) under one hold of the readers, who see
// the database move from before the first file to after the last. Only
// the first may be a snapshot.
func (f *FileSystem) ApplyFiles(ctx context.Context, name string, paths []string, opts ApplyOptions) ([]ltx.FileInfo, error) {
	if len(paths) == 0 {
		return nil, nil
	}
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
	// After an apply that failed part way, the readers are still held off.
	torn := d.torn.Swap(nil)
	if torn == nil && f.readOnly.Load() {
		if hdr, err := firstHeader(paths[0], opts); err != nil {
			return nil, fmt.Errorf("apply to %s: %w", name, err)
		} else if f.framesApply(d, hdr) {
			return f.applyFrames(ctx, d, paths, opts, hdr.PageSize)
		}
	}
	var hold *readerHold
	if torn != nil {
		hold = torn.hold
	} else if hold, err = f.holdReaders(ctx, d); err != nil {
		return nil, fmt.Errorf("apply to %s: %w", name, err)
	}
	keep := false
	defer func() {
		if !keep {
			hold.release()
		}
	}()
	lopts := ltx.ApplyOptions{Move: opts.Move, Verified: opts.Verified, Data: opts.Data}
	if opts.KeepLost {
		lopts.LostDir = filepath.Join(f.DataDir, "lost", name)
	}
	// Frames in the WAL (the applier's, or left by this node's app when it
	// was the primary, which recovery logged) go into the database file
	// first, while no reader is in, once the log holds them durably.
	if err := d.log.AwaitLogged(ctx); err != nil {
		return nil, fmt.Errorf("apply to %s: %w", name, err)
	}
	d.mu.Lock()
	hadFrames := d.walApplied() || d.walActive()
	folded, err := d.foldWAL(f.readOnly.Load())
	d.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("apply to %s: %w", name, err)
	}
	if hadFrames {
		// The WAL is empty now: a reader that rebuilds the wal-index
		// from the kernel's cached pages of the old one would bring its
		// frames back into the -shm, and a writer would read past the end.
		if err := f.invalidateNode(d.Name + "-wal"); err != nil {
			return nil, fmt.Errorf("apply to %s: %w", name, err)
		}
	}
	var before int64
	if st, err := os.Stat(d.path(databaseFile)); err == nil {
		before = st.Size()
	}
	// An ordinary group lets the readers in once its pages are in the
	// file, before the file's fsync (earlyTarget).
	var early *earlyTarget
	hdr, herr := firstHeader(paths[0], opts)
	last, lerr := headerOf(len(paths)-1, paths[len(paths)-1], opts)
	if herr == nil && lerr == nil && torn == nil && len(folded) == 0 && !hdr.IsSnapshot() {
		db, err := os.OpenFile(d.path(databaseFile), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("apply to %s: %w", name, err)
		}
		defer func() { _ = db.Close() }()
		early = &earlyTarget{File: db, pageSize: hdr.PageSize, publish: func(pgnos []uint32) error {
			return f.publishApply(d, hold, before, hdr.PageSize, pgnos, last.MaxTXID)
		}}
		lopts.Target = early
	}
	infos, pgnos, err := d.log.ApplyFiles(ctx, paths, lopts)
	// The log's position has moved, if the apply succeeded.
	d.publishedTXID.Store(0)
	if early != nil && early.published {
		// The readers read the group before its fsync failed, if it did:
		// the log applies it again with the next group.
		return infos, err
	}
	var partly *ltx.PartlyAppliedError
	if errors.As(err, &partly) || err != nil && torn != nil {
		// The database file may hold part of a transaction: readers stay
		// out until an apply reaches the end of every group that failed.
		until := d.log.Pos().TXID
		if torn != nil {
			until = torn.until
		}
		if partly != nil {
			until = max(until, partly.MaxTXID)
		}
		keep = true
		d.torn.Store(&tornApply{hold: hold, until: until})
		f.Logger.Error("an apply failed part way: the database's readers are held off until its transactions are applied again", "db", name, "until_txid", until.String(), "err", err)
		return nil, err
	} else if err != nil {
		return nil, err
	}
	pageSize := infos[len(infos)-1].Header.PageSize
	// After a snapshot, or a page size that changed within the group, all
	// of the file is dropped from the cache; after a failed apply too, as
	// the applies since wrote pages the cache still holds.
	all := infos[0].Header.IsSnapshot() || slices.ContainsFunc(infos, func(i ltx.FileInfo) bool { return i.Header.PageSize != pageSize }) || len(folded) > 0
	if torn != nil {
		if infos[len(infos)-1].Pos().TXID < torn.until && !infos[0].Header.IsSnapshot() {
			// Pages of the failed group past this one may still be in
			// the file.
			keep = true
			d.torn.Store(torn)
			return infos, nil
		}
		all = true
		f.Logger.Info("applied again after a failed apply: readers may read the database again", "db", name, "txid", infos[len(infos)-1].Pos().TXID.String())
	}
	if f.readOnly.Load() {
		// A file that switched the database to WAL mode: readers need a
		// WAL they cannot create on a read-only mount.
		if err := d.ensureWAL(); err != nil {
			return nil, fmt.Errorf("apply to %s: %w", name, err)
		}
	}
	if err := f.publishGroup(d, hold, before, all, pageSize, pgnos); err != nil {
		return nil, err
	}
	return infos, nil
}

// publishGroup readies d's readers, held off by hold, for the group an
// apply wrote into the database file (the pages pgnos of pageSize bytes,
// or all of it), which was before bytes long: the kernel learns its size
// and drops the pages it caches, and WAL readers are told.
func (f *FileSystem) publishGroup(d *DB, hold *readerHold, before int64, all bool, pageSize uint32, pgnos []uint32) error {
	if f.readOnly.Load() && !slices.Contains(pgnos, 1) {
		// Readers see the change counter of page 1 move with every apply
		// (serveChangeCounter): the kernel's copy must go.
		pgnos = append([]uint32{1}, pgnos...)
	}
	if err := f.storeSize(d, before, pageSize); err != nil {
		return err
	}
	if err := f.invalidate(d, all, pageSize, pgnos); err != nil {
		return err
	}
	if err := hold.changed(); err != nil {
		return fmt.Errorf("apply to %s: tell WAL readers: %w", d.Name, err)
	}
	return nil
}

// publishApply is publishGroup for an earlyTarget, which then releases
// the readers.
func (f *FileSystem) publishApply(d *DB, hold *readerHold, before int64, pageSize uint32, pgnos []uint32, txid ltx.TXID) error {
	if f.readOnly.Load() {
		// As after any apply (see ApplyFiles).
		if err := d.ensureWAL(); err != nil {
			return fmt.Errorf("apply to %s: %w", d.Name, err)
		}
	}
	// Page 1 is served with the change counter of the group's end
	// before the log's position gets there (serveChangeCounter).
	d.publishedTXID.Store(uint64(txid))
	if err := f.publishGroup(d, hold, before, false, pageSize, pgnos); err != nil {
		return err
	}
	hold.release()
	return nil
}

// earlyTarget is the database file as the target of an apply under a
// hold of the readers that lets them in once the group's pages are all
// written, before the file's fsync: they read the pages from the page
// cache meanwhile, as they would after it, and the group is acknowledged
// only once the apply returns, after the fsync. The hold lasts a few
// writes instead of a disk flush. A group whose pages are not all of the
// header's page size is published after the apply, as before.
type earlyTarget struct {
	*os.File
	pageSize  uint32
	publish   func(pgnos []uint32) error
	pgnos     []uint32
	other     bool // a write that is not whole pages of pageSize
	published bool // publish returned nil: the readers are in
}

func (t *earlyTarget) WriteAt(p []byte, off int64) (int, error) {
	ps := int64(t.pageSize)
	if ps == 0 || off%ps != 0 || int64(len(p))%ps != 0 {
		t.other = true
	} else {
		for i := int64(0); i < int64(len(p)); i += ps {
			t.pgnos = append(t.pgnos, uint32((off+i)/ps)+1)
		}
	}
	return t.File.WriteAt(p, off)
}

func (t *earlyTarget) Sync(bool) error {
	if !t.other {
		slices.Sort(t.pgnos)
		if err := t.publish(slices.Compact(t.pgnos)); err != nil {
			return err
		}
		t.published = true
		earlyPublished()
	}
	return t.File.Sync()
}

// earlyPublished runs between an earlyTarget's publish and its fsync; a
// test hook.
var earlyPublished = func() {}

// firstHeader returns the header of the first LTX file of a group, at
// path: from the caller's description of it or its bytes in memory, if
// opts has them.
func firstHeader(path string, opts ApplyOptions) (ltx.Header, error) {
	return headerOf(0, path, opts)
}

// headerOf returns the header of the group's file i, at path, as
// firstHeader does.
func headerOf(i int, path string, opts ApplyOptions) (ltx.Header, error) {
	if len(opts.Verified) > i {
		return opts.Verified[i].Header, nil
	}
	b := make([]byte, 100) // an LTX header
	if len(opts.Data) > i && opts.Data[i] != nil {
		if len(opts.Data[i]) < len(b) {
			return ltx.Header{}, fmt.Errorf("a received file of %d bytes: shorter than an LTX header", len(opts.Data[i]))
		}
		copy(b, opts.Data[i])
		path = "the received file"
	} else {
		f, err := os.Open(path)
		if err != nil {
			return ltx.Header{}, err
		}
		defer func() { _ = f.Close() }()
		if _, err := io.ReadFull(f, b); err != nil {
			return ltx.Header{}, fmt.Errorf("read the header of %s: %w", path, err)
		}
	}
	var h ltx.Header
	if err := h.UnmarshalBinary(b); err != nil {
		return ltx.Header{}, fmt.Errorf("%s: %w", path, err)
	}
	return h, nil
}

// dbForApply returns database name, created empty if it does not exist.
// AwaitLogged waits until every group applied to database name so far is
// durable in its log, or ctx ends: a replica's applies return once
// readers see a group, while the fsync of its records may still be in
// flight (see ltx.ApplyOptions.Overlap). It is nil for a database this
// node does not have.
func (f *FileSystem) AwaitLogged(ctx context.Context, name string) error {
	d := f.DB(name)
	if d == nil {
		return nil
	}
	if err := d.log.AwaitLogged(ctx); err != nil {
		return fmt.Errorf("log of %s: %w", name, err)
	}
	return nil
}

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

// invalidate drops the kernel's cache of the pages pgnos, of pageSize
// bytes, and of the file's size (the kernel drops the attributes with
// every notification); of all of it after a snapshot.
func (f *FileSystem) invalidate(d *DB, snapshot bool, pageSize uint32, pgnos []uint32) error {
	f.mu.Lock()
	n := f.names[d.Name]
	f.mu.Unlock()
	if n == nil || f.server == nil {
		return nil // nobody has looked it up: nothing cached
	}
	if snapshot {
		if st := f.server.InodeNotify(n.id, 0, 0); !st.Ok() && st != fuse.ENOENT {
			return fmt.Errorf("invalidate the cache of %s: %v", d.Name, st)
		}
		return nil
	}
	if len(pgnos) > 0 {
		// Each page's notification drops the cached size too.
		return f.InvalidatePages(d.Name, pageSize, pgnos)
	}
	if st := f.server.InodeNotify(n.id, -1, 0); !st.Ok() && st != fuse.ENOENT {
		return fmt.Errorf("invalidate the attributes of %s: %v", d.Name, st)
	}
	return nil
}

// storeSize gives the kernel the database file's new size, when an apply
// grew it from before bytes, by storing its last page in the kernel's
// cache (FUSE_NOTIFY_STORE extends the cached size under the inode's
// lock). Invalidating the attributes is not enough: Linux's FUSE client
// marks the attributes of a GETATTR reply valid before it writes the
// reply's size (fuse_change_attributes), so an fstat by another thread in
// that instant gets the old size as valid. SQLite, reading a page 1 that
// counts more pages than that size, fails the read with "database disk
// image is malformed" (btree.c, lockBtree). With the size stored first,
// every answer has the new size. A database that shrank keeps its larger
// cached size until the next GETATTR, which SQLite tolerates: it trusts
// the page count of page 1 when that is smaller.
func (f *FileSystem) storeSize(d *DB, before int64, pageSize uint32) error {
	f.mu.Lock()
	n := f.names[d.Name]
	f.mu.Unlock()
	if n == nil || f.server == nil {
		return nil // nobody has looked it up: nothing cached
	}
	db, err := os.Open(d.path(databaseFile))
	if err != nil {
		return err
	}
	defer func() { _ = db.Close() }()
	st, err := db.Stat()
	if err != nil || st.Size() <= before {
		return err
	}
	// The last page, or as much of it as lies past the old end.
	off := max(before, st.Size()-int64(pageSize))
	last := make([]byte, st.Size()-off)
	if _, err := db.ReadAt(last, off); err != nil {
		return fmt.Errorf("read the end of %s: %w", d.Name, err)
	}
	if s := f.server.InodeNotifyStoreCache(n.id, off, last); !s.Ok() && s != fuse.ENOENT {
		return fmt.Errorf("give the kernel the size of %s: %v", d.Name, s)
	}
	return nil
}

// sqliteHeaderSize is the size of the header at the start of page 1.
const sqliteHeaderSize = 100

// serveChangeCounter rewrites, in data, read at off from the database
// file db of a replica at txid, the change counter of page 1 (bytes 24-27)
// and its copy, the version-valid-for number (92-95), as SQLite's readers
// on the mount are to see them: the low 32 bits of txid. A reader in
// rollback-journal mode keeps its page cache across read transactions
// while bytes 24-39 of page 1 stay the same, and a primary's writer does
// not always move the counter: in locking_mode=EXCLUSIVE it moves it only
// in the first transaction of its lock. The position moves with every
// apply, so every apply tells the replica's readers to drop their cache.
// The file itself keeps the primary's bytes; WAL-mode databases, whose
// readers watch the wal-index instead, are served as they are.
func serveChangeCounter(db io.ReaderAt, txid ltx.TXID, data []byte, off int64) {
	var hdr [sqliteHeaderSize]byte
	if off == 0 && len(data) >= len(hdr) {
		copy(hdr[:], data)
	} else if n, _ := db.ReadAt(hdr[:], 0); n < len(hdr) {
		return
	}
	if hdr[18] != 1 || hdr[19] != 1 {
		return // not a rollback-journal database (WAL is 2)
	}
	counter := uint32(txid)
	vvf := counter
	if binary.BigEndian.Uint32(hdr[92:]) != binary.BigEndian.Uint32(hdr[24:]) {
		vvf = counter + 1 // the page count at 28 is not valid: keep it so
	}
	binary.BigEndian.PutUint32(hdr[24:], counter)
	binary.BigEndian.PutUint32(hdr[92:], vvf)
	for _, r := range [][2]int64{{24, 28}, {92, 96}} {
		for i := max(r[0], off); i < r[1] && i < off+int64(len(data)); i++ {
			data[i-off] = hdr[i]
		}
	}
}

// daemonLockOwner owns the locks the daemon takes in a database's lock
// tables. Kernel lock owners are scrambled pointers; this one is not.
const daemonLockOwner = 1<<64 - 0x4d52 // "MR"

// tornApply is the hold of the readers of a database that an apply left
// part-written: it is kept until an apply reaches until.
type tornApply struct {
	hold  *readerHold
	until ltx.TXID
}

// readerHold is SQLite's readers held off one database: the write locks a
// SQLite writer would take, in the mount's own lock tables. The daemon
// holds no file on its own mount: a process killed with one open would
// hang for good in the FLUSH its exit sends to itself.
type readerHold struct {
	f   *FileSystem
	d   *DB
	wal bool
	// With kernel locks: the lock holder holding them, and the files on
	// the mount it locked.
	holder   *lockHolder
	paths    []string
	began    time.Time
	released bool
}

// holdReaders waits until no reader is in a transaction on d and keeps new
// ones out: in rollback-journal mode with the PENDING byte, which stops new
// SHARED locks, then the SHARED range of the database file; in WAL mode
// with every WAL lock of the -shm file, one at a time (a reader that finds
// a READ lock taken uses another). With kernel locks the lock holder takes
// them (holdReadersKernel).
func (f *FileSystem) holdReaders(ctx context.Context, d *DB) (*readerHold, error) {
	h := &readerHold{f: f, d: d, wal: walMode(d.file)}
	if f.KernelLocks {
		if err := f.holdReadersKernel(ctx, h); err != nil {
			return nil, err
		}
		return h, nil
	}
	lock := func(t *LockTable, start, end uint64) error {
		if errno := t.Lock(ctx, daemonLockOwner, uint32(os.Getpid()), syscall.F_WRLCK, start, end); errno != 0 {
			return fmt.Errorf("lock bytes %d-%d: readers hold them: %w", start, end, errno)
		}
		return nil
	}
	// Readers the last hold let in go first (see AwaitFresh).
	if h.wal {
		d.ShmLocks.AwaitFresh(ctx)
	} else {
		d.Locks.AwaitFresh(ctx)
	}
	// A read transaction that keeps the apply waiting is named in the
	// log, again and again while it lasts.
	began := time.Now()
	var (
		warn *time.Timer
		held atomic.Bool
	)
	every := f.readHoldEvery()
	warn = time.AfterFunc(every, func() {
		if held.Load() {
			return
		}
		t := &d.Locks
		if h.wal {
			t = &d.ShmLocks
		}
		var pids []uint32
		for _, l := range t.Locks() {
			if l.Owner != daemonLockOwner && l.Owner != dmsLockOwner && !slices.Contains(pids, l.Pid) {
				pids = append(pids, l.Pid)
			}
		}
		f.Logger.Warn("an apply waits for read transactions on the mount to end; the replica falls behind meanwhile",
			"db", d.Name, "waited", time.Since(began).Round(time.Millisecond), "reader_pids", pids)
		warn.Reset(every)
	})
	defer func() {
		held.Store(true)
		warn.Stop()
	}()
	var err error
	if h.wal {
		for i := uint64(0); i < walLockCount && err == nil; i++ {
			err = lock(&d.ShmLocks, walLockOffset+i, walLockOffset+i)
		}
	} else if err = lock(&d.Locks, pendingByte, pendingByte); err == nil {
		err = lock(&d.Locks, sharedFirst, sharedFirst+sharedSize-1)
	}
	if err != nil {
		h.release()
		return nil, fmt.Errorf("hold readers off: %w", err)
	}
	return h, nil
}

// readHoldWarning is how long an apply waits for SQLite's readers before
// the log names them.
const readHoldWarning = 5 * time.Second

// changed tells WAL-mode readers that the database file changed under
// them: SQLite keeps its page cache across read transactions as long as
// the wal-index header in the -shm is unchanged, so the header's change
// counter is bumped (both copies, checksum redone), as a checkpoint does.
// Readers map the -shm through the mount: the kernel's copy of its first
// page is dropped before (writing back what readers wrote) and after the
// backing file is written. In rollback-journal mode readers see the change
// counter of page 1, which the primary's transaction wrote.
func (h *readerHold) changed() error {
	if !h.wal {
		return nil
	}
	if err := h.f.invalidateShm(h.d); err != nil {
		return err
	}
	shm, err := os.OpenFile(h.d.path(shmFile), os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil // no reader yet
	} else if err != nil {
		return err
	}
	defer func() { _ = shm.Close() }()
	var hdr [96]byte // two copies of the 48-byte header
	if n, _ := shm.ReadAt(hdr[:], 0); n < len(hdr) || hdr[12] == 0 {
		return nil // not initialized: the next reader builds it from scratch
	}
	// The header is in the machine's byte order, its checksum too.
	w := hdr[:48]
	order := binary.NativeEndian
	order.PutUint32(w[8:], order.Uint32(w[8:])+1) // iChange
	order.PutUint32(w[20:], 0)                    // nPage: 0 lets readers size the file itself
	s1, s2 := walIndexChecksum(w)
	order.PutUint32(w[40:], s1)
	order.PutUint32(w[44:], s2)
	copy(hdr[48:], w)
	if _, err := shm.WriteAt(hdr[:], 0); err != nil {
		return err
	}
	return h.f.invalidateShm(h.d)
}

// invalidateShm drops the kernel's cache of the first page of d's -shm.
func (f *FileSystem) invalidateShm(d *DB) error {
	f.mu.Lock()
	n := f.names[d.Name+"-shm"]
	f.mu.Unlock()
	if n == nil || f.server == nil {
		return nil
	}
	if st := f.server.InodeNotify(n.id, 0, 4096); !st.Ok() && st != fuse.ENOENT {
		return fmt.Errorf("invalidate the -shm of %s: %v", d.Name, st)
	}
	return nil
}

// holdReadersKernel is holdReaders with kernel locks: the same locks,
// taken through the lock holder. Readers that meet them do not wait for
// them; they fail and SQLite sleeps and tries again. So that they get in
// while a primary writes flat out, a hold starts no sooner after the last
// one ended than that one lasted (at least holdGapMin, at most
// holdGapMax), when a process has the database or its -shm open.
func (f *FileSystem) holdReadersKernel(ctx context.Context, h *readerHold) error {
	d := h.d
	if wait := time.Until(time.Unix(0, d.holdFree.Load())); wait > 0 && f.readersOpen(d) {
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("hold readers off: %w", ctx.Err())
		}
	}
	holder, err := f.lockHolder()
	if err != nil {
		return fmt.Errorf("hold readers off: %w", err)
	}
	h.holder = holder
	h.began = time.Now()
	var reqs []lockRequest
	if h.wal {
		// Every WAL lock, one at a time (a reader that finds a READ lock
		// taken uses another). The -shm is created if no reader made one
		// yet: one that comes during the hold finds the locks taken.
		shm := filepath.Join(f.MountDir, d.Name+"-shm")
		for i := uint64(0); i < walLockCount; i++ {
			reqs = append(reqs, lockRequest{op: "lock", create: true, start: walLockOffset + i, end: walLockOffset + i, path: shm})
		}
	} else {
		db := filepath.Join(f.MountDir, d.Name)
		reqs = []lockRequest{
			{op: "lock", start: pendingByte, end: pendingByte, path: db},
			{op: "lock", start: sharedFirst, end: sharedFirst + sharedSize - 1, path: db},
		}
	}
	h.paths = []string{reqs[0].path}
	// Named in the log, again and again while it lasts; the kernel keeps
	// the readers' locks (/proc/locks lists them).
	every := f.readHoldEvery()
	var (
		warn *time.Timer
		held atomic.Bool
	)
	warn = time.AfterFunc(every, func() {
		if held.Load() {
			return
		}
		f.Logger.Warn("an apply waits for read transactions on the mount to end; the replica falls behind meanwhile (their locks are in /proc/locks)",
			"db", d.Name, "waited", time.Since(h.began).Round(time.Millisecond))
		warn.Reset(every)
	})
	defer func() {
		held.Store(true)
		warn.Stop()
	}()
	if err := holder.lock(ctx, reqs); err != nil {
		h.release()
		return fmt.Errorf("hold readers off: %w", err)
	}
	return nil
}

// Bounds of the gap a kernel-locks hold leaves readers after it.
const (
	holdGapMin = time.Millisecond
	holdGapMax = 50 * time.Millisecond
)

// readHoldEvery is how often the log names an apply waiting for readers.
func (f *FileSystem) readHoldEvery() time.Duration {
	if f.readHoldWarning > 0 {
		return f.readHoldWarning
	}
	return readHoldWarning
}

// release lets readers go on.
func (h *readerHold) release() {
	if h.released {
		return // by an earlyTarget, before the deferred release
	}
	h.released = true
	if h.wal {
		// Every WAL lock goes, the applier's WRITE lock too.
		h.d.walWriteHeld.Store(false)
	}
	if h.holder != nil {
		var start, end uint64 // all of the database file's locks
		if h.wal {
			// Not the DMS byte, which the applier of WAL frames holds.
			start, end = walLockOffset, walLockOffset+walLockCount-1
		}
		for _, p := range h.paths {
			if err := h.holder.unlock(p, start, end); err != nil {
				h.f.Logger.Error("drop the lock holder's locks", "db", h.d.Name, "file", p, "err", err)
			}
		}
		now := time.Now()
		h.d.holdFree.Store(now.Add(min(max(now.Sub(h.began), holdGapMin), holdGapMax)).UnixNano())
		return
	}
	if h.wal {
		h.d.ShmLocks.ReleaseOwner(daemonLockOwner)
	} else {
		h.d.Locks.ReleaseOwner(daemonLockOwner)
	}
}

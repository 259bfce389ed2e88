package fs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/meridian-db/meridian/internal/durable"
	"github.com/meridian-db/meridian/ltx"
)

// Applying a WAL-mode database as SQLite's writer would (see walwrite.go).
//
// A replica whose mount passes the WAL and -shm through to their backing
// files (FUSE passthrough: SQLite's readers map the backing -shm itself)
// applies each group of a WAL-mode database as one WAL transaction: its
// pages are appended to the WAL as frames and published in the wal-index
// under the WAL write lock, while the log fsyncs the group's records. No reader waits for an apply,
// and an apply waits for no reader: a long read transaction keeps its
// snapshot and holds off only the checkpoint of the frames it may still
// read, as with SQLite itself (fs.max_read_hold has nothing to bound).
//
// After each apply a passive checkpoint copies the frames every reader's
// snapshot includes into the database file, as SQLite's
// PRAGMA wal_checkpoint(PASSIVE) does: never waiting for a lock, taking
// each reader's READ lock only to move a read mark it no longer needs. When
// every frame is in the database file and no reader uses the WAL, the next
// apply starts a new WAL generation. The daemon holds SQLite's DMS lock of
// the -shm for as long as it writes the WAL, so no reader that opens the
// -shm later wipes the wal-index the daemon keeps.
//
// Everything else reads the database through the WAL (walView). The
// frames go into the WAL while the log's fsync of their records is in
// flight, and the apply returns before it is done (the replica
// acknowledges the group once it is: FileSystem.AwaitLogged): a power
// cut may keep frames whose records it lost, which the daemon drops when
// it starts (DB.recover), and checkpoints, and every other copy of frames
// into the database file, wait for the log first. A file marks a WAL
// generation the applier started (walAppliedFile): a daemon that starts
// with one copies the WAL into the database file before anything else, and
// so does a replica that becomes primary, or that applies a snapshot or a
// change of journal mode, under a hold of all readers.

// walAppliedFile, in a database's directory, holds the salts of the WAL
// generation the applier writes, then the boot ID of the kernel it began
// under.
const walAppliedFile = "wal-applied"

// Lock bytes of the -shm.
const (
	walWriteLock = walLockOffset     // WRITE
	walReadLock0 = walLockOffset + 3 // READ0; READi is walReadLock0+i
	walDMSLock   = walLockOffset + 8 // DMS: held shared by every connection
)

// dmsLockOwner owns the daemon's DMS lock in a lock table: apart from
// daemonLockOwner, whose locks a hold drops all at once.
const dmsLockOwner = 1<<64 - 0x4d53

// walFoldFrames is how many frames the WAL holds before a checkpoint
// copies them into the database file: SQLite's automatic checkpoint
// default.
const walFoldFrames = 1000

// walLocks takes the -shm's locks for the applier, where SQLite's readers
// take theirs: in the mount's lock table, or in the kernel through the
// lock holder.
type walLocks interface {
	// lock takes bytes start-end for writing, waiting for readers.
	lock(ctx context.Context, start, end uint64) error
	// try takes them if no reader holds any, and reports whether it did.
	try(ctx context.Context, start, end uint64) (bool, error)
	unlock(start, end uint64) error
	// shareDMS holds the DMS byte shared, if not held already.
	shareDMS(ctx context.Context) error
}

type tableWALLocks struct{ d *DB }

func (l tableWALLocks) lock(ctx context.Context, start, end uint64) error {
	if errno := l.d.ShmLocks.Lock(ctx, daemonLockOwner, uint32(os.Getpid()), syscall.F_WRLCK, start, end); errno != 0 {
		return fmt.Errorf("lock bytes %d-%d of the -shm of %s: %w", start, end, l.d.Name, errno)
	}
	return nil
}

func (l tableWALLocks) try(_ context.Context, start, end uint64) (bool, error) {
	switch errno := l.d.ShmLocks.TryLock(daemonLockOwner, uint32(os.Getpid()), syscall.F_WRLCK, start, end); errno {
	case 0:
		return true, nil
	case syscall.EAGAIN:
		return false, nil
	default:
		return false, fmt.Errorf("lock bytes %d-%d of the -shm of %s: %w", start, end, l.d.Name, errno)
	}
}

func (l tableWALLocks) unlock(start, end uint64) error {
	l.d.ShmLocks.TryLock(daemonLockOwner, uint32(os.Getpid()), syscall.F_UNLCK, start, end)
	return nil
}

func (l tableWALLocks) shareDMS(ctx context.Context) error {
	for _, lk := range l.d.ShmLocks.Locks() {
		if lk.Owner == dmsLockOwner {
			return nil
		}
	}
	if errno := l.d.ShmLocks.Lock(ctx, dmsLockOwner, uint32(os.Getpid()), syscall.F_RDLCK, walDMSLock, walDMSLock); errno != 0 {
		return fmt.Errorf("lock the DMS byte of the -shm of %s: %w", l.d.Name, errno)
	}
	return nil
}

type holderWALLocks struct {
	f      *FileSystem
	d      *DB
	holder *lockHolder
	shm    string
}

func (l holderWALLocks) req(op string, start, end uint64) lockRequest {
	return lockRequest{op: op, create: true, start: start, end: end, path: l.shm}
}

func (l holderWALLocks) lock(ctx context.Context, start, end uint64) error {
	return l.holder.lock(ctx, []lockRequest{l.req("lock", start, end)})
}

func (l holderWALLocks) try(ctx context.Context, start, end uint64) (bool, error) {
	err := l.holder.lock(ctx, []lockRequest{l.req("try", start, end)})
	if err != nil && strings.Contains(err.Error(), errLockBusy) {
		return false, nil
	}
	return err == nil, err
}

func (l holderWALLocks) unlock(start, end uint64) error {
	_, err := l.holder.send(l.req("unlock", start, end), false)
	return err
}

func (l holderWALLocks) shareDMS(ctx context.Context) error {
	if l.d.dmsHolder.Load() == l.holder {
		return nil
	}
	if err := l.holder.lock(ctx, []lockRequest{l.req("share", walDMSLock, walDMSLock)}); err != nil {
		return err
	}
	l.d.dmsHolder.Store(l.holder)
	return nil
}

// walLocksOf returns the applier's locks of d's -shm.
func (f *FileSystem) walLocksOf(d *DB) (walLocks, error) {
	if !f.KernelLocks {
		return tableWALLocks{d}, nil
	}
	holder, err := f.lockHolder()
	if err != nil {
		return nil, err
	}
	return holderWALLocks{f: f, d: d, holder: holder, shm: filepath.Join(f.MountDir, d.Name+"-shm")}, nil
}

// framesApply reports whether a group for d whose first file is hdr is
// applied as WAL frames: d is in WAL mode with the page size of the file,
// the file is not a snapshot, and the kernel passes the WAL and -shm
// through.
func (f *FileSystem) framesApply(d *DB, hdr ltx.Header) bool {
	if hdr.IsSnapshot() || !f.Passthrough || f.server == nil {
		return false
	}
	f.mu.Lock()
	off := f.passthroughOff
	f.mu.Unlock()
	if off || f.server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0 {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.walFenced {
		return false // processes may hold it open for writing (fenceWAL)
	}
	var b [100]byte
	if n, _ := (walView{d: d}).ReadAt(b[:], 0); n < len(b) || b[18] != 2 || b[19] != 2 {
		return false
	}
	ps := uint32(binary.BigEndian.Uint16(b[16:]))
	if ps == 1 {
		ps = 65536
	}
	// A WAL with frames of another writer (this node's app, when it was
	// the primary) is folded first, under a hold.
	return ps == hdr.PageSize && (!d.wal.valid || d.wal.mxFrame == 0 || d.applied.mine && d.wal.hdr.pageSize == hdr.PageSize)
}

// applyFrames applies the group paths to d as one WAL transaction.
func (f *FileSystem) applyFrames(ctx context.Context, d *DB, paths []string, opts ApplyOptions, pageSize uint32) ([]ltx.FileInfo, error) {
	locks, err := f.walLocksOf(d)
	if err != nil {
		return nil, fmt.Errorf("apply to %s: %w", d.Name, err)
	}
	if err := locks.shareDMS(ctx); err != nil {
		return nil, fmt.Errorf("apply to %s: %w", d.Name, err)
	}
	// With kernel locks the WAL write lock is kept from one apply to the
	// next (see DB.walWriteHeld): taking and dropping it cost a round trip
	// to the lock holder process per apply. With the mount's lock table it
	// is dropped after each: a reader that meets it there waits in the
	// mount for it to go (WaitLock), as one that reads the wal-index header
	// while the applier writes it does, to rebuild it.
	if !d.walWriteHeld.Load() {
		if err := locks.lock(ctx, walWriteLock, walWriteLock); err != nil {
			return nil, fmt.Errorf("apply to %s: %w", d.Name, err)
		}
		d.walWriteHeld.Store(true)
	}
	if !f.KernelLocks {
		defer func() {
			d.walWriteHeld.Store(false)
			if err := locks.unlock(walWriteLock, walWriteLock); err != nil {
				f.Logger.Error("drop the WAL write lock", "db", d.Name, "err", err)
			}
		}()
	}
	if err := f.restartWAL(ctx, d, locks); err != nil {
		return nil, fmt.Errorf("apply to %s: %w", d.Name, err)
	}
	t := &walTarget{ctx: ctx, f: f, d: d, pageSize: pageSize, pages: map[uint32][]byte{}}
	// The WAL's frames go in while the log's fsync is in flight: a power
	// cut that keeps them and loses the log's records is cut back at
	// start (see DB.recover).
	lopts := ltx.ApplyOptions{Move: opts.Move, Verified: opts.Verified, Data: opts.Data, Target: t, Overlap: true}
	infos, _, err := d.log.ApplyFiles(ctx, paths, lopts)
	if err != nil {
		// Nothing was published: readers see the database as it was.
		return nil, fmt.Errorf("apply to %s: %w", d.Name, err)
	}
	if err := f.checkpointWAL(ctx, d, locks); err != nil {
		f.Logger.Warn("checkpoint the WAL of a replica", "db", d.Name, "err", err)
	}
	return infos, nil
}

// walTarget takes the pages of a group from ltx.Log.ApplyFiles and, when
// the group has been checked, appends them to the WAL as one transaction.
type walTarget struct {
	ctx      context.Context
	f        *FileSystem
	d        *DB
	pageSize uint32
	pages    map[uint32][]byte
	commit   uint32
}

func (t *walTarget) WriteAt(p []byte, off int64) (int, error) {
	ps := int64(t.pageSize)
	if off%ps != 0 || int64(len(p))%ps != 0 {
		return 0, fmt.Errorf("write of %d bytes at %d: not whole pages of %d bytes, the WAL's page size", len(p), off, ps)
	}
	for i := int64(0); i < int64(len(p)); i += ps {
		t.pages[uint32((off+i)/ps)+1] = slices.Clone(p[i : i+ps])
	}
	return len(p), nil
}

func (t *walTarget) Truncate(size int64) error {
	t.commit = uint32(size / int64(t.pageSize))
	return nil
}

func (t *walTarget) Sync(logged bool) error {
	if p1 := t.pages[1]; p1 != nil && (p1[18] != 2 || p1[19] != 2) {
		return t.leaveWAL()
	}
	var pgnos []uint32
	for pgno := range t.pages {
		if pgno <= t.commit {
			pgnos = append(pgnos, pgno)
		}
	}
	if len(pgnos) == 0 {
		// A transaction that changed no page: SQLite commits page 1.
		return nil
	}
	slices.Sort(pgnos)
	pages := make([][]byte, len(pgnos))
	for i, pgno := range pgnos {
		pages[i] = t.pages[pgno]
	}
	t.d.mu.Lock()
	defer t.d.mu.Unlock()
	return t.d.appendWALTx(pgnos, pages, t.commit, t.pageSize, !logged)
}

// leaveWAL applies a group that takes the database out of WAL mode: into
// the database file, after the WAL, under a hold of every reader, once
// the group is durable in the log (a database file ahead of its log is
// not cut back at start, as a WAL is).
func (t *walTarget) leaveWAL() error {
	f, d := t.f, t.d
	if err := d.log.AwaitLogged(t.ctx); err != nil {
		return err
	}
	hold, err := f.holdReaders(t.ctx, d)
	if err != nil {
		return err
	}
	defer hold.release()
	d.mu.Lock()
	err = func() error {
		if _, err := d.foldWAL(true); err != nil {
			return err
		}
		ps := int64(t.pageSize)
		for pgno, page := range t.pages {
			if pgno <= t.commit {
				if _, err := d.file.WriteAt(page, int64(pgno-1)*ps); err != nil {
					return err
				}
			}
		}
		if err := d.file.Truncate(int64(t.commit) * ps); err != nil {
			return err
		}
		return d.file.Sync()
	}()
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("leave WAL mode: %w", err)
	}
	f.Logger.Info("a transaction took the database out of WAL mode", "db", d.Name)
	if err := f.invalidate(d, true, 0, nil); err != nil {
		return err
	}
	return hold.changed()
}

// appendWALTx appends one transaction to the WAL, fdatasynced if sync, and
// publishes it in the wal-index. Caller holds d.mu and the WAL write lock.
//
// A group the log holds durably needs no fsync of its frames here: a
// crash that loses them, and maybe those of the groups before (the WAL's
// checksums keep a prefix of its frames), leaves the database behind the
// log at the end of one of its files, and the log's Open applies the files
// after it again (see ltx.ApplyTarget). So readers see it an fsync sooner.
// The frames are fsynced before the log compacts or prunes the group's
// files (syncAppliedWAL), and checkpoints fsync the database file they
// copy them into.
func (d *DB) appendWALTx(pgnos []uint32, pages [][]byte, commit, pageSize uint32, sync bool) error {
	if !d.wal.valid || d.wal.mxFrame == 0 && !d.applied.mine {
		if err := d.newWALGeneration(pageSize); err != nil {
			return err
		}
	}
	w := &d.wal
	if w.hdr.pageSize != pageSize {
		return fmt.Errorf("the WAL has pages of %d bytes, the transaction of %d", w.hdr.pageSize, pageSize)
	}
	if w.sumAt != w.mxFrame {
		w.sum1, w.sum2 = w.hdr.sum1, w.hdr.sum2
		frame := make([]byte, w.hdr.frameSize())
		for i := int64(0); i < w.mxFrame; i++ {
			if _, ok, err := w.hdr.readFrame(w.file, i, frame, &w.sum1, &w.sum2); err != nil {
				return err
			} else if !ok {
				return fmt.Errorf("WAL frame %d, before the last commit, is no longer valid", i)
			}
		}
		w.sumAt = w.mxFrame
	}
	buf, s1, s2 := encodeFrames(w.hdr, pgnos, pages, commit, w.sum1, w.sum2)
	if _, err := w.file.WriteAt(buf, w.hdr.frameOffset(w.mxFrame)); err != nil {
		return fmt.Errorf("append to the WAL: %w", err)
	}
	if sync {
		if err := syscall.Fdatasync(int(w.file.Fd())); err != nil {
			return fmt.Errorf("fsync the WAL: %w", err)
		}
	} else {
		d.applied.unsynced = true
	}
	shm, err := d.appliedShm()
	if err != nil {
		return err
	}
	grew, err := appendWalIndex(shm, uint32(w.mxFrame), pgnos)
	if err != nil {
		return err
	}
	if grew && d.shmResized != nil {
		d.shmResized()
	}
	for i, pgno := range pgnos {
		w.committed[pgno] = w.hdr.frameOffset(w.mxFrame + int64(i))
		d.applied.frames = append(d.applied.frames, pgno)
	}
	w.mxFrame += int64(len(pgnos))
	w.sum1, w.sum2, w.sumAt = s1, s2, w.mxFrame
	d.applied.nPage = commit
	return d.publishWalIndex(shm)
}

// publishWalIndex writes the wal-index header for the WAL as the applier
// has written it. Caller holds d.mu and the WAL write lock.
func (d *DB) publishWalIndex(shm *os.File) error {
	if grew, err := growShm(shm, walIndexBlockSize); err != nil {
		return err
	} else if grew && d.shmResized != nil {
		d.shmResized()
	}
	d.applied.change = readWalIndexChange(shm) + 1
	return writeWalIndexHdr(shm, walIndexHdr{
		change:   d.applied.change,
		pageSize: d.wal.hdr.pageSize,
		mxFrame:  uint32(d.wal.mxFrame),
		nPage:    d.applied.nPage,
		frameSum: [2]uint32{d.wal.sum1, d.wal.sum2},
		salt:     d.wal.hdr.saltBytes(),
	})
}

// newWALGeneration starts the WAL over: a new header, no frames, and the
// wal-index saying so with its checkpoint information reset. Caller holds
// d.mu, and no reader reads a frame of the WAL: the wal-index counts
// none, or the caller holds every READ lock but READ0.
func (d *DB) newWALGeneration(pageSize uint32) error {
	if d.wal.file == nil {
		if err := createWAL(d.path(walFile)); err != nil {
			return err
		}
		if err := d.openWALFile(); err != nil {
			return err
		}
	}
	var last *walHeader
	if d.wal.hdr.pageSize != 0 {
		last = &d.wal.hdr // valid, or folded
	}
	b, h, err := newWALHeader(pageSize, last)
	if err != nil {
		return err
	}
	// The generation is marked as the applier's before it holds a frame,
	// durably: a daemon that started without the mark would take the
	// frames for an app's transactions.
	salts := h.saltBytes()
	if err := durable.WriteFile(d.path(walAppliedFile), append(salts[:], bootID()...)); err != nil {
		return err
	}
	d.applied.mine = true
	d.walGenerations++
	// Written over from the start, as SQLite does, not truncated: frames
	// of the last generation fail its salts, and writing over allocated
	// blocks spares each fdatasync a journal commit.
	if _, err := d.wal.file.WriteAt(b, 0); err != nil {
		return fmt.Errorf("start the WAL over: %w", err)
	}
	d.resetWAL()
	d.wal.hdr, d.wal.valid = h, true
	d.wal.sum1, d.wal.sum2, d.wal.sumAt = h.sum1, h.sum2, 0
	d.applied.frames = d.applied.frames[:0]
	if d.applied.nPage == 0 {
		if size, err := (walView{d: d}).Size(); err == nil {
			d.applied.nPage = uint32(size / int64(pageSize))
		}
	}
	shm, err := d.appliedShm()
	if err != nil {
		return err
	}
	if err := d.publishWalIndex(shm); err != nil {
		return err
	}
	var ckpt [walIndexHdrBytes - shmBackfill]byte // nBackfill, read marks, ...
	order := binary.NativeEndian
	order.PutUint32(ckpt[4+4:], 0) // aReadMark[1]
	for i := 2; i < walNReader; i++ {
		order.PutUint32(ckpt[4+4*i:], readMarkNotUsed)
	}
	// aLock (8 bytes after the read marks) is SQLite's own, unused on unix.
	if _, err := shm.WriteAt(ckpt[:4*(1+walNReader)], shmBackfill); err != nil {
		return err
	}
	if _, err := shm.WriteAt(ckpt[4*(1+walNReader)+8:], shmBackfill+4*(1+walNReader)+8); err != nil {
		return err
	}
	return nil
}

// restartWAL starts a new WAL generation if every frame of the WAL is in
// the database file and no reader uses a frame of it, as SQLite's
// walRestartLog does before a write. Caller holds the WAL write lock.
func (f *FileSystem) restartWAL(ctx context.Context, d *DB, locks walLocks) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.wal.valid || d.wal.mxFrame == 0 || d.applied.backfill < uint32(d.wal.mxFrame) {
		return nil
	}
	ok, err := locks.try(ctx, walReadLock0+1, walReadLock0+walNReader-1)
	if err != nil || !ok {
		return err
	}
	defer func() { _ = locks.unlock(walReadLock0+1, walReadLock0+walNReader-1) }()
	d.applied.backfill = 0
	return d.newWALGeneration(d.wal.hdr.pageSize)
}

// checkpointWAL copies into the database file the frames that every
// reader's snapshot includes, as SQLite's passive checkpoint does, and
// records how far it got (nBackfill). It waits for no reader. Caller
// holds the WAL write lock.
func (f *FileSystem) checkpointWAL(ctx context.Context, d *DB, locks walLocks) error {
	d.mu.Lock()
	mx, backfill := uint32(d.wal.mxFrame), d.applied.backfill
	d.mu.Unlock()
	if mx < f.foldFrames() || backfill >= mx {
		return nil
	}
	// The database file gets only what the log holds durably.
	if err := d.log.AwaitLogged(ctx); err != nil {
		return err
	}
	d.mu.Lock()
	shm, err := d.appliedShm()
	d.mu.Unlock()
	if err != nil {
		return err
	}
	order := binary.NativeEndian
	var marks [4 * walNReader]byte
	if _, err := shm.ReadAt(marks[:], shmReadMark); err != nil {
		return err
	}
	safe := mx
	for i := uint64(1); i < walNReader; i++ {
		y := order.Uint32(marks[4*i:])
		if safe <= y {
			continue
		}
		ok, err := locks.try(ctx, walReadLock0+i, walReadLock0+i)
		if err != nil {
			return err
		}
		if !ok {
			safe = y // a reader's snapshot ends there
			continue
		}
		mark := uint32(readMarkNotUsed)
		if i == 1 {
			mark = safe
		}
		var b [4]byte
		order.PutUint32(b[:], mark)
		_, werr := shm.WriteAt(b[:], shmReadMark+4*int64(i))
		_ = locks.unlock(walReadLock0+i, walReadLock0+i)
		if werr != nil {
			return werr
		}
	}
	if safe <= backfill {
		d.warnUnfolded(mx, backfill, f.foldFrames())
		return nil
	}
	// Readers of the database file alone (READ0) must not see it change.
	ok, err := locks.try(ctx, walReadLock0, walReadLock0)
	if err != nil || !ok {
		d.warnUnfolded(mx, backfill, f.foldFrames())
		return err
	}
	defer func() { _ = locks.unlock(walReadLock0, walReadLock0) }()
	d.mu.Lock()
	var before int64
	if st, err := d.file.Stat(); err == nil {
		before = st.Size()
	}
	pgnos, err := d.copyFrames(backfill, safe, safe == mx)
	ps := d.wal.hdr.pageSize
	d.mu.Unlock()
	if err != nil {
		return err
	}
	// Readers that begin once nBackfill has moved read these pages from
	// the database file: the kernel's copies go first, and the kernel
	// learns the size of a file the copy grew, as after an apply into the
	// database file (storeSize): a reader that trusted an old size would
	// read the new pages at its end as zeros.
	if err := f.storeSize(d, before, ps); err != nil {
		return err
	}
	if err := f.invalidate(d, false, ps, pgnos); err != nil {
		return err
	}
	var b [4]byte
	order.PutUint32(b[:], safe)
	if _, err := shm.WriteAt(b[:], shmBackfill); err != nil {
		return err
	}
	d.mu.Lock()
	d.applied.backfill = safe
	d.mu.Unlock()
	return nil
}

// foldFrames is how many frames a WAL holds before a checkpoint.
func (f *FileSystem) foldFrames() uint32 {
	if f.checkpointFrames > 0 {
		return f.checkpointFrames
	}
	return walFoldFrames
}

// warnUnfolded logs, at most every readHoldWarning, that readers keep the
// WAL from being copied into the database file.
func (d *DB) warnUnfolded(mx, backfill, fold uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if mx < 10*fold || time.Since(d.applied.warned) < readHoldWarning {
		return
	}
	d.applied.warned = time.Now()
	d.logger.Warn("read transactions on the mount keep the WAL from being checkpointed: it grows until they end", "wal_frames", mx, "checkpointed", backfill)
}

// copyFrames writes the last frame of each page among frames from+1 to
// to into the database file, truncates it to the database size if to is
// the last frame (all), and fsyncs it. It returns the pages written.
// Caller holds d.mu.
func (d *DB) copyFrames(from, to uint32, all bool) ([]uint32, error) {
	ps := int64(d.wal.hdr.pageSize)
	last := map[uint32]int64{}
	for i := from; i < to; i++ {
		if pgno := d.applied.frames[i]; pgno != 0 {
			last[pgno] = int64(i)
		}
	}
	pgnos := make([]uint32, 0, len(last))
	for pgno := range last {
		if pgno <= d.applied.nPage {
			pgnos = append(pgnos, pgno)
		}
	}
	slices.Sort(pgnos)
	page := make([]byte, ps)
	for _, pgno := range pgnos {
		if _, err := d.wal.file.ReadAt(page, d.wal.hdr.frameOffset(last[pgno])+walFrameHeaderSize); err != nil {
			return nil, fmt.Errorf("read WAL frame %d: %w", last[pgno], err)
		}
		if _, err := d.file.WriteAt(page, int64(pgno-1)*ps); err != nil {
			return nil, fmt.Errorf("checkpoint into the database file: %w", err)
		}
	}
	if all {
		if err := d.file.Truncate(int64(d.applied.nPage) * ps); err != nil {
			return nil, fmt.Errorf("checkpoint into the database file: %w", err)
		}
	}
	if err := d.file.Sync(); err != nil {
		return nil, fmt.Errorf("checkpoint into the database file: fsync: %w", err)
	}
	return pgnos, nil
}

// truncateWAL empties the backing WAL. A WAL fenced against the writers
// that opened it before the mount became read-only (fenceWAL) is made
// writable for the moment and fenced again: the caller holds SQLite's
// writers off, so none of them writes meanwhile. Caller holds d.mu.
func (d *DB) truncateWAL() error {
	if d.walFenced {
		if err := setImmutable(d.wal.file, false); err != nil {
			return fmt.Errorf("WAL of %s: %w", d.Name, err)
		}
		defer func() {
			if err := setImmutable(d.wal.file, true); err != nil {
				d.logger.Error("fence the WAL again after emptying it", "db", d.Name, "err", err)
			}
		}()
	}
	return d.wal.file.Truncate(0)
}

// foldWAL copies every committed frame of a WAL the applier wrote (with
// any, of any WAL: a replica's apply into the database file must not
// leave older pages in the WAL, where readers would find them first) into
// the database file and starts the WAL over, empty, with no reader able
// to see it happen: at start, before the mount serves the database, or
// under a hold of every WAL lock. It returns the pages written. Caller
// holds d.mu.
func (d *DB) foldWAL(any bool) ([]uint32, error) {
	if !d.walApplied() && !(any && d.walActive()) {
		return nil, nil
	}
	if d.applied.nPage == 0 {
		// At start: the database size after the WAL's last commit.
		if size, err := (walView{d: d}).Size(); err == nil {
			d.applied.nPage = uint32(size / int64(d.wal.hdr.pageSize))
		}
	}
	var pgnos []uint32
	if d.wal.mxFrame > 0 {
		if len(d.applied.frames) != int(d.wal.mxFrame) {
			// Frames found at start: their pages, from the committed map.
			d.applied.frames = make([]uint32, d.wal.mxFrame)
			for pgno, off := range d.wal.committed {
				d.applied.frames[(off-walHeaderSize)/d.wal.hdr.frameSize()] = pgno
			}
		}
		var err error
		if pgnos, err = d.copyFrames(0, uint32(d.wal.mxFrame), true); err != nil {
			return nil, err
		}
	}
	if err := d.truncateWAL(); err != nil {
		return nil, err
	}
	if err := os.Remove(d.path(walAppliedFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	// The next reader finds the wal-index not initialized and builds it
	// from the empty WAL. The -shm keeps its size: readers map it.
	if _, err := os.Stat(d.path(shmFile)); err == nil {
		shm, err := d.appliedShm()
		if err == nil {
			_, err = shm.WriteAt(make([]byte, walIndexHdrBytes), 0)
		}
		if err != nil {
			return nil, fmt.Errorf("reset the wal-index: %w", err)
		}
	}
	d.resetWAL()
	d.wal.valid = false
	d.applied = appliedWAL{shm: d.applied.shm}
	return pgnos, nil
}

// appliedShm returns the backing -shm, opened once and kept open: closing a
// file drops every POSIX lock its process holds on it. Caller holds d.mu.
func (d *DB) appliedShm() (*os.File, error) {
	if d.applied.shm != nil {
		return d.applied.shm, nil
	}
	shm, err := os.OpenFile(d.path(shmFile), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	d.applied.shm = shm
	return shm, nil
}

// walApplied reports whether the WAL's generation is the applier's.
// Caller holds d.mu.
func (d *DB) walApplied() bool { return d.applied.mine }

// readWALAppliedMark learns, at start, whether the WAL's generation is the
// one an applier started before, by the mark it left: the only time the
// mark is read, since afterwards the applier knows. Caller holds d.mu.
func (d *DB) readWALAppliedMark() error {
	b, err := os.ReadFile(d.path(walAppliedFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	s := d.wal.hdr.saltBytes()
	d.applied.mine = d.wal.valid && len(b) >= len(s) && string(b[:len(s)]) == string(s[:])
	if d.applied.mine {
		d.applied.boot = string(b[len(s):])
	}
	return nil
}

// bootID returns the kernel's boot ID, which changes at every boot, ""
// if it cannot be read.
var bootID = func() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// rebootedSinceApplied reports whether the machine may have lost what the
// page cache held since the applier started the WAL's generation: it
// booted since (or either boot is unknown). A daemon that merely crashed
// finds everything it wrote, durable or not. Caller holds d.mu.
func (d *DB) rebootedSinceApplied() bool {
	now := bootID()
	return now == "" || d.applied.boot != now
}

// syncAppliedWAL fdatasyncs the WAL if the applier appended frames to it
// without an fsync since (appendWALTx).
func (d *DB) syncAppliedWAL() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.applied.unsynced || d.wal.file == nil {
		return nil
	}
	if err := syscall.Fdatasync(int(d.wal.file.Fd())); err != nil {
		return fmt.Errorf("fsync the WAL: %w", err)
	}
	d.applied.unsynced = false
	return nil
}

// appliedWAL is what the applier knows of the WAL it writes.
type appliedWAL struct {
	mine     bool     // the WAL's generation is the applier's
	boot     string   // the boot ID its mark holds (readWALAppliedMark)
	unsynced bool     // frames were appended without an fsync (see syncAppliedWAL)
	shm      *os.File // the backing -shm (appliedShm)
	frames   []uint32 // page of each frame of the generation
	nPage    uint32   // database size after the last commit
	change   uint32   // the wal-index header's iChange
	backfill uint32   // frames in the database file (nBackfill)
	warned   time.Time
}

// foldForWriting copies the WAL the applier wrote into the database file,
// under a hold of the readers, for a replica that becomes writable.
func (f *FileSystem) foldForWriting(d *DB) {
	// The app's writers need the WAL write lock the applier kept.
	if d.walWriteHeld.Swap(false) {
		locks, err := f.walLocksOf(d)
		if err == nil {
			err = locks.unlock(walWriteLock, walWriteLock)
		}
		if err != nil {
			f.Logger.Error("drop the WAL write lock the applier kept", "db", d.Name, "err", err)
		}
	}
	d.mu.Lock()
	mine := d.walApplied()
	d.mu.Unlock()
	if !mine {
		return
	}
	if err := d.log.AwaitLogged(context.Background()); err != nil {
		f.Logger.Error("copy the WAL the replica wrote into the database file", "db", d.Name, "err", err)
		return
	}
	hold, err := f.holdReaders(context.Background(), d)
	if err != nil {
		f.Logger.Error("copy the WAL the replica wrote into the database file", "db", d.Name, "err", err)
		return
	}
	defer hold.release()
	d.mu.Lock()
	_, err = d.foldWAL(false)
	d.mu.Unlock()
	if err == nil {
		err = f.invalidate(d, true, 0, nil)
	}
	if err == nil {
		// The emptied WAL and the reset wal-index: what the kernel holds
		// of either is stale, for readers that stay open across the
		// switch and for the app's writers after it.
		err = errors.Join(f.invalidateShm(d), f.invalidateNode(d.Name+"-wal"))
	}
	if err != nil {
		f.Logger.Error("copy the WAL the replica wrote into the database file", "db", d.Name, "err", err)
	}
}

// invalidateNode drops the kernel's cached data and attributes of the
// mount's file name, if it has been looked up.
func (f *FileSystem) invalidateNode(name string) error {
	f.mu.Lock()
	n := f.names[name]
	f.mu.Unlock()
	if n == nil || f.server == nil {
		return nil
	}
	if st := f.server.InodeNotify(n.id, 0, 0); !st.Ok() && st != fuse.ENOENT {
		return fmt.Errorf("invalidate the cache of %s: %v", name, st)
	}
	return nil
}

// invalidateShmAttr drops the kernel's attributes of d's -shm, whose size
// the applier changed in the backing file. It takes no lock: the caller
// may hold d.mu, and dropping attributes alone sends the daemon nothing.
func (f *FileSystem) invalidateShmAttr(d *DB) {
	node := d.shmNode.Load()
	if node == 0 || f.server == nil {
		return // no reader opened it: nothing cached
	}
	if st := f.server.InodeNotify(node, -1, 0); !st.Ok() && st != fuse.ENOENT {
		f.Logger.Warn("drop the cached size of a -shm", "db", d.Name, "status", st)
	}
}

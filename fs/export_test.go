package fs

import (
	"context"
	"fmt"
	"time"
)

// SetFailpoint makes operation name of f fail with what fn returns for it
// (nil: no failure); nil removes it. Names: "wal-sync", the fsync of a WAL.
func (f *FileSystem) SetFailpoint(fn func(name string) error) {
	if fn == nil {
		f.failpoint.Store(nil)
		return
	}
	f.failpoint.Store(&fn)
}

// ScanUncommitted scans d's WAL as capture does and reports whether it
// holds a transaction, commit frame included, that the wal-index does not
// count (see scanWAL).
func (d *DB) ScanUncommitted() (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	err := d.scanWAL(context.Background())
	return d.wal.uncommitted.found, err
}

// WithoutKernelPassthrough has f serve every file itself, as on a kernel
// without FUSE passthrough: the WAL, and the -shm, whose wal-index capture
// then reads in the kernel's page cache. Call it before Open.
func (f *FileSystem) WithoutKernelPassthrough() {
	f.passthroughOff = true
}

// Freeze stops d for good, for a process about to be killed: it takes
// d.mu and never gives it back, so no write to the database file, scan or
// log sync under it happens any more.
func (d *DB) Freeze() {
	d.mu.Lock()
}

// HoldReaders holds the readers of database name off as an apply does,
// until release is called.
func (f *FileSystem) HoldReaders(ctx context.Context, name string) (release func(), err error) {
	d := f.DB(name)
	if d == nil {
		return nil, fmt.Errorf("no database %s", name)
	}
	h, err := f.holdReaders(ctx, d)
	if err != nil {
		return nil, err
	}
	return h.release, nil
}

// LockHolderPid returns the PID of f's running lock holder, 0 if none.
func (f *FileSystem) LockHolderPid() int {
	f.holderMu.Lock()
	defer f.holderMu.Unlock()
	if f.holder == nil || !f.holder.alive() {
		return 0
	}
	return f.holder.cmd.Process.Pid
}

// ReadersOpen reports whether a process other than the lock holder has
// database name or its -shm open.
func (f *FileSystem) ReadersOpen(name string) bool {
	return f.readersOpen(f.DB(name))
}

// QueuedLocks returns how many lock requests wait in d's lock tables.
func (d *DB) QueuedLocks() int {
	n := 0
	for _, t := range []*LockTable{&d.Locks, &d.ShmLocks} {
		t.mu.Lock()
		n += len(t.waiting)
		t.mu.Unlock()
	}
	return n
}

// SetReadHoldWarning sets how long an apply waits for readers before the
// log names them.
func (f *FileSystem) SetReadHoldWarning(d time.Duration) { f.readHoldWarning = d }

// SetCheckpointFrames sets how many frames a replica's WAL holds before a
// checkpoint copies them into the database file.
func (f *FileSystem) SetCheckpointFrames(n uint32) { f.checkpointFrames = n }

// WALFrames returns how many frames the WAL of database name holds, how
// many of them are in the database file, and how many WAL generations the
// applier has started.
func (f *FileSystem) WALFrames(name string) (frames, checkpointed uint32, generations uint64) {
	d := f.DB(name)
	d.mu.Lock()
	defer d.mu.Unlock()
	return uint32(d.wal.mxFrame), d.applied.backfill, d.walGenerations
}

// SnapshotPagesKept returns how many pages d's snapshots have kept, in
// all, for being changed before they were read.
func (d *DB) SnapshotPagesKept() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.snapKept
}

// SetSnapshotKeepMax sets how many bytes of pages a snapshot keeps before
// it holds writers off for the rest of its read, and returns the old bound.
func SetSnapshotKeepMax(n int64) int64 { return snapshotKeepMax.Swap(n) }

// SetBootID makes the kernel's boot ID id, as after a reboot, until the
// test ends.
func SetBootID(tb interface{ Cleanup(func()) }, id string) {
	was := bootID
	bootID = func() string { return id }
	tb.Cleanup(func() { bootID = was })
}

// SetEarlyPublished makes fn run between the publish of a group applied
// into the database file and the file's fsync, until the test ends.
func SetEarlyPublished(tb interface{ Cleanup(func()) }, fn func()) {
	was := earlyPublished
	earlyPublished = fn
	tb.Cleanup(func() { earlyPublished = was })
}

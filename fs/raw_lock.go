package fs

import (
	"context"
	"math"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// lockTable returns the lock table of n: SQLite locks the database file
// and the -shm file, nothing else. flock(2) locks (whole file, per open
// file) are kept apart from POSIX locks, as the kernel keeps them.
func lockTable(n *node, flock bool) *LockTable {
	switch {
	case n.kind == kindDB && flock:
		return &n.db.flocks
	case n.kind == kindDB:
		return &n.db.Locks
	case n.kind == kindShm && flock:
		return &n.db.shmFlocks
	case n.kind == kindShm:
		return &n.db.ShmLocks
	}
	return nil
}

// holdWait bounds how long an app's F_SETLK waits for the end of a
// replica's apply that holds SQLite's readers off (LockTable.WaitLock).
// An apply holds them for about a millisecond; past the bound, when the
// apply itself waits for a long read transaction, SQLite gets EAGAIN and
// tries again after its own sleep, as without the wait.
const holdWait = time.Second

func (r *raw) GetLk(cancel <-chan struct{}, in *fuse.LkIn, out *fuse.LkOut) fuse.Status {
	n := r.node(in.NodeId)
	if n == nil {
		return fuse.ENOENT
	}
	t := lockTable(n, in.LkFlags&fuse.FUSE_LK_FLOCK != 0)
	if t == nil {
		return fuse.ENOSYS
	}
	if l, ok := t.Test(in.Owner, in.Lk.Typ, in.Lk.Start, in.Lk.End); ok {
		out.Lk = fuse.FileLock{Start: l.Start, End: l.End, Typ: l.Typ, Pid: l.Pid}
	} else {
		out.Lk = fuse.FileLock{Typ: syscall.F_UNLCK}
	}
	return fuse.OK
}

func (r *raw) SetLk(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	return r.setLk(cancel, in, false)
}

func (r *raw) SetLkw(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	return r.setLk(cancel, in, true)
}

func (r *raw) setLk(cancel <-chan struct{}, in *fuse.LkIn, wait bool) fuse.Status {
	n := r.node(in.NodeId)
	if n == nil {
		return fuse.ENOENT
	}
	flock := in.LkFlags&fuse.FUSE_LK_FLOCK != 0
	t := lockTable(n, flock)
	if t == nil {
		return fuse.ENOSYS
	}
	if flock {
		in.Lk.Start, in.Lk.End = 0, math.MaxUint64
	}
	if in.Lk.Typ == syscall.F_WRLCK && !flock && !r.fs.holdWrite(cancel, n, t, in.Owner, in.Caller.Pid, in.Lk.Start, in.Lk.End) {
		return fuse.EAGAIN // interrupted, or stepped down, while it waited for a handoff
	}
	if in.Lk.Typ == syscall.F_WRLCK && !flock && r.fs.writesExpired() && isWriteLock(n, in.Lk.Start, in.Lk.End) && !r.fs.isLockHolder(in.Caller.Pid) {
		// A write transaction would begin: in WAL mode with passthrough
		// nothing else asks the mount before its commit.
		r.fs.refuseExpired("write lock", n.name, in.Caller.Pid)
		return fuse.EAGAIN
	}
	committed := fuse.OK
	if n.kind == kindShm && !flock && in.Lk.Typ != syscall.F_WRLCK && in.Lk.Start <= walLockOffset && walLockOffset <= in.Lk.End {
		committed = r.beforeWALUnlock(cancel, in.Caller.Pid, n, in.Owner)
	}
	var errno syscall.Errno
	switch {
	case wait && in.Lk.Typ != syscall.F_UNLCK:
		ctx, stop := cancelContext(cancel)
		errno = t.Lock(ctx, in.Owner, in.Lk.Pid, in.Lk.Typ, in.Lk.Start, in.Lk.End)
		stop()
	case in.Lk.Typ != syscall.F_UNLCK && !flock:
		errno = t.TryLock(in.Owner, in.Lk.Pid, in.Lk.Typ, in.Lk.Start, in.Lk.End)
		if errno != syscall.EAGAIN {
			break
		}
		// Held off by a replica's apply, the request waits for its end
		// rather than send SQLite into its back-off (see WaitLock).
		ctx, stop := cancelContext(cancel)
		ctx, cancelWait := context.WithTimeout(ctx, holdWait)
		errno = t.WaitLock(ctx, in.Owner, in.Lk.Pid, in.Lk.Typ, in.Lk.Start, in.Lk.End, daemonLockOwner)
		cancelWait()
		stop()
	default:
		errno = t.TryLock(in.Owner, in.Lk.Pid, in.Lk.Typ, in.Lk.Start, in.Lk.End)
	}
	if errno != 0 {
		return fuse.Status(errno)
	}
	if n.kind == kindDB && !flock && in.Lk.Typ == syscall.F_UNLCK {
		return r.afterUnlock(cancel, in.Caller.Pid, n)
	}
	return committed
}

// isWriteLock reports whether a write lock on start..end of n is one a
// writer of SQLite takes to write: any on the database file (RESERVED and
// above, in rollback-journal mode) or the WAL write lock of the -shm.
func isWriteLock(n *node, start, end uint64) bool {
	switch n.kind {
	case kindDB:
		return true
	case kindShm:
		return start <= walLockOffset && walLockOffset <= end
	}
	return false
}

// afterUnlock lets capture see the end of a change that no journal marks
// (a program copying a database in), on database file n.
func (r *raw) afterUnlock(cancel <-chan struct{}, caller uint32, n *node) fuse.Status {
	d := n.db
	if !d.hasDirty.Load() {
		return fuse.OK // nothing written: the common case, a reader unlocking
	}
	d.mu.Lock()
	before := d.committed
	if err := d.unlocked(context.Background()); err != nil {
		d.logger.Error("commit at unlock", "err", err)
	}
	after := d.committed
	d.mu.Unlock()
	return r.fs.awaitCommit(cancel, caller, n, before, after, fuse.OK)
}

// beforeWALUnlock is called before owner gives up, or may give up, the
// WAL write lock of -shm node n: if it holds it, the transaction it
// committed is in the wal-index now, and nobody else can write the WAL
// until the lock goes. The WAL is scanned then, so that the commit is
// taken before the writer's unlock returns and before another writer
// can write over frames it left uncommitted; and the commit wait (sync
// durability) holds the unlock, and so the app's COMMIT, with the lock
// still held, for every transaction committed since the last such wait
// (another trigger, a read of the position say, may have taken it in the
// instant between the wal-index's update and the unlock). It returns what
// the unlock must return.
func (r *raw) beforeWALUnlock(cancel <-chan struct{}, caller uint32, n *node, owner uint64) fuse.Status {
	d := n.db
	if !d.ShmLocks.HeldBy(owner, syscall.F_WRLCK, walLockOffset) {
		return fuse.OK
	}
	d.mu.Lock()
	if err := d.scanWAL(context.Background()); err != nil {
		d.logger.Error("scan the WAL at the end of a write transaction", "err", err)
	}
	d.settlePrecommitted()
	before, after := d.walHeld, d.committed
	d.walHeld = after
	d.mu.Unlock()
	return r.fs.awaitCommit(cancel, caller, n, before, after, fuse.OK)
}

// cancelContext returns a context done when cancel is closed.
func cancelContext(cancel <-chan struct{}) (context.Context, func()) {
	ctx, stop := context.WithCancel(context.Background())
	go func() {
		select {
		case <-cancel:
			stop()
		case <-ctx.Done():
		}
	}()
	return ctx, stop
}

package fs

import (
	"cmp"
	"context"
	"math"
	"slices"
	"sync"
	"syscall"
	"time"
)

// LockTable holds the POSIX advisory locks of one file: the byte-range locks
// that processes set with fcntl(F_SETLK/F_SETLKW) and query with F_GETLK,
// forwarded by FUSE, plus the locks the daemon takes itself to hold SQLite
// off while it writes.
//
// Every lock belongs to an owner: the kernel's lock owner of a FUSE request
// (one per open file table), or an id the daemon picks for its own locks.
// An owner never conflicts with itself; locking or unlocking part of its own
// ranges splits, converts or merges them as POSIX requires.
//
// The zero value is an empty table ready to use. A LockTable is safe for
// concurrent use by multiple goroutines.
type LockTable struct {
	mu sync.Mutex
	// locks is sorted by Start then Owner. The ranges of one owner are
	// disjoint, and two ranges of one owner with the same type never touch.
	locks []Lock
	// released is closed and cleared when a lock is released or downgraded.
	// It is nil while nobody waits.
	released chan struct{}
	// waiting are the locks Lock and WaitLock calls wait for, oldest
	// first. While a write lock waits, a new lock over any of its bytes
	// is refused to every other owner that holds no lock over them:
	// readers whose transactions overlap one another could otherwise keep
	// a writer out for ever (POSIX leaves the order open, and Linux's own
	// locks starve writers that way). Owners that hold a lock there may
	// still change it, so that they can finish and let the writer in. A
	// read lock that waits (WaitLock) goes before new write locks over its
	// bytes in the same way, so that a writer that takes its locks again
	// and again lets waiting readers in between.
	waiting  []waiter
	lastWait uint64
	// fresh are the owners WaitLock let in after they waited, until they
	// take a lock again or their deadline passes (see AwaitFresh).
	fresh map[uint64]time.Time
}

// freshGrace is how long AwaitFresh waits at most for an owner WaitLock
// let in to take its next lock.
const freshGrace = 5 * time.Millisecond

// waiter is a lock a Lock or WaitLock call waits for; seq orders waiters.
type waiter struct {
	Lock
	seq uint64
}

// Lock is one held lock range.
type Lock struct {
	Owner      uint64
	Pid        uint32
	Typ        uint32 // syscall.F_RDLCK or syscall.F_WRLCK
	Start, End uint64 // inclusive; End is math.MaxUint64 for "to end of file"
}

// overlaps reports whether l shares a byte with [start,end].
func (l Lock) overlaps(start, end uint64) bool {
	return l.Start <= end && start <= l.End
}

// touches reports whether l ends just before start or starts just after end.
// It is false when l overlaps [start,end].
func (l Lock) touches(start, end uint64) bool {
	return (l.End < start && l.End+1 == start) || (end < l.Start && end+1 == l.Start)
}

// conflicts reports whether a lock of typ taken by owner over [start,end]
// conflicts with l. Read locks only conflict with write locks.
func (l Lock) conflicts(owner uint64, typ uint32, start, end uint64) bool {
	return l.Owner != owner && l.overlaps(start, end) &&
		(typ == syscall.F_WRLCK || l.Typ == syscall.F_WRLCK)
}

// Test returns the first lock, in the order of Locks, held by another owner
// that conflicts with a lock of typ (syscall.F_RDLCK or syscall.F_WRLCK) over
// [start,end], or false if there is none. It implements F_GETLK. An invalid
// typ or range reports no conflict.
func (t *LockTable) Test(owner uint64, typ uint32, start, end uint64) (Lock, bool) {
	if start > end || (typ != syscall.F_RDLCK && typ != syscall.F_WRLCK) {
		return Lock{}, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.conflictLocked(owner, typ, start, end)
}

// TryLock sets (typ syscall.F_RDLCK or syscall.F_WRLCK) or clears
// (syscall.F_UNLCK) owner's lock over [start,end] without waiting. It
// implements F_SETLK.
//
// Owner's own ranges are replaced: a write lock over part of a read lock
// converts that part, an unlock in the middle of a range splits it, and
// overlapping or adjacent ranges of the same type merge into one that records
// pid. TryLock returns syscall.EAGAIN, changing nothing, if another owner
// holds a conflicting lock; syscall.EINVAL if typ is unknown or start > end;
// and 0 on success. Unlocking a range that is not held succeeds.
func (t *LockTable) TryLock(owner uint64, pid uint32, typ uint32, start, end uint64) syscall.Errno {
	t.mu.Lock()
	defer t.mu.Unlock()
	errno := t.setLocked(owner, pid, typ, start, end, math.MaxUint64)
	if errno == 0 && typ != syscall.F_UNLCK {
		t.lockedLocked(owner, false)
	}
	return errno
}

// lockedLocked records that owner took a lock, after waiting in WaitLock
// (waited) or not.
func (t *LockTable) lockedLocked(owner uint64, waited bool) {
	switch {
	case waited:
		if t.fresh == nil {
			t.fresh = make(map[uint64]time.Time)
		}
		t.fresh[owner] = time.Now().Add(freshGrace)
	case t.fresh != nil:
		if _, ok := t.fresh[owner]; ok {
			delete(t.fresh, owner)
			t.notifyLocked()
		}
	}
}

// AwaitFresh waits, up to freshGrace and ctx, until every owner that
// WaitLock let in after a wait has taken a lock again. A holder calls it
// before it takes its locks again: a reader let in may find it must start
// over (a SQLite reader in WAL mode that finds the wal-index header
// changed drops its read lock and takes it again), and without the grace
// the holder's next locks would keep it out once more.
func (t *LockTable) AwaitFresh(ctx context.Context) {
	for {
		t.mu.Lock()
		now := time.Now()
		var next time.Time
		for owner, deadline := range t.fresh {
			if !deadline.After(now) {
				delete(t.fresh, owner)
			} else if next.IsZero() || deadline.Before(next) {
				next = deadline
			}
		}
		if next.IsZero() {
			t.mu.Unlock()
			return
		}
		changed := t.watchLocked()
		t.mu.Unlock()
		timer := time.NewTimer(next.Sub(now))
		select {
		case <-changed:
		case <-timer.C:
		case <-ctx.Done():
		}
		timer.Stop()
		if ctx.Err() != nil {
			return
		}
	}
}

// Lock is TryLock that waits while another owner holds a conflicting lock.
// It implements F_SETLKW. It returns syscall.EINTR if ctx is done before the
// lock can be taken, and otherwise what TryLock returns, never EAGAIN. A
// waiter retries each time any lock in the table is released or downgraded.
// A write lock that waits goes before new locks over its bytes (see
// LockTable), and after write locks that waited before it. Lock does not
// detect deadlocks; cancel ctx to give up.
func (t *LockTable) Lock(ctx context.Context, owner uint64, pid uint32, typ uint32, start, end uint64) syscall.Errno {
	seq := uint64(math.MaxUint64)
	defer func() { t.dequeue(seq) }()
	for {
		t.mu.Lock()
		errno := t.setLocked(owner, pid, typ, start, end, seq)
		if errno != syscall.EAGAIN {
			t.mu.Unlock()
			return errno
		}
		if typ == syscall.F_WRLCK && seq == math.MaxUint64 {
			seq = t.enqueueLocked(Lock{Owner: owner, Pid: pid, Typ: typ, Start: start, End: end})
			// A WaitLock call that waits for this owner while it holds
			// bytes this lock needs must give up: wake it to look again.
			t.notifyLocked()
		}
		released := t.watchLocked()
		t.mu.Unlock()

		select {
		case <-released:
		case <-ctx.Done():
			return syscall.EINTR
		}
	}
}

// WaitLock is TryLock that waits, up to ctx, while what stands in the way
// is only holder's: locks holder holds, or holder's write locks that wait
// and go first. It is how a reader's F_SETLK meets the daemon's hold of a
// replica's readers (holder daemonLockOwner): SQLite never waits in the
// kernel, it sleeps and tries again, and against a holder that takes its
// locks again as soon as it has dropped them those tries can fail for
// seconds. A reader queued here instead gets in as the hold ends, before
// the holder's next lock over its bytes.
//
// WaitLock does not wait, and returns syscall.EAGAIN at once, when another
// owner's lock is in the way, or when owner holds a lock over bytes a
// waiting write lock of holder's needs: holder may be waiting for owner.
// It returns syscall.EAGAIN when ctx ends with ctx.Err()
// context.DeadlineExceeded, syscall.EINTR when it ends otherwise, and
// otherwise what TryLock returns.
func (t *LockTable) WaitLock(ctx context.Context, owner uint64, pid uint32, typ uint32, start, end uint64, holder uint64) syscall.Errno {
	seq := uint64(math.MaxUint64)
	defer func() { t.dequeue(seq) }()
	for {
		t.mu.Lock()
		errno := t.setLocked(owner, pid, typ, start, end, seq)
		if errno == 0 {
			t.lockedLocked(owner, seq != math.MaxUint64)
		}
		if errno != syscall.EAGAIN || !t.onlyHolderLocked(owner, typ, start, end, seq, holder) {
			t.mu.Unlock()
			return errno
		}
		if seq == math.MaxUint64 {
			seq = t.enqueueLocked(Lock{Owner: owner, Pid: pid, Typ: typ, Start: start, End: end})
		}
		released := t.watchLocked()
		t.mu.Unlock()

		select {
		case <-released:
		case <-ctx.Done():
			if ctx.Err() == context.DeadlineExceeded {
				return syscall.EAGAIN
			}
			return syscall.EINTR
		}
	}
}

// enqueueLocked puts l at the end of the waiting locks and returns its place.
func (t *LockTable) enqueueLocked(l Lock) uint64 {
	t.lastWait++
	t.waiting = append(t.waiting, waiter{l, t.lastWait})
	return t.lastWait
}

// dequeue takes the waiter at seq, if any (math.MaxUint64: none), off the
// waiting locks and wakes the others: a waiter after it may go now.
func (t *LockTable) dequeue(seq uint64) {
	if seq == math.MaxUint64 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.waiting = slices.DeleteFunc(t.waiting, func(w waiter) bool { return w.seq == seq })
	t.notifyLocked()
}

// onlyHolderLocked reports whether everything that keeps owner's lock of
// typ over [start,end], queued at seq, out is holder's, and owner holds no
// lock that a waiting write lock of holder's needs.
func (t *LockTable) onlyHolderLocked(owner uint64, typ uint32, start, end uint64, seq uint64, holder uint64) bool {
	for _, l := range t.locks {
		if l.conflicts(owner, typ, start, end) && l.Owner != holder {
			return false
		}
	}
	for _, w := range t.waiting {
		if w.Owner != holder {
			if w.seq < seq && w.blocks(owner, typ, start, end) {
				return false
			}
			continue
		}
		if w.Typ == syscall.F_WRLCK && slices.ContainsFunc(t.locks, func(l Lock) bool { return l.Owner == owner && l.overlaps(w.Start, w.End) }) {
			return false
		}
	}
	return true
}

// ReleaseOwner drops every lock of owner. FUSE calls for it on FLUSH and
// RELEASE with the lock owner, when a process closes the file or exits.
func (t *LockTable) ReleaseOwner(owner uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(t.locks)
	t.locks = slices.DeleteFunc(t.locks, func(l Lock) bool { return l.Owner == owner })
	if _, ok := t.fresh[owner]; ok {
		delete(t.fresh, owner) // closed the file, or gone
		n = -1
	}
	if len(t.locks) != n {
		t.notifyLocked()
	}
}

// Locks returns a copy of the held locks sorted by Start, then Owner.
func (t *LockTable) Locks() []Lock {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.locks)
}

// HeldBy reports whether owner holds a lock of type typ over byte off.
func (t *LockTable) HeldBy(owner uint64, typ uint32, off uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.ContainsFunc(t.locks, func(l Lock) bool { return l.Owner == owner && l.Typ == typ && l.overlaps(off, off) })
}

// HoldsWrite reports whether owner holds a write lock anywhere.
func (t *LockTable) HoldsWrite(owner uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.ContainsFunc(t.locks, func(l Lock) bool { return l.Owner == owner && l.Typ == syscall.F_WRLCK })
}

// WriteHeld reports whether any owner holds a write lock that overlaps
// [start,end], and if so returns a channel that is closed the next time a
// lock is released or downgraded (Watch).
func (t *LockTable) WriteHeld(start, end uint64) (<-chan struct{}, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !slices.ContainsFunc(t.locks, func(l Lock) bool { return l.Typ == syscall.F_WRLCK && l.overlaps(start, end) }) {
		return nil, false
	}
	return t.watchLocked(), true
}

// Held reports whether any owner holds a lock that overlaps [start,end].
func (t *LockTable) Held(start, end uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.ContainsFunc(t.locks, func(l Lock) bool { return l.overlaps(start, end) })
}

// Watch returns a channel that is closed the next time a lock in the table is
// released or downgraded from write to read. Taking or upgrading a lock does
// not close it.
func (t *LockTable) Watch() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.watchLocked()
}

func (t *LockTable) watchLocked() chan struct{} {
	if t.released == nil {
		t.released = make(chan struct{})
	}
	return t.released
}

func (t *LockTable) notifyLocked() {
	if t.released != nil {
		close(t.released)
		t.released = nil
	}
}

// blocks reports whether waiter w, of another owner, would conflict with
// owner's lock of typ over [start,end]: a waiting read lock only goes
// before write locks.
func (w waiter) blocks(owner uint64, typ uint32, start, end uint64) bool {
	return w.Owner != owner && w.overlaps(start, end) && (w.Typ == syscall.F_WRLCK || typ == syscall.F_WRLCK)
}

// waiterFirstLocked reports whether a lock that waits, of another owner
// and before seq, goes before owner's new lock of typ over [start,end]:
// the two conflict, and owner holds no lock there.
func (t *LockTable) waiterFirstLocked(owner uint64, typ uint32, start, end uint64, seq uint64) bool {
	for _, w := range t.waiting {
		if w.seq >= seq || !w.blocks(owner, typ, start, end) {
			continue
		}
		held := slices.ContainsFunc(t.locks, func(l Lock) bool {
			return l.Owner == owner && l.overlaps(max(start, w.Start), min(end, w.End))
		})
		if !held {
			return true
		}
	}
	return false
}

func (t *LockTable) conflictLocked(owner uint64, typ uint32, start, end uint64) (Lock, bool) {
	for _, l := range t.locks {
		if l.conflicts(owner, typ, start, end) {
			return l, true
		}
	}
	return Lock{}, false
}

// setLocked is TryLock with t.mu held, for a caller that goes after the
// waiters before seq (math.MaxUint64: all of them).
func (t *LockTable) setLocked(owner uint64, pid uint32, typ uint32, start, end uint64, seq uint64) syscall.Errno {
	if start > end || (typ != syscall.F_RDLCK && typ != syscall.F_WRLCK && typ != syscall.F_UNLCK) {
		return syscall.EINVAL
	}
	if typ != syscall.F_UNLCK {
		if _, ok := t.conflictLocked(owner, typ, start, end); ok {
			return syscall.EAGAIN
		}
		if t.waiterFirstLocked(owner, typ, start, end, seq) {
			return syscall.EAGAIN
		}
	}

	// Rebuild the table: keep other owners' locks, merge owner's same-type
	// ranges that overlap or touch [start,end] into the new lock, and cut
	// [start,end] out of owner's other ranges.
	added := Lock{Owner: owner, Pid: pid, Typ: typ, Start: start, End: end}
	next := make([]Lock, 0, len(t.locks)+2)
	released := false
	for _, l := range t.locks {
		switch {
		case l.Owner != owner:
			next = append(next, l)
		case l.Typ == typ && (l.overlaps(start, end) || l.touches(start, end)):
			added.Start, added.End = min(added.Start, l.Start), max(added.End, l.End)
		case l.overlaps(start, end):
			// A different type: an unlock, a downgrade or an upgrade.
			released = released || typ != syscall.F_WRLCK
			if l.Start < start {
				next = append(next, Lock{Owner: owner, Pid: l.Pid, Typ: l.Typ, Start: l.Start, End: start - 1})
			}
			if l.End > end {
				next = append(next, Lock{Owner: owner, Pid: l.Pid, Typ: l.Typ, Start: end + 1, End: l.End})
			}
		default:
			next = append(next, l)
		}
	}
	if typ != syscall.F_UNLCK {
		next = append(next, added)
	}
	slices.SortFunc(next, func(a, b Lock) int {
		return cmp.Or(cmp.Compare(a.Start, b.Start), cmp.Compare(a.Owner, b.Owner))
	})
	t.locks = next
	if released {
		t.notifyLocked()
	}
	return 0
}

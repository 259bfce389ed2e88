package fs

// Internal test: the blocking tests look at LockTable.released to know when a
// waiter has parked, so they need no sleeps.

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const (
	rd = syscall.F_RDLCK
	wr = syscall.F_WRLCK
	un = syscall.F_UNLCK
)

// SQLite's lock bytes in a database file (os_unix.c) and in a WAL index
// (-shm) file (wal.c).
const (
	sqlitePending    = 0x40000000
	sqliteReserved   = sqlitePending + 1
	sqliteSharedFrom = sqlitePending + 2
	sqliteSharedTo   = sqliteSharedFrom + 510 - 1

	shmWrite = 120
	shmCkpt  = 121
	shmRead0 = 123
	shmRead1 = 124
	shmDMS   = 128
)

func mustTryLock(tb testing.TB, lt *LockTable, owner uint64, pid, typ uint32, start, end uint64, want syscall.Errno) {
	tb.Helper()
	if got := lt.TryLock(owner, pid, typ, start, end); got != want {
		tb.Fatalf("TryLock(owner=%d, typ=%d, [%#x,%#x]): got %v (%d), want %v (%d)", owner, typ, start, end, got, got, want, want)
	}
}

func assertLocks(tb testing.TB, lt *LockTable, want ...Lock) {
	tb.Helper()
	if got := lt.Locks(); !slices.Equal(got, want) {
		tb.Fatalf("Locks():\n got %+v\nwant %+v", got, want)
	}
}

func TestLockTable_SQLiteDatabase(t *testing.T) {
	var lt LockTable
	// shared takes SQLite's SHARED lock the way unixLock does: a read lock
	// on PENDING guards a read lock on the SHARED range.
	shared := func(owner uint64, want syscall.Errno) {
		t.Helper()
		pid := uint32(owner) + 100
		mustTryLock(t, &lt, owner, pid, rd, sqlitePending, sqlitePending, want)
		if want != 0 {
			return
		}
		mustTryLock(t, &lt, owner, pid, rd, sqliteSharedFrom, sqliteSharedTo, 0)
		mustTryLock(t, &lt, owner, pid, un, sqlitePending, sqlitePending, 0)
	}

	shared(1, 0)
	shared(2, 0)
	assertLocks(t, &lt,
		Lock{Owner: 1, Pid: 101, Typ: rd, Start: sqliteSharedFrom, End: sqliteSharedTo},
		Lock{Owner: 2, Pid: 102, Typ: rd, Start: sqliteSharedFrom, End: sqliteSharedTo},
	)

	// RESERVED: one writer while readers keep reading.
	mustTryLock(t, &lt, 1, 101, wr, sqliteReserved, sqliteReserved, 0)
	mustTryLock(t, &lt, 2, 102, wr, sqliteReserved, sqliteReserved, syscall.EAGAIN)

	// PENDING keeps new readers out while the writer waits for old ones.
	mustTryLock(t, &lt, 1, 101, wr, sqlitePending, sqlitePending, 0)
	shared(3, syscall.EAGAIN)
	if got, ok := lt.Test(3, rd, sqlitePending, sqlitePending); !ok ||
		got != (Lock{Owner: 1, Pid: 101, Typ: wr, Start: sqlitePending, End: sqliteReserved}) {
		t.Fatalf("Test PENDING: got %+v, %v, want owner 1's write lock", got, ok)
	}

	// EXCLUSIVE fails while reader 2 holds SHARED, and F_GETLK names it.
	mustTryLock(t, &lt, 1, 101, wr, sqliteSharedFrom, sqliteSharedTo, syscall.EAGAIN)
	if got, ok := lt.Test(1, wr, sqliteSharedFrom, sqliteSharedTo); !ok ||
		got != (Lock{Owner: 2, Pid: 102, Typ: rd, Start: sqliteSharedFrom, End: sqliteSharedTo}) {
		t.Fatalf("Test SHARED: got %+v, %v, want reader 2's lock", got, ok)
	}
	assertLocks(t, &lt,
		Lock{Owner: 1, Pid: 101, Typ: wr, Start: sqlitePending, End: sqliteReserved},
		Lock{Owner: 1, Pid: 101, Typ: rd, Start: sqliteSharedFrom, End: sqliteSharedTo},
		Lock{Owner: 2, Pid: 102, Typ: rd, Start: sqliteSharedFrom, End: sqliteSharedTo},
	)

	// Reader 2 finishes; the writer's read lock converts to a write lock
	// and its three adjacent write ranges coalesce.
	mustTryLock(t, &lt, 2, 102, un, 0, math.MaxUint64, 0)
	mustTryLock(t, &lt, 1, 101, wr, sqliteSharedFrom, sqliteSharedTo, 0)
	assertLocks(t, &lt, Lock{Owner: 1, Pid: 101, Typ: wr, Start: sqlitePending, End: sqliteSharedTo})
	if _, ok := lt.Test(3, rd, 0, math.MaxUint64); !ok {
		t.Fatal("Test: got no conflict with EXCLUSIVE, want one")
	}

	// Back to SHARED the way posixUnlock does it.
	mustTryLock(t, &lt, 1, 101, rd, sqliteSharedFrom, sqliteSharedTo, 0)
	mustTryLock(t, &lt, 1, 101, un, sqlitePending, sqlitePending+1, 0)
	assertLocks(t, &lt, Lock{Owner: 1, Pid: 101, Typ: rd, Start: sqliteSharedFrom, End: sqliteSharedTo})
	shared(3, 0)
	assertLocks(t, &lt,
		Lock{Owner: 1, Pid: 101, Typ: rd, Start: sqliteSharedFrom, End: sqliteSharedTo},
		Lock{Owner: 3, Pid: 103, Typ: rd, Start: sqliteSharedFrom, End: sqliteSharedTo},
	)
	if !lt.Held(sqlitePending, sqliteSharedFrom) || lt.Held(0, sqliteReserved) {
		t.Fatalf("Held: got %v, %v, want true, false", lt.Held(sqlitePending, sqliteSharedFrom), lt.Held(0, sqliteReserved))
	}
}

func TestLockTable_SQLiteWALIndex(t *testing.T) {
	var lt LockTable
	// The first connection gets DMS exclusively, then holds it shared.
	mustTryLock(t, &lt, 1, 101, wr, shmDMS, shmDMS, 0)
	watch := lt.Watch()
	mustTryLock(t, &lt, 1, 101, rd, shmDMS, shmDMS, 0)
	select {
	case <-watch:
	default:
		t.Fatal("Watch: not closed by the DMS downgrade")
	}
	mustTryLock(t, &lt, 2, 102, wr, shmDMS, shmDMS, syscall.EAGAIN)
	mustTryLock(t, &lt, 2, 102, rd, shmDMS, shmDMS, 0)
	mustTryLock(t, &lt, 3, 103, rd, shmDMS, shmDMS, 0)

	// One writer at a time; readers share read marks; a checkpointer
	// cannot take a read mark in use.
	mustTryLock(t, &lt, 1, 101, wr, shmWrite, shmWrite, 0)
	mustTryLock(t, &lt, 2, 102, wr, shmWrite, shmWrite, syscall.EAGAIN)
	mustTryLock(t, &lt, 1, 101, rd, shmRead1, shmRead1, 0)
	mustTryLock(t, &lt, 2, 102, rd, shmRead1, shmRead1, 0)
	mustTryLock(t, &lt, 2, 102, rd, shmRead0, shmRead0, 0)
	mustTryLock(t, &lt, 3, 103, wr, shmCkpt, shmCkpt, 0)
	mustTryLock(t, &lt, 3, 103, wr, shmRead1, shmRead1, syscall.EAGAIN)
	mustTryLock(t, &lt, 3, 103, rd, shmWrite, shmWrite, syscall.EAGAIN)
	assertLocks(t, &lt,
		Lock{Owner: 1, Pid: 101, Typ: wr, Start: shmWrite, End: shmWrite},
		Lock{Owner: 3, Pid: 103, Typ: wr, Start: shmCkpt, End: shmCkpt},
		Lock{Owner: 2, Pid: 102, Typ: rd, Start: shmRead0, End: shmRead1},
		Lock{Owner: 1, Pid: 101, Typ: rd, Start: shmRead1, End: shmRead1},
		Lock{Owner: 1, Pid: 101, Typ: rd, Start: shmDMS, End: shmDMS},
		Lock{Owner: 2, Pid: 102, Typ: rd, Start: shmDMS, End: shmDMS},
		Lock{Owner: 3, Pid: 103, Typ: rd, Start: shmDMS, End: shmDMS},
	)

	// Connection 1 closes; 2 can write, but DMS stays shared by 2 and 3.
	lt.ReleaseOwner(1)
	mustTryLock(t, &lt, 2, 102, wr, shmWrite, shmWrite, 0)
	mustTryLock(t, &lt, 2, 102, wr, shmDMS, shmDMS, syscall.EAGAIN)
	assertLocks(t, &lt,
		Lock{Owner: 2, Pid: 102, Typ: wr, Start: shmWrite, End: shmWrite},
		Lock{Owner: 3, Pid: 103, Typ: wr, Start: shmCkpt, End: shmCkpt},
		Lock{Owner: 2, Pid: 102, Typ: rd, Start: shmRead0, End: shmRead1},
		Lock{Owner: 2, Pid: 102, Typ: rd, Start: shmDMS, End: shmDMS},
		Lock{Owner: 3, Pid: 103, Typ: rd, Start: shmDMS, End: shmDMS},
	)
}

func TestLockTable_TryLock(t *testing.T) {
	t.Run("Split", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 7, wr, 0, 99, 0)
		mustTryLock(t, &lt, 1, 7, un, 40, 59, 0)
		assertLocks(t, &lt,
			Lock{Owner: 1, Pid: 7, Typ: wr, Start: 0, End: 39},
			Lock{Owner: 1, Pid: 7, Typ: wr, Start: 60, End: 99},
		)
		mustTryLock(t, &lt, 2, 8, wr, 40, 59, 0)
		mustTryLock(t, &lt, 2, 8, rd, 39, 40, syscall.EAGAIN)
	})
	t.Run("Convert", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 7, rd, 0, 99, 0)
		mustTryLock(t, &lt, 1, 7, wr, 50, 59, 0)
		assertLocks(t, &lt,
			Lock{Owner: 1, Pid: 7, Typ: rd, Start: 0, End: 49},
			Lock{Owner: 1, Pid: 7, Typ: wr, Start: 50, End: 59},
			Lock{Owner: 1, Pid: 7, Typ: rd, Start: 60, End: 99},
		)
		// Converting back merges the three into one.
		mustTryLock(t, &lt, 1, 7, rd, 50, 59, 0)
		assertLocks(t, &lt, Lock{Owner: 1, Pid: 7, Typ: rd, Start: 0, End: 99})
	})
	t.Run("UpgradeBlockedByReader", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 7, rd, 0, 99, 0)
		mustTryLock(t, &lt, 2, 8, rd, 90, 90, 0)
		mustTryLock(t, &lt, 1, 7, wr, 0, 99, syscall.EAGAIN)
		assertLocks(t, &lt,
			Lock{Owner: 1, Pid: 7, Typ: rd, Start: 0, End: 99},
			Lock{Owner: 2, Pid: 8, Typ: rd, Start: 90, End: 90},
		)
	})
	t.Run("Coalesce", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 7, wr, 10, 19, 0)
		mustTryLock(t, &lt, 1, 7, wr, 30, 39, 0)
		mustTryLock(t, &lt, 1, 7, rd, 20, 29, 0) // touches both, other type
		mustTryLock(t, &lt, 2, 8, wr, 40, 49, 0) // touches, other owner
		assertLocks(t, &lt,
			Lock{Owner: 1, Pid: 7, Typ: wr, Start: 10, End: 19},
			Lock{Owner: 1, Pid: 7, Typ: rd, Start: 20, End: 29},
			Lock{Owner: 1, Pid: 7, Typ: wr, Start: 30, End: 39},
			Lock{Owner: 2, Pid: 8, Typ: wr, Start: 40, End: 49},
		)
		mustTryLock(t, &lt, 1, 9, wr, 20, 29, 0)
		assertLocks(t, &lt,
			Lock{Owner: 1, Pid: 9, Typ: wr, Start: 10, End: 39},
			Lock{Owner: 2, Pid: 8, Typ: wr, Start: 40, End: 49},
		)
		mustTryLock(t, &lt, 1, 9, wr, 5, 12, 0) // overlaps
		mustTryLock(t, &lt, 1, 9, wr, 0, 4, 0)  // touches
		assertLocks(t, &lt,
			Lock{Owner: 1, Pid: 9, Typ: wr, Start: 0, End: 39},
			Lock{Owner: 2, Pid: 8, Typ: wr, Start: 40, End: 49},
		)
	})
	t.Run("EndOfFile", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 7, rd, 100, math.MaxUint64, 0)
		// 0 follows MaxUint64 only by overflow: no merge.
		mustTryLock(t, &lt, 1, 7, rd, 0, 9, 0)
		mustTryLock(t, &lt, 1, 7, wr, 50, 99, 0)
		assertLocks(t, &lt,
			Lock{Owner: 1, Pid: 7, Typ: rd, Start: 0, End: 9},
			Lock{Owner: 1, Pid: 7, Typ: wr, Start: 50, End: 99},
			Lock{Owner: 1, Pid: 7, Typ: rd, Start: 100, End: math.MaxUint64},
		)
		mustTryLock(t, &lt, 2, 8, rd, math.MaxUint64, math.MaxUint64, 0)
		mustTryLock(t, &lt, 2, 8, wr, math.MaxUint64, math.MaxUint64, syscall.EAGAIN)
		mustTryLock(t, &lt, 1, 7, un, 0, math.MaxUint64, 0)
		assertLocks(t, &lt, Lock{Owner: 2, Pid: 8, Typ: rd, Start: math.MaxUint64, End: math.MaxUint64})
		mustTryLock(t, &lt, 2, 8, un, 0, math.MaxUint64, 0)
		assertLocks(t, &lt)
	})
	t.Run("UnlockNotHeld", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 2, 8, wr, 0, 9, 0)
		watch := lt.Watch()
		mustTryLock(t, &lt, 1, 7, un, 0, math.MaxUint64, 0)
		assertLocks(t, &lt, Lock{Owner: 2, Pid: 8, Typ: wr, Start: 0, End: 9})
		select {
		case <-watch:
			t.Fatal("Watch: closed by an unlock that released nothing")
		default:
		}
	})
	t.Run("EINVAL", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 7, wr, 10, 9, syscall.EINVAL)
		mustTryLock(t, &lt, 1, 7, 99, 0, 9, syscall.EINVAL)
		assertLocks(t, &lt)
	})
}

func TestLockTable_Test(t *testing.T) {
	var lt LockTable
	mustTryLock(t, &lt, 1, 101, rd, 0, 9, 0)
	mustTryLock(t, &lt, 2, 102, rd, 5, 14, 0)
	mustTryLock(t, &lt, 2, 102, wr, 40, 49, 0)
	mustTryLock(t, &lt, 1, 101, rd, 20, 29, 0)

	for _, tc := range []struct {
		owner      uint64
		typ        uint32
		start, end uint64
		want       Lock
		wantOK     bool
	}{
		{owner: 3, typ: rd, start: 0, end: 4},
		{owner: 3, typ: wr, start: 0, end: 4, want: Lock{Owner: 1, Pid: 101, Typ: rd, Start: 0, End: 9}, wantOK: true},
		{owner: 3, typ: wr, start: 10, end: 100, want: Lock{Owner: 2, Pid: 102, Typ: rd, Start: 5, End: 14}, wantOK: true},
		{owner: 3, typ: rd, start: 0, end: 100, want: Lock{Owner: 2, Pid: 102, Typ: wr, Start: 40, End: 49}, wantOK: true},
		{owner: 2, typ: wr, start: 0, end: 100, want: Lock{Owner: 1, Pid: 101, Typ: rd, Start: 0, End: 9}, wantOK: true},
		{owner: 2, typ: wr, start: 10, end: 19},
		{owner: 1, typ: wr, start: 30, end: math.MaxUint64, want: Lock{Owner: 2, Pid: 102, Typ: wr, Start: 40, End: 49}, wantOK: true},
		{owner: 1, typ: rd, start: 30, end: 39},
		{owner: 3, typ: un, start: 0, end: 100},
		{owner: 3, typ: wr, start: 9, end: 0},
	} {
		got, ok := lt.Test(tc.owner, tc.typ, tc.start, tc.end)
		if got != tc.want || ok != tc.wantOK {
			t.Fatalf("Test(%d, %d, [%d,%d]): got %+v, %v, want %+v, %v", tc.owner, tc.typ, tc.start, tc.end, got, ok, tc.want, tc.wantOK)
		}
	}
}

// lockWaitTimeout bounds each wait of the lock table tests.
const lockWaitTimeout = 10 * time.Second

// waitParked returns once a Lock call is blocked on lt.released, and fails
// if done was closed meanwhile.
func waitParked(tb testing.TB, lt *LockTable, done <-chan syscall.Errno) {
	tb.Helper()
	deadline := time.Now().Add(lockWaitTimeout)
	for !parked(lt) {
		select {
		case errno := <-done:
			tb.Fatalf("Lock returned %v before the lock was free", errno)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("waiting for Lock to park: not parked in %v", lockWaitTimeout)
		}
		runtime.Gosched()
	}
}

// waitReturned returns what a Lock call returned after the lock it waited
// for was freed, and fails if the call parked again instead.
func waitReturned(tb testing.TB, lt *LockTable, done <-chan syscall.Errno) syscall.Errno {
	tb.Helper()
	deadline := time.Now().Add(lockWaitTimeout)
	for {
		select {
		case errno := <-done:
			return errno
		default:
		}
		if parked(lt) {
			tb.Fatal("Lock still waits after the lock was freed")
		}
		if time.Now().After(deadline) {
			tb.Fatalf("waiting for Lock to return: not returned in %v", lockWaitTimeout)
		}
		runtime.Gosched()
	}
}

// parked reports whether a goroutine may be blocked in lt.Lock: the release
// channel exists only while someone waits for it (nobody else calls Watch in
// these tests).
func parked(lt *LockTable) bool {
	lt.mu.Lock()
	defer lt.mu.Unlock()
	return lt.released != nil
}

func TestLockTable_Lock(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 101, wr, 0, 9, 0)
		mustTryLock(t, &lt, 2, 102, rd, 20, 29, 0)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		defer wg.Wait()
		defer cancel() // a failed test must not leave the waiter blocked
		done := make(chan syscall.Errno, 1)
		wg.Go(func() { done <- lt.Lock(ctx, 3, 103, wr, 5, 25) })

		waitParked(t, &lt, done)
		lt.ReleaseOwner(2) // wakes the waiter, which still conflicts with 1
		waitParked(t, &lt, done)
		lt.ReleaseOwner(1)
		if errno := waitReturned(t, &lt, done); errno != 0 {
			t.Fatalf("Lock: got %v, want 0", errno)
		}
		assertLocks(t, &lt, Lock{Owner: 3, Pid: 103, Typ: wr, Start: 5, End: 25})
	})
	t.Run("Downgrade", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 101, wr, 0, 9, 0)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		defer wg.Wait()
		defer cancel() // a failed test must not leave the waiter blocked
		done := make(chan syscall.Errno, 1)
		wg.Go(func() { done <- lt.Lock(ctx, 2, 102, rd, 0, 0) })

		waitParked(t, &lt, done)
		mustTryLock(t, &lt, 1, 101, rd, 0, 9, 0)
		if errno := waitReturned(t, &lt, done); errno != 0 {
			t.Fatalf("Lock: got %v, want 0", errno)
		}
		assertLocks(t, &lt,
			Lock{Owner: 1, Pid: 101, Typ: rd, Start: 0, End: 9},
			Lock{Owner: 2, Pid: 102, Typ: rd, Start: 0, End: 0},
		)
	})
	t.Run("EINTR", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 1, 101, rd, 0, 9, 0)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		defer wg.Wait()
		defer cancel()
		done := make(chan syscall.Errno, 1)
		wg.Go(func() { done <- lt.Lock(ctx, 2, 102, wr, 9, 9) })

		waitParked(t, &lt, done)
		cancel()
		select {
		case errno := <-done:
			if errno != syscall.EINTR {
				t.Fatalf("Lock: got %v, want EINTR", errno)
			}
		case <-time.After(lockWaitTimeout):
			t.Fatalf("waiting for Lock to return after its context was cancelled: not returned in %v", lockWaitTimeout)
		}
		assertLocks(t, &lt, Lock{Owner: 1, Pid: 101, Typ: rd, Start: 0, End: 9})
	})
	t.Run("MutualExclusion", func(t *testing.T) {
		var lt LockTable
		var inside atomic.Int32
		var wg sync.WaitGroup
		for owner := range uint64(8) {
			wg.Go(func() {
				for range 200 {
					if errno := lt.Lock(context.Background(), owner, 1, wr, 3, 3); errno != 0 {
						t.Errorf("Lock: got %v, want 0", errno)
						return
					}
					if n := inside.Add(1); n != 1 {
						t.Errorf("got %d owners inside the lock, want 1", n)
					}
					inside.Add(-1)
					if errno := lt.TryLock(owner, 1, un, 0, math.MaxUint64); errno != 0 {
						t.Errorf("unlock: got %v, want 0", errno)
					}
				}
			})
		}
		finished := make(chan struct{})
		go func() { wg.Wait(); close(finished) }()
		select {
		case <-finished:
		case <-time.After(lockWaitTimeout):
			t.Fatalf("waiting for the lockers to finish: not done in %v", lockWaitTimeout)
		}
		assertLocks(t, &lt)
	})
}

// The model keeps per-cell lock state: cells 0..63 are bytes 0..63 and cell
// 64 stands for [64, MaxUint64], so ranges to end of file are covered too.
const modelCells = 65

type lockModel [modelCells]map[uint64]uint32

func cellStart(c int) uint64 { return uint64(c) }

func cellEnd(c int) uint64 {
	if c == modelCells-1 {
		return math.MaxUint64
	}
	return uint64(c)
}

type lockOp struct {
	kind   int // 0 read, 1 write, 2 unlock, 3 release owner, 4 Test read, 5 Test write
	owner  uint64
	lo, hi int // cells; hi < lo is an invalid range
}

func decodeLockOp(b [3]byte) lockOp {
	return lockOp{kind: int(b[0] % 6), owner: uint64(b[0]/6) % 4, lo: int(b[1]) % modelCells, hi: int(b[2]) % modelCells}
}

func (op lockOp) String() string {
	return fmt.Sprintf("{kind %d owner %d [%d,%d]}", op.kind, op.owner, op.lo, op.hi)
}

func pidOf(owner uint64) uint32 { return uint32(owner) + 100 }

// tryLock applies a lock op to the model and reports its result and whether
// it released or downgraded anything.
func (m *lockModel) tryLock(owner uint64, typ uint32, lo, hi int) (syscall.Errno, bool) {
	if lo > hi {
		return syscall.EINVAL, false
	}
	for c := lo; c <= hi; c++ {
		for o, ot := range m[c] {
			if typ != un && o != owner && (typ == wr || ot == wr) {
				return syscall.EAGAIN, false
			}
		}
	}
	released := false
	for c := lo; c <= hi; c++ {
		old, held := m[c][owner]
		released = released || (held && typ == un) || (held && old == wr && typ == rd)
		if typ == un {
			delete(m[c], owner)
			continue
		}
		if m[c] == nil {
			m[c] = map[uint64]uint32{}
		}
		m[c][owner] = typ
	}
	return 0, released
}

// locks returns the canonical lock list of the model: maximal runs of cells
// with one owner and type, sorted by Start then Owner.
func (m *lockModel) locks() []Lock {
	var out []Lock
	for owner := range uint64(4) {
		for c := 0; c < modelCells; c++ {
			typ, ok := m[c][owner]
			if !ok {
				continue
			}
			l := Lock{Owner: owner, Pid: pidOf(owner), Typ: typ, Start: cellStart(c), End: cellEnd(c)}
			for c+1 < modelCells {
				if next, ok := m[c+1][owner]; !ok || next != typ {
					break
				}
				c++
				l.End = cellEnd(c)
			}
			out = append(out, l)
		}
	}
	slices.SortFunc(out, func(a, b Lock) int {
		return cmp.Or(cmp.Compare(a.Start, b.Start), cmp.Compare(a.Owner, b.Owner))
	})
	return out
}

// step applies op to lt and the model and fails if they disagree.
func (m *lockModel) step(tb testing.TB, lt *LockTable, op lockOp) {
	tb.Helper()
	start, end := cellStart(op.lo), cellEnd(op.hi)
	watch := lt.Watch()
	var wantReleased bool
	switch op.kind {
	case 0, 1, 2:
		typ := []uint32{rd, wr, un}[op.kind]
		want, released := m.tryLock(op.owner, typ, op.lo, op.hi)
		wantReleased = released
		if got := lt.TryLock(op.owner, pidOf(op.owner), typ, start, end); got != want {
			tb.Fatalf("%v: TryLock got %v, want %v", op, got, want)
		}
	case 3:
		for c := range m {
			_, held := m[c][op.owner]
			wantReleased = wantReleased || held
			delete(m[c], op.owner)
		}
		lt.ReleaseOwner(op.owner)
	case 4, 5:
		typ := []uint32{rd, wr}[op.kind-4]
		var want Lock
		wantOK := false
		if op.lo <= op.hi {
			for _, l := range m.locks() {
				if l.conflicts(op.owner, typ, start, end) {
					want, wantOK = l, true
					break
				}
			}
		}
		if got, ok := lt.Test(op.owner, typ, start, end); got != want || ok != wantOK {
			tb.Fatalf("%v: Test got %+v, %v, want %+v, %v", op, got, ok, want, wantOK)
		}
	}

	want := m.locks()
	if got := lt.Locks(); !slices.Equal(got, want) {
		tb.Fatalf("%v: Locks():\n got %+v\nwant %+v", op, got, want)
	}
	if op.lo <= op.hi {
		wantHeld := slices.ContainsFunc(want, func(l Lock) bool { return l.overlaps(start, end) })
		if got := lt.Held(start, end); got != wantHeld {
			tb.Fatalf("%v: Held got %v, want %v", op, got, wantHeld)
		}
	}
	gotReleased := false
	select {
	case <-watch:
		gotReleased = true
	default:
	}
	if gotReleased != wantReleased {
		tb.Fatalf("%v: Watch closed %v, want %v", op, gotReleased, wantReleased)
	}
}

func TestLockTable_Model(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 300 {
		var lt LockTable
		var m lockModel
		for range 300 {
			op := lockOp{kind: rng.IntN(6), owner: rng.Uint64N(4), lo: rng.IntN(modelCells)}
			switch r := rng.IntN(20); {
			case r == 0 && op.lo > 0:
				op.hi = op.lo - 1 // invalid
			case r < 3:
				op.hi = modelCells - 1 // to end of file
			default:
				op.hi = min(op.lo+rng.IntN(12), modelCells-1)
			}
			m.step(t, &lt, op)
		}
	}
}

func FuzzLockTable(f *testing.F) {
	f.Add([]byte{})
	// Owner 0 reads [64,Max] then [0,5]: must not merge across the overflow.
	f.Add([]byte{0, 64, 64, 0, 0, 5, 0, 6, 63})
	// Owners 0 and 1 read, owner 1 wants write, owner 0 downgrades a write.
	f.Add([]byte{0, 0, 9, 6, 5, 20, 7, 5, 5, 1, 0, 9, 0, 3, 3, 11, 0, 64})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 3*64 {
			// TestLockTable_Model runs long sequences; here they only
			// make each run and the minimizing of new inputs slow.
			t.Skip("more than 64 ops")
		}
		var lt LockTable
		var m lockModel
		for len(data) >= 3 {
			m.step(t, &lt, decodeLockOp([3]byte(data)))
			data = data[3:]
		}
	})
}

// TestLockTable_WriterWaitsFirst: while a write lock waits for readers,
// owners that hold nothing there cannot take new locks over its bytes,
// so readers whose locks overlap one another cannot keep it out for ever;
// the readers already in may change their own locks and leave, and the
// writer gets in once the last of them has. Two waiters go in the order
// they came.
func TestLockTable_WriterWaitsFirst(t *testing.T) {
	var lt LockTable
	mustTryLock(t, &lt, 1, 101, rd, 5, 5, 0)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // a failed test must not leave a waiter blocked
	first := make(chan syscall.Errno, 1)
	wg.Go(func() { first <- lt.Lock(ctx, 9, 109, wr, 0, 9) })
	waitParked(t, &lt, first)

	// A new reader of byte 5, or of any byte the writer waits for, waits:
	// without the waiter it would get in beside owner 1.
	mustTryLock(t, &lt, 2, 102, rd, 5, 5, syscall.EAGAIN)
	mustTryLock(t, &lt, 2, 102, rd, 8, 12, syscall.EAGAIN)
	mustTryLock(t, &lt, 2, 102, rd, 10, 12, 0) // past the writer's bytes
	// Owner 1, in already, may take its byte again and more of the range.
	mustTryLock(t, &lt, 1, 101, rd, 5, 6, 0)
	// A second writer waits behind the first.
	second := make(chan syscall.Errno, 1)
	wg.Go(func() { second <- lt.Lock(ctx, 8, 108, wr, 5, 5) })
	waitParked(t, &lt, second)

	lt.ReleaseOwner(1)
	if errno := <-first; errno != 0 {
		t.Fatalf("first writer: Lock returned %v, want 0", errno)
	}
	assertLocks(t, &lt,
		Lock{Owner: 9, Pid: 109, Typ: wr, Start: 0, End: 9},
		Lock{Owner: 2, Pid: 102, Typ: rd, Start: 10, End: 12},
	)
	// The second goes next, before a reader that comes after it.
	lt.ReleaseOwner(9)
	if errno := waitReturned(t, &lt, second); errno != 0 {
		t.Fatalf("second writer: Lock returned %v, want 0", errno)
	}
	mustTryLock(t, &lt, 3, 103, rd, 5, 5, syscall.EAGAIN)
	lt.ReleaseOwner(8)
	mustTryLock(t, &lt, 3, 103, rd, 5, 5, 0)

	// A waiter that gives up stops going first.
	cancelled, stop := context.WithCancel(context.Background())
	gaveUp := make(chan syscall.Errno, 1)
	wg.Go(func() { gaveUp <- lt.Lock(cancelled, 7, 107, wr, 5, 5) })
	waitParked(t, &lt, gaveUp)
	mustTryLock(t, &lt, 4, 104, rd, 5, 5, syscall.EAGAIN)
	stop()
	if errno := <-gaveUp; errno != syscall.EINTR {
		t.Fatalf("cancelled writer: Lock returned %v, want EINTR", errno)
	}
	mustTryLock(t, &lt, 4, 104, rd, 5, 5, 0)
}

// queued reports whether n calls wait in lt's queue, each on lt.released.
func queued(lt *LockTable, n int) bool {
	lt.mu.Lock()
	defer lt.mu.Unlock()
	return lt.released != nil && len(lt.waiting) == n
}

// waitQueued returns once n calls wait in lt's queue.
func waitQueued(tb testing.TB, lt *LockTable, n int) {
	tb.Helper()
	deadline := time.Now().Add(lockWaitTimeout)
	for !queued(lt, n) {
		if time.Now().After(deadline) {
			tb.Fatalf("waiting for %d calls to queue: not queued in %v", n, lockWaitTimeout)
		}
		runtime.Gosched()
	}
}

func TestLockTable_WaitLock(t *testing.T) {
	const holder = 100
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel() // a failed test must not leave a waiter blocked

	t.Run("ReaderGoesBeforeTheHoldersNextLock", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, holder, 1, wr, 0, 9, 0)
		reader := make(chan syscall.Errno, 1)
		wg.Go(func() { reader <- lt.WaitLock(ctx, 2, 102, rd, 5, 5, holder) })
		waitQueued(t, &lt, 1)
		lt.ReleaseOwner(holder)
		// The reader was queued first: the holder, taking its locks again
		// at once, waits for it, before and after the reader has its lock.
		mustTryLock(t, &lt, holder, 1, wr, 0, 9, syscall.EAGAIN)
		if errno := waitReturned(t, &lt, reader); errno != 0 {
			t.Fatalf("reader: WaitLock returned %v, want 0", errno)
		}
		assertLocks(t, &lt, Lock{Owner: 2, Pid: 102, Typ: rd, Start: 5, End: 5})
		mustTryLock(t, &lt, holder, 1, wr, 0, 9, syscall.EAGAIN)
		// Let in after a wait, the reader is fresh until it locks again
		// (AwaitFresh waits for that), as a WAL reader does.
		if got := freshOwners(&lt); !slices.Equal(got, []uint64{2}) {
			t.Fatalf("fresh owners %v, want the reader's", got)
		}
		mustTryLock(t, &lt, 2, 102, syscall.F_UNLCK, 5, 5, 0)
		if got := freshOwners(&lt); !slices.Equal(got, []uint64{2}) {
			t.Fatalf("fresh owners %v after the reader's unlock, want the reader's", got)
		}
		awaited := make(chan struct{})
		wg.Go(func() { lt.AwaitFresh(ctx); close(awaited) })
		mustTryLock(t, &lt, 2, 102, rd, 5, 5, 0)
		if got := freshOwners(&lt); len(got) != 0 {
			t.Fatalf("fresh owners %v after the reader locked again, want none", got)
		}
		select {
		case <-awaited:
		case <-time.After(lockWaitTimeout):
			t.Fatalf("AwaitFresh did not return in %v after the reader locked again", lockWaitTimeout)
		}
		// Readers do not queue behind a waiting reader.
		mustTryLock(t, &lt, 3, 103, rd, 5, 5, 0)
		lt.ReleaseOwner(2)
		lt.ReleaseOwner(3)
		mustTryLock(t, &lt, holder, 1, wr, 0, 9, 0)
	})

	t.Run("OnlyForTheHolder", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 3, 103, wr, 20, 20, 0)
		mustTryLock(t, &lt, holder, 1, wr, 0, 9, 0)
		// Another owner's lock is in the way: no wait.
		if errno := lt.WaitLock(ctx, 2, 102, rd, 20, 20, holder); errno != syscall.EAGAIN {
			t.Fatalf("WaitLock over another owner's lock: got %v, want EAGAIN", errno)
		}
		if errno := lt.WaitLock(ctx, 2, 102, rd, 5, 25, holder); errno != syscall.EAGAIN {
			t.Fatalf("WaitLock over the holder's and another owner's locks: got %v, want EAGAIN", errno)
		}
		// A free range is taken at once.
		if errno := lt.WaitLock(ctx, 2, 102, rd, 10, 19, holder); errno != 0 {
			t.Fatalf("WaitLock over free bytes: got %v, want 0", errno)
		}
		assertLocks(t, &lt,
			Lock{Owner: holder, Pid: 1, Typ: wr, Start: 0, End: 9},
			Lock{Owner: 2, Pid: 102, Typ: rd, Start: 10, End: 19},
			Lock{Owner: 3, Pid: 103, Typ: wr, Start: 20, End: 20},
		)
	})

	t.Run("DeadlineAndCancel", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, holder, 1, wr, 0, 9, 0)
		short, stop := context.WithTimeout(ctx, 10*time.Millisecond)
		defer stop()
		if errno := lt.WaitLock(short, 2, 102, rd, 5, 5, holder); errno != syscall.EAGAIN {
			t.Fatalf("WaitLock past its deadline: got %v, want EAGAIN", errno)
		}
		cancelled, interrupt := context.WithCancel(ctx)
		got := make(chan syscall.Errno, 1)
		wg.Go(func() { got <- lt.WaitLock(cancelled, 2, 102, rd, 5, 5, holder) })
		waitQueued(t, &lt, 1)
		interrupt()
		if errno := <-got; errno != syscall.EINTR {
			t.Fatalf("WaitLock interrupted: got %v, want EINTR", errno)
		}
		// Neither left a waiter behind: the holder takes its lock again.
		lt.ReleaseOwner(holder)
		mustTryLock(t, &lt, holder, 1, wr, 0, 9, 0)
	})

	t.Run("NoWaitWhileTheHolderWaitsForTheOwner", func(t *testing.T) {
		var lt LockTable
		mustTryLock(t, &lt, 2, 102, rd, 5, 5, 0)
		mustTryLock(t, &lt, holder, 1, wr, 30, 30, 0)
		// The reader waits for byte 30 first; then the holder waits for
		// byte 5, which the reader holds: the reader must give up.
		reader := make(chan syscall.Errno, 1)
		wg.Go(func() { reader <- lt.WaitLock(ctx, 2, 102, rd, 30, 30, holder) })
		waitQueued(t, &lt, 1)
		writer := make(chan syscall.Errno, 1)
		wg.Go(func() { writer <- lt.Lock(ctx, holder, 1, wr, 0, 9) })
		if errno := <-reader; errno != syscall.EAGAIN {
			t.Fatalf("reader holding what the holder waits for: WaitLock got %v, want EAGAIN", errno)
		}
		// Asked again now, it does not wait at all.
		if errno := lt.WaitLock(ctx, 2, 102, rd, 30, 30, holder); errno != syscall.EAGAIN {
			t.Fatalf("WaitLock again: got %v, want EAGAIN", errno)
		}
		lt.ReleaseOwner(2)
		if errno := waitReturned(t, &lt, writer); errno != 0 {
			t.Fatalf("holder: Lock returned %v, want 0", errno)
		}
	})
}

// freshOwners returns the owners lt counts as fresh (see AwaitFresh).
func freshOwners(lt *LockTable) []uint64 {
	lt.mu.Lock()
	defer lt.mu.Unlock()
	var owners []uint64
	for o := range lt.fresh {
		owners = append(owners, o)
	}
	slices.Sort(owners)
	return owners
}

package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// WAL passthrough.
//
// SQLite writes a WAL in small pieces, a frame header then a page, and the
// kernel splits a page where it straddles a page of the file: a one-page
// transaction costs three FUSE round trips. With FUSE passthrough (Linux
// 6.9 and later, the daemon running as root) the mount hands the backing
// WAL to the kernel, which reads and writes it without asking the daemon,
// and the daemon finds the transactions in the backing file instead, as
// SQLite's own recovery does: frames are taken while their salts match the
// header and their checksums chain from it, a transaction ends at a valid
// commit frame, and only frames up to the wal-index's last are committed
// (see walindex.go; the -shm is passed through as well). It looks when the
// writer gives up the WAL write lock, after every change (inotify), and at once
// whenever it must know everything SQLite has committed: when SQLite
// fsyncs the WAL (every commit under synchronous=FULL), before a checkpoint
// writes the database file, before the WAL is truncated or deleted, and
// when the position is asked. Without passthrough the daemon writes the
// WAL for the app (writeWAL) and finds commits the same way, reading the
// wal-index in the kernel's page cache (see shmCache).
//
// The invariants of the write path hold: a checkpoint copies only
// transactions it finds committed when it starts, and its first write to
// the database file waits until the scan has queued, and the worker
// written, every transaction in the WAL; SQLite restarts the WAL only once
// every frame has been checkpointed, and the log is fsynced when SQLite
// fsyncs the database file at the end of a checkpoint. So frames are never
// overwritten before their LTX file is written, nor the database file
// ahead of the log. (Under synchronous=OFF SQLite does not fsync at the end
// of a checkpoint; a power failure may then lose LTX files as it may lose
// SQLite's own transactions.)

// registerWAL gives the kernel the backing file of WAL or -shm node n,
// opened as file, for passthrough, and returns the backing id to answer
// the open with, or 0 to serve the file through the daemon. A -shm is
// passed through wherever the kernel can, whatever f.Passthrough says:
// capture only reads it, and reads it fastest in the backing file. Caller
// holds f.mu.
func (f *FileSystem) registerWAL(n *node, file interface{ Fd() uintptr }) int32 {
	if n.kind == kindWAL && !f.Passthrough || f.passthroughOff || f.server == nil {
		return 0
	}
	if n.backingID == 0 {
		id, errno := f.server.RegisterBackingFd(&fuse.BackingMap{Fd: int32(file.Fd())})
		if errno != 0 {
			f.passthroughOff = true
			f.Logger.Warn("FUSE passthrough unavailable (needs Linux 6.9+ and root); WAL writes go through the daemon, and capture reads the wal-index in the kernel's page cache", "err", errno)
			return 0
		}
		n.backingID = id
	}
	n.backingRefs++
	return n.backingID
}

// releaseWAL drops one open of WAL node n from its passthrough backing
// file. Caller holds f.mu.
func (f *FileSystem) releaseWAL(n *node) {
	n.backingRefs--
	if n.backingRefs > 0 || n.backingID == 0 {
		return
	}
	if f.server != nil {
		if errno := f.server.UnregisterBackingFd(n.backingID); errno != 0 {
			f.Logger.Warn("FUSE passthrough: release backing file", "file", n.name, "err", errno)
		}
	}
	n.backingID = 0
}

// passedThrough marks d's WAL as written by passthrough and watches it.
// Caller holds f.mu.
func (f *FileSystem) passedThrough(d *DB) error {
	d.mu.Lock()
	on := d.wal.passthrough
	d.wal.passthrough = true
	d.mu.Unlock()
	if on {
		return nil
	}
	return f.watcher.watch(d)
}

// WALPassthrough reports whether d's WAL is written by FUSE passthrough.
func (d *DB) WALPassthrough() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.wal.passthrough
}

// scanWAL finds the transactions SQLite has committed in the WAL since
// the last scan, and queues them. Frames after the last commit are read
// again at the next scan. Caller holds d.mu.
func (d *DB) scanWAL(ctx context.Context) error { return d.scan(ctx, false) }

// scan is scanWAL; with precommit, a whole transaction past the
// wal-index's last frame is taken too: the caller is its writer's fsync
// (see precommitWAL).
func (d *DB) scan(ctx context.Context, precommit bool) error {
	w := &d.wal
	if w.file == nil {
		return nil
	}
	var hb [walHeaderSize]byte
	if n, err := w.file.ReadAt(hb[:], 0); n < walHeaderSize {
		if err != nil && err != io.EOF {
			return fmt.Errorf("read WAL header: %w", err)
		}
		return nil // not written yet
	}
	h, err := parseWALHeader(hb[:])
	if err != nil {
		return nil // SQLite ignores a WAL without a valid header
	}
	if !w.valid || h.salt1 != w.hdr.salt1 || h.salt2 != w.hdr.salt2 || h.pageSize != w.hdr.pageSize {
		// A new generation: every frame of the old one was checkpointed,
		// and so scanned and logged, before SQLite could restart the WAL.
		d.writtenOver(w.uncommitted, "the WAL was restarted")
		d.resetWAL()
		w.hdr, w.valid = h, true
	}
	if cap(w.frame) < int(h.frameSize()) {
		w.frame = make([]byte, h.frameSize())
	}
	frame := w.frame[:h.frameSize()]
	if w.sumAt != w.mxFrame {
		// The chain up to the last commit, which the daemon did not follow
		// (frames written through it, or found by recovery).
		w.sum1, w.sum2 = h.sum1, h.sum2
		for i := int64(0); i < w.mxFrame; i++ {
			if _, ok, err := h.readFrame(w.file, i, frame, &w.sum1, &w.sum2); err != nil {
				return err
			} else if !ok {
				return fmt.Errorf("database %s: WAL frame %d, before the last commit found, is no longer valid", d.Name, i)
			}
		}
		w.sumAt = w.mxFrame
	}
	// The wal-index is read at the first commit frame found: most scans
	// find none.
	var limit int64
	var gated, read bool
	s1, s2 := w.sum1, w.sum2
	w.pgnos = w.pgnos[:0]
	for i := w.mxFrame; ; i++ {
		fh, ok, err := h.readFrame(w.file, i, frame, &s1, &s2)
		if err != nil {
			return err
		} else if !ok {
			break
		}
		w.pgnos = append(w.pgnos, fh.pgno)
		if fh.commit == 0 {
			continue
		}
		if !read {
			read = true
			if limit, gated, err = d.walIndexLimit(); err != nil {
				w.pgnos = w.pgnos[:0]
				return fmt.Errorf("database %s: %w", d.Name, err)
			}
			if gated && limit < w.mxFrame {
				// The log already holds frames the wal-index does not
				// count: taken by their commit frames before the
				// wal-index could be read, or at their writer's fsync
				// (precommitted). Nothing to undo: go on from there.
				if w.precommitted < w.mxFrame {
					d.logger.Warn("the wal-index counts fewer frames than the log holds", "wal_index_frames", limit, "logged_frames", w.mxFrame)
				}
				gated = false
			}
		}
		found := uncommittedTx{found: true, first: w.mxFrame, last: i, sum1: s1, sum2: s2}
		if u := w.uncommitted; u.found && u != found {
			// The transaction found uncommitted before is gone: the
			// frames from its first on are another's now.
			d.writtenOver(u, "a later transaction wrote over it")
			w.uncommitted = uncommittedTx{}
		}
		if gated && i >= limit && !precommit {
			// A commit frame SQLite has not committed (yet, or ever: its
			// writer may have died, or failed its fsync, before updating
			// the wal-index). The writer's unlock, or a later scan,
			// decides.
			w.uncommitted = found
			d.scanLater()
			w.pgnos = w.pgnos[:0]
			return nil
		}
		w.uncommitted = uncommittedTx{}
		if err := d.committedWAL(ctx, fh.commit); err != nil {
			w.pgnos = w.pgnos[:0]
			return err
		}
		w.sum1, w.sum2, w.sumAt = s1, s2, w.mxFrame
		if gated && i >= limit {
			w.precommitted = w.mxFrame // settled at the writer's unlock
		}
	}
	w.pgnos = w.pgnos[:0]
	d.rescanWait = 0
	return nil
}

// Bounds of how soon a commit frame past the wal-index is looked at again
// when no unlock of the WAL write lock comes first (with kernel locks the
// daemon sees none): soon, then less and less often while it stays
// uncommitted, as frames left by a writer that died do until the next
// writer overwrites them.
const (
	minRescanWait = 2 * time.Millisecond
	maxRescanWait = time.Second
)

// writtenOver says that u, a transaction found in the WAL that SQLite
// had not committed, never will be: why says what replaced it. Its
// frames never became an LTX file.
func (d *DB) writtenOver(u uncommittedTx, why string) {
	if !u.found {
		return
	}
	d.logger.Warn("skipped a transaction SQLite never committed: its frames were in the WAL, commit frame included, but the wal-index never counted them (the writer died or its WAL fsync failed); it is not in the log",
		"frames", fmt.Sprintf("%d-%d", u.first+1, u.last+1), "then", why)
}

// scanLater scans the WAL again after a while, unless a writer holds the
// WAL write lock: the mount sees its release, which scans. Caller holds
// d.mu.
func (d *DB) scanLater() {
	if d.rescan != nil || !d.kernelLocks && d.ShmLocks.Held(walLockOffset, walLockOffset) {
		return
	}
	d.rescanWait = min(max(2*d.rescanWait, minRescanWait), maxRescanWait)
	d.rescan = time.AfterFunc(d.rescanWait, func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.rescan = nil
		if d.stopping {
			return
		}
		if err := d.scanWAL(context.Background()); err != nil {
			d.logger.Error("scan the WAL", "err", err)
		}
	})
}

// walWatcher watches the backing WALs written by passthrough and scans one
// when it changes.
type walWatcher struct {
	file   *os.File // the inotify instance, through the runtime's poller
	logger interface{ Error(string, ...any) }

	mu     sync.Mutex
	dbs    map[int32]*DB // by watch descriptor
	wg     sync.WaitGroup
	closed sync.Once
}

func newWALWatcher(f *FileSystem) (*walWatcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	w := &walWatcher{file: os.NewFile(uintptr(fd), "inotify"), logger: f.Logger, dbs: map[int32]*DB{}}
	w.wg.Add(1)
	go w.run()
	return w, nil
}

// watch watches d's backing WAL, which exists.
func (w *walWatcher) watch(d *DB) error {
	wd, err := unix.InotifyAddWatch(int(w.file.Fd()), d.path(walFile), unix.IN_MODIFY)
	if err != nil {
		return fmt.Errorf("watch WAL of %s: %w", d.Name, err)
	}
	w.mu.Lock()
	w.dbs[int32(wd)] = d
	w.mu.Unlock()
	return nil
}

func (w *walWatcher) run() {
	defer w.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := w.file.Read(buf)
		if err != nil || n <= 0 {
			return // closed
		}
		seen := map[*DB]bool{}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			off += unix.SizeofInotifyEvent + int(ev.Len)
			w.mu.Lock()
			d := w.dbs[ev.Wd]
			if ev.Mask&unix.IN_IGNORED != 0 {
				delete(w.dbs, ev.Wd)
			}
			w.mu.Unlock()
			if d == nil || seen[d] || ev.Mask&unix.IN_MODIFY == 0 {
				continue
			}
			seen[d] = true
			d.mu.Lock()
			if err := d.scanWAL(context.Background()); err != nil {
				w.logger.Error("scan WAL", "db", d.Name, "err", err)
			}
			d.mu.Unlock()
		}
	}
}

// close stops the watcher.
func (w *walWatcher) close() {
	w.closed.Do(func() {
		_ = w.file.Close()
		w.wg.Wait()
	})
}

// fsImmutableFL is the inode flag of an immutable file (chattr +i).
const fsImmutableFL = 0x00000010

// fenceWAL makes d's backing WAL immutable, or writable again: the kernel
// writes a WAL opened with passthrough without asking the daemon, so
// refusing writes in read-only mode takes the filesystem's own refusal
// (ext4 fails writes to an immutable file, opened or not, with EPERM).
// Then everything SQLite committed before is scanned. Caller holds d.mu.
func (d *DB) fenceWAL(fenced bool) error {
	if d.wal.file == nil {
		return nil
	}
	if err := setImmutable(d.wal.file, fenced); err != nil {
		return fmt.Errorf("WAL of %s: %w", d.Name, err)
	}
	d.walFenced = fenced
	return d.scanWAL(context.Background())
}

// setImmutable sets or clears the immutable flag of f.
func setImmutable(f *os.File, on bool) error {
	fd := int(f.Fd())
	flags, err := unix.IoctlGetInt(fd, unix.FS_IOC_GETFLAGS)
	if !on && (errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP)) {
		return nil // no inode flags here: none to clear
	}
	if err != nil {
		return fmt.Errorf("get inode flags: %w", err)
	}
	want := flags &^ fsImmutableFL
	if on {
		want |= fsImmutableFL
	}
	if want == flags {
		return nil
	}
	if err := unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, want); err != nil {
		return fmt.Errorf("set inode flags: %w", err)
	}
	return nil
}

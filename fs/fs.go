// Package fs is the FUSE layer that captures SQLite transactions. It shows
// the databases kept under data_dir/dbs/<name>/ as files of one directory,
// passes every byte through to the backing files, implements SQLite's POSIX
// locks itself, and turns each committed transaction into one LTX file in
// the database's log.
package fs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/meridian-db/meridian/internal/durable"
	"github.com/meridian-db/meridian/internal/fusectl"
	"github.com/meridian-db/meridian/ltx"
)

// FileSystem is the mount: every database under DataDir/dbs, shown at
// MountDir.
type FileSystem struct {
	DataDir  string // backing files: DataDir/dbs/<name>/
	MountDir string // where the databases appear

	// NodeID is stamped into the LTX files the logs write.
	NodeID uint64
	// Retention is how long LTX files are kept (see ltx.Log), and
	// MaxRetention how long past it the files a replica has not
	// acknowledged are.
	Retention, MaxRetention time.Duration
	// MaintainInterval is how often each log merges its files older than
	// CompactAge and drops those past retention.
	MaintainInterval time.Duration
	CompactAge       time.Duration

	// KernelLocks leaves SQLite's POSIX locks on the mount's files to the
	// kernel instead of implementing them in the filesystem (Locks and
	// ShmLocks of each DB then stay empty). Every lock an app takes then
	// costs a system call instead of a round trip through FUSE, which read
	// transactions feel most (see bench/fsbench); the daemon can take part
	// only through a file descriptor on the mount.
	KernelLocks bool

	// LockHolder returns the command that runs RunLockHolder (regiond runs
	// itself as "regiond lock-holder"). A replica with KernelLocks needs
	// it: through it, the applier takes SQLite's locks in the kernel to
	// hold readers off (see lockholder.go).
	LockHolder func() *exec.Cmd

	// MaxSpares bounds the spare files kept in DataDir/spare to be written
	// over instead of created (see ltx.Spares): removed LTX files and
	// deleted rollback journals go there, new LTX files and journals come
	// from there. 0 keeps none.
	MaxSpares int

	// SpareFill is how many spare files the filesystem keeps ready: it
	// creates empty ones in the background when the pool falls below a
	// quarter of it (see ltx.Spares.Fill). Logs that have removed no file
	// yet, a new node's or a burst's, then write over spares too. A
	// read-only mount with LogSegmentSize set needs none and creates none
	// while it is read-only. 0 (what New sets) creates none; regiond sets
	// DefaultSpareFill (fs.spare_files).
	SpareFill int

	// LogSegmentSize is the size at which a database's log starts a new
	// segment (see ltx.Log.SegmentSize); 0 writes a file per transaction.
	LogSegmentSize int64

	// Passthrough lets the kernel write WALs straight to their backing
	// files (FUSE passthrough, Linux 6.9+, as root) while capture scans
	// them; where the kernel cannot, WAL writes go through the daemon.
	Passthrough bool

	Logger *slog.Logger
	// Debug logs every FUSE request.
	Debug bool

	passthroughOff bool // the kernel refused passthrough; guarded by mu
	watcher        *walWatcher
	spares         *ltx.Spares
	server         *fuse.Server
	served         chan struct{}  // closed when the server's loop ends
	conn           uint32         // the mount's FUSE connection number
	notify         sync.WaitGroup // cache notifications sent after a request
	readOnly       atomic.Bool
	// writeDeadline: past it (monoBase nanoseconds on the monotonic
	// clock) writes are refused; 0 when unbounded (SetWriteDeadline).
	writeDeadline atomic.Int64
	expiredLogged atomic.Int64 // when refuseExpired last logged, Unix ns
	// writeHold, while set, is closed when write transactions that wait
	// to begin may go on (HoldWrites).
	writeHold atomic.Pointer[chan struct{}]
	holderMu  sync.Mutex  // guards holder
	holder    *lockHolder // the running lock holder, if any
	holderPid atomic.Int32
	// readHoldWarning overrides how long an apply waits for readers
	// before the log names them (readHoldWarning), for tests.
	readHoldWarning time.Duration
	// checkpointFrames overrides walFoldFrames, for tests.
	checkpointFrames uint32
	mounted          time.Time

	mu      sync.Mutex
	dbs     map[string]*DB
	names   map[string]*node // current directory entries by name
	nodes   map[uint64]*node
	handles map[uint64]*handle
	lastID  uint64
	lastFh  uint64
	primary string             // content of .primary; "" hides it
	lag     func() string      // content of .lag; nil hides it
	refused map[uint32]refusal // the last write refused, per process (refuseWrite)
	changed chan struct{}      // closed and replaced when a database comes or goes
	acked   func(name string) ltx.TXID

	commitWait atomic.Pointer[CommitWait]
	tracing    *tracing // SetTracing
	onCommit   atomic.Pointer[func(db string, info ltx.FileInfo)]

	// failpoint, set by tests only, can fail an operation by its name
	// ("wal-sync"): a fault injected where the disk would fail.
	failpoint atomic.Pointer[func(name string) error]

	closing      chan struct{} // closed when Close begins
	stopMaintain context.CancelFunc
	maintained   sync.WaitGroup
}

// Defaults for FileSystem tunables.
const (
	DefaultMaintainInterval = time.Minute
	DefaultCompactAge       = time.Minute
	DefaultMaxSpares        = 65536
	DefaultSpareFill        = 4096
)

// New returns a filesystem of the databases in dataDir, to be mounted at
// mountDir. Call Open to recover the databases and mount.
func New(dataDir, mountDir string) *FileSystem {
	return &FileSystem{
		DataDir:          dataDir,
		MountDir:         mountDir,
		Retention:        ltx.DefaultRetention,
		MaxRetention:     ltx.DefaultMaxRetention,
		MaintainInterval: DefaultMaintainInterval,
		CompactAge:       DefaultCompactAge,
		MaxSpares:        DefaultMaxSpares,
		LogSegmentSize:   ltx.DefaultSegmentSize,
		Passthrough:      true,
		Logger:           slog.Default(),
		dbs:              map[string]*DB{},
		names:            map[string]*node{},
		nodes:            map[uint64]*node{},
		handles:          map[uint64]*handle{},
		refused:          map[uint32]refusal{},
		changed:          make(chan struct{}),
		closing:          make(chan struct{}),
	}
}

// SetAcked sets how Maintain learns what the replicas have: acked returns
// the lowest TXID of database name that every live replica acknowledged,
// and files past it are kept (at most the log's MaxRetention). Until it
// is set, or with nil, every transaction counts as acknowledged.
func (f *FileSystem) SetAcked(acked func(name string) ltx.TXID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.acked = acked
}

// CommitWait holds an app's operation that committed transaction txid of
// database db, once the transaction is in the log, until it returns nil:
// sync durability waits there for replicas. canFail says whether SQLite
// takes an error from the operation for a failed commit (the end of a
// rollback journal); elsewhere (the release of the WAL write lock, any
// unlock) SQLite would ignore the error or take a committed transaction
// for a rolled back one, so the wait must not give up while the app
// lives.
//
// ctx ends when the app's request is interrupted and its COMMIT may
// fail: where canFail, at any signal (the operation then fails with EIO,
// never EINTR, which SQLite retries, and a retry that commits nothing new
// would succeed at once); elsewhere, only once the app is being killed,
// since it will never see the operation return.
type CommitWait func(ctx context.Context, db string, txid ltx.TXID, canFail bool) error

// SetOnCommit sets a function called with each transaction a database's
// log records, in order, on the goroutine that records it: it must not
// block. nil removes it.
func (f *FileSystem) SetOnCommit(fn func(db string, info ltx.FileInfo)) {
	if fn == nil {
		f.onCommit.Store(nil)
		return
	}
	f.onCommit.Store(&fn)
}

// SetCommitWait sets the commit wait; nil removes it. Operations already
// waiting keep the one they have.
func (f *FileSystem) SetCommitWait(w CommitWait) {
	if w == nil {
		f.commitWait.Store(nil)
		return
	}
	f.commitWait.Store(&w)
}

// awaitCommit holds an app's operation on n that moved its database's
// commits from before to after, and returned st, in the commit wait. If
// the wait fails, so does the operation, with EIO; the transaction stays
// committed. cancel is the request's interrupt, and caller the thread
// that made it.
func (f *FileSystem) awaitCommit(cancel <-chan struct{}, caller uint32, n *node, before, after commitMark, st fuse.Status) fuse.Status {
	if !st.Ok() || after.n == before.n {
		return st
	}
	canFail := n.kind == kindJournal
	if w := f.commitWait.Load(); w != nil {
		ctx, stop := f.commitContext(cancel, caller, n.db, after.txid, canFail)
		defer stop()
		if err := (*w)(ctx, n.db.Name, after.txid, canFail); err != nil {
			msg := "commit fails: it is not acknowledged as durability requires; the transaction is committed here"
			if ctx.Err() != nil {
				msg = "commit fails: the app was interrupted while it waited for the acknowledgements durability requires; the transaction is committed here"
			}
			f.Logger.Error(msg, "db", n.db.Name, "txid", after.txid.String(), "pid", caller, "err", err)
			return fuse.EIO
		}
	}
	if canFail && f.writesExpired() {
		// The write deadline passed while the commit was made: another
		// node may hold the lease by now, and the transaction may never
		// reach it. (A WAL commit cannot fail here.)
		f.Logger.Error("commit fails: this node's lease ran out while it committed; the transaction is committed here, and kept under lost/ if the next primary never receives it",
			"db", n.db.Name, "txid", after.txid.String(), "pid", caller)
		return fuse.EIO
	}
	return st
}

// commitContext returns the context of a commit wait (see CommitWait):
// canceled when the request is interrupted, if the commit can fail, and
// otherwise once the calling thread has SIGKILL pending. stop releases
// it.
func (f *FileSystem) commitContext(cancel <-chan struct{}, caller uint32, d *DB, txid ltx.TXID, canFail bool) (context.Context, func()) {
	ctx, stop := context.WithCancel(context.Background())
	go func() {
		select {
		case <-cancel:
		case <-ctx.Done():
			return
		}
		// The kernel interrupts a request once, at the first signal of
		// any kind, and sends nothing for the signals after it. So look,
		// now and then, at what the app has pending: a rollback-journal
		// commit ends at a signal meant to stop it (not SIGCHLD, SIGURG,
		// SIGWINCH, SIGCONT nor SIGPROF, which a busy app gets all the
		// time: the app's next child that exits must not fail its
		// commit), a WAL commit only at SIGKILL.
		wanted := killPending
		if canFail {
			wanted = stopPending
		} else {
			d.logger.Warn("the app got a signal while its WAL commit waits for acknowledgements; it cannot fail there, so the wait goes on unless the app is killed",
				"txid", txid.String(), "pid", caller)
		}
		tick := time.NewTicker(killPoll)
		defer tick.Stop()
		for !wanted(caller) {
			select {
			case <-tick.C:
			case <-ctx.Done():
				return
			}
		}
		stop()
	}()
	return ctx, stop
}

// killPoll is how often an interrupted commit wait looks at its app's
// pending signals.
const killPoll = 50 * time.Millisecond

// killPending reports whether thread tid has SIGKILL pending, or is gone:
// its process is dying, and nothing of it waits for the request.
func killPending(tid uint32) bool {
	set, gone := pendingSignals(tid)
	return gone || set&sigBit(syscall.SIGKILL) != 0
}

// stopPending reports whether thread tid, or its process, has a signal
// pending that may be meant to stop what it waits for (any but the
// benignSignals), or is gone.
func stopPending(tid uint32) bool {
	set, gone := pendingSignals(tid)
	return gone || set&^benignSignals != 0
}

// benignSignals are the signals an app gets in the course of things, which
// do not ask it to stop waiting.
var benignSignals = sigBit(syscall.SIGCHLD) | sigBit(syscall.SIGURG) | sigBit(syscall.SIGWINCH) | sigBit(syscall.SIGCONT) | sigBit(syscall.SIGPROF)

func sigBit(sig syscall.Signal) uint64 { return 1 << (sig - 1) }

// pendingSignals returns the signals pending for thread tid and for its
// process, and whether the thread is gone.
func pendingSignals(tid uint32) (set uint64, gone bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		return 0, errors.Is(err, os.ErrNotExist)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		name, value, ok := strings.Cut(line, ":")
		if !ok || name != "SigPnd" && name != "ShdPnd" {
			continue
		}
		if v, err := strconv.ParseUint(strings.TrimSpace(value), 16, 64); err == nil {
			set |= v
		}
	}
	return set, false
}

// fail returns the error the test failpoint gives operation name, if any.
func (f *FileSystem) fail(name string) error {
	if fp := f.failpoint.Load(); fp != nil {
		return (*fp)(name)
	}
	return nil
}

// Changed returns a channel closed the next time a database is created or
// deleted.
func (f *FileSystem) Changed() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.changed
}

// changedLocked announces that the set of databases changed. Caller holds
// f.mu.
func (f *FileSystem) changedLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// Open recovers every database (see Recover), then mounts the filesystem.
// Nothing is served until every database's log and file agree.
func (f *FileSystem) Open(ctx context.Context) error {
	if err := f.clearDeadMount(); err != nil {
		return err
	}
	if err := os.MkdirAll(f.dbsDir(), 0o755); err != nil {
		return fmt.Errorf("create data directory: %w", err)
	}
	if err := os.MkdirAll(f.MountDir, 0o755); err != nil {
		return fmt.Errorf("create mount directory: %w", err)
	}
	spares, err := ltx.OpenSpares(filepath.Join(f.DataDir, "spare"), f.MaxSpares)
	if err != nil {
		return err
	}
	f.spares = spares
	if f.Passthrough {
		if f.watcher, err = newWALWatcher(f); err != nil {
			return err
		}
	}
	entries, err := os.ReadDir(f.dbsDir())
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.IsDir() || !validDBName(e.Name()) {
			continue
		}
		d, err := f.openDB(ctx, e.Name())
		if err != nil {
			f.closeDBs()
			return err
		}
		f.dbs[d.Name] = d
	}
	f.nodes[fuse.FUSE_ROOT_ID] = &node{id: fuse.FUSE_ROOT_ID, kind: kindRoot}
	f.lastID = fuse.FUSE_ROOT_ID
	f.mounted = time.Now()

	server, err := fuse.NewServer(&raw{RawFileSystem: fuse.NewDefaultRawFileSystem(), fs: f}, f.MountDir, &fuse.MountOptions{
		FsName:        "meridian",
		Name:          "meridian",
		EnableLocks:   !f.KernelLocks,
		AllowOther:    true,
		MaxWrite:      1 << 20,
		MaxReadAhead:  128 << 10,
		DirectMount:   true,
		Debug:         f.Debug,
		DisableXAttrs: true,
		// Pages are invalidated by InvalidatePages, precisely, not whenever
		// the kernel sees a new mtime.
		ExplicitDataCacheControl: true,
		Options:                  []string{"default_permissions"},
	})
	if err != nil {
		f.closeDBs()
		return fmt.Errorf("mount %s: %w (is fuse3 installed and %s not already mounted? try: fusermount3 -u %s)", f.MountDir, err, f.MountDir, f.MountDir)
	}
	// The lock holder, and any child regiond starts, must not inherit the
	// FUSE connection (see fusectl.CloseOnExec).
	if err := fusectl.CloseOnExec(); err != nil {
		f.Logger.Warn("child processes inherit the FUSE connection; one killed with a file open on the mount may hang", "err", err)
	}
	f.server = server
	dbs := len(f.dbs) // read before requests can change it
	f.served = make(chan struct{})
	go func() {
		defer close(f.served)
		server.Serve()
	}()
	if err := server.WaitMount(); err != nil {
		_ = server.Unmount()
		f.closeDBs()
		return fmt.Errorf("mount %s: %w", f.MountDir, err)
	}
	if m, ok, err := fusectl.At(f.MountDir); err == nil && ok {
		f.conn = m.Conn
	}
	f.Logger.Info("mounted", "mount_dir", f.MountDir, "data_dir", f.DataDir, "dbs", dbs, "fuse_conn", f.conn)
	f.maintained.Add(1)
	go func() {
		defer f.maintained.Done()
		select {
		case <-f.served:
			f.Logger.Error("the mount ended: unmounted or its FUSE connection aborted from outside; apps get ENOTCONN until the daemon restarts",
				"mount_dir", f.MountDir, "fuse_conn", f.conn)
		case <-f.closing:
		}
	}()
	mctx, stop := context.WithCancel(context.Background())
	f.stopMaintain = stop
	f.maintained.Add(1)
	go func() {
		defer f.maintained.Done()
		f.maintainLoop(mctx)
	}()
	if f.SpareFill > 0 {
		f.maintained.Add(1)
		go func() {
			defer f.maintained.Done()
			f.fillSpares(mctx)
		}()
	}
	return nil
}

// fillSpares keeps SpareFill spare files ready: it fills the pool at once,
// then again whenever it has fallen below a quarter of SpareFill, looking
// every second.
func (f *FileSystem) fillSpares(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		// A replica with a segmented log takes none: its mount creates no
		// journal, and it appends the files it receives to segments.
		need := !f.readOnly.Load() || f.LogSegmentSize == 0
		if need && f.spares.Len() < max(f.SpareFill/4, 1) {
			began := time.Now()
			n, err := f.spares.Fill(ctx, f.SpareFill)
			if err != nil && ctx.Err() == nil {
				f.Logger.Warn("create spare files", "err", err)
			}
			if n > 0 {
				f.Logger.Debug("spare files created", "files", n, "took", time.Since(began).Round(time.Millisecond))
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (f *FileSystem) maintainLoop(ctx context.Context) {
	t := time.NewTicker(f.MaintainInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := f.Maintain(ctx); err != nil && ctx.Err() == nil {
				f.Logger.Error("maintain logs", "err", err)
			}
		}
	}
}

// Maintain compacts each database's log (files older than CompactAge) and
// prunes it (files past retention). Until replication exists no replica
// can need a file, so every transaction counts as acknowledged.
func (f *FileSystem) Maintain(ctx context.Context) error {
	now := time.Now()
	for _, d := range f.dbList() {
		// The frames a replica appended, of the files compacted or pruned,
		// must be durable first: after a power cut the log's Open applies
		// again the files after the one the database is at, which must
		// still be there, whole.
		if err := d.syncAppliedWAL(); err != nil {
			return fmt.Errorf("maintain log of %s: %w", d.Name, err)
		}
		merged, err := d.log.Compact(ctx, now.Add(-f.CompactAge))
		if err != nil {
			return fmt.Errorf("compact log of %s: %w", d.Name, err)
		}
		acked := d.log.Pos().TXID
		f.mu.Lock()
		ackedFn := f.acked
		f.mu.Unlock()
		if ackedFn != nil {
			acked = min(acked, ackedFn(d.Name))
		}
		pruned, err := d.log.Prune(ctx, acked, now)
		if err != nil {
			return fmt.Errorf("prune log of %s: %w", d.Name, err)
		}
		if merged+pruned > 0 {
			d.logger.Debug("log maintained", "merged", merged, "pruned", pruned)
		}
	}
	return nil
}

// Close unmounts the filesystem, waiting for apps to close their files for
// up to the context's deadline, and closes the logs.
func (f *FileSystem) Close(ctx context.Context) error {
	var err error
	select {
	case <-f.closing:
	default:
		close(f.closing)
	}
	if f.stopMaintain != nil {
		f.stopMaintain()
	}
	f.maintained.Wait()
	f.notify.Wait()
	// The lock holder has files open on the mount.
	f.stopLockHolder()
	if f.server != nil {
		if err = f.unmount(ctx); err != nil {
			return err
		}
		f.server = nil
	}
	if f.watcher != nil {
		f.watcher.close()
	}
	f.mu.Lock()
	for _, d := range f.dbs {
		d.mu.Lock()
		if serr := d.scanWAL(ctx); serr != nil && err == nil {
			err = serr
		}
		if d.wal.file != nil {
			// Not left immutable for whoever touches the data directory
			// next (recovery clears it too, after a crash).
			if serr := setImmutable(d.wal.file, false); serr != nil {
				f.Logger.Warn("clear read-only fence of the WAL", "db", d.Name, "err", serr)
			}
		}
		d.mu.Unlock()
		d.stop()
		d.mu.Lock()
		if werr := d.werr; werr != nil && err == nil {
			err = fmt.Errorf("database %s: %d WAL transactions have no LTX file yet (recovery adds them at the next start): %w", d.Name, len(d.queue), werr)
		}
		if serr := d.syncLog(ctx); serr != nil && err == nil {
			err = serr
		}
		d.mu.Unlock()
	}
	f.mu.Unlock()
	f.closeDBs()
	return err
}

// unmount unmounts the filesystem and waits for the server's loop to end,
// retrying while apps still have files open, up to ctx's deadline. A mount
// that ended already, unmounted or its connection aborted from outside,
// is only detached if still there: nothing could be served through it.
func (f *FileSystem) unmount(ctx context.Context) error {
	for {
		select {
		case <-f.served:
			f.Logger.Warn("the mount had ended already: unmounted or its FUSE connection aborted from outside",
				"mount_dir", f.MountDir, "fuse_conn", f.conn)
			if m, ok, err := fusectl.At(f.MountDir); err != nil {
				return err
			} else if ok && m.Conn == f.conn {
				if err := fusectl.Detach(f.MountDir); err != nil {
					return err
				}
				f.Logger.Info("detached the dead mount", "mount_dir", f.MountDir)
			}
			return nil
		default:
		}
		if m, ok, err := fusectl.At(f.MountDir); err == nil && f.conn != 0 && (!ok || m.Conn != f.conn) {
			// Detached lazily from outside: the connection would live on
			// until apps close their last files, and there is nothing
			// left to unmount.
			f.Logger.Warn("the mount was unmounted from outside: ending its FUSE connection; files apps still have open on it fail from now on",
				"mount_dir", f.MountDir, "fuse_conn", f.conn)
			if err := fusectl.Abort(f.conn); err != nil {
				return err
			}
			select {
			case <-f.served:
				return nil
			case <-ctx.Done():
				return fmt.Errorf("unmount %s: the FUSE connection %d, aborted, did not end: %w", f.MountDir, f.conn, ctx.Err())
			}
		}
		err := f.server.Unmount()
		if err == nil {
			f.server.Wait()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("unmount %s: %w (files still open? try: fusermount3 -u -z %s)", f.MountDir, err, f.MountDir)
		case <-f.served:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// clearDeadMount detaches a FUSE mount left at MountDir by a daemon that
// is gone (its server exited or its connection was aborted: the mount
// point answers ENOTCONN), so that the filesystem can mount there again.
// A live mount is an error: another daemon serves it.
func (f *FileSystem) clearDeadMount() error {
	m, ok, err := fusectl.At(f.MountDir)
	if err != nil || !ok {
		return err
	}
	// statfs asks the server every time (stat may be answered from the
	// kernel's cache). On a mount whose server is alive but stuck, it
	// would not return: it is given a moment only.
	statErr := make(chan error, 1)
	go func() {
		var st syscall.Statfs_t
		statErr <- syscall.Statfs(f.MountDir, &st)
	}()
	select {
	case err := <-statErr:
		if !fusectl.IsDead(err) {
			return fmt.Errorf("mount %s: it is already a FUSE mount (%s, connection %d) that answers: is another regiond serving it? Stop it, or unmount it: fusermount3 -u %s",
				f.MountDir, m.Source, m.Conn, f.MountDir)
		}
	case <-time.After(deadMountStatTimeout):
		return fmt.Errorf("mount %s: it is already a FUSE mount (%s, connection %d) whose server does not answer; abort it (echo 1 > %s/%d/abort) and unmount it (fusermount3 -u -z %s)",
			f.MountDir, m.Source, m.Conn, fusectl.ConnectionsDir, m.Conn, f.MountDir)
	}
	f.Logger.Warn("mount_dir is a dead FUSE mount, left by a daemon that is gone: unmounting it", "mount_dir", f.MountDir, "fuse_conn", m.Conn)
	return fusectl.Detach(f.MountDir)
}

// deadMountStatTimeout is how long Open waits for a FUSE mount already at
// MountDir to answer.
const deadMountStatTimeout = 2 * time.Second

func (f *FileSystem) closeDBs() {
	if f.watcher != nil {
		f.watcher.close()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for name, d := range f.dbs {
		d.stop()
		_ = d.log.Close()
		d.closeFiles()
		delete(f.dbs, name)
	}
}

// DB returns the database name, or nil.
func (f *FileSystem) DB(name string) *DB {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dbs[name]
}

// DBs returns the names of the databases, sorted.
func (f *FileSystem) DBs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sortedDBs()
}

// sortedDBs returns the names of the databases, sorted. Caller holds f.mu.
func (f *FileSystem) sortedDBs() []string {
	return slices.Sorted(maps.Keys(f.dbs))
}

// dbList returns the databases, for work done without holding f.mu.
func (f *FileSystem) dbList() []*DB {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Collect(maps.Values(f.dbs))
}

// SetReadOnly switches the mount between read-write and read-only. While
// read-only, every write to a database, its journal or WAL, and creating or
// deleting a database, fails with EROFS; reading, locking and the -shm file
// (which WAL-mode readers write) work as before, so open readers are not
// disturbed.
func (f *FileSystem) SetReadOnly(readOnly bool) {
	if f.readOnly.Load() == readOnly {
		return // as it is: a WAL opened since stays unfenced (see fenceWAL)
	}
	if !readOnly && f.readOnly.Load() {
		// Before apps may write: they would append to the WAL the applier
		// wrote, which capture cannot tell from its own.
		for _, d := range f.dbList() {
			f.foldForWriting(d)
		}
	}
	if f.readOnly.Swap(readOnly) != readOnly {
		f.Logger.Info("mount mode changed", "read_only", readOnly)
		// Page 1 is served with another change counter on a read-only
		// mount (serveChangeCounter): drop the kernel's copy.
		for _, d := range f.dbList() {
			f.mu.Lock()
			n := f.names[d.Name]
			f.mu.Unlock()
			if n != nil && f.server != nil {
				if st := f.server.InodeNotify(n.id, 0, sqliteHeaderSize); !st.Ok() && st != fuse.ENOENT {
					f.Logger.Warn("drop the cached header of a database", "db", d.Name, "status", st)
				}
			}
		}
	}
	for _, d := range f.dbList() {
		if readOnly {
			if err := d.ensureWAL(); err != nil {
				f.Logger.Error("create the WAL readers of a read-only database need", "db", d.Name, "err", err)
			}
		}
		d.mu.Lock()
		if d.wal.passthrough || !readOnly {
			if err := d.fenceWAL(readOnly); err != nil {
				f.Logger.Error("read-only mode: processes that opened the WAL before can still write to it", "db", d.Name, "err", err)
			}
		}
		d.mu.Unlock()
	}
}

// EndApplying readies every database's log to commit transactions of its
// own after it was given them by ApplyFiles (see ltx.Log.EndApplying): a
// replica that becomes the primary calls it once its applies have
// stopped, before it makes the mount writable.
func (f *FileSystem) EndApplying() error {
	var errs []error
	for _, d := range f.dbList() {
		if err := d.log.EndApplying(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", d.Name, err))
		}
	}
	return errors.Join(errs...)
}

// ReadOnly reports whether the mount is read-only.
func (f *FileSystem) ReadOnly() bool { return f.readOnly.Load() }

// monoBase is the origin of write deadlines: times are kept as durations
// since it, which Go measures on the monotonic clock, so a step of the
// wall clock moves no deadline.
var monoBase = time.Now()

// SetWriteDeadline bounds the writes of a primary whose lease lasts until
// t: past t, every write the mount would pass to SQLite is refused as on
// a read-only mount (EROFS), an fsync of a database, journal or WAL fails
// (EIO), and so do SQLite's write locks (EAGAIN: SQLite's busy handler
// waits, and the writer gets in once the lease is renewed, or finds the
// mount read-only once the node has stepped down). The lease holder moves
// t forward at each renewal; it is what stops a primary that was paused
// (SIGSTOP, a VM freeze, a long stall) from acknowledging a write after
// another node may have taken the lease, before its own lease loop has
// run again. The zero time removes the bound. Deadlines are kept on the
// monotonic clock.
//
// In WAL mode a transaction that held the WAL write lock and had its
// commit fsynced before t may still become visible after t: SQLite's
// commit point, the wal-index in the -shm, is memory the kernel shares
// without asking the mount.
func (f *FileSystem) SetWriteDeadline(t time.Time) {
	if t.IsZero() {
		f.writeDeadline.Store(0)
		return
	}
	f.writeDeadline.Store(max(1, int64(t.Sub(monoBase))))
}

// WriteDeadlinePassed reports whether the write deadline (SetWriteDeadline)
// has passed, so that the mount refuses writes.
func (f *FileSystem) WriteDeadlinePassed() bool { return f.pastDeadline() }

// HoldWrites makes write transactions that begin from now on wait, at
// their first write lock, until ReleaseWrites; those under way go on to
// their commit. It needs fs.locks: mount (with kernel locks the mount
// sees no lock to hold) and reports whether it holds them: false if
// they are held already.
func (f *FileSystem) HoldWrites() bool {
	ch := make(chan struct{})
	return f.writeHold.CompareAndSwap(nil, &ch)
}

// ReleaseWrites lets the write transactions HoldWrites held go on, as the
// mount then allows: on a mount made read-only meanwhile they fail.
func (f *FileSystem) ReleaseWrites() {
	if ch := f.writeHold.Swap(nil); ch != nil {
		close(*ch)
	}
}

// WaitWritesIdle waits until no process holds a write lock on any
// database of the mount (a write transaction under way: in rollback
// journal mode any write lock on the database file, in WAL mode the WAL
// write lock), or ctx ends. With HoldWrites, once it returns nil every
// transaction committed is in the log, and no other begins.
func (f *FileSystem) WaitWritesIdle(ctx context.Context) error {
	for {
		var busy []<-chan struct{}
		var names []string
		for _, name := range f.DBs() {
			d := f.DB(name)
			if d == nil {
				continue
			}
			if ch, ok := d.Locks.WriteHeld(0, math.MaxUint64); ok {
				busy, names = append(busy, ch), append(names, name)
			} else if ch, ok := d.ShmLocks.WriteHeld(walLockOffset, walLockOffset); ok {
				busy, names = append(busy, ch), append(names, name)
			}
		}
		if len(busy) == 0 {
			return f.flushLogs(ctx)
		}
		select {
		case <-busy[0]:
		case <-ctx.Done():
			return fmt.Errorf("a write transaction of %s is still under way: %w", strings.Join(names, ", "), context.Cause(ctx))
		}
	}
}

// flushLogs has every transaction committed to a database of the mount
// written to its log: a WAL commit SQLite made without the mount seeing it
// yet, and those the capture worker has queued.
func (f *FileSystem) flushLogs(ctx context.Context) error {
	for _, name := range f.DBs() {
		d := f.DB(name)
		if d == nil {
			continue
		}
		d.mu.Lock()
		err := d.scanWAL(ctx)
		if err == nil {
			err = d.drain()
		}
		d.mu.Unlock()
		if err != nil {
			return fmt.Errorf("%s: write its last transactions to its log: %w", name, err)
		}
	}
	return nil
}

// holdWrite waits, if HoldWrites holds write transactions, for it to let
// them go on, when a write lock of owner on start..end of n would begin a
// write transaction. It returns false if the request was interrupted, or
// if the mount became read-only while it waited.
func (f *FileSystem) holdWrite(cancel <-chan struct{}, n *node, t *LockTable, owner uint64, pid uint32, start, end uint64) bool {
	hold := f.writeHold.Load()
	if hold == nil || !isWriteLock(n, start, end) || f.isLockHolder(pid) {
		return true
	}
	switch n.kind {
	case kindDB:
		if t.HoldsWrite(owner) {
			return true // a transaction under way, on to its commit
		}
	case kindShm:
		if t.HeldBy(owner, syscall.F_WRLCK, walLockOffset) {
			return true
		}
	}
	select {
	case <-*hold:
		// Stepped down meanwhile: the transaction must not begin (with
		// passthrough, nothing else would stop its WAL commit).
		return !f.readOnly.Load()
	case <-cancel:
		return false
	}
}

// writesExpired reports whether the mount, writable, must refuse writes
// because its write deadline has passed.
func (f *FileSystem) writesExpired() bool {
	return f.pastDeadline() && !f.readOnly.Load()
}

// pastDeadline reports whether the write deadline has passed.
func (f *FileSystem) pastDeadline() bool {
	d := f.writeDeadline.Load()
	return d != 0 && int64(time.Since(monoBase)) > d
}

// SetPrimary sets the content of .primary, which names the primary on a
// replica; "" removes the file (on the primary).
func (f *FileSystem) SetPrimary(primary string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.primary = primary
}

// SetLag sets the function that gives the content of .lag; nil removes the
// file.
func (f *FileSystem) SetLag(lag func() string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lag = lag
}

// Spares returns the pool of spare files in DataDir/spare, nil before
// Open: files to write over instead of creating new ones, for anything
// written on the mount's filesystem and then moved into a log (see
// ApplyOptions.Move).
func (f *FileSystem) Spares() *ltx.Spares { return f.spares }

// InvalidatePages drops pages of database name from the kernel's page
// cache, for a change made to the backing file underneath the mount. The
// page numbers are ascending.
func (f *FileSystem) InvalidatePages(name string, pageSize uint32, pgnos []uint32) error {
	f.mu.Lock()
	n := f.names[name]
	f.mu.Unlock()
	if n == nil || f.server == nil {
		return nil
	}
	// One notification for each run of consecutive pages.
	for i := 0; i < len(pgnos); {
		j := i + 1
		for j < len(pgnos) && pgnos[j] == pgnos[j-1]+1 {
			j++
		}
		off := int64(pgnos[i]-1) * int64(pageSize)
		if st := f.server.InodeNotify(n.id, off, int64(j-i)*int64(pageSize)); !st.Ok() && st != fuse.ENOENT {
			return fmt.Errorf("invalidate pages %d-%d of %s: %v", pgnos[i], pgnos[j-1], name, st)
		}
		i = j
	}
	return nil
}

// retrieveCache reads what the kernel caches of node's file at off into
// dest; 0 bytes when it caches nothing there or the mount is not served.
func (f *FileSystem) retrieveCache(node uint64, off int64, dest []byte) (int, fuse.Status) {
	if f.server == nil {
		return 0, fuse.ENOSYS
	}
	return f.server.InodeRetrieveCache(node, off, dest)
}

func (f *FileSystem) dbsDir() string { return filepath.Join(f.DataDir, "dbs") }

// openDB recovers and opens the database in dbs/name.
func (f *FileSystem) openDB(ctx context.Context, name string) (*DB, error) {
	d := &DB{
		Name:   name,
		dir:    filepath.Join(f.dbsDir(), name),
		logger: f.Logger.With("db", name),
	}
	d.cond = sync.NewCond(&d.mu)
	d.retrieve, d.kernelLocks, d.tracing = f.retrieveCache, f.KernelLocks, f.tracing
	d.shmResized = func() { f.invalidateShmAttr(d) }
	d.resetWAL()
	l := ltx.NewLog(name, d.path(logDir), d.path(databaseFile))
	// The log names its database in every line itself.
	l.NodeID, l.Retention, l.MaxRetention, l.Logger, l.Spares = f.NodeID, f.Retention, f.MaxRetention, f.Logger, f.spares
	// A segment stays while it holds the log's newest file: rolled at the
	// retention at least, it keeps pruned files on disk little longer.
	l.SegmentSize, l.SegmentAge = f.LogSegmentSize, min(ltx.DefaultSegmentAge, max(f.Retention, time.Second))
	l.DB = walView{d: d} // the database as SQLite sees it, WAL included
	l.Committed = func(info ltx.FileInfo) {
		if fn := f.onCommit.Load(); fn != nil {
			(*fn)(name, info)
		}
	}
	d.log = l
	if err := d.recover(ctx); err != nil {
		d.closeFiles()
		return nil, fmt.Errorf("database %s: %w", name, err)
	}
	if f.readOnly.Load() {
		if err := d.ensureWAL(); err != nil {
			d.closeFiles()
			return nil, fmt.Errorf("database %s: %w", name, err)
		}
	}
	d.done.Add(1)
	go func() {
		defer d.done.Done()
		d.run(context.Background())
	}()
	return d, nil
}

// createDB makes a new, empty database name.
func (f *FileSystem) createDB(ctx context.Context, name string) (*DB, error) {
	dir := filepath.Join(f.dbsDir(), name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	file, err := os.OpenFile(filepath.Join(dir, databaseFile), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	_ = file.Close()
	if err := durable.SyncDir(dir); err != nil {
		return nil, err
	}
	if err := durable.SyncDir(f.dbsDir()); err != nil {
		return nil, err
	}
	return f.openDB(ctx, name)
}

// deleteDB removes database d and its log. Open files keep working until
// closed, as with any unlinked file.
func (f *FileSystem) deleteDB(d *DB) error {
	d.stop()
	_ = d.log.Close()
	d.closeFiles()
	// Rename first so a crash never leaves half a database under its name.
	trash := filepath.Join(f.dbsDir(), "."+d.Name+".deleted")
	if err := os.RemoveAll(trash); err != nil {
		return err
	}
	if err := os.Rename(d.dir, trash); err != nil {
		return err
	}
	if err := durable.SyncDir(f.dbsDir()); err != nil {
		return err
	}
	f.Logger.Info("database deleted", "db", d.Name)
	// Its LTX files become spares, unless read. (Its journal may still be
	// open in the app.)
	if entries, err := os.ReadDir(filepath.Join(trash, logDir)); err == nil && d.log.Readers() == 0 {
		for _, e := range entries {
			if e.Type().IsRegular() {
				if err := f.spares.Put(filepath.Join(trash, logDir, e.Name())); err != nil {
					return err
				}
			}
		}
	}
	return os.RemoveAll(trash)
}

// validDBName reports whether name can be a database: not a companion or
// special file name, not hidden.
func validDBName(name string) bool {
	if name == "" || strings.HasPrefix(name, ".") || strings.ContainsAny(name, "/\x00") || len(name) > 200 {
		return false
	}
	_, kind := parseName(name)
	return kind == kindDB
}

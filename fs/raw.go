package fs

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// Kernel caches: the kernel sees every change made on this node, so it may
// keep entries, attributes and pages; changes made underneath the mount
// (applying a replicated transaction) invalidate them explicitly.
const (
	entryTimeout   = time.Hour
	attrTimeout    = time.Hour
	specialTimeout = 0
)

type nodeKind int

const (
	kindRoot nodeKind = iota
	kindDB
	kindJournal
	kindWAL
	kindShm
	kindPos
	kindPrimary
	kindLag
	kindSuper // a super-journal of a multi-database transaction: refused
)

// Suffixes of the files beside a database, as SQLite names them, and of
// its position file.
var suffixes = []struct {
	suffix  string
	kind    nodeKind
	backing string
}{
	{"-journal", kindJournal, journalFile},
	{"-wal", kindWAL, walFile},
	{"-shm", kindShm, shmFile},
	{"-pos", kindPos, ""},
}

// parseName splits a file name of the mount into its database and kind.
func parseName(name string) (db string, kind nodeKind) {
	switch name {
	case ".primary":
		return "", kindPrimary
	case ".lag":
		return "", kindLag
	}
	for _, s := range suffixes {
		if base, ok := strings.CutSuffix(name, s.suffix); ok {
			return base, s.kind
		}
	}
	if base, ok := cutSuperJournal(name); ok {
		return base, kindSuper
	}
	return name, kindDB
}

// cutSuperJournal returns the database a super-journal name belongs to.
// SQLite names the super-journal of a transaction over several databases
// after the main one: "-mj", six hex digits, "9", two hex digits.
func cutSuperJournal(name string) (string, bool) {
	const suffixLen = len("-mj") + 9
	if len(name) <= suffixLen || !strings.HasPrefix(name[len(name)-suffixLen:], "-mj") {
		return "", false
	}
	for _, c := range name[len(name)-9:] {
		if !('0' <= c && c <= '9' || 'A' <= c && c <= 'F') {
			return "", false
		}
	}
	return name[:len(name)-suffixLen], true
}

func backingName(kind nodeKind) string {
	if kind == kindDB {
		return databaseFile
	}
	for _, s := range suffixes {
		if s.kind == kind {
			return s.backing
		}
	}
	return ""
}

// node is an inode of the mount.
type node struct {
	id      uint64
	kind    nodeKind
	name    string
	db      *DB
	lookups uint64
	opens   int
	// holderOpens counts the opens by the lock holder, which take no
	// part in reading.
	holderOpens int
	gone        bool // unlinked

	// A WAL served by passthrough: the kernel's id of its backing file,
	// and the opens using it.
	backingID   int32
	backingRefs int
}

// handle is an open file.
type handle struct {
	node *node
	file *os.File // backing file; nil for special files
	data []byte   // special files: content at open
	// backing: the open uses the node's passthrough backing file.
	backing bool
	holder  bool // opened by the lock holder
}

// raw implements the FUSE protocol over FileSystem.
type raw struct {
	fuse.RawFileSystem
	fs *FileSystem
}

func (r *raw) String() string { return "meridian" }

func (r *raw) Init(s *fuse.Server) { r.fs.server = s }

func (r *raw) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	f := r.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	if h.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	n, st := f.lookupLocked(name)
	if st == fuse.ENOENT {
		// Remember the absence: SQLite looks for a hot journal at the start
		// of every read transaction.
		out.NodeId = 0
		out.SetEntryTimeout(f.negativeTimeout(name))
		return fuse.OK
	} else if !st.Ok() {
		return st
	}
	n.lookups++
	return f.fillEntry(n, out)
}

func (f *FileSystem) negativeTimeout(name string) time.Duration {
	if _, kind := parseName(name); kind == kindPrimary || kind == kindLag || kind == kindPos {
		return specialTimeout
	}
	return entryTimeout
}

// lookupLocked returns the node of name, creating it if the file exists.
// Caller holds f.mu.
func (f *FileSystem) lookupLocked(name string) (*node, fuse.Status) {
	if n := f.names[name]; n != nil {
		if n.kind == kindPrimary && f.primary == "" || n.kind == kindLag && f.lag == nil {
			return nil, fuse.ENOENT
		}
		return n, fuse.OK
	}
	dbName, kind := parseName(name)
	var d *DB
	switch kind {
	case kindPrimary:
		if f.primary == "" {
			return nil, fuse.ENOENT
		}
	case kindLag:
		if f.lag == nil {
			return nil, fuse.ENOENT
		}
	case kindSuper:
		return nil, fuse.ENOENT // never created (see Create)
	default:
		if d = f.dbs[dbName]; d == nil {
			return nil, fuse.ENOENT
		}
		if kind != kindDB && kind != kindPos {
			if _, err := os.Lstat(d.path(backingName(kind))); err != nil {
				return nil, fuse.ENOENT
			}
		}
	}
	return f.newNode(name, kind, d), fuse.OK
}

// newNode makes the node of a new directory entry. Caller holds f.mu.
func (f *FileSystem) newNode(name string, kind nodeKind, d *DB) *node {
	f.lastID++
	n := &node{id: f.lastID, kind: kind, name: name, db: d}
	f.nodes[n.id] = n
	f.names[name] = n
	return n
}

func (f *FileSystem) fillEntry(n *node, out *fuse.EntryOut) fuse.Status {
	out.NodeId = n.id
	out.Generation = 1
	timeout := entryTimeout
	if n.special() {
		timeout = specialTimeout
	}
	out.SetEntryTimeout(timeout)
	out.SetAttrTimeout(timeout)
	return f.fillAttr(n, &out.Attr)
}

func (n *node) special() bool {
	return n.kind == kindPos || n.kind == kindPrimary || n.kind == kindLag
}

// content returns the content of a special file. Caller holds f.mu.
func (f *FileSystem) content(n *node) []byte {
	switch n.kind {
	case kindPos:
		return []byte(n.db.log.Pos().String() + "\n")
	case kindPrimary:
		return []byte(f.primary + "\n")
	case kindLag:
		if f.lag != nil {
			return []byte(f.lag() + "\n")
		}
	}
	return nil
}

// fillAttr fills the attributes of n. Caller holds f.mu.
func (f *FileSystem) fillAttr(n *node, a *fuse.Attr) fuse.Status {
	switch {
	case n.kind == kindRoot:
		a.Mode = syscall.S_IFDIR | 0o755
		a.Nlink = 2
		a.SetTimes(&f.mounted, &f.mounted, &f.mounted)
	case n.special():
		a.Mode = syscall.S_IFREG | 0o444
		a.Nlink = 1
		a.Size = uint64(len(f.content(n)))
		a.SetTimes(nil, new(time.Now()), nil)
	default:
		var st syscall.Stat_t
		if err := syscall.Lstat(n.db.path(backingName(n.kind)), &st); err != nil {
			if h := f.anyHandle(n); h != nil && h.file != nil {
				err = syscall.Fstat(int(h.file.Fd()), &st)
			}
			if err != nil {
				return fuse.ToStatus(err)
			}
		}
		a.FromStat(&st)
		a.Nlink = 1
		if n.gone {
			a.Nlink = 0
		}
	}
	a.Ino = n.id
	return fuse.OK
}

func (f *FileSystem) anyHandle(n *node) *handle {
	for _, h := range f.handles {
		if h.node == n {
			return h
		}
	}
	return nil
}

func (r *raw) Forget(nodeid, nlookup uint64) {
	f := r.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	n := f.nodes[nodeid]
	if n == nil || n.kind == kindRoot {
		return
	}
	n.lookups -= min(nlookup, n.lookups)
	f.dropIfUnused(n)
}

// dropIfUnused forgets n once the kernel neither knows it (lookups) nor
// has it open. Caller holds f.mu.
func (f *FileSystem) dropIfUnused(n *node) {
	if n.lookups == 0 && n.opens == 0 && n.kind != kindRoot {
		delete(f.nodes, n.id)
		if f.names[n.name] == n {
			delete(f.names, n.name)
		}
	}
}

// node returns the node nodeID, or nil.
func (r *raw) node(nodeID uint64) *node {
	r.fs.mu.Lock()
	defer r.fs.mu.Unlock()
	return r.fs.nodes[nodeID]
}

func (r *raw) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	f := r.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	n := f.nodes[in.NodeId]
	if n == nil {
		return fuse.ENOENT
	}
	if n.special() {
		out.SetTimeout(specialTimeout)
	} else {
		out.SetTimeout(attrTimeout)
	}
	return f.fillAttr(n, &out.Attr)
}

func (r *raw) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	f := r.fs
	n := r.node(in.NodeId)
	if n == nil {
		return fuse.ENOENT
	}
	if n.kind == kindRoot || n.special() {
		return fuse.EPERM
	}
	if in.Valid&fuse.FATTR_SIZE != 0 {
		if st := r.truncate(cancel, n, int64(in.Size), in.Caller); !st.Ok() {
			return st
		}
	}
	if in.Valid&fuse.FATTR_MODE != 0 {
		if err := os.Chmod(n.db.path(backingName(n.kind)), os.FileMode(in.Mode&0o777)); err != nil {
			return fuse.ToStatus(err)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out.SetTimeout(attrTimeout)
	return f.fillAttr(n, &out.Attr)
}

// truncate sets the size of a backing file, committing a transaction first
// where truncating ends one.
func (r *raw) truncate(cancel <-chan struct{}, n *node, size int64, c fuse.Caller) fuse.Status {
	if n.kind != kindShm && r.fs.refuseWrite(c, "truncate", n.name) {
		return fuse.Status(syscall.EROFS)
	}
	d := n.db
	d.mu.Lock()
	before := d.committed
	st := r.truncateLocked(n, size)
	after := d.committed
	d.mu.Unlock()
	return r.fs.awaitCommit(cancel, c.Pid, n, before, after, st)
}

// truncateLocked truncates n's backing file. Caller holds its database's
// mu.
func (r *raw) truncateLocked(n *node, size int64) fuse.Status {
	d := n.db
	ctx := context.Background()
	switch {
	case n.kind == kindDB:
		if err := d.drain(); err != nil {
			return r.fs.ioError(n, "truncate", err)
		}
		d.keepFileRange(size, -1)
	case n.kind == kindJournal && size == 0:
		if err := d.endJournal(ctx); err != nil {
			return r.fs.ioError(n, "commit", err)
		}
	case n.kind == kindWAL:
		if err := d.endWAL(ctx, size); err != nil {
			return r.fs.ioError(n, "sync", err)
		}
	}
	return fuse.ToStatus(os.Truncate(d.path(backingName(n.kind)), size))
}

// ioError logs err, which fails an app's operation on n, and turns it into
// the status the app sees: ENOSPC for a full disk, else EIO.
func (f *FileSystem) ioError(n *node, op string, err error) fuse.Status {
	f.Logger.Error("capture failed; the operation fails and SQLite rolls the transaction back", "db", n.db.Name, "file", n.name, "op", op, "err", err)
	if st := fuse.ToStatus(err); st == fuse.Status(syscall.ENOSPC) || st == fuse.Status(syscall.EDQUOT) {
		return st
	}
	return fuse.EIO
}

// refuseExpired logs an operation refused because the write deadline
// passed (SetWriteDeadline), at most once a second.
func (f *FileSystem) refuseExpired(op, name string, pid uint32) {
	now := time.Now().UnixNano()
	last := f.expiredLogged.Load()
	if now-last < int64(time.Second) || !f.expiredLogged.CompareAndSwap(last, now) {
		return
	}
	f.Logger.Error("write refused: this node's lease ran out before it could renew it; another node may hold it now",
		"op", op, "file", name, "pid", pid)
}

// refusal is when refuseWrite last logged a process's write, and the
// primary it named.
type refusal struct {
	at      time.Time
	primary string
}

// refuseWrite reports whether the mount is read-only, logging who tried to
// write and which node is the primary: the app's error carries an errno
// only (EROFS or EPERM), so the log and .primary are where it learns where
// to write. It logs once a minute per process, and again at once when the
// primary has changed since.
func (f *FileSystem) refuseWrite(c fuse.Caller, op, name string) bool {
	expired := f.writesExpired()
	if !f.readOnly.Load() && !expired || f.isLockHolder(c.Pid) {
		// The lock holder opens the database for writing to take write
		// locks; it writes nothing.
		return false
	}
	if expired {
		f.refuseExpired(op, name, c.Pid)
		return true
	}
	f.mu.Lock()
	now := time.Now()
	primary := f.primary
	last, seen := f.refused[c.Pid]
	report := !seen || now.Sub(last.at) > time.Minute || last.primary != primary
	if report {
		f.refused[c.Pid] = refusal{at: now, primary: primary}
	}
	f.mu.Unlock()
	if !report {
		return true
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", c.Pid))
	f.Logger.Warn("write refused: the mount is read-only on this node", "op", op, "file", name,
		"pid", c.Pid, "uid", c.Uid, "process", strings.TrimSpace(string(comm)), "primary", strings.TrimSpace(primary))
	return true
}

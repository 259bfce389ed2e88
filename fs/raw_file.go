package fs

import (
	"context"
	"errors"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/ltx"
)

const writeFlags = syscall.O_WRONLY | syscall.O_RDWR

func (r *raw) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	f := r.fs
	if in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	dbName, kind := parseName(name)
	if kind == kindSuper {
		// Capture keeps one log per database; a transaction over several
		// could be committed in one log and not another.
		f.Logger.Error("refused a transaction over several databases (ATTACH): their logs are separate and cannot commit it atomically; commit each database in a transaction of its own",
			"super_journal", name, "pid", in.Caller.Pid)
		return fuse.EPERM
	}
	// Past the write deadline (not read-only) a WAL may still be created:
	// readers open it, and it holds no commit yet.
	if kind != kindShm && (kind != kindWAL || f.readOnly.Load()) && f.refuseWrite(in.Caller, "create", name) {
		return fuse.Status(syscall.EROFS)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.dbs[dbName]
	switch {
	case kind == kindDB && !validDBName(name):
		return fuse.EPERM
	case kind == kindDB && d == nil:
		var err error
		if d, err = f.createDB(context.Background(), name); err != nil {
			f.Logger.Error("create database", "db", name, "err", err)
			return fuse.ToStatus(err)
		}
		f.dbs[name] = d
		f.changedLocked()
		f.Logger.Info("database created", "db", name)
	case d == nil:
		return fuse.Status(syscall.EPERM) // a companion file needs its database
	case f.names[name] != nil && in.Flags&syscall.O_EXCL != 0:
		return fuse.Status(syscall.EEXIST)
	case kind != kindDB && kind != kindJournal && kind != kindWAL && kind != kindShm:
		return fuse.EPERM
	}
	if kind == kindJournal && f.names[name] == nil {
		// SQLite creates and deletes a journal for every transaction in
		// DELETE mode: a spare file saves creating one.
		f.journalFromSpare(d)
	}
	flags := int(in.Flags)&^(syscall.O_EXCL|syscall.O_TRUNC) | syscall.O_CREAT
	file, err := os.OpenFile(d.path(backingName(kind)), flags, os.FileMode(in.Mode&0o777))
	if err != nil {
		return fuse.ToStatus(err)
	}
	d.dirDirty.Store(true)
	if kind == kindWAL {
		if st := r.openedWAL(d); !st.Ok() {
			_ = file.Close()
			return st
		}
	}
	n := f.names[name]
	if n == nil {
		n = f.newNode(name, kind, d)
	}
	n.lookups++
	if st := f.fillEntry(n, &out.EntryOut); !st.Ok() {
		_ = file.Close()
		return st
	}
	out.Fh = f.addHandle(n, file, nil)
	f.markLockHolder(out.Fh, in.Caller.Pid)
	out.OpenFlags = openFlags(kind)
	if kind == kindWAL || kind == kindShm {
		f.servePassthrough(n, file, out.Fh, &out.OpenOut)
	}
	return fuse.OK
}

// servePassthrough answers an open of WAL or -shm node n, with handle fh,
// with its backing file for the kernel to read, write and map, if it can.
// A -shm passed through shares its pages with the backing file: the daemon
// reads SQLite's wal-index as SQLite has just written it. Caller holds
// f.mu.
func (f *FileSystem) servePassthrough(n *node, file *os.File, fh uint64, out *fuse.OpenOut) {
	// The kernel opens the backing file afresh for each open, with that
	// open's flags, from the path of the one registered.
	id := f.registerWAL(n, file)
	if n.kind == kindShm {
		n.db.shmNode.Store(n.id)
	}
	if id == 0 {
		return
	}
	if n.kind == kindShm {
		n.db.shmPassthrough.Store(true)
	} else if err := f.passedThrough(n.db); err != nil {
		f.releaseWAL(n)
		f.Logger.Error("FUSE passthrough", "db", n.db.Name, "err", err)
		return
	}
	f.handles[fh].backing = true
	out.BackingID = id
	out.OpenFlags = fuse.FOPEN_PASSTHROUGH
}

// openFlags are the FUSE open flags of a file of kind. A rollback journal
// bypasses the page cache: SQLite writes it in small pieces that straddle
// pages (a page number, the page, a checksum), which the kernel would send
// as one request per piece of page, and reads it back only to roll back.
func openFlags(kind nodeKind) uint32 {
	if kind == kindJournal {
		return fuse.FOPEN_DIRECT_IO
	}
	return fuse.FOPEN_KEEP_CACHE
}

// openedWAL opens the backing WAL for capture once it exists.
func (r *raw) openedWAL(d *DB) fuse.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return fuse.ToStatus(d.openWALFile())
}

// addHandle registers an open file. Caller holds f.mu.
func (f *FileSystem) addHandle(n *node, file *os.File, data []byte) uint64 {
	f.lastFh++
	f.handles[f.lastFh] = &handle{node: n, file: file, data: data}
	n.opens++
	return f.lastFh
}

func (r *raw) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	f := r.fs
	n := r.node(in.NodeId)
	if n == nil {
		return fuse.ENOENT
	}
	if n.kind == kindRoot {
		return fuse.EISDIR
	}
	if n.special() {
		if in.Flags&writeFlags != 0 {
			return fuse.Status(syscall.EACCES)
		}
		if n.kind == kindPos {
			// The position of every transaction SQLite has committed.
			if err := n.db.Flush(); err != nil {
				f.Logger.Warn("position file: LTX files are behind", "db", n.db.Name, "err", err)
			}
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		out.Fh = f.addHandle(n, nil, f.content(n))
		out.OpenFlags = fuse.FOPEN_DIRECT_IO
		return fuse.OK
	}
	// A read-only mount refuses every open for writing, so that SQLite
	// opens read-only; past the write deadline only one that truncates,
	// since the deadline may move again and SQLite keeps a connection
	// read-only that opened read-only.
	if in.Flags&writeFlags != 0 && n.kind != kindShm && (f.readOnly.Load() || in.Flags&syscall.O_TRUNC != 0) &&
		f.refuseWrite(in.Caller, "open for writing", n.name) {
		return fuse.Status(syscall.EROFS)
	}
	if in.Flags&syscall.O_TRUNC != 0 {
		if st := r.truncate(cancel, n, 0, in.Caller); !st.Ok() {
			return st
		}
	}
	flags := int(in.Flags) &^ (syscall.O_CREAT | syscall.O_EXCL | syscall.O_TRUNC)
	file, err := os.OpenFile(n.db.path(backingName(n.kind)), flags, 0)
	if err != nil {
		return fuse.ToStatus(err)
	}
	if n.kind == kindWAL {
		if st := r.openedWAL(n.db); !st.Ok() {
			_ = file.Close()
			return st
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	out.Fh = f.addHandle(n, file, nil)
	f.markLockHolder(out.Fh, in.Caller.Pid)
	out.OpenFlags = openFlags(n.kind)
	if n.kind == kindWAL || n.kind == kindShm {
		f.servePassthrough(n, file, out.Fh, out)
	}
	return fuse.OK
}

func (r *raw) handle(fh uint64) *handle {
	r.fs.mu.Lock()
	defer r.fs.mu.Unlock()
	return r.fs.handles[fh]
}

func (r *raw) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	h := r.handle(in.Fh)
	if h == nil {
		return nil, fuse.EBADF
	}
	if h.file == nil {
		off := min(int(in.Offset), len(h.data))
		end := min(off+int(in.Size), len(h.data))
		return fuse.ReadResultData(h.data[off:end]), fuse.OK
	}
	n, err := h.file.ReadAt(buf[:in.Size], int64(in.Offset))
	if h.node.kind == kindDB && n > 0 && in.Offset < sqliteHeaderSize && r.fs.readOnly.Load() {
		txid := h.node.db.log.Pos().TXID
		if p := h.node.db.publishedTXID.Load(); p != 0 {
			txid = ltx.TXID(p) // published before its fsync (earlyTarget)
		}
		serveChangeCounter(h.file, txid, buf[:n], int64(in.Offset))
	}
	if n > 0 || err == nil || errors.Is(err, io.EOF) {
		return fuse.ReadResultData(buf[:n]), fuse.OK
	}
	return nil, fuse.ToStatus(err)
}

func (r *raw) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	h := r.handle(in.Fh)
	if h == nil || h.file == nil {
		return 0, fuse.EBADF
	}
	n := h.node
	if n.kind == kindShm {
		w, err := h.file.WriteAt(data, int64(in.Offset))
		return uint32(w), fuse.ToStatus(err)
	}
	if r.fs.refuseWrite(in.Caller, "write", n.name) {
		return 0, fuse.Status(syscall.EROFS)
	}
	d := n.db
	d.mu.Lock()
	before := d.committed
	w, st := r.write(h, in, data)
	after := d.committed
	d.mu.Unlock()
	return w, r.fs.awaitCommit(cancel, in.Caller.Pid, n, before, after, st)
}

// write writes data through h, which may commit a transaction. Caller
// holds the database's mu.
func (r *raw) write(h *handle, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	n, d := h.node, h.node.db
	off := int64(in.Offset)
	ctx := context.Background()
	var w int
	var err error
	switch n.kind {
	case kindDB:
		w, err = d.writeDatabase(h.file, data, off)
	case kindJournal:
		w, err = d.writeJournal(ctx, h.file, data, off)
	case kindWAL:
		w, err = d.writeWAL(ctx, h.file, data, off)
	default:
		return 0, fuse.EPERM
	}
	if errors.Is(err, errNotPages) {
		r.fs.Logger.Warn("write refused: SQLite writes a database file only in whole pages", "db", d.Name, "file", n.name, "err", err, "pid", in.Pid)
		return 0, fuse.EINVAL
	} else if errors.Is(err, errNoJournal) {
		if time.Since(d.noJournalLogged) > time.Minute {
			d.noJournalLogged = time.Now()
			r.fs.Logger.Error("write refused: SQLite writes the database without a rollback journal, in journal_mode=MEMORY or OFF; use DELETE, TRUNCATE, PERSIST or WAL",
				"db", d.Name, "err", err, "pid", in.Pid)
		}
		return 0, fuse.EIO
	} else if err != nil {
		return uint32(w), r.fs.ioError(n, "write", err)
	}
	return uint32(w), fuse.OK
}

func (r *raw) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	h := r.handle(in.Fh)
	if h == nil {
		return fuse.EBADF
	}
	if h.file == nil {
		return fuse.OK
	}
	if h.node.kind != kindShm && r.fs.writesExpired() {
		// What SQLite fsyncs it is about to take for durable: a commit,
		// or the pages a commit needs first.
		r.fs.refuseExpired("fsync", h.node.name, in.Caller.Pid)
		return fuse.EIO
	}
	switch h.node.kind {
	case kindDB:
		return fuse.ToStatus(h.node.db.syncDatabase(h.file, in.FsyncFlags&1 != 0))
	case kindWAL:
		d := h.node.db
		d.mu.Lock()
		before := d.committed
		d.mu.Unlock()
		if err := r.fs.fail("wal-sync"); err != nil {
			return r.fs.ioError(h.node, "fsync", err)
		}
		precommit := r.fs.commitWait.Load() != nil && d.precommitWAL(in.Caller.Pid)
		if err := d.syncWAL(h.file, in.FsyncFlags&1 != 0, precommit); err != nil {
			return r.fs.ioError(h.node, "fsync", err)
		}
		d.mu.Lock()
		after := d.committed
		if precommit {
			// The writer's commit: every commit not yet waited for is
			// waited for here, and not again at its unlock.
			before = d.walHeld
			d.walHeld = after
		}
		d.mu.Unlock()
		st := r.fs.awaitCommit(cancel, in.Caller.Pid, h.node, before, after, fuse.OK)
		if st.Ok() && r.fs.writesExpired() {
			// The deadline passed during the fsync: SQLite, told it
			// failed, does not commit the transaction it ends.
			r.fs.refuseExpired("fsync", h.node.name, in.Caller.Pid)
			return fuse.EIO
		}
		return st
	}
	if in.FsyncFlags&1 != 0 {
		return fuse.ToStatus(syscall.Fdatasync(int(h.file.Fd())))
	}
	return fuse.ToStatus(h.file.Sync())
}

func (r *raw) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	h := r.handle(in.Fh)
	if h == nil {
		return fuse.EBADF
	}
	st := r.releaseLocks(cancel, in.Caller.Pid, h.node, in.LockOwner)
	if h.node.kind == kindDB && st.Ok() {
		// A program that writes the file without SQLite's locks (cp, say)
		// has made its change when it closes the file.
		st = r.afterUnlock(cancel, in.Caller.Pid, h.node)
	}
	return st
}

// releaseLocks drops the POSIX locks owner holds on n: the process closed
// a descriptor of the file (POSIX drops all its locks then) or died.
// cancel and caller are the request's (see awaitCommit).
func (r *raw) releaseLocks(cancel <-chan struct{}, caller uint32, n *node, owner uint64) fuse.Status {
	if n.kind == kindShm {
		r.beforeWALUnlock(cancel, caller, n, owner)
	}
	if t := lockTable(n, false); t != nil {
		held := len(t.Locks()) > 0
		t.ReleaseOwner(owner)
		if held && n.kind == kindDB {
			return r.afterUnlock(cancel, caller, n)
		}
	}
	return fuse.OK
}

func (r *raw) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	f := r.fs
	f.mu.Lock()
	h := f.handles[in.Fh]
	delete(f.handles, in.Fh)
	if h != nil {
		if h.backing {
			f.releaseWAL(h.node)
		}
		h.node.opens--
		if h.holder {
			h.node.holderOpens--
		}
		f.dropIfUnused(h.node)
	}
	f.mu.Unlock()
	if h == nil {
		return
	}
	if in.LockOwner != 0 {
		// Nobody waits for a release: an error has nowhere to go.
		_ = r.releaseLocks(cancel, in.Caller.Pid, h.node, in.LockOwner)
		if t := lockTable(h.node, true); t != nil && in.ReleaseFlags&fuse.FUSE_RELEASE_FLOCK_UNLOCK != 0 {
			t.ReleaseOwner(in.LockOwner)
		}
	}
	if h.file != nil {
		_ = h.file.Close()
	}
}

func (r *raw) Unlink(cancel <-chan struct{}, in *fuse.InHeader, name string) fuse.Status {
	f := r.fs
	if in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	dbName, kind := parseName(name)
	if kind != kindShm && f.refuseWrite(in.Caller, "delete", name) {
		return fuse.Status(syscall.EROFS)
	}
	f.mu.Lock()
	d := f.dbs[dbName]
	n, st := f.lookupLocked(name)
	f.mu.Unlock()
	if !st.Ok() {
		return st
	}
	if n.special() {
		return fuse.EPERM
	}
	if kind == kindDB {
		return r.unlinkDB(d)
	}
	// SQLite closes a journal before deleting it; one another process has
	// open (checking whether it is hot) is deleted, not recycled. Opens are
	// counted under f.mu, taken before d.mu: a reader's open that lands
	// between this check and the rename below keeps a descriptor on a file
	// that may be reused.
	f.mu.Lock()
	open := n.opens > 0
	f.mu.Unlock()
	d.mu.Lock()
	before := d.committed
	ctx := context.Background()
	var err error
	switch kind {
	case kindJournal:
		err = d.endJournal(ctx)
	case kindWAL:
		if err = d.endWAL(ctx, 0); err == nil && d.wal.file != nil {
			if d.walFenced {
				// No process has it open any more: nothing is left to
				// fence off, and the applier writes it.
				if ferr := setImmutable(d.wal.file, false); ferr != nil {
					d.logger.Error("lift the fence of a WAL nobody has open", "db", d.Name, "err", ferr)
				} else {
					d.walFenced = false
				}
			}
			_ = d.wal.file.Close()
			d.wal.file = nil
			d.wal.passthrough = false // decided again when it is opened
		}
	}
	after := d.committed
	if err == nil && kind == kindJournal && after.n != before.n && (f.commitWait.Load() != nil || f.pastDeadline()) {
		// The commit must be acknowledged before the unlink returns (or
		// made before the write deadline), and if it is not, the unlink
		// fails with the journal still there for the kernel. Zeroed
		// first, as PERSIST mode leaves it: not hot, so neither SQLite
		// nor a restart rolls back the transaction, which is committed
		// here whatever the replicas do.
		err = zeroJournalHeader(d.path(journalFile))
		d.mu.Unlock()
		if err != nil {
			return r.fs.ioError(n, "delete", err)
		}
		if st := f.awaitCommit(cancel, in.Caller.Pid, n, before, after, fuse.OK); !st.Ok() {
			return st
		}
		d.mu.Lock()
		f.mu.Lock()
		open = n.opens > 0
		f.mu.Unlock()
	}
	if err == nil && kind == kindJournal && !open {
		// Unless a process has it open, the journal becomes a spare.
		err = f.spares.Put(d.path(journalFile))
	} else if err == nil {
		err = os.Remove(d.path(backingName(kind)))
	}
	d.dirDirty.Store(true)
	if kind != kindJournal {
		after = d.committed
	}
	d.mu.Unlock()
	if err != nil {
		return r.fs.ioError(n, "delete", err)
	}
	f.mu.Lock()
	n.gone = true
	delete(f.names, name)
	f.mu.Unlock()
	if kind == kindJournal {
		return fuse.OK // waited for above
	}
	st = f.awaitCommit(cancel, in.Caller.Pid, n, before, after, fuse.OK)
	if !st.Ok() {
		// The file is gone, though the kernel, told the unlink failed,
		// keeps its entry: drop it, from outside this request.
		f.notify.Go(func() { _ = f.server.DeleteNotify(fuse.FUSE_ROOT_ID, n.id, n.name) })
	}
	return st
}

// zeroJournalHeader zeroes the header of the rollback journal at path, as
// SQLite does to commit in PERSIST mode (pager.c, zeroJournalHdr).
func zeroJournalHeader(path string) error {
	j, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = j.WriteAt(make([]byte, 28), 0)
	return errors.Join(err, j.Close())
}

// unlinkDB deletes a database with its companion files and log.
func (r *raw) unlinkDB(d *DB) fuse.Status {
	f := r.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.deleteDB(d); err != nil {
		f.Logger.Error("delete database", "db", d.Name, "err", err)
		return fuse.ToStatus(err)
	}
	delete(f.dbs, d.Name)
	f.changedLocked()
	var gone []*node
	for name, n := range f.names {
		if n.db == d {
			n.gone = true
			delete(f.names, name)
			gone = append(gone, n)
		}
	}
	// The kernel drops the database's own entry; its companions' entries
	// are dropped by notification, which must not be sent from inside this
	// request (the kernel holds the directory locked until it returns).
	f.notify.Go(func() {
		for _, n := range gone {
			if n.name != d.Name {
				_ = f.server.DeleteNotify(fuse.FUSE_ROOT_ID, n.id, n.name)
			}
		}
	})
	return fuse.OK
}

func (r *raw) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	return fuse.EPERM
}

func (r *raw) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EPERM
}

func (r *raw) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	if in.Mask&2 != 0 && r.fs.readOnly.Load() {
		return fuse.Status(syscall.EROFS)
	}
	return fuse.OK
}

func (r *raw) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	return fuse.OK
}

func (r *raw) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return r.readDir(in, out, false)
}

// ReadDirPlus lists the directory without attributes: entries carry no
// node, so the kernel looks each up as it needs it.
func (r *raw) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return r.readDir(in, out, true)
}

func (r *raw) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	f := r.fs
	f.mu.Lock()
	var names []string
	for _, name := range f.sortedDBs() {
		d := f.dbs[name]
		names = append(names, name)
		for _, s := range suffixes {
			if s.kind == kindPos {
				names = append(names, name+s.suffix)
			} else if _, err := os.Lstat(d.path(s.backing)); err == nil {
				names = append(names, name+s.suffix)
			}
		}
	}
	if f.primary != "" {
		names = append(names, ".primary")
	}
	if f.lag != nil {
		names = append(names, ".lag")
	}
	f.mu.Unlock()
	all := append([]string{".", ".."}, names...)
	for i := int(in.Offset); i < len(all); i++ {
		mode := uint32(syscall.S_IFREG)
		if i < 2 {
			mode = syscall.S_IFDIR
		}
		e := fuse.DirEntry{Name: all[i], Mode: mode, Off: uint64(i + 1)}
		if plus {
			if out.AddDirLookupEntry(e) == nil {
				break
			}
		} else if !out.AddDirEntry(e) {
			break
		}
	}
	return fuse.OK
}

// FsyncDir makes the logs' directories durable along with the mount's:
// SQLite fsyncs the directory after deleting a journal under
// synchronous=EXTRA.
func (r *raw) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	f := r.fs
	for _, d := range f.dbList() {
		if err := d.syncDir(); err != nil {
			f.Logger.Error("fsync directory", "db", d.Name, "err", err)
			return fuse.EIO
		}
	}
	return fuse.OK
}

// journalFromSpare puts an empty spare file in place of d's journal, which
// does not exist, so that creating it does not create a file. Any failure
// leaves the journal to be created.
func (f *FileSystem) journalFromSpare(d *DB) {
	path := f.spares.Take()
	if path == "" {
		return
	}
	// Emptied before it is renamed: a spare may hold an old journal, which
	// must never appear as this database's.
	err := os.Truncate(path, 0)
	if err == nil {
		err = unix.Renameat2(unix.AT_FDCWD, path, unix.AT_FDCWD, d.path(journalFile), unix.RENAME_NOREPLACE)
	}
	if err != nil {
		_ = os.Remove(path)
	}
}

func (r *raw) StatFs(cancel <-chan struct{}, in *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	var st syscall.Statfs_t
	if err := syscall.Statfs(r.fs.DataDir, &st); err != nil {
		return fuse.ToStatus(err)
	}
	out.FromStatfsT(&st)
	return fuse.OK
}

package fs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// The lock holder: how a replica with fs.locks: kernel holds SQLite's
// readers off while it applies a transaction.
//
// With kernel locks, SQLite's POSIX locks on the mount's files never reach
// the daemon: the kernel keeps them, and a read transaction costs no FUSE
// round trip (see bench/fsbench). To keep readers out, the applier must
// take the same locks a SQLite writer would, in the kernel, through a file
// descriptor on the mount. The daemon holds no file on its own mount (a
// daemon killed with one open hangs for good in the FLUSH its exit sends
// to itself), so a child process does it: RunLockHolder, which regiond
// runs as "regiond lock-holder". It opens files on the mount, takes write
// locks with F_SETLKW and drops them, as the daemon asks on its stdin.
//
// Unlike the mount's own lock table (fs.locks: mount), the kernel gives a
// waiting writer no preference and lets no reader wait: a reader that
// meets a hold fails its lock and SQLite sleeps and tries again. The
// applier therefore leaves readers a gap after every hold, while any
// process has the database open (holdReadersKernel, holdGapMin and
// holdGapMax). The holder must not inherit the daemon's FUSE connection
// (see fusectl.CloseOnExec): killed with the daemon, it would keep the
// connection alive and hang in the FLUSH of its own files.
//
// The protocol is one line per request, "ID OP CREATE START END PATH"
// (OP lock, share, try or unlock: lock and share wait for a write or read
// lock, try takes a write lock or fails at once with an error starting
// "busy", unlock drops the bytes, or every lock of the file when START and
// END are 0; CREATE 1 to create the file if needed; PATH last,
// to the end of the line), and one line per reply, "ID ok" or
// "ID error MESSAGE". Requests for one path run in the order they came,
// each after the one before has finished: POSIX locks belong to the
// process, so two requests of one process for one file never wait for
// each other and must not overlap. Requests for different paths run
// side by side.

// RunLockHolder serves the lock holder's protocol on r and w until r ends.
func RunLockHolder(r io.Reader, w io.Writer) error {
	var (
		outMu sync.Mutex
		out   = bufio.NewWriter(w)
		wg    sync.WaitGroup
		paths = map[string]chan lockRequest{}
		files = map[string]*os.File{}
		fmu   sync.Mutex // guards files
	)
	reply := func(id uint64, err error) {
		outMu.Lock()
		defer outMu.Unlock()
		if err != nil {
			fmt.Fprintf(out, "%d error %s\n", id, strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			fmt.Fprintf(out, "%d ok\n", id)
		}
		_ = out.Flush()
	}
	serve := func(q <-chan lockRequest) {
		defer wg.Done()
		for req := range q {
			reply(req.id, req.do(files, &fmu))
		}
	}
	in := bufio.NewScanner(r)
	in.Buffer(make([]byte, 64*1024), 1<<20)
	for in.Scan() {
		req, err := parseLockRequest(in.Text())
		if err != nil {
			return fmt.Errorf("lock holder: %w", err)
		}
		q := paths[req.path]
		if q == nil {
			q = make(chan lockRequest, 64)
			paths[req.path] = q
			wg.Add(1)
			go serve(q)
		}
		q <- req
	}
	for _, q := range paths {
		close(q)
	}
	wg.Wait()
	for _, f := range files {
		_ = f.Close()
	}
	return in.Err()
}

// lockRequest is one request to the lock holder.
type lockRequest struct {
	id         uint64
	op         string // "lock" or "unlock"
	create     bool
	start, end uint64
	path       string
}

func (q lockRequest) String() string {
	c := 0
	if q.create {
		c = 1
	}
	return fmt.Sprintf("%d %s %d %d %d %s", q.id, q.op, c, q.start, q.end, q.path)
}

func parseLockRequest(line string) (lockRequest, error) {
	f := strings.SplitN(line, " ", 6)
	if len(f) != 6 || f[5] == "" {
		return lockRequest{}, fmt.Errorf("request %q: want ID OP CREATE START END PATH", line)
	}
	var q lockRequest
	var err error
	if q.id, err = strconv.ParseUint(f[0], 10, 64); err != nil {
		return q, fmt.Errorf("request %q: ID: %w", line, err)
	}
	q.op, q.create, q.path = f[1], f[2] == "1", f[5]
	switch q.op {
	case "lock", "try", "share", "unlock":
	default:
		return q, fmt.Errorf("request %q: OP %q is not lock, try, share or unlock", line, q.op)
	}
	if q.start, err = strconv.ParseUint(f[3], 10, 63); err != nil {
		return q, fmt.Errorf("request %q: START: %w", line, err)
	}
	if q.end, err = strconv.ParseUint(f[4], 10, 63); err != nil || q.end < q.start {
		return q, fmt.Errorf("request %q: END must be a number at least START", line)
	}
	return q, nil
}

// do carries the request out: a write lock of bytes start to end, waiting
// for it, or every lock of the file dropped.
func (q lockRequest) do(files map[string]*os.File, mu *sync.Mutex) error {
	mu.Lock()
	f := files[q.path]
	mu.Unlock()
	if f == nil {
		if q.op == "unlock" {
			return nil // never locked
		}
		flags := os.O_RDWR
		if q.create {
			flags |= os.O_CREATE
		}
		var err error
		if f, err = os.OpenFile(q.path, flags, 0o644); err != nil {
			return err
		}
		mu.Lock()
		files[q.path] = f
		mu.Unlock()
	}
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Start: int64(q.start), Len: int64(q.end - q.start + 1)}
	cmd := syscall.F_SETLKW
	switch q.op {
	case "try":
		cmd = syscall.F_SETLK
	case "share":
		lk.Type = syscall.F_RDLCK
	case "unlock":
		cmd, lk.Type = syscall.F_SETLK, syscall.F_UNLCK
		if q.start == 0 && q.end == 0 {
			lk.Len = 0 // the whole file
		}
	}
	err := syscall.FcntlFlock(f.Fd(), cmd, &lk)
	for err == syscall.EINTR {
		err = syscall.FcntlFlock(f.Fd(), cmd, &lk)
	}
	if q.op == "try" && (err == syscall.EAGAIN || err == syscall.EACCES) {
		return errors.New(errLockBusy)
	}
	if err != nil {
		return fmt.Errorf("%s bytes %d-%d of %s: %w", q.op, q.start, q.end, q.path, err)
	}
	return nil
}

// errLockBusy is the lock holder's reply to a try that another process's
// lock keeps out.
const errLockBusy = "busy: another process holds a lock over the bytes"

// lockHolder is the daemon's side of a running lock holder.
type lockHolder struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	exited   chan struct{} // closed when the process is gone
	mu       sync.Mutex    // guards what follows
	next     uint64
	pending  map[uint64]chan error
	err      error // why the process is gone
	stopping bool  // stop was called
	onError  func(lockRequest, error)
	sent     map[uint64]lockRequest
}

// startLockHolder starts cmd as a lock holder. It is killed when the daemon
// dies (PR_SET_PDEATHSIG); onError is told of failed requests nobody waits
// for.
func startLockHolder(cmd *exec.Cmd, onError func(lockRequest, error)) (*lockHolder, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the lock holder %s: %w", cmd.Path, err)
	}
	h := &lockHolder{cmd: cmd, stdin: stdin, exited: make(chan struct{}), pending: map[uint64]chan error{}, sent: map[uint64]lockRequest{}, onError: onError}
	go h.read(stdout)
	return h, nil
}

// read takes the replies until the process ends.
func (h *lockHolder) read(stdout io.Reader) {
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		id, rest, _ := strings.Cut(sc.Text(), " ")
		n, err := strconv.ParseUint(id, 10, 64)
		if err != nil {
			continue
		}
		var rerr error
		if msg, ok := strings.CutPrefix(rest, "error "); ok {
			rerr = errors.New(msg)
		}
		h.mu.Lock()
		ch, req := h.pending[n], h.sent[n]
		delete(h.pending, n)
		delete(h.sent, n)
		h.mu.Unlock()
		if ch != nil {
			ch <- rerr
		} else if rerr != nil && h.onError != nil {
			h.onError(req, rerr)
		}
	}
	err := h.cmd.Wait()
	h.mu.Lock()
	h.err = fmt.Errorf("the lock holder (pid %d) exited: %v", h.cmd.Process.Pid, err)
	if !h.stopping && h.onError != nil {
		// Its locks went with it: readers may have come in while an
		// apply wrote the database.
		go h.onError(lockRequest{}, h.err)
	}
	for id, ch := range h.pending {
		ch <- h.err
		delete(h.pending, id)
	}
	h.mu.Unlock()
	close(h.exited)
}

// send sends a request and returns the channel its reply comes on, or nil
// if wait is false.
func (h *lockHolder) send(req lockRequest, wait bool) (chan error, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err != nil {
		return nil, h.err
	}
	h.next++
	req.id = h.next
	var ch chan error
	if wait {
		ch = make(chan error, 1)
		h.pending[req.id] = ch
	}
	h.sent[req.id] = req
	if _, err := io.WriteString(h.stdin, req.String()+"\n"); err != nil {
		delete(h.pending, req.id)
		delete(h.sent, req.id)
		return nil, fmt.Errorf("the lock holder (pid %d): %w", h.cmd.Process.Pid, err)
	}
	return ch, nil
}

// lock takes the write locks reqs (op "lock"), one after the other in the
// holder, each waiting for readers to drop theirs, and waits for all of
// them up to ctx. Locks given up on are still taken when the readers go,
// until unlock of the same path, which is done after them.
func (h *lockHolder) lock(ctx context.Context, reqs []lockRequest) error {
	replies := make([]chan error, len(reqs))
	for i, req := range reqs {
		ch, err := h.send(req, true)
		if err != nil {
			return err
		}
		replies[i] = ch
	}
	for i, ch := range replies {
		select {
		case err := <-ch:
			if err != nil {
				return err
			}
		case <-ctx.Done():
			return fmt.Errorf("lock bytes %d-%d of %s: %w", reqs[i].start, reqs[i].end, reqs[i].path, ctx.Err())
		}
	}
	return nil
}

// unlock drops every lock of path, without waiting.
func (h *lockHolder) unlock(path string, start, end uint64) error {
	_, err := h.send(lockRequest{op: "unlock", path: path, start: start, end: end}, false)
	return err
}

// alive reports whether the process still runs.
func (h *lockHolder) alive() bool {
	select {
	case <-h.exited:
		return false
	default:
		return true
	}
}

// stop kills the process, which drops its locks and closes its files on
// the mount, and waits for it.
func (h *lockHolder) stop() {
	h.mu.Lock()
	h.stopping = true
	h.mu.Unlock()
	_ = h.stdin.Close()
	_ = h.cmd.Process.Kill()
	<-h.exited
}

// lockHolder returns the running lock holder, started if none runs.
func (f *FileSystem) lockHolder() (*lockHolder, error) {
	f.holderMu.Lock()
	defer f.holderMu.Unlock()
	if f.holder != nil && f.holder.alive() {
		return f.holder, nil
	}
	if f.LockHolder == nil {
		return nil, errors.New("a replica with fs.locks: kernel needs a lock holder process to hold SQLite's readers off, and none is configured")
	}
	select {
	case <-f.closing:
		return nil, errors.New("the filesystem is closing")
	default:
	}
	if f.holder != nil {
		f.Logger.Info("starting another lock holder", "last", f.holder.err)
	}
	h, err := startLockHolder(f.LockHolder(), func(req lockRequest, err error) {
		if req.op == "" {
			f.Logger.Error("the lock holder exited on its own: if an apply was under way, readers may have read part of it; the next apply starts another", "err", err)
			return
		}
		f.Logger.Error("the lock holder failed a request", "request", req.String(), "err", err)
	})
	if err != nil {
		return nil, err
	}
	f.holder = h
	f.holderPid.Store(int32(h.cmd.Process.Pid))
	f.Logger.Debug("lock holder started", "pid", h.cmd.Process.Pid)
	return h, nil
}

// stopLockHolder stops the lock holder, if one runs.
func (f *FileSystem) stopLockHolder() {
	f.holderMu.Lock()
	defer f.holderMu.Unlock()
	if f.holder != nil {
		f.holder.stop()
		f.holder = nil
	}
}

// isLockHolder reports whether tid, a thread as FUSE names the caller of a
// request, is one of the lock holder's.
func (f *FileSystem) isLockHolder(tid uint32) bool {
	return sameProcess(uint32(f.holderPid.Load()), tid)
}

// markLockHolder marks handle fh as the lock holder's if tid is one of its
// threads. Caller holds f.mu.
func (f *FileSystem) markLockHolder(fh uint64, tid uint32) {
	if h := f.handles[fh]; h != nil && f.isLockHolder(tid) {
		h.holder = true
		h.node.holderOpens++
	}
}

// readersOpen reports whether any process but the lock holder has d's
// database or -shm open: only then can a reader be waiting to get in.
func (f *FileSystem) readersOpen(d *DB) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, name := range []string{d.Name, d.Name + "-shm"} {
		if n := f.names[name]; n != nil && n.opens > n.holderOpens {
			return true
		}
	}
	return false
}

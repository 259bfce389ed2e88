package fs_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	_ "github.com/mattn/go-sqlite3" // registers the "sqlite3" driver

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// crashChildEnv, when set, makes the test binary run a child process of the
// crash tests instead of the tests. Its value is one of
//
//	writer PATH MODE BLOB             commit rows to the SQLite database PATH until killed
//	daemon DATA MOUNT PASSTHROUGH     mount DATA at MOUNT (PASSTHROUGH: true, false, no-kernel), serve until SIGTERM (SIGUSR1, SIGUSR2: cut the power)
//	watch DIR MASK SUFFIX NTH PID     kill PID at an inotify event in DIR
//	reader PATH                       read the SQLite database PATH every 2 ms until killed
//	bank-reader PATH MS               read transactions of MS ms on bank.db at PATH, back to back, until killed
//	bank-reader-step PATH             one read transaction of bank.db at PATH per line on stdin
//	bank-reader-tx PATH               begin, read in or end one read transaction of bank.db at PATH, as stdin says
//
// Paths must not contain spaces (t.TempDir's do not).
const crashChildEnv = "MERIDIAN_FS_CRASH_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(crashChildEnv); v != "" {
		if err := crashChild(strings.Fields(v)); err != nil {
			fmt.Fprintf(os.Stderr, "%s child: %v\n", v, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	testingutil.Main(m)
}

func crashChild(args []string) error {
	switch {
	case len(args) == 4 && args[0] == "writer":
		size, err := strconv.Atoi(args[3])
		if err != nil {
			return err
		}
		return writerChild(args[1], args[2], size)
	case len(args) == 2 && args[0] == "reader":
		return readerChild(args[1])
	case len(args) == 3 && args[0] == "bank-reader":
		ms, err := strconv.Atoi(args[2])
		if err != nil {
			return err
		}
		return bankReaderChild(args[1], time.Duration(ms)*time.Millisecond)
	case len(args) == 1 && args[0] == "lock-holder":
		return fs.RunLockHolder(os.Stdin, os.Stdout)
	case len(args) == 2 && args[0] == "bank-reader-step":
		return bankReaderStepChild(args[1])
	case len(args) == 2 && args[0] == "bank-reader-tx":
		return bankReaderTxChild(args[1])
	case len(args) == 4 && args[0] == "daemon":
		return daemonChild(args[1], args[2], args[3])
	case len(args) == 6 && args[0] == "watch":
		mask, err := strconv.ParseUint(args[2], 10, 32)
		if err != nil {
			return err
		}
		nth, err := strconv.Atoi(args[4])
		if err != nil {
			return err
		}
		pid, err := strconv.Atoi(args[5])
		if err != nil {
			return err
		}
		return watchChild(args[1], uint32(mask), args[3], nth, pid)
	}
	return fmt.Errorf("%s: unknown child mode %q", crashChildEnv, args)
}

// crashSchema is the one transaction that creates the crash tests' table:
// one row per transaction, numbered by seq, with a blob over several pages
// and an index on its hash, so each insert writes many pages in two
// B-trees.
const crashSchema = `BEGIN;
CREATE TABLE t (seq INTEGER PRIMARY KEY, h TEXT NOT NULL, b BLOB NOT NULL);
CREATE INDEX t_h ON t (h);
COMMIT;`

// rowBlob returns the blob of row seq, n bytes long: the same bytes for the
// same seq at every length, so a reader can check a row it did not write.
func rowBlob(seq int64, n int) []byte {
	b := make([]byte, (n+7)/8*8)
	r := rand.New(rand.NewPCG(uint64(seq), 0x6d6572696469616e))
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b[:n]
}

// rowBlobSize returns the size of row seq's blob for a writer started with
// base size base: 4 to 11 pages over base, varying with seq.
func rowBlobSize(seq int64, base int) int { return base + int(seq%8)*4096 + 100 }

func rowHash(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// writerChild opens the SQLite database at path in journal mode mode with
// synchronous=FULL and commits one row per transaction, numbered on from
// the largest seq in the table. It prints "ready MAX" once open, then
// "begin SEQ" before each transaction and "ack SEQ" after its COMMIT
// returned, and runs until killed or an operation fails.
func writerChild(path, mode string, base int) error {
	ctx := context.Background()
	db, err := sql.Open("sqlite3", fmt.Sprintf("file:%s?_journal_mode=%s&_synchronous=FULL&_busy_timeout=5000", path, mode))
	if err != nil {
		return err
	}
	defer func() { _ = db.Close() }()
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	var got string
	if err := conn.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&got); err != nil {
		return err
	} else if got != mode {
		return fmt.Errorf("journal_mode = %q, want %q", got, mode)
	}
	// A signal with a handler, as apps have for SIGINT: it interrupts a
	// FUSE request, but does not kill (TestFileSystem_CommitWaitInterrupted).
	signal.Notify(make(chan os.Signal, 1), syscall.SIGUSR1)
	// Checkpoint often: kills land in checkpoints and WAL restarts too.
	if _, err := conn.ExecContext(ctx, `PRAGMA wal_autocheckpoint = 16`); err != nil {
		return err
	}
	var last int64
	if err := conn.QueryRowContext(ctx, `SELECT coalesce(max(seq), 0) FROM t`).Scan(&last); err != nil {
		return err
	}
	if _, err := fmt.Printf("ready %d\n", last); err != nil {
		return err
	}
	for seq := last + 1; ; seq++ {
		b := rowBlob(seq, rowBlobSize(seq, base))
		if _, err := fmt.Printf("begin %d\n", seq); err != nil {
			return err
		}
		tx, err := conn.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(`INSERT INTO t (seq, h, b) VALUES (?, ?, ?)`, seq, rowHash(b), b); err != nil {
			_ = tx.Rollback()
			return fmt.Errorf("insert %d: %w", seq, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("commit %d: %w", seq, err)
		}
		if _, err := fmt.Printf("ack %d\n", seq); err != nil {
			return err
		}
	}
}

// daemonChild recovers and mounts the databases of dataDir at mountDir,
// prints "mounted", and serves until SIGTERM, then unmounts cleanly. It logs
// to stderr at level Info, which includes what recovery did. On SIGUSR1 it
// cuts the power (see powerCut).
//
// passthrough is "true" (fs.Passthrough), "false", or "no-kernel": as on a
// kernel without FUSE passthrough, the daemon serves the WAL and the -shm.
func daemonChild(dataDir, mountDir, passthrough string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	cut := make(chan os.Signal, 1)
	signal.Notify(cut, syscall.SIGUSR1, syscall.SIGUSR2)
	f := fs.New(dataDir, mountDir)
	f.Passthrough = passthrough == "true"
	if passthrough == "no-kernel" {
		f.WithoutKernelPassthrough()
	}
	f.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := f.Open(ctx); err != nil {
		return err
	}
	if _, err := fmt.Println("mounted"); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
	case sig := <-cut:
		return powerCut(f, sig == syscall.SIGUSR2)
	}
	closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return f.Close(closeCtx)
}

// powerCut does what a power failure does to the log of each database of
// f: every LTX file written since the log's last fsync loses its content
// (a file whose rename reached the disk before its data did), whatever
// else the daemon was doing; with keepNewest, the newest of them keeps
// its content when there are several (the disk wrote the files' data in
// another order; the cut waits for that, for 5 seconds at most). It prints "cut N" and "kept K", N files emptied and K
// kept, and dies with SIGKILL at once, its mount left dead.
func powerCut(f *fs.FileSystem, keepNewest bool) error {
	entries, err := os.ReadDir(filepath.Join(f.DataDir, "dbs"))
	if err != nil {
		return err
	}
	if keepNewest {
		// Cut when some log has two unsynced files or more, as it soon
		// has under an app that commits between checkpoints.
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Microsecond) {
			if slices.ContainsFunc(entries, func(e os.DirEntry) bool {
				d := f.DB(e.Name())
				return d != nil && len(d.Log().Unsynced()) > 1
			}) {
				break
			}
		}
	}
	// The power goes at one instant: nothing the daemon does after the
	// unsynced files are listed (a checkpoint that syncs the log and then
	// writes the database file) may reach the disk.
	for _, e := range entries {
		if d := f.DB(e.Name()); d != nil {
			d.Freeze()
		}
	}
	n, kept := 0, 0
	for _, e := range entries {
		d := f.DB(e.Name())
		if d == nil {
			continue
		}
		unsynced := d.Log().Unsynced()
		if keepNewest && len(unsynced) > 1 {
			unsynced = unsynced[:len(unsynced)-1]
			kept++
		}
		for _, st := range unsynced {
			if err := loseData(st); err != nil {
				return err
			}
			n++
		}
	}
	if _, err := fmt.Printf("cut %d\nkept %d\n", n, kept); err != nil {
		return err
	}
	return syscall.Kill(os.Getpid(), syscall.SIGKILL)
}

// loseData does to the stored LTX file what a power failure does to a file
// whose data had not reached the disk while its name (or its index record)
// had: a file of its own is emptied, a file in a segment zeroed.
func loseData(st ltx.Stored) error {
	if !st.Segment {
		if err := os.Truncate(st.Path, 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	f, err := os.OpenFile(st.Path, os.O_WRONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	_, err = f.WriteAt(make([]byte, st.Size), st.Offset)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// watchChild watches dir for inotify events of mask and kills the process
// pid with SIGKILL at the nth event on a file whose name ends in suffix. It
// prints "ready 0" once it watches and "fired NS" (the wall clock in
// nanoseconds just before the kill) after the kill.
func watchChild(dir string, mask uint32, suffix string, nth, pid int) error {
	p, err := os.FindProcess(pid) // a pidfd: the kill cannot reach another process
	if err != nil {
		return err
	}
	// This thread, at real-time priority, and the watched process share one
	// CPU: the event wakes the thread, which preempts the process before it
	// can go on, however loaded the machine.
	runtime.LockOSThread()
	param := struct{ priority int32 }{1}
	if _, _, errno := syscall.RawSyscall(syscall.SYS_SCHED_SETSCHEDULER, 0, schedFIFO, uintptr(unsafe.Pointer(&param))); errno != 0 {
		fmt.Fprintf(os.Stderr, "watch: no real-time priority (%v): the kill may land late\n", errno)
	}
	if err := pinTogether(pid); err != nil {
		fmt.Fprintf(os.Stderr, "watch: cannot share a CPU with process %d (%v): the kill may land late\n", pid, err)
	}
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC)
	if err != nil {
		return err
	}
	if _, err := syscall.InotifyAddWatch(fd, dir, mask); err != nil {
		return err
	}
	if _, err := fmt.Println("ready 0"); err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	for {
		m, err := syscall.Read(fd, buf)
		if err == syscall.EINTR {
			continue
		} else if err != nil {
			return err
		}
		for off := 0; off+syscall.SizeofInotifyEvent <= m; {
			evMask := binary.NativeEndian.Uint32(buf[off+4:])
			nameLen := int(binary.NativeEndian.Uint32(buf[off+12:]))
			name := strings.TrimRight(string(buf[off+syscall.SizeofInotifyEvent:off+syscall.SizeofInotifyEvent+nameLen]), "\x00")
			off += syscall.SizeofInotifyEvent + nameLen
			if evMask&mask == 0 || !strings.HasSuffix(name, suffix) {
				continue
			}
			if nth--; nth == 0 {
				now := time.Now().UnixNano()
				if err := p.Signal(syscall.SIGKILL); err != nil {
					return err
				}
				_, err := fmt.Printf("fired %d\n", now)
				return err
			}
		}
	}
}

// schedFIFO is Linux's SCHED_FIFO scheduling policy.
const schedFIFO = 1

// cpuSet is a Linux CPU affinity mask.
type cpuSet [16]uint64

// pinTogether binds the calling thread and every thread of process pid to
// one CPU, the first the calling thread may run on. Threads the process
// starts later inherit the binding from their creator.
func pinTogether(pid int) error {
	var set cpuSet
	if _, _, errno := syscall.RawSyscall(syscall.SYS_SCHED_GETAFFINITY, 0, unsafe.Sizeof(set), uintptr(unsafe.Pointer(&set))); errno != 0 {
		return errno
	}
	var one cpuSet
	for cpu := 0; cpu < len(set)*64; cpu++ {
		if set[cpu/64]&(1<<(cpu%64)) != 0 {
			one[cpu/64] = 1 << (cpu % 64)
			break
		}
	}
	pin := func(tid int) error {
		if _, _, errno := syscall.RawSyscall(syscall.SYS_SCHED_SETAFFINITY, uintptr(tid), unsafe.Sizeof(one), uintptr(unsafe.Pointer(&one))); errno != 0 {
			return errno
		}
		return nil
	}
	if err := pin(0); err != nil {
		return err
	}
	// Twice, for threads started while the first pass ran.
	for range 2 {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return err
		}
		for _, task := range tasks {
			tid, err := strconv.Atoi(task.Name())
			if err != nil {
				continue
			}
			if err := pin(tid); err != nil && err != syscall.ESRCH {
				return err
			}
		}
	}
	return nil
}

// child is a child process of a crash test: the test binary in one of the
// modes of crashChild.
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string // stdout, line by line; closed at EOF
	stderr *testingutil.LockedBuffer
	done   chan struct{} // closed once the process is waited for
	err    error         // what Wait returned; set before done is closed
	exited time.Time     // when Wait returned; set before done is closed
}

// lockHolderCommand runs this test binary as a lock holder
// (fs.RunLockHolder), for a replica with kernel locks.
func lockHolderCommand() *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashChildEnv+"=lock-holder")
	cmd.Stderr = os.Stderr
	return cmd
}

// startChild starts a child process, killed and waited for at cleanup.
func startChild(t *testing.T, args ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+strings.Join(args, " "))
	testingutil.DieWithParent(cmd)
	c := &child{cmd: cmd, lines: make(chan string, 1<<16), stderr: &testingutil.LockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = c.stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		c.err = cmd.Wait()
		c.exited = time.Now()
		close(c.done)
	}()
	t.Cleanup(func() {
		if err := c.kill(); err != nil {
			t.Error(err)
		}
	})
	return c
}

// kill kills the process with SIGKILL, by its PID, and waits for it, for
// 30 seconds at most.
func (c *child) kill() error {
	select {
	case <-c.done:
		return nil
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-c.done:
		return nil
	case <-time.After(30 * time.Second):
		pid := c.cmd.Process.Pid
		wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/wchan", pid))
		return fmt.Errorf("child %d did not exit 30s after SIGKILL: waiting in %s", pid, wchan)
	}
}

// mustKill kills the process and fails unless it died of the SIGKILL: it
// must not have stopped on its own.
func (c *child) mustKill(t *testing.T) {
	t.Helper()
	if err := c.kill(); err != nil {
		t.Fatal(err)
	}
	var exit *exec.ExitError
	if !errors.As(c.err, &exit) {
		t.Fatalf("%s: got exit %v, want killed by SIGKILL\n%s", c.cmd.Env[len(c.cmd.Env)-1], c.err, c.stderr.String())
	}
	if ws, ok := exit.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("%s: got exit %v, want killed by SIGKILL\n%s", c.cmd.Env[len(c.cmd.Env)-1], c.err, c.stderr.String())
	}
}

// mustOutliveDaemon kills a writer whose daemon was killed at killed, and
// fails if it ended before that: on the dead mount any error goes.
func (c *child) mustOutliveDaemon(t *testing.T, killed time.Time, daemon *child) {
	t.Helper()
	if err := c.kill(); err != nil {
		t.Fatal(err)
	}
	if c.exited.Before(killed) {
		t.Fatalf("writer: got exit %v %v before the daemon was killed, want it alive until then\n%s\ndaemon log:\n%s",
			c.err, killed.Sub(c.exited), c.stderr.String(), daemon.stderr.String())
	}
}

// mustReadLine reads the next line of the child's output, which must be
// "WORD N", and returns N.
func (c *child) mustReadLine(t *testing.T, word string) int64 {
	t.Helper()
	select {
	case line, ok := <-c.lines:
		f := strings.Fields(line)
		if !ok || len(f) != 2 || f[0] != word {
			_ = c.kill()
			t.Fatalf("child: got line %q, want %q N\n%v\n%s", line, word, c.err, c.stderr.String())
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	case <-time.After(20 * time.Second):
		t.Fatalf("child: no %q line in 20s\n%s", word, c.stderr.String())
	}
	return 0
}

// writerRun is what a writer child said before it died: it found rows up
// to ready, began transactions up to lastBegin and had COMMIT return up to
// lastAck.
type writerRun struct{ ready, lastBegin, lastAck int64 }

// writerRun reads the rest of a dead writer's output.
func (c *child) writerRun(t *testing.T, ready int64) writerRun {
	t.Helper()
	run := writerRun{ready, ready, ready}
	for line := range c.lines {
		var word string
		var n int64
		if _, err := fmt.Sscanf(line, "%s %d", &word, &n); err != nil {
			t.Fatalf("writer: bad line %q: %v", line, err)
		}
		switch word {
		case "begin":
			if got, want := n, run.lastBegin+1; got != want {
				t.Fatalf("writer: began %d, want %d", got, want)
			}
			run.lastBegin = n
		case "ack":
			if got, want := n, run.lastBegin; got != want {
				t.Fatalf("writer: acknowledged %d, want %d", got, want)
			}
			run.lastAck = n
		default:
			t.Fatalf("writer: bad line %q", line)
		}
	}
	return run
}

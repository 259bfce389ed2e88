package testingutil

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/fusectl"
)

// A test binary that mounts FUSE filesystems or starts processes runs its
// tests through Main, which makes sure that none of them outlives it,
// however it ends: pass, fail, panic, its own -timeout, or SIGKILL.
//
// Main gives the binary a run directory, meridian-test-PID-START-*, under
// the temporary directory, and points TMPDIR at it: every t.TempDir, and
// so every mount point a test makes, lies inside it. It then starts a
// guard: the same binary, in another mode, watching the test process.
//
// When the test process dies or starts dying (a thread with SIGKILL
// pending, as every thread has once the process exits, or a zombie
// leader), the guard kills every process the tests started, aborts the
// FUSE connection of every mount in the run directory, waits for the test
// process to be gone, detaches the mounts and removes the directory.
// Aborting the connections is what frees a test process stuck in a
// request on a mount it served itself: with its server threads gone,
// nobody else would ever answer, and the process could never exit.
//
// When the tests end normally, Main itself fails the run if a test left a
// mount or a process behind, and reaps them.
//
// At start, Main also reaps what an earlier run left: FUSE mounts in the
// run directory of a test process that is gone or dying, whose guard was
// killed with it.

// guardEnv, when set, makes a test binary run as the guard of the test
// process whose "PID START RUNDIR" it holds.
const guardEnv = "MERIDIAN_TEST_GUARD"

// runDirPrefix begins the name of a test binary's run directory.
const runDirPrefix = "meridian-test-"

// Guard timings.
const (
	guardPoll        = 100 * time.Millisecond // how often the guard looks at the test process
	guardScanEvery   = 10                     // polls between scans for the test's descendants
	guardExitTimeout = 60 * time.Second       // how long the guard waits for a dying test process
	leftoverGrace    = 2 * time.Second        // how long Main waits for killed children to go
	guardStartWait   = 100 * time.Millisecond // how often Main checks the guard has started
)

// Main runs m's tests under a guard (see above) and exits with their
// status. Call it from TestMain, after dispatching any child modes of the
// package's own:
//
//	func TestMain(m *testing.M) { testingutil.Main(m) }
func Main(m *testing.M) {
	if v := os.Getenv(guardEnv); v != "" {
		os.Exit(runGuard(v))
	}
	os.Exit(runGuarded(m))
}

// runGuarded makes the run directory, starts the guard and runs the tests.
func runGuarded(m *testing.M) int {
	base := os.TempDir()
	reapEarlierRuns(base)
	self, err := procStart(os.Getpid())
	if err != nil {
		fmt.Fprintf(os.Stderr, "testingutil: %v\n", err)
		return 1
	}
	run, err := os.MkdirTemp(base, fmt.Sprintf("%s%d-%d-", runDirPrefix, os.Getpid(), self))
	if err != nil {
		fmt.Fprintf(os.Stderr, "testingutil: make the run directory: %v\n", err)
		return 1
	}
	guard, err := startGuard(os.Getpid(), self, run)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testingutil: start the guard of this test process: %v\n", err)
		return 1
	}
	if err := os.Setenv("TMPDIR", run); err != nil {
		fmt.Fprintf(os.Stderr, "testingutil: %v\n", err)
		return 1
	}
	code := m.Run()
	if err := checkLeftovers(run, guard); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: %v\n", err)
		code = 1
	}
	if err := os.RemoveAll(run); err != nil {
		fmt.Fprintf(os.Stderr, "testingutil: remove the run directory: %v\n", err)
	}
	return code
}

// startGuard starts the guard of test process pid (started at start) and
// waits until it watches.
func startGuard(pid int, start uint64, run string) (int, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	ready := filepath.Join(run, ".guarded")
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d %d %s", guardEnv, pid, start, run))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	// Reaped whenever it exits; the test process does not wait for it.
	go func() { _ = cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			return cmd.Process.Pid, nil
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return 0, fmt.Errorf("guard %d did not start in 30s", cmd.Process.Pid)
		}
		time.Sleep(guardStartWait)
	}
}

// checkLeftovers fails if the tests left a FUSE mount in the run directory
// or a process running (other than the guard); it reaps what it finds.
func checkLeftovers(run string, guard int) error {
	var errs []error
	reaped, err := fusectl.Reap(run)
	for _, m := range reaped {
		errs = append(errs, fmt.Errorf("a test left the FUSE mount %v; aborted and unmounted it", m))
	}
	if err != nil {
		errs = append(errs, err)
	}
	procs := descendants(os.Getpid(), guard)
	if len(procs) > 0 {
		deadline := time.Now().Add(leftoverGrace)
		for len(procs) > 0 && time.Now().Before(deadline) {
			// Processes killed by a cleanup may still be on their way out.
			time.Sleep(guardPoll)
			procs = descendants(os.Getpid(), guard)
		}
	}
	for _, p := range procs {
		errs = append(errs, fmt.Errorf("a test left process %d (%s) running; killed it", p.pid, p.cmdline()))
		p.kill()
	}
	return errors.Join(errs...)
}

// runGuard is the guard's main: v is "PID START RUNDIR".
func runGuard(v string) int {
	// The guard outlives the test process by design: a Ctrl-C meant for
	// the tests, or the SIGQUIT of a bounded run, must not take it first.
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGHUP)
	f := strings.SplitN(v, " ", 3)
	if len(f) != 3 {
		fmt.Fprintf(os.Stderr, "testingutil guard: bad %s=%q\n", guardEnv, v)
		return 2
	}
	pid, err1 := strconv.Atoi(f[0])
	start, err2 := strconv.ParseUint(f[1], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		fmt.Fprintf(os.Stderr, "testingutil guard: bad %s=%q: %v\n", guardEnv, v, err)
		return 2
	}
	g := &guard{pid: pid, start: start, run: f[2], seen: map[int]proc{}}
	if err := os.WriteFile(filepath.Join(g.run, ".guarded"), nil, 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "testingutil guard: %v\n", err)
		return 2
	}
	return g.watch()
}

// guard watches one test process.
type guard struct {
	pid   int
	start uint64
	run   string
	seen  map[int]proc // every descendant seen, by PID
}

// watch waits until the test process is gone or dying, then cleans up
// after it.
func (g *guard) watch() int {
	for i := 0; ; i++ {
		if i%guardScanEvery == 0 {
			g.scan()
		}
		if dying(g.pid, g.start) {
			break
		}
		time.Sleep(guardPoll)
	}
	g.scan()
	var did []string
	for _, p := range g.seen {
		if p.kill() {
			did = append(did, fmt.Sprintf("killed process %d (%s)", p.pid, p.cmdline()))
		}
	}
	aborted := map[uint32]bool{}
	deadline := time.Now().Add(guardExitTimeout)
	for {
		// Abort again while waiting: a process killed just now may have
		// been serving a mount that a stuck thread waits on.
		mounts, err := fusectl.Mounts()
		if err != nil {
			fmt.Fprintf(os.Stderr, "testingutil guard: %v\n", err)
		}
		for _, m := range fusectl.Under(mounts, g.run) {
			if !aborted[m.Conn] {
				aborted[m.Conn] = true
				if err := fusectl.Abort(m.Conn); err != nil {
					fmt.Fprintf(os.Stderr, "testingutil guard: %v\n", err)
				}
				did = append(did, "aborted "+m.String())
			}
		}
		if !alive(g.pid, g.start) && !g.anyAlive() {
			break
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(os.Stderr, "testingutil guard: test process %d still there %v after it began to die\n%s",
				g.pid, guardExitTimeout, threadStacks(g.pid))
			break
		}
		time.Sleep(guardPoll)
	}
	reaped, err := fusectl.Reap(g.run)
	for _, m := range reaped {
		did = append(did, "unmounted "+m.Point)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "testingutil guard: %v\n", err)
	} else if _, statErr := os.Stat(g.run); statErr == nil {
		// The test process did not get to remove it: it did not end
		// through Main.
		if err := os.RemoveAll(g.run); err != nil {
			fmt.Fprintf(os.Stderr, "testingutil guard: %v\n", err)
		}
		did = append(did, "removed "+g.run)
	}
	if len(did) > 0 {
		fmt.Fprintf(os.Stderr, "testingutil guard: test process %d ended without cleaning up: %s\n", g.pid, strings.Join(did, "; "))
	}
	return 0
}

// scan records the test process's descendants, before they can be
// orphaned: once it is gone they belong to init.
func (g *guard) scan() {
	for _, p := range descendants(g.pid, os.Getpid()) {
		g.seen[p.pid] = p
	}
}

// anyAlive reports whether any descendant seen is still running.
func (g *guard) anyAlive() bool {
	for _, p := range g.seen {
		if alive(p.pid, p.start) {
			return true
		}
	}
	return false
}

// reapEarlierRuns aborts and unmounts the FUSE mounts left in the run
// directories under base of test processes that are gone or dying, and
// removes those directories, saying so.
func reapEarlierRuns(base string) {
	entries, err := os.ReadDir(base)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), runDirPrefix) {
			continue
		}
		var pid int
		var start uint64
		if _, err := fmt.Sscanf(strings.TrimPrefix(e.Name(), runDirPrefix), "%d-%d-", &pid, &start); err != nil {
			continue
		}
		if !dying(pid, start) {
			continue
		}
		dir := filepath.Join(base, e.Name())
		reaped, err := fusectl.Reap(dir)
		for _, m := range reaped {
			fmt.Fprintf(os.Stderr, "testingutil: aborted and unmounted the dead mount %v, left by test process %d of an earlier run\n", m, pid)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "testingutil: reap the mounts of an earlier run in %s: %v\n", dir, err)
			continue
		}
		// A process freed by the abort takes a moment to exit.
		for deadline := time.Now().Add(leftoverGrace); alive(pid, start) && time.Now().Before(deadline); {
			time.Sleep(guardPoll)
		}
		if !alive(pid, start) {
			_ = os.RemoveAll(dir)
		}
	}
}

// proc is a process, told from a later one with the same PID by its start
// time.
type proc struct {
	pid   int
	start uint64
}

// kill kills p with SIGKILL if it is still the process it was, and
// reports whether it did.
func (p proc) kill() bool {
	if !alive(p.pid, p.start) {
		return false
	}
	return syscall.Kill(p.pid, syscall.SIGKILL) == nil
}

// cmdline returns p's command line, for messages.
func (p proc) cmdline() string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.pid))
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(bytes.ReplaceAll(b, []byte{0}, []byte{' '})))
}

// descendants returns the processes below pid in the process tree,
// leaving out except and its descendants.
func descendants(pid, except int) []proc {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]proc{}
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(child)
		if err != nil {
			continue
		}
		children[st.ppid] = append(children[st.ppid], proc{child, st.start})
	}
	var out []proc
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			if c.pid == except {
				continue
			}
			out = append(out, c)
			queue = append(queue, c.pid)
		}
	}
	return out
}

// stat is what the guard reads of /proc/PID/stat.
type stat struct {
	state byte
	ppid  int
	start uint64 // clock ticks after boot
}

func readStat(pid int) (stat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return stat{}, err
	}
	// The command name, in parentheses, may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return stat{}, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// Fields from 3 on: state ppid pgrp session tty tpgid flags minflt
	// cminflt majflt cmajflt utime stime cutime cstime priority nice
	// num_threads itrealvalue starttime ...
	if len(f) < 20 {
		return stat{}, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	ppid, err1 := strconv.Atoi(f[1])
	start, err2 := strconv.ParseUint(f[19], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return stat{}, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return stat{state: f[0][0], ppid: ppid, start: start}, nil
}

// procStart returns the start time of process pid.
func procStart(pid int) (uint64, error) {
	st, err := readStat(pid)
	return st.start, err
}

// alive reports whether the process pid started at start still exists
// (as anything but a zombie waiting to be reaped).
func alive(pid int, start uint64) bool {
	st, err := readStat(pid)
	return err == nil && st.start == start && st.state != 'Z' && st.state != 'X'
}

// dying reports whether the process pid started at start is gone or on
// its way out: a zombie, or its leader thread has SIGKILL pending. Once a
// process calls exit or is killed, every thread but the exiting one gets
// SIGKILL, and the leader either has it pending or has exited (a zombie
// until the other threads are gone). A thread that waits on a FUSE
// request nobody answers stays like that forever.
func dying(pid int, start uint64) bool {
	if !alive(pid, start) {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return true
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		name, val, ok := strings.Cut(line, ":")
		if !ok || name != "SigPnd" && name != "ShdPnd" {
			continue
		}
		mask, err := strconv.ParseUint(strings.TrimSpace(val), 16, 64)
		if err == nil && mask&(1<<(syscall.SIGKILL-1)) != 0 {
			return true
		}
	}
	return false
}

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	mountFSType  = "fuse.meridian"
	mountTimeout = 30 * time.Second
	termTimeout  = 10 * time.Second
)

// daemon is a regiond serving one FUSE mount for the benchmark.
type daemon struct {
	name     string // "regiond", or "baseline regiond": how messages name it
	mountDir string
	logPath  string

	cmd     *exec.Cmd
	log     *os.File
	done    chan struct{} // closed when the process has exited
	waitErr error         // the process's exit; read after done is closed

	stopOnce sync.Once
	stopErr  error

	mu   sync.Mutex
	conn string // the FUSE connection's /sys/fs/fuse/connections/<minor>; set once mounted

	detachMu sync.Mutex
}

// writeConfig writes a regiond config for a static-primary node serving
// dataDir at mountDir. fs.log_segment_size is written only when
// segmentSize is not negative: a regiond from before the key rejects it as
// unknown.
func writeConfig(path, dataDir, mountDir, locks string, passthrough bool, segmentSize int64, extra string) error {
	segment := ""
	if segmentSize >= 0 {
		segment = fmt.Sprintf("  log_segment_size: %d\n", segmentSize)
	}
	cfg := fmt.Sprintf(`node: bench-1
region: local
data_dir: %q
mount_dir: %q
fs:
  locks: %s
  passthrough: %v
%slease:
  type: static
  static_primary: bench-1
%s`, dataDir, mountDir, locks, passthrough, segment, extra)
	return os.WriteFile(path, []byte(cfg), 0o644)
}

// startDaemon starts `bin run -config cfgPath`, named name in messages,
// and waits until it has
// mounted mountDir. The daemon gets its own process group, so a Ctrl-C at
// the terminal reaches only fsbench, which then stops the daemon in order;
// it is also sent SIGTERM if fsbench dies without doing so. started is
// called with the daemon as soon as the process runs, so a signal handler
// can kill it while the mount is awaited.
func startDaemon(ctx context.Context, name, bin, cfgPath, mountDir, logPath string, started func(*daemon)) (*daemon, error) {
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("%s binary: %w; build it with `go build -o bin/regiond ./cmd/regiond`, pass -regiond PATH (or -baseline PATH), or run with -bare-only", name, err)
	}
	log, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "run", "-config", cfgPath)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		_ = log.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, mountDir: mountDir, logPath: logPath, cmd: cmd, log: log, done: make(chan struct{})}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.done)
	}()
	started(d)
	if err := d.waitMounted(ctx); err != nil {
		_ = d.Stop()
		return nil, err
	}
	return d, nil
}

// waitMounted polls the mount table until mountDir is a fuse.meridian
// mount, the daemon exits, ctx ends, or mountTimeout passes.
func (d *daemon) waitMounted(ctx context.Context) error {
	deadline := time.Now().Add(mountTimeout)
	for {
		m, ok, err := findMount(d.mountDir, mountFSType)
		switch {
		case err != nil:
			return err
		case ok:
			if _, minor, found := strings.Cut(m.Dev, ":"); found {
				d.mu.Lock()
				d.conn = filepath.Join("/sys/fs/fuse/connections", minor)
				d.mu.Unlock()
			}
			return nil
		}
		select {
		case <-d.done:
			return fmt.Errorf("%s exited (%v) before mounting %s; its output:\n%s", d.name, d.waitErr, d.mountDir, d.logTail())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not mount %s as %s within %s; its output:\n%s", d.name, d.mountDir, mountFSType, mountTimeout, d.logTail())
		}
	}
}

// exited reports whether the daemon process has ended.
func (d *daemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// explain adds the daemon's state and output to an error seen on the mount.
func (d *daemon) explain(err error) error {
	state := d.name + " is still running"
	select {
	case <-d.done:
		state = fmt.Sprintf("%s exited (%v)", d.name, d.waitErr)
	case <-time.After(time.Second): // a dying daemon may take a moment
	}
	return fmt.Errorf("%w\n%s; its output ends:\n%s", err, state, d.logTail())
}

// Stop sends SIGTERM and waits for the daemon to exit and unmount; after
// termTimeout it sends SIGKILL. If the mount is still there afterwards it is
// detached with `fusermount3 -u -z`. Safe to call more than once and from
// several goroutines; later calls wait for and return the first result.
func (d *daemon) Stop() error {
	d.stopOnce.Do(func() { d.stopErr = d.stop() })
	return d.stopErr
}

func (d *daemon) stop() error {
	var errs []error
	if d.exited() {
		if d.waitErr != nil {
			errs = append(errs, fmt.Errorf("%s had exited with %v before fsbench stopped it", d.name, d.waitErr))
		}
	} else {
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-d.done:
		if d.waitErr != nil && len(errs) == 0 {
			errs = append(errs, fmt.Errorf("%s exited with %v after SIGTERM; its output ends:\n%s", d.name, d.waitErr, d.logTail()))
		}
	case <-time.After(termTimeout):
		errs = append(errs, fmt.Errorf("%s did not exit within %s of SIGTERM; killed it", d.name, termTimeout))
		d.kill()
	}
	if err := d.detach(); err != nil {
		errs = append(errs, err)
	}
	_ = d.log.Close()
	return errors.Join(errs...)
}

// Kill ends the daemon at once and detaches the mount: the second Ctrl-C,
// or a hung mount. With sig SIGQUIT the daemon first gets a chance to dump
// its goroutines to its log (Go's runtime does so and exits).
func (d *daemon) Kill(sig syscall.Signal) {
	if sig != syscall.SIGKILL {
		_ = d.cmd.Process.Signal(sig)
		select {
		case <-d.done:
		case <-time.After(3 * time.Second):
		}
	}
	d.kill()
	_ = d.detach()
}

// kill sends SIGKILL. A daemon thread stuck in the kernel on its own mount
// (a notification waiting for a directory lock held by a request that waits
// for the daemon) survives SIGKILL and keeps the requesters stuck too; then
// the FUSE connection is aborted, which fails every pending request.
func (d *daemon) kill() {
	_ = d.cmd.Process.Kill()
	select {
	case <-d.done:
		return
	case <-time.After(3 * time.Second):
	}
	d.mu.Lock()
	conn := d.conn
	d.mu.Unlock()
	if conn != "" {
		if err := os.WriteFile(filepath.Join(conn, "abort"), []byte("1"), 0); err == nil {
			fmt.Fprintf(os.Stderr, "fsbench: %s stuck after SIGKILL; aborted its FUSE connection %s\n", d.name, conn)
		}
	}
	select {
	case <-d.done:
	case <-time.After(5 * time.Second): // still stuck; detach anyway
	}
}

// detach lazily unmounts the mount directory if something is still mounted
// there. Stop and Kill may race to it.
func (d *daemon) detach() error {
	d.detachMu.Lock()
	defer d.detachMu.Unlock()
	dir := d.mountDir
	ok, err := isMounted(dir, "")
	if err != nil || !ok {
		return err
	}
	out, err := exec.Command("fusermount3", "-u", "-z", dir).CombinedOutput()
	if still, _ := isMounted(dir, ""); err != nil && still {
		return fmt.Errorf("%s still mounted and `fusermount3 -u -z` failed: %v: %s", dir, err, bytes.TrimSpace(out))
	}
	return fmt.Errorf("%s left %s mounted; detached it with `fusermount3 -u -z`", d.name, dir)
}

// logTail returns the last lines of the daemon's output.
func (d *daemon) logTail() string {
	data, err := os.ReadFile(d.logPath)
	if err != nil {
		return "  (" + err.Error() + ")"
	}
	text, dump, found := strings.Cut(string(data), "SIGQUIT: quit")
	lines := strings.Split(strings.TrimRight(text, "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	tail := "  " + strings.Join(lines, "\n  ")
	if len(lines) == 1 && lines[0] == "" {
		tail = "  (no output)"
	}
	if found {
		tail += fmt.Sprintf("\n  (then a goroutine dump of %d lines: see %s)", strings.Count(dump, "\n"), d.logPath)
	}
	return tail
}

// mountEntry is one line of /proc/self/mountinfo.
type mountEntry struct {
	Dev    string // major:minor
	Point  string
	FSType string
	Source string
}

func readMounts() ([]mountEntry, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var ms []mountEntry
	for line := range strings.Lines(string(data)) {
		f := strings.Fields(line)
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+2 >= len(f) {
			continue
		}
		ms = append(ms, mountEntry{Dev: f[2], Point: unescapeMount(f[4]), FSType: f[sep+1], Source: unescapeMount(f[sep+2])})
	}
	return ms, nil
}

// unescapeMount decodes the \ooo octal escapes of mountinfo fields.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// isMounted reports whether dir is a mount point, of fstype if not empty.
func isMounted(dir, fstype string) (bool, error) {
	_, ok, err := findMount(dir, fstype)
	return ok, err
}

// findMount returns the last mount on dir, of fstype if not empty.
func findMount(dir, fstype string) (mountEntry, bool, error) {
	ms, err := readMounts()
	if err != nil {
		return mountEntry{}, false, err
	}
	for i := len(ms) - 1; i >= 0; i-- {
		if m := ms[i]; m.Point == dir && (fstype == "" || m.FSType == fstype) {
			return m, true, nil
		}
	}
	return mountEntry{}, false, nil
}

// mountOf returns the mount that holds path: the longest mount point that
// is path or one of its parents.
func mountOf(path string) (mountEntry, error) {
	ms, err := readMounts()
	if err != nil {
		return mountEntry{}, err
	}
	var best mountEntry
	for _, m := range ms {
		rel, err := filepath.Rel(m.Point, path)
		if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
			continue
		}
		if len(m.Point) >= len(best.Point) {
			best = m
		}
	}
	return best, nil
}

// The LTX log's file names: a standalone LTX file, %016x-%016x.ltx, and a
// segment's index, %016x.index, beside its %016x.segment of LTX files
// appended whole.
var (
	ltxName   = regexp.MustCompile(`^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$`)
	indexName = regexp.MustCompile(`^[0-9a-f]{16}\.index$`)
)

// indexRecordSize is the size of one record of a segment's index: one per
// LTX file committed to the segment.
const indexRecordSize = 56

// countLTX counts the LTX files in the log directory dir: standalone files,
// plus the whole records of each segment index (a record being written is
// not counted). A missing directory has none.
func countLTX(dir string) int {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		switch {
		case !e.Type().IsRegular():
		case ltxName.MatchString(e.Name()):
			n++
		case indexName.MatchString(e.Name()):
			if fi, err := e.Info(); err == nil {
				n += int(fi.Size() / indexRecordSize)
			}
		}
	}
	return n
}

// readPos returns the content of the mount's <name>-pos file, or "" if it
// cannot be read.
func readPos(path string) string {
	data, err := os.ReadFile(path)
	if err != nil || len(data) > 200 {
		return ""
	}
	return strings.TrimSpace(string(data))
}

// Package fusectl finds FUSE mounts and ends them from outside the process
// that serves them: it reads /proc/self/mountinfo, aborts connections
// through the fusectl filesystem (/sys/fs/fuse/connections), and detaches
// mounts lazily.
//
// Aborting is the only way to free a process stuck in a request nobody
// will answer (state D, deaf even to SIGKILL): every request in flight on
// the connection fails with ENOTCONN, and so does every later one. It
// never touches the files under a mount, so it cannot hang on a dead one.
package fusectl

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// ConnectionsDir is where the fusectl filesystem shows one directory per
// FUSE connection, named by its number.
const ConnectionsDir = "/sys/fs/fuse/connections"

// Mount is a FUSE mount as /proc/self/mountinfo shows it.
type Mount struct {
	Point  string // mount point, unescaped
	Conn   uint32 // connection number: the minor number of the mount's device
	FSType string // "fuse" or "fuse.NAME"
	Source string
}

// Mounts returns every FUSE mount in this process's mount namespace, in
// mountinfo order (parents before children). fuseblk mounts, whose device
// is a real block device, are not included.
func Mounts() ([]Mount, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("list FUSE mounts: %w", err)
	}
	return parseMountinfo(b)
}

// parseMountinfo returns the FUSE mounts of a mountinfo file's content.
// A line is: ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [OPTIONAL...] - TYPE
// SOURCE SUPEROPTIONS, with spaces and backslashes in paths escaped as
// octal.
func parseMountinfo(b []byte) ([]Mount, error) {
	var mounts []Mount
	for line := range strings.SplitSeq(string(b), "\n") {
		if line == "" {
			continue
		}
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 6 || len(g) < 2 {
			return nil, fmt.Errorf("list FUSE mounts: malformed mountinfo line %q", line)
		}
		if g[0] != "fuse" && !strings.HasPrefix(g[0], "fuse.") {
			continue
		}
		_, minor, ok := strings.Cut(f[2], ":")
		conn, err := strconv.ParseUint(minor, 10, 32)
		if !ok || err != nil {
			return nil, fmt.Errorf("list FUSE mounts: bad device %q in mountinfo line %q", f[2], line)
		}
		mounts = append(mounts, Mount{Point: unescape(f[4]), Conn: uint32(conn), FSType: g[0], Source: unescape(g[1])})
	}
	return mounts, nil
}

// unescape undoes mountinfo's octal escapes (\040 for a space, \134 for a
// backslash, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
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

// Under returns the mounts at dir or below it, deepest first: the order
// to detach them in.
func Under(mounts []Mount, dir string) []Mount {
	dir = filepath.Clean(dir)
	var under []Mount
	for _, m := range mounts {
		if m.Point == dir || strings.HasPrefix(m.Point, dir+"/") || dir == "/" {
			under = append(under, m)
		}
	}
	slices.Reverse(under)
	return under
}

// At returns the FUSE mount whose mount point is dir, the last one mounted
// there if several are stacked.
func At(dir string) (Mount, bool, error) {
	mounts, err := Mounts()
	if err != nil {
		return Mount{}, false, err
	}
	dir = filepath.Clean(dir)
	for _, m := range slices.Backward(mounts) {
		if m.Point == dir {
			return m, true, nil
		}
	}
	return Mount{}, false, nil
}

// Abort aborts FUSE connection conn: every request waiting on it fails,
// and the mount answers ENOTCONN from then on. It mounts the fusectl
// filesystem first if it is not mounted. Aborting a connection that is
// already gone is not an error.
func Abort(conn uint32) error {
	if err := EnsureConnectionsDir(); err != nil {
		return err
	}
	path := filepath.Join(ConnectionsDir, strconv.FormatUint(uint64(conn), 10), "abort")
	if err := os.WriteFile(path, []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("abort FUSE connection %d: %w", conn, err)
	}
	return nil
}

// EnsureConnectionsDir mounts the fusectl filesystem at ConnectionsDir
// unless it is mounted already (it needs root).
func EnsureConnectionsDir() error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("mount fusectl: %w", err)
	}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		if _, post, ok := bytes.Cut(line, []byte(" - ")); ok && bytes.HasPrefix(post, []byte("fusectl ")) {
			return nil
		}
	}
	if err := syscall.Mount("fusectl", ConnectionsDir, "fusectl", 0, ""); err != nil && !errors.Is(err, syscall.EBUSY) {
		return fmt.Errorf("mount fusectl at %s (needed to abort FUSE connections; as root: mount -t fusectl fusectl %s): %w",
			ConnectionsDir, ConnectionsDir, err)
	}
	return nil
}

// Detach lazily unmounts the mount at dir (umount2 with MNT_DETACH): it
// leaves the namespace at once and goes when its last file is closed. It
// falls back to `fusermount3 -u -z` where the system call is refused.
func Detach(dir string) error {
	err := syscall.Unmount(dir, syscall.MNT_DETACH)
	if err == nil || errors.Is(err, syscall.EINVAL) && !isMountPoint(dir) {
		return nil
	}
	out, ferr := exec.Command("fusermount3", "-u", "-z", dir).CombinedOutput()
	if ferr == nil {
		return nil
	}
	return fmt.Errorf("unmount %s: umount2: %v; fusermount3 -u -z: %v: %s", dir, err, ferr, bytes.TrimSpace(out))
}

// isMountPoint reports whether some FUSE mount is at dir.
func isMountPoint(dir string) bool {
	_, ok, err := At(dir)
	return ok || err != nil
}

// Reap aborts the connection of every FUSE mount at dir or below it and
// detaches each mount, deepest first. It returns the mounts it reaped and
// every error it met; it goes on past errors.
func Reap(dir string) ([]Mount, error) {
	mounts, err := Mounts()
	if err != nil {
		return nil, err
	}
	under := Under(mounts, dir)
	var errs []error
	for _, m := range under {
		errs = append(errs, Abort(m.Conn))
	}
	for _, m := range under {
		errs = append(errs, Detach(m.Point))
	}
	return under, errors.Join(errs...)
}

// IsDead reports whether err, from an operation on a file under a FUSE
// mount, says that the mount's connection is gone: its server exited or
// the connection was aborted.
func IsDead(err error) bool {
	return errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECONNABORTED)
}

// String returns the mount as "POINT (FUSE connection N)".
func (m Mount) String() string {
	return fmt.Sprintf("%s (FUSE connection %d)", m.Point, m.Conn)
}

// CloseOnExec marks every /dev/fuse descriptor of this process
// close-on-exec. go-fuse opens /dev/fuse without O_CLOEXEC when it mounts
// by itself (as root), so every child process would inherit the FUSE
// connection: a child with files open on the mount then keeps the
// connection alive after the server dies, and its exit hangs for good in
// the FLUSH it sends to a connection nobody serves. Call it after each
// mount, before starting a child process.
func CloseOnExec() error {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("list this process's file descriptors: %w", err)
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && target == "/dev/fuse" {
			syscall.CloseOnExec(fd)
		}
	}
	return nil
}

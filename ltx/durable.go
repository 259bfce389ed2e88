package ltx

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/internal/durable"
)

// failpoint is called at each step of writing and removing log files, by
// name. It does nothing; crash tests replace it to kill the process at
// exactly that step.
var failpoint = func(name string) {}

// tempFile is a file written, sealed and closed under a temporary name,
// to be renamed to its own.
type tempFile struct {
	dir, name string // where it goes
	tmp       string // where it is
	size      int64
	seal      Checksum
}

// writeTemp writes a file to be named dir/name under a temporary name in
// dir, for its rename to give it its name: write writes the content, which
// is sealed (see seal.go) and fsynced if sync. A file from spares, if there
// is one, is written over instead of creating one. On an error the
// temporary file is removed.
func writeTemp(dir, name string, sync bool, spares *Spares, write func(w io.Writer) error) (t *tempFile, err error) {
	f, err := openSpare(spares)
	if f == nil && err == nil {
		f, err = createTemp(dir, name)
	}
	if err != nil {
		return nil, err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()

	written, seal, err := writeSealed(f, write)
	if err != nil {
		return nil, diskError("write", tmp, err)
	}
	failpoint("write")
	if err := writeSeal(f, seal); err != nil {
		return nil, diskError("seal", tmp, err)
	}
	failpoint("seal")
	if sync {
		if err := f.Sync(); err != nil {
			return nil, diskError("sync", tmp, err)
		}
		failpoint("sync")
	}
	if err := f.Close(); err != nil {
		return nil, diskError("close", tmp, err)
	}
	return &tempFile{dir: dir, name: name, tmp: tmp, size: written, seal: seal}, nil
}

// writeSealed writes what write writes to dst through a pooled buffer,
// and returns how many bytes that was and their seal (see seal.go).
func writeSealed(dst io.Writer, write func(w io.Writer) error) (int64, Checksum, error) {
	bw := writerPool.Get().(*bufio.Writer)
	bw.Reset(dst)
	defer func() {
		bw.Reset(nil)
		writerPool.Put(bw)
	}()
	h := newSealHash()
	cw := &countingWriter{w: io.MultiWriter(bw, h)}
	if err := write(cw); err != nil {
		return 0, 0, err
	}
	if err := bw.Flush(); err != nil {
		return 0, 0, err
	}
	return cw.n, sealValue(h), nil
}

// rename gives t its name, then fsyncs the directory if syncDir.
func (t *tempFile) rename(syncDir bool) error {
	// Not os.Rename, which stats the new name first to refuse a directory:
	// a system call per transaction, and log names are never directories.
	if err := unix.Renameat(unix.AT_FDCWD, t.tmp, unix.AT_FDCWD, filepath.Join(t.dir, t.name)); err != nil {
		return &os.LinkError{Op: "rename", Old: t.tmp, New: filepath.Join(t.dir, t.name), Err: err}
	}
	failpoint("rename")
	if syncDir {
		if err := syncDirectory(t.dir); err != nil {
			return err
		}
		failpoint("syncdir")
	}
	return nil
}

// remove deletes a file that will not be renamed.
func (t *tempFile) remove() { _ = os.Remove(t.tmp) }

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// openSpare opens a file from spares for writing over, or returns nil if
// there is none.
func openSpare(spares *Spares) (*os.File, error) {
	for {
		path := spares.Take()
		if path == "" {
			return nil, nil
		}
		// Emptied when put in the pool; O_TRUNC in case it was not (a
		// crash in between), so the file ends where its bytes do.
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
		if errors.Is(err, os.ErrNotExist) {
			continue // removed by hand
		}
		return f, err
	}
}

// writerPool holds write buffers for writeTemp: one per file written would
// be 64 KiB of garbage per transaction.
var writerPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 64<<10) }}

// syncFS flushes every dirty file of the filesystem that holds dir.
func syncFS(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return diskError("syncfs", dir, err)
	}
	return nil
}

// syncFile fsyncs the file at path.
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if err := f.Sync(); err != nil {
		return diskError("sync", path, err)
	}
	return nil
}

// createTemp creates a temporary file in dir for a file to be named name.
// Temporary files end in ".tmp"; Open removes any it finds.
func createTemp(dir, name string) (*os.File, error) {
	return os.CreateTemp(dir, "."+name+".*"+tmpExt)
}

// syncDirectory fsyncs a directory so entries created, renamed or removed in it
// survive a crash.
func syncDirectory(dir string) error {
	if err := durable.SyncDir(dir); err != nil {
		return diskError("sync directory", dir, err)
	}
	return nil
}

// diskError wraps an error writing to disk, saying what to do when the disk
// is full.
func diskError(op, path string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%s %s: %w (the volume is full: free space on it; nothing was added to the log)", op, path, err)
	}
	return fmt.Errorf("%s %s: %w", op, path, err)
}

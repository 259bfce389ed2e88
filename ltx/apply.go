package ltx

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

// Apply adds the LTX file at path, received whole from another node's log,
// to this log as its next file, and applies it to the log's database file
// (DBPath). The file goes into the log first (copied, sealed, fsynced,
// renamed, directory fsynced), then its pages into the database file,
// which is fsynced: a crash in between leaves the log one file ahead of
// the database, and Open finishes applying it.
//
// The file must apply at the log's position, or be a snapshot. A snapshot
// replaces every file in the log: they are moved to lostDir if it is not
// "" (the history a diverged replica is about to lose), else removed.
//
// It returns the file as the log holds it and the pages it wrote,
// ascending. If the file does not apply, nothing changes. If writing the
// database fails, the file stays in the log directory and the database may
// be partly written; the log's position does not move, and applying the
// same file again repairs it.
func (l *Log) Apply(ctx context.Context, path, lostDir string) (*FileInfo, []uint32, error) {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	pos, table, err := l.commitState()
	if err != nil {
		return nil, nil, err
	}
	info, err := ReadFileInfo(path)
	if err != nil {
		return nil, nil, fmt.Errorf("apply %s to %s: %w", path, l.Name, err)
	}
	hdr := info.Header
	if !hdr.IsSnapshot() && info.PreApplyPos() != pos {
		return nil, nil, fmt.Errorf("apply txid %s-%s to %s: it applies at %s, the log is at %s", hdr.MinTXID, hdr.MaxTXID, l.Name, info.PreApplyPos(), pos)
	}
	info.Name = FormatName(hdr.MinTXID, hdr.MaxTXID)
	// Copied, verified as it is read, before anything in the log changes.
	t, err := l.copyIn(ctx, path, info)
	if err != nil {
		return nil, nil, err
	}
	if hdr.IsSnapshot() {
		if err := l.setAside(lostDir); err != nil {
			t.remove()
			return nil, nil, err
		}
	}
	// The marker names the file whose pages go into the database next, for
	// Open to finish the job after a crash; the rename's directory fsync
	// makes it durable with the file.
	if err := writeApplying(l.path(applyingName), info.Name); err != nil {
		t.remove()
		return nil, nil, fmt.Errorf("apply %s to %s: %w", info.Name, l.Name, err)
	}
	if err := t.rename(true); err != nil {
		t.remove()
		_ = os.Remove(l.path(applyingName))
		return nil, nil, fmt.Errorf("apply %s to %s: %w", info.Name, l.Name, err)
	}
	if hdr.IsSnapshot() {
		table = NewChecksumTable(hdr.PageSize)
		pos = Pos{}
	} else {
		table = table.Clone()
	}
	pgnos, err := l.applyToDatabase(ctx, info, table, pos)
	if err != nil {
		return nil, nil, err
	}
	// Its removal need not be durable: a marker naming a file the database
	// already matches is ignored.
	_ = os.Remove(l.path(applyingName))
	l.mu.Lock()
	defer l.mu.Unlock()
	if hdr.IsSnapshot() {
		l.files = l.files[:0]
	}
	l.table = table
	l.files = append(l.files, &logFile{info: *info})
	l.notify()
	out := *info
	return &out, pgnos, nil
}

// setAside takes every file out of the log directory ahead of a snapshot:
// into lostDir/<time>/ if lostDir is set, else removed. Caller holds l.wmu.
func (l *Log) setAside(lostDir string) error {
	l.mu.RLock()
	files := append([]*logFile(nil), l.files...)
	l.mu.RUnlock()
	if len(files) == 0 {
		return nil
	}
	var dst string
	if lostDir != "" {
		dst = filepath.Join(lostDir, time.Now().UTC().Format("20060102T150405.000000000Z"))
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return fmt.Errorf("keep the lost transactions of %s: %w", l.Name, err)
		}
	}
	for _, f := range files {
		var err error
		if dst != "" {
			err = os.Rename(l.path(f.info.Name), filepath.Join(dst, f.info.Name))
		} else {
			err = l.removeFile(f)
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("replace the log of %s with a snapshot: %w", l.Name, err)
		}
		_ = os.Remove(l.path(posName(f.info.Name)))
	}
	if dst != "" {
		if err := syncDirectory(dst); err != nil {
			return err
		}
		l.Logger.Warn("kept the transactions a snapshot replaces", "db", l.Name, "dir", dst, "files", len(files),
			"from", files[0].info.PreApplyPos(), "to", files[len(files)-1].info.Pos())
	}
	return syncDirectory(l.Dir)
}

// copyIn copies the file at path into the log directory under a
// temporary name, sealed and fsynced, verifying it as it reads it, and
// records its seal in info. Caller holds l.wmu and renames or removes it.
func (l *Log) copyIn(ctx context.Context, path string, info *FileInfo) (*tempFile, error) {
	src, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = src.Close() }()
	t, err := writeTemp(l.Dir, info.Name, true, l.Spares, func(w io.Writer) error {
		_, err := io.Copy(w, &ctxReader{ctx: ctx, r: NewVerifyReader(src, 0)})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("apply %s to %s: %w", info.Name, l.Name, err)
	}
	if t.size != info.Size {
		t.remove()
		return nil, fmt.Errorf("apply %s to %s: copied %d bytes of %d", info.Name, l.Name, t.size, info.Size)
	}
	info.Seal = t.seal
	return t, nil
}

// applyToDatabase writes the log's file info into the database file at
// pos, table holding its page checksums, and fsyncs it.
func (l *Log) applyToDatabase(ctx context.Context, info *FileInfo, table *ChecksumTable, pos Pos) ([]uint32, error) {
	src, err := os.Open(l.path(info.Name))
	if err != nil {
		return nil, err
	}
	defer func() { _ = src.Close() }()
	db, err := os.OpenFile(l.DBPath, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("apply %s to %s: %w", info.Name, l.Name, err)
	}
	defer func() { _ = db.Close() }()
	_, pgnos, err := applyFile(ctx, db, table, pos, NewVerifyReader(src, info.Seal))
	if err == nil {
		err = db.Sync()
	}
	if err != nil {
		return nil, diskError(fmt.Sprintf("apply %s to", info.Name), l.DBPath, err)
	}
	return pgnos, nil
}

// ctxReader stops a copy when ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r *ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// applyingName is the marker Apply leaves in the log directory while it
// writes a file's pages into the database.
const applyingName = ".applying"

// writeApplying writes the marker naming the file being applied, fsynced.
func writeApplying(path, name string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, err = f.WriteString(name)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

// rollForward finishes applying the log's last file to a database that a
// crash left in the middle of Apply: the marker names that file, and t
// holds the page checksums of the database as it is. It writes nothing
// unless the file, applied over t, gives exactly its post-apply checksum,
// and reports whether it applied it. Caller holds l.wmu and l.mu.
func (l *Log) rollForward(ctx context.Context, t *ChecksumTable, last FileInfo) (bool, error) {
	marker, err := os.ReadFile(l.path(applyingName))
	if errors.Is(err, os.ErrNotExist) || (err == nil && string(marker) != last.Name) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	dry := t.Clone()
	pos := last.PreApplyPos()
	f, err := os.Open(l.path(last.Name))
	if err != nil {
		return false, err
	}
	_, _, err = applyFile(ctx, nil, dry, pos, NewVerifyReader(f, last.Seal))
	_ = f.Close()
	if err != nil || dry.Checksum() != last.PostApplyChecksum || dry.Pages() != last.Header.Commit {
		return false, nil
	}
	if _, err := l.applyToDatabase(ctx, &last, t, pos); err != nil {
		return false, err
	}
	_ = os.Remove(l.path(applyingName))
	l.Logger.Warn("finished applying the log's last file to the database, which a crash interrupted", "db", l.Name, "file", last.Name, "pos", last.Pos())
	return true, nil
}

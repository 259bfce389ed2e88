package ltx

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/superfly/ltx"
)

// Prune removes files no reader needs any more, oldest first. A file goes
// when every replica has acknowledged it (its last TXID is at most acked,
// the lowest TXID every live replica has acknowledged) and it is older than
// Retention, or when it is older than MaxRetention whatever was
// acknowledged. The newest file always stays: it holds the log's position.
// It holds l.maint throughout: a snapshot applied meanwhile replaces the
// log's files before or after it, never while it removes files by name.
// It returns the number of files removed.
func (l *Log) Prune(ctx context.Context, acked TXID, now time.Time) (int, error) {
	l.maint.Lock()
	defer l.maint.Unlock()
	if err := ctx.Err(); err != nil {
		return 0, err
	}

	l.mu.Lock()
	if err := l.checkOpen(); err != nil {
		l.mu.Unlock()
		return 0, err
	}
	n := 0
	for ; n < len(l.files)-1; n++ {
		info := &l.files[n].info
		age := now.Sub(info.Time())
		if age <= l.MaxRetention && (info.Header.MaxTXID > acked || age <= l.Retention) {
			break
		}
	}
	removed := l.files[:n]
	l.files = slices.Clone(l.files[n:])
	l.mu.Unlock()

	// Out of the list first, so no cursor opens them; then off the disk,
	// oldest first, so a crash leaves a log with no gap.
	for _, f := range removed {
		if err := l.removeFile(f); err != nil {
			return 0, fmt.Errorf("prune %s: %w", f.info.Name, err)
		}
		failpoint("prune")
	}
	if n > 0 {
		if err := syncDirectory(l.Dir); err != nil {
			return 0, err
		}
		l.Logger.Debug("pruned log", "db", l.Name, "files", n, "first", removed[0].info.Name, "last", removed[n-1].info.Name)
	}
	return n, nil
}

// Compact merges runs of consecutive files committed before `before` into
// larger files with the codec's compactor, each from at most CompactionSize
// bytes of input. The newest file is never compacted.
//
// Compaction changes no position a reader can ask for: a compacted file is
// written with a position sidecar recording the checksum after each of its
// transactions, and a cursor positioned inside it is served the file
// re-encoded to apply there. Compaction does not hold up commits.
//
// Files may leave the log while a run is compacted: a snapshot applied to a
// replica replaces them all (ApplyFiles), Prune removes the oldest. A
// compacted file is written under a temporary name and checked, when it
// is to go into the log, against the log's files: if its run is no longer
// there, it is removed and Compact returns, merging no more.
// It returns the number of files merged away.
func (l *Log) Compact(ctx context.Context, before time.Time) (int, error) {
	l.mu.RLock()
	err := l.checkOpen()
	files := slices.Clone(l.files)
	l.mu.RUnlock()
	if err != nil || len(files) < 3 {
		return 0, err
	}

	merged := 0
	for _, g := range compactionGroups(files[:len(files)-1], before, l.CompactionSize) {
		if err := ctx.Err(); err != nil {
			return merged, err
		}
		ok, err := l.compactRun(ctx, g)
		if err != nil {
			return merged, fmt.Errorf("compact %s to %s: %w", g[0].info.Name, g[len(g)-1].info.Name, err)
		} else if !ok {
			// The groups after it were drawn from the same old list.
			return merged, nil
		}
		merged += len(g) - 1
	}
	return merged, nil
}

// compactRun compacts g, a run of the log's files, into one file and puts
// it in their place. It reports false, having changed nothing, if g is no
// longer a run of the log when it begins or when its file is written.
//
// It holds l.maint, which a snapshot's apply holds while it replaces the
// log's files, only to open g's files and to put the compacted file in
// their place, never while it compacts: a replica's apply waits for one
// install at most, not for a compaction, let alone for every group of a
// Compact. Opened under l.maint, g's files are read whole even if a
// snapshot removes them next: a file open for reading is deleted, never
// recycled as a spare.
func (l *Log) compactRun(ctx context.Context, g []*logFile) (bool, error) {
	l.maint.Lock()
	fhs, err := l.openRun(g)
	l.maint.Unlock()
	if err != nil || fhs == nil {
		return false, err
	}
	out, temps, err := l.compactGroup(ctx, g, fhs)
	for _, fh := range fhs {
		_ = fh.Close()
	}
	if err != nil {
		return false, err
	}
	failpoint("compact-written")

	l.maint.Lock()
	defer l.maint.Unlock()
	return l.installCompacted(g, out, temps)
}

// runIndex returns the index in l.files of g's first file if l.files holds
// g as a run, else -1. Caller holds l.mu.
func (l *Log) runIndex(g []*logFile) int {
	i := slices.Index(l.files, g[0])
	if i < 0 || len(l.files)-i < len(g) || !slices.Equal(l.files[i:i+len(g)], g) {
		return -1
	}
	return i
}

// openRun opens g's files for reading, or returns nil if g is no longer a
// run of the log. Caller holds l.maint, which every removal of a file from
// the log holds: none is removed between the check and the opens.
func (l *Log) openRun(g []*logFile) ([]*openFile, error) {
	l.mu.RLock()
	i := l.runIndex(g)
	l.mu.RUnlock()
	if i < 0 {
		l.Logger.Debug("not compacting: the files left the log", "db", l.Name, "first", g[0].info.Name, "last", g[len(g)-1].info.Name)
		return nil, nil
	}
	fhs := make([]*openFile, 0, len(g))
	for _, f := range g {
		fh, err := l.open(f)
		if err != nil {
			for _, fh := range fhs {
				_ = fh.Close()
			}
			return nil, err
		}
		fhs = append(fhs, fh)
	}
	return fhs, nil
}

// installCompacted puts out, g's compacted file, in g's place in the log:
// it renames temps (out's position sidecar, then out itself) into the log
// directory, replaces g by out in the list and removes g's files. If g is
// no longer a run of the log, it removes temps instead, so the file is
// never in the log directory under its name, and reports false. Caller
// holds l.maint.
func (l *Log) installCompacted(g []*logFile, out *logFile, temps []*tempFile) (bool, error) {
	l.mu.RLock()
	i := l.runIndex(g)
	l.mu.RUnlock()
	if i < 0 {
		removeTemps(temps)
		l.Logger.Debug("discarded a compacted file: its files left the log while it was written", "db", l.Name, "file", out.info.Name)
		return false, nil
	}
	// The sidecar first: Open removes a sidecar without a file, and
	// removes the inputs of a compacted file that is present.
	for j, t := range temps {
		if err := t.rename(true); err != nil {
			// Renamed or not (the directory's fsync may have failed), the
			// compacted file and its sidecar go: their names are theirs
			// alone while l.maint is held.
			for _, t := range temps[:j+1] {
				_ = os.Remove(filepath.Join(t.dir, t.name))
			}
			removeTemps(temps)
			return false, err
		}
	}
	// Under l.maint only Commit and Apply change the list, by appending:
	// g is still at i.
	l.mu.Lock()
	l.files = slices.Replace(l.files, i, i+len(g), out)
	l.mu.Unlock()
	failpoint("compact")
	for _, f := range g {
		if err := l.removeFile(f); err != nil {
			return true, err
		}
		failpoint("compact-remove")
	}
	if err := syncDirectory(l.Dir); err != nil {
		return true, err
	}
	l.Logger.Debug("compacted log files", "db", l.Name, "files", len(g), "into", out.info.Name, "bytes", out.info.Size)
	return true, nil
}

// compactionGroups splits the leading files committed before `before` into
// runs of at least two files, each of at most maxSize input bytes and one
// page size.
func compactionGroups(files []*logFile, before time.Time, maxSize int64) [][]*logFile {
	var (
		groups [][]*logFile
		g      []*logFile
		size   int64
	)
	flush := func() {
		if len(g) > 1 {
			groups = append(groups, g)
		}
		g, size = nil, 0
	}
	for _, f := range files {
		if !f.info.Time().Before(before) {
			break
		}
		if len(g) > 0 && (size+f.info.Size > maxSize || f.info.Header.PageSize != g[0].info.Header.PageSize) {
			flush()
		}
		g = append(g, f)
		size += f.info.Size
	}
	flush()
	return groups
}

// compactGroup writes the compacted file of g, whose files fhs are open,
// and its position sidecar under temporary names, fsynced, for
// installCompacted to rename: the sidecar, then the file. On an error it
// removes what it wrote.
func (l *Log) compactGroup(ctx context.Context, g []*logFile, fhs []*openFile) (*logFile, []*tempFile, error) {
	first, last := &g[0].info, &g[len(g)-1].info
	name := FormatName(first.Header.MinTXID, last.Header.MaxTXID)

	sums := make([]Checksum, 0, last.Header.MaxTXID-first.Header.MinTXID+1)
	for _, f := range g {
		if f.positions != nil {
			sums = append(sums, f.positions...)
			continue
		}
		for txid := f.info.Header.MinTXID; txid < f.info.Header.MaxTXID; txid++ {
			sums = append(sums, 0) // inside a snapshot: unknown
		}
		sums = append(sums, f.info.PostApplyChecksum)
	}
	sidecar, err := writeTemp(l.Dir, posName(name), true, nil, func(w io.Writer) error {
		_, err := w.Write(encodePositions(first.Header.MinTXID, sums))
		return err
	})
	if err != nil {
		return nil, nil, err
	}

	rdrs := make([]io.Reader, len(fhs))
	for i, fh := range fhs {
		rdrs[i] = bufio.NewReaderSize(fh, readBufferSize)
	}
	var c *ltx.Compactor
	t, err := writeTemp(l.Dir, name, true, nil, func(w io.Writer) (err error) {
		if c, err = ltx.NewCompactor(w, rdrs); err != nil {
			return err
		}
		return c.Compact(ctx)
	})
	if err != nil {
		sidecar.remove()
		return nil, nil, err
	}
	tr := c.Trailer()
	return &logFile{
		info:      FileInfo{Name: name, Header: c.Header(), PostApplyChecksum: tr.PostApplyChecksum, FileChecksum: tr.FileChecksum, Size: t.size, Seal: t.seal},
		positions: sums,
	}, []*tempFile{sidecar, t}, nil
}

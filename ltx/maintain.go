package ltx

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/superfly/ltx"
)

// Prune removes files no reader needs any more, oldest first. A file goes
// when every replica has acknowledged it (its last TXID is at most acked,
// the lowest TXID every live replica has acknowledged) and it is older than
// Retention, or when it is older than MaxRetention whatever was
// acknowledged. The newest file always stays: it holds the log's position.
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
// It returns the number of files merged away.
func (l *Log) Compact(ctx context.Context, before time.Time) (int, error) {
	l.maint.Lock()
	defer l.maint.Unlock()

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
		out, err := l.compactGroup(ctx, g)
		if err != nil {
			return merged, fmt.Errorf("compact %s to %s: %w", g[0].info.Name, g[len(g)-1].info.Name, err)
		}
		// Only Commit changes the list meanwhile, and it only appends.
		l.mu.Lock()
		i := slices.Index(l.files, g[0])
		l.files = slices.Replace(l.files, i, i+len(g), out)
		l.mu.Unlock()
		failpoint("compact")
		for _, f := range g {
			if err := l.removeFile(f); err != nil {
				return merged, err
			}
			failpoint("compact-remove")
		}
		if err := syncDirectory(l.Dir); err != nil {
			return merged, err
		}
		merged += len(g) - 1
		l.Logger.Debug("compacted log files", "db", l.Name, "files", len(g), "into", out.info.Name, "bytes", out.info.Size)
	}
	return merged, nil
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

// compactGroup writes the compacted file of g and its position sidecar. The
// sidecar goes first: Open removes a sidecar without a file, and removes
// the inputs of a compacted file that is present.
func (l *Log) compactGroup(ctx context.Context, g []*logFile) (*logFile, error) {
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
	if _, _, err := writeFile(l.Dir, posName(name), func(w io.Writer) error {
		_, err := w.Write(encodePositions(first.Header.MinTXID, sums))
		return err
	}); err != nil {
		return nil, err
	}

	rdrs := make([]io.Reader, len(g))
	for i, f := range g {
		fh, err := l.open(f)
		if err != nil {
			_ = os.Remove(l.path(posName(name)))
			return nil, err
		}
		defer func() { _ = fh.Close() }()
		rdrs[i] = bufio.NewReaderSize(fh, readBufferSize)
	}
	var c *ltx.Compactor
	size, seal, err := writeFile(l.Dir, name, func(w io.Writer) (err error) {
		if c, err = ltx.NewCompactor(w, rdrs); err != nil {
			return err
		}
		return c.Compact(ctx)
	})
	if err != nil {
		_ = os.Remove(l.path(posName(name)))
		return nil, err
	}
	t := c.Trailer()
	return &logFile{
		info:      FileInfo{Name: name, Header: c.Header(), PostApplyChecksum: t.PostApplyChecksum, FileChecksum: t.FileChecksum, Size: size, Seal: seal},
		positions: sums,
	}, nil
}

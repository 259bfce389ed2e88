// Command ltxbench measures the LTX log's whole-database operations against
// the plain operation on the same bytes, in one run:
//
//   - database checksum from scratch (ltx.ReadChecksumTable) vs plain
//     CRC-64/ISO over the file;
//   - snapshot build (ltx.EncodeSnapshot) vs copying the file;
//   - restore from the snapshot (ltx.Restore, which fsyncs) vs copying the
//     file and fsyncing it.
//
// It builds a SQLite database of the requested size with real SQLite, warms
// the page cache, then runs each pair alternately and prints the median of
// each and the ratio of throughputs (ours / baseline; 1.0 is as fast).
package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"flag"
	"fmt"
	"hash/crc64"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	_ "github.com/mattn/go-sqlite3"

	"github.com/meridian-db/meridian/ltx"
)

func main() {
	size := flag.Int("size", 256, "database size in MiB")
	runs := flag.Int("runs", 7, "runs of each operation")
	dir := flag.String("dir", "", "working directory (default: a new temporary directory)")
	flag.Parse()
	if err := run(*size, *runs, *dir); err != nil {
		fmt.Fprintln(os.Stderr, "ltxbench:", err)
		os.Exit(1)
	}
}

func run(sizeMiB, runs int, dir string) error {
	ctx := context.Background()
	if dir == "" {
		d, err := os.MkdirTemp("", "ltxbench-")
		if err != nil {
			return err
		}
		defer func() { _ = os.RemoveAll(d) }()
		dir = d
	}
	dbPath := filepath.Join(dir, "bench.db")
	if err := buildDatabase(dbPath, sizeMiB); err != nil {
		return err
	}
	fi, err := os.Stat(dbPath)
	if err != nil {
		return err
	}
	mb := float64(fi.Size()) / 1e6
	table, err := ltx.ReadChecksumTable(dbPath)
	if err != nil {
		return err
	}
	fmt.Printf("database: %.1f MB, %d pages of %d bytes, made by SQLite; %d CPUs (GOMAXPROCS); warm page cache; %d runs each, medians\n\n",
		mb, table.Pages(), table.PageSize(), runtime.GOMAXPROCS(0), runs)

	snapPath := filepath.Join(dir, "snapshot.ltx")
	copyPath := filepath.Join(dir, "copy.db")
	restorePath := filepath.Join(dir, "restored.db")
	pairs := []struct {
		name, ours, base string
		runOurs, runBase func() error
	}{
		{
			name: "checksum", ours: "ltx.ReadChecksumTable", base: "plain CRC-64 of the file",
			runOurs: func() error {
				t, err := ltx.ReadChecksumTable(dbPath)
				if err == nil && t.Checksum() != table.Checksum() {
					err = fmt.Errorf("checksum changed: %s", t.Checksum())
				}
				return err
			},
			runBase: func() error { _, err := plainCRC(dbPath); return err },
		},
		{
			name: "snapshot", ours: "ltx.EncodeSnapshot to a file", base: "copy the file",
			runOurs: func() error { return snapshot(ctx, dbPath, snapPath, table) },
			runBase: func() error { return copyFile(dbPath, copyPath, false) },
		},
		{
			name: "restore", ours: "ltx.Restore from the snapshot", base: "copy the file and fsync",
			runOurs: func() error { return restore(ctx, snapPath, restorePath) },
			runBase: func() error { return copyFile(dbPath, copyPath, true) },
		},
	}

	// Warm up: every operation once, which also leaves the snapshot for
	// the restore runs.
	for _, p := range pairs {
		if err := p.runOurs(); err != nil {
			return fmt.Errorf("%s: %w", p.ours, err)
		}
		if err := p.runBase(); err != nil {
			return fmt.Errorf("%s: %w", p.base, err)
		}
	}
	if !sameContent(restorePath, dbPath) {
		return fmt.Errorf("restored database differs from the original")
	}

	fmt.Printf("%-9s %-32s %10s %10s   %-26s %10s %10s   %s\n", "", "ours", "median", "MB/s", "baseline", "median", "MB/s", "ratio")
	for _, p := range pairs {
		var ours, base []time.Duration
		for i := 0; i < runs; i++ {
			d, err := timed(p.runOurs)
			if err != nil {
				return err
			}
			ours = append(ours, d)
			if d, err = timed(p.runBase); err != nil {
				return err
			}
			base = append(base, d)
		}
		o, b := median(ours), median(base)
		fmt.Printf("%-9s %-32s %10s %10.0f   %-26s %10s %10.0f   %.2f\n",
			p.name, p.ours, o.Round(time.Microsecond), mb/o.Seconds(), p.base, b.Round(time.Microsecond), mb/b.Seconds(), b.Seconds()/o.Seconds())
	}
	return nil
}

// buildDatabase makes a SQLite database of about sizeMiB: rows of text and
// partly random blobs, one row per 4 KiB page, with an index.
func buildDatabase(path string, sizeMiB int) error {
	db, err := sql.Open("sqlite3", "file:"+path+"?_journal_mode=DELETE&_synchronous=OFF")
	if err != nil {
		return err
	}
	defer func() { _ = db.Close() }()
	if _, err := db.Exec(`CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, body BLOB); CREATE INDEX items_name ON items (name)`); err != nil {
		return err
	}
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	rows := sizeMiB << 20 / 4096
	for i := 0; i < rows; i++ {
		if _, err := tx.Exec(`INSERT INTO items (name, body) VALUES (?, randomblob(2000) || zeroblob(800))`, fmt.Sprintf("item-%08d", i*7919%rows)); err != nil {
			_ = tx.Rollback()
			return err
		}
	}
	return tx.Commit()
}

func plainCRC(path string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }()
	h := crc64.New(crc64.MakeTable(crc64.ISO))
	_, err = io.CopyBuffer(h, f, make([]byte, 1<<20))
	return h.Sum64(), err
}

func snapshot(ctx context.Context, dbPath, out string, t *ltx.ChecksumTable) error {
	db, err := os.Open(dbPath)
	if err != nil {
		return err
	}
	defer func() { _ = db.Close() }()
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	w := bufio.NewWriterSize(f, 1<<20)
	info, err := ltx.EncodeSnapshot(ctx, w, db, t.PageSize(), t.Pages(), 1, time.Now())
	if err != nil {
		return err
	}
	if info.PostApplyChecksum != t.Checksum() {
		return fmt.Errorf("snapshot checksum %s, database %s", info.PostApplyChecksum, t.Checksum())
	}
	if err := w.Flush(); err != nil {
		return err
	}
	return f.Close()
}

func restore(ctx context.Context, snapPath, out string) error {
	f, err := os.Open(snapPath)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	_, err = ltx.Restore(ctx, out, f)
	return err
}

func copyFile(src, dst string, sync bool) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer func() { _ = out.Close() }()
	if _, err := io.CopyBuffer(onlyWriter{out}, onlyReader{in}, make([]byte, 1<<20)); err != nil {
		return err
	}
	if sync {
		if err := out.Sync(); err != nil {
			return err
		}
	}
	return out.Close()
}

// onlyReader and onlyWriter hide *os.File's ReadFrom/WriteTo so the copy
// moves the bytes through memory, as the LTX operations do, instead of
// letting the kernel share or splice them.
type onlyReader struct{ io.Reader }
type onlyWriter struct{ io.Writer }

func timed(fn func() error) (time.Duration, error) {
	start := time.Now()
	err := fn()
	return time.Since(start), err
}

func median(ds []time.Duration) time.Duration {
	ds = slices.Clone(ds)
	slices.Sort(ds)
	return ds[len(ds)/2]
}

func sameContent(a, b string) bool {
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	return err1 == nil && err2 == nil && bytes.Equal(x, y)
}

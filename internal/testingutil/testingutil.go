// Package testingutil holds helpers shared by the tests of several packages:
// opening real SQLite databases and LTX logs, a random SQL workload, and
// comparisons of database files.
package testingutil

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	_ "github.com/mattn/go-sqlite3" // registers the "sqlite3" driver

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/ltx"
)

// MustOpenSQLite opens the SQLite database at path with mattn/go-sqlite3 in
// the given journal mode ("delete", "truncate", "persist" or "wal") with
// synchronous=FULL, on a single connection, closed at cleanup.
func MustOpenSQLite(tb testing.TB, path, journalMode string) *sql.DB {
	tb.Helper()
	db, err := sql.Open("sqlite3", fmt.Sprintf("file:%s?_journal_mode=%s&_synchronous=FULL&_busy_timeout=5000", path, journalMode))
	if err != nil {
		tb.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	tb.Cleanup(func() { _ = db.Close() })
	var mode string
	if err := db.QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil {
		tb.Fatal(err)
	} else if mode != journalMode {
		tb.Fatalf("journal_mode = %q, want %q", mode, journalMode)
	}
	return db
}

// MustOpenLog opens the LTX log of database name in dir, for the database
// file at dbPath ("" for none), logging to tb, closed at cleanup.
func MustOpenLog(tb testing.TB, name, dir, dbPath string) *ltx.Log {
	tb.Helper()
	l := NewLog(tb, name, dir, dbPath)
	if err := l.Open(context.Background()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = l.Close() })
	return l
}

// NewLog returns an unopened log that logs to tb and writes a file of its
// own per transaction (SegmentSize 0), for tests that reach into a log
// directory by file name; NewSegmentLog returns one that writes segments,
// as a log does by default.
func NewLog(tb testing.TB, name, dir, dbPath string) *ltx.Log {
	l := NewSegmentLog(tb, name, dir, dbPath)
	l.SegmentSize = 0
	return l
}

// NewSegmentLog returns an unopened log that logs to tb, with the default
// segments.
func NewSegmentLog(tb testing.TB, name, dir, dbPath string) *ltx.Log {
	l := ltx.NewLog(name, dir, dbPath)
	l.Logger = Logger(tb)
	return l
}

// Logger returns a logger writing to tb's log.
func Logger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tbWriter{tb}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// LogWriter returns a writer to tb's log, a line per write.
func LogWriter(tb testing.TB) io.Writer { return tbWriter{tb} }

type tbWriter struct{ tb testing.TB }

func (w tbWriter) Write(p []byte) (int, error) {
	w.tb.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// ChangedPages returns the numbers of the pages of size pageSize that differ
// between two images of a database file, including every page of after past
// the end of before. It stands in for capture in tests of the log.
func ChangedPages(before, after []byte, pageSize int) []uint32 {
	var pgnos []uint32
	for off := 0; off < len(after); off += pageSize {
		end := min(off+pageSize, len(after))
		if off+pageSize > len(before) || !bytes.Equal(before[off:end], after[off:end]) {
			pgnos = append(pgnos, uint32(off/pageSize)+1)
		}
	}
	return pgnos
}

// CommitChanged commits to l, as one transaction, the pages that differ
// between before and after, the database file's bytes around it, as a
// capture layer would; a transaction that changed nothing is skipped (nil
// info).
func CommitChanged(l *ltx.Log, before, after []byte) (*ltx.FileInfo, error) {
	pageSize, err := ltx.ReadPageSize(bytes.NewReader(after))
	if err != nil {
		return nil, err
	}
	return l.Commit(context.Background(), ltx.Tx{DB: bytes.NewReader(after), PageSize: pageSize,
		Commit: uint32(len(after) / int(pageSize)), Pgnos: ChangedPages(before, after, int(pageSize)), SkipUnchanged: true})
}

// FileSHA256 returns the hex SHA-256 of the file at path.
func FileSHA256(tb TB, path string) string {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// DatabaseSHA256 returns the SHA-256 of the database whose backing file is
// path (data_dir/dbs/<name>/database), as SQLite reads it: with the
// committed frames of the backing WAL next to it, which a replica appends
// its transactions to, copied in by SQLite itself, in a copy.
func DatabaseSHA256(tb TB, path string) string {
	tb.Helper()
	wal := filepath.Join(filepath.Dir(path), "wal")
	if fi, err := os.Stat(wal); err != nil || fi.Size() == 0 {
		return FileSHA256(tb, path)
	}
	dir, err := os.MkdirTemp("", "meridian-dbsum-")
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	copyPath := filepath.Join(dir, "db")
	if err := os.WriteFile(copyPath, MustReadFile(tb, path), 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(copyPath+"-wal", MustReadFile(tb, wal), 0o644); err != nil {
		tb.Fatal(err)
	}
	db, err := sql.Open("sqlite3", "file:"+copyPath)
	if err != nil {
		tb.Fatal(err)
	}
	var busy, frames, done int
	err = db.QueryRow(`PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &frames, &done)
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil || busy != 0 {
		tb.Fatalf("checkpoint a copy of %s with its WAL: busy %d, %v", path, busy, err)
	}
	return FileSHA256(tb, copyPath)
}

// MustReadFile returns the content of the file at path.
func MustReadFile(tb TB, path string) []byte {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// MustMount mounts a Meridian filesystem over a fresh data directory in a
// temporary directory, unmounted at cleanup. It needs root and /dev/fuse.
func MustMount(tb testing.TB) *fs.FileSystem {
	tb.Helper()
	dir := tb.TempDir()
	f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	f.Logger = Logger(tb)
	MustOpenFS(tb, f)
	return f
}

// MustOpenFS opens (recovers and mounts) f, closing it at cleanup. Unless
// the test chose another MaintainInterval, background maintenance is off
// (an hour): it would compact the log under a test that reads the log's
// directory (a test that runs past a minute did see files vanish under
// ltx.VerifyDir); tests call Maintain themselves.
func MustOpenFS(tb testing.TB, f *fs.FileSystem) {
	tb.Helper()
	if f.MaintainInterval == fs.DefaultMaintainInterval {
		f.MaintainInterval = time.Hour
	}
	if err := f.Open(context.Background()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := f.Close(ctx); err != nil {
			tb.Errorf("close filesystem: %v", err)
		}
	})
}

// LockedBuffer is a bytes.Buffer that goroutines may write and read at
// once: a child process's stderr, a logger's output.
type LockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what was written so far.
func (b *LockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

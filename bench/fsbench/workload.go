package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"
)

// readRows is the size of the read workload's table.
const readRows = 10_000

// mode is a SQLite journal mode and synchronous setting, named like
// "wal-full".
type mode struct {
	Name    string // as given in -modes
	Journal string // PRAGMA journal_mode value, upper case
	Sync    string // PRAGMA synchronous value, upper case
}

var syncLevels = map[string]int{"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}

// parseModes parses a comma-separated list such as "wal-normal,delete-full".
func parseModes(s string) ([]mode, error) {
	var modes []mode
	for name := range strings.SplitSeq(s, ",") {
		name = strings.TrimSpace(name)
		journal, sync, ok := strings.Cut(strings.ToUpper(name), "-")
		switch {
		case !ok:
			return nil, fmt.Errorf("mode %q: want JOURNAL-SYNC, e.g. wal-full", name)
		case !slices.Contains([]string{"WAL", "DELETE", "TRUNCATE", "PERSIST"}, journal):
			return nil, fmt.Errorf("mode %q: journal mode must be wal, delete, truncate or persist", name)
		}
		if _, ok := syncLevels[sync]; !ok {
			return nil, fmt.Errorf("mode %q: synchronous must be off, normal, full or extra", name)
		}
		modes = append(modes, mode{Name: strings.ToLower(name), Journal: journal, Sync: sync})
	}
	return modes, nil
}

// workload is one of the measured SQLite workloads.
type workload struct {
	Name string // "insert-1", "insert-10", "read"
	Rows int    // rows per write transaction; 0 for the read workload
}

func (w workload) isRead() bool { return w.Rows == 0 }

var allWorkloads = []workload{{"insert-1", 1}, {"insert-10", 10}, {"read", 0}}

func parseWorkloads(s string) ([]workload, error) {
	var ws []workload
	for name := range strings.SplitSeq(s, ",") {
		name = strings.TrimSpace(name)
		i := slices.IndexFunc(allWorkloads, func(w workload) bool { return w.Name == name })
		if i < 0 {
			return nil, fmt.Errorf("workload %q: want insert-1, insert-10 or read", name)
		}
		ws = append(ws, allWorkloads[i])
	}
	return ws, nil
}

// sample is the outcome of one measurement.
type sample struct {
	Ops     int           // committed transactions, or queries
	Elapsed time.Duration // wall time of the timed loop
	P50     time.Duration // commit latency (writes) or query latency (reads)
	P99     time.Duration
	Setup   int // write transactions before the timed loop (schema, load)
	// On a regiond mount: the CPU time, user and system, the daemon used
	// from just before the database was opened to just after it was
	// closed (HasCPU false if it could not be read), and the write
	// transactions committed in that time: timed commits, setup, and the
	// switch to WAL; 0 for the read workload, whose few writes are not
	// what the daemon spends its time on.
	DaemonCPU time.Duration
	HasCPU    bool
	Writes    int
}

// Rate is operations per second.
func (s sample) Rate() float64 { return float64(s.Ops) / s.Elapsed.Seconds() }

// cpuPerWrite returns the daemon's CPU time per write transaction, and
// false if there is none to report.
func (s sample) cpuPerWrite() (time.Duration, bool) {
	if !s.HasCPU || s.Writes == 0 {
		return 0, false
	}
	return s.DaemonCPU / time.Duration(s.Writes), true
}

// dbFiles are the database's file and SQLite's companions.
func dbFiles(path string) []string {
	return []string{path, path + "-wal", path + "-shm", path + "-journal"}
}

// removeDB deletes the database and its companion files, if present.
func removeDB(path string) error {
	for _, p := range dbFiles(path) {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove old database: %w", err)
		}
	}
	return nil
}

// openDB opens path with SQLite in mode m on a single connection and checks
// that SQLite took the mode: a mount that refused WAL would otherwise be
// measured in the wrong mode without a word.
func openDB(path string, m mode) (*sql.DB, error) {
	u := url.URL{Path: path}
	dsn := fmt.Sprintf("file:%s?_journal_mode=%s&_synchronous=%s&_busy_timeout=5000",
		u.EscapedPath(), m.Journal, m.Sync)
	db, err := sql.Open("sqlite3", dsn)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	var journal string
	var sync int
	err = db.QueryRow("PRAGMA journal_mode").Scan(&journal)
	if err == nil {
		err = db.QueryRow("PRAGMA synchronous").Scan(&sync)
	}
	switch {
	case err != nil:
		err = fmt.Errorf("open %s: %w", path, err)
	case !strings.EqualFold(journal, m.Journal):
		err = fmt.Errorf("open %s: journal_mode is %s, want %s", path, journal, m.Journal)
	case sync != syncLevels[m.Sync]:
		err = fmt.Errorf("open %s: synchronous is %d, want %d (%s)", path, sync, syncLevels[m.Sync], m.Sync)
	}
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	return db, nil
}

// measure runs workload w for d on a fresh database at path (the caller
// removes the old one) and closes the database before returning. SQL calls
// use no context: database/sql with a cancellable context costs a goroutine
// per statement in mattn/go-sqlite3, which would be measured too. ctx is
// checked between operations instead.
func measure(ctx context.Context, path string, m mode, w workload, d time.Duration, rng *rand.Rand) (sample, error) {
	db, err := openDB(path, m)
	if err != nil {
		return sample{}, err
	}
	defer func() { _ = db.Close() }()
	if _, err := db.Exec("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b INTEGER)"); err != nil {
		return sample{}, fmt.Errorf("create table: %w", err)
	}
	var s sample
	if w.isRead() {
		s, err = runReads(ctx, db, d, rng)
	} else {
		s, err = runInserts(ctx, db, w.Rows, d, rng)
	}
	if err != nil {
		return sample{}, err
	}
	s.Setup++ // CREATE TABLE
	return s, db.Close()
}

// runInserts commits transactions of rows inserts for d and checks that
// every committed row is in the table.
func runInserts(ctx context.Context, db *sql.DB, rows int, d time.Duration, rng *rand.Rand) (sample, error) {
	ins, err := db.Prepare("INSERT INTO t (a, b) VALUES (?, ?)")
	if err != nil {
		return sample{}, err
	}
	defer func() { _ = ins.Close() }()
	lat := make([]time.Duration, 0, 1<<16)
	start := time.Now()
	for time.Since(start) < d {
		if err := ctx.Err(); err != nil {
			return sample{}, err
		}
		tx, err := db.Begin()
		if err != nil {
			return sample{}, fmt.Errorf("begin: %w", err)
		}
		st := tx.Stmt(ins)
		for range rows {
			if _, err := st.Exec(randText(rng), rng.Int64()); err != nil {
				_ = tx.Rollback()
				return sample{}, fmt.Errorf("insert: %w", err)
			}
		}
		t0 := time.Now()
		if err := tx.Commit(); err != nil {
			return sample{}, fmt.Errorf("commit: %w", err)
		}
		lat = append(lat, time.Since(t0))
	}
	elapsed := time.Since(start)
	var n int
	if err := db.QueryRow("SELECT count(*) FROM t").Scan(&n); err != nil {
		return sample{}, fmt.Errorf("count rows: %w", err)
	}
	if want := len(lat) * rows; n != want {
		return sample{}, fmt.Errorf("table has %d rows after %d commits of %d rows, want %d", n, len(lat), rows, want)
	}
	p50, p99 := percentiles(lat)
	return sample{Ops: len(lat), Elapsed: elapsed, P50: p50, P99: p99}, nil
}

// runReads loads readRows rows in one transaction, warms the caches with a
// full scan, then runs point queries by random id for d.
func runReads(ctx context.Context, db *sql.DB, d time.Duration, rng *rand.Rand) (sample, error) {
	if err := loadRows(db, readRows, rng); err != nil {
		return sample{}, err
	}
	var n, bytes int
	var sum float64
	if err := db.QueryRow("SELECT count(*), sum(length(a)), total(b) FROM t").Scan(&n, &bytes, &sum); err != nil {
		return sample{}, fmt.Errorf("warm-up scan: %w", err)
	}
	if n != readRows || bytes != readRows*textLen {
		return sample{}, fmt.Errorf("warm-up scan: %d rows of %d bytes, want %d of %d", n, bytes, readRows, readRows*textLen)
	}
	q, err := db.Prepare("SELECT a, b FROM t WHERE id = ?")
	if err != nil {
		return sample{}, err
	}
	defer func() { _ = q.Close() }()
	var a string
	var b int64
	lat := make([]time.Duration, 0, 1<<18)
	start := time.Now()
	for time.Since(start) < d {
		if err := ctx.Err(); err != nil {
			return sample{}, err
		}
		id := rng.IntN(readRows) + 1
		t0 := time.Now()
		if err := q.QueryRow(id).Scan(&a, &b); err != nil {
			return sample{}, fmt.Errorf("select id %d: %w", id, err)
		}
		lat = append(lat, time.Since(t0))
		if len(a) != textLen {
			return sample{}, fmt.Errorf("select id %d: a has %d bytes, want %d", id, len(a), textLen)
		}
	}
	elapsed := time.Since(start)
	p50, p99 := percentiles(lat)
	return sample{Ops: len(lat), Elapsed: elapsed, P50: p50, P99: p99, Setup: 1}, nil
}

func loadRows(db *sql.DB, n int, rng *rand.Rand) error {
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	for range n {
		if _, err := tx.Exec("INSERT INTO t (a, b) VALUES (?, ?)", randText(rng), rng.Int64()); err != nil {
			_ = tx.Rollback()
			return fmt.Errorf("load rows: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("load rows: commit: %w", err)
	}
	return nil
}

const (
	textLen      = 100
	textAlphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"
)

// randText returns textLen random characters, six random bits each.
func randText(rng *rand.Rand) string {
	var buf [textLen]byte
	var bits uint64
	for i := range buf {
		if i%10 == 0 {
			bits = rng.Uint64()
		}
		buf[i] = textAlphabet[bits&63]
		bits >>= 6
	}
	return string(buf[:])
}

// percentiles returns the nearest-rank 50th and 99th percentiles.
func percentiles(ds []time.Duration) (p50, p99 time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	ds = slices.Clone(ds)
	slices.Sort(ds)
	rank := func(p int) time.Duration { return ds[max(0, (len(ds)*p+99)/100-1)] }
	return rank(50), rank(99)
}

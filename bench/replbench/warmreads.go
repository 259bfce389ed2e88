package main

import (
	"database/sql"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
)

// Warm reads: rounds of point queries on each side, the sides alternating
// and their order reversed every round.
const (
	warmRounds = 3
	warmRound  = 2 * time.Second        // each side, each round
	warmUp     = 200 * time.Millisecond // of point queries, after a full scan, before the first round
	rowBytes   = 100                    // the v of a row (commitRows)
)

// warmResult is what warm point queries measured on a replica's mount and
// on a bare copy of its database file, with nothing being applied.
type warmResult struct {
	node, locks   string // the replica and its fs.locks
	journalMode   string // of the replica's database, and of the bare copy
	rows          int64
	replica, bare warmSide
}

// warmSide is one side of the warm reads: a connection and its prepared
// query, queries a second in each round, and every query's latency.
type warmSide struct {
	db        *sql.DB
	stmt      *sql.Stmt
	rates     []float64
	latencies []time.Duration
}

// measureWarmReads waits until the replica has caught up with the idle
// primary, copies its bench.db with VACUUM INTO into a bare file beside
// the cluster's directory (same filesystem as the data directories),
// opened in the replica's journal mode, and runs the same point queries on
// both. It fails if the replica's position moved meanwhile.
func measureWarmReads(h *testingutil.Harness, c *testingutil.Cluster, replica *testingutil.ClusterNode) (*warmResult, error) {
	pos := c.WaitCaughtUp(h, time.Minute, "bench.db")
	res := &warmResult{node: replica.Name, locks: replica.Locks}
	var err error
	if res.replica.db, err = openReader(filepath.Join(replica.MountDir, "bench.db"), ""); err != nil {
		return nil, err
	}
	defer res.replica.close()
	if err := res.replica.db.QueryRow(`PRAGMA journal_mode`).Scan(&res.journalMode); err != nil {
		return nil, fmt.Errorf("replica %s: journal mode: %w", replica.Name, err)
	}
	bare := filepath.Join(h.TempDir(), "bench.db")
	if _, err := res.replica.db.Exec(`VACUUM INTO ?`, bare); err != nil {
		return nil, fmt.Errorf("copy the replica's bench.db to %s: %w", bare, err)
	}
	if res.bare.db, err = openReader(bare, "&_journal_mode="+res.journalMode); err != nil {
		return nil, err
	}
	defer res.bare.close()
	var mode string
	if err := res.bare.db.QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil || mode != res.journalMode {
		return nil, fmt.Errorf("bare copy %s in journal mode %q (%v), want the replica's %q", bare, mode, err, res.journalMode)
	}
	if err := res.replica.db.QueryRow(`SELECT coalesce(max(id), 0) FROM tx`).Scan(&res.rows); err != nil || res.rows == 0 {
		return nil, fmt.Errorf("replica %s: %d rows in tx (%v), want some", replica.Name, res.rows, err)
	}
	fmt.Fprintf(os.Stderr, "warm reads: %s and a bare copy, %d rounds of %v each\n", replica.Name, warmRounds, warmRound)
	for _, s := range []*warmSide{&res.replica, &res.bare} {
		if err := s.prepare(res.rows); err != nil {
			return nil, err
		}
	}
	for round := range warmRounds {
		sides := []*warmSide{&res.replica, &res.bare}
		if round%2 == 1 {
			slices.Reverse(sides)
		}
		for _, s := range sides {
			if err := s.run(res.rows, warmRound, uint64(round), true); err != nil {
				return nil, err
			}
		}
	}
	if got, _ := replica.Pos(h, "bench.db"); got != pos["bench.db"] {
		return nil, fmt.Errorf("replica %s moved from %v to %v during the warm reads, with the primary idle", replica.Name, pos["bench.db"], got)
	}
	return res, nil
}

// openReader opens the SQLite database at path as the benchmark's readers
// do: one connection, a 5 s busy timeout, and the DSN parameters in extra
// (e.g. "&_journal_mode=wal").
func openReader(path, extra string) (*sql.DB, error) {
	db, err := sql.Open("sqlite3", "file:"+path+"?_busy_timeout=5000"+extra)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

// prepare warms the side up: a full scan of tx, which it checks holds
// rows rows of rowBytes, the query prepared, and warmUp of point queries.
func (s *warmSide) prepare(rows int64) error {
	var n, bytes int64
	if err := s.db.QueryRow(`SELECT count(*), coalesce(sum(length(v)), 0) FROM tx`).Scan(&n, &bytes); err != nil {
		return fmt.Errorf("warm-up scan: %w", err)
	}
	if n != rows || bytes != rows*rowBytes {
		return fmt.Errorf("warm-up scan: %d rows of %d bytes, want %d of %d", n, bytes, rows, rows*rowBytes)
	}
	var err error
	if s.stmt, err = s.db.Prepare(`SELECT v FROM tx WHERE id=?`); err != nil {
		return err
	}
	return s.run(rows, warmUp, 0, false)
}

// run runs the point query for d, on ids from 1 to rows drawn from a
// generator seeded with seed, and, if record, records the rate and the
// latencies.
func (s *warmSide) run(rows int64, d time.Duration, seed uint64, record bool) error {
	rng := rand.New(rand.NewPCG(seed, 0x6d6572696469616e))
	var v []byte
	n := 0
	start := time.Now()
	for time.Since(start) < d {
		id := rng.Int64N(rows) + 1
		t0 := time.Now()
		if err := s.stmt.QueryRow(id).Scan(&v); err != nil {
			return fmt.Errorf("select id %d: %w", id, err)
		}
		if record {
			s.latencies = append(s.latencies, time.Since(t0))
		}
		if len(v) != rowBytes {
			return fmt.Errorf("select id %d: v has %d bytes, want %d", id, len(v), rowBytes)
		}
		n++
	}
	if record {
		s.rates = append(s.rates, float64(n)/time.Since(start).Seconds())
	}
	return nil
}

func (s *warmSide) close() {
	if s.stmt != nil {
		_ = s.stmt.Close()
	}
	if s.db != nil {
		_ = s.db.Close()
	}
}

// rate is the median of the rounds' queries a second.
func (s *warmSide) rate() float64 {
	r := slices.Sorted(slices.Values(s.rates))
	return r[len(r)/2]
}

func (s *warmSide) percentiles() (p50, p99 time.Duration) {
	lat := slices.Sorted(slices.Values(s.latencies))
	return lat[len(lat)/2], lat[len(lat)*99/100]
}

func (s *warmSide) roundRates() string {
	rs := make([]string, len(s.rates))
	for i, r := range s.rates {
		rs[i] = fmt.Sprintf("%.0f", r)
	}
	return strings.Join(rs, " / ")
}

func us(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Microsecond)) }

func (r *warmResult) print(w io.Writer) {
	fmt.Fprintf(w, "\nwarm reads, primary idle, nothing applied: SELECT v FROM tx WHERE id=? on %d rows, random ids, prepared, one connection;\n", r.rows)
	fmt.Fprintf(w, "%d rounds of %v each side, alternating, order reversed each round, after a full scan and %v of queries;\n", warmRounds, warmRound, warmUp)
	fmt.Fprintln(w, "queries/s: median of the rounds; latencies: of every query of every round.")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "side\tjournal\tqueries/s\trounds queries/s\tp50 µs\tp99 µs\t")
	for _, s := range []struct {
		name string
		side *warmSide
	}{{fmt.Sprintf("replica %s mount, fs.locks: %s", r.node, r.locks), &r.replica}, {"bare copy (VACUUM INTO)", &r.bare}} {
		p50, p99 := s.side.percentiles()
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%s\t%s\t%s\t\n", s.name, r.journalMode, s.side.rate(), s.side.roundRates(), us(p50), us(p99))
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "replica/bare: %.2f\n", r.replica.rate()/r.bare.rate())
}

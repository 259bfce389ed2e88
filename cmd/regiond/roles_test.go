package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mattn/go-sqlite3"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/regiond"
)

// roleMoves is how many times TestRoles_MoveAroundRing moves the primary.
const roleMoves = 10

// TestRoles_MoveAroundRing moves the static primary around a ring of
// three nodes, one SIGHUP per node and move, without a restart: a writer
// commits on the primary's mount between moves, and each move waits
// until the replicas have everything. After every move the new primary
// holds a higher epoch than the last, the old one refuses writes and
// follows the new one, and at the end every node holds every row any
// primary acknowledged, in a WAL and in a DELETE database, with equal
// positions and databases that pass integrity_check. Throughout, a reader
// on every mount, its connection open across the moves, sees only whole
// transactions (two rows each), never fewer rows than it saw before, and
// no error.
func TestRoles_MoveAroundRing(t *testing.T) {
	t.Parallel()
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fra, syd)
	c.Start(t)
	ring := []*testingutil.ClusterNode{c.Node(iad.Name), c.Node(fra.Name), c.Node(syd.Name)}
	dbs := []struct{ name, mode string }{{"wal.db", "wal"}, {"delete.db", "delete"}}
	rows := 0
	write := func(n *testingutil.ClusterNode, count int) {
		t.Helper()
		for _, d := range dbs {
			db := testingutil.MustOpenSQLite(t, filepath.Join(n.MountDir, d.name), d.mode)
			if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, by TEXT)`); err != nil {
				t.Fatalf("%s on %s: %v", d.name, n.Name, err)
			}
			for i := 0; i < count; i += 2 {
				id := rows + i + 1
				if _, err := db.Exec(`INSERT INTO t (id, by) VALUES (?, ?), (?, ?)`, id, n.Name, id+1, n.Name); err != nil {
					var se sqlite3.Error
					errors.As(err, &se)
					t.Fatalf("%s on %s, rows %d and %d: %v (extended %d, errno %d)", d.name, n.Name, id, id+1, err, se.ExtendedCode, se.SystemErrno)
				}
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
		}
		rows += count
	}
	names := []string{dbs[0].name, dbs[1].name}
	write(ring[0], 2) // the databases exist before the readers open them
	c.WaitCaughtUp(t, time.Minute, names...)
	var readers []*ringReader
	for _, n := range ring {
		for _, d := range dbs {
			readers = append(readers, startRingReader(t, n, d.name))
		}
	}

	// A configuration that does not load changes nothing; one that
	// changes a key other than lease.static_primary is reported, and the
	// key left as it was.
	replica := ring[1]
	if err := os.WriteFile(replica.Config, []byte("node: [fra-1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	replica.Signal(t, syscall.SIGHUP)
	waitLog(t, replica, "SIGHUP: the configuration did not load; nothing changed")
	replica.Extra = []string{"router: {max_lag: 2s}"}
	c.SetPrimary(iad.Name)
	replica.Signal(t, syscall.SIGHUP)
	waitLog(t, replica, "reload: only lease.static_primary changes while regiond runs; the other changes ([router]) wait for a restart")
	waitStatus(t, replica, func(st regiond.Status) bool {
		return st.Role == regiond.RoleReplica && st.Primary == iad.Name && st.MaxLagMS == 10000 && st.Ready
	}, "a ready replica of %s with router.max_lag 10s as at start", iad.Name)
	replica.Extra = nil
	c.SetPrimary(iad.Name)

	for move := range roleMoves {
		from, to := ring[move%3], ring[(move+1)%3]
		write(from, 10)
		c.WaitCaughtUp(t, time.Minute, names...)
		c.SetPrimary(to.Name)
		for _, n := range ring {
			n.Signal(t, syscall.SIGHUP)
		}
		wantEpoch := uint64(move + 2)
		waitStatus(t, to, func(st regiond.Status) bool { return st.Role == regiond.RolePrimary && st.Epoch == wantEpoch },
			"primary at epoch %d", wantEpoch)
		for _, n := range ring {
			if n == to {
				continue
			}
			waitStatus(t, n, func(st regiond.Status) bool {
				return st.Role == regiond.RoleReplica && st.Primary == to.Name && st.Epoch == wantEpoch && st.Ready && st.Stream != nil && st.Stream.Connected
			}, "a ready replica of %s at epoch %d", to.Name, wantEpoch)
		}
		checkWriteRefused(t, from, dbs[0].name, to.Name)
	}
	last := ring[roleMoves%3]
	write(last, 10)
	want := c.WaitCaughtUp(t, time.Minute, names...)
	for _, n := range ring {
		for _, d := range dbs {
			if got, _ := n.Pos(t, d.name); got != want[d.name] {
				t.Errorf("%s: %s at %s, want %s", n.Name, d.name, got, want[d.name])
			}
			db := openOnReplica(t, n, d.name)
			var count, max int
			if err := db.QueryRow(`SELECT count(*), max(id) FROM t`).Scan(&count, &max); err != nil {
				t.Fatalf("%s %s: %v", n.Name, d.name, err)
			}
			if count != rows || max != rows {
				t.Errorf("%s %s: %d rows, largest id %d; want the %d acknowledged", n.Name, d.name, count, max, rows)
			}
			var ok string
			if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
				t.Errorf("%s %s: integrity_check %q, %v", n.Name, d.name, ok, err)
			}
			_ = db.Close()
		}
		if !strings.Contains(n.Log(), "msg=\"SIGHUP: reloading the configuration\"") {
			t.Errorf("%s logged no reload", n.Name)
		}
	}

	for _, r := range readers {
		r.stop(t, rows)
	}

	// The primary restarted keeps its epoch; its replicas follow it again.
	if err := last.Stop(); err != nil {
		t.Fatal(err)
	}
	last.Start(t)
	final := uint64(roleMoves + 1)
	waitStatus(t, last, func(st regiond.Status) bool { return st.Role == regiond.RolePrimary && st.Epoch == final },
		"primary at epoch %d again", final)
	for _, n := range ring {
		if n != last {
			waitStatus(t, n, func(st regiond.Status) bool {
				return st.Primary == last.Name && st.Epoch == final && st.Ready && st.Stream != nil && st.Stream.Connected
			}, "a ready replica of %s at epoch %d", last.Name, final)
		}
	}
}

// ringReader reads one database on one node's mount through one
// connection, over and over, checking what it sees.
type ringReader struct {
	name    string
	done    chan struct{}
	quit    chan struct{}
	reads   atomic.Int64
	last    atomic.Int64 // rows in the last read
	problem error        // set before done is closed
}

// startRingReader starts reading db on n's mount: count and largest id of
// t, which must be equal and even (whole transactions of two rows), and
// never fewer than before.
func startRingReader(t *testing.T, n *testingutil.ClusterNode, db string) *ringReader {
	t.Helper()
	r := &ringReader{name: n.Name + " " + db, done: make(chan struct{}), quit: make(chan struct{})}
	conn, err := sql.Open("sqlite3", "file:"+filepath.Join(n.MountDir, db)+"?mode=ro&_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	conn.SetMaxOpenConns(1)
	go func() {
		defer close(r.done)
		defer conn.Close()
		for {
			select {
			case <-r.quit:
				return
			default:
			}
			var count, max int64
			if err := conn.QueryRow(`SELECT count(*), coalesce(max(id), 0) FROM t`).Scan(&count, &max); err != nil {
				r.problem = fmt.Errorf("read %d: %w", r.reads.Load()+1, err)
				return
			}
			n := r.reads.Add(1)
			if last := r.last.Load(); count != max || count%2 != 0 || count < last {
				r.problem = fmt.Errorf("read %d: %d rows, largest id %d, after %d rows: not whole transactions, or fewer than before", n, count, max, last)
				return
			}
			r.last.Store(count)
			time.Sleep(2 * time.Millisecond)
		}
	}()
	t.Cleanup(func() {
		select {
		case <-r.quit:
		default:
			close(r.quit)
		}
		<-r.done
	})
	return r
}

// stop ends the reader, once it has seen rows rows, and fails the test if
// it saw anything wrong.
func (r *ringReader) stop(t *testing.T, rows int) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		select {
		case <-r.done:
		default:
			if r.last.Load() < int64(rows) && time.Now().Before(deadline) {
				continue
			}
		}
		break
	}
	close(r.quit)
	<-r.done
	if r.problem != nil {
		t.Errorf("reader of %s: %v", r.name, r.problem)
	} else if got := r.last.Load(); got != int64(rows) {
		t.Errorf("reader of %s: saw %d rows at the end, want %d", r.name, got, rows)
	}
	t.Logf("reader of %s: %d reads, the last of %d rows", r.name, r.reads.Load(), r.last.Load())
}

// waitStatus waits, up to a minute, until n's /status satisfies ok.
func waitStatus(t *testing.T, n *testingutil.ClusterNode, ok func(regiond.Status) bool, format string, args ...any) regiond.Status {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		st := adminStatus(t, n)
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			args = append(args, st)
			t.Fatalf("%s did not become "+format+" in a minute; its status: %+v", append([]any{n.Name}, args...)...)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkWriteRefused checks that a write on n's mount fails, as writes
// to a read-only database do, and that n names primary where an app can
// read it: the mount's .primary and the daemon's log line for the refused
// write (the app's error itself is an errno).
func checkWriteRefused(t *testing.T, n *testingutil.ClusterNode, name, primary string) {
	t.Helper()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(n.MountDir, name)+"?_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	_, err = db.Exec(`INSERT INTO t (by) VALUES ('refused')`)
	var serr sqlite3.Error
	switch {
	case err == nil:
		t.Errorf("%s took a write after it stepped down for %s", n.Name, primary)
	case !errors.As(err, &serr) || serr.Code != sqlite3.ErrReadonly:
		t.Errorf("%s: the refused write failed with %v, want SQLite's read-only error", n.Name, err)
	}
	if b, err := os.ReadFile(filepath.Join(n.MountDir, ".primary")); err != nil || strings.TrimSpace(string(b)) != primary {
		t.Errorf("%s: .primary says %q (%v), want %s", n.Name, b, err, primary)
	}
	want := "primary=" + primary
	deadline := time.Now().Add(5 * time.Second)
	for {
		var line string // the last: the node logs a process's refused writes once a minute, or when the primary changed
		for l := range strings.Lines(n.Log()) {
			if strings.Contains(l, "write refused: the mount is read-only") {
				line = l
			}
		}
		if strings.Contains(line, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: no log line for the refused write names %s (%q)", n.Name, want, line)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code, b, err := n.AdminGet("/readyz"); err != nil || code != http.StatusOK {
		t.Errorf("%s /readyz: %d %q, %v", n.Name, code, b, err)
	}
}

// TestRoles_StepDownDiverged: a primary that commits transactions its
// replica never gets (the replica is down), then learns by SIGHUP that
// the replica became the primary and committed transactions of its own,
// steps down without a restart, follows the new primary, and keeps its
// own transactions under data_dir/lost/, as a restarted one does
// (TestCluster_Divergence).
func TestRoles_StepDownDiverged(t *testing.T) {
	t.Parallel()
	c, old, next, dbs, common, oldPos := startDiverging(t)
	c.SetPrimary(next.Name)
	next.Start(t)
	waitStatus(t, next, func(st regiond.Status) bool { return st.Role == regiond.RolePrimary && st.Epoch == 2 }, "primary at epoch 2")
	openOnPrimary(t, c, dbs)
	for _, d := range dbs {
		insertRows(t, d.db, next.Name, newRows)
	}
	evs := watchEvents(t, old)
	old.Signal(t, syscall.SIGHUP)
	waitStatus(t, old, func(st regiond.Status) bool {
		return st.Role == regiond.RoleReplica && st.Primary == next.Name && st.Epoch == 2
	}, "a replica of %s at epoch 2", next.Name)
	checkDiverged(t, c, old, next, dbs, common, oldPos)
	if !strings.Contains(old.Log(), "stepped down: serving read-only as a replica") {
		t.Errorf("%s did not log that it stepped down", old.Name)
	}

	// /events told of each step: the role, each database's snapshot and
	// the set of transactions it kept, and the applies.
	want := map[string]bool{"role replica " + next.Name: false}
	for _, d := range dbs {
		lost, err := os.ReadDir(filepath.Join(old.DataDir, "lost", d.name))
		if err != nil || len(lost) != 1 {
			t.Fatalf("lost sets of %s: %v, %v", d.name, lost, err)
		}
		want["lost "+d.name+" "+filepath.Join(old.DataDir, "lost", d.name, lost[0].Name())] = false
		// Its position is past the new primary's (AHEAD), or of another
		// history at the same TXID (DIVERGED).
		want["snapshot "+d.name] = false
		want["apply "+d.name] = false
	}
	seen := func() bool {
		for _, ev := range evs() {
			if ev.Node != old.Name || ev.Time.IsZero() {
				t.Fatalf("event %+v, want one of %s with its time", ev, old.Name)
			}
			switch ev.Type {
			case regiond.EventRole:
				want["role "+ev.Role+" "+ev.Primary] = true
			case regiond.EventLost:
				want["lost "+ev.DB+" "+ev.Dir] = true
			case regiond.EventSnapshot:
				if ev.Reason == "SNAPSHOT_REASON_AHEAD" || ev.Reason == "SNAPSHOT_REASON_DIVERGED" {
					want["snapshot "+ev.DB] = true
				}
			case regiond.EventApply:
				want["apply "+ev.DB] = true
			}
		}
		return !slices.Contains(slices.Collect(maps.Values(want)), false)
	}
	for deadline := time.Now().Add(10 * time.Second); !seen(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s /events after 10 s: seen %v; events: %+v", old.Name, want, evs())
		}
	}
}

// watchEvents reads n's /events until the test ends, and returns a
// function that returns the events read so far.
func watchEvents(t *testing.T, n *testingutil.ClusterNode) func() []regiond.Event {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.Admin+"/events", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("%s /events: %v, %v", n.Name, resp, err)
	}
	var (
		mu  sync.Mutex
		got []regiond.Event
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		dec := json.NewDecoder(resp.Body)
		for {
			var ev regiond.Event
			if err := dec.Decode(&ev); err != nil {
				return
			}
			mu.Lock()
			got = append(got, ev)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cancel()
		_ = resp.Body.Close()
		<-done
	})
	return func() []regiond.Event {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(got)
	}
}

// TestRoles_InFlightWriteFails: a write transaction open on the primary
// when it steps down cannot commit: its COMMIT fails, in WAL and in
// DELETE mode, and its row is in no database afterwards.
func TestRoles_InFlightWriteFails(t *testing.T) {
	t.Parallel()
	c, old, next, dbs := startPair(t)
	txs := make([]*sql.Tx, len(dbs))
	for i, d := range dbs {
		d.db.SetMaxOpenConns(1)
		insertRows(t, d.db, old.Name, 10)
		tx, err := d.db.Begin()
		if err != nil {
			t.Fatal(err)
		}
		// Enough pages that SQLite writes some before COMMIT.
		for range 200 {
			if _, err := tx.Exec(`INSERT INTO rows VALUES ('in-flight', 0, randomblob(3000))`); err != nil {
				t.Fatal(err)
			}
		}
		txs[i] = tx
	}
	c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	c.SetPrimary(next.Name)
	next.Signal(t, syscall.SIGHUP)
	old.Signal(t, syscall.SIGHUP)
	waitStatus(t, old, func(st regiond.Status) bool { return st.Role == regiond.RoleReplica && st.Primary == next.Name },
		"a replica of %s", next.Name)
	for i, tx := range txs {
		if err := tx.Commit(); err == nil {
			t.Errorf("%s: a COMMIT on %s after it stepped down returned success", dbs[i].name, old.Name)
		} else {
			t.Logf("%s: COMMIT on %s after it stepped down: %v", dbs[i].name, old.Name, err)
		}
		_ = dbs[i].db.Close()
	}
	waitStatus(t, next, func(st regiond.Status) bool { return st.Role == regiond.RolePrimary && st.Epoch == 2 }, "primary at epoch 2")
	openOnPrimary(t, c, dbs)
	for _, d := range dbs {
		insertRows(t, d.db, next.Name, 5)
	}
	checkpointAll(t, dbs)
	pos := c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	checkReplicas(t, c, dbs, pos)
	for _, n := range []*testingutil.ClusterNode{old, next} {
		for _, d := range dbs {
			r := openOnReplica(t, n, d.name)
			if got := countRows(t, r, "in-flight"); got != 0 {
				t.Errorf("%s on %s: %d rows of the transaction that was in flight, want none", d.name, n.Name, got)
			}
			if got := countRows(t, r, old.Name); got != 10 {
				t.Errorf("%s on %s: %d rows of %s, want 10", d.name, n.Name, got, old.Name)
			}
		}
	}
}

package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// The cluster tests run three or four real `regiond run` processes (this
// test binary, run as main) on loopback: iad-1 holds the static lease, the
// others replicate from it over mutual TLS.
var (
	iad = testingutil.ClusterNodeSpec{Name: "iad-1", Region: "iad"}
	fra = testingutil.ClusterNodeSpec{Name: "fra-1", Region: "fra"}
	syd = testingutil.ClusterNodeSpec{Name: "syd-1", Region: "syd"}
)

const (
	// clusterTransactions is how many random transactions
	// TestCluster_Replicates commits to each database.
	clusterTransactions = 10000
	// catchUpTimeout bounds the wait for replicas to reach the primary's
	// position once it stopped committing.
	catchUpTimeout = 120 * time.Second
	// streamInterval paces the steady stream of TestCluster_ReplicaRestart:
	// at most 40 transactions a second per database. A replica applies
	// more slowly than the primary commits (four fsyncs a file), and on a
	// two-core machine running the other test packages at once it fell
	// 45 s behind a stream of 100 a second per database.
	streamInterval = 25 * time.Millisecond
	// workloadTimeout bounds the workloads of TestCluster_Replicates,
	// which take a few minutes on a busy two-core machine.
	workloadTimeout = 10 * time.Minute
	// restartRounds is how many times TestCluster_ReplicaRestart kills and
	// restarts the replica.
	restartRounds = 3
)

// regiondCommand returns a command that runs regiond with args: this test
// binary, which runs main when runAsMainEnv is set.
func regiondCommand(args ...string) *exec.Cmd {
	exe, err := os.Executable()
	if err != nil {
		exe = os.Args[0]
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), runAsMainEnv+"=1")
	return cmd
}

// clusterDB is a database a cluster test writes through the primary's
// mount, in a journal mode.
type clusterDB struct {
	name, mode string
	db         *sql.DB // on the primary's mount
}

// openOnPrimary opens the databases dbs on c's primary mount.
func openOnPrimary(t *testing.T, c *testingutil.Cluster, dbs []*clusterDB) {
	t.Helper()
	for _, d := range dbs {
		d.db = testingutil.MustOpenSQLite(t, filepath.Join(c.Node(c.Primary).MountDir, d.name), d.mode)
	}
}

// TestCluster_Replicates commits random transactions (schema changes,
// overflow pages, growth, VACUUM) to a database in each journal mode
// SQLite uses in production (DELETE, TRUNCATE, PERSIST, WAL) on the
// primary (with kernel locks) and checks that both replicas (fra-1 with
// the mount's locks, syd-1 with kernel locks and its lock holder)
// reach the primary's position, with backing files equal byte for byte,
// databases SQLite finds intact, the same schema and row counts, and
// mounts that refuse writes.
func TestCluster_Replicates(t *testing.T) {
	t.Parallel()
	iadKernel, sydKernel := iad, syd
	iadKernel.Locks, sydKernel.Locks = "kernel", "kernel"
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iadKernel, fra, sydKernel)
	c.Start(t)
	dbs := []*clusterDB{{name: "delete.db", mode: "delete"}, {name: "truncate.db", mode: "truncate"},
		{name: "persist.db", mode: "persist"}, {name: "wal.db", mode: "wal"}}
	openOnPrimary(t, c, dbs)

	seed := uint64(time.Now().UnixNano())
	start := time.Now()
	var g errgroup.Group
	for i, d := range dbs {
		w := testingutil.NewWorkload(d.db, seed+uint64(i))
		w.Light = true
		g.Go(func() error { return runWorkload(w, d.name, clusterTransactions) })
	}
	var werr error
	testingutil.Within(t, workloadTimeout, "the workloads to commit their transactions", func() { werr = g.Wait() })
	if werr != nil {
		t.Fatalf("%v (seed %d)", werr, seed)
	}
	written := time.Now()
	checkpointAll(t, dbs)
	pos := c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	t.Logf("%d transactions per database committed in %v; replicas caught up %v later",
		clusterTransactions, written.Sub(start).Round(time.Millisecond), time.Since(written).Round(time.Millisecond))
	for _, d := range dbs {
		// Most steps change the database; a few (an UPDATE or DELETE
		// that matches no row) commit nothing.
		if got, want := pos[d.name].TXID, uint64(clusterTransactions/2); uint64(got) < want {
			t.Fatalf("%s: primary at txid %d after %d transactions, want at least %d", d.name, got, clusterTransactions, want)
		}
		t.Logf("%s (%s): all nodes at %v", d.name, d.mode, pos[d.name])
	}
	checkReplicas(t, c, dbs, pos)
	for _, n := range c.Nodes {
		if n.Name == c.Primary {
			continue
		}
		for _, d := range dbs {
			checkReadOnly(t, n, d.name, pos[d.name])
		}
		checkCreateRefused(t, n)
	}
}

// TestCluster_ReplicaRestart kills a replica with SIGKILL, at random
// moments, while the primary commits a steady stream to two databases,
// restarts it while the stream goes on, and checks that it exits, comes
// back at least at the position it had applied, catches up with the
// running stream, and ends equal to the primary and the replica that kept
// running, having resumed its stream rather than taken a snapshot.
func TestCluster_ReplicaRestart(t *testing.T) {
	t.Parallel()
	// The victim holds its readers off through a lock holder process,
	// which must die with it.
	fraKernel := fra
	fraKernel.Locks = "kernel"
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fraKernel, syd)
	c.Start(t)
	victim := c.Node(fra.Name)
	dbs := []*clusterDB{{name: "delete.db", mode: "delete"}, {name: "wal.db", mode: "wal"}}
	openOnPrimary(t, c, dbs)

	seed := uint64(time.Now().UnixNano())
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	var g errgroup.Group
	for i, d := range dbs {
		w := testingutil.NewWorkload(d.db, seed+uint64(i))
		g.Go(func() error { return streamWorkload(ctx, w, d.name) })
	}
	stopWriters := stopper(t, stop, &g)

	rng := rand.New(rand.NewPCG(seed, 3))
	var before map[string]ltx.Pos
	// Once the victim has each database, it only ever resumes.
	for _, d := range dbs {
		victim.WaitPos(t, d.name, catchUpTimeout, "any", func(p ltx.Pos) bool { return p.TXID > 0 })
	}
	snapshots := strings.Count(victim.Log(), "applying a snapshot")
	for round := range restartRounds {
		before = killAndRestart(t, c, victim, dbs, rng)
		t.Logf("round %d: %s killed at %v, caught up with the running stream", round, victim.Name, before)
	}
	if err := stopWriters(); err != nil {
		t.Fatalf("%v (seed %d)", err, seed)
	}
	checkpointAll(t, dbs)
	pos := c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	for _, d := range dbs {
		t.Logf("%s (%s): %s at %v before the last kill; all nodes at %v", d.name, d.mode, victim.Name, before[d.name], pos[d.name])
	}
	checkReplicas(t, c, dbs, pos)
	// Its position was known and within retention: the primary resumed
	// its stream from there. The only snapshots are those it may have
	// got a database with at first.
	if n := strings.Count(victim.Log(), "applying a snapshot"); n != snapshots || snapshots > len(dbs) {
		t.Fatalf("%s applied %d snapshots after its restarts (%d before them, at most one per database), want its stream resumed after each restart:\n%s",
			victim.Name, n-snapshots, snapshots, logLine(victim.Log(), "level=WARN", "applying a snapshot"))
	}
}

// killAndRestart kills victim with SIGKILL at a random moment once it has
// applied 20 more transactions of each database, waits until the primary
// has committed 50 more without it, restarts it, and waits until it has
// caught up with the primary's position at the restart. It checks that
// the victim restarts at least at the position it had before the kill,
// which it returns.
func killAndRestart(t *testing.T, c *testingutil.Cluster, victim *testingutil.ClusterNode, dbs []*clusterDB, rng *rand.Rand) map[string]ltx.Pos {
	t.Helper()
	primary := c.Node(c.Primary)
	before := make(map[string]ltx.Pos)
	for _, d := range dbs {
		from, _ := victim.Pos(t, d.name)
		before[d.name] = victim.WaitPos(t, d.name, catchUpTimeout, fmt.Sprintf("txid %d or more", from.TXID+20),
			func(p ltx.Pos) bool { return p.TXID >= from.TXID+20 })
	}
	time.Sleep(time.Duration(rng.IntN(100)) * time.Millisecond)
	start := time.Now()
	victim.Kill(t)
	for _, d := range dbs {
		want := before[d.name].TXID + 50
		primary.WaitPos(t, d.name, 30*time.Second, fmt.Sprintf("txid %d or more", want), func(p ltx.Pos) bool { return p.TXID >= want })
	}

	victim.Start(t)
	for _, d := range dbs {
		// What it applied and acknowledged before the kill is still there.
		if got, ok := victim.Pos(t, d.name); !ok || got.TXID < before[d.name].TXID {
			t.Fatalf("%s after restart: %s at %v (have it: %v), want at least txid %d, where it was before the kill",
				victim.Name, d.name, got, ok, before[d.name].TXID)
		}
		// It catches up with a stream that is still running.
		target, _ := primary.Pos(t, d.name)
		victim.WaitPos(t, d.name, catchUpTimeout, fmt.Sprintf("txid %d or more, the primary's at restart", target.TXID),
			func(p ltx.Pos) bool { return p.TXID >= target.TXID })
	}
	t.Logf("%s caught up %v after the kill", victim.Name, time.Since(start).Round(time.Millisecond))
	return before
}

// TestCluster_NewDatabases creates 50 databases on the primary, in DELETE
// and WAL mode, while both replicas stream: each reaches them through the
// stream they have open, from its first transaction, with no snapshot and
// no reconnect, and ends equal to the primary's.
func TestCluster_NewDatabases(t *testing.T) {
	t.Parallel()
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fra, syd)
	c.Start(t)
	primary := c.Node(c.Primary)
	logged := waitStreaming(t, c)
	dbs := createDBs(t, primary, 50, func(i int) (string, string) { return fmt.Sprintf("new-%02d.db", i), []string{"delete", "wal"}[i%2] },
		`CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)`, `INSERT INTO t (v) VALUES ('a')`, `INSERT INTO t (v) VALUES (randomblob(5000))`)
	pos := c.WaitCaughtUp(t, catchUpTimeout, dbs...)
	for _, name := range dbs {
		want := testingutil.DatabaseSHA256(t, primary.BackingFile(name))
		for _, n := range c.Nodes {
			if got := testingutil.DatabaseSHA256(t, n.BackingFile(name)); got != want {
				t.Fatalf("%s: %s at %v: got sha256 %s, want %s, the primary's", n.Name, name, pos[name], got, want)
			}
		}
	}
	for _, n := range c.Nodes {
		for _, words := range [][]string{{"snapshot"}, {"reconnecting"}, {"no transactions"}} {
			if line := logLine(n.Log()[logged[n.Name]:], words...); line != "" {
				t.Fatalf("%s logged %q, want no snapshot and no reconnect for new databases:\n%s", n.Name, words, line)
			}
		}
	}
	t.Logf("%d databases on %d replicas, equal to the primary's, with no snapshot and no reconnect", len(dbs), len(c.Nodes)-1)
}

// TestCluster_RefusesWrongCA runs a fourth node, ams-1, that the primary
// knows by name but whose certificate comes from another CA, and checks
// that it never receives the database the other replica does, and that the
// primary logs which node it refused and why.
func TestCluster_RefusesWrongCA(t *testing.T) {
	t.Parallel()
	ams := testingutil.ClusterNodeSpec{Name: "ams-1", Region: "ams", OtherCA: true}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fra, ams)
	c.Start(t)
	primary, replica, rogue := c.Node(iad.Name), c.Node(fra.Name), c.Node(ams.Name)
	dbs := []*clusterDB{{name: "app.db", mode: "delete"}}
	openOnPrimary(t, c, dbs)
	if err := runWorkload(testingutil.NewWorkload(dbs[0].db, 1), "app.db", 20); err != nil {
		t.Fatal(err)
	}
	want, _ := primary.Pos(t, "app.db")
	replica.WaitPos(t, "app.db", catchUpTimeout, want.String(), func(p ltx.Pos) bool { return p == want })

	// The rogue node retries with backoff: give it a few seconds more
	// than the good replica needed, watching its mount all along.
	var refusal string
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline) || refusal == ""; {
		if p, ok := rogue.Pos(t, "app.db"); ok {
			t.Fatalf("%s: got app.db at %v, want no database on a node whose certificate the primary does not trust", rogue.Name, p)
		}
		refusal = logLine(primary.Log(), rogue.Name, "certificate")
		if time.Now().After(deadline.Add(10 * time.Second)) {
			t.Fatalf("%s: no log line naming %s and its certificate, want the refusal logged", primary.Name, rogue.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%s logged: %s", primary.Name, refusal)
	entries, err := os.ReadDir(rogue.MountDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "app.db") {
			t.Fatalf("%s: got %s in the mount, want no trace of app.db", rogue.Name, e.Name())
		}
	}
	if _, err := os.Stat(filepath.Join(rogue.DataDir, "dbs", "app.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s: stat of its app.db backing directory: got %v, want it not to exist", rogue.Name, err)
	}
}

// waitStreaming waits until every replica of c has a stream open, and
// returns how long each node's log is then: a replica that started before
// the primary listened reconnected, which only what they log from then on
// does not show.
func waitStreaming(t *testing.T, c *testingutil.Cluster) map[string]int {
	t.Helper()
	primary := c.Node(c.Primary)
	for _, n := range c.Nodes {
		for deadline := time.Now().Add(catchUpTimeout); n != primary && logLine(primary.Log(), "replica connected", "replica="+n.Name) == ""; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s did not connect to %s in %v", n.Name, primary.Name, catchUpTimeout)
			}
		}
	}
	logged := map[string]int{}
	for _, n := range c.Nodes {
		logged[n.Name] = len(n.Log())
	}
	return logged
}

// createDBs creates count databases on n's mount, database i named and in
// the journal mode that db(i) returns, each with queries run on it, one
// transaction each, and returns their names.
func createDBs(t *testing.T, n *testingutil.ClusterNode, count int, db func(i int) (name, mode string), queries ...string) []string {
	t.Helper()
	var names []string
	for i := range count {
		name, mode := db(i)
		conn := testingutil.MustOpenSQLite(t, filepath.Join(n.MountDir, name), mode)
		for _, q := range queries {
			if _, err := conn.Exec(q); err != nil {
				t.Fatalf("%s: %s: %v", name, q, err)
			}
		}
		if err := conn.Close(); err != nil {
			t.Fatal(err)
		}
		names = append(names, name)
	}
	return names
}

// stopper returns a function that stops writers: it calls stop and
// waits, a minute at most, for g. It runs at cleanup too, before the
// cleanups registered earlier, so that they do not close the writers'
// databases under them.
func stopper(t *testing.T, stop context.CancelFunc, g *errgroup.Group) func() error {
	stopWriters := func() error {
		stop()
		var err error
		testingutil.Within(t, time.Minute, "the writers to stop", func() { err = g.Wait() })
		return err
	}
	t.Cleanup(func() { _ = stopWriters() })
	return stopWriters
}

// logLine returns the first line of log that contains every one of words,
// or "".
func logLine(log string, words ...string) string {
	for line := range strings.SplitSeq(log, "\n") {
		if !slices.ContainsFunc(words, func(w string) bool { return !strings.Contains(line, w) }) {
			return line
		}
	}
	return ""
}

// runWorkload initializes w and runs n of its transactions.
func runWorkload(w *testingutil.Workload, name string, n int) error {
	if err := w.Init(); err != nil {
		return fmt.Errorf("%s: init: %w", name, err)
	}
	for i := range n {
		if what, err := w.Step(); err != nil {
			return fmt.Errorf("%s: transaction %d (%s): %w", name, i, what, err)
		}
	}
	return nil
}

// streamWorkload initializes w and runs its transactions, one per
// streamInterval at most, until ctx is done.
func streamWorkload(ctx context.Context, w *testingutil.Workload, name string) error {
	if err := w.Init(); err != nil {
		return fmt.Errorf("%s: init: %w", name, err)
	}
	tick := time.NewTicker(streamInterval)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		if what, err := w.Step(); err != nil {
			return fmt.Errorf("%s: transaction %d (%s): %w", name, i, what, err)
		}
	}
}

func names(dbs []*clusterDB) []string {
	var s []string
	for _, d := range dbs {
		s = append(s, d.name)
	}
	return s
}

// checkpointAll checkpoints the WAL-mode databases into their files on the
// primary, so that its backing files hold every transaction, as the
// replicas' do.
func checkpointAll(t *testing.T, dbs []*clusterDB) {
	t.Helper()
	for _, d := range dbs {
		if d.mode != "wal" {
			continue
		}
		var busy, logFrames, ckpt int
		if err := d.db.QueryRow(`PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &logFrames, &ckpt); err != nil {
			t.Fatal(err)
		} else if busy != 0 {
			t.Fatalf("%s: wal_checkpoint(TRUNCATE): got busy %d, want 0", d.name, busy)
		}
	}
}

// checkReplicas checks every replica of c, at the positions pos: its
// backing file of each database, with the WAL frames it applied copied
// in, is the primary's byte for byte, and
// through its mount SQLite finds the database intact, with the primary's
// schema and row counts.
func checkReplicas(t *testing.T, c *testingutil.Cluster, dbs []*clusterDB, pos map[string]ltx.Pos) {
	t.Helper()
	primary := c.Node(c.Primary)
	for _, d := range dbs {
		wantSum := testingutil.DatabaseSHA256(t, primary.BackingFile(d.name))
		want := summarize(t, d.db)
		for _, n := range c.Nodes {
			if n == primary {
				continue
			}
			if got := testingutil.DatabaseSHA256(t, n.BackingFile(d.name)); got != wantSum {
				t.Fatalf("%s: %s backing file at %v: got sha256 %s, want %s, the primary's", n.Name, d.name, pos[d.name], got, wantSum)
			}
			r := openOnReplica(t, n, d.name)
			var ok string
			if err := r.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil {
				t.Fatalf("%s: %s: integrity_check: %v", n.Name, d.name, err)
			} else if ok != "ok" {
				t.Fatalf("%s: %s: integrity_check: got %q, want \"ok\"", n.Name, d.name, ok)
			}
			got := summarize(t, r)
			if got.schema != want.schema {
				t.Fatalf("%s: %s: got schema\n%s\nwant the primary's\n%s", n.Name, d.name, got.schema, want.schema)
			}
			if !maps.Equal(got.rows, want.rows) {
				t.Fatalf("%s: %s: got row counts %v, want the primary's %v", n.Name, d.name, got.rows, want.rows)
			}
			_ = r.Close()
		}
		t.Logf("%s: %d replicas equal to the primary (sha256 %.16s…, rows %v)", d.name, len(c.Nodes)-1, wantSum, want.rows)
	}
}

// openOnReplica opens db through n's mount as an unchanged app would, with
// no journal mode forced, on one connection closed at cleanup.
func openOnReplica(t *testing.T, n *testingutil.ClusterNode, db string) *sql.DB {
	t.Helper()
	r, err := sql.Open("sqlite3", "file:"+filepath.Join(n.MountDir, db)+"?_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	r.SetMaxOpenConns(1)
	t.Cleanup(func() { _ = r.Close() })
	return r
}

// dbSummary is what a reader sees of a database: its schema and the row
// count of each table.
type dbSummary struct {
	schema string
	rows   map[string]int64
}

func summarize(t *testing.T, db *sql.DB) dbSummary {
	t.Helper()
	s := dbSummary{rows: make(map[string]int64)}
	rows, err := db.Query(`SELECT type, name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name`)
	if err != nil {
		t.Fatal(err)
	}
	var tables []string
	var schema strings.Builder
	for rows.Next() {
		var typ, name, sql string
		if err := rows.Scan(&typ, &name, &sql); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&schema, "%s %s: %s\n", typ, name, sql)
		if typ == "table" {
			tables = append(tables, name)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	_ = rows.Close()
	s.schema = schema.String()
	for _, name := range tables {
		var n int64
		if err := db.QueryRow(fmt.Sprintf(`SELECT count(*) FROM %q`, name)).Scan(&n); err != nil {
			t.Fatal(err)
		}
		s.rows[name] = n
	}
	return s
}

// checkReadOnly checks that db on replica n, at position pos, refuses
// writes: through SQLite, and by opening the file for writing (EROFS or
// EACCES), and that it is unchanged after both.
func checkReadOnly(t *testing.T, n *testingutil.ClusterNode, db string, pos ltx.Pos) {
	t.Helper()
	sum := testingutil.DatabaseSHA256(t, n.BackingFile(db))
	r := openOnReplica(t, n, db)
	if _, err := r.Exec(`CREATE TABLE written_on_replica (x)`); err == nil {
		t.Fatalf("%s: %s: CREATE TABLE through the replica's mount: got no error, want the write refused", n.Name, db)
	} else {
		t.Logf("%s: %s: a write through SQLite fails: %v", n.Name, db, err)
	}
	_ = r.Close()
	path := filepath.Join(n.MountDir, db)
	if f, err := os.OpenFile(path, os.O_WRONLY, 0); err == nil {
		_ = f.Close()
		t.Fatalf("%s: open %s for writing: got no error, want EROFS or EACCES", n.Name, path)
	} else if !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
		t.Fatalf("%s: open %s for writing: got %v, want EROFS or EACCES", n.Name, path, err)
	}
	if got, _ := n.Pos(t, db); got != pos {
		t.Fatalf("%s: %s after the refused writes: got position %v, want %v", n.Name, db, got, pos)
	}
	if got := testingutil.DatabaseSHA256(t, n.BackingFile(db)); got != sum {
		t.Fatalf("%s: %s after the refused writes: backing file changed (sha256 %s, was %s)", n.Name, db, got, sum)
	}
}

// checkCreateRefused checks that n's mount refuses to create a database.
func checkCreateRefused(t *testing.T, n *testingutil.ClusterNode) {
	t.Helper()
	path := filepath.Join(n.MountDir, "new.db")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err == nil {
		_ = f.Close()
		t.Fatalf("%s: create %s: got no error, want EROFS or EACCES", n.Name, path)
	} else if !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
		t.Fatalf("%s: create %s: got %v, want EROFS or EACCES", n.Name, path, err)
	}
}

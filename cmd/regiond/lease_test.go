package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/mattn/go-sqlite3"
	"github.com/rs/zerolog"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/internal/testingutil/roles"
	"github.com/meridian-db/meridian/regiond"
)

// leasePrefer is the lease.prefer_regions of TestLease_Failover.
var leasePrefer = []string{"fra", "syd", "iad"}

// TestLease_Failover: three candidates share the lease in a real Consul
// agent. One takes it and the others follow it. Killed with SIGKILL, the
// primary is replaced by the surviving candidate of the most preferred
// region, at a higher epoch, which takes writes; the other survivor
// follows it; the killed node, restarted, follows it too; every row
// written is on every node. Sampled every 20 ms throughout, no two nodes
// ever say they are primary at once.
func TestLease_Failover(t *testing.T) {
	t.Parallel()
	agent, c := consulCluster(t, []testingutil.ClusterNodeSpec{iad, fra, syd}, "prefer_regions: ["+strings.Join(leasePrefer, ", ")+"]")
	c.Start(t)

	first, epoch := waitOnePrimary(t, c, 0)
	c.Primary = first.Name
	t.Logf("%s took the lease at epoch %d", first.Name, epoch)
	mon := monitorRoles(t, c)
	dbs := []struct{ name, mode string }{{"wal.db", "wal"}, {"delete.db", "delete"}}
	rows := 0
	write := func(n *testingutil.ClusterNode, count int) {
		t.Helper()
		for _, d := range dbs {
			db := testingutil.MustOpenSQLite(t, filepath.Join(n.MountDir, d.name), d.mode)
			if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, by TEXT)`); err != nil {
				t.Fatalf("%s on %s: %v", d.name, n.Name, err)
			}
			for i := range count {
				if _, err := db.Exec(`INSERT INTO t (id, by) VALUES (?, ?)`, rows+i+1, n.Name); err != nil {
					t.Fatalf("%s on %s, row %d: %v", d.name, n.Name, rows+i+1, err)
				}
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
		}
		rows += count
	}
	names := []string{dbs[0].name, dbs[1].name}
	write(first, 20)
	c.WaitCaughtUp(t, time.Minute, names...)

	killed := time.Now()
	first.Kill(t)
	var survivors []*testingutil.ClusterNode
	for _, n := range c.Nodes {
		if n != first {
			survivors = append(survivors, n)
		}
	}
	next, nextEpoch := waitOnePrimary(t, c, epoch)
	took := time.Since(killed)
	want := slices.MinFunc(survivors, func(a, b *testingutil.ClusterNode) int {
		return slices.Index(leasePrefer, a.Region) - slices.Index(leasePrefer, b.Region)
	})
	if next != want {
		t.Errorf("%s took the lease after %s died, want %s, of the most preferred region of %v", next.Name, first.Name, want.Name, leasePrefer)
	}
	t.Logf("%s killed; %s primary at epoch %d %v later (check_ttl 1s, lock_delay 500ms)", first.Name, next.Name, nextEpoch, took.Round(time.Millisecond))
	c.Primary = next.Name
	write(next, 20)
	first.Start(t)
	waitStatus(t, first, func(st regiond.Status) bool {
		return st.Role == regiond.RoleReplica && st.Primary == next.Name && st.Epoch == nextEpoch && st.Ready
	}, "a ready replica of %s at epoch %d", next.Name, nextEpoch)
	c.WaitCaughtUp(t, time.Minute, names...)
	mon.stop(t)

	// The lease as every node read it, and as `regiond status` prints it.
	for _, n := range c.Nodes {
		st := waitStatus(t, n, func(st regiond.Status) bool { return st.Lease != nil && st.Lease.Holder == next.Name },
			"a node that read the lease of %s", next.Name)
		if l := st.Lease; l.Type != regiond.LeaseConsul || l.Consul != agent.URL || l.Key != "meridian/primary" || l.Epoch != nextEpoch || l.Since.IsZero() {
			t.Errorf("%s /status lease: %+v", n.Name, l)
		}
	}
	var stdout, stderr strings.Builder
	if err := Run(context.Background(), []string{"status", "-admin", first.Admin}, &stdout, &stderr); err != nil {
		t.Fatalf("regiond status: %v\n%s", err, stderr.String())
	}
	if want := fmt.Sprintf("lease in Consul (%s, key meridian/primary): %s at epoch %d, as %s has seen it for ", agent.URL, next.Name, nextEpoch, first.Name); !strings.Contains(stdout.String(), want) {
		t.Errorf("regiond status does not say %q:\n%s", want, stdout.String())
	}

	for _, n := range c.Nodes {
		for _, d := range dbs {
			db := openOnReplica(t, n, d.name)
			var count, sum int
			if err := db.QueryRow(`SELECT count(*), coalesce(sum(id), 0) FROM t`).Scan(&count, &sum); err != nil {
				t.Fatalf("%s %s: %v", n.Name, d.name, err)
			}
			if count != rows || sum != rows*(rows+1)/2 {
				t.Errorf("%s %s: %d rows summing to %d, want %d rows summing to %d", n.Name, d.name, count, sum, rows, rows*(rows+1)/2)
			}
			var ok string
			if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
				t.Errorf("%s %s: integrity_check %q, %v", n.Name, d.name, ok, err)
			}
		}
	}
}

// waitOnePrimary is c.WaitOnePrimary with a minute's bound.
func waitOnePrimary(t *testing.T, c *testingutil.Cluster, after uint64) (*testingutil.ClusterNode, uint64) {
	t.Helper()
	return roles.WaitOnePrimary(t, c, after, time.Minute)
}

// roleMonitor samples every running node's role until stopped.
type roleMonitor struct {
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	rounds int
	both   []string // rounds in which two nodes said they were primary
}

// monitorRoles asks every running node for its status every 20 ms.
func monitorRoles(t *testing.T, c *testingutil.Cluster) *roleMonitor {
	ctx, cancel := context.WithCancel(context.Background())
	m := &roleMonitor{cancel: cancel, done: make(chan struct{})}
	nodes := slices.Clone(c.Nodes)
	go func() {
		defer close(m.done)
		for ctx.Err() == nil {
			var primaries []string
			for _, n := range nodes {
				if st, err := roles.Status(n); err == nil && st.Role == regiond.RolePrimary {
					primaries = append(primaries, fmt.Sprintf("%s at epoch %d", st.Node, st.Epoch))
				}
			}
			m.mu.Lock()
			m.rounds++
			if len(primaries) > 1 {
				m.both = append(m.both, strings.Join(primaries, " and "))
			}
			m.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-m.done })
	return m
}

// stop ends the sampling and fails the test if two nodes were ever
// primary at once.
func (m *roleMonitor) stop(t *testing.T) {
	t.Helper()
	m.cancel()
	<-m.done
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.both) > 0 {
		t.Errorf("two primaries at once in %d of %d rounds, e.g. %s", len(m.both), m.rounds, m.both[0])
	}
	t.Logf("roles sampled in %d rounds", m.rounds)
}

// TestLease_PrimaryCutOff: the primary loses its way to Consul (each node
// reaches the agent through a proxy of its own, toxiproxy, and the
// primary's is stopped) while the other nodes keep theirs. It refuses
// writes before Consul can give the lease to another node, which then
// takes it at a higher epoch; never are two nodes primary at once. Once
// it reaches Consul again, the old primary follows the new one, and every
// row written is on every node.
func TestLease_PrimaryCutOff(t *testing.T) {
	t.Parallel()
	agent := testingutil.StartConsul(t)
	upstream := strings.TrimPrefix(agent.URL, "http://")
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	proxies := map[string]*toxiproxy.Proxy{}
	for i := range specs {
		p := toxiproxy.NewProxy(server, specs[i].Name, testingutil.FreeAddr(t), upstream)
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Stop)
		proxies[specs[i].Name] = p
		specs[i].Lease = testingutil.ConsulLease("http://"+p.Listen, "check_ttl: 1s", "lock_delay: 500ms")
	}
	c := testingutil.NewCluster(t, regiondCommand, "", specs...)
	c.Start(t)
	first, epoch := waitOnePrimary(t, c, 0)
	c.Primary = first.Name
	mon := monitorRoles(t, c)
	insertBy(t, first, "before")
	c.WaitCaughtUp(t, time.Minute, "app.db")

	cut := time.Now()
	proxies[first.Name].Stop()
	waitStatus(t, first, func(st regiond.Status) bool { return st.Role == regiond.RoleReplica }, "read-only, cut off from Consul")
	refused := time.Since(cut)
	var next *testingutil.ClusterNode
	var nextEpoch uint64
	deadline := time.Now().Add(time.Minute)
	for next == nil {
		for _, n := range c.Nodes {
			if st, err := roles.Status(n); n != first && err == nil && st.Role == regiond.RolePrimary && st.Epoch > epoch {
				next, nextEpoch = n, st.Epoch
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no node took the lease in a minute after %s was cut off from Consul", first.Name)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%s cut off from Consul: it refused writes %v later; %s primary at epoch %d %v later",
		first.Name, refused.Round(time.Millisecond), next.Name, nextEpoch, time.Since(cut).Round(time.Millisecond))
	old := testingutil.MustOpenSQLite(t, filepath.Join(first.MountDir, "app.db"), "wal")
	var serr sqlite3.Error
	if _, err := old.Exec(`INSERT INTO t (by) VALUES ('cut off')`); !errors.As(err, &serr) || serr.Code != sqlite3.ErrReadonly {
		t.Fatalf("write on %s, cut off from Consul: %v, want SQLite's read-only error", first.Name, err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	insertBy(t, next, "after")

	if err := proxies[first.Name].Start(); err != nil {
		t.Fatal(err)
	}
	if again, e := waitOnePrimary(t, c, epoch); again != next || e != nextEpoch {
		t.Fatalf("once %s reached Consul again, %s was primary at epoch %d, want %s at %d", first.Name, again.Name, e, next.Name, nextEpoch)
	}
	c.Primary = next.Name
	c.WaitCaughtUp(t, time.Minute, "app.db")
	mon.stop(t)
	checkBy(t, c, "before,after")
}

// TestLease_ConsulRestart: the Consul agent dies. The primary, unable to
// renew, refuses writes within the check TTL; the agent comes back with
// nothing (a dev agent keeps no data), and a primary is back within
// seconds, at an epoch above the last one, since every node asks for one
// above what it has seen; every row is on every node.
func TestLease_ConsulRestart(t *testing.T) {
	t.Parallel()
	agent, c := consulCluster(t, []testingutil.ClusterNodeSpec{iad, fra, syd})
	c.Start(t)
	first, epoch := waitOnePrimary(t, c, 0)
	c.Primary = first.Name
	mon := monitorRoles(t, c)
	insertBy(t, first, "before")
	c.WaitCaughtUp(t, time.Minute, "app.db")

	stopped := time.Now()
	agent.Stop(t)
	waitStatus(t, first, func(st regiond.Status) bool { return st.Role == regiond.RoleReplica }, "read-only without Consul")
	t.Logf("Consul stopped: %s refused writes %v later", first.Name, time.Since(stopped).Round(time.Millisecond))
	time.Sleep(time.Second)
	for _, n := range c.Nodes {
		if st := adminStatus(t, n); st.Role == regiond.RolePrimary {
			t.Errorf("%s is primary at epoch %d while Consul is away", n.Name, st.Epoch)
		}
	}
	restarted := time.Now()
	agent.Restart(t)
	next, nextEpoch := waitOnePrimary(t, c, epoch)
	t.Logf("Consul restarted: %s primary at epoch %d %v later", next.Name, nextEpoch, time.Since(restarted).Round(time.Millisecond))
	c.Primary = next.Name
	insertBy(t, next, "after")
	c.WaitCaughtUp(t, time.Minute, "app.db")
	mon.stop(t)
	checkBy(t, c, "before,after")
}

// TestLease_FailoverSync: with durability: sync (one replica's
// acknowledgement per commit), a client writes to whichever node is
// primary without pause, while the primary is killed with SIGKILL ten
// times, each time restarted as a replica. Every write the client saw
// acknowledged is on every node at the end, the nodes converge, and no
// two are ever primary at once. In rollback-journal mode: in WAL mode a
// COMMIT waiting for its acknowledgement when regiond alone is killed
// returns success (SQLite cannot fail a commit past the wal-index; see
// README, "Failover with Consul").
func TestLease_FailoverSync(t *testing.T) {
	t.Parallel()
	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	for i := range specs {
		specs[i].Replication = []string{"durability: sync", "sync_acks: 1"}
	}
	_, c := consulCluster(t, specs)
	c.Start(t)
	primary, epoch := waitOnePrimary(t, c, 0)
	c.Primary = primary.Name
	db := testingutil.MustOpenSQLite(t, filepath.Join(primary.MountDir, "sync.db"), "delete")
	if _, err := db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	c.WaitCaughtUp(t, time.Minute, "sync.db")
	mon := monitorRoles(t, c)

	var (
		mu      sync.Mutex
		target  = primary // where the client writes
		acked   []int
		ackedBy = map[int]string{} // node and time of each acknowledged write
		failed  int
		events  []string // kills and new primaries, timed
	)
	began := time.Now()
	note := func(format string, args ...any) {
		mu.Lock()
		events = append(events, fmt.Sprintf("%v ", time.Since(began).Round(time.Millisecond))+fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	ctx, stop := context.WithCancel(context.Background())
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		for id := 1; ctx.Err() == nil; id++ {
			mu.Lock()
			n := target
			mu.Unlock()
			err := insertRow(n, id)
			mu.Lock()
			if err == nil {
				acked = append(acked, id)
				ackedBy[id] = fmt.Sprintf("%s at %v", n.Name, time.Since(began).Round(time.Millisecond))
			} else {
				failed++
			}
			mu.Unlock()
			if err != nil {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}()
	defer func() { stop(); <-writerDone }()

	const kills = 10
	for range kills {
		time.Sleep(300 * time.Millisecond) // writes go on
		note("kill %s (epoch %d)", primary.Name, epoch)
		primary.Kill(t)
		next, e := waitOnePrimary(t, c, epoch)
		note("%s primary at epoch %d", next.Name, e)
		mu.Lock()
		target = next
		mu.Unlock()
		primary.Start(t)
		// The restarted node follows the new primary before the next kill.
		primary, epoch = waitOnePrimary(t, c, e-1)
		if primary != next || epoch != e {
			t.Fatalf("%s primary at epoch %d after the restart, want %s at %d", primary.Name, epoch, next.Name, e)
		}
	}
	time.Sleep(300 * time.Millisecond)
	stop()
	<-writerDone
	c.Primary = primary.Name
	c.WaitCaughtUp(t, time.Minute, "sync.db")
	mon.stop(t)
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d kills; the client had %d writes acknowledged and %d fail; final epoch %d", kills, len(acked), failed, epoch)
	if len(acked) < kills {
		t.Fatalf("only %d writes acknowledged", len(acked))
	}
	for _, n := range c.Nodes {
		db := openOnReplica(t, n, "sync.db")
		have := map[int]bool{}
		rows, err := db.Query(`SELECT id FROM t`)
		if err != nil {
			t.Fatalf("%s: %v", n.Name, err)
		}
		for rows.Next() {
			var id int
			if err := rows.Scan(&id); err != nil {
				t.Fatal(err)
			}
			have[id] = true
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		var missing []int
		for _, id := range acked {
			if !have[id] {
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			var by []string
			for _, id := range missing[:min(5, len(missing))] {
				by = append(by, fmt.Sprintf("%d by %s", id, ackedBy[id]))
			}
			t.Errorf("%s lacks %d acknowledged writes, e.g. %s; events:\n%s", n.Name, len(missing), strings.Join(by, ", "), strings.Join(events, "\n"))
		}
		var ok string
		if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
			t.Errorf("%s: integrity_check %q, %v", n.Name, ok, err)
		}
	}
}

// insertRow writes row id into sync.db on n's mount, on a connection of
// its own. The database must exist (mode=rw): a node killed a moment ago
// has no mount, and a write would otherwise create a database in the
// empty directory under it.
func insertRow(n *testingutil.ClusterNode, id int) error {
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(n.MountDir, "sync.db")+"?mode=rw&_busy_timeout=2000")
	if err != nil {
		return err
	}
	defer db.Close()
	_, err = db.Exec(`INSERT INTO t VALUES (?)`, id)
	return err
}

// TestLease_MostCaughtUpWins: with durability: sync and sync_acks: 1, a
// commit may be on one replica only when the primary dies. Here fra-1,
// the most preferred region, is stopped while the primary commits, so
// only syd-1 acknowledges; the primary is killed and fra-1 started again.
// fra-1 sees syd-1 further ahead and leaves it the lease, so every
// acknowledged commit survives; without that check fra-1, first to try,
// would take it and lose them.
func TestLease_MostCaughtUpWins(t *testing.T) {
	t.Parallel()
	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	for i := range specs {
		specs[i].Replication = []string{"durability: sync", "sync_acks: 1"}
	}
	_, c := consulCluster(t, specs, "prefer_regions: [fra, syd, iad]")
	first, lagging, ahead := c.Node(iad.Name), c.Node(fra.Name), c.Node(syd.Name)
	first.Start(t) // alone, so that it takes the lease
	if p, _ := waitOnePrimary(t, c, 0); p != first {
		t.Fatalf("%s took the lease, want %s", p.Name, first.Name)
	}
	lagging.Start(t)
	ahead.Start(t)
	_, epoch := waitOnePrimary(t, c, 0)
	c.Primary = first.Name
	db := testingutil.MustOpenSQLite(t, filepath.Join(first.MountDir, "app.db"), "wal")
	if _, err := db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	c.WaitCaughtUp(t, time.Minute, "app.db")

	if err := lagging.Stop(); err != nil {
		t.Fatal(err)
	}
	const rows = 20
	for id := 1; id <= rows; id++ {
		if _, err := db.Exec(`INSERT INTO t VALUES (?)`, id); err != nil {
			t.Fatalf("row %d: %v", id, err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	first.Kill(t)
	lagging.Start(t)
	next, nextEpoch := waitOnePrimary(t, c, epoch)
	if next != ahead {
		t.Errorf("%s took the lease at epoch %d, want %s, which acknowledged the last commits", next.Name, nextEpoch, ahead.Name)
	}
	c.Primary = next.Name
	first.Start(t)
	c.WaitCaughtUp(t, time.Minute, "app.db")
	for _, n := range c.Nodes {
		var count int
		if err := openOnReplica(t, n, "app.db").QueryRow(`SELECT count(*) FROM t`).Scan(&count); err != nil || count != rows {
			t.Errorf("%s: %d rows, %v; want the %d acknowledged", n.Name, count, err, rows)
		}
	}
}

// insertBy writes a row saying by into app.db (WAL) on n's mount, making
// the table if needed.
func insertBy(t *testing.T, n *testingutil.ClusterNode, by string) {
	t.Helper()
	db := testingutil.MustOpenSQLite(t, filepath.Join(n.MountDir, "app.db"), "wal")
	if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, by TEXT); INSERT INTO t (by) VALUES (?)`, by); err != nil {
		t.Fatalf("write on %s: %v", n.Name, err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

// checkBy checks that every node's app.db has the rows insertBy wrote, in
// order: want, comma-separated.
func checkBy(t *testing.T, c *testingutil.Cluster, want string) {
	t.Helper()
	for _, n := range c.Nodes {
		var rows string
		if err := openOnReplica(t, n, "app.db").QueryRow(`SELECT group_concat(by, ',') FROM t`).Scan(&rows); err != nil || rows != want {
			t.Errorf("%s: rows %q, %v; want %s", n.Name, rows, err, want)
		}
	}
}

// consulCluster starts a Consul agent and makes a cluster of specs on its
// lease (check_ttl 1s, lock_delay 500ms, and extra keys), not started.
func consulCluster(t *testing.T, specs []testingutil.ClusterNodeSpec, extra ...string) (*testingutil.Consul, *testingutil.Cluster) {
	t.Helper()
	agent := testingutil.StartConsul(t)
	c := testingutil.NewCluster(t, regiondCommand, "", specs...)
	c.UseConsul(agent.URL, append([]string{"check_ttl: 1s", "lock_delay: 500ms"}, extra...)...)
	return agent, c
}

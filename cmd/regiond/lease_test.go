package main

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/hashicorp/consul/api"
	"github.com/mattn/go-sqlite3"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/internal/testingutil/roles"
	"github.com/meridian-db/meridian/lease/consul"
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
	c, proxies := proxiedConsulCluster(t)
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

// proxiedConsulCluster makes a cluster of iad-1, fra-1 and syd-1 (not
// started) on the lease of a Consul agent (check_ttl 1s, lock_delay
// 500ms) that each node reaches through a proxy of its own, by node name.
func proxiedConsulCluster(t *testing.T) (*testingutil.Cluster, map[string]*toxiproxy.Proxy) {
	t.Helper()
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
	return testingutil.NewCluster(t, regiondCommand, "", specs...), proxies
}

// TestLease_ConsulUnreachableAtStart: the nodes start while none of them
// can reach Consul. Each mounts and serves reads, read-only and following
// no one, says in /readyz that the lease has not been read and in its log
// which address it could not reach; once Consul answers, one of them
// takes the lease and the others follow it.
func TestLease_ConsulUnreachableAtStart(t *testing.T) {
	t.Parallel()
	c, proxies := proxiedConsulCluster(t)
	for _, p := range proxies {
		p.Stop()
	}
	c.Start(t)
	time.Sleep(2 * time.Second) // a few check TTLs: nothing changes while Consul is away
	for _, n := range c.Nodes {
		st := adminStatus(t, n)
		if st.Role == regiond.RolePrimary || st.Ready {
			t.Errorf("%s, Consul unreachable: role %s, ready %v, want a read-only node, not ready", n.Name, st.Role, st.Ready)
		}
		code, body, err := n.AdminGet("/readyz")
		want := "the lease in Consul at http://" + proxies[n.Name].Listen + " has not been read yet"
		if err != nil || code != http.StatusServiceUnavailable || !strings.Contains(string(body), want) {
			t.Errorf("%s /readyz, Consul unreachable: %d %q (%v), want 503 saying %q", n.Name, code, body, err, want)
		}
		if log := n.Log(); !strings.Contains(log, proxies[n.Name].Listen) {
			t.Errorf("%s's log does not name the Consul address it could not reach, %s:\n%s", n.Name, proxies[n.Name].Listen, n.LogTail(4<<10))
		}
		db := openOnReplica(t, n, "app.db")
		if _, err := db.Exec(`CREATE TABLE t (by TEXT)`); err == nil {
			t.Errorf("%s, Consul unreachable, took a write", n.Name)
		}
	}
	for _, p := range proxies {
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
	}
	reached := time.Now()
	primary, epoch := waitOnePrimary(t, c, 0)
	t.Logf("Consul reachable: %s primary at epoch %d %v later", primary.Name, epoch, time.Since(reached).Round(time.Millisecond))
	c.Primary = primary.Name
	for _, n := range c.Nodes {
		if n != primary {
			waitStatus(t, n, func(st regiond.Status) bool {
				return st.Role == regiond.RoleReplica && st.Primary == primary.Name && st.Epoch == epoch
			}, "a replica of %s at epoch %d", primary.Name, epoch)
		}
	}
	insertBy(t, primary, "after")
	c.WaitCaughtUp(t, time.Minute, "app.db")
	checkBy(t, c, "after")
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
// two are ever primary at once. In rollback-journal mode, and in WAL
// mode (synchronous=FULL), where the commit waits at the writer's fsync,
// before SQLite's commit point.
func TestLease_FailoverSync(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"delete", "wal"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			testFailoverSync(t, mode)
		})
	}
}

func testFailoverSync(t *testing.T, mode string) {
	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	for i := range specs {
		specs[i].Replication = []string{"durability: sync", "sync_acks: 1"}
	}
	_, c := consulCluster(t, specs)
	c.Start(t)
	primary, epoch := waitOnePrimary(t, c, 0)
	c.Primary = primary.Name
	createSyncDB(t, c, primary, mode)
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
		have := rowIDs(t, db)
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

// TestLease_PausedPrimary: the replicas are killed, so that the primary
// commits for a moment transactions no replica receives, and then the
// primary is paused (SIGSTOP) for longer than the check TTL while four
// clients (a process of their own, as apps are) write to it in
// rollback-journal mode; the replicas, started again, take the lease. The
// paused node's link to Consul turns slow at the same time (3 s of latency
// on every answer), so once continued (SIGCONT) its lease loop takes a
// moment to learn the lease is gone (a renewal that times out). In that
// moment the old primary commits none of the writes that waited on it:
// the write deadline its last renewal set has passed. So every write the
// clients saw acknowledged was committed before the pause (its /events
// says when), even those whose last request, the unlock after the commit,
// returned after it. It then follows the new primary, and the writes it
// acknowledged while alone, which the new primary lacks, are in a set of
// its transactions kept under data_dir/lost/.
func TestLease_PausedPrimary(t *testing.T) {
	t.Parallel()
	c, proxies := proxiedConsulCluster(t)
	c.Start(t)
	first, epoch := waitOnePrimary(t, c, 0)
	c.Primary = first.Name
	createSyncDB(t, c, first, "delete")
	events := watchEvents(t, first)
	started := time.Now()
	w := startWriters(t, 4, filepath.Join(first.MountDir, "sync.db"))

	pid := first.Pid()
	var resumeOnce sync.Once
	resume := func() {
		resumeOnce.Do(func() {
			if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
				t.Errorf("continue %s: %v", first.Name, err)
			}
		})
	}
	// The writers wait on the paused node's mount: continue it before
	// waiting for them, whatever ends the test, and after 30 s in any
	// case (a test binary past its timeout runs no deferred call).
	defer resume()
	watchdog := time.AfterFunc(30*time.Second, resume)
	defer watchdog.Stop()

	time.Sleep(300 * time.Millisecond)
	var others []*testingutil.ClusterNode
	for _, n := range c.Nodes {
		if n != first {
			others = append(others, n)
			n.Kill(t)
		}
	}
	alone := time.Now()
	time.Sleep(300 * time.Millisecond)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// The node runs on until it takes the signal, and may commit
	// meanwhile: the pause begins once it is stopped.
	stoppedNow := make(chan error, 1)
	go func() {
		var info unix.Siginfo
		stoppedNow <- unix.Waitid(unix.P_PID, pid, &info, unix.WSTOPPED|unix.WNOWAIT, nil)
	}()
	select {
	case err := <-stoppedNow:
		if err != nil {
			t.Fatalf("wait for %s to stop: %v", first.Name, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not stop in 10 s after SIGSTOP", first.Name)
	}
	paused := time.Now()
	slow := `{"name": "slow", "type": "latency", "stream": "downstream", "attributes": {"latency": 3000}}`
	if _, err := proxies[first.Name].Toxics.AddToxicJson(strings.NewReader(slow)); err != nil {
		t.Fatal(err)
	}
	for _, n := range others {
		n.Start(t)
	}
	var primary *testingutil.ClusterNode
	var nextEpoch uint64
	for primary == nil {
		for _, n := range others {
			if st, err := roles.Status(n); err == nil && st.Role == regiond.RolePrimary && st.Epoch > epoch {
				primary, nextEpoch = n, st.Epoch
			}
		}
		if time.Since(paused) > 20*time.Second {
			t.Fatalf("no node took the lease in 20 s after %s was paused", first.Name)
		}
		time.Sleep(20 * time.Millisecond)
	}
	took := time.Since(paused)
	time.Sleep(500 * time.Millisecond) // the old primary stays paused past the takeover
	continued := time.Now()
	resume()
	waitStatus(t, first, func(st regiond.Status) bool { return st.Role == regiond.RoleReplica }, "stepped down")
	steppedDown := time.Since(continued)
	if err := proxies[first.Name].Toxics.RemoveToxic(context.Background(), "slow"); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, first, func(st regiond.Status) bool {
		return st.Role == regiond.RoleReplica && st.Primary == primary.Name && st.Epoch == nextEpoch
	}, "a replica of %s at epoch %d", primary.Name, nextEpoch)
	t.Logf("%s alone from %v, paused; %s primary at epoch %d %v later; %s continued %v after the pause, stepped down %v after that",
		first.Name, alone.Sub(started).Round(time.Millisecond), primary.Name, nextEpoch, took.Round(time.Millisecond), first.Name, continued.Sub(paused).Round(time.Millisecond), steppedDown.Round(time.Millisecond))
	time.Sleep(200 * time.Millisecond) // writes meet the node as a replica too
	results := w.stop(t)
	c.Primary = primary.Name
	c.WaitCaughtUp(t, time.Minute, "sync.db")

	// Each write is a transaction of its own: as many were committed
	// before the pause as were acknowledged, at least.
	var acked []int
	ackedAlone, ackedAfter, failedAfter := 0, 0, 0
	for _, r := range results {
		switch {
		case r.err == "":
			acked = append(acked, r.id)
			if r.end.After(alone) {
				ackedAlone++
			}
			if r.end.After(continued) {
				ackedAfter++
			}
		case r.end.After(continued):
			failedAfter++
		}
	}
	before, afterPause := 0, 0
	for _, ev := range events() {
		switch {
		case ev.Type != regiond.EventCommit || ev.DB != "sync.db" || ev.Time.Before(started):
		case ev.Time.Before(paused):
			before++
		default:
			afterPause++
		}
	}
	t.Logf("%d writes acknowledged, %d while %s was alone, %d once it was continued; %d failed then; %d commits before the pause, %d after",
		len(acked), ackedAlone, first.Name, ackedAfter, failedAfter, before, afterPause)
	if len(acked) > before {
		t.Errorf("%s acknowledged %d writes but committed %d before the pause: it committed writes after its lease ran out", first.Name, len(acked), before)
	}
	if ackedAlone == 0 || failedAfter == 0 {
		t.Fatalf("%d writes acknowledged while %s was alone, %d failed once it was continued: want some of each", ackedAlone, first.Name, failedAfter)
	}

	// The writes acknowledged while the primary was alone are on no other
	// node: each acknowledged write the new primary lacks is in a lost set.
	have := rowIDs(t, openOnReplica(t, primary, "sync.db"))
	var missing []int
	for _, id := range acked {
		if !have[id] {
			missing = append(missing, id)
		}
	}
	if len(missing) == 0 {
		t.Fatalf("%s has every write acknowledged by %s, those of the %v it was alone too", primary.Name, first.Name, paused.Sub(alone).Round(time.Millisecond))
	}
	lost := map[int]bool{}
	sets, _ := os.ReadDir(filepath.Join(first.DataDir, "lost", "sync.db"))
	for _, set := range sets {
		out := filepath.Join(t.TempDir(), "lost.db")
		var stdout, stderr strings.Builder
		if err := Run(context.Background(), []string{"ltx", "restore", "-o", out, filepath.Join(first.DataDir, "lost", "sync.db", set.Name())}, &stdout, &stderr); err != nil {
			t.Fatalf("restore lost set %s: %v\n%s", set.Name(), err, stderr.String())
		}
		lostDB, err := sql.Open("sqlite3", "file:"+out+"?mode=ro")
		if err != nil {
			t.Fatal(err)
		}
		for id := range rowIDs(t, lostDB) {
			lost[id] = true
		}
		_ = lostDB.Close()
	}
	for _, id := range missing {
		if !lost[id] {
			t.Errorf("write %d, acknowledged by %s, is neither on %s nor in %s's lost sets (%d sets)", id, first.Name, primary.Name, first.Name, len(sets))
		}
	}
	t.Logf("%d acknowledged writes were not on %s: all in %s's lost sets (%d)", len(missing), primary.Name, first.Name, len(sets))
}

// writersEnv makes the test binary a writer process (runWriters). Apps
// are processes of their own, and a test process cannot start a node
// while its threads wait on a paused node's mount: its fork waits for
// them.
const writersEnv = "MERIDIAN_TEST_WRITERS"

// writeResult is one write of a writer process: the row's id, when the
// INSERT returned, and its error ("" if none).
type writeResult struct {
	id  int
	end time.Time
	err string
}

// writers is a writer process started by startWriters.
type writers struct {
	cmd   *exec.Cmd
	stdin io.Closer
	mu    sync.Mutex
	got   []writeResult
	read  chan error
}

// startWriters starts a writer process in which n clients insert rows
// with ids 1, 2, ... into table t of the database at path, each write
// on a connection of its own (insertRowAt), until stop. With several
// paths (on the mounts of several nodes), each write goes to the first
// whose database exists and whose mount has no .primary file: the
// primary's.
func startWriters(t *testing.T, n int, paths ...string) *writers {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d %s", writersEnv, n, strings.Join(paths, ",")))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w := &writers{cmd: cmd, stdin: stdin, read: make(chan error, 1)}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-w.read
		_ = cmd.Wait()
	})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var r writeResult
			var end int64
			id, rest, _ := strings.Cut(sc.Text(), " ")
			endText, msg, _ := strings.Cut(rest, " ")
			var err error
			if r.id, err = strconv.Atoi(id); err == nil {
				end, err = strconv.ParseInt(endText, 10, 64)
			}
			if err != nil {
				w.read <- fmt.Errorf("writer process: line %q: %v", sc.Text(), err)
				return
			}
			r.end = time.Unix(0, end)
			if msg != "ok" {
				r.err = msg
			}
			w.mu.Lock()
			w.got = append(w.got, r)
			w.mu.Unlock()
		}
		w.read <- sc.Err()
	}()
	return w
}

// stop tells the writers to stop, waits up to a minute for their writes
// under way to end and returns every write's result.
func (w *writers) stop(t *testing.T) []writeResult {
	t.Helper()
	if err := w.stdin.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-w.read:
		w.read <- err // for the cleanup
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the writer process did not end its writes in a minute")
	}
	if err := w.cmd.Wait(); err != nil {
		t.Fatalf("writer process: %v", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.got) == 0 {
		t.Fatal("the writer process made no write")
	}
	return w.got
}

// runWriters is the writer process (startWriters): spec is "N PATH" or
// "N PATH,PATH...". Each write prints "ID END_UNIX_NANO ok" or
// "ID END_UNIX_NANO ERROR".
func runWriters(spec string) {
	nText, pathList, _ := strings.Cut(spec, " ")
	n, err := strconv.Atoi(nText)
	paths := strings.Split(pathList, ",")
	if err != nil || pathList == "" {
		fmt.Fprintf(os.Stderr, "%s=%q: want \"N PATH[,PATH...]\"\n", writersEnv, spec)
		os.Exit(2)
	}
	primaryPath := func() string {
		if len(paths) == 1 {
			return paths[0]
		}
		for {
			for _, p := range paths {
				// (A stopped node's mount directory has neither.)
				if _, err := os.Stat(p); err != nil {
					continue
				}
				if _, err := os.Stat(filepath.Join(filepath.Dir(p), ".primary")); errors.Is(err, os.ErrNotExist) {
					return p
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	ctx, stop := context.WithCancel(context.Background())
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		stop()
	}()
	var (
		mu   sync.Mutex
		next atomic.Int64
		wg   sync.WaitGroup
	)
	out := bufio.NewWriter(os.Stdout)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				path := primaryPath()
				id := int(next.Add(1))
				var end time.Time
				err := insertRowAt(path, id, func() { end = time.Now() })
				msg := "ok"
				if err != nil {
					msg = strings.ReplaceAll(err.Error(), "\n", " ")
				}
				mu.Lock()
				fmt.Fprintf(out, "%d %d %s\n", id, end.UnixNano(), msg)
				_ = out.Flush()
				mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	os.Exit(0)
}

// createSyncDB creates sync.db, in journal mode mode, with an empty table
// t of ids, on primary's mount, and waits until c's nodes have it.
func createSyncDB(t *testing.T, c *testingutil.Cluster, primary *testingutil.ClusterNode, mode string) {
	t.Helper()
	db := testingutil.MustOpenSQLite(t, filepath.Join(primary.MountDir, "sync.db"), mode)
	if _, err := db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	c.WaitCaughtUp(t, time.Minute, "sync.db")
}

// rowIDs returns the ids of the rows of table t of db.
func rowIDs(t *testing.T, db *sql.DB) map[int]bool {
	t.Helper()
	rows, err := db.Query(`SELECT id FROM t`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	have := map[int]bool{}
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
	return have
}

// insertRow writes row id into sync.db on n's mount, on a connection of
// its own. The database must exist (mode=rw): a node killed a moment ago
// has no mount, and a write would otherwise create a database in the
// empty directory under it.
func insertRow(n *testingutil.ClusterNode, id int) error {
	return insertRowThen(n, id, func() {})
}

// insertRowThen is insertRow, calling done as soon as the INSERT returns:
// before the connection is closed, which is another request to the mount.
func insertRowThen(n *testingutil.ClusterNode, id int, done func()) error {
	return insertRowAt(filepath.Join(n.MountDir, "sync.db"), id, done)
}

// insertRowAt is insertRowThen for the database at path.
func insertRowAt(path string, id int, done func()) error {
	db, err := sql.Open("sqlite3", "file:"+path+"?mode=rw&_busy_timeout=2000&_synchronous=FULL")
	if err != nil {
		done()
		return err
	}
	defer db.Close()
	_, err = db.Exec(`INSERT INTO t VALUES (?)`, id)
	done()
	return err
}

// TestLease_ACL: a Consul agent with ACLs on, denied by default. iad-1's
// token may read the lease key but not write it; fra-1's and syd-1's have
// the rules of consul.ACLPolicy. iad-1, a candidate started alone, tries
// the free lease and says why it cannot take it, naming the key and the
// setting that gives the token; once the others run it never becomes
// primary and follows the one that does, and when that one is killed the
// other node with a good token takes over.
func TestLease_ACL(t *testing.T) {
	t.Parallel()
	agent := testingutil.StartConsulACL(t)
	tokenFile := func(name, rules string) string {
		t.Helper()
		path := filepath.Join(t.TempDir(), name+".token")
		if err := os.WriteFile(path, []byte(agent.ACLToken(t, name, rules)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	const key = "meridian/primary"
	readOnly := tokenFile("read", strings.Replace(consul.ACLPolicy(key), `policy = "write"`, `policy = "read"`, 1))
	full := tokenFile("lease", consul.ACLPolicy(key))
	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	for i := range specs {
		file := full
		if specs[i].Name == "iad-1" {
			file = readOnly
		}
		specs[i].Lease = testingutil.ConsulLease(agent.URL, "check_ttl: 1s", "lock_delay: 500ms", "consul_token_file: "+file)
	}
	c := testingutil.NewCluster(t, regiondCommand, "", specs...)
	// iad-1 alone first: the lease is free, so it tries to take it.
	bad := c.Node("iad-1")
	bad.Start(t)
	const want = `lacks permission 'key:write' on \"meridian/primary\" (Consul refused the ACL token: the lease needs a token with write on key \"meridian/primary\"`
	waitLog := func() {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(bad.Log(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("%s's log does not say %q:\n%s", bad.Name, want, bad.LogTail(4000))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitLog()
	if !strings.Contains(bad.Log(), "lease.consul_token_file or CONSUL_HTTP_TOKEN") {
		t.Errorf("%s's log does not say which setting gives the token", bad.Name)
	}
	for _, n := range c.Nodes {
		if n != bad {
			n.Start(t)
		}
	}
	first, epoch := waitOnePrimary(t, c, 0)
	mon := monitorRoles(t, c)
	if first == bad {
		t.Fatalf("%s took the lease with a token that cannot write %s", bad.Name, key)
	}

	first.Kill(t)
	next, nextEpoch := waitOnePrimary(t, c, epoch)
	if next == bad {
		t.Fatalf("%s took the lease with a token that cannot write %s", bad.Name, key)
	}
	t.Logf("%s primary at epoch %d, then %s at %d; %s, whose token cannot write the key, follows", first.Name, epoch, next.Name, nextEpoch, bad.Name)
	mon.stop(t)
}

// TestLease_ForeignValue: another program overwrites the lease key's value
// with something that is not a lease, while the primary holds it. The
// primary keeps the lease (its session still locks the key); the other
// nodes say what is wrong with the key, naming it, and take nothing.
// Killed, the primary's session ends and leaves the foreign value behind,
// unlocked: a candidate takes the lease at an epoch above the last one,
// which it remembers itself, and the nodes follow it.
func TestLease_ForeignValue(t *testing.T) {
	t.Parallel()
	agent, c := consulCluster(t, []testingutil.ClusterNodeSpec{iad, fra, syd})
	c.Start(t)
	first, epoch := waitOnePrimary(t, c, 0)
	mon := monitorRoles(t, c)
	client, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(agent.URL, "http://")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.KV().Put(&api.KVPair{Key: "meridian/primary", Value: []byte("leader=iad-1")}, nil); err != nil {
		t.Fatal(err)
	}
	const want = `key meridian/primary is held by session`
	deadline := time.Now().Add(10 * time.Second)
	for _, n := range c.Nodes {
		if n == first {
			continue
		}
		for !strings.Contains(n.Log(), want) || !strings.Contains(n.Log(), `lease value \"leader=iad-1\"`) {
			if time.Now().After(deadline) {
				t.Fatalf("%s's log does not say %q, with the value:\n%s", n.Name, want, n.LogTail(4000))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	time.Sleep(time.Second) // three renewals of the holder, on the foreign value
	if again, e := waitOnePrimary(t, c, epoch-1); again != first || e != epoch {
		t.Fatalf("%s primary at epoch %d after the value was overwritten, want %s at %d", again.Name, e, first.Name, epoch)
	}

	first.Kill(t)
	next, nextEpoch := waitOnePrimary(t, c, epoch)
	t.Logf("%s primary at epoch %d; the key overwritten and %s killed, %s took the lease at epoch %d", first.Name, epoch, first.Name, next.Name, nextEpoch)
	pair, _, err := client.KV().Get("meridian/primary", nil)
	if err != nil || pair == nil || pair.Session == "" || !strings.Contains(string(pair.Value), `"node":"`+next.Name+`"`) {
		t.Fatalf("the key once %s took the lease: %+v, %v", next.Name, pair, err)
	}
	mon.stop(t)
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

package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/regiond"
)

// handoffs is how many handoffs TestLease_Handoff makes in a row.
const handoffs = 20

// TestLease_Handoff: three candidates on a real Consul agent; a writer
// process (four clients) writes to whichever node is primary while the
// lease is handed from node to node 20 times, through `regiond handoff`
// asked of the primary or of another node, and `regiond promote`. Every
// handoff succeeds; every write acknowledged is on every node at the end;
// a write fails only while a handoff runs (it waited on the old primary);
// by every node's /events, no two nodes ever admitted writes at once; and
// the epoch grows by one per handoff.
func TestLease_Handoff(t *testing.T) {
	for _, tc := range []struct {
		durability, mode string
	}{{"async", "wal"}, {"sync", "wal"}, {"sync", "delete"}} {
		t.Run(tc.durability+"/"+tc.mode, func(t *testing.T) {
			t.Parallel()
			testHandoff(t, tc.durability, tc.mode)
		})
	}
}

func testHandoff(t *testing.T, durability, mode string) {
	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	for i := range specs {
		specs[i].Replication = []string{"durability: " + durability, "sync_acks: 1"}
	}
	_, c := consulCluster(t, specs)
	c.Start(t)
	primary, epoch := waitOnePrimary(t, c, 0)
	c.Primary = primary.Name
	createSyncDB(t, c, primary, mode)
	events, paths := watchNodes(t, c)
	w := startWriters(t, 4, paths...)

	var (
		windows []moveWindow
		held    []float64
	)
	for i := range handoffs {
		time.Sleep(150 * time.Millisecond) // writes go on
		var target, asked *testingutil.ClusterNode
		for _, n := range c.Nodes {
			if n != primary && (target == nil || n.Name == c.Nodes[i%len(c.Nodes)].Name) {
				target = n
			}
		}
		var args []string
		switch i % 3 {
		case 0: // the primary itself
			asked = primary
			args = []string{"handoff", "-json", "-to", target.Name, "-admin", primary.Admin}
		case 1: // the third node, which sends it on to the primary
			for _, n := range c.Nodes {
				if n != primary && n != target {
					asked = n
				}
			}
			args = []string{"handoff", "-json", "-to", target.Name, "-admin", asked.Admin}
		case 2: // the target
			asked = target
			args = []string{"promote", "-json", "-config", target.Config}
		}
		var stdout, stderr strings.Builder
		began := time.Now()
		err := Run(context.Background(), args, &stdout, &stderr)
		windows = append(windows, moveWindow{began, time.Now()})
		if err != nil {
			t.Fatalf("handoff %d, %s to %s asked of %s: %v\n%s", i+1, primary.Name, target.Name, asked.Name, err, stderr.String())
		}
		var res regiond.HandoffResult
		if err := json.Unmarshal([]byte(stdout.String()), &res); err != nil {
			t.Fatalf("handoff %d: %v in %q", i+1, err, stdout.String())
		}
		if res.From != primary.Name || res.To != target.Name || res.Epoch != epoch+1 {
			t.Fatalf("handoff %d: %+v, want from %s to %s at epoch %d", i+1, res, primary.Name, target.Name, epoch+1)
		}
		held = append(held, res.HeldMS)
		if h := adminStatus(t, primary).Handoff; h == nil || h.To != target.Name || h.State != "done" || h.Epoch != res.Epoch {
			t.Fatalf("handoff %d: %s's status says of its last handoff %+v, want done to %s at epoch %d", i+1, primary.Name, h, target.Name, res.Epoch)
		}
		primary, epoch = target, res.Epoch
		c.Primary = primary.Name
	}
	time.Sleep(150 * time.Millisecond)
	results := w.stop(t)
	c.WaitCaughtUp(t, time.Minute, "sync.db")

	acked, failed := checkWrites(t, c, results, windows)
	checkOneWriter(t, c, events, handoffs)
	slices.Sort(held)
	t.Logf("%d handoffs: writes held p50 %.1f ms, max %.1f ms; %d writes acknowledged, each on all %d nodes; %d failed, each during a handoff",
		handoffs, held[len(held)/2], held[len(held)-1], acked, len(c.Nodes), failed)
}

// watchNodes watches the events of every node of c (watchEvents) and
// returns them by node, with the path of sync.db on every node's mount.
func watchNodes(t *testing.T, c *testingutil.Cluster) (map[string]func() []regiond.Event, []string) {
	t.Helper()
	events := map[string]func() []regiond.Event{}
	var paths []string
	for _, n := range c.Nodes {
		events[n.Name] = watchEvents(t, n)
		paths = append(paths, filepath.Join(n.MountDir, "sync.db"))
	}
	return events, paths
}

// moveWindow is when a move of the primary was asked for and when it was
// seen done.
type moveWindow struct{ began, ended time.Time }

// checkWrites checks that every write results says was acknowledged is on
// every node of c, and that each that failed ended during a move of the
// primary (or in the second after it), and returns how many of each there
// were.
func checkWrites(t *testing.T, c *testingutil.Cluster, results []writeResult, moves []moveWindow) (acked, failed int) {
	t.Helper()
	var ids []int
	for _, r := range results {
		if r.err == "" {
			ids = append(ids, r.id)
			continue
		}
		failed++
		if !slices.ContainsFunc(moves, func(w moveWindow) bool { return !r.end.Before(w.began) && !r.end.After(w.ended.Add(time.Second)) }) {
			t.Errorf("write %d failed at %v, outside every move of the primary: %s", r.id, r.end.Format(time.StampMicro), r.err)
		}
	}
	for _, n := range c.Nodes {
		have := rowIDs(t, openOnReplica(t, n, "sync.db"))
		missing := 0
		for _, id := range ids {
			if !have[id] {
				missing++
			}
		}
		if missing > 0 {
			t.Errorf("%s lacks %d of the %d acknowledged writes", n.Name, missing, len(ids))
		}
	}
	return len(ids), failed
}

// checkOneWriter checks, from each node's events, that no two nodes ever
// admitted writes at once, and that the primary moved at least moves
// times.
func checkOneWriter(t *testing.T, c *testingutil.Cluster, events map[string]func() []regiond.Event, moves int) {
	t.Helper()
	type span struct {
		node     string
		from, to time.Time
		epoch    uint64
	}
	var spans []span
	for _, n := range c.Nodes {
		var open *span
		for _, ev := range events[n.Name]() {
			switch {
			case ev.Type == regiond.EventRole && ev.Role == regiond.RolePrimary:
				open = &span{node: n.Name, from: ev.Time, epoch: ev.Epoch}
			case ev.Type == regiond.EventRole && ev.Role == regiond.RoleReplica && open != nil:
				open.to = ev.Time
				spans = append(spans, *open)
				open = nil
			}
		}
		if open != nil {
			open.to = time.Now()
			spans = append(spans, *open)
		}
	}
	slices.SortFunc(spans, func(a, b span) int { return a.from.Compare(b.from) })
	for i := 1; i < len(spans); i++ {
		if a, b := spans[i-1], spans[i]; b.from.Before(a.to) {
			t.Errorf("%s admitted writes from %v (epoch %d) while %s did until %v (epoch %d)",
				b.node, b.from.Format(time.StampMicro), b.epoch, a.node, a.to.Format(time.StampMicro), a.epoch)
		}
	}
	if len(spans) < moves {
		t.Errorf("%d spans as primary in the nodes' events, want at least %d", len(spans), moves)
	}
}

// TestLease_HandoffRefused: a handoff to an unknown node, to a node that
// is not a candidate, or to a candidate that is down is refused with an
// error that says why, and the primary is unchanged and takes writes.
func TestLease_HandoffRefused(t *testing.T) {
	t.Parallel()
	agent := testingutil.StartConsul(t)
	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	for i := range specs {
		extra := []string{"check_ttl: 1s", "lock_delay: 500ms"}
		if specs[i].Name == syd.Name {
			extra = append(extra, "candidate: false")
		}
		specs[i].Lease = testingutil.ConsulLease(agent.URL, extra...)
	}
	c := testingutil.NewCluster(t, regiondCommand, "", specs...)
	c.Start(t)
	primary, epoch := waitOnePrimary(t, c, 0)
	c.Primary = primary.Name
	insertBy(t, primary, "before")
	var down *testingutil.ClusterNode
	for _, n := range c.Nodes {
		if n != primary && n.Name != syd.Name {
			down = n
		}
	}
	down.Kill(t)
	for _, tc := range []struct{ to, want string }{
		{"nowhere-1", "not a node of replication.peers"},
		{syd.Name, "not a candidate"},
		{down.Name, "cannot reach it"},
		{primary.Name, "is the primary already"},
	} {
		var stdout, stderr strings.Builder
		err := Run(context.Background(), []string{"handoff", "-to", tc.to, "-admin", primary.Admin}, &stdout, &stderr)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("handoff -to %s: %v, want an error saying %q", tc.to, err, tc.want)
		}
	}
	st := adminStatus(t, primary)
	if st.Role != regiond.RolePrimary || st.Epoch != epoch {
		t.Fatalf("%s after refused handoffs: %s at epoch %d, want primary at %d", primary.Name, st.Role, st.Epoch, epoch)
	}
	insertBy(t, primary, "after")
	down.Start(t)
	c.WaitCaughtUp(t, time.Minute, "app.db")
	checkBy(t, c, "before,after")
}

// TestLease_HandoffOnStop: SIGTERM of the primary hands the lease off
// before the node exits, to the most caught-up candidate, and among those
// to the one of the most preferred region (lease.prefer_regions: fra, syd,
// iad: fra-1 is primary first, and hands off to syd-1 rather than iad-1),
// while a writer process writes to whichever node is primary. The next
// primary is one epoch up, every write acknowledged is on both remaining
// nodes, and the stopped node, started again, follows and converges.
func TestLease_HandoffOnStop(t *testing.T) {
	t.Parallel()
	_, c := consulCluster(t, []testingutil.ClusterNodeSpec{iad, fra, syd}, "prefer_regions: [fra, syd, iad]")
	c.Start(t)
	primary, epoch := waitOnePrimary(t, c, 0)
	if primary.Name != fra.Name {
		t.Fatalf("%s took the lease first, want %s (the preferred region)", primary.Name, fra.Name)
	}
	c.Primary = primary.Name
	createSyncDB(t, c, primary, "wal")
	var paths []string
	for _, n := range c.Nodes {
		paths = append(paths, filepath.Join(n.MountDir, "sync.db"))
	}
	w := startWriters(t, 4, paths...)
	time.Sleep(300 * time.Millisecond)
	stopped := time.Now()
	if err := primary.Stop(); err != nil {
		t.Fatal(err)
	}
	exited := time.Since(stopped)
	next, nextEpoch := waitOnePrimary(t, c, epoch)
	if next.Name != syd.Name || nextEpoch != epoch+1 {
		t.Fatalf("after SIGTERM of %s, %s is primary at epoch %d; want %s at %d", primary.Name, next.Name, nextEpoch, syd.Name, epoch+1)
	}
	if l := logLine(primary.Log(), "handoff done", "to="+syd.Name); l == "" {
		t.Fatalf("%s did not log a handoff to %s before it exited:\n%s", primary.Name, syd.Name, primary.LogTail(8<<10))
	}
	time.Sleep(300 * time.Millisecond) // writes go on on the next primary
	results := w.stop(t)
	c.Primary = next.Name
	primary.Start(t)
	c.WaitCaughtUp(t, time.Minute, "sync.db")
	var acked []int
	failed, ackedAfter := 0, 0
	for _, r := range results {
		if r.err == "" {
			acked = append(acked, r.id)
			if r.end.After(stopped.Add(exited)) {
				ackedAfter++
			}
		} else {
			failed++
		}
	}
	if ackedAfter == 0 {
		t.Errorf("no write acknowledged after %s exited, want writes to go on on %s", primary.Name, next.Name)
	}
	for _, n := range c.Nodes {
		have := rowIDs(t, openOnReplica(t, n, "sync.db"))
		for _, id := range acked {
			if !have[id] {
				t.Errorf("%s lacks write %d, acknowledged", n.Name, id)
				break
			}
		}
	}
	t.Logf("%s stopped (handed off to %s at epoch %d) %v after SIGTERM; %d writes acknowledged, %d of them after that; %d failed", fra.Name, next.Name, nextEpoch, exited.Round(time.Millisecond), len(acked), ackedAfter, failed)
}

// staticMoves is how many times TestLease_StaticHandoff moves the primary.
const staticMoves = 10

// TestLease_StaticHandoff: with the static lease, a SIGHUP that names a
// new lease.static_primary is a handoff: the old primary holds new writes
// until the new one has every transaction, then steps down, and the new
// one takes over once it sees that. The primary moves round three nodes
// 10 times, the SIGHUPs sent in a different order each time, while a
// writer process writes to whichever node is primary: every write
// acknowledged is on every node, a write fails only during a move, and no
// two nodes ever admitted writes at once.
func TestLease_StaticHandoff(t *testing.T) {
	t.Parallel()
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fra, syd)
	c.Start(t)
	primary := c.Node(iad.Name)
	createSyncDB(t, c, primary, "wal")
	events, paths := watchNodes(t, c)
	w := startWriters(t, 4, paths...)

	var windows []moveWindow
	epoch := uint64(1)
	for i := range staticMoves {
		time.Sleep(150 * time.Millisecond) // writes go on
		to := c.Nodes[(slices.Index(c.Nodes, primary)+1)%len(c.Nodes)]
		c.SetPrimary(to.Name)
		began := time.Now()
		for _, j := range rand.Perm(len(c.Nodes)) {
			c.Nodes[j].Signal(t, syscall.SIGHUP)
		}
		waitStatus(t, to, func(st regiond.Status) bool { return st.Role == regiond.RolePrimary && st.Epoch == epoch+1 },
			"primary at epoch %d (move %d)", epoch+1, i+1)
		windows = append(windows, moveWindow{began, time.Now()})
		waitStatus(t, primary, func(st regiond.Status) bool {
			return st.Handoff != nil && st.Handoff.To == to.Name && st.Handoff.State == "done"
		},
			"done with its handoff to %s (move %d)", to.Name, i+1)
		primary, epoch = to, epoch+1
	}
	time.Sleep(150 * time.Millisecond)
	results := w.stop(t)
	c.WaitCaughtUp(t, time.Minute, "sync.db")
	acked, failed := checkWrites(t, c, results, windows)
	checkOneWriter(t, c, events, staticMoves)
	handedOff := 0
	for _, n := range c.Nodes {
		handedOff += strings.Count(n.Log(), `msg="handoff: stepped down for the static primary"`)
	}
	if handedOff != staticMoves {
		t.Errorf("%d handoffs logged by the old primaries, want %d", handedOff, staticMoves)
	}
	var took []time.Duration
	for _, w := range windows {
		took = append(took, w.ended.Sub(w.began))
	}
	slices.Sort(took)
	t.Logf("%d moves, SIGHUP to the new primary's status: p50 %v, max %v; %d writes acknowledged, each on all %d nodes; %d failed, each during a move",
		staticMoves, took[len(took)/2].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond), acked, len(c.Nodes), failed)
}

// TestLease_HandoffAbandoned: a handoff to a node that cannot catch up
// within lease.handoff_timeout (1 s here: from some point on, every byte
// syd-1 receives from the primary is 3 s late, through a toxiproxy proxy,
// and the primary commits a row after that point) is abandoned within
// the bound, with an error that says what the target lacks; a second
// handoff asked meanwhile is refused as one in progress; the write held
// meanwhile commits on the old primary, which stays primary at the same
// epoch and takes writes.
func TestLease_HandoffAbandoned(t *testing.T) {
	t.Parallel()
	_, c := consulCluster(t, []testingutil.ClusterNodeSpec{iad, fra, syd}, "handoff_timeout: 1s", "prefer_regions: [iad]")
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	slow := map[string]string{}
	var proxies []*toxiproxy.Proxy
	for _, n := range c.Nodes {
		if n.Name == syd.Name {
			continue
		}
		p := toxiproxy.NewProxy(server, "syd-"+n.Name, testingutil.FreeAddr(t), n.Addr)
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Stop)
		slow[n.Name] = p.Listen
		proxies = append(proxies, p)
	}
	c.PeerAddr = func(from, peer *testingutil.ClusterNode) string {
		if addr, ok := slow[peer.Name]; ok && from.Name == syd.Name {
			return addr
		}
		return peer.Addr
	}
	c.RewriteConfigs()
	c.Start(t)
	primary, epoch := waitOnePrimary(t, c, 0)
	if primary.Name != iad.Name {
		t.Fatalf("%s took the lease first, want %s (the preferred region)", primary.Name, iad.Name)
	}
	c.Primary = primary.Name
	insertBy(t, primary, "before")
	c.WaitCaughtUp(t, time.Minute, "app.db")
	for _, p := range proxies {
		if _, err := p.Toxics.AddToxicJson(strings.NewReader(`{"name": "late", "type": "latency", "stream": "downstream", "attributes": {"latency": 3000}}`)); err != nil {
			t.Fatal(err)
		}
	}
	insertBy(t, primary, "lagging") // syd-1 gets it 3 s late

	// A write transaction begun while the handoff holds writes.
	held := make(chan error, 1)
	began := time.Now()
	done := make(chan error, 1)
	var stdout, stderr strings.Builder
	go func() {
		done <- Run(context.Background(), []string{"handoff", "-to", syd.Name, "-admin", primary.Admin}, &stdout, &stderr)
	}()
	waitStatus(t, primary, func(st regiond.Status) bool { return st.Handoff != nil && st.Handoff.State == "started" }, "handing off to %s", syd.Name)
	go func() {
		db, err := sql.Open("sqlite3", "file:"+filepath.Join(primary.MountDir, "app.db")+"?mode=rw&_busy_timeout=5000")
		if err != nil {
			held <- err
			return
		}
		defer db.Close()
		_, err = db.Exec(`INSERT INTO t (by) VALUES ('held')`)
		held <- err
	}()
	var stdout2, stderr2 strings.Builder
	if err := Run(context.Background(), []string{"handoff", "-to", fra.Name, "-admin", primary.Admin}, &stdout2, &stderr2); err == nil || !strings.Contains(err.Error(), "another handoff is in progress") {
		t.Errorf("a second handoff during the first: %v, want an error saying another is in progress", err)
	}
	err := <-done
	took := time.Since(began)
	if err == nil || !strings.Contains(err.Error(), "abandoned") || !strings.Contains(err.Error(), syd.Name+" did not acknowledge") {
		t.Fatalf("handoff to %s, 3 s behind: %v, want it abandoned because %s did not acknowledge", syd.Name, err, syd.Name)
	}
	if err := <-held; err != nil {
		t.Errorf("the write held during the abandoned handoff: %v, want it committed on %s", err, primary.Name)
	}
	st := adminStatus(t, primary)
	if st.Role != regiond.RolePrimary || st.Epoch != epoch || st.Handoff == nil || !strings.HasPrefix(st.Handoff.State, "abandoned: ") {
		t.Fatalf("%s after the abandoned handoff: %s at epoch %d, handoff %+v; want primary at %d, the handoff abandoned", primary.Name, st.Role, st.Epoch, st.Handoff, epoch)
	}
	insertBy(t, primary, "after")
	c.WaitCaughtUp(t, time.Minute, "app.db")
	checkBy(t, c, "before,lagging,held,after")
	t.Logf("handoff to %s abandoned %v after it was asked: %v", syd.Name, took.Round(time.Millisecond), err)
}

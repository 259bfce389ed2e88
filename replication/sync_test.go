package replication_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
	"github.com/meridian-db/meridian/replication"
	"github.com/meridian-db/meridian/replication/internal/repltest"
)

func TestQuorum_Met(t *testing.T) {
	three := map[string]string{"fra-1": "fra", "fra-2": "fra", "syd-1": "syd"}
	for _, tt := range []struct {
		q    replication.Quorum
		reps map[string]string
		want bool
	}{
		{replication.Quorum{Acks: 1}, nil, false},
		{replication.Quorum{Acks: 1}, map[string]string{"fra-1": "fra"}, true},
		{replication.Quorum{Acks: 2}, map[string]string{"fra-1": "fra"}, false},
		{replication.Quorum{Acks: 3}, three, true},
		{replication.Quorum{Regions: []string{"fra", "syd"}}, three, true},
		{replication.Quorum{Regions: []string{"fra", "syd"}}, map[string]string{"fra-1": "fra", "fra-2": "fra"}, false},
		{replication.Quorum{Acks: 2, Regions: []string{"syd"}}, map[string]string{"fra-1": "fra", "fra-2": "fra"}, false},
		{replication.Quorum{Acks: 2, Regions: []string{"syd"}}, map[string]string{"fra-1": "fra", "syd-1": "syd"}, true},
	} {
		if got := tt.q.Met(tt.reps); got != tt.want {
			t.Errorf("%v.Met(%v) = %v, want %v", tt.q, tt.reps, got, tt.want)
		}
	}
}

// advance commits random transactions to db until one changes it, and
// returns its TXID.
func advance(c *cluster, db string) ltx.TXID {
	c.tb.Helper()
	before := c.primary.Log(db).Pos().TXID
	for i := 0; c.primary.Log(db).Pos().TXID == before; i++ {
		if i == 100 {
			c.tb.Fatalf("%d random transactions left %s at txid %d", i, db, before)
		}
		c.primary.Steps(db, 1)
	}
	return c.primary.Log(db).Pos().TXID
}

func newGate(c *cluster, timeout time.Duration) *replication.Gate {
	return &replication.Gate{Streamer: c.streamer, Quorum: replication.Quorum{Acks: 1}, Timeout: timeout,
		Logger: testingutil.Logger(c.tb)}
}

// TestGate_Acknowledged checks that a wait returns once the replica has
// applied the transaction, and not before.
func TestGate_Acknowledged(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.run(c.client())
	g := newGate(c, time.Minute)
	ctx := context.Background()
	for range 20 {
		advance(c, "a.db")
		pos := c.primary.Log("a.db").Pos()
		if err := g.Wait(ctx, "a.db", pos.TXID, true); err != nil {
			t.Fatal(err)
		}
		// The replica applied it before acknowledging.
		if got := c.target.Pos("a.db"); got.TXID < pos.TXID {
			t.Fatalf("wait for %v returned with the replica at %v", pos, got)
		}
	}
	if st := g.Status(); st.Degraded || st.Timeouts != 0 || st.Waiting != 0 {
		t.Fatalf("status %+v, want no degradation, timeout or waiter", st)
	}
}

// TestGate_RecreatedDatabase deletes a database the replica acknowledged
// up to a high TXID and creates it again under the same name: its first
// commits wait for the replica as any other, since the acks of the old
// history confirm nothing of the new one.
func TestGate_RecreatedDatabase(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	stop := c.run(c.client())
	g := newGate(c, time.Minute)
	for range 20 {
		advance(c, "a.db")
	}
	old := c.primary.Log("a.db").Pos()
	if err := g.Wait(context.Background(), "a.db", old.TXID, true); err != nil {
		t.Fatal(err)
	}
	stop()

	c.primary.Drop("a.db")
	c.primary.Create("a.db", 2)
	pos := c.primary.Log("a.db").Pos()
	if pos.TXID >= old.TXID {
		t.Fatalf("the new a.db is at %v, want it behind the old one's %v", pos, old)
	}
	g.Timeout = 100 * time.Millisecond
	if err := g.Wait(context.Background(), "a.db", pos.TXID, true); !errors.Is(err, replication.ErrSyncTimeout) {
		t.Fatalf("wait for the new a.db's %v with the replica away: %v, want ErrSyncTimeout (acks up to the old a.db's %v confirm nothing of it)", pos, err, old)
	}
	// The replica returns, takes the new history and acknowledges it.
	c.run(c.client())
	g.Timeout = time.Minute
	if err := g.Wait(context.Background(), "a.db", pos.TXID, true); err != nil {
		t.Fatalf("wait for the new a.db's %v once the replica returned: %v", pos, err)
	}
	if got := c.target.Pos("a.db"); got.TXID < pos.TXID || !c.primary.Log("a.db").Contains(got) {
		t.Fatalf("the replica has a.db at %v after the wait for %v of the new history", got, pos)
	}
}

// TestGate_Timeout checks the three ways a wait ends when no replica
// acknowledges: failing, waiting on (until its context ends), degrading
// until the replica catches up.
func TestGate_Timeout(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	txid := advance(c, "a.db")
	g := newGate(c, 20*time.Millisecond)

	err := g.Wait(context.Background(), "a.db", txid, true)
	if !errors.Is(err, replication.ErrSyncTimeout) {
		t.Fatalf("wait that can fail: %v, want ErrSyncTimeout", err)
	}

	// A wait that cannot fail outlasts its timeouts; its context ends it
	// once it has seen two.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- g.Wait(ctx, "a.db", txid, false) }()
	for deadline := time.Now().Add(repltest.WaitTimeout); g.Status().Timeouts < 3; {
		select {
		case err := <-errc:
			t.Fatalf("wait that cannot fail: %v after %d timeouts, want it to wait until its context ends", err, g.Status().Timeouts)
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("status %+v after %v, want 3 or more timeouts", g.Status(), repltest.WaitTimeout)
		}
	}
	cancel()
	err = awaitErr(t, errc, "the wait that cannot fail to return once its context ended")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("wait that cannot fail: %v, want it to wait until its context ends", err)
	}
	if st := g.Status(); st.Timeouts < 3 || st.Degraded {
		t.Fatalf("status %+v, want 3 or more timeouts and no degradation", st)
	}

	g.Degrade = true
	ctx, cancel = context.WithTimeout(context.Background(), repltest.WaitTimeout) // a wait that does not degrade would never end
	defer cancel()
	if err := g.Wait(ctx, "a.db", txid, false); err != nil {
		t.Fatalf("degrading wait: %v", err)
	}
	st := g.Status()
	if !st.Degraded || st.DegradedSince.IsZero() {
		t.Fatalf("status %+v after a degrading timeout, want degraded", st)
	}
	// Degraded: later commits do not wait, even the ones that could.
	if err := g.Wait(context.Background(), "a.db", advance(c, "a.db"), true); err != nil {
		t.Fatalf("wait while degraded: %v", err)
	}
	if got := g.Status(); got.Timeouts != st.Timeouts || !got.Degraded {
		t.Fatalf("status %+v after a wait while degraded, want still degraded and no new timeout (%d)", got, st.Timeouts)
	}
	// The replica returns and catches up: the next commit waits for it
	// again, and the gate is no longer degraded.
	c.run(c.client())
	c.waitSynced()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if reps, _ := c.streamer.Confirmed("a.db", c.primary.Log("a.db").Pos().TXID); len(reps) == 1 {
			break
		} else if time.Now().After(deadline) {
			t.Fatal("the replica's acks did not reach the primary in 10s")
		}
	}
	g.Timeout = time.Minute
	advance(c, "a.db")
	pos := c.primary.Log("a.db").Pos()
	if err := g.Wait(context.Background(), "a.db", pos.TXID, true); err != nil {
		t.Fatal(err)
	}
	if got := c.target.Pos("a.db"); got.TXID < pos.TXID {
		t.Fatalf("wait for %v returned with the replica at %v", pos, got)
	}
	if st := g.Status(); st.Degraded {
		t.Fatalf("status %+v once the replica caught up, want not degraded", st)
	}
}

// TestGate_HelloConfirmsNothing checks that a replica's own claim of a
// position, in its Hello, does not count as acknowledging it: an old
// primary rejoining with transactions nobody else has must not satisfy a
// sync commit at the same TXIDs.
func TestGate_HelloConfirmsNothing(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.primary.Steps("a.db", 5)
	stop := c.run(c.client())
	c.waitSynced()
	stop()
	// A new primary process: a Streamer that has seen no ack.
	c.streamer = replication.NewStreamer(c.primary, "iad-1", c.epoch.Load, t.TempDir())
	c.streamer.Logger = testingutil.Logger(t)
	c.run(c.client())
	txid := c.primary.Log("a.db").Pos().TXID
	deadline := time.Now().Add(10 * time.Second)
	for len(c.streamer.Replicas()) == 0 || c.streamer.Replicas()[0].Acked["a.db"].TXID != txid {
		if time.Now().After(deadline) {
			t.Fatalf("replica's Hello not seen: %+v", c.streamer.Replicas())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if reps, _ := c.streamer.Confirmed("a.db", txid); len(reps) != 0 {
		t.Fatalf("confirmed by %v from a Hello alone", reps)
	}
	g := newGate(c, 50*time.Millisecond)
	if err := g.Wait(context.Background(), "a.db", txid, true); !errors.Is(err, replication.ErrSyncTimeout) {
		t.Fatalf("wait for a position only a Hello claims: %v, want ErrSyncTimeout", err)
	}
}

// TestGate_Drain checks that Drain returns at once with nobody waiting,
// waits for a commit that its replica acknowledges once it connects, and
// gives up with its context, reporting the commits still waiting.
func TestGate_Drain(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	txid := advance(c, "a.db")
	g := newGate(c, time.Minute)
	if n := g.Drain(context.Background()); n != 0 {
		t.Fatalf("Drain with nobody waiting: %d waiting", n)
	}
	errc := make(chan error, 1)
	go func() { errc <- g.Wait(context.Background(), "a.db", txid, false) }()
	for deadline := time.Now().Add(repltest.WaitTimeout); g.Status().Waiting == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no waiter after %v", repltest.WaitTimeout)
		}
	}
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if n := g.Drain(short); n != 1 {
		t.Fatalf("Drain that timed out with no replica: %d waiting, want 1", n)
	}
	c.run(c.client())
	if n := g.Drain(context.Background()); n != 0 {
		t.Fatalf("Drain once the replica runs: %d waiting, want 0", n)
	}
	if err := awaitErr(t, errc, "the wait to return once acknowledged"); err != nil {
		t.Fatalf("wait: %v", err)
	}
}

// durableTarget is a Target whose groups become durable when the test
// says: AwaitDurable waits for durable to close, or fails with failed.
type durableTarget struct {
	*repltest.Target
	durable chan struct{}
	failed  atomic.Pointer[error]
}

func (t *durableTarget) AwaitDurable(ctx context.Context, db string) error {
	if err := t.failed.Load(); err != nil {
		return *err
	}
	select {
	case <-t.durable:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TestGate_AckedWhenDurable: a replica whose Target applies groups before
// they are durable (a DurableTarget) acknowledges them only once they
// are, so a sync wait holds until then; and one that cannot make them
// durable ends its stream, acknowledging nothing, and starts again.
func TestGate_AckedWhenDurable(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	cl := c.client()
	target := &durableTarget{Target: c.target, durable: make(chan struct{})}
	cl.Target = target
	c.run(cl)
	g := newGate(c, time.Minute)
	ctx := context.Background()

	txid := advance(c, "a.db")
	repltest.WaitSynced(t, c.primary, c.target)
	mustNotConfirm(t, c, g, txid, "before the replica's group was durable")
	close(target.durable)
	waitCtx, cancelWait := context.WithTimeout(ctx, repltest.WaitTimeout)
	defer cancelWait()
	if err := g.Wait(waitCtx, "a.db", txid, true); err != nil {
		t.Fatal(err)
	}

	failed := errors.New("injected: fsync failed")
	target.failed.Store(&failed)
	txid = advance(c, "a.db")
	repltest.WaitSynced(t, c.primary, c.target)
	mustNotConfirm(t, c, g, txid, "for a group the replica could not make durable")
	// The stream starts again; the next group is durable, and its ack
	// covers the one before.
	target.failed.Store(nil)
	advance(c, "a.db")
	bounded, cancel3 := context.WithTimeout(ctx, repltest.WaitTimeout)
	defer cancel3()
	if err := g.Wait(bounded, "a.db", txid, true); err != nil {
		t.Fatalf("once the replica's groups are durable again: %v", err)
	}
}

// mustNotConfirm checks that a sync wait for txid of a.db does not return
// within 100 ms, and that the streamer shows no replica confirming it.
func mustNotConfirm(t *testing.T, c *cluster, g *replication.Gate, txid ltx.TXID, when string) {
	t.Helper()
	short, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := g.Wait(short, "a.db", txid, true); err == nil {
		t.Fatalf("a sync wait returned %s", when)
	}
	if reps, _ := c.streamer.Confirmed("a.db", txid); len(reps) != 0 {
		t.Fatalf("the replica acknowledged txid %d %s: %v", txid, when, reps)
	}
}

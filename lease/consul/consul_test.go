package consul_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/lease"
	"github.com/meridian-db/meridian/lease/consul"
)

func TestMain(m *testing.M) { testingutil.Main(m) }

// Settings of the leasers under test: a short check TTL and lock delay, so
// a dead holder's lease moves within seconds.
const (
	checkTTL  = time.Second
	lockDelay = 500 * time.Millisecond
)

func holder(node string) lease.Holder {
	return lease.Holder{Node: node, Region: node[:3], Replication: "127.0.0.1:20210", Admin: "127.0.0.1:20211", Router: "127.0.0.1:8080"}
}

// newLeaser returns a leaser of node on the agent c, closed at cleanup.
func newLeaser(t *testing.T, c *testingutil.Consul, key, node string) *consul.Leaser {
	t.Helper()
	l, err := consul.New(consul.Config{Address: c.URL, Key: key, Me: holder(node), CheckTTL: checkTTL, LockDelay: lockDelay})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func mustAcquire(t *testing.T, l *consul.Leaser, atLeast uint64, want bool) lease.State {
	t.Helper()
	st, held, err := l.Acquire(context.Background(), atLeast)
	if err != nil || held != want {
		t.Fatalf("acquire: %v, held %v, %v; want held %v", st, held, err, want)
	}
	return st
}

// TestLeaser_AcquireRenewRelease: one holder at a time, named in the key
// with its addresses, and an epoch that grows with each holder.
func TestLeaser_AcquireRenewRelease(t *testing.T) {
	c := testingutil.StartConsul(t)
	ctx := context.Background()
	a, b := newLeaser(t, c, "meridian/primary", "iad-1"), newLeaser(t, c, "meridian/primary", "fra-1")

	if st, err := a.Current(ctx); err != nil || st.Held() || st.Epoch != 0 {
		t.Fatalf("lease before anyone took it: %v, %v", st, err)
	}
	if st := mustAcquire(t, a, 1, true); st.Holder != holder("iad-1") || st.Epoch != 1 {
		t.Fatalf("iad-1 took %v, want itself at epoch 1", st)
	}
	if st := mustAcquire(t, a, 1, true); st.Epoch != 1 {
		t.Fatalf("iad-1 acquiring again got %v, want its lease at epoch 1", st)
	}
	if st := mustAcquire(t, b, 1, false); st.Holder != holder("iad-1") || st.Epoch != 1 {
		t.Fatalf("fra-1 sees %v, want iad-1 (with every address) at epoch 1", st)
	}
	if err := a.Renew(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Renew(ctx); !errors.Is(err, lease.ErrNotHeld) {
		t.Fatalf("fra-1 renews a lease it does not hold: %v", err)
	}
	// The value in Consul, as other tools read it.
	client, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(c.URL, "http://")})
	if err != nil {
		t.Fatal(err)
	}
	pair, _, err := client.KV().Get("meridian/primary", nil)
	if err != nil || pair == nil || pair.Session == "" {
		t.Fatalf("key: %+v, %v", pair, err)
	}
	if h, epoch, err := lease.DecodeHolder(pair.Value); err != nil || h != holder("iad-1") || epoch != 1 {
		t.Fatalf("key value %s: %v, %d, %v", pair.Value, h, epoch, err)
	}

	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := b.Current(ctx); err != nil || st.Held() || st.Epoch != 1 {
		t.Fatalf("after the release: %v, %v; want nobody, last epoch 1", st, err)
	}
	if err := a.Renew(ctx); !errors.Is(err, lease.ErrNotHeld) {
		t.Fatalf("iad-1 renews after its release: %v", err)
	}
	// A release applies no lock delay: fra-1 takes it at once, one epoch up.
	if st := mustAcquire(t, b, 1, true); st.Holder != holder("fra-1") || st.Epoch != 2 {
		t.Fatalf("fra-1 took %v, want itself at epoch 2", st)
	}
	mustAcquire(t, a, 1, false)
	// An epoch asked for above the lease's is taken as it is.
	if err := b.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if st := mustAcquire(t, a, 10, true); st.Epoch != 10 {
		t.Fatalf("iad-1 took %v, want epoch 10", st)
	}
	// A deleted key starts from what the acquiring node has seen.
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := client.KV().Delete("meridian/primary", nil); err != nil {
		t.Fatal(err)
	}
	if st := mustAcquire(t, b, 11, true); st.Epoch != 11 {
		t.Fatalf("fra-1 took %v after the key was deleted, want epoch 11", st)
	}
}

// TestLeaser_HolderDies: a holder that stops renewing (a crashed regiond)
// loses the lease about the check TTL later, never while it renews; the
// watching node sees it go, takes it once the lock delay has passed, one
// epoch up, and the old holder's Renew then fails.
func TestLeaser_HolderDies(t *testing.T) {
	c := testingutil.StartConsul(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, b := newLeaser(t, c, "meridian/primary", "iad-1"), newLeaser(t, c, "meridian/primary", "fra-1")
	taken := mustAcquire(t, a, 1, true)

	// While iad-1 renews (three times a check TTL), fra-1 never gets it.
	renewUntil := time.Now().Add(3 * checkTTL)
	for time.Now().Before(renewUntil) {
		if err := a.Renew(ctx); err != nil {
			t.Fatalf("iad-1 renews: %v", err)
		}
		mustAcquire(t, b, 1, false)
		time.Sleep(checkTTL / 4)
	}

	watch := b.Watch(ctx)
	if st := recv(t, watch); st != taken {
		t.Fatalf("fra-1 watches %v first, want %v", st, taken)
	}
	died := time.Now() // iad-1 renews no more
	st := recv(t, watch)
	lost := time.Since(died)
	if st.Held() || st.Epoch != taken.Epoch {
		t.Fatalf("fra-1 watched %v, want nobody at epoch %d", st, taken.Epoch)
	}
	attempts := 0
	for {
		attempts++
		st, held, err := b.Acquire(ctx, 1)
		if err != nil {
			t.Fatal(err)
		}
		if held {
			if st.Epoch != taken.Epoch+1 {
				t.Fatalf("fra-1 took %v, want epoch %d", st, taken.Epoch+1)
			}
			break
		}
		if time.Since(died) > 10*time.Second {
			t.Fatalf("fra-1 could not take the lease %v after iad-1 died (%d attempts); it sees %v", time.Since(died), attempts, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("iad-1 stopped renewing: lease free after %v, taken by fra-1 after %v (%d attempts; check TTL %v, lock delay %v)",
		lost.Round(time.Millisecond), time.Since(died).Round(time.Millisecond), attempts, checkTTL, lockDelay)
	if st := recv(t, watch); st.Holder.Node != "fra-1" || st.Epoch != taken.Epoch+1 {
		t.Fatalf("fra-1 watched %v after taking it", st)
	}
	if err := a.Renew(ctx); !errors.Is(err, lease.ErrNotHeld) {
		t.Fatalf("iad-1 renews after it lost the lease: %v, want ErrNotHeld", err)
	}
	// A new session lets iad-1 compete again.
	mustAcquire(t, a, 1, false)
}

// TestLeaser_Race: three nodes take and give up the lease as fast as they
// can, over and over: never two at once, and each holder's epoch above
// every one before it.
func TestLeaser_Race(t *testing.T) {
	c := testingutil.StartConsul(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var (
		holding atomic.Int32 // nodes that hold the lease, by their own account
		mu      sync.Mutex
		epochs  []uint64
		wg      sync.WaitGroup
	)
	errc := make(chan error, 3)
	for i := range 3 {
		l := newLeaser(t, c, "race/primary", fmt.Sprintf("nd%d-1", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				// Passes the session's check, held or not.
				if err := l.Renew(ctx); err != nil && !errors.Is(err, lease.ErrNotHeld) && ctx.Err() == nil {
					errc <- err
					return
				}
				st, held, err := l.Acquire(ctx, 1)
				if err != nil {
					if ctx.Err() == nil {
						errc <- err
					}
					return
				}
				if !held {
					continue
				}
				if n := holding.Add(1); n != 1 {
					errc <- fmt.Errorf("%s holds the lease at epoch %d while %d other node(s) do", st.Holder.Node, st.Epoch, n-1)
					return
				}
				mu.Lock()
				epochs = append(epochs, st.Epoch)
				mu.Unlock()
				time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond)
				holding.Add(-1)
				if err := l.Release(context.Background()); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if len(epochs) < 10 {
		t.Fatalf("%d acquisitions in 3 s, want at least 10", len(epochs))
	}
	for i := 1; i < len(epochs); i++ {
		if epochs[i] <= epochs[i-1] {
			t.Fatalf("epoch %d after %d (acquisition %d of %d)", epochs[i], epochs[i-1], i, len(epochs))
		}
	}
	t.Logf("%d acquisitions, epochs %d to %d", len(epochs), epochs[0], epochs[len(epochs)-1])
}

// TestLeaser_BadInput: a malformed configuration, an agent nobody runs,
// and a key another program holds, each fail saying what to do.
func TestLeaser_BadInput(t *testing.T) {
	for _, cfg := range []consul.Config{
		{Address: "127.0.0.1:8500", Me: holder("iad-1")},
		{Address: "http://127.0.0.1:8500"},
		{Address: "http://127.0.0.1:8500", Me: holder("iad-1"), SessionTTL: time.Second},
		{Address: "http://127.0.0.1:8500", Me: holder("iad-1"), CheckTTL: -time.Second},
	} {
		if _, err := consul.New(cfg); err == nil {
			t.Errorf("%+v: accepted", cfg)
		}
	}

	dead := "http://" + testingutil.FreeAddr(t)
	l, err := consul.New(consul.Config{Address: dead, Me: holder("iad-1")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, err := l.Acquire(ctx, 1); err == nil || !strings.Contains(err.Error(), dead) || !strings.Contains(err.Error(), "is the Consul agent running") {
		t.Fatalf("acquire with no agent at %s: %v", dead, err)
	}

	c := testingutil.StartConsul(t)
	client, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(c.URL, "http://")})
	if err != nil {
		t.Fatal(err)
	}
	id, _, err := client.Session().Create(&api.SessionEntry{Name: "another program"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ok, _, err := client.KV().Acquire(&api.KVPair{Key: "meridian/primary", Value: []byte("not json"), Session: id}, nil); err != nil || !ok {
		t.Fatalf("take the key for another program: %v, %v", ok, err)
	}
	a := newLeaser(t, c, "meridian/primary", "iad-1")
	if _, _, err := a.Acquire(context.Background(), 1); err == nil || !strings.Contains(err.Error(), "another program wrote the key") {
		t.Fatalf("acquire a key another program holds: %v", err)
	}
	// Once that program lets go, the key is free; its value carries no
	// epoch, so the node's own counts.
	if _, _, err := client.KV().Release(&api.KVPair{Key: "meridian/primary", Session: id}, nil); err != nil {
		t.Fatal(err)
	}
	if st := mustAcquire(t, a, 4, true); st.Epoch != 4 {
		t.Fatalf("took %v, want epoch 4", st)
	}
}

// recv returns the next state from c, failing the test after 10 s.
func recv(t *testing.T, c <-chan lease.State) lease.State {
	t.Helper()
	return testingutil.Recv(t, c, 10*time.Second, "the next lease state watched")
}

// TestLeaser_ACL: on an agent with ACLs on and denied by default, a leaser
// without a token, or whose token may read the key but not write it,
// gets an error that names the key and says what the token needs, and
// takes nothing; one with a token of ACLPolicy's rules holds the lease.
func TestLeaser_ACL(t *testing.T) {
	c := testingutil.StartConsulACL(t)
	admin, err := api.NewClient(&api.Config{Address: strings.TrimPrefix(c.URL, "http://"), Token: c.Token})
	if err != nil {
		t.Fatal(err)
	}
	const key = "meridian/primary"
	token := func(name, rules string) string { return c.ACLToken(t, name, rules) }
	readOnly := token("meridian-read", strings.Replace(consul.ACLPolicy(key), `key "meridian/primary" { policy = "write" }`, `key "meridian/primary" { policy = "read" }`, 1))
	full := token("meridian-lease", consul.ACLPolicy(key))

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, tc := range []struct{ name, token string }{{"no token", ""}, {"read-only token", readOnly}} {
		l, err := consul.New(consul.Config{Address: c.URL, Key: key, Me: holder("iad-1"), CheckTTL: checkTTL, LockDelay: lockDelay, Token: tc.token})
		if err != nil {
			t.Fatal(err)
		}
		st, held, err := l.Acquire(ctx, 1)
		if err == nil || held || !strings.Contains(err.Error(), `key "meridian/primary"`) || !strings.Contains(err.Error(), "lease.consul_token_file") {
			t.Errorf("%s: acquire: %v, held %v, %v; want an error naming the key and the token's setting", tc.name, st, held, err)
		} else {
			t.Logf("%s: %v", tc.name, err)
		}
		_ = l.Close()
	}
	if pair, _, err := admin.KV().Get(key, nil); err != nil || pair != nil {
		t.Fatalf("key %s after refused acquisitions: %+v, %v; want none", key, pair, err)
	}

	l, err := consul.New(consul.Config{Address: c.URL, Key: key, Me: holder("iad-1"), CheckTTL: checkTTL, LockDelay: lockDelay, Token: full})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	if st := mustAcquire(t, l, 1, true); st.Holder.Node != "iad-1" || st.Epoch != 1 {
		t.Fatalf("acquired %v, want iad-1 at epoch 1", st)
	}
	if err := l.Renew(ctx); err != nil {
		t.Fatalf("renew with ACLPolicy's token: %v", err)
	}
	if st, err := l.Current(ctx); err != nil || st.Holder.Node != "iad-1" {
		t.Fatalf("current: %v, %v", st, err)
	}
}

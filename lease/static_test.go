package lease_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/lease"
)

var (
	iad = lease.Holder{Node: "iad-1", Region: "iad", Replication: "127.0.0.1:20210", Admin: "127.0.0.1:20211"}
	fra = lease.Holder{Node: "fra-1", Region: "fra", Replication: "127.0.0.1:20220"}
)

func TestStatic(t *testing.T) {
	ctx := context.Background()
	onIad, onFra := lease.NewStatic(iad, iad), lease.NewStatic(fra, iad)

	st, held, err := onIad.Acquire(ctx, 5)
	if err != nil || !held || st.Holder != iad || st.Epoch != 5 {
		t.Fatalf("iad-1 acquires at 5: %v, held %v, %v", st, held, err)
	}
	if st, held, _ := onIad.Acquire(ctx, 9); !held || st.Epoch != 5 {
		t.Fatalf("iad-1 acquires again: %v, held %v; want its lease as it was, epoch 5", st, held)
	}
	if err := onIad.Renew(ctx); err != nil {
		t.Fatal(err)
	}
	st, held, err = onFra.Acquire(ctx, 6)
	if err != nil || held || st.Holder != iad {
		t.Fatalf("fra-1 acquires while iad-1 is named: %v, held %v, %v", st, held, err)
	}
	if err := onFra.Renew(ctx); !errors.Is(err, lease.ErrNotHeld) {
		t.Fatalf("fra-1 renews: %v, want ErrNotHeld", err)
	}

	// A new configuration names fra-1 (SIGHUP on every node).
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watch := onIad.Watch(wctx)
	if got := recv(t, watch); got.Holder != iad || got.Epoch != 5 {
		t.Fatalf("first state watched: %v", got)
	}
	onIad.Set(fra)
	onFra.Set(fra)
	if got := recv(t, watch); got.Holder != fra || got.Epoch != 0 {
		t.Fatalf("state watched after Set: %v, want fra-1 (epoch unknown on iad-1)", got)
	}
	if err := onIad.Renew(ctx); !errors.Is(err, lease.ErrNotHeld) {
		t.Fatalf("iad-1 renews after the move: %v, want ErrNotHeld", err)
	}
	if st, held, _ := onFra.Acquire(ctx, 6); !held || st.Epoch != 6 {
		t.Fatalf("fra-1 acquires at 6: %v, held %v", st, held)
	}
	// Back to iad-1: its epoch is above the one it took before even when
	// asked for less.
	onIad.Set(iad)
	if st, held, _ := onIad.Acquire(ctx, 2); !held || st.Epoch != 6 {
		t.Fatalf("iad-1 acquires again at least 2: %v, held %v; want epoch 6, above its last (5)", st, held)
	}
	cancel()
	for range watch { // closed once ctx ends
	}
}

func TestHolderValue(t *testing.T) {
	b := lease.EncodeHolder(iad, 7)
	h, epoch, err := lease.DecodeHolder(b)
	if err != nil || h != iad || epoch != 7 {
		t.Fatalf("round trip of %s: %v, %d, %v", b, h, epoch, err)
	}
	for _, bad := range []string{"", "{", `{"node":"iad-1"}`, `{"epoch":3}`, `{"node":"iad-1","epoch":-1}`, `[]`} {
		if _, _, err := lease.DecodeHolder([]byte(bad)); err == nil {
			t.Errorf("%q decoded", bad)
		}
	}
}

func FuzzDecodeHolder(f *testing.F) {
	f.Add(lease.EncodeHolder(iad, 7))
	f.Add([]byte(`{"node":"x","epoch":1,"extra":[1,2]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, epoch, err := lease.DecodeHolder(b)
		if err != nil {
			return
		}
		if h.Node == "" || epoch == 0 {
			t.Fatalf("%q decoded as %+v at %d", b, h, epoch)
		}
		h2, epoch2, err := lease.DecodeHolder(lease.EncodeHolder(h, epoch))
		if err != nil || h2 != h || epoch2 != epoch {
			t.Fatalf("%q: re-encoded, decoded as %+v at %d, %v", b, h2, epoch2, err)
		}
	})
}

// recv returns the next state from c, failing the test after 10 s.
func recv(t *testing.T, c <-chan lease.State) lease.State {
	t.Helper()
	return testingutil.Recv(t, c, 10*time.Second, "the next lease state watched")
}

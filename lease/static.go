package lease

import (
	"context"
	"sync"
	"time"
)

// Static is the lease of lease.type: static. The configuration names the
// primary (lease.static_primary), which holds the lease; only a new
// configuration moves it (Set, on SIGHUP), and nothing moves it when the
// primary dies. Each node has its own Static and learns of a move from its
// own configuration, so the epoch a node takes when it becomes the primary
// is decided by that node from what it has seen (Acquire's atLeast).
type Static struct {
	me Holder

	mu      sync.Mutex
	primary Holder
	epoch   uint64        // the epoch this node took when it last acquired
	held    bool          // this node holds the lease now
	changed chan struct{} // closed and replaced by Set
}

// NewStatic returns the static lease of node me, held by primary.
func NewStatic(me, primary Holder) *Static {
	return &Static{me: me, primary: primary, changed: make(chan struct{})}
}

// Set names a new primary.
func (s *Static) Set(primary Holder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if primary == s.primary {
		return
	}
	s.primary = primary
	if primary.Node != s.me.Node {
		s.held = false
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// Acquire takes the lease if the configuration names this node, with epoch
// atLeast or one above the epoch it last took, whichever is higher.
func (s *Static) Acquire(_ context.Context, atLeast uint64) (State, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.primary.Node != s.me.Node {
		return s.state(), false, nil
	}
	if !s.held {
		s.epoch = max(s.epoch+1, atLeast)
		s.held = true
	}
	return s.state(), true, nil
}

// Renew fails with ErrNotHeld once the configuration names another node.
func (s *Static) Renew(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.held {
		return ErrNotHeld
	}
	return nil
}

// Release does nothing: the configuration decides who holds the lease.
func (s *Static) Release(context.Context) error { return nil }

// ValidUntil returns the zero time: a static lease does not expire.
func (s *Static) ValidUntil() time.Time { return time.Time{} }

// Current returns the primary the configuration names. Its epoch is known
// only on the primary itself, once it acquired; elsewhere it is 0.
func (s *Static) Current(context.Context) (State, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state(), nil
}

// state returns the lease as this node knows it. Caller holds s.mu.
func (s *Static) state() State {
	st := State{Holder: s.primary}
	if s.held {
		st.Epoch = s.epoch
	}
	return st
}

// Watch sends the primary the configuration names, then each new one Set
// names.
func (s *Static) Watch(ctx context.Context) <-chan State {
	out := make(chan State, 1)
	go func() {
		defer close(out)
		for {
			s.mu.Lock()
			st, changed := s.state(), s.changed
			s.mu.Unlock()
			if !SendLatest(ctx, out, st) {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
		}
	}()
	return out
}

// Close does nothing.
func (s *Static) Close() error { return nil }

// SendLatest puts st in out, a channel of capacity 1 that only the caller
// sends on, in place of a state the receiver has not taken yet: what a
// Leaser's Watch sends with. It reports false once ctx has ended.
func SendLatest(ctx context.Context, out chan State, st State) bool {
	if ctx.Err() != nil {
		return false
	}
	select {
	case <-out: // not taken: st replaces it
	default:
	}
	out <- st // the only sender, and the channel has room now
	return true
}

var _ Leaser = (*Static)(nil)

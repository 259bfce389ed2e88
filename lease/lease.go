// Package lease decides which node holds the write lease: the one node of
// a cluster that takes writes, and the epoch that fences every other.
//
// A Leaser is one node's handle on the lease. The node that holds it is
// the primary; every replication frame it sends carries its epoch, and a
// replica refuses frames of an epoch lower than one it has seen, so a
// deposed primary that has not noticed yet cannot have its writes applied.
// An epoch only grows: each acquisition takes one above the lease's last
// and above what the acquiring node has seen.
//
// Two kinds exist: Static, where the configuration names the primary and
// only an operator moves it, and package lease/consul, where a Consul
// session holds a key and the lease moves by itself when its holder dies.
package lease

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Holder is what the lease says about the node that holds it: who it is
// and where to reach it.
type Holder struct {
	Node   string `json:"node"`
	Region string `json:"region"`
	// Replication is the host:port replicas stream from
	// (replication.advertise).
	Replication string `json:"replication"`
	// Admin and Router are the host:port of the node's admin API and of
	// its router, when it runs them.
	Admin  string `json:"admin,omitempty"`
	Router string `json:"router,omitempty"`
}

// State is the lease as it stands.
type State struct {
	// Holder is the node that holds the lease; its Node is "" when nobody
	// does.
	Holder Holder
	// Epoch is the holder's epoch, or, when nobody holds the lease, the
	// last holder's (0 if there never was one).
	Epoch uint64
	// HandoffTo, when nobody holds the lease, is the node the last holder
	// handed it to (a graceful handoff): that node takes it at once, and
	// the others leave it to that node for a while.
	HandoffTo string
}

// Held reports whether some node holds the lease.
func (s State) Held() bool { return s.Holder.Node != "" }

// String returns "node (region) at epoch N", or "nobody" and the last
// epoch.
func (s State) String() string {
	if !s.Held() && s.HandoffTo != "" {
		return fmt.Sprintf("nobody, handed off to %s (last epoch %d)", s.HandoffTo, s.Epoch)
	}
	if !s.Held() {
		return fmt.Sprintf("nobody (last epoch %d)", s.Epoch)
	}
	return fmt.Sprintf("%s (%s) at epoch %d", s.Holder.Node, s.Holder.Region, s.Epoch)
}

// A Leaser is one node's handle on the lease.
type Leaser interface {
	// Acquire tries once to take the lease for this node, with an epoch
	// of at least atLeast and above the lease's last. It returns the
	// lease as it stands afterwards and whether this node holds it: false
	// with a nil error when another node holds it, or when the lease
	// cannot be taken yet (Consul's lock delay after a holder died).
	// Acquiring a lease this node holds already returns it as it is.
	Acquire(ctx context.Context, atLeast uint64) (State, bool, error)

	// Renew tells the lease that this node is alive and still holds it.
	// A holder that stops renewing loses the lease (Consul: after
	// lease.check_ttl). It fails if this node does not hold the lease any
	// more (ErrNotHeld) or cannot reach what decides it.
	Renew(ctx context.Context) error

	// Release gives the lease up if this node holds it; another node may
	// take it at once.
	Release(ctx context.Context) error

	// ValidUntil returns the time until which this node, if it holds the
	// lease, holds it even if it renews no more: no other node can take
	// it before then. The zero time means no such bound (a lease that
	// does not expire). A holder refuses writes past it (see
	// fs.FileSystem.SetWriteDeadline), so that a node paused while it held
	// the lease acknowledges nothing once another may have taken it.
	ValidUntil() time.Time

	// Current returns the lease as it stands.
	Current(ctx context.Context) (State, error)

	// Watch sends the lease as it stands, then again each time it
	// changes, until ctx ends; then it closes the channel. It does not
	// poll: it waits for the change. A receiver that falls behind gets
	// the latest state, not every one in between. While the lease cannot
	// be read, Watch retries with backoff and sends nothing.
	Watch(ctx context.Context) <-chan State

	// Close releases what the Leaser holds (Consul: its session and
	// check). It does not release the lease: a node that stops holding
	// it by Close is a node that died, and the lease moves as for one.
	Close() error
}

// ErrNotHeld is returned by Renew when this node does not hold the lease.
var ErrNotHeld = errors.New("this node does not hold the lease")

// EncodeHolder returns the lease value that names h at epoch, as stored in
// Consul's key: JSON, with the epoch beside the holder's fields.
func EncodeHolder(h Holder, epoch uint64) []byte {
	b, _ := json.Marshal(value{Holder: h, Epoch: epoch}) // cannot fail: strings and a number
	return b
}

// EncodeHandoff returns the lease value that names h at epoch as the last
// holder, who handed the lease to node next.
func EncodeHandoff(h Holder, epoch uint64, next string) []byte {
	b, _ := json.Marshal(value{Holder: h, Epoch: epoch, HandoffTo: next}) // cannot fail
	return b
}

// DecodeHolder reads a lease value written by EncodeHolder or
// EncodeHandoff. The error says what is wrong with it.
func DecodeHolder(b []byte) (Holder, uint64, error) {
	h, epoch, _, err := DecodeValue(b)
	return h, epoch, err
}

// DecodeValue is DecodeHolder, and also returns the node the holder
// handed the lease to ("" if none: EncodeHolder).
func DecodeValue(b []byte) (h Holder, epoch uint64, handoffTo string, err error) {
	var v value
	if err := json.Unmarshal(b, &v); err != nil {
		return Holder{}, 0, "", fmt.Errorf("lease value %.64q: %w", b, err)
	}
	if v.Node == "" || v.Epoch == 0 {
		return Holder{}, 0, "", fmt.Errorf("lease value %.64q: want a node and an epoch above 0", b)
	}
	return v.Holder, v.Epoch, v.HandoffTo, nil
}

// value is the JSON of a lease value.
type value struct {
	Holder
	Epoch     uint64 `json:"epoch"`
	HandoffTo string `json:"handoff_to,omitempty"`
}

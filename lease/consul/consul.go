// Package consul is the write lease held in Consul (lease.type: consul):
// the only package of Meridian that imports Consul's API.
//
// The lease is one KV key (lease.consul_key). Its value names the holder
// and its epoch (lease.EncodeHolder); the holder owns it through a Consul
// session, Consul's lock on the key. The session is tied to a TTL health
// check of its own, which the holder passes on every Renew, so a holder
// that dies, or stops renewing, loses the lease about lease.check_ttl
// later: Consul then invalidates the session, which releases the key.
// The session's own TTL (lease.ttl, 10 s at least) is only a backstop.
// After a session is invalidated Consul refuses the key to every other
// session for the lock delay (lease.lock_delay), the time a deposed holder
// has to notice.
//
// The epoch is written into the value by the node that acquires, in one
// Consul transaction that checks the key is still as the node read it: one
// above the value's epoch and at least the epoch the node has seen. So it
// only grows, even across a deleted key or a cluster that ran with the
// static lease before, which Consul's own lock index would not.
package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/meridian-db/meridian/lease"
)

// Defaults of Config.
const (
	DefaultKey        = "meridian/primary"
	DefaultSessionTTL = 10 * time.Second // Consul's least
	DefaultCheckTTL   = 2 * time.Second
	DefaultLockDelay  = time.Second
)

// Config says where the lease is and who this node is.
type Config struct {
	// Address is the Consul agent's HTTP API, e.g. http://127.0.0.1:8500.
	Address string
	// Key is the KV key that holds the lease.
	Key string
	// Me is this node, as the lease names it when it holds it.
	Me lease.Holder
	// SessionTTL is the session's TTL (10 s to 24 h, Consul's bounds).
	SessionTTL time.Duration
	// CheckTTL is the TTL of the health check that ties the session to
	// this node's Renew calls: a holder that does not renew within it
	// loses the lease. Renew at least three times within it.
	CheckTTL time.Duration
	// LockDelay is how long Consul keeps the key from every other session
	// after the holder's session is invalidated.
	LockDelay time.Duration
	// Token is the ACL token of Consul requests, "" for none (an agent
	// without ACLs, or one whose default policy lets the lease's requests
	// through). It needs write on Key, on sessions, and on this node's
	// checks (see ACLPolicy).
	Token string
	// Logger receives what the leaser notices; nil discards it.
	Logger *slog.Logger
}

// ACLPolicy returns the rules of a Consul ACL policy that lets a node
// hold the lease at key: write on the key, and on sessions and checks of
// any node (a session and its check are registered on the node name of
// the agent the leaser talks to).
func ACLPolicy(key string) string {
	return fmt.Sprintf(`key %q { policy = "write" }
session_prefix "" { policy = "write" }
node_prefix "" { policy = "write" }
`, key)
}

// Leaser is one node's handle on the lease in Consul.
type Leaser struct {
	cfg     Config
	client  *api.Client
	checkID string
	logger  *slog.Logger

	mu       sync.Mutex
	session  string    // the session this node holds the key with, "" before one exists
	value    []byte    // the key's value this node wrote when it last acquired
	renewed  time.Time // when the session was last renewed
	passed   time.Time // when the last pass of the check that succeeded was sent
	checkReg bool      // the check is registered
}

// New returns the leaser for cfg. It does not contact Consul: Acquire,
// Current and Watch do, and their errors name the address.
func New(cfg Config) (*Leaser, error) {
	if cfg.Key == "" {
		cfg.Key = DefaultKey
	}
	if cfg.SessionTTL == 0 {
		cfg.SessionTTL = DefaultSessionTTL
	}
	if cfg.CheckTTL == 0 {
		cfg.CheckTTL = DefaultCheckTTL
	}
	switch {
	case cfg.Me.Node == "":
		return nil, errors.New("consul lease: no node name")
	case cfg.SessionTTL < 10*time.Second || cfg.SessionTTL > 24*time.Hour:
		return nil, fmt.Errorf("consul lease: session TTL %v is outside Consul's bounds, 10s to 24h", cfg.SessionTTL)
	case cfg.CheckTTL <= 0 || cfg.LockDelay < 0:
		return nil, fmt.Errorf("consul lease: check TTL %v must be above 0 and lock delay %v not below", cfg.CheckTTL, cfg.LockDelay)
	}
	u, err := url.Parse(cfg.Address)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("consul lease: address %q: want a URL like http://127.0.0.1:8500", cfg.Address)
	}
	client, err := api.NewClient(&api.Config{Address: u.Host, Scheme: u.Scheme, Token: cfg.Token})
	if err != nil {
		return nil, fmt.Errorf("consul lease: %w", err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Leaser{cfg: cfg, client: client, checkID: "meridian-lease-" + cfg.Me.Node, logger: logger}, nil
}

// unreachable wraps an error of a call to Consul with the address and what
// to do: about the ACL token if Consul refused it, else about the agent.
func (l *Leaser) unreachable(what string, err error) error {
	var status api.StatusError
	if errors.As(err, &status) && (status.Code == http.StatusForbidden || status.Code == http.StatusUnauthorized) ||
		strings.Contains(err.Error(), "Permission denied") || strings.Contains(err.Error(), "ACL not found") {
		return fmt.Errorf("consul lease: %s at %s: %w (Consul refused the ACL token: the lease needs a token with write on key %q, on sessions and on node checks, given by lease.consul_token_file or CONSUL_HTTP_TOKEN; README, \"Failover with Consul\", has the policy)",
			what, l.cfg.Address, err, l.cfg.Key)
	}
	return fmt.Errorf("consul lease: %s at %s: %w (is the Consul agent running there? lease.consul_url names it)", what, l.cfg.Address, err)
}

// ensureSession creates the check and the session if this node has none
// that Consul still knows. Caller holds l.mu.
func (l *Leaser) ensureSession(ctx context.Context) error {
	wo := (&api.WriteOptions{}).WithContext(ctx)
	if l.session != "" {
		info, _, err := l.client.Session().Info(l.session, (&api.QueryOptions{}).WithContext(ctx))
		if err != nil {
			return l.unreachable("read session "+l.session, err)
		}
		if info != nil {
			return nil
		}
		l.logger.Info("lease session gone; creating another", "session", l.session)
		l.session = ""
	}
	// The check must pass when the session is created with it.
	reg := &api.AgentCheckRegistration{
		ID:    l.checkID,
		Name:  "Meridian write lease of " + l.cfg.Me.Node,
		Notes: "passed by regiond on every renewal of the lease; the lease session ends when it fails",
		AgentServiceCheck: api.AgentServiceCheck{
			TTL:    l.cfg.CheckTTL.String(),
			Status: api.HealthPassing,
		},
	}
	if err := l.client.Agent().CheckRegisterOpts(reg, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
		return l.unreachable("register check "+l.checkID, err)
	}
	l.checkReg = true
	// Registering a check that exists keeps its status, critical if it
	// lapsed: pass it.
	if err := l.pass(ctx); err != nil {
		return err
	}
	id, _, err := l.client.Session().Create(&api.SessionEntry{
		Name:       "meridian lease " + l.cfg.Me.Node,
		NodeChecks: []string{"serfHealth", l.checkID},
		LockDelay:  l.cfg.LockDelay,
		Behavior:   api.SessionBehaviorRelease,
		TTL:        l.cfg.SessionTTL.String(),
	}, wo)
	if err != nil {
		return l.unreachable("create session", err)
	}
	l.session, l.renewed = id, time.Now()
	return nil
}

// read returns the key and the lease it holds.
func (l *Leaser) read(ctx context.Context, q *api.QueryOptions) (*api.KVPair, lease.State, *api.QueryMeta, error) {
	pair, meta, err := l.client.KV().Get(l.cfg.Key, q.WithContext(ctx))
	if err != nil {
		return nil, lease.State{}, nil, l.unreachable("read "+l.cfg.Key, err)
	}
	st, err := l.stateOf(pair)
	return pair, st, meta, err
}

// stateOf returns the lease a key holds. A key that is not held and whose
// value does not read is an unheld lease with no last epoch.
func (l *Leaser) stateOf(pair *api.KVPair) (lease.State, error) {
	if pair == nil {
		return lease.State{}, nil
	}
	h, epoch, next, err := lease.DecodeValue(pair.Value)
	switch {
	case err != nil && pair.Session != "":
		return lease.State{}, fmt.Errorf("consul lease: key %s is held by session %s but %w; the node holding it is not a Meridian node of this version, or another program wrote the key", l.cfg.Key, pair.Session, err)
	case err != nil:
		l.logger.Warn("lease key holds no lease value; it is free, and the next holder's epoch will not count on it", "key", l.cfg.Key, "err", err)
		return lease.State{}, nil
	case pair.Session == "":
		return lease.State{Epoch: epoch, HandoffTo: next}, nil // released: the last holder's epoch
	}
	return lease.State{Holder: h, Epoch: epoch}, nil
}

// Acquire takes the lease if nobody holds it, with an epoch one above the
// last holder's and at least atLeast.
func (l *Leaser) Acquire(ctx context.Context, atLeast uint64) (lease.State, bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.ensureSession(ctx); err != nil {
		return lease.State{}, false, err
	}
	pair, st, _, err := l.read(ctx, &api.QueryOptions{RequireConsistent: true})
	if err != nil {
		return lease.State{}, false, err
	}
	if pair != nil && pair.Session != "" {
		return st, pair.Session == l.session, nil
	}
	epoch := max(st.Epoch+1, atLeast, 1)
	check := &api.KVTxnOp{Verb: api.KVCheckNotExists, Key: l.cfg.Key}
	if pair != nil {
		check = &api.KVTxnOp{Verb: api.KVCheckIndex, Key: l.cfg.Key, Index: pair.ModifyIndex}
	}
	value := lease.EncodeHolder(l.cfg.Me, epoch)
	ops := api.TxnOps{
		{KV: check},
		{KV: &api.KVTxnOp{Verb: api.KVLock, Key: l.cfg.Key, Value: value, Session: l.session}},
	}
	ok, resp, _, err := l.client.Txn().Txn(ops, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return lease.State{}, false, l.unreachable("take "+l.cfg.Key, err)
	}
	if !ok {
		// Another node was first, or the lock delay of the last holder's
		// session runs: the caller tries again.
		var why []string
		if resp != nil {
			for _, e := range resp.Errors {
				why = append(why, e.What)
				if strings.Contains(e.What, "Permission denied") {
					return lease.State{}, false, l.unreachable("take "+l.cfg.Key, errors.New(e.What))
				}
			}
		}
		l.logger.Debug("lease not taken", "key", l.cfg.Key, "why", why)
		_, st, _, err := l.read(ctx, &api.QueryOptions{RequireConsistent: true})
		return st, false, err
	}
	l.value = value
	return lease.State{Holder: l.cfg.Me, Epoch: epoch}, true, nil
}

// Renew passes the session's check, renews the session when half its TTL
// has gone, and confirms this node still holds the key.
func (l *Leaser) Renew(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.session == "" {
		return lease.ErrNotHeld
	}
	if err := l.pass(ctx); err != nil {
		return err
	}
	if time.Since(l.renewed) > l.cfg.SessionTTL/2 {
		entry, _, err := l.client.Session().Renew(l.session, (&api.WriteOptions{}).WithContext(ctx))
		if err != nil {
			return l.unreachable("renew session "+l.session, err)
		}
		if entry == nil {
			l.session = ""
			return fmt.Errorf("%w: its Consul session expired", lease.ErrNotHeld)
		}
		l.renewed = time.Now()
	}
	pair, _, err := l.client.KV().Get(l.cfg.Key, (&api.QueryOptions{RequireConsistent: true}).WithContext(ctx))
	if err != nil {
		return l.unreachable("read "+l.cfg.Key, err)
	}
	if pair == nil || pair.Session != l.session {
		return lease.ErrNotHeld
	}
	return nil
}

// pass passes the session's check, which Consul then fails CheckTTL
// after it received the pass. Caller holds l.mu.
func (l *Leaser) pass(ctx context.Context) error {
	sent := time.Now()
	if err := l.client.Agent().UpdateTTLOpts(l.checkID, "", api.HealthPassing, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
		return l.unreachable("pass check "+l.checkID, err)
	}
	l.passed = sent
	return nil
}

// ValidUntil returns CheckTTL after the last pass of the check that
// Consul took was sent: Consul receives a pass after it is sent, fails
// the check CheckTTL after that and only then ends the session, and
// then keeps the key from others for the lock delay. The zero time if
// this node has no session.
func (l *Leaser) ValidUntil() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.session == "" || l.passed.IsZero() {
		return time.Time{}
	}
	return l.passed.Add(l.cfg.CheckTTL)
}

// Release unlocks the key if this node holds it, keeping its value (and
// so the epoch) for the next holder.
func (l *Leaser) Release(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.session == "" {
		return nil
	}
	// A release writes the value it is given: the one this node wrote.
	_, _, err := l.client.KV().Release(&api.KVPair{Key: l.cfg.Key, Value: l.value, Session: l.session}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return l.unreachable("release "+l.cfg.Key, err)
	}
	return nil
}

// Handoff releases the lease, as Release does, naming node next as the one
// the holder hands it to (lease.State.HandoffTo) in the same write: the
// holder makes sure next is caught up first, and other nodes leave the
// lease to next for a while. It fails if this node does not hold the
// lease (lease.ErrNotHeld).
func (l *Leaser) Handoff(ctx context.Context, next string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.session == "" {
		return lease.ErrNotHeld
	}
	h, epoch, err := lease.DecodeHolder(l.value)
	if err != nil {
		return fmt.Errorf("hand the lease off: %w", err)
	}
	ok, _, err := l.client.KV().Release(&api.KVPair{Key: l.cfg.Key, Value: lease.EncodeHandoff(h, epoch, next), Session: l.session}, (&api.WriteOptions{}).WithContext(ctx))
	if err != nil {
		return l.unreachable("hand off "+l.cfg.Key, err)
	}
	if !ok {
		return fmt.Errorf("hand the lease off to %s: %w", next, lease.ErrNotHeld)
	}
	return nil
}

// Current returns the lease as it stands, read from Consul's leader.
func (l *Leaser) Current(ctx context.Context) (lease.State, error) {
	_, st, _, err := l.read(ctx, &api.QueryOptions{RequireConsistent: true})
	return st, err
}

// Watch sends the lease as it stands and each change, through Consul's
// blocking queries on the key.
func (l *Leaser) Watch(ctx context.Context) <-chan lease.State {
	out := make(chan lease.State, 1)
	go func() {
		defer close(out)
		var (
			index uint64
			last  *lease.State
			wait  = 100 * time.Millisecond
		)
		for ctx.Err() == nil {
			_, st, meta, err := l.read(ctx, &api.QueryOptions{WaitIndex: index, WaitTime: time.Minute})
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				l.logger.Warn("watching the lease", "err", err, "retry_in", wait)
				select {
				case <-ctx.Done():
					return
				case <-time.After(wait):
				}
				wait = min(2*wait, 5*time.Second)
				index = 0
				continue
			}
			wait = 100 * time.Millisecond
			// Consul's blocking queries: an index that goes back means
			// start over (the key was deleted, or a server restored).
			if meta.LastIndex < index {
				index = 0
			} else {
				index = meta.LastIndex
			}
			if last != nil && *last == st {
				continue
			}
			last = &st
			if !lease.SendLatest(ctx, out, st) {
				return
			}
		}
	}()
	return out
}

// Close destroys the session, which releases the key if this node holds
// it (Consul then applies the lock delay, as for a node that died), and
// deregisters the check.
func (l *Leaser) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var errs []error
	if l.session != "" {
		if _, err := l.client.Session().Destroy(l.session, (&api.WriteOptions{}).WithContext(ctx)); err != nil {
			errs = append(errs, l.unreachable("destroy session "+l.session, err))
		}
		l.session = ""
	}
	if l.checkReg {
		if err := l.client.Agent().CheckDeregisterOpts(l.checkID, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
			errs = append(errs, l.unreachable("deregister check "+l.checkID, err))
		}
		l.checkReg = false
	}
	return errors.Join(errs...)
}

var _ lease.Leaser = (*Leaser)(nil)

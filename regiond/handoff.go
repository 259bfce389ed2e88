package regiond

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// A graceful handoff moves the primary to a chosen node without losing or
// failing a write that was acknowledged:
//
//  1. The primary holds new write transactions: they wait at their first
//     write lock (fs.FileSystem.HoldWrites). Those under way commit.
//  2. Once none is under way, the primary's positions are final; it waits
//     until the target has acknowledged applying each of them exactly.
//  3. It stops admitting writes and releases the lease in Consul naming
//     the target (consul.Leaser.Handoff), which takes it at once, one
//     epoch up; the other candidates leave it to the target for a while.
//  4. The held writes go on, and fail: the mount is read-only, and the
//     refusal names the new primary.
//
// Past lease.handoff_timeout in steps 1 and 2 the handoff is abandoned:
// the held writes go on, on the same primary.

// ErrNotPrimary is returned by Handoff on a node that is not the primary.
var ErrNotPrimary = errors.New("this node is not the primary")

// HandoffResult is what a handoff did.
type HandoffResult struct {
	From  string `json:"from"`
	To    string `json:"to"`
	Epoch uint64 `json:"epoch"` // the target's, as primary
	// Positions are the databases' positions when writes stopped, which
	// the target acknowledged.
	Positions map[string]string `json:"positions"`
	// IdleMS is how long transactions under way took to commit, CaughtUpMS
	// until the target had acknowledged every position, and HeldMS how
	// long new writes were held on the old primary; TookMS is the time
	// until the target held the lease.
	IdleMS     float64 `json:"idle_ms"`
	CaughtUpMS float64 `json:"caught_up_ms"`
	HeldMS     float64 `json:"held_ms"`
	TookMS     float64 `json:"took_ms"`
}

// Handoff hands the primary's lease to node to, as the package comment
// above describes, and returns once to holds it. It fails, with the
// primary unchanged, when to is not a reachable candidate replica of this
// node, when another handoff is in progress, or when to does not catch up
// within lease.handoff_timeout. On a node that is not the primary it
// returns an error that wraps ErrNotPrimary.
func (d *Daemon) Handoff(ctx context.Context, to string) (HandoffResult, error) {
	c := d.Config
	res := HandoffResult{From: c.Node, To: to}
	fail := func(format string, args ...any) (HandoffResult, error) {
		return res, fmt.Errorf("handoff to %s: "+format, append([]any{to}, args...)...)
	}
	lr := d.lease
	switch {
	case to == "":
		return res, errors.New("handoff: name the node to hand the lease to")
	case lr == nil:
		return fail("needs lease.type: consul (with the static lease, set lease.static_primary and send SIGHUP)")
	case c.FS.Locks != LocksMount:
		return fail("needs fs.locks: mount, so that the mount can hold new writes (this node has %s)", c.FS.Locks)
	case !d.IsPrimary():
		return res, fmt.Errorf("handoff: %w; the primary is %q", ErrNotPrimary, d.Primary())
	case to == c.Node:
		return fail("this node is the primary already")
	}
	peer, ok := c.Peer(to)
	if !ok || peer.Addr == "" {
		return fail("not a node of replication.peers with an address (peers: %s)", strings.Join(c.PeerNodes(), ", "))
	}
	if !d.handingOff.CompareAndSwap(false, true) {
		return fail("another handoff is in progress")
	}
	d.notifyRole()
	defer func() { d.handingOff.Store(false); d.notifyRole() }()
	timeout := time.Duration(c.Lease.HandoffTimeout)
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	st, err := d.peerStatus(hctx, peer)
	switch {
	case err != nil:
		return fail("cannot reach it: %v", err)
	case !st.GetCandidate():
		return fail("it is not a candidate (lease.candidate: false on %s)", to)
	case st.GetRole() != meridianv1.Role_ROLE_REPLICA:
		return fail("it is not a replica (its role: %s)", st.GetRole())
	}

	f := d.FS
	began := time.Now()
	release, err := d.holdUntilCaughtUp(hctx, to, &res, began)
	defer release()
	abandon := func(why error) (HandoffResult, error) {
		release()
		d.Logger.Warn("handoff abandoned: writes go on here", "to", to, "held", time.Since(began).Round(time.Millisecond), "why", why)
		d.noteHandoff(to, "abandoned: "+why.Error(), 0)
		return fail("abandoned after %v, writes go on on %s: %v", time.Since(began).Round(time.Millisecond), c.Node, why)
	}
	if err != nil {
		return abandon(err)
	}

	// No write after this: the lease goes to the target.
	d.role.mu.Lock()
	if !d.IsPrimary() {
		d.role.mu.Unlock()
		return abandon(errors.New("this node lost the lease meanwhile"))
	}
	epoch := d.stopWrites()
	d.roleEvent(Event{Type: EventRole, Role: RoleReplica, Reason: "handoff to " + to, Epoch: epoch})
	f.SetPrimary(to) // refusals name the new primary
	err = lr.l.Handoff(hctx, to)
	if err != nil {
		// Writes resume only if this node is sure it still holds the
		// lease; else it waits, read-only, for the lease to name the
		// next primary, as after a failed renewal.
		rctx, rcancel := context.WithTimeout(ctx, time.Duration(c.Lease.CheckTTL)/3)
		rerr := lr.l.Renew(rctx)
		rcancel()
		if rerr != nil {
			d.role.mu.Unlock()
			release()
			d.Logger.Error("handoff failed after this node stepped down, and it cannot be sure it holds the lease: it stays read-only until the lease names a primary", "to", to, "err", err, "renew", rerr)
			d.noteHandoff(to, "failed: "+err.Error(), 0)
			return fail("releasing the lease to it: %v; %s stepped down and waits for the lease to name a primary (%v)", err, c.Node, rerr)
		}
		d.admitWrites(epoch)
		d.roleEvent(Event{Type: EventRole, Role: RolePrimary, Primary: c.Node, Epoch: epoch})
		d.role.mu.Unlock()
		return abandon(fmt.Errorf("releasing the lease to it: %w", err))
	}
	d.role.mu.Unlock()
	release()
	res.HeldMS = ms(time.Since(began))
	d.Logger.Info("handoff: stepped down, the lease is released to the target", "to", to, "epoch", epoch, "held", time.Since(began).Round(time.Millisecond))

	// The target takes the lease (the lease loop makes this node follow
	// it) and admits writes: done once it says so.
	for {
		if ls := d.leaseStatus(); ls != nil && ls.Holder == to && ls.Epoch > epoch {
			if st, err := d.peerStatus(hctx, peer); err == nil && st.GetRole() == meridianv1.Role_ROLE_PRIMARY && st.GetEpoch() == ls.Epoch {
				res.Epoch = ls.Epoch
				break
			}
		}
		select {
		case <-hctx.Done():
			d.noteHandoff(to, "released; the target has not taken the lease", 0)
			return fail("the lease was released to it, but it has not taken it within lease.handoff_timeout %v; the other candidates take it after %v", timeout, handoffGrace(c))
		case <-time.After(time.Millisecond):
		}
	}
	res.TookMS = ms(time.Since(began))
	d.Logger.Info("handoff done", "to", to, "epoch", res.Epoch, "took", time.Since(began).Round(time.Millisecond))
	d.noteHandoff(to, "done", res.Epoch)
	return res, nil
}

// holdUntilCaughtUp holds new writes (fs.FileSystem.HoldWrites), waits
// until the transactions under way have committed and node to has
// acknowledged every database at its final position, or hctx ends, and
// records the figures in res. Writes stay held until release (which may be
// called more than once), also when it fails.
func (d *Daemon) holdUntilCaughtUp(hctx context.Context, to string, res *HandoffResult, began time.Time) (release func(), err error) {
	f := d.FS
	if !f.HoldWrites() {
		return func() {}, errors.New("writes are held already")
	}
	var once sync.Once
	release = func() { once.Do(f.ReleaseWrites) }
	timeout := time.Duration(d.Config.Lease.HandoffTimeout)
	d.Logger.Info("handoff: holding new writes until the target has caught up", "to", to, "timeout", timeout)
	d.noteHandoff(to, "started", 0)
	if err := f.WaitWritesIdle(hctx); err != nil {
		return release, fmt.Errorf("transactions under way did not end within lease.handoff_timeout %v: %w", timeout, err)
	}
	res.IdleMS = ms(time.Since(began))
	final := map[string]ltx.Pos{}
	res.Positions = map[string]string{}
	for _, name := range f.DBs() {
		if db := f.DB(name); db != nil {
			if p := db.Log().Pos(); p.TXID > 0 {
				final[name], res.Positions[name] = p, p.String()
			}
		}
	}
	if err := d.awaitAcked(hctx, to, final); err != nil {
		return release, fmt.Errorf("%v (lease.handoff_timeout %v)", err, timeout)
	}
	res.CaughtUpMS = ms(time.Since(began))
	return release, nil
}

// awaitAcked waits until node has acknowledged applying each database at
// its position in want, exactly (a position of this node's log), or ctx
// ends.
func (d *Daemon) awaitAcked(ctx context.Context, node string, want map[string]ltx.Pos) error {
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, name)
	}
	slices.Sort(names)
	s := d.repl.streamer
	for _, name := range names {
		for {
			confirmed, next := s.Confirmed(name, want[name].TXID)
			if _, ok := confirmed[node]; ok {
				break
			}
			select {
			case <-next:
			case <-ctx.Done():
				have := "nothing"
				for _, r := range s.Replicas() {
					if p, ok := r.Acked[name]; r.Node == node && ok {
						have = p.String()
					}
				}
				return fmt.Errorf("%s did not acknowledge %s at %s in time (it acknowledged %s)", node, name, want[name], have)
			}
		}
	}
	return nil
}

// stopWrites makes the primary refuse writes, as a replica does, and
// returns the epoch it held. Caller holds d.role.mu.
func (d *Daemon) stopWrites() uint64 {
	f, r := d.FS, d.repl
	f.SetReadOnly(true)
	epoch := d.epoch.Swap(0)
	r.endGate(f)
	f.SetAcked(nil)
	f.SetPrimary("")
	f.SetLag(nil)
	d.setPrimaryName("")
	return epoch
}

// handoffGrace is how long the other candidates leave a lease handed off
// to a node for that node to take.
func handoffGrace(c Config) time.Duration {
	return 3 * time.Duration(c.Lease.CheckTTL)
}

// ms returns d in milliseconds.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// handoffOnShutdown hands the lease of a primary that shuts down to the
// most caught-up candidate replica (then the one of the most preferred
// region, lease.prefer_regions), so that writes move without a failover.
// If none can take it, the shutdown goes on as without a handoff: the
// primary refuses writes and releases the lease.
func (d *Daemon) handoffOnShutdown(ctx context.Context) {
	c := d.Config
	timeout := min(peerEpochTimeout, time.Duration(c.Lease.HandoffTimeout))
	type candidate struct {
		node   string
		behind uint64 // transactions behind this node, over every database
		pref   int
	}
	mine := map[string]uint64{}
	for _, name := range d.FS.DBs() {
		if db := d.FS.DB(name); db != nil {
			mine[name] = uint64(db.Log().Pos().TXID)
		}
	}
	var cands []candidate
	for _, st := range d.peerStatuses(ctx, "shutting down: asking the candidates for their positions", "", timeout) {
		if !st.GetCandidate() || st.GetRole() != meridianv1.Role_ROLE_REPLICA {
			continue
		}
		theirs := map[string]uint64{}
		for _, p := range st.GetPositions() {
			theirs[p.GetDb()] = p.GetTxid()
		}
		var behind uint64
		for db, txid := range mine {
			behind += txid - min(txid, theirs[db])
		}
		pref := slices.Index(c.Lease.PreferRegions, st.GetRegion())
		if pref < 0 {
			pref = len(c.Lease.PreferRegions)
		}
		cands = append(cands, candidate{st.GetNode(), behind, pref})
	}
	if len(cands) == 0 {
		d.Logger.Warn("shutting down: no candidate replica answered to take the lease by handoff; it moves by failover")
		return
	}
	slices.SortFunc(cands, func(a, b candidate) int {
		if a.behind != b.behind {
			return cmp.Compare(a.behind, b.behind)
		}
		if a.pref != b.pref {
			return cmp.Compare(a.pref, b.pref)
		}
		return strings.Compare(a.node, b.node)
	})
	d.Logger.Info("shutting down: handing the lease off", "to", cands[0].node, "behind", cands[0].behind)
	if _, err := d.Handoff(ctx, cands[0].node); err != nil {
		d.Logger.Warn("shutting down: the handoff failed; the lease moves by failover", "err", err)
	}
}

// handoffStatic is the handoff of a primary whose lease.static_primary now
// names node to (a SIGHUP): it holds new writes until to has every
// transaction, then stops admitting writes. Reload then makes it a
// replica of to, which becomes primary once it sees this node step down
// (awaitStepDown). If to does not catch up within lease.handoff_timeout
// the node steps down all the same, as the configuration says, and it
// returns why: what to lacks goes to lost/ when this node follows it.
func (d *Daemon) handoffStatic(ctx context.Context, to string) error {
	c := d.Config
	if c.FS.Locks != LocksMount {
		return fmt.Errorf("handoff to %s: fs.locks is %s, and only a mount with fs.locks: mount can hold writes", to, c.FS.Locks)
	}
	peer, ok := c.Peer(to)
	if !ok || peer.Addr == "" {
		return fmt.Errorf("handoff to %s: not a node of replication.peers with an address", to)
	}
	if !d.handingOff.CompareAndSwap(false, true) {
		return fmt.Errorf("handoff to %s: another handoff is in progress", to)
	}
	d.notifyRole()
	defer func() { d.handingOff.Store(false); d.notifyRole() }()
	hctx, cancel := context.WithTimeout(ctx, time.Duration(c.Lease.HandoffTimeout))
	defer cancel()
	// Holding writes for a node that cannot catch up is no use: one that
	// is down, or primary already (it started with the new configuration).
	switch st, err := d.peerStatus(hctx, peer); {
	case err != nil:
		return fmt.Errorf("handoff to %s: cannot reach it: %w", to, err)
	case st.GetRole() != meridianv1.Role_ROLE_REPLICA:
		return fmt.Errorf("handoff to %s: it is not a replica (its role: %s)", to, st.GetRole())
	}
	var res HandoffResult
	began := time.Now()
	release, err := d.holdUntilCaughtUp(hctx, to, &res, began)
	defer release()
	d.role.mu.Lock()
	if d.IsPrimary() {
		epoch := d.stopWrites()
		d.FS.SetPrimary(to) // refusals name the new primary
		d.roleEvent(Event{Type: EventRole, Role: RoleReplica, Reason: "handoff to " + to, Epoch: epoch})
	}
	d.role.mu.Unlock()
	if err != nil {
		d.noteHandoff(to, "abandoned: "+err.Error(), 0)
		return fmt.Errorf("handoff to %s: %w", to, err)
	}
	d.Logger.Info("handoff: stepped down for the static primary", "to", to, "held", time.Since(began).Round(time.Millisecond))
	d.noteHandoff(to, "done", 0)
	return nil
}

// awaitStepDown waits, on a node that lease.static_primary now names,
// until the primary it followed no longer admits writes (it hands off,
// handoffStatic), cannot be reached, or lease.handoff_timeout and a
// second more have passed; then the node may become primary without two
// nodes taking writes at once.
func (d *Daemon) awaitStepDown(ctx context.Context) {
	c := d.Config
	old := d.Primary()
	p, ok := c.Peer(old)
	if old == "" || old == c.Node || !ok || p.Addr == "" {
		return
	}
	wait := time.Duration(c.Lease.HandoffTimeout) + time.Second
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := d.peerStatus(sctx, p)
		cancel()
		if err != nil || st.GetRole() != meridianv1.Role_ROLE_PRIMARY {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
	d.Logger.Warn("the old primary still admits writes; taking over as lease.static_primary says (what it commits now goes to its lost/)", "old_primary", old, "waited", wait)
}

// HandoffStatus is the last handoff a node began as primary, for /status.
type HandoffStatus struct {
	To string `json:"to"`
	// State is "started" while it runs, then "done", or "abandoned: "
	// and why, or another outcome as its event says (Event.Reason).
	State string    `json:"state"`
	Epoch uint64    `json:"epoch,omitempty"` // the target's, once done
	Since time.Time `json:"since"`
}

// noteHandoff publishes a handoff event and keeps it for /status.
func (d *Daemon) noteHandoff(to, state string, epoch uint64) {
	d.handoffMu.Lock()
	d.handoff = &HandoffStatus{To: to, State: state, Epoch: epoch, Since: time.Now()}
	d.handoffMu.Unlock()
	d.events.publish(Event{Type: EventHandoff, Primary: to, Epoch: epoch, Reason: state})
}

// lastHandoff returns the last handoff noted, nil if none.
func (d *Daemon) lastHandoff() *HandoffStatus {
	d.handoffMu.Lock()
	defer d.handoffMu.Unlock()
	if d.handoff == nil {
		return nil
	}
	h := *d.handoff
	return &h
}

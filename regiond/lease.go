package regiond

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/meridian-db/meridian/lease"
	"github.com/meridian-db/meridian/lease/consul"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
)

// Timings of the Consul lease loop.
const (
	// acquireRetry is how often a candidate tries to take a free lease
	// (Consul refuses it during the lock delay after a holder died).
	acquireRetry = 50 * time.Millisecond
	// preferStep is the head start each place in lease.prefer_regions
	// gives a candidate over the next, once the lease is free.
	preferStep = 300 * time.Millisecond
	// peerCheckEvery is how often a candidate retrying for a free lease
	// asks the other candidates for their positions again (a Status RPC
	// to each), rather than on every retry.
	peerCheckEvery = 250 * time.Millisecond
)

// leaseRunner drives the node's role from the lease in Consul: it follows
// the node the lease names, takes the lease when it is free and this node
// is a candidate that has caught up, renews it while primary, and steps
// down when it can no longer be sure it holds it.
type leaseRunner struct {
	l      *consul.Leaser
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	status LeaseStatus // the lease as last read, for /status
	last   string      // the node the lease last named

	// The last answer of candidateAhead and when it was asked; the lease
	// loop's own.
	ahead   string
	aheadAt time.Time
}

// leaseStatus returns the lease as this node last read it, nil without
// the Consul lease.
func (d *Daemon) leaseStatus() *LeaseStatus {
	lr := d.lease
	if lr == nil {
		return nil
	}
	lr.mu.Lock()
	defer lr.mu.Unlock()
	st := lr.status
	return &st
}

// read records the lease as the watch read it, when it changed.
func (lr *leaseRunner) read(st lease.State) {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	if st.Held() {
		lr.last = st.Holder.Node
	}
	lr.status.Holder, lr.status.Epoch, lr.status.Since = st.Holder.Node, st.Epoch, time.Now()
}

// lastHolder returns the node the lease last named, "" if none yet.
func (lr *leaseRunner) lastHolder() string {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	return lr.last
}

// startLease starts the lease loop of lease.type: consul.
func (d *Daemon) startLease() error {
	c := d.Config
	token, err := c.Lease.ConsulToken()
	if err != nil {
		return fmt.Errorf("lease.consul_token_file: %w", err)
	}
	l, err := consul.New(consul.Config{
		Token:      token,
		Address:    c.Lease.ConsulURL,
		Key:        c.Lease.ConsulKey,
		Me:         lease.Holder{Node: c.Node, Region: c.Region, Replication: c.AdvertiseAddr(), Admin: c.Admin.Listen},
		SessionTTL: time.Duration(c.Lease.TTL),
		CheckTTL:   time.Duration(c.Lease.CheckTTL),
		LockDelay:  time.Duration(c.Lease.LockDelay),
		Logger:     d.Logger.With("component", "lease"),
	})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.lease = &leaseRunner{l: l, cancel: cancel, done: make(chan struct{}),
		status: LeaseStatus{Type: LeaseConsul, Consul: c.Lease.ConsulURL, Key: c.Lease.ConsulKey}}
	lr := d.lease
	go func() {
		defer close(lr.done)
		d.runLease(ctx, lr)
	}()
	d.Logger.Info("following the lease in Consul", "consul_url", c.Lease.ConsulURL, "key", c.Lease.ConsulKey,
		"candidate", c.Lease.Candidate, "check_ttl", time.Duration(c.Lease.CheckTTL), "lock_delay", time.Duration(c.Lease.LockDelay))
	return nil
}

// stopLease ends the lease loop. A primary refuses writes first, then
// releases the lease, so the next candidate takes it without the lock
// delay; the session and its check are removed.
func (d *Daemon) stopLease() {
	lr := d.lease
	if lr == nil {
		return
	}
	d.lease = nil
	lr.cancel()
	<-lr.done
	if d.IsPrimary() && d.FS != nil {
		d.FS.SetReadOnly(true)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := lr.l.Release(ctx); err != nil {
			d.Logger.Warn("shutting down: could not release the lease; it moves once Consul ends the session", "err", err)
		}
		cancel()
	}
	if err := lr.l.Close(); err != nil {
		d.Logger.Warn("shutting down: the lease's Consul session", "err", err)
	}
}

// runLease is the lease loop (see leaseRunner).
func (d *Daemon) runLease(ctx context.Context, lr *leaseRunner) {
	c, l := d.Config, lr.l
	checkTTL := time.Duration(c.Lease.CheckTTL)
	renewEvery := checkTTL / 3
	renew := time.NewTicker(renewEvery)
	defer renew.Stop()
	try := time.NewTimer(time.Hour)
	try.Stop()
	defer try.Stop()
	var (
		st        lease.State
		freeSince time.Time // when the lease was seen free; zero while held
		renewed   = time.Now()
		watch     = l.Watch(ctx)
	)
	for {
		select {
		case <-ctx.Done():
			return
		case s, ok := <-watch:
			if !ok {
				return
			}
			st = s
			lr.read(st)
			d.leaseChanged(ctx, st)
			switch {
			case st.Held():
				freeSince = time.Time{}
				try.Stop()
			case st.HandoffTo == c.Node && c.Lease.Candidate:
				// The last holder made sure this node is caught up.
				freeSince = time.Now()
				try.Reset(0)
			case st.HandoffTo != "" && c.Lease.Candidate:
				// Left to the node it was handed to, for a while.
				freeSince = time.Now()
				try.Reset(max(d.headStart(), handoffGrace(c)))
			case freeSince.IsZero():
				freeSince = time.Now()
				if c.Lease.Candidate {
					try.Reset(d.headStart())
				}
			}
		case <-try.C:
			if st.Held() || !c.Lease.Candidate {
				continue
			}
			if began := time.Now(); d.tryLease(ctx, lr, freeSince, st.HandoffTo == c.Node) {
				renewed = began
			} else {
				try.Reset(acquireRetry)
			}
		case <-renew.C:
			// Bounded so that a primary whose renewals fail steps down
			// (at 2/3 of the check TTL) before Consul ends its session.
			began := time.Now()
			rctx, cancel := context.WithTimeout(ctx, renewEvery/2)
			err := l.Renew(rctx)
			cancel()
			if !d.IsPrimary() {
				// Renew passes the check, so that Acquire's session stays
				// valid. It succeeds only for the holder: a node that
				// stepped down while its session kept the lease (Consul
				// slow rather than gone) gives it up, or nobody could
				// take it.
				if err == nil && !d.handingOff.Load() {
					// (A handoff releases it itself, to its target.)
					d.Logger.Warn("this node holds the lease but stepped down: releasing it")
					rctx, cancel := context.WithTimeout(ctx, renewEvery)
					if err := l.Release(rctx); err != nil {
						d.Logger.Warn("releasing the lease", "err", err)
					}
					cancel()
				}
				continue
			}
			if err == nil {
				renewed = began // Consul's check TTL runs from about then
				d.fenceWrites(l)
				continue
			}
			// Consul ends the session checkTTL after the last renewal
			// that reached it; step down before then.
			if errors.Is(err, lease.ErrNotHeld) || time.Since(renewed) >= 2*checkTTL/3 {
				d.leaseLost(fmt.Sprintf("the lease could not be renewed for %v: %v", time.Since(renewed).Round(time.Millisecond), err))
			} else {
				d.Logger.Warn("lease renewal failed; retrying", "err", err, "since_renewed", time.Since(renewed).Round(time.Millisecond))
			}
		}
	}
}

// fenceMargin is the part of the check TTL by which a primary's writes
// stop before its lease can have run out: the time an admitted write
// takes to complete.
const fenceMargin = 10 // percent

// fenceWrites moves the mount's write deadline to a little before the
// lease can run out (lease.Leaser.ValidUntil): a primary paused past it
// (SIGSTOP, a frozen VM) refuses writes as soon as it runs again, before
// its lease loop notices the lease is gone.
func (d *Daemon) fenceWrites(l lease.Leaser) {
	until := l.ValidUntil()
	if until.IsZero() {
		until = time.Now() // no session: nothing holds the lease for this node
	}
	d.FS.SetWriteDeadline(until.Add(-time.Duration(d.Config.Lease.CheckTTL) * fenceMargin / 100))
}

// headStart is how long a candidate waits once the lease is free before it
// tries to take it. The first region of lease.prefer_regions tries at once;
// the others wait out the lock delay (which holds every candidate off after
// a primary died) and then preferStep per place after the first (regions
// not listed come after those listed).
func (d *Daemon) headStart() time.Duration {
	pref := d.Config.Lease.PreferRegions
	i := slices.Index(pref, d.Config.Region)
	if i < 0 {
		i = len(pref)
	}
	if i == 0 {
		return 0
	}
	return time.Duration(d.Config.Lease.LockDelay) + time.Duration(i)*preferStep
}

// leaseChanged follows the node the lease names, or steps down when the
// lease names another node or nobody while this node is primary.
func (d *Daemon) leaseChanged(ctx context.Context, st lease.State) {
	me := d.Config.Node
	switch {
	case st.Holder.Node == me:
		// Taken by tryLease, which made the node primary.
	case st.Held():
		if d.IsPrimary() || d.Primary() != st.Holder.Node {
			d.Logger.Info("the lease names the primary", "primary", st.Holder.Node, "region", st.Holder.Region, "epoch", st.Epoch)
			if err := d.SetPrimary(ctx, st.Holder.Node); err != nil {
				d.Logger.Error("following the primary the lease names", "primary", st.Holder.Node, "err", err)
			}
		}
	case d.IsPrimary():
		d.leaseLost("the lease in Consul names no holder")
	case st.HandoffTo != "":
		d.Logger.Info("the lease is handed off", "to", st.HandoffTo, "last_epoch", st.Epoch, "candidate", d.Config.Lease.Candidate)
	default:
		d.Logger.Info("the lease is free", "last_epoch", st.Epoch, "candidate", d.Config.Lease.Candidate)
	}
}

// tryLease takes the lease if this node has caught up with the primary it
// followed (or has waited long enough for it), and makes the node primary
// at the lease's epoch. It reports whether the node is primary now.
// handedOff: the last holder handed the lease to this node, once it had
// acknowledged the holder's last positions: there is nothing to wait for.
func (d *Daemon) tryLease(ctx context.Context, lr *leaseRunner, freeSince time.Time, handedOff bool) bool {
	if handedOff {
		return d.acquire(ctx, lr, freeSince)
	}
	// Files the primary sent are applied in milliseconds; what it
	// announced and never sent is not worth a longer wait. A candidate
	// further ahead (below) is worth more: it may have commits that only
	// it acknowledged.
	if behind := d.behindPrimary(); behind != "" {
		if time.Since(freeSince) < time.Duration(d.Config.Lease.CheckTTL) {
			return false
		}
		d.Logger.Warn("taking the lease behind the last position the primary announced: what it committed past what this node applied is lost",
			"behind", behind, "waited", time.Since(freeSince).Round(time.Millisecond))
	}
	if time.Since(lr.aheadAt) >= peerCheckEvery {
		lr.ahead, lr.aheadAt = d.candidateAhead(ctx, lr.lastHolder()), time.Now()
	}
	if ahead := lr.ahead; ahead != "" {
		if time.Since(freeSince) < 3*time.Duration(d.Config.Lease.CheckTTL) {
			return false // it takes the lease; this node follows it
		}
		d.Logger.Warn("taking the lease although another candidate has applied more: what only it has is lost",
			"ahead", ahead, "waited", time.Since(freeSince).Round(time.Millisecond))
	}
	return d.acquire(ctx, lr, freeSince)
}

// acquire takes the lease, one epoch above any this node has seen, and
// makes the node primary at its epoch; it reports whether it did.
func (d *Daemon) acquire(ctx context.Context, lr *leaseRunner, freeSince time.Time) bool {
	l := lr.l
	seen, err := (&replication.EpochFile{Path: filepath.Join(d.Config.DataDir, epochFile)}).Load(ctx)
	if err != nil {
		d.Logger.Error("taking the lease: reading the epoch this node has seen", "err", err)
		return false
	}
	st, held, err := l.Acquire(ctx, seen+1)
	if err != nil {
		d.Logger.Warn("taking the lease", "err", err)
		return false
	}
	if !held {
		return false
	}
	d.fenceWrites(l)
	d.role.mu.Lock()
	err = d.becomePrimary(ctx, true, st.Epoch)
	d.role.mu.Unlock()
	if err != nil {
		d.Logger.Error("took the lease but could not become primary; releasing it", "epoch", st.Epoch, "err", err)
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = l.Release(rctx)
		cancel()
		return false
	}
	d.Logger.Info("took the lease", "epoch", st.Epoch, "free_for", time.Since(freeSince).Round(time.Millisecond))
	return true
}

// behindPrimary says which databases have not caught up with the position
// the primary last announced to this node, "" if none (or if it followed
// no one).
func (d *Daemon) behindPrimary() string {
	cl := d.repl.client()
	if cl == nil {
		return ""
	}
	s := cl.Status()
	var behind []string
	for db, p := range s.Primary {
		if a := s.Applied[db]; a.Pos.TXID < p.TXID {
			behind = append(behind, fmt.Sprintf("%s at %s of %s", db, a.Pos.TXID, p.TXID))
		}
	}
	slices.Sort(behind)
	return strings.Join(behind, ", ")
}

// candidateAhead says which reachable candidate, if any, has applied
// more than this node in some database and less in none: that one, not
// this node, should take the lease, so that a commit acknowledged by
// fewer than every replica (replication.sync_acks) survives. "" if none.
// It does not ask the node that held the lease last (it is gone, or
// paused, or cut off: not a candidate to wait for), and gives the others
// half the check TTL to answer: a peer that does not answer in that time
// would not take the lease sooner.
func (d *Daemon) candidateAhead(ctx context.Context, lastHolder string) string {
	mine := map[string]uint64{}
	for _, name := range d.FS.DBs() {
		if db := d.FS.DB(name); db != nil {
			mine[name] = uint64(db.Log().Pos().TXID)
		}
	}
	timeout := min(peerEpochTimeout, time.Duration(d.Config.Lease.CheckTTL)/2)
	for _, resp := range d.peerStatuses(ctx, "", lastHolder, timeout) {
		if !resp.GetCandidate() || resp.GetRole() == meridianv1.Role_ROLE_PRIMARY {
			continue
		}
		ahead, behind := false, false
		theirs := map[string]bool{}
		for _, p := range resp.GetPositions() {
			theirs[p.GetDb()] = true
			switch my := mine[p.GetDb()]; {
			case p.GetTxid() > my:
				ahead = true
			case p.GetTxid() < my:
				behind = true
			}
		}
		for name, txid := range mine {
			if !theirs[name] && txid > 0 {
				behind = true
			}
		}
		if ahead && !behind {
			return resp.GetNode()
		}
	}
	return ""
}

// leaseLost makes a primary that can no longer be sure it holds the lease
// refuse writes at once and follow no one until the lease names the next
// primary.
func (d *Daemon) leaseLost(why string) {
	d.role.mu.Lock()
	defer d.role.mu.Unlock()
	if !d.IsPrimary() {
		return
	}
	epoch := d.stopWrites()
	d.Logger.Error("stepped down: lost the lease; writes are refused until the lease names a primary", "why", why, "epoch", epoch)
	d.roleEvent(Event{Type: EventRole, Role: RoleReplica, Reason: "lease lost", Epoch: epoch})
}

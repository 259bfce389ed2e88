package regiond

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"sync"
	"time"

	"github.com/meridian-db/meridian/lease"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
	"github.com/meridian-db/meridian/replication/rpc"
)

// heldEpochFile is the file in data_dir where a node keeps the lease
// epoch it last held as primary; epochFile (the newest it has seen, as
// primary or from a primary) is raised with it.
const heldEpochFile = "primary-epoch"

// peerEpochTimeout bounds how long a node that becomes primary at runtime
// asks its peers for the newest epoch they have seen.
const peerEpochTimeout = 2 * time.Second

// role is a node's part in the cluster, which can change while it runs:
// the primary (it holds the write lease at an epoch) or a replica (of a
// named primary).
type role struct {
	mu      sync.Mutex // held while the role changes
	primary string     // the primary's node name; guarded by stateMu
	deposed string     // why the node stepped down by itself; guarded by stateMu
	stateMu sync.Mutex
}

// Primary returns the node the daemon takes for the primary.
func (d *Daemon) Primary() string {
	d.role.stateMu.Lock()
	defer d.role.stateMu.Unlock()
	return d.role.primary
}

// IsPrimary reports whether the daemon holds the write lease now.
func (d *Daemon) IsPrimary() bool { return d.epoch.Load() != 0 }

// SetPrimary makes node the primary as far as this daemon is concerned:
// this node becomes primary if node is its own name, else a replica of
// node. The mount stays mounted and its readers undisturbed.
//
// Becoming a replica, the node refuses new writes at once (a write
// transaction in progress fails; a commit waiting for replicas in sync
// durability fails), ends the streams it serves, and follows node from its
// own position: what it committed that node lacks goes to data_dir/lost/
// when node's snapshot replaces it. Becoming primary, it stops following
// once the group being applied is done, takes a lease epoch higher than
// any it or its reachable peers have seen (persisted before any frame
// carries it), and admits writes.
func (d *Daemon) SetPrimary(ctx context.Context, node string) error {
	d.role.mu.Lock()
	defer d.role.mu.Unlock()
	if d.FS == nil || d.repl == nil {
		return errors.New("set primary: the daemon is not open")
	}
	if node == d.Config.Node {
		if d.IsPrimary() {
			return nil
		}
		err := d.becomePrimary(ctx, true, 0)
		if err != nil {
			// Back to following the primary it had: better a replica
			// than a node that neither writes nor follows.
			if prev := d.Primary(); prev != "" && prev != node {
				err = errors.Join(err, d.becomeReplica(prev))
				err = fmt.Errorf("%w; still a replica of %s", err, prev)
			}
		}
		return err
	}
	if !d.IsPrimary() && d.Primary() == node {
		return nil
	}
	return d.becomeReplica(node)
}

// becomePrimary makes the node primary. atRuntime: it was a replica while
// running, and its peers are asked for their epochs. leaseEpoch, if not 0,
// is the epoch a lease gave it (Consul), which it takes as it is. Caller
// holds d.role.mu.
func (d *Daemon) becomePrimary(ctx context.Context, atRuntime bool, leaseEpoch uint64) error {
	c, f, r := d.Config, d.FS, d.repl
	f.SetReadOnly(true)
	r.stopFollowing()
	if err := f.EndApplying(); err != nil {
		return fmt.Errorf("become primary: %w", err)
	}
	// Last before writes: a raised epoch fences the old primary off
	// this node for good.
	var (
		epoch uint64
		err   error
	)
	if leaseEpoch != 0 {
		epoch, err = leaseEpoch, d.storeEpoch(ctx, leaseEpoch)
	} else {
		epoch, err = d.takeEpoch(ctx, atRuntime)
	}
	if err != nil {
		return fmt.Errorf("become primary: %w", err)
	}
	d.admitWrites(epoch)
	d.Logger.Info("serving as primary ("+string(c.Lease.Type)+" lease)", "epoch", epoch, "mount_dir", c.MountDir, "dbs", f.DBs())
	d.roleEvent(Event{Type: EventRole, Role: RolePrimary, Primary: c.Node, Epoch: epoch})
	return nil
}

// admitWrites makes the mount writable for the primary at epoch, with
// the write path replication needs. Caller holds d.role.mu.
func (d *Daemon) admitWrites(epoch uint64) {
	c, f, r := d.Config, d.FS, d.repl
	f.SetPrimary("")
	f.SetLag(func() string { return "0" })
	if r.streamer != nil {
		f.SetAcked(ackedBy(r.streamer, c.PeerNodes()))
		if c.Replication.Durability == DurabilitySync {
			r.startGate(f, c)
		}
	}
	d.setPrimaryName(c.Node)
	// Writable before the status says primary (the epoch held), so that
	// whoever sees the node as primary can write to it.
	f.SetReadOnly(false)
	d.epoch.Store(epoch)
	d.notifyRole()
}

// becomeReplica makes the node a replica of primary. Caller holds
// d.role.mu.
func (d *Daemon) becomeReplica(primary string) error {
	c, f, r := d.Config, d.FS, d.repl
	f.SetReadOnly(true)
	wasPrimary := d.epoch.Swap(0) != 0
	r.endGate(f)
	r.stopFollowing()
	f.SetAcked(nil)
	f.SetPrimary(primary)
	d.setPrimaryName(primary)
	if err := r.startFollowing(f, c, primary, &d.events, &d.pos); err != nil {
		f.SetLag(nil)
		return fmt.Errorf("become a replica of %s: %w", primary, err)
	}
	if r.client() != nil {
		f.SetLag(r.lag)
	} else {
		f.SetLag(nil)
	}
	if wasPrimary {
		d.Logger.Info("stepped down: serving read-only as a replica ("+string(c.Lease.Type)+" lease)", "primary", primary, "mount_dir", c.MountDir)
	} else {
		d.Logger.Info("serving read-only as a replica ("+string(c.Lease.Type)+" lease)", "primary", primary, "mount_dir", c.MountDir)
	}
	d.roleEvent(Event{Type: EventRole, Role: RoleReplica, Primary: primary})
	return nil
}

// deposed steps the node down when a replica shows it a lease epoch newer
// than the one it holds: another node holds the lease. The node refuses
// writes, as a replica does, and follows no one, for it does not know the
// new primary: a SIGHUP naming the primary (or a restart) takes it from
// there. Its epoch files stay as they were, so a restart as primary is
// deposed again while the replicas remember the newer epoch.
func (d *Daemon) deposed(epoch uint64, replica string) {
	d.role.mu.Lock()
	defer d.role.mu.Unlock()
	held := d.epoch.Load()
	if held == 0 || held >= epoch || d.repl.ctx.Err() != nil {
		return // not primary, not deposed, or shutting down
	}
	f, r := d.FS, d.repl
	f.SetReadOnly(true)
	d.epoch.Store(0)
	r.endGate(f)
	f.SetAcked(nil)
	f.SetPrimary("")
	f.SetLag(nil)
	d.setPrimaryName("")
	d.role.stateMu.Lock()
	d.role.deposed = fmt.Sprintf("deposed: replica %s has seen lease epoch %d, newer than this node's %d; another node holds the lease", replica, epoch, held)
	d.role.stateMu.Unlock()
	d.Logger.Error("stepped down: a replica has seen a newer lease epoch, so another node is primary; writes are refused until lease.static_primary names the primary and regiond gets a SIGHUP",
		"replica", replica, "epoch", epoch, "held", held)
	d.roleEvent(Event{Type: EventRole, Role: RoleReplica, Reason: "deposed", Epoch: epoch})
}

// deposedWhy says why the node stepped down (deposed), "" if it did not
// or has taken a role since.
func (d *Daemon) deposedWhy() string {
	d.role.stateMu.Lock()
	defer d.role.stateMu.Unlock()
	return d.role.deposed
}

func (d *Daemon) setPrimaryName(node string) {
	d.role.stateMu.Lock()
	d.role.primary = node
	d.role.deposed = ""
	d.role.stateMu.Unlock()
	d.notifyRole()
}

// takeEpoch returns the lease epoch the node holds as primary, stored in
// data_dir before it returns. A node that was the last primary it knows
// of keeps its epoch across a restart; one that becomes primary takes one
// higher than any it has seen, and, atRuntime, than any its reachable
// peers have seen. A fresh node starts at 1.
func (d *Daemon) takeEpoch(ctx context.Context, atRuntime bool) (uint64, error) {
	seenFile := &replication.EpochFile{Path: filepath.Join(d.Config.DataDir, epochFile)}
	heldFile := &replication.EpochFile{Path: filepath.Join(d.Config.DataDir, heldEpochFile)}
	seen, err := seenFile.Load(ctx)
	if err != nil {
		return 0, err
	}
	held, err := heldFile.Load(ctx)
	if err != nil {
		return 0, err
	}
	if !atRuntime && held != 0 && held == seen {
		if d.static != nil {
			if _, ok, err := d.static.Acquire(ctx, held); err != nil || !ok {
				return 0, fmt.Errorf("the static lease does not name this node: %v", err)
			}
		}
		return held, nil
	}
	newest := seen
	if atRuntime {
		newest = max(newest, d.peerEpochs(ctx))
	}
	epoch := newest + 1
	if d.static != nil {
		st, held, err := d.static.Acquire(ctx, epoch)
		if err != nil {
			return 0, err
		}
		if !held {
			return 0, fmt.Errorf("the static lease names %s, not this node", st.Holder.Node)
		}
		// A node deposed while the configuration still named it holds
		// the static lease at its old epoch: the newest seen decides.
		epoch = max(epoch, st.Epoch)
	}
	if err := seenFile.Store(ctx, epoch); err != nil {
		return 0, err
	}
	if err := heldFile.Store(ctx, epoch); err != nil {
		return 0, err
	}
	return epoch, nil
}

// storeEpoch stores epoch, given by the lease, as the epoch the node holds
// and the newest it has seen. A lease epoch not above the newest this node
// has seen is refused: the replicas that have seen it would refuse it too.
func (d *Daemon) storeEpoch(ctx context.Context, epoch uint64) error {
	seenFile := &replication.EpochFile{Path: filepath.Join(d.Config.DataDir, epochFile)}
	heldFile := &replication.EpochFile{Path: filepath.Join(d.Config.DataDir, heldEpochFile)}
	seen, err := seenFile.Load(ctx)
	if err != nil {
		return err
	}
	if epoch <= seen {
		return fmt.Errorf("the lease's epoch %d is not above %d, which this node has seen", epoch, seen)
	}
	if err := seenFile.Store(ctx, epoch); err != nil {
		return err
	}
	return heldFile.Store(ctx, epoch)
}

// peerEpochs asks every peer with a replication address for the newest
// epoch it has seen, and returns the highest answer; peers that do not
// answer within peerEpochTimeout are left out, and logged.
func (d *Daemon) peerEpochs(ctx context.Context) uint64 {
	var newest uint64
	for _, resp := range d.peerStatuses(ctx, "becoming primary without the lease epoch of a peer", "", peerEpochTimeout) {
		newest = max(newest, resp.GetEpoch())
	}
	return newest
}

// peerStatuses asks every peer with a replication address but skip for
// its status (the Status RPC), within timeout, and returns the answers;
// a peer that does not answer is logged with why, after what (unless
// what is "").
func (d *Daemon) peerStatuses(ctx context.Context, what, skip string, timeout time.Duration) []*meridianv1.StatusResponse {
	c := d.Config
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var (
		mu    sync.Mutex
		resps []*meridianv1.StatusResponse
		wg    sync.WaitGroup
	)
	for _, p := range c.Replication.Peers {
		if p.Addr == "" || p.Node == skip {
			continue
		}
		wg.Go(func() {
			resp, err := d.peerStatus(ctx, p)
			if err == nil {
				mu.Lock()
				resps = append(resps, resp)
				mu.Unlock()
			} else if what != "" {
				d.Logger.Warn(what, "peer", p.Node, "err", err)
			}
		})
	}
	wg.Wait()
	return resps
}

// peerStatus asks peer p for its status (the Status RPC).
func (d *Daemon) peerStatus(ctx context.Context, p Peer) (*meridianv1.StatusResponse, error) {
	var tlsConfig *tls.Config
	if !d.Config.TLS.Insecure {
		var err error
		if tlsConfig, err = d.Config.ClientTLS(p.Node); err != nil {
			return nil, err
		}
	}
	dl, err := rpc.Dial(p.Addr, tlsConfig, d.repl.logger)
	if err != nil {
		return nil, err
	}
	defer func() { _ = dl.Close() }()
	return dl.Status(ctx)
}

// Reload applies a changed configuration: with the static lease,
// lease.static_primary moves the primary (SetPrimary). Other keys cannot change while the daemon runs:
// their new values are reported in the error, and left as they were.
func (d *Daemon) Reload(ctx context.Context, c Config) error {
	old := d.Config
	cmp := c
	cmp.Lease.StaticPrimary = old.Lease.StaticPrimary
	var ignored error
	if !reflect.DeepEqual(cmp, old) {
		ignored = fmt.Errorf("reload: only lease.static_primary changes while regiond runs; the other changes (%s) wait for a restart", changedKeys(old, cmp))
	}
	if c.Lease.Type != LeaseStatic || old.Lease.Type != LeaseStatic || d.static == nil || c.Lease.StaticPrimary == d.Primary() {
		return ignored // the Consul lease moves the primary, not the file
	}
	d.static.Set(d.holder(c.Lease.StaticPrimary))
	st, err := d.static.Current(ctx)
	if err == nil {
		// A move, not a failover: the old primary hands off (no write it
		// acknowledged is lost), and the new one waits for it.
		switch next := st.Holder.Node; {
		case d.IsPrimary() && next != d.Config.Node:
			if herr := d.handoffStatic(ctx, next); herr != nil {
				d.Logger.Warn("SIGHUP: the handoff did not complete; stepping down all the same, as lease.static_primary says", "to", next, "err", herr)
			}
		case next == d.Config.Node && !d.IsPrimary():
			d.awaitStepDown(ctx)
		}
		err = d.SetPrimary(ctx, st.Holder.Node)
	}
	if err != nil {
		return errors.Join(err, ignored)
	}
	return ignored
}

// holder returns node as a lease names it, from this node's
// configuration: its own settings, or its entry in replication.peers.
func (d *Daemon) holder(node string) lease.Holder {
	c := d.Config
	if node == c.Node {
		return lease.Holder{Node: node, Region: c.Region, Replication: c.AdvertiseAddr(), Admin: c.Admin.Listen}
	}
	p, _ := c.Peer(node)
	return lease.Holder{Node: node, Region: p.Region, Replication: p.Addr, Admin: p.Admin}
}

// changedKeys names the top-level sections of the configuration that
// differ between a and b.
func changedKeys(a, b Config) string {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	t := va.Type()
	var keys []string
	for i := range t.NumField() {
		if !reflect.DeepEqual(va.Field(i).Interface(), vb.Field(i).Interface()) {
			keys = append(keys, t.Field(i).Tag.Get("yaml"))
		}
	}
	return fmt.Sprint(keys)
}

// Package regiond is Meridian's per-region daemon: its configuration and
// the Daemon that runs the FUSE capture layer (and, as they land,
// replication, leases, the router and the admin API).
package regiond

import (
	"context"
	"fmt"
	"hash/fnv"
	"log/slog"
	"os/exec"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/lease"
	"github.com/meridian-db/meridian/ltx"
	"github.com/meridian-db/meridian/replication"
)

// Daemon is one node of a Meridian cluster.
type Daemon struct {
	Config Config
	Logger *slog.Logger

	// FS is the FUSE mount; set by Open.
	FS *fs.FileSystem

	// LockHolder returns the command that runs fs.RunLockHolder, which a
	// replica with fs.locks: kernel needs (regiond runs itself as
	// "regiond lock-holder"); see fs.FileSystem.LockHolder.
	LockHolder func() *exec.Cmd

	repl   *replicationNode
	lease  *leaseRunner  // lease.type: consul; nil otherwise
	static *lease.Static // lease.type: static; nil otherwise
	admin  *adminServer
	role   role
	events events
	pos    positions
	// roleChanged is closed and replaced when who takes writes may have
	// changed (notifyRole): the router waits on it.
	roleMu      sync.Mutex
	roleChanged chan struct{}
	router      *routerServer
	// tel is the node's OpenTelemetry (telemetry.go), from Open on.
	tel *telemetry
	// epoch is the lease epoch the node holds while it is primary, 0
	// while it is a replica.
	epoch atomic.Uint64
	// handingOff is set while a handoff runs (Handoff); handoff is the
	// last one this node began (noteHandoff).
	handingOff atomic.Bool
	handoffMu  sync.Mutex
	handoff    *HandoffStatus
}

// NewDaemon returns a daemon for a validated config.
func NewDaemon(c Config, logger *slog.Logger) *Daemon {
	return &Daemon{Config: c, Logger: logger, events: events{node: c.Node, done: make(chan struct{})},
		pos: positions{pos: map[string]uint64{}, changed: make(chan struct{})}, roleChanged: make(chan struct{})}
}

// committed publishes a commit of db, at info, on /events and /metrics.
func (d *Daemon) committed(db string, info ltx.FileInfo) {
	d.pos.set(db, uint64(info.Header.MaxTXID))
	d.tel.committed(db)
	if d.events.listening() {
		d.events.publish(Event{Type: EventCommit, DB: db, Pos: info.Pos().String(), Size: info.Size})
	}
}

// Open recovers every database, mounts the filesystem and sets its mode
// from the lease: read-write on the primary, read-only elsewhere.
func (d *Daemon) Open(ctx context.Context) error {
	if err := d.startTelemetry(ctx); err != nil {
		return err
	}
	if err := d.open(ctx); err != nil {
		d.stopTelemetry()
		return err
	}
	return nil
}

func (d *Daemon) open(ctx context.Context) error {
	c := d.Config
	f := fs.New(c.DataDir, c.MountDir)
	f.NodeID = NodeID(c.Node)
	f.Retention = time.Duration(c.Replication.Retention)
	f.MaxRetention = time.Duration(c.Replication.MaxRetention)
	// Often enough for retention to mean what it says.
	f.MaintainInterval = min(max(f.Retention/2, time.Second), fs.DefaultMaintainInterval)
	f.KernelLocks = c.FS.Locks == LocksKernel
	f.LockHolder = d.LockHolder
	f.SpareFill = c.FS.SpareFiles
	f.LogSegmentSize = c.FS.LogSegmentSize
	f.Passthrough = c.FS.Passthrough
	f.Logger = d.Logger.With("component", "fs")
	f.SetOnCommit(d.committed)
	if tp := d.tel.tracerProvider(); tp != nil {
		f.SetTracing(tp, d.tel.writes.parent, c.Telemetry.SampleCommits)
	}
	// Read-only until the role is taken: no app ever sees a writable
	// replica, nor a primary's mount before its commits can wait for
	// replicas (sync durability).
	f.SetReadOnly(true)
	if err := f.Open(ctx); err != nil {
		return err
	}
	d.FS = f
	for _, name := range f.DBs() {
		if db := f.DB(name); db != nil {
			d.pos.set(name, uint64(db.Log().Pos().TXID))
		}
	}
	repl, err := d.openReplication(f)
	if err == nil {
		d.repl = repl
		d.role.mu.Lock()
		switch {
		case c.Lease.Type == LeaseConsul:
			// Read-only and following no one until the lease says who
			// the primary is (startLease).
		default:
			d.static = lease.NewStatic(d.holder(c.Node), d.holder(c.Lease.StaticPrimary))
			var st lease.State
			if st, err = d.static.Current(ctx); err != nil {
				break
			}
			if st.Holder.Node == c.Node {
				err = d.becomePrimary(ctx, false, 0)
			} else {
				err = d.becomeReplica(st.Holder.Node)
			}
		}
		d.role.mu.Unlock()
		if err == nil && c.Lease.Type == LeaseConsul {
			err = d.startLease()
		}
	}
	if err != nil {
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if d.repl != nil {
			d.repl.close()
			d.repl = nil
		}
		_ = f.Close(closeCtx)
		d.FS = nil
		return err
	}
	admin, err := d.startAdmin()
	if err != nil {
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = d.Close(closeCtx)
		return err
	}
	d.admin = admin
	rs, err := d.startRouter()
	if err != nil {
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = d.Close(closeCtx)
		return err
	}
	d.router = rs
	return nil
}

// Close unmounts and closes everything, waiting up to ctx's deadline for
// apps to close their files.
func (d *Daemon) Close(ctx context.Context) error {
	defer d.stopTelemetry()
	if d.lease != nil && d.FS != nil && d.IsPrimary() && d.Config.FS.Locks == LocksMount {
		d.handoffOnShutdown(ctx)
	}
	if d.router != nil {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		d.router.close(rctx)
		cancel()
		d.router = nil
	}
	if d.admin != nil {
		close(d.events.done)
		actx, cancel := context.WithTimeout(ctx, time.Second)
		d.admin.close(actx)
		cancel()
		d.admin = nil
	}
	if g := d.gate(); d.FS != nil && g != nil {
		// No new writes; commits already waiting for replicas get their
		// acknowledgements while replication still runs, for up to
		// replication.sync_timeout. Those still waiting then end as
		// replication stops: a rollback-journal commit fails; a WAL
		// commit returns as committed, since SQLite cannot fail a
		// commit past its commit point (the wal-index), and reaches the
		// replicas when this node runs again.
		d.FS.SetReadOnly(true)
		dctx, cancel := context.WithTimeout(ctx, g.Timeout)
		if n := g.Drain(dctx); n > 0 {
			d.Logger.Error("shutting down with commits that replicas have not acknowledged", "waiting", n, "need", g.Quorum.String())
		}
		cancel()
	}
	d.stopLease()
	if d.repl != nil {
		d.repl.close()
	}
	if d.FS == nil {
		return nil
	}
	if err := d.FS.Close(ctx); err != nil {
		return fmt.Errorf("close filesystem: %w", err)
	}
	d.Logger.Info("unmounted", "mount_dir", d.Config.MountDir)
	return nil
}

// gate returns the sync durability gate while the node is primary in sync
// durability, else nil.
func (d *Daemon) gate() *replication.Gate {
	if d.repl == nil {
		return nil
	}
	return d.repl.gateNow()
}

// NodeID is the number stamped into the LTX files a node writes: a hash of
// its name.
func NodeID(node string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(node))
	return h.Sum64()
}

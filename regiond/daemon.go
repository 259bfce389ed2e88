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
	"time"

	"github.com/meridian-db/meridian/fs"
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

	repl  *replicationNode
	admin *adminServer
}

// NewDaemon returns a daemon for a validated config.
func NewDaemon(c Config, logger *slog.Logger) *Daemon {
	return &Daemon{Config: c, Logger: logger}
}

// Open recovers every database, mounts the filesystem and sets its mode
// from the lease: read-write on the primary, read-only elsewhere.
func (d *Daemon) Open(ctx context.Context) error {
	c := d.Config
	f := fs.New(c.DataDir, c.MountDir)
	f.NodeID = NodeID(c.Node)
	f.Retention = time.Duration(c.Replication.Retention)
	f.MaxRetention = time.Duration(c.Replication.MaxRetention)
	// Often enough for retention to mean what it says.
	f.MaintainInterval = min(max(f.Retention/2, time.Second), fs.DefaultMaintainInterval)
	f.KernelLocks = c.FS.Locks == "kernel"
	f.LockHolder = d.LockHolder
	f.SpareFill = c.FS.SpareFiles
	f.LogSegmentSize = c.FS.LogSegmentSize
	f.Passthrough = c.FS.Passthrough
	f.Logger = d.Logger.With("component", "fs")
	primary := c.IsPrimary()
	if !primary {
		// Set before mounting, so no app ever sees a writable replica.
		f.SetReadOnly(true)
		f.SetPrimary(c.Lease.StaticPrimary)
	} else {
		f.SetLag(func() string { return "0" })
	}
	holdWrites := primary && c.Replication.Durability == "sync"
	if holdWrites {
		// No write until the commit wait is in place: one committed
		// before would return unacknowledged.
		f.SetReadOnly(true)
	}
	if err := f.Open(ctx); err != nil {
		return err
	}
	d.FS = f
	repl, err := d.openReplication(f)
	if err != nil {
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = f.Close(closeCtx)
		d.FS = nil
		return err
	}
	d.repl = repl
	if holdWrites {
		f.SetReadOnly(false)
	}
	if primary {
		d.Logger.Info("serving as primary (static lease)", "mount_dir", c.MountDir, "dbs", f.DBs())
	} else {
		d.Logger.Info("serving read-only as a replica (static lease)", "primary", c.Lease.StaticPrimary, "mount_dir", c.MountDir)
	}
	admin, err := d.startAdmin()
	if err != nil {
		closeCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = d.Close(closeCtx)
		return err
	}
	d.admin = admin
	return nil
}

// Close unmounts and closes everything, waiting up to ctx's deadline for
// apps to close their files.
func (d *Daemon) Close(ctx context.Context) error {
	if d.admin != nil {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		d.admin.close(actx)
		cancel()
		d.admin = nil
	}
	if d.FS != nil && d.repl != nil && d.repl.gate != nil {
		// No new writes; commits already waiting for replicas get their
		// acknowledgements while replication still runs, for up to
		// replication.sync_timeout. Those still waiting then end as
		// replication stops: a rollback-journal commit fails; a WAL
		// commit returns as committed, since SQLite cannot fail a
		// commit past its commit point (the wal-index), and reaches the
		// replicas when this node runs again.
		d.FS.SetReadOnly(true)
		g := d.repl.gate
		dctx, cancel := context.WithTimeout(ctx, g.Timeout)
		if n := g.Drain(dctx); n > 0 {
			d.Logger.Error("shutting down with commits that replicas have not acknowledged", "waiting", n, "need", g.Quorum.String())
		}
		cancel()
	}
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

// NodeID is the number stamped into the LTX files a node writes: a hash of
// its name.
func NodeID(node string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(node))
	return h.Sum64()
}

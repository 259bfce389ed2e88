package regiond

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
)

// staticEpoch is the lease epoch of a static lease: it never changes hands.
const staticEpoch = 1

// epochFile is the file in data_dir where a replica keeps the newest lease
// epoch it has accepted frames from (see replication.EpochFile).
const epochFile = "epoch"

// fsSource is the mount as the primary's Streamer reads it.
type fsSource struct{ f *fs.FileSystem }

func (s fsSource) DBs() []string { return s.f.DBs() }

func (s fsSource) Log(name string) *ltx.Log {
	if d := s.f.DB(name); d != nil {
		return d.Log()
	}
	return nil
}

func (s fsSource) Snapshot(ctx context.Context, name string, w io.Writer) (*ltx.FileInfo, error) {
	d := s.f.DB(name)
	if d == nil {
		return nil, fmt.Errorf("snapshot of %s: the database was deleted", name)
	}
	return d.Snapshot(ctx, w)
}

func (s fsSource) Changed() <-chan struct{} { return s.f.Changed() }

// fsTarget is the mount as a replica's Client applies to it.
type fsTarget struct{ f *fs.FileSystem }

func (t fsTarget) Positions() map[string]ltx.Pos {
	m := make(map[string]ltx.Pos)
	for _, name := range t.f.DBs() {
		if d := t.f.DB(name); d != nil {
			m[name] = d.Log().Pos()
		}
	}
	return m
}

func (t fsTarget) Apply(ctx context.Context, db string, files []*replication.File) (ltx.Pos, error) {
	// A snapshot for a diverged history replaces transactions the primary
	// does not have: they are kept in data_dir/lost/. So are those a
	// snapshot for retention replaces: past retention the primary cannot
	// tell a replica that is behind from one that diverged.
	reason := files[0].SnapshotReason
	opts := fs.ApplyOptions{
		KeepLost: reason != meridianv1.SnapshotReason_SNAPSHOT_REASON_UNSPECIFIED && reason != meridianv1.SnapshotReason_SNAPSHOT_REASON_NO_POSITION,
		Move:     true, // received in data_dir/tmp or data_dir/spare, on the logs' filesystem
	}
	paths := make([]string, len(files))
	for i, f := range files {
		paths[i] = f.Path
		if f.Data != nil {
			if opts.Data == nil {
				opts.Data = make([][]byte, len(files))
			}
			opts.Data[i] = f.Data // received in memory
		}
		opts.Verified = append(opts.Verified, f.Info) // as received
	}
	infos, err := t.f.ApplyFiles(ctx, db, paths, opts)
	if err != nil {
		return ltx.Pos{}, err
	}
	return infos[len(infos)-1].Pos(), nil
}

// replicationNode is the replication side of a daemon: the gRPC server
// every node with replication.listen runs (streams on the primary, status
// everywhere) and, on a replica, the client streaming from the primary.
type replicationNode struct {
	logger   *slog.Logger
	gate     *replication.Gate // sync durability on the primary, nil in async
	streamer *replication.Streamer
	server   *grpc.Server
	dialer   *replication.Dialer
	client   *replication.Client
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

// openReplication starts the replication server and, on a replica, the
// stream from the primary.
func (d *Daemon) openReplication(f *fs.FileSystem) (_ *replicationNode, openErr error) {
	c := d.Config
	r := &replicationNode{logger: d.Logger.With("component", "replication")}
	tmp := filepath.Join(c.DataDir, "tmp")
	if err := os.RemoveAll(tmp); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return nil, err
	}
	if w := c.TLSWarning(); w != "" {
		r.logger.Warn(w)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	primary := c.IsPrimary()
	if c.Replication.Listen != "" {
		epoch := func() uint64 {
			if primary {
				return staticEpoch
			}
			return 0
		}
		streamer := replication.NewStreamer(fsSource{f}, c.Node, epoch, tmp)
		streamer.Logger = r.logger
		r.streamer = streamer
		if primary {
			f.SetAcked(ackedBy(streamer, c.PeerNodes()))
			if c.Replication.Durability == "sync" {
				r.gate = r.syncGate(ctx, f, streamer, c)
			}
		}
		var tlsConfig *tls.Config
		if !c.TLS.Insecure {
			var err error
			if tlsConfig, err = c.ServerTLS(c.PeerNodes); err != nil {
				r.close()
				return nil, err
			}
		}
		srv := replication.NewServer(streamer, func(context.Context) *meridianv1.StatusResponse { return d.statusOf(f, r).proto() })
		srv.Logger = r.logger
		ln, err := net.Listen("tcp", c.Replication.Listen)
		if err != nil {
			r.close()
			return nil, fmt.Errorf("replication.listen %s: %w", c.Replication.Listen, err)
		}
		r.server = replication.NewGRPCServer(srv, tlsConfig)
		// It serves once r is complete: its status reads r.
		defer func() {
			if openErr != nil {
				_ = ln.Close()
				return
			}
			r.wg.Go(func() {
				if err := r.server.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
					r.logger.Error("replication server stopped", "err", err)
				}
			})
			r.logger.Info("replication server listening", "addr", ln.Addr().String(), "peers", c.PeerNodes())
		}()
	}
	if primary {
		return r, nil
	}
	peer, ok := c.Peer(c.Lease.StaticPrimary)
	if !ok || peer.Addr == "" {
		r.logger.Warn("not replicating: replication.peers has no addr for the primary, so this node's databases do not change",
			"primary", c.Lease.StaticPrimary)
		return r, nil
	}
	var tlsConfig *tls.Config
	if !c.TLS.Insecure {
		var err error
		if tlsConfig, err = c.ClientTLS(peer.Node); err != nil {
			r.close()
			return nil, err
		}
	}
	dialer, err := replication.Dial(peer.Addr, tlsConfig, r.logger)
	if err != nil {
		r.close()
		return nil, err
	}
	r.dialer = dialer
	r.client = replication.NewClient(c.Node, c.Region, fsTarget{f}, tmp)
	r.client.Spares = f.Spares()
	r.client.Logger = r.logger
	r.client.PrimaryNode = peer.Node
	r.client.MaxInFlightFiles, r.client.MaxInFlightBytes = c.Replication.MaxInFlightFiles, c.Replication.MaxInFlightBytes
	r.client.MaxFileSize = c.Replication.MaxFileSize
	r.client.Epochs = &replication.EpochFile{Path: filepath.Join(c.DataDir, epochFile)}
	if err := r.client.LoadEpoch(ctx); err != nil {
		r.close()
		return nil, err
	}
	f.SetLag(r.lag)
	r.wg.Go(func() { _ = r.client.Run(ctx, dialer.Stream) })
	r.logger.Info("replicating from the primary", "primary", peer.Node, "addr", peer.Addr, "epoch", r.client.Status().Epoch)
	return r, nil
}

// syncGate holds every commit on f until the replicas of
// replication.sync_acks and sync_regions acknowledged it. A wait ends when
// the daemon shuts down (ctx), failing the commit.
func (r *replicationNode) syncGate(ctx context.Context, f *fs.FileSystem, s *replication.Streamer, c Config) *replication.Gate {
	rc := c.Replication
	g := &replication.Gate{Streamer: s, Timeout: time.Duration(rc.SyncTimeout), Degrade: rc.SyncOnTimeout == "degrade",
		Quorum: replication.Quorum{Acks: rc.SyncAcks}, Logger: r.logger}
	if rc.SyncRegions {
		g.Quorum.Regions = c.SyncRegions()
	}
	f.SetCommitWait(func(wctx context.Context, db string, txid ltx.TXID, canFail bool) error {
		wctx, stop := context.WithCancel(wctx)
		defer stop()
		defer context.AfterFunc(ctx, stop)()
		return g.Wait(wctx, db, txid, canFail)
	})
	r.logger.Info("sync durability: a commit returns once replicas acknowledge it", "quorum", g.Quorum.String(),
		"timeout", g.Timeout, "on_timeout", rc.SyncOnTimeout)
	return g
}

// ackedBy returns the lowest TXID of a database that every replica in
// peers has acknowledged, for log retention. A replica that never
// connected, or acknowledged nothing of the database, holds everything
// back, up to the log's MaxRetention.
func ackedBy(s *replication.Streamer, peers []string) func(string) ltx.TXID {
	return func(db string) ltx.TXID {
		acked := ltx.TXID(1<<63 - 1)
		seen := map[string]replication.ReplicaStatus{}
		for _, r := range s.Replicas() {
			seen[r.Node] = r
		}
		for _, node := range peers {
			pos, ok := seen[node].Acked[db]
			if !ok {
				return 0
			}
			acked = min(acked, pos.TXID)
		}
		return acked
	}
}

// lag is the content of .lag on a replica: 0 when every database is at
// the primary's last heartbeat position, else the milliseconds since the
// last transaction applied committed on the primary (an upper bound, by
// the primary's clock), or since the last heartbeat when there is none.
func (r *replicationNode) lag() string {
	return strconv.FormatInt(behind(r.client.Status(), time.Now()).Milliseconds(), 10)
}

// close stops the client and the server.
func (r *replicationNode) close() {
	if r.cancel != nil {
		r.cancel()
	}
	if r.server != nil {
		r.server.Stop()
	}
	if r.dialer != nil {
		_ = r.dialer.Close()
	}
	r.wg.Wait()
}

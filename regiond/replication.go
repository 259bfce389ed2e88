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
	"github.com/meridian-db/meridian/replication/rpc"
)

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

// fsTarget is the mount as a replica's Client applies to it; what it
// applies is published on ev.
type fsTarget struct {
	f   *fs.FileSystem
	ev  *events
	pos *positions
}

func (t fsTarget) Positions() map[string]ltx.Pos {
	m := make(map[string]ltx.Pos)
	for _, name := range t.f.DBs() {
		if d := t.f.DB(name); d != nil {
			m[name] = d.Log().Pos()
		}
	}
	return m
}

var _ replication.DurableTarget = fsTarget{}

// AwaitDurable waits until the groups applied to db are durable in its
// log: Apply returns once readers see a group (see fs.FileSystem.AwaitLogged).
func (t fsTarget) AwaitDurable(ctx context.Context, db string) error {
	return t.f.AwaitLogged(ctx, db)
}

func (t fsTarget) Apply(ctx context.Context, db string, files []*replication.File) (ltx.Pos, error) {
	// A snapshot for a diverged history replaces transactions the primary
	// does not have: they are kept in data_dir/lost/. So are those a
	// snapshot for retention replaces: past retention the primary cannot
	// tell a replica that is behind from one that diverged.
	reason := files[0].SnapshotReason
	opts := fs.ApplyOptions{
		KeepLost: reason.KeepsLost(),
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
	var lostBefore map[string]bool
	if opts.KeepLost {
		lostBefore = lostSets(t.f.DataDir, db)
	}
	infos, err := t.f.ApplyFiles(ctx, db, paths, opts)
	if err != nil {
		return ltx.Pos{}, err
	}
	pos := infos[len(infos)-1].Pos()
	t.pos.set(db, uint64(pos.TXID)) // visible to readers now
	if reason != replication.NoSnapshot {
		t.ev.publish(Event{Type: EventSnapshot, DB: db, Pos: pos.String(), Reason: reason.String()})
	}
	if opts.KeepLost {
		for set := range lostSets(t.f.DataDir, db) {
			if !lostBefore[set] {
				t.ev.publish(Event{Type: EventLost, DB: db, Dir: filepath.Join(t.f.DataDir, "lost", db, set)})
			}
		}
	}
	if t.ev.listening() {
		t.ev.publish(Event{Type: EventApply, DB: db, Pos: pos.String(), Files: len(infos)})
	}
	return pos, nil
}

// lostSets returns the sets of transactions kept under data_dir/lost/db/
// (see fs.ApplyOptions.KeepLost), by name.
func lostSets(dataDir, db string) map[string]bool {
	sets := map[string]bool{}
	entries, _ := os.ReadDir(filepath.Join(dataDir, "lost", db))
	for _, e := range entries {
		sets[e.Name()] = true
	}
	return sets
}

// replicationNode is the replication side of a daemon: the gRPC server
// every node with replication.listen runs (streams while it is primary,
// status always) and, while it is a replica, the follower streaming from
// the primary.
type replicationNode struct {
	logger   *slog.Logger
	tel      replication.Telemetry
	streamer *replication.Streamer // nil without replication.listen
	server   *grpc.Server
	ctx      context.Context // ends at close
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu       sync.Mutex
	gate     *replication.Gate // sync durability while primary, nil in async
	stopGate context.CancelFunc
	follow   *follower // while a replica with its primary's addr
}

// follower is a replica's stream from its primary.
type follower struct {
	primary string
	dialer  *rpc.Dialer
	client  *replication.Client
	cancel  context.CancelFunc
	done    chan struct{} // closed when the client has stopped
}

// openReplication starts the replication server, if replication.listen
// is set; the daemon's role decides whether it streams.
func (d *Daemon) openReplication(f *fs.FileSystem) (_ *replicationNode, openErr error) {
	c := d.Config
	r := &replicationNode{logger: d.Logger.With("component", "replication"), tel: d.tel.replication()}
	r.ctx, r.cancel = context.WithCancel(context.Background())
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
	if c.Replication.Listen == "" {
		return r, nil
	}
	r.streamer = replication.NewStreamer(fsSource{f}, c.Node, d.epoch.Load, tmp)
	r.streamer.Logger = r.logger
	r.streamer.Telemetry = r.tel
	r.streamer.CommitTrace = f.CommitTrace
	r.streamer.NewerEpoch = func(epoch uint64, replica string) { go d.deposed(epoch, replica) }
	var tlsConfig *tls.Config
	if !c.TLS.Insecure {
		var err error
		if tlsConfig, err = c.ServerTLS(c.PeerNodes); err != nil {
			r.close()
			return nil, err
		}
	}
	srv := rpc.NewServer(r.streamer, func(context.Context) *meridianv1.StatusResponse { return d.statusOf(f, r).proto() })
	srv.Logger = r.logger
	ln, err := net.Listen("tcp", c.Replication.Listen)
	if err != nil {
		r.close()
		return nil, fmt.Errorf("replication.listen %s: %w", c.Replication.Listen, err)
	}
	r.server = rpc.NewGRPCServer(srv, tlsConfig)
	r.wg.Go(func() {
		if err := r.server.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			r.logger.Error("replication server stopped", "err", err)
		}
	})
	r.logger.Info("replication server listening", "addr", ln.Addr().String(), "peers", c.PeerNodes())
	return r, nil
}

// startFollowing streams from primary, if replication.peers has its
// address. Caller holds the daemon's role lock; r follows no one.
func (r *replicationNode) startFollowing(f *fs.FileSystem, c Config, primary string, ev *events, pos *positions) error {
	peer, ok := c.Peer(primary)
	if !ok || peer.Addr == "" {
		r.logger.Warn("not replicating: replication.peers has no addr for the primary, so this node's databases do not change",
			"primary", primary)
		return nil
	}
	var tlsConfig *tls.Config
	if !c.TLS.Insecure {
		var err error
		if tlsConfig, err = c.ClientTLS(peer.Node); err != nil {
			return err
		}
	}
	dialer, err := rpc.Dial(peer.Addr, tlsConfig, r.logger)
	if err != nil {
		return err
	}
	client := replication.NewClient(c.Node, c.Region, fsTarget{f: f, ev: ev, pos: pos}, filepath.Join(c.DataDir, "tmp"))
	client.Spares = f.Spares()
	client.Logger = r.logger
	client.Telemetry = r.tel
	client.PrimaryNode = peer.Node
	client.MaxInFlightFiles, client.MaxInFlightBytes = c.Replication.MaxInFlightFiles, c.Replication.MaxInFlightBytes
	client.MaxFileSize = c.Replication.MaxFileSize
	client.Epochs = &replication.EpochFile{Path: filepath.Join(c.DataDir, epochFile)}
	if err := client.LoadEpoch(r.ctx); err != nil {
		_ = dialer.Close()
		return err
	}
	ctx, cancel := context.WithCancel(r.ctx)
	fw := &follower{primary: peer.Node, dialer: dialer, client: client, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(fw.done)
		_ = client.Run(ctx, dialer.Stream)
	}()
	r.mu.Lock()
	r.follow = fw
	r.mu.Unlock()
	r.logger.Info("replicating from the primary", "primary", peer.Node, "addr", peer.Addr, "epoch", client.Status().Epoch)
	return nil
}

// stopFollowing ends the stream from the primary, if any, once the group
// being applied is applied (replication.Client.Stop). (Close cancels
// r.ctx first, which interrupts it.)
func (r *replicationNode) stopFollowing() {
	r.mu.Lock()
	fw := r.follow
	r.follow = nil
	r.mu.Unlock()
	if fw == nil {
		return
	}
	fw.client.Stop()
	<-fw.done
	fw.cancel()
	_ = fw.dialer.Close()
	r.logger.Info("stopped replicating from the primary", "primary", fw.primary)
}

// client returns the client of the stream from the primary, nil if none.
func (r *replicationNode) client() *replication.Client {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.follow == nil {
		return nil
	}
	return r.follow.client
}

// gateNow returns the sync gate, nil if none.
func (r *replicationNode) gateNow() *replication.Gate {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gate
}

// startGate holds every commit on f until the replicas of
// replication.sync_acks and sync_regions acknowledged it. A wait ends,
// failing the commit, when the node stops being primary or shuts down.
func (r *replicationNode) startGate(f *fs.FileSystem, c Config) {
	rc := c.Replication
	g := &replication.Gate{Streamer: r.streamer, Timeout: time.Duration(rc.SyncTimeout), Degrade: rc.SyncOnTimeout == OnTimeoutDegrade,
		Quorum: replication.Quorum{Acks: rc.SyncAcks}, Logger: r.logger}
	if rc.SyncRegions {
		g.Quorum.Regions = c.SyncRegions()
	}
	ctx, stop := context.WithCancel(r.ctx)
	f.SetCommitWait(func(wctx context.Context, db string, txid ltx.TXID, canFail bool) error {
		wctx, stop := context.WithCancel(wctx)
		defer stop()
		defer context.AfterFunc(ctx, stop)()
		return g.Wait(wctx, db, txid, canFail)
	})
	r.mu.Lock()
	r.gate, r.stopGate = g, stop
	r.mu.Unlock()
	r.logger.Info("sync durability: a commit returns once replicas acknowledge it", "quorum", g.Quorum.String(),
		"timeout", g.Timeout, "on_timeout", rc.SyncOnTimeout)
}

// endGate removes the sync gate, if any: commits waiting on it fail.
func (r *replicationNode) endGate(f *fs.FileSystem) {
	r.mu.Lock()
	g, stop := r.gate, r.stopGate
	r.gate, r.stopGate = nil, nil
	r.mu.Unlock()
	if g == nil {
		return
	}
	f.SetCommitWait(nil)
	stop()
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
	cl := r.client()
	if cl == nil {
		return "0"
	}
	return strconv.FormatInt(behind(cl.Status(), time.Now()).Milliseconds(), 10)
}

// close stops the follower and the server.
func (r *replicationNode) close() {
	if r.cancel != nil {
		r.cancel()
	}
	r.stopFollowing()
	if r.server != nil {
		r.server.Stop()
	}
	r.wg.Wait()
}

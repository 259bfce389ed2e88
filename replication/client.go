package replication

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// Target is where a replica's received files go: its databases.
type Target interface {
	// Positions returns the position of every database the node has. It
	// is called at the start of every stream.
	Positions() map[string]ltx.Pos
	// Apply applies a received, verified file to database f.DB and returns
	// the database's new position. A file that does not apply at the
	// database's position is refused with an error, the database
	// untouched; the stream then starts again from the position the
	// database has. A snapshot replaces the database whole; for a diverged
	// history (f.SnapshotReason AHEAD or CHECKSUM_MISMATCH) the Target
	// keeps the transactions it is about to lose. Apply may move f.Path.
	Apply(ctx context.Context, f *File) (ltx.Pos, error)
}

// Client is the replica side of replication: it keeps one stream open to
// the primary, reconnecting with backoff, and applies what arrives.
type Client struct {
	Node, Region string
	Target       Target
	// TempDir holds files while they arrive.
	TempDir     string
	MaxFileSize int64
	// MinBackoff and MaxBackoff bound the wait between attempts.
	MinBackoff, MaxBackoff time.Duration
	Logger                 *slog.Logger

	epoch atomic.Uint64 // newest lease epoch accepted

	mu     sync.Mutex
	status ClientStatus
}

// NewClient returns a replica client with default tunables.
func NewClient(node, region string, target Target, tempDir string) *Client {
	return &Client{
		Node:        node,
		Region:      region,
		Target:      target,
		TempDir:     tempDir,
		MaxFileSize: DefaultMaxFileSize,
		MinBackoff:  DefaultMinBackoff,
		MaxBackoff:  DefaultMaxBackoff,
		Logger:      slog.New(slog.DiscardHandler),
	}
}

// ClientStatus is what a replica knows of its stream.
type ClientStatus struct {
	Connected bool
	// Epoch is the newest lease epoch the replica has accepted frames from.
	Epoch uint64
	// Primary holds the primary's position of each database, from its last
	// heartbeat or file; HeartbeatAt is when that heartbeat arrived.
	Primary     map[string]ltx.Pos
	HeartbeatAt time.Time
	// Applied is the last file applied to each database.
	Applied map[string]Applied
	// Reconnects counts streams that ended and were opened again.
	Reconnects int
}

// Applied describes the last file applied to a database.
type Applied struct {
	Pos         ltx.Pos
	CommittedAt time.Time // on the primary's clock
	AppliedAt   time.Time // on this node's clock
}

// Status returns a copy of the client's status.
func (c *Client) Status() ClientStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.status
	s.Epoch = c.epoch.Load()
	s.Primary = make(map[string]ltx.Pos, len(c.status.Primary))
	for db, p := range c.status.Primary {
		s.Primary[db] = p
	}
	s.Applied = make(map[string]Applied, len(c.status.Applied))
	for db, a := range c.status.Applied {
		s.Applied[db] = a
	}
	return s
}

// Run keeps a stream to the primary open until ctx is done: dial opens one,
// and when it ends Run waits a backoff and dials again. Each new stream
// resumes from the positions the Target reports.
func (c *Client) Run(ctx context.Context, dial func(context.Context) (ClientConn, error)) error {
	backoff := c.MinBackoff
	for {
		frames, err := c.attempt(ctx, dial)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if frames > 0 {
			backoff = c.MinBackoff
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		c.Logger.Warn("replication stream ended; reconnecting", "err", err, "in", wait.Round(time.Millisecond))
		c.mu.Lock()
		c.status.Connected = false
		c.status.Reconnects++
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(2*backoff, c.MaxBackoff)
	}
}

// attempt runs one stream and returns how many frames it received.
func (c *Client) attempt(ctx context.Context, dial func(context.Context) (ClientConn, error)) (int, error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	conn, err := dial(sctx)
	if err != nil {
		return 0, err
	}
	return c.Session(sctx, conn)
}

// Session runs one stream on conn until it ends, and returns how many
// frames it received. Cancelling ctx must end conn's Recv.
func (c *Client) Session(ctx context.Context, conn ClientConn) (int, error) {
	hello := &meridianv1.Hello{Node: c.Node, Region: c.Region, Epoch: c.epoch.Load()}
	positions := c.Target.Positions()
	for db, p := range positions {
		hello.Positions = append(hello.Positions, pbPos(db, p))
	}
	if err := conn.Send(&meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Hello{Hello: hello}}); err != nil {
		return 0, err
	}
	rv := newReceiver(c.TempDir, c.MaxFileSize)
	defer rv.close()
	for frames := 0; ; frames++ {
		resp, err := conn.Recv()
		if err != nil {
			return frames, err
		}
		if frames == 0 {
			c.mu.Lock()
			c.status.Connected = true
			c.mu.Unlock()
		}
		if err := c.frame(ctx, conn, rv, resp); err != nil {
			return frames, err
		}
	}
}

// frame handles one frame from the primary.
func (c *Client) frame(ctx context.Context, conn ClientConn, rv *receiver, resp *meridianv1.StreamResponse) error {
	if err := c.checkEpoch(resp.GetEpoch()); err != nil {
		return err
	}
	switch f := resp.GetFrame().(type) {
	case *meridianv1.StreamResponse_LtxBegin:
		return rv.begin(f.LtxBegin)
	case *meridianv1.StreamResponse_LtxChunk:
		return rv.chunk(f.LtxChunk)
	case *meridianv1.StreamResponse_LtxEnd:
		file, err := rv.end(f.LtxEnd)
		if err != nil {
			return err
		}
		return c.apply(ctx, conn, file)
	case *meridianv1.StreamResponse_Heartbeat:
		c.heartbeat(f.Heartbeat)
		return nil
	default:
		return fmt.Errorf("%w: %w", ErrProtocol, errUnexpectedFrame)
	}
}

// checkEpoch accepts a frame's epoch if it is not older than the newest
// seen (fencing a deposed primary).
func (c *Client) checkEpoch(e uint64) error {
	if e == 0 {
		return fmt.Errorf("%w: frame without a lease epoch", ErrProtocol)
	}
	for {
		newest := c.epoch.Load()
		if e < newest {
			return fmt.Errorf("%w: frame from epoch %d, but this replica has seen epoch %d", ErrStaleEpoch, e, newest)
		}
		if e == newest || c.epoch.CompareAndSwap(newest, e) {
			return nil
		}
	}
}

// apply hands a file to the Target and acks the new position.
func (c *Client) apply(ctx context.Context, conn ClientConn, f *File) error {
	defer func() { _ = os.Remove(f.Path) }()
	switch r := f.SnapshotReason; r {
	case meridianv1.SnapshotReason_SNAPSHOT_REASON_UNSPECIFIED:
	case meridianv1.SnapshotReason_SNAPSHOT_REASON_NO_POSITION:
		// A database this node never had: the usual way it arrives.
		c.Logger.Info("applying a snapshot from the primary", "db", f.DB, "reason", r.String(), "pos", f.Info.Pos().String())
	default:
		c.Logger.Warn("applying a snapshot from the primary", "db", f.DB, "reason", r.String(), "pos", f.Info.Pos().String())
	}
	pos, err := c.Target.Apply(ctx, f)
	if err != nil {
		return fmt.Errorf("apply %s to %s: %w", f.Info.Name, f.DB, err)
	}
	now := time.Now()
	c.mu.Lock()
	if c.status.Applied == nil {
		c.status.Applied = make(map[string]Applied)
	}
	c.status.Applied[f.DB] = Applied{Pos: pos, CommittedAt: f.CommittedAt, AppliedAt: now}
	c.mu.Unlock()
	ack := &meridianv1.Ack{Db: f.DB, Txid: uint64(pos.TXID), PostApplyChecksum: uint64(pos.PostApplyChecksum), AppliedAtUnixNano: now.UnixNano()}
	return conn.Send(&meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Ack{Ack: ack}})
}

func (c *Client) heartbeat(hb *meridianv1.Heartbeat) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.status.Primary == nil {
		c.status.Primary = make(map[string]ltx.Pos)
	}
	for _, p := range hb.GetPositions() {
		c.status.Primary[p.GetDb()] = fromPB(p)
	}
	c.status.HeartbeatAt = time.Now()
}

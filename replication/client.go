package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// Target is where a replica's received files go: its databases.
type Target interface {
	// Positions returns the position of every database the node has. It
	// is called at the start of every stream.
	Positions() map[string]ltx.Pos
	// Apply applies received, verified files to database db, in order, as
	// one group, and returns the database's new position: they follow one
	// another, and only the first may be a snapshot. Files that do not
	// apply at the database's position are refused with an error, the
	// database untouched; the stream then starts again from the position
	// the database has. A snapshot replaces the database whole; for a
	// diverged history (SnapshotReason AHEAD or CHECKSUM_MISMATCH) the
	// Target keeps the transactions it is about to lose. Apply may move
	// the files' Paths.
	Apply(ctx context.Context, db string, files []*File) (ltx.Pos, error)
}

// DurableTarget is a Target whose Apply may return once readers see a
// group, before the group is durable: the client acknowledges it to the
// primary only once AwaitDurable, called after Apply, returns nil. It
// waits for every group of db applied before the call.
type DurableTarget interface {
	Target
	AwaitDurable(ctx context.Context, db string) error
}

// Client is the replica side of replication: it keeps one stream open to
// the primary, reconnecting with backoff, and applies what arrives.
type Client struct {
	Node, Region string
	Target       Target
	// TempDir holds files while they arrive, when Spares has none.
	TempDir string
	// Spares, if not nil, supplies files to receive into, written over
	// instead of created, and takes back those the Target did not move.
	Spares      *ltx.Spares
	MaxFileSize int64
	// MaxInFlightFiles bounds the files of a stream begun and not yet
	// ended (at most one per database), each holding a file descriptor
	// and a goroutine; MaxInFlightBytes bounds the disk a stream takes:
	// the sizes announced of those files and of the files received and
	// waiting to be applied. The Hello announces both and the primary
	// keeps the files in flight within them; a stream that breaks them
	// ends with ErrProtocol. The stream is not read while files waiting
	// to be applied hold the room the next file needs. A file larger than
	// MaxInFlightBytes is refused, as one larger than MaxFileSize is. 0:
	// no bound.
	MaxInFlightFiles int
	MaxInFlightBytes int64
	// ReceiveInMemory is the size up to which a file is received in
	// memory and handed to the Target as File.Data, larger ones into files
	// in Spares or TempDir: 0 means 1 MiB, a negative value none.
	ReceiveInMemory int64
	// PrimaryNode names the node streamed from, for errors; "" if not
	// known.
	PrimaryNode string
	// MaxGroup bounds the files applied as one group, and MaxGroupBytes
	// their size (a group holds local readers off while it applies; a
	// file larger than it goes alone). Files that arrive while a group
	// applies wait, and go together into the next one: a replica that
	// keeps up applies each file on its own, and one that falls behind
	// catches up with a few fsyncs per group instead of several per file.
	MaxGroup      int
	MaxGroupBytes int64
	// MinBackoff and MaxBackoff bound the wait between attempts.
	MinBackoff, MaxBackoff time.Duration
	// Epochs, if not nil, keeps the newest lease epoch accepted across
	// restarts: the client starts from the epoch it holds (see LoadEpoch),
	// and stores a newer one before it accepts the first frame of it.
	// Without it the client starts from epoch 0, and accepts any.
	Epochs EpochStore
	Logger *slog.Logger
	// Telemetry is where the client reports: an "apply" span for each
	// traced file, a child of the primary's "ship" span whose context the
	// file's LTXBegin carries; the replication lag and apply duration
	// histograms; reconnects. Set it before Run.
	Telemetry Telemetry

	metricsOnce sync.Once
	m           *clientMetrics

	epoch atomic.Uint64 // newest lease epoch accepted
	// epochMu serializes loading and storing the epoch; epochLoaded says
	// it was loaded from Epochs.
	epochMu     sync.Mutex
	epochLoaded bool

	mu     sync.Mutex
	status ClientStatus
	// stop ends Run's streams without interrupting an apply, which runs
	// under applyCtx, Run's own context (see Stop).
	stop     context.CancelFunc
	applyCtx context.Context
	stopped  bool // Stop was called
}

// NewClient returns a replica client with default tunables.
func NewClient(node, region string, target Target, tempDir string) *Client {
	return &Client{
		Node:             node,
		Region:           region,
		Target:           target,
		TempDir:          tempDir,
		MaxFileSize:      DefaultMaxFileSize,
		MaxInFlightFiles: DefaultMaxInFlightFiles,
		MaxInFlightBytes: DefaultMaxInFlightBytes,
		MaxGroup:         DefaultMaxGroup,
		MaxGroupBytes:    DefaultMaxGroupBytes,
		MinBackoff:       DefaultMinBackoff,
		MaxBackoff:       DefaultMaxBackoff,
		Logger:           slog.New(slog.DiscardHandler),
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
	applyCtx := ctx
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	c.mu.Lock()
	c.stop, c.applyCtx = stop, applyCtx
	if c.stopped {
		stop()
	}
	c.mu.Unlock()
	backoff := c.MinBackoff
	c.metrics().reconnects.Add(ctx, 0) // a series from the start
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
		c.metrics().reconnects.Add(ctx, 1)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(2*backoff, c.MaxBackoff)
	}
}

// Stop ends Run once the group being applied, if any, is applied and no
// new group has begun: unlike cancelling Run's context, which interrupts
// an apply and leaves the database for the next apply or restart to
// finish, it leaves every database at the end of a group, as a replica
// that becomes the primary needs. Run returns context.Canceled, at once
// if Stop was called before it.
func (c *Client) Stop() {
	c.mu.Lock()
	stop := c.stop
	c.stopped = true
	c.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// applyContext is the context applies run under: Run's own, which Stop
// does not cancel, else ctx.
func (c *Client) applyContext(ctx context.Context) context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.applyCtx != nil {
		return c.applyCtx
	}
	return ctx
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
// frames it received. Cancelling ctx must end conn's Recv. Frames are
// received on one goroutine and files applied on another, so the stream
// keeps flowing while a group applies. It loads the epoch first if
// LoadEpoch was not called.
func (c *Client) Session(ctx context.Context, conn ClientConn) (int, error) {
	if err := c.LoadEpoch(ctx); err != nil {
		return 0, err
	}
	rv := c.newReceiver()
	hello := &meridianv1.Hello{Node: c.Node, Region: c.Region, Epoch: c.epoch.Load(),
		MaxInFlightFiles: uint32(min(int64(rv.maxFiles), math.MaxUint32)), MaxInFlightBytes: uint64(rv.maxBytes),
		StreamedFiles: true}
	positions := c.Target.Positions()
	for db, p := range positions {
		hello.Positions = append(hello.Positions, pbPos(db, p))
	}
	if err := conn.Send(&meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Hello{Hello: hello}}); err != nil {
		return 0, err
	}
	var frames atomic.Int64
	ctx, fail := context.WithCancelCause(ctx)
	defer fail(nil)
	queue := make(chan *File, max(c.MaxGroup, 1))
	recvErr := make(chan error, 1)
	go func() {
		// Not waited for when applying fails: Recv returns once the
		// caller cancels ctx. Then the queue is drained.
		defer close(queue)
		recvErr <- c.receive(ctx, conn, rv, &frames, queue)
	}()
	// Acks go out from a goroutine of their own, each once its group is
	// durable, while the next group applies.
	acks := make(chan *meridianv1.Ack, ackQueue)
	acked := make(chan struct{})
	go func() {
		defer close(acked)
		c.sendAcks(c.applyContext(ctx), conn, acks, fail)
	}()
	err := c.applyQueued(ctx, rv.held, queue, recvErr, acks)
	close(acks)
	<-acked
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) && errors.Is(err, context.Canceled) {
		err = cause // the acks failed
	}
	go func() {
		for f := range queue {
			c.release(rv.held, f)
		}
	}()
	return int(frames.Load()), err
}

// newReceiver returns a receiver for a stream, with the client's bounds.
func (c *Client) newReceiver() *receiver {
	rv := newReceiver(c.TempDir, c.MaxFileSize, c.Spares)
	rv.maxFiles, rv.maxBytes = max(c.MaxInFlightFiles, 0), max(c.MaxInFlightBytes, 0)
	if c.ReceiveInMemory != 0 {
		rv.inMemory = max(c.ReceiveInMemory, 0)
	}
	if c.PrimaryNode != "" {
		rv.peer = "primary " + c.PrimaryNode
	}
	return rv
}

// receive reads frames into rv until the stream ends, and queues each file
// once it is whole and verified.
func (c *Client) receive(ctx context.Context, conn ClientConn, rv *receiver, frames *atomic.Int64, queue chan<- *File) error {
	defer rv.close()
	for {
		resp, err := conn.Recv()
		if err != nil {
			return err
		}
		if frames.Add(1) == 1 {
			c.mu.Lock()
			c.status.Connected = true
			c.mu.Unlock()
		}
		file, err := c.frame(ctx, rv, resp)
		if err != nil {
			return err
		}
		if file == nil {
			continue
		}
		select {
		case queue <- file:
		case <-ctx.Done():
			c.release(rv.held, file)
			return ctx.Err()
		}
	}
}

// frame handles one frame from the primary, and returns the file it
// completes, if it does.
func (c *Client) frame(ctx context.Context, rv *receiver, resp *meridianv1.StreamResponse) (*File, error) {
	if err := c.checkEpoch(ctx, resp.GetEpoch()); err != nil {
		return nil, err
	}
	switch f := resp.GetFrame().(type) {
	case *meridianv1.StreamResponse_LtxBegin:
		return nil, rv.begin(ctx, f.LtxBegin)
	case *meridianv1.StreamResponse_LtxChunk:
		return nil, rv.chunk(f.LtxChunk)
	case *meridianv1.StreamResponse_LtxEnd:
		return rv.end(f.LtxEnd)
	case *meridianv1.StreamResponse_Heartbeat:
		c.heartbeat(f.Heartbeat)
		return nil, nil
	default:
		return nil, fmt.Errorf("%w: %w", ErrProtocol, errUnexpectedFrame)
	}
}

// applyQueued applies the queued files until the queue closes, taking
// every file that has arrived, up to MaxGroup, at a time; it returns the
// error that ended the stream.
func (c *Client) applyQueued(ctx context.Context, h *held, queue <-chan *File, recvErr <-chan error, acks chan<- *meridianv1.Ack) error {
	for {
		var files []*File
		select {
		case f, ok := <-queue:
			if !ok {
				return <-recvErr
			}
			files = append(files, f)
		case <-ctx.Done():
			return ctx.Err()
		}
		size := files[0].Info.Size
		for len(files) < max(c.MaxGroup, 1) && (c.MaxGroupBytes <= 0 || size < c.MaxGroupBytes) {
			var f *File
			select {
			case f = <-queue:
			default:
			}
			if f == nil {
				break // nothing more has arrived, or the stream ended
			}
			files = append(files, f)
			size += f.Info.Size
		}
		if ctx.Err() != nil {
			for _, f := range files {
				c.release(h, f)
			}
			return ctx.Err()
		}
		err := c.applyFiles(c.applyContext(ctx), files, acks)
		for _, f := range files {
			c.release(h, f)
		}
		if err != nil {
			return err
		}
	}
}

// applyFiles applies files, in the order they arrived, a group per
// database (a snapshot starts a new one), and acks each group's position.
func (c *Client) applyFiles(ctx context.Context, files []*File, acks chan<- *meridianv1.Ack) error {
	var order []string
	groups := make(map[string][][]*File)
	for _, f := range files {
		g := groups[f.DB]
		if g == nil {
			order = append(order, f.DB)
		}
		if len(g) == 0 || f.Info.Header.IsSnapshot() {
			g = append(g, nil)
		}
		g[len(g)-1] = append(g[len(g)-1], f)
		groups[f.DB] = g
	}
	for _, db := range order {
		for _, g := range groups[db] {
			if err := c.apply(ctx, db, g, acks); err != nil {
				return err
			}
		}
	}
	return nil
}

// apply hands a group of files of db to the Target and queues the ack of
// the new position.
func (c *Client) apply(ctx context.Context, db string, files []*File, acks chan<- *meridianv1.Ack) error {
	first, last := files[0], files[len(files)-1]
	switch r := first.SnapshotReason; r {
	case NoSnapshot:
	case SnapshotNoPosition:
		// A database this node never had: the usual way it arrives.
		c.Logger.Info("applying a snapshot from the primary", "db", db, "reason", r.String(), "pos", first.Info.Pos().String())
	default:
		c.Logger.Warn("applying a snapshot from the primary", "db", db, "reason", r.String(), "pos", first.Info.Pos().String())
	}
	began := time.Now()
	pos, err := c.Target.Apply(ctx, db, files)
	if err != nil {
		if len(files) == 1 {
			return fmt.Errorf("apply %s to %s: %w", first.Info.Name, db, err)
		}
		return fmt.Errorf("apply %d files, %s to %s, to %s: %w", len(files), first.Info.Name, last.Info.Name, db, err)
	}
	now := time.Now()
	c.Logger.Debug("applied", "db", db, "files", len(files), "txid", pos.TXID.String(), "took", now.Sub(began), "behind", now.Sub(last.CommittedAt))
	c.observe(ctx, db, files, began, now)
	c.mu.Lock()
	if c.status.Applied == nil {
		c.status.Applied = make(map[string]Applied)
	}
	c.status.Applied[db] = Applied{Pos: pos, CommittedAt: last.CommittedAt, AppliedAt: now}
	if c.status.Primary == nil {
		c.status.Primary = make(map[string]ltx.Pos)
	}
	if p, ok := c.status.Primary[db]; !ok || p.TXID < pos.TXID {
		c.status.Primary[db] = pos // the primary is there at least
	}
	c.mu.Unlock()
	acks <- &meridianv1.Ack{Db: db, Txid: uint64(pos.TXID), PostApplyChecksum: uint64(pos.PostApplyChecksum), AppliedAtUnixNano: now.UnixNano()}
	return nil
}

// ackQueue is how many acks may wait to be sent: sendAcks takes them as
// they come, so the queue fills only while a group's fsync is slow.
const ackQueue = 1024

// sendAcks sends the acks queued on acks until it is closed, each once
// the Target says its group is durable (DurableTarget), the latest of
// each database when several wait. The first error ends the session
// (fail); the acks after it are dropped.
func (c *Client) sendAcks(ctx context.Context, conn ClientConn, acks <-chan *meridianv1.Ack, fail context.CancelCauseFunc) {
	dt, _ := c.Target.(DurableTarget)
	var err error
	for a := range acks {
		if err != nil {
			continue
		}
		latest := []*meridianv1.Ack{a}
	more:
		for {
			select {
			case b, ok := <-acks:
				if !ok {
					break more
				}
				if i := slices.IndexFunc(latest, func(x *meridianv1.Ack) bool { return x.GetDb() == b.GetDb() }); i >= 0 {
					latest[i] = b
				} else {
					latest = append(latest, b)
				}
			default:
				break more
			}
		}
		for _, a := range latest {
			if dt != nil {
				if err = dt.AwaitDurable(ctx, a.GetDb()); err != nil {
					err = fmt.Errorf("%s at txid %s is applied, not durable: %w", a.GetDb(), ltx.TXID(a.GetTxid()), err)
					break
				}
			}
			if err = conn.Send(&meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Ack{Ack: a}}); err != nil {
				break
			}
		}
		if err != nil {
			fail(err)
		}
	}
}

// metrics returns the client's instruments, made on first use.
func (c *Client) metrics() *clientMetrics {
	c.metricsOnce.Do(func() { c.m = newClientMetrics(c.Telemetry) })
	return c.m
}

// observe reports a group of files of db applied from began to now: an
// "apply" span for each that carries a trace context, and each file's lag.
func (c *Client) observe(ctx context.Context, db string, files []*File, began, now time.Time) {
	m := c.metrics()
	dbAttr, region := attribute.String("db", db), attribute.String("region", c.Region)
	m.apply.Record(ctx, now.Sub(began).Seconds(), metric.WithAttributes(dbAttr))
	for _, f := range files {
		lag := now.Sub(f.CommittedAt)
		txid := attribute.Int64("txid", int64(f.Info.Header.MaxTXID))
		sctx := ctx
		sc, ok := remoteContext(f.Traceparent, f.Tracestate)
		if !ok {
			m.badContext.Add(ctx, 1, metric.WithAttributes(attribute.String("where", "frame")))
			c.Logger.Debug("a file's trace context does not parse; ignored", "db", db, "txid", f.Info.Header.MaxTXID.String(), "traceparent", f.Traceparent)
		}
		if sc.IsValid() {
			var span trace.Span
			sctx, span = m.tracer.Start(trace.ContextWithRemoteSpanContext(ctx, sc), "apply", trace.WithSpanKind(trace.SpanKindConsumer),
				trace.WithTimestamp(began), trace.WithAttributes(
					attribute.String("meridian.db", db),
					attribute.Int64("meridian.txid", int64(f.Info.Header.MaxTXID)),
					attribute.String("meridian.region", c.Region),
					attribute.String("meridian.node", c.Node),
					attribute.Int("meridian.group", len(files)),
					attribute.Float64("meridian.lag_ms", float64(lag.Microseconds())/1000),
				))
			span.End(trace.WithTimestamp(now))
		}
		// The TXID is an exemplar's attribute: views drop it from the
		// series (see regiond's telemetry).
		m.lag.Record(sctx, lag.Seconds(), metric.WithAttributes(dbAttr, region, txid))
	}
}

// release gives back a received file the Target did not move, and takes
// it away from the files h holds.
func (c *Client) release(h *held, f *File) {
	if f.Path != "" {
		if err := c.Spares.Put(f.Path); err != nil {
			c.Logger.Warn("remove a received file", "path", f.Path, "err", err)
		}
	}
	h.done(f)
}

// LoadEpoch sets the newest epoch the client accepted to the one Epochs
// holds, once: from then on it refuses frames of older epochs, and its
// Hello tells an older primary that it was deposed. Session calls it; call
// it first to have a damaged store reported before any stream starts. It
// may be called from any goroutine.
func (c *Client) LoadEpoch(ctx context.Context) error {
	c.epochMu.Lock()
	defer c.epochMu.Unlock()
	if c.epochLoaded || c.Epochs == nil {
		return nil
	}
	e, err := c.Epochs.Load(ctx)
	if err != nil {
		return fmt.Errorf("load the newest lease epoch seen: %w", err)
	}
	if e > c.epoch.Load() { // the epoch changes only under epochMu
		c.epoch.Store(e)
	}
	c.epochLoaded = true
	return nil
}

// checkEpoch accepts a frame's epoch if it is not older than the newest
// seen (fencing a deposed primary). A newer epoch is stored in Epochs
// before it is accepted: a frame of it is refused if it cannot be.
func (c *Client) checkEpoch(ctx context.Context, e uint64) error {
	if e == 0 {
		return fmt.Errorf("%w: frame without a lease epoch", ErrProtocol)
	}
	if newest := c.epoch.Load(); e < newest {
		return fmt.Errorf("%w: frame from epoch %d, but this replica has seen epoch %d", ErrStaleEpoch, e, newest)
	} else if e == newest {
		return nil
	}
	// A new epoch: rare, and serialized with LoadEpoch and any other
	// stream's receiver still running.
	c.epochMu.Lock()
	defer c.epochMu.Unlock()
	newest := c.epoch.Load()
	switch {
	case e < newest:
		return fmt.Errorf("%w: frame from epoch %d, but this replica has seen epoch %d", ErrStaleEpoch, e, newest)
	case e == newest:
		return nil
	}
	if c.Epochs != nil {
		if err := c.Epochs.Store(ctx, e); err != nil {
			return fmt.Errorf("accept lease epoch %d: %w", e, err)
		}
	}
	c.epoch.Store(e)
	c.Logger.Info("accepted a new lease epoch", "epoch", e, "previous", newest)
	return nil
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

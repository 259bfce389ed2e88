package replication

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/semaphore"

	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// Source is the primary's databases as the Streamer reads them.
type Source interface {
	// DBs returns the names of the databases, sorted.
	DBs() []string
	// Log returns the log of database name, or nil if there is none.
	Log(name string) *ltx.Log
	// Snapshot writes a snapshot of database name at its log's position to
	// w, holding writers off while it reads, and describes what it wrote.
	Snapshot(ctx context.Context, name string, w io.Writer) (*ltx.FileInfo, error)
	// Changed returns a channel closed the next time a database is created
	// or deleted.
	Changed() <-chan struct{}
}

// Streamer is the primary side of replication: it serves every replica's
// stream from the logs of Source. Each database of each stream is read by
// its own cursor from disk, so a slow replica holds up neither commits nor
// the other replicas; the only memory a stream holds is a few frames.
type Streamer struct {
	Source Source
	// Node is this node's name, for logs.
	Node string
	// Epoch returns the write-lease epoch this node holds, 0 if it holds
	// none. Every frame is stamped with it; a stream ends when it changes.
	Epoch func() uint64

	ChunkSize         int
	HeartbeatInterval time.Duration
	// SnapshotInterval is the least time between two snapshots of a
	// database for one replica (see DefaultSnapshotInterval); 0: none.
	SnapshotInterval time.Duration
	// TempDir holds snapshots while they are sent.
	TempDir string
	Logger  *slog.Logger
	// NewerEpoch, if set, is called when a replica's Hello shows it has
	// accepted frames of a lease epoch newer than this node's: another
	// node holds the lease, and this one should stop writing. It must not
	// block.
	NewerEpoch func(epoch uint64, replica string)
	// Telemetry is where the streams report: a "ship" span per traced
	// commit and replica, the bytes, files and snapshots sent. Set it
	// before Serve.
	Telemetry Telemetry
	// CommitTrace, if set, returns the span context of the commit span of
	// transaction txid of db, invalid if it was not traced: the parent of
	// its "ship" spans, whose context the LTXBegin frame carries to the
	// replica.
	CommitTrace func(db string, txid ltx.TXID) trace.SpanContext

	metricsOnce sync.Once
	m           *streamerMetrics

	mu       sync.Mutex
	replicas map[string]*replica
	acks     chan struct{} // closed and replaced at every ack; nil until needed
}

// NewStreamer returns a Streamer of src's databases with default tunables.
func NewStreamer(src Source, node string, epoch func() uint64, tempDir string) *Streamer {
	return &Streamer{
		Source:            src,
		Node:              node,
		Epoch:             epoch,
		ChunkSize:         DefaultChunkSize,
		HeartbeatInterval: DefaultHeartbeatInterval,
		SnapshotInterval:  DefaultSnapshotInterval,
		TempDir:           tempDir,
		Logger:            slog.New(slog.DiscardHandler),
	}
}

// replica is what the primary knows of one replica.
type replica struct {
	node, region string
	streams      int                // open streams (a reconnect may overlap the old one)
	acked        map[string]ltx.Pos // by database
	ackedAt      map[string]time.Time
	// confirmed is the last position of each database the replica
	// acknowledged applying from this Streamer. Unlike acked, which a
	// Hello sets, it is on this primary's history: a rejoining node's
	// divergent position confirms nothing. It confirms a TXID only while
	// it is a position of the database's log (see Confirmed).
	confirmed map[string]ltx.Pos
	// snapshotAt is when the last snapshot of each database for the
	// replica began.
	snapshotAt map[string]time.Time
}

// ReplicaStatus is the primary's view of one replica.
type ReplicaStatus struct {
	Node, Region string
	Connected    bool
	// Acked is the last position the replica acknowledged for each
	// database (from its Hello until its first ack), and AckedAt when.
	Acked   map[string]ltx.Pos
	AckedAt map[string]time.Time
}

// Replicas returns the replicas that have opened a stream since the
// Streamer started, by node name.
func (s *Streamer) Replicas() []ReplicaStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []ReplicaStatus
	for _, r := range s.replicas {
		st := ReplicaStatus{Node: r.node, Region: r.region, Connected: r.streams > 0,
			Acked: make(map[string]ltx.Pos), AckedAt: make(map[string]time.Time)}
		for db, p := range r.acked {
			st.Acked[db], st.AckedAt[db] = p, r.ackedAt[db]
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b ReplicaStatus) int { return cmp.Compare(a.Node, b.Node) })
	return out
}

// Serve runs the stream of one replica until it ends, the lease epoch
// changes or ctx is done. peer is the node name the transport
// authenticated (its TLS certificate), "" if it authenticated none
// (insecure mode); the replica's Hello must name the same node.
func (s *Streamer) Serve(ctx context.Context, conn Conn, peer string) error {
	epoch := s.Epoch()
	if epoch == 0 {
		return fmt.Errorf("%w: node %s does not hold the write lease", ErrNotPrimary, s.Node)
	}
	req, err := conn.Recv()
	if err != nil {
		return err
	}
	hello := req.GetHello()
	if hello == nil {
		return fmt.Errorf("%w: first frame is not a Hello", ErrProtocol)
	}
	if peer != "" && hello.GetNode() != peer {
		return fmt.Errorf("%w: Hello names node %q, but its certificate names %q", ErrPermission, hello.GetNode(), peer)
	}
	if hello.GetEpoch() > epoch {
		if s.NewerEpoch != nil {
			s.NewerEpoch(hello.GetEpoch(), hello.GetNode())
		}
		return fmt.Errorf("%w: replica %s has seen lease epoch %d, newer than this node's %d", ErrNotPrimary, hello.GetNode(), hello.GetEpoch(), epoch)
	}
	positions := make(map[string]ltx.Pos)
	for _, p := range hello.GetPositions() {
		if _, ok := positions[p.GetDb()]; ok {
			return fmt.Errorf("%w: Hello lists database %q twice", ErrProtocol, p.GetDb())
		}
		positions[p.GetDb()] = fromPB(p)
	}
	r := s.connected(hello, positions)
	defer s.disconnected(r)
	log := s.Logger.With("replica", hello.GetNode(), "replica_region", hello.GetRegion())
	log.Info("replica connected", "epoch", epoch, "dbs", len(positions),
		"max_in_flight_files", hello.GetMaxInFlightFiles(), "max_in_flight_bytes", hello.GetMaxInFlightBytes())

	st := &stream{s: s, conn: conn, epoch: epoch, replica: r, region: hello.GetRegion(), log: log, streamed: hello.GetStreamedFiles(),
		started: make(map[string]bool)}
	if n := hello.GetMaxInFlightFiles(); n > 0 {
		st.files = semaphore.NewWeighted(int64(n))
	}
	if n := hello.GetMaxInFlightBytes(); n > 0 {
		st.maxBytes = int64(min(n, math.MaxInt64))
		st.bytes = semaphore.NewWeighted(st.maxBytes)
	}
	// Recv returns only when a frame arrives or the stream ends, which a
	// transport does once Serve has returned: so the receiver is not
	// waited for, and reports through recvErr.
	recvErr := make(chan error, 1)
	go func() { recvErr <- st.recv() }()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		select {
		case err := <-recvErr:
			return err
		case <-gctx.Done():
			return gctx.Err()
		}
	})
	g.Go(func() error { return st.heartbeats(gctx) })
	g.Go(func() error { return st.databases(gctx, g, positions) })
	err = g.Wait()
	st.ships.end(err)
	log.Info("replica stream ended", "err", err)
	return err
}

func (s *Streamer) connected(hello *meridianv1.Hello, positions map[string]ltx.Pos) *replica {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.replicas == nil {
		s.replicas = make(map[string]*replica)
	}
	r := s.replicas[hello.GetNode()]
	if r == nil {
		r = &replica{node: hello.GetNode(), acked: make(map[string]ltx.Pos), ackedAt: make(map[string]time.Time),
			confirmed: make(map[string]ltx.Pos), snapshotAt: make(map[string]time.Time)}
		s.replicas[r.node] = r
	}
	r.region = hello.GetRegion()
	r.streams++
	now := time.Now()
	for db, p := range positions {
		r.acked[db], r.ackedAt[db] = p, now
	}
	return r
}

func (s *Streamer) disconnected(r *replica) {
	s.mu.Lock()
	r.streams--
	s.mu.Unlock()
}

// stream is one replica's stream on the primary.
type stream struct {
	s       *Streamer
	conn    Conn
	epoch   uint64
	replica *replica
	// region is the replica's region, as its Hello said: a later stream
	// of the replica changes replica.region under s.mu.
	region string
	log    *slog.Logger
	// sendMu is held while a frame is sent (push).
	sendMu sync.Mutex
	// files and bytes are the room for files in flight that the
	// replica's Hello announced, nil if it announced no bound: a file
	// takes one file and its size in bytes, maxBytes in all, from its
	// LTXBegin to its LTXEnd.
	files, bytes *semaphore.Weighted
	maxBytes     int64
	// streamed: the replica takes files whose size is known only at
	// their end, so a snapshot goes out as it is encoded.
	streamed bool

	mu      sync.Mutex
	started map[string]bool // databases with a sender
	// ships are the ship spans waiting for the replica's acks.
	ships ships
	// dbAttrs holds each database's metric attributes, made once.
	dbAttrs sync.Map
}

// attrs returns the attributes of the metrics of db's files sent on the
// stream (every file, so made once per database).
func (st *stream) attrs(db string) metric.MeasurementOption {
	if a, ok := st.dbAttrs.Load(db); ok {
		return a.(metric.MeasurementOption)
	}
	a, _ := st.dbAttrs.LoadOrStore(db, metric.WithAttributes(attribute.String("replica", st.replica.node),
		attribute.String("replica_region", st.region), attribute.String("db", db)))
	return a.(metric.MeasurementOption)
}

// metrics returns the Streamer's instruments, made on first use.
func (s *Streamer) metrics() *streamerMetrics {
	s.metricsOnce.Do(func() { s.m = newStreamerMetrics(s.Telemetry) })
	return s.m
}

// push sends a frame, stamped with the epoch, and ends the stream if the
// lease changes hands. The frames of every database, and the heartbeats,
// go out one at a time in the order pushed, from the goroutine that
// pushes them: no hand-off to a sender of their own on the way.
func (st *stream) push(ctx context.Context, f *meridianv1.StreamResponse) error {
	st.sendMu.Lock()
	defer st.sendMu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	if e := st.s.Epoch(); e != st.epoch {
		return fmt.Errorf("%w: lease epoch changed from %d to %d", ErrNotPrimary, st.epoch, e)
	}
	f.Epoch = st.epoch
	return st.conn.Send(f)
}

// recv reads the replica's acks until the stream ends.
func (st *stream) recv() error {
	for {
		req, err := st.conn.Recv()
		if err != nil {
			return err
		}
		ack := req.GetAck()
		if ack == nil {
			return fmt.Errorf("%w: a frame other than Ack after the Hello", ErrProtocol)
		}
		st.s.acked(st.replica, ack)
		st.ships.acked(ack.GetDb(), ltx.TXID(ack.GetTxid()))
	}
}

// heartbeats sends the primary's clock and high-water marks on an interval.
func (st *stream) heartbeats(ctx context.Context) error {
	t := time.NewTicker(st.s.HeartbeatInterval)
	defer t.Stop()
	for {
		hb := &meridianv1.Heartbeat{SentAtUnixNano: time.Now().UnixNano()}
		for _, db := range st.s.Source.DBs() {
			if l := st.s.Source.Log(db); l != nil {
				hb.Positions = append(hb.Positions, pbPos(db, l.Pos()))
			}
		}
		if err := st.push(ctx, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_Heartbeat{Heartbeat: hb}}); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// databases starts a sender for every database, now and as they are
// created.
func (st *stream) databases(ctx context.Context, g *errgroup.Group, positions map[string]ltx.Pos) error {
	for {
		changed := st.s.Source.Changed()
		for _, db := range st.s.Source.DBs() {
			st.mu.Lock()
			started := st.started[db]
			st.started[db] = true
			st.mu.Unlock()
			if started {
				continue
			}
			pos, known := positions[db]
			g.Go(func() error {
				err := st.database(ctx, db, pos, known)
				st.mu.Lock()
				delete(st.started, db) // a database deleted and created again
				st.mu.Unlock()
				return err
			})
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

// database sends one database's files from pos, or a snapshot first when
// the log cannot continue from pos (or pos is unknown), until the stream
// ends or the database is deleted.
func (st *stream) database(ctx context.Context, db string, pos ltx.Pos, known bool) error {
	l := st.s.Source.Log(db)
	if l == nil {
		return nil // deleted meanwhile
	}
	for {
		if !known && !fromStart(l) {
			// A replica without the database gets it whole: one file the
			// size of the database, where the log holds more, or no
			// longer starts at its first transaction.
			var err error
			if pos, err = st.snapshot(ctx, db, meridianv1.SnapshotReason_SNAPSHOT_REASON_NO_POSITION, pos); err != nil {
				return err
			}
			known = true
		}
		c, err := l.Cursor(pos)
		if err != nil {
			reason, err := snapshotReason(err)
			if err != nil {
				return fmt.Errorf("stream %s: %w", db, err)
			}
			if !known {
				// The log's start was pruned meanwhile.
				reason = meridianv1.SnapshotReason_SNAPSHOT_REASON_NO_POSITION
			}
			if pos, err = st.snapshot(ctx, db, reason, pos); err != nil {
				return err
			}
			known = true
			continue
		}
		known = true
		if pos, err = st.follow(ctx, db, c); errors.Is(err, ltx.ErrClosed) {
			return nil
		} else if err != nil {
			return err
		}
	}
}

// fromStart reports whether a replica without database l gets it from the
// start of its log, file by file, rather than as a snapshot: the log still
// starts at the database's first transaction (whose file, as any file of
// TXID 1, holds every page), and its files add up to no more than the
// database. So a database created while replicas stream reaches them
// with its first transaction, as any other transaction does, and one
// that holds no transaction yet is waited for.
func fromStart(l *ltx.Log) bool {
	files := l.Files()
	if len(files) == 0 {
		return true
	}
	if files[0].PreApplyPos() != (ltx.Pos{}) {
		return false
	}
	var size int64
	for _, f := range files {
		size += f.Size
	}
	_, pages := l.Checksum()
	return size <= int64(pages)*int64(files[len(files)-1].Header.PageSize)
}

// follow sends the files of c as the log gets them, until the log can no
// longer serve the cursor's position, which it returns. It returns
// ltx.ErrClosed when the database is deleted.
func (st *stream) follow(ctx context.Context, db string, c *ltx.Cursor) (ltx.Pos, error) {
	for {
		r, err := c.Next(ctx)
		if errors.Is(err, ltx.ErrClosed) {
			return ltx.Pos{}, err // deleted, or the node is shutting down
		}
		var pe *ltx.PosError
		if errors.As(err, &pe) {
			return c.Pos(), nil
		} else if err != nil {
			return ltx.Pos{}, fmt.Errorf("stream %s: %w", db, err)
		}
		err = st.file(ctx, db, r, &r.Info, meridianv1.SnapshotReason_SNAPSHOT_REASON_UNSPECIFIED, nil)
		_ = r.Close()
		if err != nil {
			return ltx.Pos{}, err
		}
	}
}

// snapshotReason maps a log's refusal to serve a position to the reason a
// snapshot is sent instead. Other errors come back as they are.
func snapshotReason(err error) (meridianv1.SnapshotReason, error) {
	var pe *ltx.PosError
	if !errors.As(err, &pe) {
		return 0, err
	}
	switch {
	case errors.Is(err, ltx.ErrPosTooOld):
		return meridianv1.SnapshotReason_SNAPSHOT_REASON_RETENTION, nil
	case errors.Is(err, ltx.ErrPosMismatch):
		return meridianv1.SnapshotReason_SNAPSHOT_REASON_CHECKSUM_MISMATCH, nil
	case pe.Pos.TXID > pe.Last.TXID:
		return meridianv1.SnapshotReason_SNAPSHOT_REASON_AHEAD, nil
	default:
		// Inside a file compacted without a record of its positions.
		return meridianv1.SnapshotReason_SNAPSHOT_REASON_RETENTION, nil
	}
}

// snapshot sends a snapshot of db and returns its position: as it is
// encoded to a replica that takes files of a size known only at their end,
// else built into a temporary file first so its size is known before the
// first byte goes out.
func (st *stream) snapshot(ctx context.Context, db string, reason meridianv1.SnapshotReason, from ltx.Pos) (ltx.Pos, error) {
	if err := st.snapshotTurn(ctx, db); err != nil {
		return ltx.Pos{}, err
	}
	if st.streamed {
		return st.streamSnapshot(ctx, db, reason, from)
	}
	f, err := os.CreateTemp(st.s.TempDir, "snapshot-*.ltx")
	if err != nil {
		return ltx.Pos{}, fmt.Errorf("snapshot %s: %w", db, err)
	}
	defer func() {
		_ = f.Close()
		_ = os.Remove(f.Name())
	}()
	info, err := st.s.Source.Snapshot(ctx, db, f)
	if err != nil {
		return ltx.Pos{}, fmt.Errorf("snapshot %s: %w", db, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return ltx.Pos{}, fmt.Errorf("snapshot %s: %w", db, err)
	}
	st.log.Info("sending snapshot", "db", db, "reason", reason.String(), "replica_pos", from.String(), "pos", info.Pos().String(), "size", info.Size)
	// Not verified again as it is read, unlike the log's files: it was
	// encoded a moment ago, and the replica verifies it as it arrives. A
	// file of another size than encoded ends the stream.
	if err := st.file(ctx, db, f, info, reason, nil); err != nil {
		return ltx.Pos{}, err
	}
	return info.Pos(), nil
}

// streamSnapshot sends a snapshot of db while the source encodes it: its
// LTXBegin, once the LTX header is out of the encoder, announces no size
// but the most bytes it can take (ltx.SnapshotBound), its chunks follow
// the encoder, and its LTXEnd carries the size. The encoder writes to a
// temporary file that the sender reads as it grows, so the first bytes
// go out at once while the encoder runs at the speed of the disk, never of
// the network: the source holds the database's writers back only while
// it reads it (see fs.DB.Snapshot), and a slow replica must not make that
// longer.
func (st *stream) streamSnapshot(ctx context.Context, db string, reason meridianv1.SnapshotReason, from ltx.Pos) (ltx.Pos, error) {
	f, err := os.CreateTemp(st.s.TempDir, "snapshot-*.ltx")
	if err != nil {
		return ltx.Pos{}, fmt.Errorf("snapshot %s: %w", db, err)
	}
	_ = os.Remove(f.Name()) // the file descriptor keeps it while it is needed
	ctx, cancel := context.WithCancel(ctx)
	g := newGrowingFile(f)
	var info *ltx.FileInfo // the encoder's, once done is closed
	done := make(chan struct{})
	go func() {
		defer close(done)
		var err error
		info, err = st.s.Source.Snapshot(ctx, db, g)
		g.close(err)
	}()
	defer func() {
		cancel() // an encoder still running stops, and is waited for
		<-done
		_ = f.Close()
	}()
	r := g.reader(ctx)
	hb := make([]byte, ltx.HeaderSize)
	if _, err := io.ReadFull(r, hb); err != nil {
		return ltx.Pos{}, fmt.Errorf("snapshot %s: %w", db, err)
	}
	var h ltx.Header
	if err := h.UnmarshalBinary(hb); err != nil {
		return ltx.Pos{}, fmt.Errorf("snapshot %s: header: %w", db, err)
	}
	bound := ltx.SnapshotBound(h)
	st.log.Info("sending snapshot", "db", db, "reason", reason.String(), "replica_pos", from.String(), "txid", h.MaxTXID.String(),
		"streamed", true, "size_bound", bound)
	final := func(n int64) (*ltx.FileInfo, error) {
		<-done // r returned io.EOF: the encoder succeeded
		if info.Size != n {
			return nil, fmt.Errorf("snapshot %s: sent %d bytes, the encoder wrote %d", db, n, info.Size)
		}
		return info, nil
	}
	head := &ltx.FileInfo{Name: ltx.FormatName(h.MinTXID, h.MaxTXID), Header: h}
	if err := st.file(ctx, db, io.MultiReader(bytes.NewReader(hb), r), head, reason, &streamedFile{bound: bound, final: final}); err != nil {
		return ltx.Pos{}, err
	}
	st.log.Info("sent snapshot", "db", db, "pos", info.Pos().String(), "size", info.Size)
	return info.Pos(), nil
}

// growingFile is a file written by one goroutine and read by another as
// it grows, until close.
type growingFile struct {
	f    *os.File
	mu   sync.Mutex
	grew chan struct{} // closed and replaced when n grows or the file closes
	n    int64         // bytes written
	err  error         // set when the writer ends: its error, or io.EOF
}

func newGrowingFile(f *os.File) *growingFile {
	return &growingFile{f: f, grew: make(chan struct{})}
}

// Write appends p.
func (g *growingFile) Write(p []byte) (int, error) {
	g.mu.Lock()
	off := g.n
	g.mu.Unlock()
	n, err := g.f.WriteAt(p, off)
	g.mu.Lock()
	g.n += int64(n)
	close(g.grew)
	g.grew = make(chan struct{})
	g.mu.Unlock()
	return n, err
}

// close ends the file: readers get err, or io.EOF if it is nil, past its
// last byte.
func (g *growingFile) close(err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err == nil {
		err = io.EOF
	}
	g.err = err
	close(g.grew)
	g.grew = make(chan struct{})
}

// reader returns a reader of the file from its start that waits for the
// bytes not yet written, until ctx ends.
func (g *growingFile) reader(ctx context.Context) io.Reader {
	return &growingReader{g: g, ctx: ctx}
}

type growingReader struct {
	g   *growingFile
	ctx context.Context
	off int64
}

func (r *growingReader) Read(p []byte) (int, error) {
	g := r.g
	for {
		g.mu.Lock()
		n, err, grew := g.n, g.err, g.grew
		g.mu.Unlock()
		if r.off < n {
			m, rerr := g.f.ReadAt(p[:min(int64(len(p)), n-r.off)], r.off)
			r.off += int64(m)
			if rerr == io.EOF {
				rerr = nil // written since: n says so
			}
			return m, rerr
		}
		if err != nil {
			return 0, err
		}
		select {
		case <-grew:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}

// streamedFile is how a file sent while it is encoded ends: bound is the
// most bytes it can have, final the file once its n bytes are sent.
type streamedFile struct {
	bound int64
	final func(n int64) (*ltx.FileInfo, error)
}

// snapshotTurn waits, if the replica had a snapshot of db less than
// SnapshotInterval ago, until that much time has passed, and records the
// start of this one.
func (st *stream) snapshotTurn(ctx context.Context, db string) error {
	s, r := st.s, st.replica
	s.mu.Lock()
	last := r.snapshotAt[db]
	wait := time.Until(last.Add(s.SnapshotInterval))
	s.mu.Unlock()
	if !last.IsZero() && wait > 0 {
		st.log.Warn("replica asks for snapshots of a database faster than the primary sends them; its next one waits",
			"db", db, "wait", wait.Round(time.Millisecond), "limit", fmt.Sprintf("one per %v", s.SnapshotInterval))
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	s.mu.Lock()
	r.snapshotAt[db] = time.Now()
	s.mu.Unlock()
	return nil
}

// file sends one LTX file: LTXBegin, its bytes in chunks, LTXEnd. r
// verifies the bytes as they are read, so a damaged file ends the stream
// before its LTXEnd goes out. A file sent while it is encoded (streamed
// not nil) has no size in info until streamed.final gives it.
func (st *stream) file(ctx context.Context, db string, r io.Reader, info *ltx.FileInfo, reason meridianv1.SnapshotReason, streamed *streamedFile) error {
	room := info.Size
	if streamed != nil {
		room = streamed.bound
	}
	release, err := st.room(ctx, db, info.Name, room)
	if err != nil {
		return err
	}
	defer release()
	h := info.Header
	begin := &meridianv1.LTXBegin{
		Db:                  db,
		IsSnapshot:          h.IsSnapshot(),
		SnapshotReason:      reason,
		MinTxid:             uint64(h.MinTXID),
		MaxTxid:             uint64(h.MaxTXID),
		PreApplyChecksum:    uint64(h.PreApplyChecksum),
		Size:                uint64(info.Size),
		CommittedAtUnixNano: info.Time().UnixNano(),
	}
	if streamed != nil {
		begin.Size, begin.SizeBound = 0, uint64(streamed.bound)
	}
	m := st.s.metrics()
	if m.traced && st.s.CommitTrace != nil && !h.IsSnapshot() && h.MinTXID == h.MaxTXID {
		if sc := st.s.CommitTrace(db, h.MaxTXID); sc.IsValid() {
			_, span := m.tracer.Start(trace.ContextWithSpanContext(ctx, sc), "ship", trace.WithSpanKind(trace.SpanKindProducer),
				trace.WithAttributes(
					attribute.String("meridian.db", db),
					attribute.Int64("meridian.txid", int64(h.MaxTXID)),
					attribute.String("meridian.replica", st.replica.node),
					attribute.String("meridian.replica_region", st.region),
					attribute.Int64("meridian.bytes", info.Size),
				))
			begin.Traceparent, begin.Tracestate = traceparent(span.SpanContext())
			st.ships.add(db, h.MaxTXID, span)
		}
	}
	if err := st.push(ctx, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxBegin{LtxBegin: begin}}); err != nil {
		return err
	}
	var off int64
	for {
		// Sized to what is left (most files are a few KiB): one byte past
		// the end finds EOF, or a file longer than the log says.
		buf := make([]byte, min(int64(st.s.ChunkSize), max(room-off, 1)))
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			chunk := &meridianv1.LTXChunk{Db: db, Offset: uint64(off), Data: buf[:n]}
			if err := st.push(ctx, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxChunk{LtxChunk: chunk}}); err != nil {
				return err
			}
			off += int64(n)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		} else if err != nil {
			return fmt.Errorf("send %s of %s: %w", info.Name, db, err)
		}
	}
	if streamed != nil {
		if info, err = streamed.final(off); err != nil {
			return err
		}
	} else if off != info.Size {
		return fmt.Errorf("send %s of %s: read %d bytes, the log says %d", info.Name, db, off, info.Size)
	}
	end := &meridianv1.LTXEnd{Db: db, FileChecksum: uint64(info.FileChecksum), PostApplyChecksum: uint64(info.PostApplyChecksum)}
	if streamed != nil {
		end.Size = uint64(off)
	}
	if err := st.push(ctx, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxEnd{LtxEnd: end}}); err != nil {
		return err
	}
	attrs := st.attrs(db)
	m.bytes.Add(ctx, off, attrs)
	m.files.Add(ctx, 1, attrs)
	if begin.IsSnapshot {
		m.snapshots.Add(ctx, 1, metric.WithAttributes(attribute.String("replica", st.replica.node), attribute.String("replica_region", st.region),
			attribute.String("db", db), attribute.String("reason", SnapshotReason(reason).String())))
	}
	return nil
}

// room waits until the replica has room for file info of db in flight,
// and returns the function that gives it back once the file's LTXEnd is
// sent (frames go out in the order they are pushed, so the replica sees
// that LTXEnd before the LTXBegin that takes the room next). Files wait in
// turn, a large one too. A file larger than all the room can never be
// sent: an error.
func (st *stream) room(ctx context.Context, db, name string, size int64) (release func(), err error) {
	if st.bytes != nil && size > st.maxBytes {
		return nil, fmt.Errorf("send %s of %s: the file has %d bytes, more than the %d replica %s receives at once "+
			"(its replication.max_in_flight_bytes)", name, db, size, st.maxBytes, st.replica.node)
	}
	if st.files != nil {
		if err := st.files.Acquire(ctx, 1); err != nil {
			return nil, err
		}
	}
	if st.bytes != nil {
		if err := st.bytes.Acquire(ctx, size); err != nil {
			if st.files != nil {
				st.files.Release(1)
			}
			return nil, err
		}
	}
	return func() {
		if st.files != nil {
			st.files.Release(1)
		}
		if st.bytes != nil {
			st.bytes.Release(size)
		}
	}, nil
}

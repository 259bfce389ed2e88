package rpc_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/meridian-db/meridian/internal/pki"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
	"github.com/meridian-db/meridian/replication/internal/repltest"
	"github.com/meridian-db/meridian/replication/rpc"
)

// certs is a cluster CA in a temporary directory with certificates for
// iad-1 (the primary) and fra-1 (the replica).
type certs struct {
	caDir, caFile string
	iad, fra      pki.Issued
}

func mustCerts(tb testing.TB) *certs {
	tb.Helper()
	caDir := filepath.Join(tb.TempDir(), "ca")
	if _, err := pki.InitCA(caDir, "Test CA", 0); err != nil {
		tb.Fatal(err)
	}
	return &certs{caDir: caDir, caFile: filepath.Join(caDir, pki.CACertFile),
		iad: mustIssue(tb, caDir, "iad-1"), fra: mustIssue(tb, caDir, "fra-1")}
}

func mustIssue(tb testing.TB, caDir, node string) pki.Issued {
	tb.Helper()
	is, err := pki.Issue(caDir, tb.TempDir(), node, pki.IssueOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	return is
}

// server returns iad-1's server configuration, which knows iad-1 and fra-1.
func (c *certs) server(tb testing.TB) *tls.Config {
	tb.Helper()
	cfg, err := pki.ServerConfig(c.caFile, c.iad.CertFile, c.iad.KeyFile, func() []string { return []string{"iad-1", "fra-1"} })
	if err != nil {
		tb.Fatal(err)
	}
	return cfg
}

// client returns the configuration of is's node dialing iad-1.
func (c *certs) client(tb testing.TB, is pki.Issued) *tls.Config {
	tb.Helper()
	cfg, err := pki.ClientConfig(c.caFile, is.CertFile, is.KeyFile, "iad-1")
	if err != nil {
		tb.Fatal(err)
	}
	return cfg
}

// logSink keeps the lines a logger writes, and passes them to the test's
// log.
type logSink struct {
	tb    testing.TB
	mu    sync.Mutex
	lines []string
}

func newLogger(tb testing.TB) (*slog.Logger, *logSink) {
	s := &logSink{tb: tb}
	return slog.New(slog.NewTextHandler(s, &slog.HandlerOptions{Level: slog.LevelDebug})), s
}

func (s *logSink) Write(p []byte) (int, error) {
	line := string(bytes.TrimRight(p, "\n"))
	s.mu.Lock()
	s.lines = append(s.lines, line)
	s.mu.Unlock()
	s.tb.Log(line)
	return len(p), nil
}

// matching returns the lines that contain every string of want.
func (s *logSink) matching(want ...string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, l := range s.lines {
		if !slices.ContainsFunc(want, func(w string) bool { return !strings.Contains(l, w) }) {
			out = append(out, l)
		}
	}
	return out
}

// wait waits for a line that contains every string of want and returns
// it.
func (s *logSink) wait(tb testing.TB, want ...string) string {
	tb.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if m := s.matching(want...); len(m) > 0 {
			return m[0]
		}
	}
	tb.Fatalf("no log line contains all of %q", want)
	return ""
}

// grpcNode is a Streamer served over gRPC on a loopback address.
type grpcNode struct {
	addr string
	stop func()
}

// serve serves streamer with tlsConfig (nil: plaintext) on addr until the
// test ends or stop is called.
func serve(tb testing.TB, streamer *replication.Streamer, status func(context.Context) *meridianv1.StatusResponse, tlsConfig *tls.Config, addr string, logger *slog.Logger) *grpcNode {
	tb.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	srv := rpc.NewServer(streamer, status)
	srv.Logger = logger
	gs := rpc.NewGRPCServer(srv, tlsConfig)
	done := make(chan error, 1)
	go func() { done <- gs.Serve(lis) }()
	var once sync.Once
	n := &grpcNode{addr: lis.Addr().String()}
	n.stop = func() {
		once.Do(func() {
			gs.Stop()
			select {
			case err := <-done:
				if err != nil {
					tb.Errorf("serve on %s: %v", n.addr, err)
				}
			case <-time.After(repltest.WaitTimeout):
				tb.Errorf("serve on %s: Serve did not return within %v of Stop", n.addr, repltest.WaitTimeout)
			}
		})
	}
	tb.Cleanup(n.stop)
	return n
}

// newStreamer returns iad-1's Streamer of p at the epoch epoch holds.
func newStreamer(tb testing.TB, p *repltest.Primary, epoch *atomic.Uint64, logger *slog.Logger) *replication.Streamer {
	s := replication.NewStreamer(p, "iad-1", epoch.Load, tb.TempDir())
	s.HeartbeatInterval = 20 * time.Millisecond
	s.Logger = logger
	return s
}

// newReplica returns a replica client named node applying to t.
func newReplica(tb testing.TB, node string, t *repltest.Target, logger *slog.Logger) *replication.Client {
	cl := replication.NewClient(node, "fra", t, tb.TempDir())
	cl.MinBackoff, cl.MaxBackoff = time.Millisecond, 20*time.Millisecond
	cl.Logger = logger
	return cl
}

// mustDial returns a Dialer of addr, closed when the test ends.
func mustDial(tb testing.TB, addr string, tlsConfig *tls.Config, logger *slog.Logger) *rpc.Dialer {
	tb.Helper()
	d, err := rpc.Dial(addr, tlsConfig, logger)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := d.Close(); err != nil {
			tb.Errorf("close dialer: %v", err)
		}
	})
	return d
}

// runClient runs cl with dial until the test ends or stop is called.
func runClient(tb testing.TB, cl *replication.Client, dial func(context.Context) (replication.ClientConn, error)) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = cl.Run(ctx, dial)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			repltest.WaitClosed(tb, done, "the replica's Run to return once its context was canceled")
		})
	}
	tb.Cleanup(stop)
	return stop
}

// checkGoroutines fails the test if, once every later cleanup has run,
// goroutines of gRPC or of packages replication and rpc are still there
// after a grace period. Call it first, so its cleanup runs last.
func checkGoroutines(tb testing.TB) {
	tb.Cleanup(func() {
		var left []string
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if left = leftGoroutines(); len(left) == 0 {
				return
			}
		}
		tb.Errorf("%d goroutines left behind:\n\n%s", len(left), strings.Join(left, "\n\n"))
	})
}

// leftGoroutines returns the stacks of the goroutines, other than the
// caller's, that run code of gRPC or of packages replication and rpc.
func leftGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var left []string
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i == 0 { // this goroutine
			continue
		}
		if strings.Contains(g, "google.golang.org/grpc") || strings.Contains(g, "meridian/replication.") ||
			strings.Contains(g, "meridian/replication/rpc.") {
			left = append(left, g)
		}
	}
	return left
}

// bigInsert returns a write that adds rows random bytes of 3,000 bytes each
// to database name of p: incompressible, so its LTX file is about as large
// as the pages it writes.
func bigInsert(p *repltest.Primary, name string, rows int) func() error {
	d := p.DB(name)
	return func() error {
		_, err := d.SQL.Exec(fmt.Sprintf(`CREATE TABLE IF NOT EXISTS blobs(b BLOB);
			WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < %d)
			INSERT INTO blobs SELECT randomblob(3000) FROM n`, rows))
		return err
	}
}

// waitAcked waits until streamer's replica node has acked the primary's
// position of every database.
func waitAcked(tb testing.TB, streamer *replication.Streamer, p *repltest.Primary, node string) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, name := range p.DBs() {
		for {
			var acked string
			for _, r := range streamer.Replicas() {
				if r.Node == node {
					acked = r.Acked[name].String()
				}
			}
			want := p.Log(name).Pos().String()
			if acked == want {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("primary has %s of %s acked at %q, want %s", name, node, acked, want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func TestGRPC_Stream(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		checkGoroutines(t)
		c := mustCerts(t)
		logger, logs := newLogger(t)
		p := repltest.NewPrimary(t)
		// big.db is a few MB, and its log is pruned, so that a new
		// replica gets it as one snapshot much larger than a chunk.
		p.Create("big.db", 1)
		p.Write("big.db", bigInsert(p, "big.db", 1000))
		l := p.Log("big.db")
		l.Retention, l.MaxRetention = time.Minute, time.Minute
		if n, err := l.Prune(context.Background(), l.Pos().TXID, time.Now().Add(time.Hour)); err != nil || n == 0 {
			t.Fatalf("prune: %d files, %v", n, err)
		}
		p.Create("small.db", 2)
		p.Steps("small.db", 30)

		var epoch atomic.Uint64
		epoch.Store(4)
		streamer := newStreamer(t, p, &epoch, logger)
		n := serve(t, streamer, nil, c.server(t), "127.0.0.1:0", logger)
		tg := repltest.NewTarget(t)
		cl := newReplica(t, "fra-1", tg, logger)
		d := mustDial(t, n.addr, c.client(t, c.fra), logger)
		runClient(t, cl, d.Stream)
		repltest.WaitSynced(t, p, tg)
		smallFiles := len(p.Log("small.db").Files())

		// More files, one of them of several chunks.
		p.Write("big.db", bigInsert(p, "big.db", 300))
		p.Steps("big.db", 20)
		p.Steps("small.db", 20)
		repltest.WaitSynced(t, p, tg)

		// Every file once after a snapshot of each database.
		applied, offered, largest := tg.Counts()
		want := tg.WantApplied(p)
		if applied != want || offered != want {
			t.Fatalf("replica applied %d of %d files it was offered, want %d of %d", applied, offered, want, want)
		}
		got := tg.SnapshotReasons()
		noPos := replication.SnapshotNoPosition
		if wantReasons := []replication.SnapshotReason{noPos, noPos}; !slices.Equal(got, wantReasons) {
			t.Fatalf("snapshots applied: %v, want %v", got, wantReasons)
		}
		if largest < 2*rpc.MaxMessageSize {
			t.Fatalf("largest file applied has %d bytes, want more than 2 MiB, several messages' worth", largest)
		}
		if smallFiles < 20 {
			t.Fatalf("small.db's log has %d files after 31 transactions", smallFiles)
		}
		waitAcked(t, streamer, p, "fra-1")
		if st := cl.Status(); st.Epoch != 4 || !st.Connected || st.Reconnects != 0 {
			t.Fatalf("client status: epoch %d, connected %v, %d reconnects; want 4, true, 0", st.Epoch, st.Connected, st.Reconnects)
		}
		// No warning: no handshake or stream failure, and the snapshots
		// of databases the replica never had are routine.
		if warnings := logs.matching("level=WARN"); len(warnings) != 0 {
			t.Fatalf("warnings logged: %q, want none", warnings)
		}
		if infos := logs.matching("level=INFO", `msg="applying a snapshot from the primary"`, "SNAPSHOT_REASON_NO_POSITION"); len(infos) != 2 {
			t.Fatalf("snapshot lines logged: %q, want one for each database", infos)
		}
	})

	t.Run("Insecure", func(t *testing.T) {
		checkGoroutines(t)
		logger, logs := newLogger(t)
		p := repltest.NewPrimary(t)
		p.Create("a.db", 1)
		p.Steps("a.db", 20)
		var epoch atomic.Uint64
		epoch.Store(1)
		n := serve(t, newStreamer(t, p, &epoch, logger), nil, nil, "127.0.0.1:0", logger)
		tg := repltest.NewTarget(t)
		d := mustDial(t, n.addr, nil, logger)
		runClient(t, newReplica(t, "fra-1", tg, logger), d.Stream)
		repltest.WaitSynced(t, p, tg)
		// Said loudly, once by the server and once by the dialer.
		if m := logs.matching("level=WARN", "without TLS", "plaintext and unauthenticated", "tests and demos only"); len(m) != 2 {
			t.Fatalf("got %d warnings about running without TLS, want 2: %q", len(m), m)
		}
		if applied, _, _ := tg.Counts(); applied != tg.WantApplied(p) {
			t.Fatalf("replica applied %d files, want %d", applied, tg.WantApplied(p))
		}
	})
}

func TestGRPC_Refused(t *testing.T) {
	checkGoroutines(t)
	c := mustCerts(t)
	logger, logs := newLogger(t)
	p := repltest.NewPrimary(t)
	p.Create("a.db", 1)
	var epoch atomic.Uint64
	epoch.Store(1)
	n := serve(t, newStreamer(t, p, &epoch, logger), nil, c.server(t), "127.0.0.1:0", logger)
	fra := mustDial(t, n.addr, c.client(t, c.fra), logger)

	// session runs one stream of a replica named node through d and
	// returns how it ended.
	session := func(t *testing.T, node string, d *rpc.Dialer) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := d.Stream(ctx)
		if err != nil {
			return err
		}
		tg := repltest.NewTarget(t)
		frames, err := newReplica(t, node, tg, logger).Session(ctx, conn)
		if errors.Is(err, io.EOF) {
			// The Hello met a stream the server had already ended;
			// Recv has the status that says why.
			_, err = conn.Recv()
		}
		if frames != 0 {
			t.Fatalf("refused stream delivered %d frames", frames)
		}
		if applied, _, _ := tg.Counts(); applied != 0 {
			t.Fatalf("refused stream applied %d files", applied)
		}
		return err
	}
	assertStatus := func(t *testing.T, err error, code codes.Code, msg ...string) {
		t.Helper()
		if got := status.Code(err); got != code {
			t.Fatalf("got code %v (%v), want %v", got, err, code)
		}
		for _, m := range msg {
			if !strings.Contains(err.Error(), m) {
				t.Fatalf("got %q, want it to contain %q", err, m)
			}
		}
	}

	t.Run("ErrPermission", func(t *testing.T) {
		// fra-1's certificate, but a Hello that says syd-1.
		err := session(t, "syd-1", fra)
		assertStatus(t, err, codes.PermissionDenied, n.addr, `Hello names node "syd-1", but its certificate names "fra-1"`)
		logs.wait(t, "level=WARN", "replication stream failed", "peer=fra-1", "permission denied")
	})

	t.Run("ErrNotPrimary", func(t *testing.T) {
		epoch.Store(0)
		defer epoch.Store(1)
		err := session(t, "fra-1", fra)
		assertStatus(t, err, codes.FailedPrecondition, "not the primary: node iad-1 does not hold the write lease")
	})

	t.Run("ErrProtocol", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := fra.Stream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := conn.Send(&meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Ack{Ack: &meridianv1.Ack{Db: "a.db", Txid: 1}}}); err != nil {
			t.Fatal(err)
		}
		resp, err := conn.Recv()
		if resp != nil {
			t.Fatalf("got a frame %v", resp)
		}
		assertStatus(t, err, codes.InvalidArgument, "first frame is not a Hello")
	})

	t.Run("ErrPlaintextClient", func(t *testing.T) {
		err := session(t, "fra-1", mustDial(t, n.addr, nil, logger))
		assertStatus(t, err, codes.Unavailable, n.addr)
		logs.wait(t, "level=WARN", "refused a replication connection: TLS handshake failed", "remote=127.0.0.1:",
			"the peer does not speak TLS; is it running with tls.insecure: true?")
	})

	t.Run("ErrUnknownNode", func(t *testing.T) {
		zzz := mustIssue(t, c.caDir, "zzz-9")
		err := session(t, "zzz-9", mustDial(t, n.addr, c.client(t, zzz), logger))
		assertStatus(t, err, codes.Unavailable, n.addr)
		logs.wait(t, "level=WARN", "TLS handshake failed", "remote=127.0.0.1:",
			`client certificate names node \"zzz-9\", which is not a known node (known: fra-1, iad-1)`)
	})

	// The refusals left the server serving.
	tg := repltest.NewTarget(t)
	runClient(t, newReplica(t, "fra-1", tg, logger), fra.Stream)
	repltest.WaitSynced(t, p, tg)
}

func TestGRPC_Reconnect(t *testing.T) {
	checkGoroutines(t)
	c := mustCerts(t)
	logger, _ := newLogger(t)
	p := repltest.NewPrimary(t)
	p.Create("a.db", 1)
	p.Steps("a.db", 20)
	var epoch atomic.Uint64
	epoch.Store(1)
	n1 := serve(t, newStreamer(t, p, &epoch, logger), nil, c.server(t), "127.0.0.1:0", logger)
	tg := repltest.NewTarget(t)
	cl := newReplica(t, "fra-1", tg, logger)
	d := mustDial(t, n1.addr, c.client(t, c.fra), logger)
	runClient(t, cl, d.Stream)
	repltest.WaitSynced(t, p, tg)

	// The primary stops while transactions stream, and starts again on
	// the same address with a new Streamer, as after a restart.
	var wg sync.WaitGroup
	wg.Go(func() { p.Steps("a.db", 100) })
	base, _, _ := tg.Counts()
	for deadline := time.Now().Add(repltest.WaitTimeout); ; time.Sleep(time.Millisecond) {
		applied, _, _ := tg.Counts()
		if applied >= base+10 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica applied %d files in %v while the primary committed, want 10 before it stops", applied-base, repltest.WaitTimeout)
		}
	}
	n1.stop()
	repltest.WaitGroup(t, &wg, "the transactions committed while the primary stopped")
	p.Steps("a.db", 10)
	streamer2 := newStreamer(t, p, &epoch, logger)
	serve(t, streamer2, nil, c.server(t), n1.addr, logger)
	repltest.WaitSynced(t, p, tg)

	// Resumed where it stopped: every file applied once, no snapshot but
	// the log's first file, and no file offered twice.
	applied, offered, _ := tg.Counts()
	if want := tg.WantApplied(p); applied != want || offered != want {
		t.Fatalf("replica applied %d of %d files it was offered, want %d of %d", applied, offered, want, want)
	}
	if got := tg.SnapshotReasons(); !slices.Equal(got, []replication.SnapshotReason{replication.SnapshotNoPosition}) {
		t.Fatalf("snapshots applied: %v, want only the first, for lack of a position", got)
	}
	if st := cl.Status(); st.Reconnects == 0 || !st.Connected {
		t.Fatalf("client status: %d reconnects, connected %v; want at least 1, true", st.Reconnects, st.Connected)
	}
	waitAcked(t, streamer2, p, "fra-1")
}

func TestGRPC_Status(t *testing.T) {
	checkGoroutines(t)
	c := mustCerts(t)
	logger, _ := newLogger(t)
	p := repltest.NewPrimary(t)
	var epoch atomic.Uint64
	want := &meridianv1.StatusResponse{Node: "iad-1", Region: "iad", Role: meridianv1.Role_ROLE_PRIMARY, Epoch: 3,
		Positions: []*meridianv1.DatabasePosition{{Db: "a.db", Txid: 7, PostApplyChecksum: 1<<63 | 42}}}
	n := serve(t, newStreamer(t, p, &epoch, logger), func(context.Context) *meridianv1.StatusResponse { return want },
		c.server(t), "127.0.0.1:0", logger)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := mustDial(t, n.addr, c.client(t, c.fra), logger).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}

	// Without a StatusFunc, Status is unimplemented.
	n2 := serve(t, newStreamer(t, p, &epoch, logger), nil, c.server(t), "127.0.0.1:0", logger)
	_, err = mustDial(t, n2.addr, c.client(t, c.fra), logger).Status(ctx)
	if status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "status of "+n2.addr) ||
		!strings.Contains(err.Error(), "does not report its status") {
		t.Fatalf("got %v, want Unimplemented naming %s", err, n2.addr)
	}
}

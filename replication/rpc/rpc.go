// Package rpc is the gRPC transport of package replication: Server serves
// a primary's replication.Streamer as ReplicationService
// (proto/meridian/v1), NewGRPCServer runs it over mutually authenticated
// TLS (internal/pki), and a replica's Dialer opens the streams that its
// replication.Client runs on. The replication package itself knows nothing
// of gRPC.
package rpc

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meridian-db/meridian/internal/pki"
	"github.com/meridian-db/meridian/ltx"
	rpcv1 "github.com/meridian-db/meridian/proto/meridian/rpc/v1"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
)

// Settings of the gRPC transport, on both sides.
const (
	// MaxMessageSize bounds every message either side sends or accepts. The
	// largest frame is an LTXChunk of replication.DefaultChunkSize (256
	// KiB) of data; the rest is room for a Hello or Status listing many
	// databases.
	MaxMessageSize = 1 << 20

	// keepaliveTime and keepaliveTimeout: a replica pings a connection
	// that has been quiet this long and drops it if no answer comes
	// within the timeout, so a half-open connection to a lost primary
	// ends in seconds rather than when the kernel gives up.
	keepaliveTime    = 10 * time.Second
	keepaliveTimeout = 5 * time.Second

	// keepaliveMinTime is the most often the server lets a replica ping;
	// below keepaliveTime, so the replica's pings are never refused.
	keepaliveMinTime = 5 * time.Second

	// serverKeepaliveTime is when the server pings a quiet replica.
	serverKeepaliveTime = 30 * time.Second

	// minConnectTimeout is how long one attempt to connect may take.
	minConnectTimeout = 5 * time.Second

	// streamWindow and connWindow are the HTTP/2 flow-control windows of
	// each stream and of the connection, fixed rather than grown by gRPC's
	// bandwidth estimator: a receiver returns credit once a quarter of a
	// window is used, so a stream of small files costs one WINDOW_UPDATE
	// per megabyte rather than one every few files, and no estimator
	// pings. The windows bound what a peer may send that the other side
	// has not read yet.
	streamWindow = 4 << 20
	connWindow   = 16 << 20
)

// insecureWarning is logged once per server and per Dialer made without
// TLS.
const insecureWarning = "replication without TLS (tls.insecure): streams are plaintext and unauthenticated; " +
	"anyone who can reach this node can read every transaction and pose as any node. " +
	"Use it for tests and demos only; set up certificates with `regiond ca init` and `regiond ca issue`"

// Server serves ReplicationService over gRPC: Stream runs a replica's
// stream on Streamer, Status answers with StatusFunc. Register it with
// NewGRPCServer.
type Server struct {
	rpcv1.UnimplementedReplicationServiceServer

	Streamer *replication.Streamer
	// StatusFunc returns this node's own view for Status; nil makes Status
	// fail with Unimplemented.
	StatusFunc func(context.Context) *meridianv1.StatusResponse
	// Logger logs refused streams and failed TLS handshakes.
	Logger *slog.Logger
}

var _ rpcv1.ReplicationServiceServer = (*Server)(nil)

// NewServer returns a Server of streamer's streams and status's view,
// logging nowhere.
func NewServer(streamer *replication.Streamer, status func(context.Context) *meridianv1.StatusResponse) *Server {
	return &Server{Streamer: streamer, StatusFunc: status, Logger: slog.New(slog.DiscardHandler)}
}

// Stream serves one replica's stream: it names the replica by its verified
// TLS client certificate ("" without TLS) and runs Streamer.Serve until the
// stream ends. It is called by gRPC on a goroutine of its own per stream.
// The error is a gRPC status: FAILED_PRECONDITION if this node does not
// hold the lease or the replica has seen a newer epoch, PERMISSION_DENIED
// if the Hello names another node than the certificate, INVALID_ARGUMENT
// for a protocol violation, UNAUTHENTICATED for a TLS connection without a
// verified client certificate that names a node.
func (s *Server) Stream(stream rpcv1.ReplicationService_StreamServer) error {
	ctx := stream.Context()
	node, remote, err := peerNode(ctx)
	if err == nil {
		err = s.Streamer.Serve(ctx, stream, node)
	}
	serr := statusError(err)
	switch status.Code(serr) {
	case codes.OK, codes.Canceled, codes.Unavailable:
	case codes.FailedPrecondition:
		s.Logger.Info("refused a replication stream", "remote", remote, "peer", node, "err", err)
	default:
		s.Logger.Warn("replication stream failed", "remote", remote, "peer", node, "err", err)
	}
	return serr
}

// Status returns what StatusFunc returns. It is called by gRPC, on any
// goroutine.
func (s *Server) Status(ctx context.Context, _ *meridianv1.StatusRequest) (*meridianv1.StatusResponse, error) {
	if s.StatusFunc == nil {
		return nil, status.Error(codes.Unimplemented, "this node does not report its status over replication")
	}
	return s.StatusFunc(ctx), nil
}

// peerNode returns the node that the verified TLS client certificate of
// the call in ctx names, "" for a connection without TLS, and the remote
// address.
func peerNode(ctx context.Context) (node, remote string, err error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", "", status.Error(codes.Internal, "replication stream: no peer in the call's context")
	}
	if p.Addr != nil {
		remote = p.Addr.String()
	}
	switch info := p.AuthInfo.(type) {
	case credentials.TLSInfo:
		node, err := pki.PeerNode(info.State)
		if err != nil {
			return "", remote, status.Errorf(codes.Unauthenticated, "replication stream from %s: client certificate: %v", remote, err)
		}
		return node, remote, nil
	case nil:
		return "", remote, nil
	default:
		if info.AuthType() == "insecure" {
			return "", remote, nil
		}
		return "", remote, status.Errorf(codes.Unauthenticated, "replication stream from %s: %s transport credentials name no node; use TLS", remote, info.AuthType())
	}
}

// statusError maps an error of Streamer.Serve to a gRPC status with the
// same message.
func statusError(err error) error {
	var code codes.Code
	switch {
	case err == nil, errors.Is(err, io.EOF): // the replica ended the stream
		return nil
	case errors.Is(err, replication.ErrNotPrimary), errors.Is(err, replication.ErrStaleEpoch):
		code = codes.FailedPrecondition
	case errors.Is(err, replication.ErrProtocol):
		code = codes.InvalidArgument
	case errors.Is(err, replication.ErrPermission):
		code = codes.PermissionDenied
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, ltx.ErrClosed):
		code = codes.Unavailable // shutting down
	default:
		if s, ok := status.FromError(err); ok {
			return s.Err() // from the transport, e.g. a replica gone
		}
		code = codes.Internal
	}
	return status.Error(code, err.Error())
}

// NewGRPCServer returns a gRPC server with srv registered, its messages
// bounded by MaxMessageSize and keepalives that allow the replicas' (see
// Dial). With tlsConfig (from pki.ServerConfig) it accepts only TLS: every
// failed handshake is logged with srv.Logger at WARN with the remote
// address and what went wrong (pki.HandshakeError). With a nil tlsConfig
// it serves plaintext and logs so, at WARN. A nil srv.Logger is set to
// slog.Default(). Stop waits for the streams' handlers to return.
func NewGRPCServer(srv *Server, tlsConfig *tls.Config) *grpc.Server {
	if srv.Logger == nil {
		srv.Logger = slog.Default()
	}
	var creds credentials.TransportCredentials
	if tlsConfig == nil {
		srv.Logger.Warn(insecureWarning)
		creds = insecure.NewCredentials()
	} else {
		creds = &handshakeLogger{TransportCredentials: credentials.NewTLS(tlsConfig), logger: srv.Logger}
	}
	s := grpc.NewServer(
		grpc.Creds(creds),
		grpc.MaxRecvMsgSize(MaxMessageSize),
		grpc.MaxSendMsgSize(MaxMessageSize),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: serverKeepaliveTime, Timeout: keepaliveTimeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: keepaliveMinTime, PermitWithoutStream: true}),
		grpc.WaitForHandlers(true),
		grpc.InitialWindowSize(streamWindow),
		grpc.InitialConnWindowSize(connWindow),
	)
	rpcv1.RegisterReplicationServiceServer(s, srv)
	return s
}

// handshakeLogger logs the failed TLS handshakes of a server, which gRPC
// otherwise reports only through grpclog.
type handshakeLogger struct {
	credentials.TransportCredentials
	logger *slog.Logger
}

// ServerHandshake runs the TLS handshake and logs its failure.
func (h *handshakeLogger) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c, info, err := h.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		h.logger.Warn("refused a replication connection: TLS handshake failed",
			"remote", conn.RemoteAddr().String(), "err", pki.HandshakeError(err))
	}
	return c, info, err
}

// Clone returns a copy that logs to the same logger.
func (h *handshakeLogger) Clone() credentials.TransportCredentials {
	return &handshakeLogger{TransportCredentials: h.TransportCredentials.Clone(), logger: h.logger}
}

// Dialer opens replication streams to one primary over one gRPC
// connection, which it keeps up, reconnecting with backoff.
type Dialer struct {
	addr string
	conn *grpc.ClientConn
	rpc  rpcv1.ReplicationServiceClient
}

// Dial returns a Dialer of the primary at addr (host:port). It does not
// connect until the first call. With tlsConfig (from pki.ClientConfig for
// the primary's node) it speaks only TLS; with a nil tlsConfig it speaks
// plaintext and logs so with logger, at WARN. Messages are bounded by
// MaxMessageSize; the connection is pinged when quiet (keepalive) and
// redialed with a backoff from replication.DefaultMinBackoff to
// replication.DefaultMaxBackoff. A nil logger is slog.Default().
func Dial(addr string, tlsConfig *tls.Config, logger *slog.Logger) (*Dialer, error) {
	creds := insecure.NewCredentials()
	if tlsConfig != nil {
		creds = credentials.NewTLS(tlsConfig)
	} else {
		if logger == nil {
			logger = slog.Default()
		}
		logger.Warn(insecureWarning, "primary", addr)
	}
	bo := backoff.DefaultConfig
	bo.BaseDelay, bo.MaxDelay = replication.DefaultMinBackoff, replication.DefaultMaxBackoff
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: keepaliveTime, Timeout: keepaliveTimeout, PermitWithoutStream: true}),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: minConnectTimeout}),
		grpc.WithInitialWindowSize(streamWindow),
		grpc.WithInitialConnWindowSize(connWindow),
	)
	if err != nil {
		return nil, fmt.Errorf("dial replication primary %s: %w", addr, err)
	}
	return &Dialer{addr: addr, conn: conn, rpc: rpcv1.NewReplicationServiceClient(conn)}, nil
}

// Stream opens a replication stream, which ends when ctx is done. It is
// the dial function of replication.Client.Run, and may be called from any
// goroutine. The errors of the stream's Send and Recv name the primary's
// address and wrap the gRPC status (see Server.Stream for the codes).
func (d *Dialer) Stream(ctx context.Context) (replication.ClientConn, error) {
	s, err := d.rpc.Stream(ctx)
	if err != nil {
		return nil, fmt.Errorf("open replication stream to %s: %w", d.addr, err)
	}
	return &clientStream{s: s, addr: d.addr}, nil
}

// Status asks the node at the Dialer's address for its own view.
func (d *Dialer) Status(ctx context.Context) (*meridianv1.StatusResponse, error) {
	resp, err := d.rpc.Status(ctx, &meridianv1.StatusRequest{})
	if err != nil {
		return nil, fmt.Errorf("status of %s: %w", d.addr, err)
	}
	return resp, nil
}

// Close closes the connection, ending its streams.
func (d *Dialer) Close() error {
	if err := d.conn.Close(); err != nil {
		return fmt.Errorf("close replication connection to %s: %w", d.addr, err)
	}
	return nil
}

// clientStream is a replica's gRPC stream with errors that say where.
type clientStream struct {
	s    rpcv1.ReplicationService_StreamClient
	addr string
}

var _ replication.ClientConn = (*clientStream)(nil)

func (c *clientStream) Send(req *meridianv1.StreamRequest) error {
	if err := c.s.Send(req); errors.Is(err, io.EOF) {
		// The stream ended; Recv returns the status that says why.
		return fmt.Errorf("send to replication primary %s: the stream ended (%w)", c.addr, err)
	} else if err != nil {
		return fmt.Errorf("send to replication primary %s: %w", c.addr, err)
	}
	return nil
}

func (c *clientStream) Recv() (*meridianv1.StreamResponse, error) {
	resp, err := c.s.Recv()
	if err != nil {
		return nil, fmt.Errorf("replication stream from %s: %w", c.addr, err)
	}
	return resp, nil
}

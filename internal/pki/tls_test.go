package pki_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meridian-db/meridian/internal/pki"
	rpcv1 "github.com/meridian-db/meridian/proto/meridian/rpc/v1"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// statusServer answers Status as node iad-1 and reports the node each
// caller's verified certificate names.
type statusServer struct {
	rpcv1.UnimplementedReplicationServiceServer
	callers chan string
}

func (s *statusServer) Status(ctx context.Context, _ *meridianv1.StatusRequest) (*meridianv1.StatusResponse, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Internal, "no peer")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return nil, status.Errorf(codes.Unauthenticated, "not TLS: %T", p.AuthInfo)
	}
	node, err := pki.PeerNode(info.State)
	if err != nil {
		return nil, status.Error(codes.PermissionDenied, err.Error())
	}
	select {
	case s.callers <- node:
	case <-ctx.Done(): // a caller the test does not wait for
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	return &meridianv1.StatusResponse{Node: "iad-1", Region: "iad", Role: meridianv1.Role_ROLE_PRIMARY}, nil
}

// handshakeLog records the failed handshakes of a gRPC server, explained
// by pki.HandshakeError, as a daemon logs them.
type handshakeLog struct {
	credentials.TransportCredentials
	errs chan error
}

func (h *handshakeLog) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c, info, err := h.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		select {
		case h.errs <- pki.HandshakeError(err):
		default: // the client retries; the first errors are enough
		}
	}
	return c, info, err
}

type testServer struct {
	addr    string
	callers chan string
	errs    chan error
}

// startServer serves ReplicationService with cfg on a loopback port until
// the test ends.
func startServer(t *testing.T, cfg *tls.Config) *testServer {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{addr: lis.Addr().String(), callers: make(chan string, 1), errs: make(chan error, 16)}
	s := grpc.NewServer(grpc.Creds(&handshakeLog{credentials.NewTLS(cfg), ts.errs}))
	rpcv1.RegisterReplicationServiceServer(s, &statusServer{callers: ts.callers})
	done := make(chan error, 1)
	go func() { done <- s.Serve(lis) }()
	t.Cleanup(func() {
		s.Stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return within 10s of Stop")
		}
	})
	return ts
}

// serverError returns the first failed handshake the server saw.
func (ts *testServer) serverError(t *testing.T) error {
	t.Helper()
	select {
	case err := <-ts.errs:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("the server saw no failed handshake")
		return nil
	}
}

// callStatus calls Status on addr with creds and returns the response and
// the server's TLS state.
func callStatus(t *testing.T, addr string, creds credentials.TransportCredentials) (*meridianv1.StatusResponse, *tls.ConnectionState, error) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var p peer.Peer
	resp, err := rpcv1.NewReplicationServiceClient(conn).Status(ctx, &meridianv1.StatusRequest{}, grpc.Peer(&p))
	if err != nil {
		return nil, nil, err
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		t.Fatalf("got auth info %T, want TLS", p.AuthInfo)
	}
	return resp, &info.State, nil
}

// assertRefused checks that err is a gRPC Unavailable error containing
// every string of want.
func assertRefused(t *testing.T, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Fatal("got a response, want the connection refused")
	}
	if got := status.Code(err); got != codes.Unavailable {
		t.Fatalf("got code %v (%v), want %v", got, err, codes.Unavailable)
	}
	assertContains(t, err, want...)
}

// assertRefusedByServer checks that err is a gRPC Unavailable error from a
// server that refused the client's certificate. In TLS 1.3 the client's
// handshake is over before the server checks the client's certificate, so
// the client sees the server's alert, or, if its first write meets the
// closed connection first, only a broken connection: the reason is what
// the server logs.
func assertRefusedByServer(t *testing.T, err error, alert string) {
	t.Helper()
	assertRefused(t, err)
	for _, s := range []string{alert, "broken pipe", "connection reset by peer"} {
		if strings.Contains(err.Error(), s) {
			return
		}
	}
	t.Fatalf("got %q, want the alert %q or a broken connection", err, alert)
}

func assertContains(t *testing.T, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one containing %q", want)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("got %q, want it to contain %q", err, w)
		}
	}
}

// cluster is a CA with certificates for iad-1 (the server) and fra-1, plus
// a second CA, "Other CA", of another cluster.
type cluster struct {
	caFile, otherCAFile string
	iad, fra            pki.Issued
	otherDir            string
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	caDir, otherDir := mustInitCA(t, "Cluster CA"), mustInitCA(t, "Other CA")
	return &cluster{
		caFile:      filepath.Join(caDir, pki.CACertFile),
		otherCAFile: filepath.Join(otherDir, pki.CACertFile),
		iad:         mustIssue(t, caDir, "iad-1", pki.IssueOptions{}),
		fra:         mustIssue(t, caDir, "fra-1", pki.IssueOptions{}),
		otherDir:    otherDir,
	}
}

func (c *cluster) known() []string { return []string{"iad-1", "fra-1"} }

func mustServerConfig(t *testing.T, caFile string, is pki.Issued, known func() []string) *tls.Config {
	t.Helper()
	cfg, err := pki.ServerConfig(caFile, is.CertFile, is.KeyFile, known)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func mustClientCreds(t *testing.T, caFile string, is pki.Issued, serverNode string) credentials.TransportCredentials {
	t.Helper()
	cfg, err := pki.ClientConfig(caFile, is.CertFile, is.KeyFile, serverNode)
	if err != nil {
		t.Fatal(err)
	}
	return credentials.NewTLS(cfg)
}

// rawClientCreds builds a client TLS configuration by hand, as a client
// that does not check its own certificate would.
func rawClientCreds(t *testing.T, caFile string, is pki.Issued, serverNode string, maxVersion uint16) credentials.TransportCredentials {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(is.CertFile, is.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		t.Fatalf("%s: no certificate", caFile)
	}
	return credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: serverNode, MaxVersion: maxVersion})
}

func TestTLS_GRPC(t *testing.T) {
	c := newCluster(t)

	t.Run("OK", func(t *testing.T) {
		ts := startServer(t, mustServerConfig(t, c.caFile, c.iad, c.known))
		resp, state, err := callStatus(t, ts.addr, mustClientCreds(t, c.caFile, c.fra, "iad-1"))
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetNode() != "iad-1" {
			t.Fatalf("got node %q, want iad-1", resp.GetNode())
		}
		select {
		case got := <-ts.callers:
			if got != "fra-1" {
				t.Fatalf("server saw caller %q, want fra-1", got)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the server's Status handler reported no caller in 10s")
		}
		if node, err := pki.PeerNode(*state); err != nil || node != "iad-1" {
			t.Fatalf("client's PeerNode: got %q, %v, want iad-1", node, err)
		}
		if state.Version != tls.VersionTLS13 {
			t.Fatalf("got TLS version %x, want TLS 1.3", state.Version)
		}
	})

	t.Run("ErrClientFromOtherCA", func(t *testing.T) {
		// The client trusts both CAs, as during a CA rotation, but the
		// server trusts only its own.
		both := filepath.Join(t.TempDir(), "both.pem")
		if err := os.WriteFile(both, append(mustRead(t, c.caFile), mustRead(t, c.otherCAFile)...), 0o644); err != nil {
			t.Fatal(err)
		}
		stranger := mustIssue(t, c.otherDir, "fra-1", pki.IssueOptions{})
		ts := startServer(t, mustServerConfig(t, c.caFile, c.iad, c.known))
		_, _, err := callStatus(t, ts.addr, mustClientCreds(t, both, stranger, "iad-1"))
		assertRefusedByServer(t, err, "remote error: tls: unknown certificate authority")
		assertContains(t, ts.serverError(t), `peer certificate of node "fra-1" is signed by "Other CA", not by a CA this node trusts`)
	})

	t.Run("ErrServerFromOtherCA", func(t *testing.T) {
		stranger := mustIssue(t, c.otherDir, "iad-1", pki.IssueOptions{})
		ts := startServer(t, mustServerConfig(t, c.otherCAFile, stranger, c.known))
		_, _, err := callStatus(t, ts.addr, mustClientCreds(t, c.caFile, c.fra, "iad-1"))
		assertRefused(t, err, "tls: failed to verify certificate: x509: certificate signed by unknown authority")
	})

	t.Run("ErrUnknownClientNode", func(t *testing.T) {
		ts := startServer(t, mustServerConfig(t, c.caFile, c.iad, c.known))
		zzz := mustIssue(t, filepath.Dir(c.caFile), "zzz-9", pki.IssueOptions{})
		_, _, err := callStatus(t, ts.addr, mustClientCreds(t, c.caFile, zzz, "iad-1"))
		assertRefusedByServer(t, err, "remote error: tls: bad certificate")
		serr := ts.serverError(t)
		var nerr *pki.NodeError
		if !errors.As(serr, &nerr) || nerr.Node != "zzz-9" {
			t.Fatalf("got %v, want a *pki.NodeError for zzz-9", serr)
		}
		assertContains(t, serr, `client certificate names node "zzz-9", which is not a known node (known: fra-1, iad-1)`)
	})

	t.Run("ErrWrongServerNode", func(t *testing.T) {
		fra2 := mustIssue(t, filepath.Dir(c.caFile), "fra-2", pki.IssueOptions{})
		ts := startServer(t, mustServerConfig(t, c.caFile, fra2, c.known))
		_, _, err := callStatus(t, ts.addr, mustClientCreds(t, c.caFile, c.fra, "iad-1"))
		assertRefused(t, err, "x509: certificate is valid for fra-2, not iad-1")
	})

	t.Run("ErrExpiredClient", func(t *testing.T) {
		expired := mustIssue(t, filepath.Dir(c.caFile), "fra-1", pki.IssueOptions{
			NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)})
		// ClientConfig refuses to load it.
		_, err := pki.ClientConfig(c.caFile, expired.CertFile, expired.KeyFile, "iad-1")
		var ferr *pki.FileError
		if !errors.As(err, &ferr) || ferr.Role != pki.RoleCert || ferr.Path != expired.CertFile {
			t.Fatalf("got %v, want a *FileError for %s", err, expired.CertFile)
		}
		assertContains(t, err, `certificate of "fra-1" expired at `, "issue a new one with `regiond ca issue -node fra-1 -f`")

		// A client that sends it anyway is refused by the server.
		ts := startServer(t, mustServerConfig(t, c.caFile, c.iad, c.known))
		_, _, err = callStatus(t, ts.addr, rawClientCreds(t, c.caFile, expired, "iad-1", 0))
		assertRefusedByServer(t, err, "remote error: tls: expired certificate")
		assertContains(t, ts.serverError(t), `peer certificate of node "fra-1" expired at `, "`regiond ca issue -node fra-1 -f`", "certificate has expired")
	})

	t.Run("ErrNotYetValidClient", func(t *testing.T) {
		early := mustIssue(t, filepath.Dir(c.caFile), "fra-1", pki.IssueOptions{
			NotBefore: time.Now().Add(time.Hour), NotAfter: time.Now().Add(48 * time.Hour)})
		ts := startServer(t, mustServerConfig(t, c.caFile, c.iad, c.known))
		_, _, err := callStatus(t, ts.addr, rawClientCreds(t, c.caFile, early, "iad-1", 0))
		assertRefusedByServer(t, err, "remote error: tls: expired certificate")
		assertContains(t, ts.serverError(t), `peer certificate of node "fra-1" is not valid until `, "check the clocks")
	})

	t.Run("ErrPlaintextClient", func(t *testing.T) {
		ts := startServer(t, mustServerConfig(t, c.caFile, c.iad, c.known))
		_, _, err := callStatus(t, ts.addr, insecure.NewCredentials())
		assertRefused(t, err)
		assertContains(t, ts.serverError(t), "the peer does not speak TLS", "first record does not look like a TLS handshake")
	})

	t.Run("ErrTLS12Client", func(t *testing.T) {
		ts := startServer(t, mustServerConfig(t, c.caFile, c.iad, c.known))
		_, _, err := callStatus(t, ts.addr, rawClientCreds(t, c.caFile, c.fra, "iad-1", tls.VersionTLS12))
		assertRefused(t, err, "protocol version not supported")
	})

	t.Run("KnownIsAskedEachTime", func(t *testing.T) {
		var known atomic.Pointer[[]string]
		known.Store(&[]string{"iad-1"})
		ts := startServer(t, mustServerConfig(t, c.caFile, c.iad, func() []string { return *known.Load() }))
		_, _, err := callStatus(t, ts.addr, mustClientCreds(t, c.caFile, c.fra, "iad-1"))
		assertRefusedByServer(t, err, "bad certificate")
		assertContains(t, ts.serverError(t), `"fra-1", which is not a known node (known: iad-1)`)
		known.Store(&[]string{"iad-1", "fra-1"})
		if _, _, err := callStatus(t, ts.addr, mustClientCreds(t, c.caFile, c.fra, "iad-1")); err != nil {
			t.Fatalf("after fra-1 joined: %v", err)
		}
	})
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestServerConfig(t *testing.T) {
	c := newCluster(t)
	cfg := mustServerConfig(t, c.caFile, c.iad, c.known)
	if cfg.MinVersion != tls.VersionTLS13 || cfg.ClientAuth != tls.RequireAndVerifyClientCert || cfg.ClientCAs == nil || len(cfg.Certificates) != 1 {
		t.Fatalf("got MinVersion %x, ClientAuth %v, ClientCAs %v, %d certificates; want TLS 1.3, verified client certificates, one certificate",
			cfg.MinVersion, cfg.ClientAuth, cfg.ClientCAs, len(cfg.Certificates))
	}
	if _, err := pki.ServerConfig(c.caFile, c.iad.CertFile, c.iad.KeyFile, nil); err == nil {
		t.Fatal("got no error for a nil known")
	}
}

func TestClientConfig(t *testing.T) {
	c := newCluster(t)
	cfg, err := pki.ClientConfig(c.caFile, c.fra.CertFile, c.fra.KeyFile, "iad-1")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MinVersion != tls.VersionTLS13 || cfg.ServerName != "iad-1" || cfg.RootCAs == nil || cfg.InsecureSkipVerify {
		t.Fatalf("got MinVersion %x, ServerName %q, RootCAs %v, InsecureSkipVerify %v; want TLS 1.3, iad-1, the CA, false",
			cfg.MinVersion, cfg.ServerName, cfg.RootCAs, cfg.InsecureSkipVerify)
	}
	// The certificate is sent even to a server that lists only other CAs.
	cert, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{AcceptableCAs: [][]byte{[]byte("other")}})
	if err != nil || cert.Leaf == nil || !cert.Leaf.Equal(c.fra.Certificate) {
		t.Fatalf("got %v, %v, want the certificate of fra-1", cert, err)
	}
	if _, err := pki.ClientConfig(c.caFile, c.fra.CertFile, c.fra.KeyFile, "IAD"); err == nil || !strings.Contains(err.Error(), `server node "IAD" is not a valid node name`) {
		t.Fatalf("got %v, want an invalid server node error", err)
	}
}

// TestLoad_Errors checks that every problem with the files names the file,
// says what is wrong and what to do, for both ServerConfig and
// ClientConfig.
func TestLoad_Errors(t *testing.T) {
	c := newCluster(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.pem")
	loose := mustIssue(t, filepath.Dir(c.caFile), "fra-1", pki.IssueOptions{})
	if err := os.Chmod(loose.KeyFile, 0o640); err != nil {
		t.Fatal(err)
	}
	stranger := mustIssue(t, c.otherDir, "fra-1", pki.IssueOptions{})
	expired := mustIssue(t, filepath.Dir(c.caFile), "fra-1", pki.IssueOptions{
		NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
	early := mustIssue(t, filepath.Dir(c.caFile), "fra-1", pki.IssueOptions{
		NotBefore: time.Now().Add(time.Hour), NotAfter: time.Now().Add(48 * time.Hour)})
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tt := range []struct {
		name          string
		ca, cert, key string
		role          pki.FileRole
		path          string
		want          []string
		notExist      bool
	}{
		{"MissingCA", missing, c.fra.CertFile, c.fra.KeyFile, pki.RoleCA, missing,
			[]string{"CA certificate " + missing + ": file does not exist; copy the cluster's ca.pem, made by `regiond ca init`, to this path"}, true},
		{"MissingCert", c.caFile, missing, c.fra.KeyFile, pki.RoleCert, missing,
			[]string{"certificate " + missing + ": file does not exist; issue one with `regiond ca issue -node NAME`"}, true},
		{"MissingKey", c.caFile, c.fra.CertFile, missing, pki.RoleKey, missing,
			[]string{"private key " + missing + ": file does not exist; issue one with"}, true},
		{"CANotPEM", notPEM, c.fra.CertFile, c.fra.KeyFile, pki.RoleCA, notPEM, []string{"holds no PEM certificate"}, false},
		{"CAIsNodeCert", c.iad.CertFile, c.fra.CertFile, c.fra.KeyFile, pki.RoleCA, c.iad.CertFile,
			[]string{`"iad-1" is not a CA certificate`}, false},
		{"KeyNotPEM", c.caFile, c.fra.CertFile, notPEM, pki.RoleKey, notPEM, []string{"holds no PEM private key"}, false},
		{"KeyReadableByGroup", c.caFile, loose.CertFile, loose.KeyFile, pki.RoleKey, loose.KeyFile,
			[]string{"mode 0640 gives users other than its owner access to the private key; run chmod 600 " + loose.KeyFile}, false},
		{"KeyOfOtherCert", c.caFile, c.fra.CertFile, c.iad.KeyFile, pki.RoleKey, c.iad.KeyFile,
			[]string{"not the key of " + c.fra.CertFile}, false},
		{"CertFromOtherCA", c.caFile, stranger.CertFile, stranger.KeyFile, pki.RoleCert, stranger.CertFile,
			[]string{`certificate of "fra-1" does not verify against the CA`, "issue it from the CA in " + c.caFile}, false},
		{"CertExpired", c.caFile, expired.CertFile, expired.KeyFile, pki.RoleCert, expired.CertFile,
			[]string{`certificate of "fra-1" expired at`, "`regiond ca issue -node fra-1 -f`"}, false},
		{"CertNotYetValid", c.caFile, early.CertFile, early.KeyFile, pki.RoleCert, early.CertFile,
			[]string{`certificate of "fra-1" is not valid until`, "check this machine's clock"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, serr := pki.ServerConfig(tt.ca, tt.cert, tt.key, c.known)
			_, cerr := pki.ClientConfig(tt.ca, tt.cert, tt.key, "iad-1")
			for _, err := range []error{serr, cerr} {
				var ferr *pki.FileError
				if !errors.As(err, &ferr) {
					t.Fatalf("got %v, want a *pki.FileError", err)
				}
				if ferr.Role != tt.role || ferr.Path != tt.path {
					t.Fatalf("got role %s, path %s, want %s, %s", ferr.Role, ferr.Path, tt.role, tt.path)
				}
				if got := errors.Is(err, fs.ErrNotExist); got != tt.notExist {
					t.Fatalf("errors.Is(%v, fs.ErrNotExist): got %v, want %v", err, got, tt.notExist)
				}
				assertContains(t, err, tt.want...)
			}
		})
	}
}

func TestCertNode(t *testing.T) {
	for _, tt := range []struct {
		name     string
		cn       string
		dnsNames []string
		want     string // "" for an error
		err      string
	}{
		{"OK", "iad-1", []string{"iad-1"}, "iad-1", ""},
		{"NoDNSName", "iad-1", nil, "", `certificate "iad-1" has 0 DNS names (), want exactly one`},
		{"TwoDNSNames", "iad-1", []string{"iad-1", "fra-1"}, "", `has 2 DNS names (iad-1, fra-1)`},
		{"CommonNameDiffers", "iad-1", []string{"fra-1"}, "", `CommonName "iad-1" differs from its DNS name "fra-1"`},
		{"NotANodeName", "iad.example.com", []string{"iad.example.com"}, "", `"iad.example.com", which is not a valid node name`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cert := &x509.Certificate{DNSNames: tt.dnsNames}
			cert.Subject.CommonName = tt.cn
			got, err := pki.CertNode(cert)
			if tt.err == "" {
				if err != nil || got != tt.want {
					t.Fatalf("got %q, %v, want %q", got, err, tt.want)
				}
				return
			}
			assertContains(t, err, tt.err)
		})
	}
}

func TestPeerNode_NotVerified(t *testing.T) {
	// A connection state with the peer's certificate but no verified chain,
	// as with InsecureSkipVerify, names no node.
	c := newCluster(t)
	state := tls.ConnectionState{PeerCertificates: []*x509.Certificate{c.iad.Certificate}}
	if node, err := pki.PeerNode(state); err == nil || node != "" || !strings.Contains(err.Error(), "not verified") {
		t.Fatalf("got %q, %v, want a not-verified error", node, err)
	}
}

func TestHandshakeError_Other(t *testing.T) {
	err := errors.New("connection reset")
	if got := pki.HandshakeError(err); got != err {
		t.Fatalf("got %v, want the error unchanged", got)
	}
}

package regiond_test

import (
	"crypto/tls"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/pki"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/regiond"
)

// tlsCluster writes a CA and the certificates of iad-1 and fra-1 to a new
// directory and returns it.
func tlsCluster(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if _, err := pki.InitCA(dir, "Test CA", 0); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"iad-1", "fra-1"} {
		if _, err := pki.Issue(dir, dir, n, pki.IssueOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// tlsNode loads the config of node, written in dir with the tls keys left
// out.
func tlsNode(t *testing.T, dir, node, region string) regiond.Config {
	t.Helper()
	c, err := regiond.LoadConfig(writeFile(t, dir, node+".yml", "node: "+node+"\nregion: "+region+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestConfig_ServerTLS(t *testing.T) {
	t.Run("Handshake", func(t *testing.T) {
		dir := tlsCluster(t)
		iad, fra := tlsNode(t, dir, "iad-1", "iad"), tlsNode(t, dir, "fra-1", "fra")

		scfg, err := iad.ServerTLS(func() []string { return []string{"fra-1"} })
		if err != nil {
			t.Fatal(err)
		}
		ccfg, err := fra.ClientTLS("iad-1")
		if err != nil {
			t.Fatal(err)
		}
		if scfg.MinVersion != tls.VersionTLS13 || ccfg.MinVersion != tls.VersionTLS13 || scfg.ClientAuth != tls.RequireAndVerifyClientCert {
			t.Fatalf("got MinVersion %x and %x, ClientAuth %v; want TLS 1.3 and verified client certificates", scfg.MinVersion, ccfg.MinVersion, scfg.ClientAuth)
		}
		a, b := net.Pipe()
		// A handshake that stalls fails the test instead of hanging it.
		for _, c := range []net.Conn{a, b} {
			if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
				t.Fatal(err)
			}
		}
		server, client := tls.Server(a, scfg), tls.Client(b, ccfg)
		defer server.Close()
		defer client.Close()
		errc := make(chan error, 1)
		go func() { errc <- server.Handshake() }()
		if err := client.Handshake(); err != nil {
			t.Fatal(err)
		}
		if err := testingutil.Recv(t, errc, 10*time.Second, "the server's handshake"); err != nil {
			t.Fatal(err)
		}
		if got, err := pki.PeerNode(server.ConnectionState()); err != nil || got != "fra-1" {
			t.Fatalf("server's peer: got %q, %v, want fra-1", got, err)
		}
		if got, err := pki.PeerNode(client.ConnectionState()); err != nil || got != "iad-1" {
			t.Fatalf("client's peer: got %q, %v, want iad-1", got, err)
		}
	})

	t.Run("ErrMissingCert", func(t *testing.T) {
		c := tlsNode(t, tlsCluster(t), "ord-1", "ord")
		_, serr := c.ServerTLS(func() []string { return nil })
		_, cerr := c.ClientTLS("iad-1")
		want := "tls.cert " + c.TLS.Cert + ": file does not exist; create it with `regiond ca issue -node ord-1`"
		for _, err := range []error{serr, cerr} {
			if err == nil || err.Error() != want || !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("got %v, want %q wrapping fs.ErrNotExist", err, want)
			}
		}
	})

	t.Run("ErrMissingCA", func(t *testing.T) {
		c := tlsNode(t, tlsCluster(t), "iad-1", "iad")
		c.TLS.CA = filepath.Join(t.TempDir(), "ca.pem")
		_, err := c.ServerTLS(func() []string { return nil })
		if want := "tls.ca " + c.TLS.CA + ": file does not exist; copy the cluster's ca.pem, made by `regiond ca init`, to this path"; err == nil || err.Error() != want {
			t.Fatalf("got %v, want %q", err, want)
		}
	})

	t.Run("ErrKeyReadable", func(t *testing.T) {
		c := tlsNode(t, tlsCluster(t), "iad-1", "iad")
		if err := os.Chmod(c.TLS.Key, 0o604); err != nil {
			t.Fatal(err)
		}
		_, err := c.ClientTLS("fra-1")
		want := "tls.key " + c.TLS.Key + ": mode 0604 gives users other than its owner access to the private key; run chmod 600 " + c.TLS.Key
		if err == nil || err.Error() != want {
			t.Fatalf("got %v, want %q", err, want)
		}
	})

	t.Run("ErrCertOfOtherNode", func(t *testing.T) {
		c := tlsNode(t, tlsCluster(t), "iad-1", "iad")
		c.TLS.Cert, c.TLS.Key = filepath.Join(filepath.Dir(c.TLS.Cert), "fra-1.pem"), filepath.Join(filepath.Dir(c.TLS.Cert), "fra-1-key.pem")
		_, serr := c.ServerTLS(func() []string { return nil })
		_, cerr := c.ClientTLS("fra-1")
		want := "tls.cert " + c.TLS.Cert + `: the certificate is for node "fra-1", but this node is "iad-1"; issue its own with ` + "`regiond ca issue -node iad-1`, or fix tls.cert"
		for _, err := range []error{serr, cerr} {
			if err == nil || err.Error() != want {
				t.Fatalf("got %v, want %q", err, want)
			}
		}
	})

	t.Run("ErrInsecure", func(t *testing.T) {
		c := tlsNode(t, tlsCluster(t), "iad-1", "iad")
		c.TLS.Insecure = true
		if cfg, err := c.ServerTLS(func() []string { return nil }); cfg != nil || err == nil || !strings.Contains(err.Error(), "log TLSWarning") {
			t.Fatalf("got %v, %v, want no config and an error", cfg, err)
		}
		if cfg, err := c.ClientTLS("fra-1"); cfg != nil || err == nil {
			t.Fatalf("got %v, %v, want no config and an error", cfg, err)
		}
	})
}

func TestConfig_TLSWarning(t *testing.T) {
	secure, err := parse(t, "node: iad-1\nregion: iad\n")
	if err != nil {
		t.Fatal(err)
	}
	if got := secure.TLSWarning(); got != "" {
		t.Fatalf("got %q, want no warning with TLS on", got)
	}
	c, err := parse(t, "node: iad-1\nregion: iad\ntls:\n  insecure: true\n")
	if err != nil {
		t.Fatal(err)
	}
	got := c.TLSWarning()
	for _, want := range []string{"tls.insecure is true", "plaintext and unauthenticated", "tests and demos only"} {
		if !strings.Contains(got, want) {
			t.Fatalf("got %q, want it to contain %q", got, want)
		}
	}
}

package regiond

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/meridian-db/meridian"
	"github.com/meridian-db/meridian/internal/pki"
)

// errInsecure is returned by ServerTLS and ClientTLS when tls.insecure is
// set: there is nothing to load.
var errInsecure = errors.New("tls.insecure is true: no TLS configuration to load; connect without TLS and log TLSWarning")

// defaults fills in the files a configuration file leaves out: ca.pem, and
// for a named node <node>.pem and <node>-key.pem, still relative.
func (t *TLSConfig) defaults(node string) {
	if t.CA == "" {
		t.CA = pki.CACertFile
	}
	if node == "" {
		return
	}
	if t.Cert == "" {
		t.Cert = pki.CertFile(node)
	}
	if t.Key == "" {
		t.Key = pki.KeyFile(node)
	}
}

// validateTLS checks that the TLS files are set and absolute, unless
// tls.insecure is true. Whether they exist and hold what they should is
// checked when they are loaded, by ServerTLS and ClientTLS.
func (c *Config) validateTLS(p *problems) {
	if c.TLS.Insecure {
		return
	}
	p.file("tls.ca", c.TLS.CA, "the cluster's CA certificate, made by `regiond ca init`; in a config file it defaults to ca.pem beside the file")
	if c.TLS.Cert == "" && c.TLS.Key == "" && !meridian.ValidName(c.Node) {
		return // their defaults come from node, whose problem says what to do
	}
	p.file("tls.cert", c.TLS.Cert, "this node's certificate, made by `regiond ca issue`; in a config file it defaults to <node>.pem beside the file")
	p.file("tls.key", c.TLS.Key, "this node's private key, made by `regiond ca issue`; in a config file it defaults to <node>-key.pem beside the file")
}

// file reports an empty or relative file path.
func (p *problems) file(key, path, what string) {
	switch {
	case path == "":
		p.add("%s: required unless tls.insecure is true (%s)", key, what)
	case !filepath.IsAbs(path):
		p.add("%s: %q must be an absolute path", key, path)
	}
}

// TLSWarning returns the warning the daemon must log at WARN level, before
// it listens for or dials any peer, when tls.insecure is true; "" when TLS
// is on.
func (c Config) TLSWarning() string {
	if !c.TLS.Insecure {
		return ""
	}
	return "tls.insecure is true: replication between nodes is plaintext and unauthenticated; " +
		"anyone who can reach this node can read every transaction and pose as any node. " +
		"Use it for tests and demos only; set up certificates with `regiond ca init` and `regiond ca issue`"
}

// ServerTLS loads the TLS configuration of this node's replication server
// from tls.ca, tls.cert and tls.key (see pki.ServerConfig): TLS 1.3, client
// certificates required, verified against the CA and naming a node in the
// list known returns at each handshake. It also checks that tls.cert names
// this node. Errors name the config key and the file and say what to do.
// With tls.insecure it returns an error: the caller serves without TLS and
// logs TLSWarning.
func (c Config) ServerTLS(known func() []string) (*tls.Config, error) {
	if c.TLS.Insecure {
		return nil, errInsecure
	}
	cfg, err := pki.ServerConfig(c.TLS.CA, c.TLS.Cert, c.TLS.Key, known)
	if err != nil {
		return nil, c.tlsError(err)
	}
	if err := c.checkOwnCert(&cfg.Certificates[0]); err != nil {
		return nil, err
	}
	return cfg, nil
}

// ClientTLS loads the TLS configuration of this node's connections to the
// node serverNode (see pki.ClientConfig): TLS 1.3, this node's certificate
// as client certificate, and the server's verified against the CA and
// required to name serverNode. Errors are as for ServerTLS.
func (c Config) ClientTLS(serverNode string) (*tls.Config, error) {
	if c.TLS.Insecure {
		return nil, errInsecure
	}
	cfg, err := pki.ClientConfig(c.TLS.CA, c.TLS.Cert, c.TLS.Key, serverNode)
	if err != nil {
		return nil, c.tlsError(err)
	}
	cert, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
	if err != nil {
		return nil, err
	}
	if err := c.checkOwnCert(cert); err != nil {
		return nil, err
	}
	return cfg, nil
}

// checkOwnCert checks that cert, loaded from tls.cert, names this node.
func (c Config) checkOwnCert(cert *tls.Certificate) error {
	node, err := pki.CertNode(cert.Leaf)
	if err != nil {
		return fmt.Errorf("tls.cert %s: %w", c.TLS.Cert, err)
	}
	if node != c.Node {
		return fmt.Errorf("tls.cert %s: the certificate is for node %q, but this node is %q; issue its own with `regiond ca issue -node %s`, or fix tls.cert",
			c.TLS.Cert, node, c.Node, c.Node)
	}
	return nil
}

// tlsError names the config key of a file pki could not load, and says how
// to make this node's certificate and key when they are missing. The
// result wraps the file's problem, e.g. fs.ErrNotExist.
func (c Config) tlsError(err error) error {
	var ferr *pki.FileError
	if !errors.As(err, &ferr) {
		return fmt.Errorf("tls: %w", err)
	}
	hint := ferr.Hint
	if errors.Is(ferr.Err, fs.ErrNotExist) && ferr.Role != pki.RoleCA {
		hint = fmt.Sprintf("create it with `regiond ca issue -node %s`", c.Node)
	}
	if hint == "" {
		return fmt.Errorf("tls.%s %s: %w", ferr.Role, ferr.Path, ferr.Err)
	}
	return fmt.Errorf("tls.%s %s: %w; %s", ferr.Role, ferr.Path, ferr.Err, hint)
}

// Package pki makes and loads the cluster's mTLS material: one CA per
// cluster, and per node a certificate and key that the node presents both as
// a server and as a client.
//
// A node's name is its certificate's CommonName and its only DNS name, so a
// peer is identified by the certificate it proves it holds. Keys are ECDSA
// P-256, which every TLS 1.3 stack handles and Go verifies fast. Files are
// PEM: a certificate ("CERTIFICATE") and a PKCS #8 key ("PRIVATE KEY").
//
// A private key file must not be readable or writable by group or others:
// loading one that is fails and says to run chmod 600, as ssh does, since the
// key is the node's identity to the whole cluster.
//
// Connections are TLS 1.3 with mutual authentication: each side verifies the
// other's chain against the CA file, and then checks the node its
// certificate names (ServerConfig, ClientConfig). A failed handshake on a
// server is seen only by whoever called Handshake (a gRPC server reports it
// only through grpclog); log it with HandshakeError, which names the node of
// a refused certificate and says what to do.
package pki

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"
)

// File names in a CA directory, and defaults.
const (
	CACertFile = "ca.pem"     // the CA certificate, given to every node
	CAKeyFile  = "ca-key.pem" // the CA key, kept off the nodes

	DefaultCAName       = "Meridian cluster CA"
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultNodeValidity = 365 * 24 * time.Hour
)

// backdate is how far before now a certificate's validity starts, so that a
// peer whose clock is a little behind accepts a certificate issued just now.
const backdate = 5 * time.Minute

// Modes of the files written.
const (
	certMode os.FileMode = 0o644
	keyMode  os.FileMode = 0o600
)

// CertFile returns the name of node's certificate file: "<node>.pem".
func CertFile(node string) string { return node + ".pem" }

// KeyFile returns the name of node's key file: "<node>-key.pem".
func KeyFile(node string) string { return node + "-key.pem" }

// Issued is a certificate written with its key.
type Issued struct {
	CertFile    string            // path of the certificate file
	KeyFile     string            // path of the key file, mode 0600
	Certificate *x509.Certificate // the certificate written
}

// FileRole says what a file given to ServerConfig or ClientConfig holds.
type FileRole string

// The files a TLS configuration is loaded from.
const (
	RoleCA   FileRole = "ca"   // the cluster's CA certificate(s)
	RoleCert FileRole = "cert" // this node's certificate
	RoleKey  FileRole = "key"  // this node's private key
)

// FileError is a problem with one of the files a TLS configuration or a CA
// is loaded from: missing, unreadable, not what it should hold, a key that
// others can read, an expired certificate.
type FileError struct {
	Role FileRole
	Path string
	Err  error  // what is wrong; fs.ErrNotExist for a missing file
	Hint string // what to do, e.g. "create it with `regiond ca init`"
}

// Error returns "<what the file holds> <path>: <what is wrong>; <what to
// do>".
func (e *FileError) Error() string {
	label := map[FileRole]string{RoleCA: "CA certificate", RoleCert: "certificate", RoleKey: "private key"}[e.Role]
	s := fmt.Sprintf("%s %s: %v", label, e.Path, e.Err)
	if e.Hint != "" {
		s += "; " + e.Hint
	}
	return s
}

// Unwrap returns Err.
func (e *FileError) Unwrap() error { return e.Err }

// NodeError refuses a peer whose verified certificate names a node the
// connection does not accept.
type NodeError struct {
	Peer string   // "client" or "server": the side that presented the certificate
	Node string   // the node its certificate names
	Want []string // the nodes accepted: the known nodes, or the node dialed
}

// Error names the presented node and the accepted ones.
func (e *NodeError) Error() string {
	if e.Peer == "server" && len(e.Want) == 1 {
		return fmt.Sprintf("server certificate names node %q, not %q, the node dialed; check the address given for %s",
			e.Node, e.Want[0], e.Want[0])
	}
	known := "none"
	if len(e.Want) > 0 {
		known = strings.Join(e.Want, ", ")
	}
	return fmt.Sprintf("%s certificate names node %q, which is not a known node (known: %s); add %s to the cluster, or give the %s a certificate issued for its own node name",
		e.Peer, e.Node, known, e.Node, e.Peer)
}

// errNotVerified is returned by PeerNode for a connection whose peer
// certificate was not verified.
var errNotVerified = errors.New("peer certificate not verified")

// existsError is the refusal to replace a file.
func existsError(path, hint string) error {
	return fmt.Errorf("%s: %w; %s", path, fs.ErrExist, hint)
}

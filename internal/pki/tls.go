package pki

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/meridian-db/meridian"
)

// ServerConfig returns the TLS configuration of a node's server: TLS 1.3
// only, the node's certificate from certFile and keyFile, and client
// certificates required and verified against the CA certificates in caFile.
// A verified client is then accepted only if its certificate names a node
// in the list known returns at that moment; otherwise the handshake fails
// with a *NodeError naming the presented node and the known ones. known is
// called on the goroutine of each handshake, so concurrently, and must not
// block.
//
// Problems with the files are *FileError: a missing or unreadable file, a
// key that others can read or that does not match the certificate, a
// certificate that is expired, not yet valid, not signed by a CA in caFile
// or not issued for a node.
func ServerConfig(caFile, certFile, keyFile string, known func() []string) (*tls.Config, error) {
	if known == nil {
		return nil, errors.New("server TLS config: known is nil")
	}
	pool, err := loadCAPool(caFile)
	if err != nil {
		return nil, err
	}
	cert, err := loadKeyPair(pool, caFile, certFile, keyFile, x509.ExtKeyUsageServerAuth)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error {
			node, err := PeerNode(cs)
			if err != nil {
				return fmt.Errorf("client certificate: %w", err)
			}
			names := known()
			if !slices.Contains(names, node) {
				names = slices.Clone(names)
				slices.Sort(names)
				return &NodeError{Peer: "client", Node: node, Want: names}
			}
			return nil
		},
	}, nil
}

// ClientConfig returns the TLS configuration of a node's connections to the
// node serverNode: TLS 1.3 only, the node's certificate from certFile and
// keyFile as client certificate, sent whatever CAs the server asks for, and the server's certificate verified
// against the CA certificates in caFile and required to name serverNode
// (whatever address is dialed). A server certificate for another node
// fails the handshake with an error naming both.
//
// Problems with the files are *FileError, as for ServerConfig.
func ClientConfig(caFile, certFile, keyFile, serverNode string) (*tls.Config, error) {
	if !meridian.ValidName(serverNode) {
		return nil, fmt.Errorf("client TLS config: server node %q is not a valid node name (use %s)", serverNode, meridian.NameRule)
	}
	pool, err := loadCAPool(caFile)
	if err != nil {
		return nil, err
	}
	cert, err := loadKeyPair(pool, caFile, certFile, keyFile, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Always sent, even to a server that lists other CAs as acceptable
		// (where Go's default would send none), so that the server can log
		// which node it refused and why.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
		RootCAs:              pool,
		ServerName:           serverNode, // verified against the certificate's DNS name
		VerifyConnection: func(cs tls.ConnectionState) error {
			node, err := PeerNode(cs)
			if err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			if node != serverNode {
				return &NodeError{Peer: "server", Node: node, Want: []string{serverNode}}
			}
			return nil
		},
	}, nil
}

// PeerNode returns the node named by the peer's verified certificate on a
// connection made with ServerConfig or ClientConfig. It fails if the peer's
// certificate was not verified or does not name a node as Issue does.
func PeerNode(state tls.ConnectionState) (string, error) {
	if len(state.VerifiedChains) == 0 || len(state.VerifiedChains[0]) == 0 {
		return "", errNotVerified
	}
	return CertNode(state.VerifiedChains[0][0])
}

// CertNode returns the node cert names: its CommonName, which must also be
// its only DNS name and a valid node name (meridian.ValidName).
func CertNode(cert *x509.Certificate) (string, error) {
	cn := cert.Subject.CommonName
	switch {
	case len(cert.DNSNames) != 1:
		return "", fmt.Errorf("certificate %q has %d DNS names (%s), want exactly one, the node's name; issue it with `regiond ca issue`",
			cn, len(cert.DNSNames), strings.Join(cert.DNSNames, ", "))
	case cert.DNSNames[0] != cn:
		return "", fmt.Errorf("certificate's CommonName %q differs from its DNS name %q; both must be the node's name; issue it with `regiond ca issue`",
			cn, cert.DNSNames[0])
	case !meridian.ValidName(cn):
		return "", fmt.Errorf("certificate names %q, which is not a valid node name (use %s)", cn, meridian.NameRule)
	}
	return cn, nil
}

// HandshakeError returns err, from a failed TLS handshake, with what a
// person needs in a log put first: for a peer certificate that failed
// verification, the node it names and whether it expired, is not valid
// yet, or comes from another CA, and what to do; for a peer that does not
// speak TLS, that. Other errors are returned unchanged. The result wraps
// err.
func HandshakeError(err error) error {
	var rec tls.RecordHeaderError
	if errors.As(err, &rec) {
		return fmt.Errorf("the peer does not speak TLS; is it running with tls.insecure: true? (%w)", err)
	}
	var verr *tls.CertificateVerificationError
	if !errors.As(err, &verr) || len(verr.UnverifiedCertificates) == 0 {
		return err
	}
	cert := verr.UnverifiedCertificates[0]
	who := fmt.Sprintf("%q", cert.Subject.CommonName)
	if _, nerr := CertNode(cert); nerr == nil {
		who = "node " + who
	}
	var invalid x509.CertificateInvalidError
	var unknownCA x509.UnknownAuthorityError
	switch {
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired && time.Now().Before(cert.NotBefore):
		return fmt.Errorf("peer certificate of %s is not valid until %s; check the clocks of both machines (%w)",
			who, cert.NotBefore.UTC().Format(time.RFC3339), err)
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return fmt.Errorf("peer certificate of %s expired at %s; issue a new one for it with `regiond ca issue -node %s -f` (%w)",
			who, cert.NotAfter.UTC().Format(time.RFC3339), cert.Subject.CommonName, err)
	case errors.As(err, &unknownCA):
		return fmt.Errorf("peer certificate of %s is signed by %q, not by a CA this node trusts; issue it from the cluster's CA with `regiond ca issue` (%w)",
			who, cert.Issuer.CommonName, err)
	}
	return fmt.Errorf("peer certificate of %s refused (%w)", who, err)
}

// loadCAPool reads the CA certificates of caFile into a pool.
func loadCAPool(caFile string) (*x509.CertPool, error) {
	hint := fmt.Sprintf("copy the cluster's %s, made by `regiond ca init`, to this path", CACertFile)
	certs, err := readCerts(RoleCA, caFile, hint)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		if !c.IsCA {
			return nil, &FileError{Role: RoleCA, Path: caFile,
				Err: fmt.Errorf("%q is not a CA certificate", c.Subject.CommonName), Hint: hint}
		}
		pool.AddCert(c)
	}
	return pool, nil
}

// loadKeyPair reads a node's certificate and key and checks that they
// belong together, that the certificate is valid now for usage, names a
// node and is signed by a CA in pool, read from caFile.
func loadKeyPair(pool *x509.CertPool, caFile, certFile, keyFile string, usage x509.ExtKeyUsage) (tls.Certificate, error) {
	const issueHint = "issue one with `regiond ca issue -node NAME`"
	certs, err := readCerts(RoleCert, certFile, issueHint)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf := certs[0]
	key, err := readKey(keyFile, issueHint)
	if err != nil {
		return tls.Certificate{}, err
	}
	if !samePublicKey(leaf.PublicKey, key.Public()) {
		return tls.Certificate{}, &FileError{Role: RoleKey, Path: keyFile, Err: fmt.Errorf("not the key of %s", certFile),
			Hint: "give the key file written with the certificate by `regiond ca issue`"}
	}
	if err := checkLeaf(leaf, certs[1:], pool, usage); err != nil {
		hint := fmt.Sprintf("issue a new one with `regiond ca issue -node %s -f`", leaf.Subject.CommonName)
		var unknownCA x509.UnknownAuthorityError
		if errors.As(err, &unknownCA) {
			hint = fmt.Sprintf("issue it from the CA in %s, or give the CA that signed it", caFile)
		}
		return tls.Certificate{}, &FileError{Role: RoleCert, Path: certFile, Err: err, Hint: hint}
	}
	chain := make([][]byte, len(certs))
	for i, c := range certs {
		chain[i] = c.Raw
	}
	return tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, nil
}

// checkLeaf checks that leaf is valid now, names a node and verifies
// against pool for usage.
func checkLeaf(leaf *x509.Certificate, intermediates []*x509.Certificate, pool *x509.CertPool, usage x509.ExtKeyUsage) error {
	now := time.Now()
	switch {
	case now.After(leaf.NotAfter):
		return fmt.Errorf("certificate of %q expired at %s", leaf.Subject.CommonName, leaf.NotAfter.UTC().Format(time.RFC3339))
	case now.Before(leaf.NotBefore):
		return fmt.Errorf("certificate of %q is not valid until %s (check this machine's clock)", leaf.Subject.CommonName, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if _, err := CertNode(leaf); err != nil {
		return err
	}
	inter := x509.NewCertPool()
	for _, c := range intermediates {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return fmt.Errorf("certificate of %q does not verify against the CA: %w", leaf.Subject.CommonName, err)
	}
	return nil
}

// readCerts reads every PEM certificate of path, at least one.
func readCerts(role FileRole, path, hint string) ([]*x509.Certificate, error) {
	b, err := readFile(role, path, hint)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, &FileError{Role: role, Path: path, Err: err, Hint: hint}
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, &FileError{Role: role, Path: path, Err: errors.New("holds no PEM certificate"), Hint: hint}
	}
	return certs, nil
}

// readKey reads the PEM private key of path, refusing a file that group or
// others may read or write.
func readKey(path, hint string) (crypto.Signer, error) {
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return nil, &FileError{Role: RoleKey, Path: path,
			Err:  fmt.Errorf("mode %04o gives users other than its owner access to the private key", fi.Mode().Perm()),
			Hint: "run chmod 600 " + path}
	}
	b, err := readFile(RoleKey, path, hint)
	if err != nil {
		return nil, err
	}
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil, &FileError{Role: RoleKey, Path: path, Err: errors.New("holds no PEM private key"), Hint: hint}
		}
		var key any
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, &FileError{Role: RoleKey, Path: path, Err: err, Hint: hint}
		}
		signer, ok := key.(crypto.Signer)
		if !ok {
			return nil, &FileError{Role: RoleKey, Path: path, Err: fmt.Errorf("unsupported key type %T", key), Hint: hint}
		}
		return signer, nil
	}
}

// readFile reads path; a missing file is a *FileError wrapping
// fs.ErrNotExist.
func readFile(role FileRole, path, hint string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		return b, nil
	}
	var perr *fs.PathError
	switch {
	case errors.Is(err, fs.ErrNotExist):
		err = fs.ErrNotExist
	case errors.As(err, &perr):
		err = perr.Err
		hint = ""
	}
	return nil, &FileError{Role: role, Path: path, Err: err, Hint: hint}
}

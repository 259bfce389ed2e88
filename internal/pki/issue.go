package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"github.com/meridian-db/meridian"
	"github.com/meridian-db/meridian/internal/durable"
)

// InitCA makes a new cluster CA named name (DefaultCAName if empty), valid
// for validity from now (DefaultCAValidity if 0), and writes CACertFile
// (mode 0644) and CAKeyFile (mode 0600) in dir, creating dir (mode 0700) if
// needed. It refuses to replace either file: the error wraps fs.ErrExist.
func InitCA(dir, name string, validity time.Duration) (Issued, error) {
	if name == "" {
		name = DefaultCAName
	}
	if validity == 0 {
		validity = DefaultCAValidity
	} else if validity < 0 {
		return Issued{}, fmt.Errorf("init CA: validity %v must be positive", validity)
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if err := refuseExisting(p, fmt.Sprintf("%s already holds a CA: keep using it, or move %s and %s away to make a new one (every node's certificate must then be issued again)",
			dir, CACertFile, CAKeyFile)); err != nil {
			return Issued{}, fmt.Errorf("init CA: %w", err)
		}
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Issued{}, fmt.Errorf("init CA: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return Issued{}, fmt.Errorf("init CA: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true, // signs node certificates only
	}
	cert, err := sign(tmpl, tmpl, key, key)
	if err != nil {
		return Issued{}, fmt.Errorf("init CA: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Issued{}, fmt.Errorf("init CA: %w", err)
	}
	if err := writeFiles(cert, key, certPath, keyPath, false); err != nil {
		return Issued{}, fmt.Errorf("init CA: %w", err)
	}
	return Issued{CertFile: certPath, KeyFile: keyPath, Certificate: cert}, nil
}

// IssueOptions tunes Issue.
type IssueOptions struct {
	// Validity is how long the certificate is valid from now;
	// DefaultNodeValidity if 0.
	Validity time.Duration
	// NotBefore and NotAfter, when set, replace the validity computed from
	// Validity. Tests use them to make expired and not-yet-valid
	// certificates; a certificate valid beyond the CA is still refused.
	NotBefore, NotAfter time.Time
	// Force replaces existing files of the node, e.g. to renew its
	// certificate. The old certificate stays valid until it expires.
	Force bool
}

// Issue makes a certificate and key for node, signed by the CA in caDir,
// and writes them to outDir as CertFile(node) (mode 0644) and KeyFile(node)
// (mode 0600), creating outDir if needed. The node name is the
// certificate's CommonName and its only DNS name; the certificate serves
// both as a TLS server and as a client. Without opts.Force it refuses to
// replace either file: the error wraps fs.ErrExist.
func Issue(caDir, outDir, node string, opts IssueOptions) (Issued, error) {
	if !meridian.ValidName(node) {
		return Issued{}, fmt.Errorf("issue certificate: %q is not a valid node name (use %s)", node, meridian.NameRule)
	}
	certPath, keyPath := filepath.Join(outDir, CertFile(node)), filepath.Join(outDir, KeyFile(node))
	if !opts.Force {
		for _, p := range []string{certPath, keyPath} {
			if err := refuseExisting(p, fmt.Sprintf("to renew the certificate of %s, pass -f to replace its files", node)); err != nil {
				return Issued{}, fmt.Errorf("issue certificate: %w", err)
			}
		}
	}
	caCert, caKey, err := loadCA(caDir)
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	notBefore, notAfter, err := validity(opts, caCert)
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate for %s: %w", node, err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: node},
		DNSNames:              []string{node},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	cert, err := sign(tmpl, caCert, key, caKey)
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	if err := writeFiles(cert, key, certPath, keyPath, opts.Force); err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	return Issued{CertFile: certPath, KeyFile: keyPath, Certificate: cert}, nil
}

// validity returns the validity period opts asks for, which must end after
// it starts, after now, and no later than the CA's.
func validity(opts IssueOptions, ca *x509.Certificate) (notBefore, notAfter time.Time, err error) {
	now := time.Now()
	if opts.Validity < 0 {
		return notBefore, notAfter, fmt.Errorf("validity %v must be positive", opts.Validity)
	}
	if opts.Validity == 0 {
		opts.Validity = DefaultNodeValidity
	}
	notBefore, notAfter = now.Add(-backdate), now.Add(opts.Validity)
	if !opts.NotBefore.IsZero() {
		notBefore = opts.NotBefore
	}
	if !opts.NotAfter.IsZero() {
		notAfter = opts.NotAfter
	}
	switch {
	case !notAfter.After(notBefore):
		return notBefore, notAfter, fmt.Errorf("validity ends (%s) before it starts (%s)", notAfter.Format(time.RFC3339), notBefore.Format(time.RFC3339))
	case now.After(ca.NotAfter):
		return notBefore, notAfter, fmt.Errorf("the CA %q expired at %s; make a new CA with `regiond ca init` and issue every node's certificate again",
			ca.Subject.CommonName, ca.NotAfter.Format(time.RFC3339))
	case notAfter.After(ca.NotAfter):
		return notBefore, notAfter, fmt.Errorf("the certificate would be valid until %s, after the CA %q expires (%s); ask for fewer days",
			notAfter.Format(time.RFC3339), ca.Subject.CommonName, ca.NotAfter.Format(time.RFC3339))
	}
	return notBefore, notAfter, nil
}

// loadCA reads the CA certificate and key of caDir and checks that they
// belong together.
func loadCA(caDir string) (*x509.Certificate, crypto.Signer, error) {
	hint := fmt.Sprintf("make a CA with `regiond ca init -dir %s`, or pass the directory that holds %s and %s", caDir, CACertFile, CAKeyFile)
	certs, err := readCerts(RoleCA, filepath.Join(caDir, CACertFile), hint)
	if err != nil {
		return nil, nil, err
	}
	ca := certs[0]
	if !ca.IsCA {
		return nil, nil, &FileError{Role: RoleCA, Path: filepath.Join(caDir, CACertFile), Err: errors.New("not a CA certificate"), Hint: hint}
	}
	key, err := readKey(filepath.Join(caDir, CAKeyFile), hint)
	if err != nil {
		return nil, nil, err
	}
	if !samePublicKey(ca.PublicKey, key.Public()) {
		return nil, nil, &FileError{Role: RoleKey, Path: filepath.Join(caDir, CAKeyFile),
			Err: fmt.Errorf("not the key of %s", filepath.Join(caDir, CACertFile)), Hint: "keep the CA's certificate and key together as made by `regiond ca init`"}
	}
	return ca, key, nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// sign makes the certificate tmpl with key, signed by parent's parentKey,
// and parses it back.
func sign(tmpl, parent *x509.Certificate, key *ecdsa.PrivateKey, parentKey crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// newSerial returns a random 128-bit serial number.
func newSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
}

// refuseExisting returns an error wrapping fs.ErrExist if path exists.
func refuseExisting(path, hint string) error {
	if _, err := os.Lstat(path); err == nil {
		return existsError(path, hint)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// writeFiles writes cert to certPath and key to keyPath: each is written
// and fsynced under a temporary name first, then put in place, key first:
// renamed over an existing file with replace, linked otherwise, so that a
// file that appeared meanwhile is not replaced. Without replace, a failure
// leaves neither new file. The directory is fsynced.
func writeFiles(cert *x509.Certificate, key *ecdsa.PrivateKey, certPath, keyPath string, replace bool) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	files := []struct {
		path, tmp string
		data      []byte
		mode      os.FileMode
	}{
		{path: keyPath, data: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), mode: keyMode},
		{path: certPath, data: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), mode: certMode},
	}
	defer func() {
		for _, f := range files {
			if f.tmp != "" {
				_ = os.Remove(f.tmp)
			}
		}
	}()
	for i := range files {
		if files[i].tmp, err = writeTemp(files[i].path, files[i].data, files[i].mode); err != nil {
			return err
		}
	}
	for i, f := range files {
		if replace {
			err = os.Rename(f.tmp, f.path)
		} else {
			err = os.Link(f.tmp, f.path)
		}
		if err != nil {
			if !replace && i > 0 {
				_ = os.Remove(files[0].path)
			}
			if errors.Is(err, fs.ErrExist) {
				return existsError(f.path, "another process wrote it meanwhile")
			}
			return err
		}
	}
	return durable.SyncDir(filepath.Dir(keyPath))
}

// writeTemp writes data to a new temporary file beside path, with mode,
// fsynced, and returns its name.
func writeTemp(path string, data []byte, mode os.FileMode) (string, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return "", err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

package pki_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/pki"
)

// mustInitCA makes a CA named name in a new directory and returns the
// directory.
func mustInitCA(tb testing.TB, name string) string {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "ca")
	if _, err := pki.InitCA(dir, name, 0); err != nil {
		tb.Fatal(err)
	}
	return dir
}

// mustIssue issues a certificate for node from the CA in caDir into a new
// directory.
func mustIssue(tb testing.TB, caDir, node string, opts pki.IssueOptions) pki.Issued {
	tb.Helper()
	is, err := pki.Issue(caDir, tb.TempDir(), node, opts)
	if err != nil {
		tb.Fatal(err)
	}
	return is
}

func mustReadCert(tb testing.TB, path string) *x509.Certificate {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	block, rest := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		tb.Fatalf("%s: want one PEM certificate, got %q", path, b)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

func mustReadKey(tb testing.TB, path string) *ecdsa.PrivateKey {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PRIVATE KEY" {
		tb.Fatalf("%s: want a PEM PKCS #8 key, got %q", path, b)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		tb.Fatal(err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		tb.Fatalf("%s: got %T, want an ECDSA P-256 key", path, k)
	}
	return ek
}

func assertMode(tb testing.TB, path string, want os.FileMode) {
	tb.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		tb.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != want {
		tb.Fatalf("%s: mode %04o, want %04o", path, got, want)
	}
}

func TestInitCA(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "pki", "ca")
		start := time.Now()
		is, err := pki.InitCA(dir, "Test CA", 48*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if is.CertFile != filepath.Join(dir, "ca.pem") || is.KeyFile != filepath.Join(dir, "ca-key.pem") {
			t.Fatalf("got files %s, %s, want ca.pem and ca-key.pem in %s", is.CertFile, is.KeyFile, dir)
		}
		assertMode(t, is.CertFile, 0o644)
		assertMode(t, is.KeyFile, 0o600)
		assertMode(t, dir, 0o700)
		ca := mustReadCert(t, is.CertFile)
		if !ca.Equal(is.Certificate) {
			t.Fatal("returned certificate differs from the file's")
		}
		if !ca.IsCA || !ca.BasicConstraintsValid || ca.MaxPathLen != 0 || !ca.MaxPathLenZero || ca.KeyUsage&x509.KeyUsageCertSign == 0 {
			t.Fatalf("got IsCA %v, MaxPathLen %d (zero %v), key usage %b; want a CA that signs leaf certificates only",
				ca.IsCA, ca.MaxPathLen, ca.MaxPathLenZero, ca.KeyUsage)
		}
		if ca.Subject.CommonName != "Test CA" || ca.Issuer.CommonName != "Test CA" {
			t.Fatalf("got subject %q, issuer %q, want Test CA for both", ca.Subject.CommonName, ca.Issuer.CommonName)
		}
		if got, want := ca.NotAfter.Sub(start).Round(time.Hour), 48*time.Hour; got != want {
			t.Fatalf("got validity %v from now, want %v", got, want)
		}
		if !mustReadKey(t, is.KeyFile).PublicKey.Equal(ca.PublicKey) {
			t.Fatal("ca-key.pem is not the key of ca.pem")
		}
		if err := ca.CheckSignatureFrom(ca); err != nil {
			t.Fatalf("CA is not self-signed: %v", err)
		}
	})

	t.Run("Defaults", func(t *testing.T) {
		is, err := pki.InitCA(t.TempDir(), "", 0)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := is.Certificate.Subject.CommonName, pki.DefaultCAName; got != want {
			t.Fatalf("got name %q, want %q", got, want)
		}
		if got := time.Until(is.Certificate.NotAfter); got < pki.DefaultCAValidity-time.Hour || got > pki.DefaultCAValidity {
			t.Fatalf("got validity %v from now, want %v", got, pki.DefaultCAValidity)
		}
	})

	for _, name := range []string{"ca.pem", "ca-key.pem"} {
		t.Run("Exists_"+name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, name)
			if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := pki.InitCA(dir, "", 0)
			if !errors.Is(err, fs.ErrExist) {
				t.Fatalf("got %v, want an error wrapping fs.ErrExist", err)
			}
			for _, want := range []string{path, "already holds a CA", "move ca.pem and ca-key.pem away"} {
				if !strings.Contains(err.Error(), want) {
					t.Fatalf("got %q, want it to contain %q", err, want)
				}
			}
			entries, _ := os.ReadDir(dir)
			if b, _ := os.ReadFile(path); string(b) != "old" || len(entries) != 1 {
				t.Fatalf("got %d files, %s = %q; want the directory unchanged", len(entries), name, b)
			}
		})
	}
}

func TestIssue(t *testing.T) {
	caDir := mustInitCA(t, "Test CA")
	ca := mustReadCert(t, filepath.Join(caDir, "ca.pem"))

	t.Run("OK", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "nodes")
		is, err := pki.Issue(caDir, out, "iad-1", pki.IssueOptions{Validity: 30 * 24 * time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		if is.CertFile != filepath.Join(out, "iad-1.pem") || is.KeyFile != filepath.Join(out, "iad-1-key.pem") {
			t.Fatalf("got files %s, %s, want iad-1.pem and iad-1-key.pem in %s", is.CertFile, is.KeyFile, out)
		}
		assertMode(t, is.CertFile, 0o644)
		assertMode(t, is.KeyFile, 0o600)
		c := mustReadCert(t, is.CertFile)
		if c.Subject.CommonName != "iad-1" || !slices.Equal(c.DNSNames, []string{"iad-1"}) || len(c.IPAddresses) != 0 || len(c.EmailAddresses) != 0 || len(c.URIs) != 0 {
			t.Fatalf("got CommonName %q, DNS names %q, IPs %v; want iad-1 as CommonName and only name", c.Subject.CommonName, c.DNSNames, c.IPAddresses)
		}
		if want := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}; !slices.Equal(c.ExtKeyUsage, want) {
			t.Fatalf("got extended key usage %v, want %v", c.ExtKeyUsage, want)
		}
		if c.IsCA {
			t.Fatal("node certificate is a CA")
		}
		if got, want := time.Until(c.NotAfter).Round(time.Hour), 30*24*time.Hour; got != want {
			t.Fatalf("got validity %v from now, want %v", got, want)
		}
		if d := time.Since(c.NotBefore); d < 4*time.Minute || d > 6*time.Minute {
			t.Fatalf("NotBefore is %v ago, want about 5 minutes (clock skew)", d)
		}
		if !mustReadKey(t, is.KeyFile).PublicKey.Equal(c.PublicKey) {
			t.Fatal("iad-1-key.pem is not the key of iad-1.pem")
		}
		pool := x509.NewCertPool()
		pool.AddCert(ca)
		if _, err := c.Verify(x509.VerifyOptions{Roots: pool, DNSName: "iad-1", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Fatalf("does not verify against its CA: %v", err)
		}
		if node, err := pki.CertNode(c); err != nil || node != "iad-1" {
			t.Fatalf("CertNode: got %q, %v, want iad-1", node, err)
		}
	})

	t.Run("ExistsNeedsForce", func(t *testing.T) {
		out := t.TempDir()
		first, err := pki.Issue(caDir, out, "fra-1", pki.IssueOptions{})
		if err != nil {
			t.Fatal(err)
		}
		_, err = pki.Issue(caDir, out, "fra-1", pki.IssueOptions{})
		if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), first.CertFile) || !strings.Contains(err.Error(), "pass -f") {
			t.Fatalf("got %v, want an error wrapping fs.ErrExist naming %s and -f", err, first.CertFile)
		}
		if !mustReadCert(t, first.CertFile).Equal(first.Certificate) {
			t.Fatal("refused issue changed the certificate")
		}
		again, err := pki.Issue(caDir, out, "fra-1", pki.IssueOptions{Force: true})
		if err != nil {
			t.Fatal(err)
		}
		if c := mustReadCert(t, again.CertFile); c.Equal(first.Certificate) || !c.Equal(again.Certificate) {
			t.Fatal("forced issue did not replace the certificate")
		}
		if !mustReadKey(t, again.KeyFile).PublicKey.Equal(again.Certificate.PublicKey) {
			t.Fatal("forced issue left a key that does not match")
		}
		assertMode(t, again.KeyFile, 0o600)
		if entries, _ := os.ReadDir(out); len(entries) != 2 {
			t.Fatalf("got %d files in %s, want 2 (no temporary files left)", len(entries), out)
		}
	})

	t.Run("ErrBadNode", func(t *testing.T) {
		for _, node := range []string{"", "IAD-1", "-iad", "iad_1", strings.Repeat("a", 64), "../x"} {
			out := t.TempDir()
			_, err := pki.Issue(caDir, out, node, pki.IssueOptions{})
			if err == nil || !strings.Contains(err.Error(), "is not a valid node name (use 1-63 lowercase letters") {
				t.Fatalf("%q: got %v, want an invalid node name error", node, err)
			}
			if entries, _ := os.ReadDir(out); len(entries) != 0 {
				t.Fatalf("%q: wrote %d files", node, len(entries))
			}
		}
	})

	t.Run("ErrNoCA", func(t *testing.T) {
		empty := t.TempDir()
		_, err := pki.Issue(empty, t.TempDir(), "iad-1", pki.IssueOptions{})
		var ferr *pki.FileError
		if !errors.As(err, &ferr) || ferr.Role != pki.RoleCA || !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("got %v, want a *FileError for the CA wrapping fs.ErrNotExist", err)
		}
		if want := "CA certificate " + filepath.Join(empty, "ca.pem") + ": file does not exist; make a CA with `regiond ca init -dir " + empty + "`"; !strings.Contains(err.Error(), want) {
			t.Fatalf("got %q, want it to contain %q", err, want)
		}
	})

	t.Run("ErrCAKeyReadable", func(t *testing.T) {
		dir := mustInitCA(t, "Loose CA")
		key := filepath.Join(dir, "ca-key.pem")
		if err := os.Chmod(key, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := pki.Issue(dir, t.TempDir(), "iad-1", pki.IssueOptions{})
		if err == nil || !strings.Contains(err.Error(), "mode 0644") || !strings.Contains(err.Error(), "run chmod 600 "+key) {
			t.Fatalf("got %v, want a refusal saying to chmod 600 %s", err, key)
		}
	})

	t.Run("ErrBeyondCA", func(t *testing.T) {
		_, err := pki.Issue(caDir, t.TempDir(), "iad-1", pki.IssueOptions{Validity: pki.DefaultCAValidity + 24*time.Hour})
		if err == nil || !strings.Contains(err.Error(), `after the CA "Test CA" expires`) {
			t.Fatalf("got %v, want a refusal to outlive the CA", err)
		}
	})

	t.Run("ErrEndsBeforeStart", func(t *testing.T) {
		now := time.Now()
		_, err := pki.Issue(caDir, t.TempDir(), "iad-1", pki.IssueOptions{NotBefore: now, NotAfter: now.Add(-time.Hour)})
		if err == nil || !strings.Contains(err.Error(), "before it starts") {
			t.Fatalf("got %v, want a refusal of an empty validity", err)
		}
	})

	t.Run("NotBeforeNotAfter", func(t *testing.T) {
		nb, na := time.Now().Add(-48*time.Hour).Truncate(time.Second), time.Now().Add(-24*time.Hour).Truncate(time.Second)
		is := mustIssue(t, caDir, "old-1", pki.IssueOptions{NotBefore: nb, NotAfter: na})
		if c := mustReadCert(t, is.CertFile); !c.NotBefore.Equal(nb) || !c.NotAfter.Equal(na) {
			t.Fatalf("got validity %v to %v, want %v to %v", c.NotBefore, c.NotAfter, nb, na)
		}
	})
}

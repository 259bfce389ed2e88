package main

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("%s: want a PEM certificate, got %q", path, b)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func fileMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

// caInitIn runs `regiond ca init` for a new directory and returns it.
func caInitIn(t *testing.T, args ...string) (dir, stdout string) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "ca")
	stdout, _, err := run(t, append([]string{"ca", "init", "-dir", dir}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return dir, stdout
}

func TestCaInit(t *testing.T) {
	dir, out := caInitIn(t, "-name", "Acme CA", "-days", "20")
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	for _, want := range []string{
		"wrote " + certFile + `: CA "Acme CA", valid until `,
		"wrote " + keyFile + ": its private key (mode 0600)",
		"next, for each node: regiond ca issue -dir " + dir + " -node NAME",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("got %q, want it to contain %q", out, want)
		}
	}
	if got := fileMode(t, keyFile); got != 0o600 {
		t.Fatalf("ca-key.pem: mode %04o, want 0600", got)
	}
	if got := fileMode(t, certFile); got != 0o644 {
		t.Fatalf("ca.pem: mode %04o, want 0644", got)
	}
	ca := readCert(t, certFile)
	if !ca.IsCA || ca.Subject.CommonName != "Acme CA" {
		t.Fatalf("got IsCA %v, name %q, want a CA named Acme CA", ca.IsCA, ca.Subject.CommonName)
	}
	if got := time.Until(ca.NotAfter).Round(time.Hour); got != 20*24*time.Hour {
		t.Fatalf("got validity %v, want 20 days", got)
	}

	t.Run("ErrExists", func(t *testing.T) {
		before, err := os.ReadFile(keyFile)
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = run(t, "ca", "init", "-dir", dir)
		if err == nil || !strings.Contains(err.Error(), certFile+": file already exists; "+dir+" already holds a CA") {
			t.Fatalf("got %v, want a refusal naming %s", err, certFile)
		}
		if after, _ := os.ReadFile(keyFile); string(after) != string(before) {
			t.Fatal("a refused init changed ca-key.pem")
		}
		code, stderr := exitStatus(t, "ca", "init", "-dir", dir)
		if code != 1 || !strings.Contains(stderr, "regiond: init CA: "+certFile+": file already exists") {
			t.Fatalf("got exit %d, %q, want 1 and the refusal", code, stderr)
		}
	})
}

func TestCaIssue(t *testing.T) {
	dir, _ := caInitIn(t)
	out := filepath.Join(t.TempDir(), "nodes")
	stdout, _, err := run(t, "ca", "issue", "-dir", dir, "-node", "iad-1", "-out", out, "-days", "30")
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(out, "iad-1.pem"), filepath.Join(out, "iad-1-key.pem")
	for _, want := range []string{
		"wrote " + certFile + `: certificate of node iad-1, signed by "Meridian cluster CA", valid until `,
		"wrote " + keyFile + ": its private key (mode 0600)",
		"give node iad-1 these two files and " + filepath.Join(dir, "ca.pem"),
	} {
		if !strings.Contains(stdout, want) {
			t.Fatalf("got %q, want it to contain %q", stdout, want)
		}
	}
	if got := fileMode(t, keyFile); got != 0o600 {
		t.Fatalf("iad-1-key.pem: mode %04o, want 0600", got)
	}
	c := readCert(t, certFile)
	if c.Subject.CommonName != "iad-1" || !slices.Equal(c.DNSNames, []string{"iad-1"}) {
		t.Fatalf("got CommonName %q, DNS names %q, want iad-1", c.Subject.CommonName, c.DNSNames)
	}
	if got := time.Until(c.NotAfter).Round(time.Hour); got != 30*24*time.Hour {
		t.Fatalf("got validity %v, want 30 days", got)
	}
	pool := x509.NewCertPool()
	pool.AddCert(readCert(t, filepath.Join(dir, "ca.pem")))
	if _, err := c.Verify(x509.VerifyOptions{Roots: pool, DNSName: "iad-1", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("does not verify against the CA: %v", err)
	}

	t.Run("OutDefaultsToDir", func(t *testing.T) {
		if _, _, err := run(t, "ca", "issue", "-dir", dir, "-node", "fra-1"); err != nil {
			t.Fatal(err)
		}
		if got := fileMode(t, filepath.Join(dir, "fra-1-key.pem")); got != 0o600 {
			t.Fatalf("fra-1-key.pem: mode %04o, want 0600", got)
		}
		if c := readCert(t, filepath.Join(dir, "fra-1.pem")); c.Subject.CommonName != "fra-1" {
			t.Fatalf("got %q, want fra-1", c.Subject.CommonName)
		}
	})

	t.Run("ExistsNeedsF", func(t *testing.T) {
		code, stderr := exitStatus(t, "ca", "issue", "-dir", dir, "-node", "iad-1", "-out", out)
		if code != 1 || !strings.Contains(stderr, certFile+": file already exists; to renew the certificate of iad-1, pass -f") {
			t.Fatalf("got exit %d, %q, want 1 and a refusal naming %s", code, stderr, certFile)
		}
		if !readCert(t, certFile).Equal(c) {
			t.Fatal("a refused issue changed the certificate")
		}
		if _, _, err := run(t, "ca", "issue", "-dir", dir, "-node", "iad-1", "-out", out, "-f"); err != nil {
			t.Fatal(err)
		}
		if readCert(t, certFile).Equal(c) {
			t.Fatal("-f did not replace the certificate")
		}
		if got := fileMode(t, keyFile); got != 0o600 {
			t.Fatalf("replaced key: mode %04o, want 0600", got)
		}
	})

	t.Run("ErrNoCA", func(t *testing.T) {
		empty := t.TempDir()
		code, stderr := exitStatus(t, "ca", "issue", "-dir", empty, "-node", "iad-1")
		if want := "CA certificate " + filepath.Join(empty, "ca.pem") + ": file does not exist; make a CA with `regiond ca init -dir " + empty + "`"; code != 1 || !strings.Contains(stderr, want) {
			t.Fatalf("got exit %d, %q, want 1 and %q", code, stderr, want)
		}
	})
}

func TestCa_UsageErrors(t *testing.T) {
	dir, _ := caInitIn(t)
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"NoNode", []string{"ca", "issue", "-dir", dir}, "regiond: ca issue: -node NAME is required"},
		{"BadNode", []string{"ca", "issue", "-dir", dir, "-node", "IAD_1"},
			`regiond: ca issue: -node "IAD_1" is not a valid node name (use 1-63 lowercase letters, digits and '-', starting with a letter or digit)`},
		{"PathAsNode", []string{"ca", "issue", "-dir", dir, "-node", "../iad-1"}, `-node "../iad-1" is not a valid node name`},
		{"ZeroDays", []string{"ca", "issue", "-dir", dir, "-node", "iad-1", "-days", "0"}, "regiond: ca issue: -days 0 is out of range (use 1 to 36500)"},
		{"TooManyDays", []string{"ca", "init", "-dir", t.TempDir(), "-days", "99999"}, "regiond: ca init: -days 99999 is out of range"},
		{"ExtraArgument", []string{"ca", "init", "-dir", t.TempDir(), "now"}, `regiond: ca init: unexpected arguments ["now"]`},
		{"UnknownCommand", []string{"ca", "renew"}, `regiond: unknown ca command "renew"; run "regiond ca help" for the list`},
		{"UnknownFlag", []string{"ca", "issue", "-name", "iad-1"}, "flag provided but not defined: -name"},
		{"NoCommand", []string{"ca"}, "Usage:\n\n\tregiond ca init"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, stderr := exitStatus(t, tt.args...)
			if code != 2 || !strings.Contains(stderr, tt.want) {
				t.Fatalf("got exit %d, %q, want 2 and %q", code, stderr, tt.want)
			}
		})
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 {
		t.Fatalf("got %d files in the CA directory, want ca.pem and ca-key.pem only", len(entries))
	}
}

func TestCa_Help(t *testing.T) {
	out, _, err := run(t, "ca", "help")
	if err != nil || !strings.Contains(out, "regiond ca issue -node NAME [-dir DIR] [-out DIR] [-days N] [-f]") {
		t.Fatalf("got %q, %v, want the ca usage", out, err)
	}
	out, _, err = run(t, "help")
	if err != nil || !strings.Contains(out, "\tca       make the cluster's CA and each node's certificate and key\n") {
		t.Fatalf("got %q, %v, want ca in the command list", out, err)
	}
}

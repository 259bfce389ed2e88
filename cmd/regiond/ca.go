package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/meridian-db/meridian"
	"github.com/meridian-db/meridian/internal/pki"
)

const caUsage = `Make the cluster's mTLS material: one CA, and a certificate per node.

Usage:

	regiond ca init [-dir DIR] [-name NAME] [-days N]
	                  make the cluster's CA: DIR/ca.pem and DIR/ca-key.pem
	regiond ca issue -node NAME [-dir DIR] [-out DIR] [-days N] [-f]
	                  issue node NAME's certificate and key, signed by the
	                  CA in DIR: OUT/NAME.pem and OUT/NAME-key.pem

Keys are written with mode 0600. ca-key.pem signs every node's certificate:
keep it off the nodes. Each node needs ca.pem, NAME.pem and NAME-key.pem,
by default beside its regiond.yml (config keys tls.ca, tls.cert, tls.key).
`

// maxDays bounds -days, far below what a time.Duration holds.
const maxDays = 100 * 365

func runCA(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, caUsage)
		return flag.ErrHelp
	}
	cmds := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"init":  caInit,
		"issue": caIssue,
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		if args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
			fmt.Fprint(stdout, caUsage)
			return nil
		}
		return usagef("unknown ca command %q; run \"regiond ca help\" for the list", args[0])
	}
	return cmd(ctx, args[1:], stdout, stderr)
}

// newCAFlagSet returns a flag set for "regiond ca NAME" printing usage to
// stderr.
func newCAFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("regiond ca "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: regiond ca %s %s\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args with fs. A bad flag, which fs has reported with
// its usage, is a usage error (exit status 2).
func parseFlags(fs *flag.FlagSet, args []string) error {
	err := fs.Parse(args)
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return err
	}
	return usageError{err.Error()}
}

// validity checks -days of "regiond ca cmd" and returns it as a duration.
func validity(cmd string, days int) (time.Duration, error) {
	if days < 1 || days > maxDays {
		return 0, usagef("ca %s: -days %d is out of range (use 1 to %d)", cmd, days, maxDays)
	}
	return time.Duration(days) * 24 * time.Hour, nil
}

func caInit(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newCAFlagSet("init", "[-dir DIR] [-name NAME] [-days N]", stderr)
	dir := fs.String("dir", ".", "directory to write "+pki.CACertFile+" and "+pki.CAKeyFile+" to, created if needed")
	name := fs.String("name", pki.DefaultCAName, "name of the CA (its certificate's CommonName)")
	days := fs.Int("days", int(pki.DefaultCAValidity/(24*time.Hour)), "days the CA is valid")
	if err := parseFlags(fs, args); err != nil {
		return err
	} else if fs.NArg() > 0 {
		return usagef("ca init: unexpected arguments %q", fs.Args())
	}
	d, err := validity("init", *days)
	if err != nil {
		return err
	}
	is, err := pki.InitCA(*dir, *name, d)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s: CA %q, valid until %s\n", is.CertFile, is.Certificate.Subject.CommonName, day(is.Certificate.NotAfter))
	fmt.Fprintf(stdout, "wrote %s: its private key (mode 0600); keep it safe and off the nodes\n", is.KeyFile)
	fmt.Fprintf(stdout, "next, for each node: regiond ca issue -dir %s -node NAME\n", *dir)
	return nil
}

func caIssue(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newCAFlagSet("issue", "-node NAME [-dir DIR] [-out DIR] [-days N] [-f]", stderr)
	node := fs.String("node", "", "name of the node (required): the certificate's only name")
	dir := fs.String("dir", ".", "directory of the CA ("+pki.CACertFile+", "+pki.CAKeyFile+")")
	out := fs.String("out", "", "directory to write NAME.pem and NAME-key.pem to, created if needed (default: -dir)")
	days := fs.Int("days", int(pki.DefaultNodeValidity/(24*time.Hour)), "days the certificate is valid")
	force := fs.Bool("f", false, "replace the node's certificate and key if they exist")
	if err := parseFlags(fs, args); err != nil {
		return err
	} else if fs.NArg() > 0 {
		return usagef("ca issue: unexpected arguments %q", fs.Args())
	}
	switch {
	case *node == "":
		return usagef("ca issue: -node NAME is required")
	case !meridian.ValidName(*node):
		return usagef("ca issue: -node %q is not a valid node name (use %s)", *node, meridian.NameRule)
	}
	d, err := validity("issue", *days)
	if err != nil {
		return err
	}
	if *out == "" {
		*out = *dir
	}
	is, err := pki.Issue(*dir, *out, *node, pki.IssueOptions{Validity: d, Force: *force})
	if err != nil {
		return err
	}
	c := is.Certificate
	fmt.Fprintf(stdout, "wrote %s: certificate of node %s, signed by %q, valid until %s\n", is.CertFile, *node, c.Issuer.CommonName, day(c.NotAfter))
	fmt.Fprintf(stdout, "wrote %s: its private key (mode 0600)\n", is.KeyFile)
	fmt.Fprintf(stdout, "give node %s these two files and %s, beside its regiond.yml or where tls.cert, tls.key and tls.ca say\n",
		*node, filepath.Join(*dir, pki.CACertFile))
	return nil
}

// day formats t as a UTC date and time to the minute.
func day(t time.Time) string { return t.UTC().Format("2006-01-02 15:04 MST") }

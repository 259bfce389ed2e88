// Command regiond is Meridian's per-region daemon and its tools.
//
// `regiond run` runs the daemon; `regiond status` prints the cluster from
// the nodes' admin APIs; `regiond ltx` holds the tools for LTX logs and
// database files; `regiond ca` makes the cluster's mTLS material.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/meridian-db/meridian/fs"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	var (
		usage usageError
		exit  exitError
	)
	switch {
	case err == nil:
	case errors.As(err, &exit):
		fmt.Fprintf(os.Stderr, "regiond: %s\n", err)
		os.Exit(exit.code)
	case errors.Is(err, flag.ErrHelp):
		os.Exit(2)
	case errors.As(err, &usage):
		fmt.Fprintf(os.Stderr, "regiond: %s\n", err)
		os.Exit(2)
	default:
		fmt.Fprintf(os.Stderr, "regiond: %s\n", err)
		os.Exit(1)
	}
}

const usage = `regiond is Meridian's per-region daemon and its tools.

Usage:

	regiond <command> [arguments]

Commands:

	run      run the daemon: mount the databases and capture every transaction
	status   print the cluster: each node's role, readiness, lag and positions
	handoff  move the primary to another node without losing a write
	promote  ask the primary to hand the lease to this node
	geo      run a geo entry: one router in front of every region
	ltx      inspect, verify and restore LTX logs and database files
	ca       make the cluster's CA and each node's certificate and key

Run "regiond <command> -h" for a command's usage.
`

// usageError is an error in how a command was called (exit status 2).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// Run runs the command in args, writing its output to stdout and usage and
// diagnostics to stderr.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return flag.ErrHelp
	}
	switch args[0] {
	case "run":
		return runRun(ctx, args[1:], stderr)
	case "ltx":
		return runLTX(ctx, args[1:], stdout, stderr)
	case "ca":
		return runCA(ctx, args[1:], stdout, stderr)
	case "status":
		return runStatus(ctx, args[1:], stdout, stderr)
	case "handoff":
		return runHandoff(ctx, args[1:], stdout, stderr)
	case "promote":
		return runPromote(ctx, args[1:], stdout, stderr)
	case "geo":
		return runGeo(ctx, args[1:], stderr)
	case lockHolderCmd:
		if len(args) > 1 {
			return usagef("%s takes no arguments; regiond starts it itself", lockHolderCmd)
		}
		return fs.RunLockHolder(os.Stdin, stdout)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		return usagef("unknown command %q; run \"regiond help\" for the list", args[0])
	}
}

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/meridian-db/meridian/regiond"
)

const runUsage = `Usage: regiond run -config FILE

Runs the daemon: recovers every database under data_dir, mounts them at
mount_dir, and serves until SIGINT or SIGTERM, then unmounts.

`

// unmountTimeout bounds how long shutdown waits for apps to close their
// database files before giving up on a clean unmount.
const unmountTimeout = 30 * time.Second

func runRun(ctx context.Context, args []string, stderr io.Writer) error {
	fl := flag.NewFlagSet("regiond run", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, runUsage); fl.PrintDefaults() }
	configPath := fl.String("config", "regiond.yml", "configuration `file`")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		return usagef("run: unexpected arguments %q (running an app as a child is not available yet)", fl.Args())
	}
	cfg, err := regiond.LoadConfig(*configPath)
	if err != nil {
		return err
	}
	logger := cfg.Logger(stderr)
	d := regiond.NewDaemon(cfg, logger)
	if err := d.Open(ctx); err != nil {
		return err
	}
	<-ctx.Done()
	logger.Info("shutting down")
	closeCtx, cancel := context.WithTimeout(context.Background(), unmountTimeout)
	defer cancel()
	return d.Close(closeCtx)
}

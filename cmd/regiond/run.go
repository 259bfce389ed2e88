package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"runtime/pprof"
	"slices"
	"syscall"
	"time"

	"github.com/meridian-db/meridian/regiond"
)

const runUsage = `Usage: regiond run -config FILE [-- APP ARGS...]

Runs the daemon: recovers every database under data_dir, mounts them at
mount_dir, and serves until SIGINT or SIGTERM, then unmounts. SIGHUP reads
the configuration file again: a new lease.static_primary moves the primary
while the daemon runs (other keys wait for a restart, and say so).

With an app after "--", regiond starts it once the node is ready (as
/readyz says), in its own process group, with these in its environment:
MERIDIAN_NODE, MERIDIAN_REGION, MERIDIAN_ROLE (primary or replica when
the app started; roles change at runtime: /status says the current one),
MERIDIAN_PRIMARY, MERIDIAN_MOUNT_DIR, MERIDIAN_DB (the database file in
the mount, -db), MERIDIAN_LISTEN (the host:port of router.target, where
the router expects the app), MERIDIAN_ADMIN_URL and MERIDIAN_ROUTER_URL.
SIGINT, SIGTERM, SIGQUIT, SIGUSR1 and SIGUSR2 are passed on to the app.
regiond restarts nothing: when the app exits, regiond stops and exits
with the app's status. If regiond dies, the kernel kills the app.

`

// unmountTimeout bounds how long shutdown waits for apps to close their
// database files before giving up on a clean unmount.
const unmountTimeout = 30 * time.Second

func runRun(ctx context.Context, args []string, stderr io.Writer) error {
	fl := flag.NewFlagSet("regiond run", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, runUsage); fl.PrintDefaults() }
	configPath := fl.String("config", "regiond.yml", "configuration `file`")
	cpuProfile := fl.String("cpuprofile", "", "write a CPU profile of the whole run to `file` (go tool pprof reads it)")
	dbName := fl.String("db", "app.db", "the app's database `name` in mount_dir, for MERIDIAN_DB")
	if err := fl.Parse(args); err != nil {
		return err
	}
	app := fl.Args()
	if len(app) > 0 && !slices.Contains(args, "--") {
		return usagef("run: unexpected arguments %q (put the app after --: regiond run -config FILE -- APP ARGS...)", app)
	}
	cfg, err := regiond.LoadConfig(*configPath)
	if err != nil {
		return err
	}
	logger := cfg.Logger(stderr)
	if *cpuProfile != "" {
		stop, err := startCPUProfile(*cpuProfile)
		if err != nil {
			return err
		}
		defer stop()
	}
	d := regiond.NewDaemon(cfg, logger)
	d.LockHolder = lockHolderCommand
	if err := d.Open(ctx); err != nil {
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	var child *appProcess
	if len(app) > 0 {
		child, err = startApp(ctx, d, app, *dbName, logger)
		if err != nil {
			closeCtx, cancel := context.WithTimeout(context.Background(), unmountTimeout)
			defer cancel()
			return errors.Join(err, d.Close(closeCtx))
		}
	}
	var appErr error
	for done := false; !done; {
		select {
		case <-ctx.Done():
			done = true
		case <-hup:
			reload(ctx, d, *configPath, logger)
		case <-child.exited():
			appErr = child.err()
			done = true
		}
	}
	if child != nil && appErr == nil {
		appErr = child.stop(unmountTimeout, logger)
	}
	logger.Info("shutting down")
	closeCtx, cancel := context.WithTimeout(context.Background(), unmountTimeout)
	defer cancel()
	if err := d.Close(closeCtx); err != nil {
		return errors.Join(err, appErr)
	}
	return appErr
}

// reload reads the configuration file again on SIGHUP and applies what
// can change while the daemon runs (Daemon.Reload). A file that does not
// load changes nothing: the daemon goes on as it was and logs why.
func reload(ctx context.Context, d *regiond.Daemon, path string, logger *slog.Logger) {
	cfg, err := regiond.LoadConfig(path)
	if err != nil {
		logger.Error("SIGHUP: the configuration did not load; nothing changed", "config", path, "err", err)
		return
	}
	logger.Info("SIGHUP: reloading the configuration", "config", path, "static_primary", cfg.Lease.StaticPrimary)
	if err := d.Reload(ctx, cfg); err != nil {
		logger.Error("SIGHUP: reload", "config", path, "err", err)
	}
}

// startCPUProfile starts profiling the process into path and returns the
// function that stops it and closes the file.
func startCPUProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("run: -cpuprofile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("run: -cpuprofile %s: %w", path, err)
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}

// lockHolderCommand runs this binary as the lock holder of a replica with
// fs.locks: kernel (fs.RunLockHolder).
func lockHolderCommand() *exec.Cmd {
	exe, err := os.Executable()
	if err != nil {
		exe = os.Args[0]
	}
	cmd := exec.Command(exe, lockHolderCmd)
	cmd.Stderr = os.Stderr
	return cmd
}

// lockHolderCmd is the hidden command that runs the lock holder; only
// regiond itself starts it.
const lockHolderCmd = "lock-holder"

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meridian-db/meridian/regiond"
)

// exitError is an app's exit status, which regiond run exits with.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("the app exited with status %d", e.code) }

// appProcess is the app regiond run runs as its child.
type appProcess struct {
	cmd      *exec.Cmd
	done     chan struct{} // closed when the app has exited
	waitErr  error         // set before done is closed
	signaled atomic.Bool   // SIGINT or SIGTERM was passed on, or sent by stop
	stopSigs func()
}

// forwarded are the signals regiond passes on to its app.
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}

// startApp waits until the node is ready, then starts the app in args.
func startApp(ctx context.Context, d *regiond.Daemon, args []string, db string, logger *slog.Logger) (*appProcess, error) {
	if err := awaitReady(ctx, d, logger); err != nil {
		return nil, err
	}
	c := d.Config
	st := d.Status()
	env := append(os.Environ(),
		"MERIDIAN_NODE="+c.Node,
		"MERIDIAN_REGION="+c.Region,
		"MERIDIAN_ROLE="+st.Role,
		"MERIDIAN_PRIMARY="+st.Primary,
		"MERIDIAN_MOUNT_DIR="+c.MountDir,
		"MERIDIAN_DB="+filepath.Join(c.MountDir, db),
	)
	if u, err := regiond.RouterURL(c.Router.Target); c.Router.Target != "" && err == nil {
		env = append(env, "MERIDIAN_LISTEN="+u.Host)
	}
	if c.Admin.Listen != "" {
		env = append(env, "MERIDIAN_ADMIN_URL=http://"+c.Admin.Listen)
	}
	if c.Router.Listen != "" {
		env = append(env, "MERIDIAN_ROUTER_URL=http://"+c.Router.Listen)
	}
	if e := c.Telemetry.OTLPEndpoint; e != "" && os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") == "" {
		// The app's traces go where the node's go.
		env = append(env, "OTEL_EXPORTER_OTLP_ENDPOINT="+e)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = env
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// Its own process group: a terminal's Ctrl-C reaches regiond, which
	// passes it on once. The kernel kills it if regiond dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// Caught from before the start: a signal that came between the start
	// and signal.Notify would end regiond (SIGUSR1's default) instead.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, forwarded...)
	if err := cmd.Start(); err != nil {
		signal.Stop(sigs)
		return nil, fmt.Errorf("run: start the app %q: %w", args[0], err)
	}
	a := &appProcess{cmd: cmd, done: make(chan struct{})}
	stopped := make(chan struct{})
	a.stopSigs = func() { signal.Stop(sigs); close(stopped) }
	go func() {
		for {
			select {
			case sig := <-sigs:
				if sig == syscall.SIGINT || sig == syscall.SIGTERM {
					a.signaled.Store(true)
				}
				_ = cmd.Process.Signal(sig)
			case <-stopped:
				return
			}
		}
	}()
	go func() {
		a.waitErr = cmd.Wait()
		close(a.done)
	}()
	logger.Info("app started", "pid", cmd.Process.Pid, "cmd", args, "role", st.Role)
	return a, nil
}

// awaitReady waits until the node is ready (as /readyz says), saying why
// not every few seconds.
func awaitReady(ctx context.Context, d *regiond.Daemon, logger *slog.Logger) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var said time.Time
	for {
		st := d.Status()
		if st.Ready {
			return nil
		}
		if time.Since(said) > 5*time.Second {
			logger.Info("waiting for the node to be ready before starting the app", "why", st.NotReady)
			said = time.Now()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("run: stopped before the node was ready to start the app: %s", st.NotReady)
		case <-tick.C:
		}
	}
}

// exited returns a channel closed when the app has exited; nil (never
// ready) for no app.
func (a *appProcess) exited() <-chan struct{} {
	if a == nil {
		return nil
	}
	return a.done
}

// err is how the app ended: nil for status 0, else an exitError.
func (a *appProcess) err() error {
	a.stopSigs()
	var ee *exec.ExitError
	if errors.As(a.waitErr, &ee) {
		code := ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
		return exitError{code}
	}
	return a.waitErr
}

// stop ends the app: SIGTERM, unless a SIGINT or SIGTERM was passed on
// already, then SIGKILL to its process group after timeout. It returns
// how the app ended.
func (a *appProcess) stop(timeout time.Duration, logger *slog.Logger) error {
	if !a.signaled.Swap(true) {
		_ = a.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-a.done:
	case <-time.After(timeout):
		logger.Error("the app did not exit within the timeout: killed", "pid", a.cmd.Process.Pid, "timeout", timeout)
		_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
		<-a.done
	}
	err := a.err()
	var ee exitError
	if errors.As(err, &ee) && a.signaled.Load() && (ee.code == 128+int(syscall.SIGTERM) || ee.code == 128+int(syscall.SIGINT)) {
		return nil // stopped as asked
	}
	return err
}

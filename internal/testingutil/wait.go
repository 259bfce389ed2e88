package testingutil

import (
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"syscall"
	"time"
)

// Every wait in a test has a deadline: a test fails, it never hangs. These
// helpers give the common waits one, and fail with a message that says
// what the test was waiting for.

// Recv returns the next value received from ch. If none comes within
// timeout, or ch is closed, it fails tb, naming what it waited for.
func Recv[T any](tb TB, ch <-chan T, timeout time.Duration, what string) T {
	tb.Helper()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case v, ok := <-ch:
		if !ok {
			tb.Fatalf("waiting for %s: channel closed", what)
		}
		return v
	case <-t.C:
		tb.Fatalf("waiting for %s: nothing in %v", what, timeout)
	}
	var zero T
	return zero
}

// Within runs wait (a WaitGroup's Wait, an errgroup's, ...) and fails tb
// if it has not returned within timeout, naming what it waited for. The
// wait goes on in the background then.
func Within(tb TB, timeout time.Duration, what string, wait func()) {
	tb.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		wait()
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		tb.Fatalf("waiting for %s: not done in %v", what, timeout)
	}
}

// DieWithParent makes cmd's process receive SIGKILL when the thread that
// starts it exits, as every thread of a test binary does when it ends: a
// child cannot outlive the test that started it, even when the test
// binary is killed.
func DieWithParent(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	if cmd.SysProcAttr.Pdeathsig == 0 {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
}

// Command returns a command that runs name with args, dies with the test
// binary (DieWithParent), and is killed if it has not finished timeout
// after it starts or when the test ends, saying so in tb's log. Its Wait
// gives up on its output 5 seconds after that.
func Command(tb TB, timeout time.Duration, name string, args ...string) *exec.Cmd {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	tb.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Cancel = func() error {
		if ctx.Err() == context.DeadlineExceeded {
			tb.Logf("%s did not finish in %v: killing it", cmd, timeout)
		}
		return cmd.Process.Kill()
	}
	cmd.WaitDelay = 5 * time.Second
	DieWithParent(cmd)
	return cmd
}

// WaitHTTP waits until url answers GET with 200, asking every 50 ms, for
// at most timeout or until ctx ends.
func WaitHTTP(ctx context.Context, url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("%s", resp.Status)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s did not answer 200 within %v: %v", url, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

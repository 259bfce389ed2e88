package testingutil

import (
	"errors"
	"fmt"
	"os"
	"sync"
)

// Harness is a TB for programs that run a Cluster outside a test, such as
// the benchmarks: Fatal stops the program's run (see Run), and the
// cleanups run when it ends, last first.
type Harness struct {
	// Prefix names the temporary directories it makes.
	Prefix string

	mu       sync.Mutex
	cleanups []func()
	failed   bool
}

// harnessFatal is the panic of a Fatal, which Run recovers.
type harnessFatal struct{}

// Run calls f, then the cleanups. A Fatal in f ends it early, and Run
// returns an error saying it stopped.
func (h *Harness) Run(f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(harnessFatal); !ok {
				panic(r)
			}
			err = errors.New("stopped")
		}
		h.Close()
	}()
	return f()
}

func (h *Harness) Helper() {}

func (h *Harness) Cleanup(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cleanups = append(h.cleanups, f)
}

func (h *Harness) TempDir() string {
	dir, err := os.MkdirTemp("", h.Prefix+"-")
	if err != nil {
		h.Fatal(err)
	}
	h.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func (h *Harness) Failed() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.failed
}

func (h *Harness) Logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

func (h *Harness) Error(args ...any) { h.fail(); fmt.Fprintln(os.Stderr, args...) }

func (h *Harness) Errorf(format string, args ...any) { h.fail(); h.Logf(format, args...) }

func (h *Harness) Fatal(args ...any) { h.Error(args...); panic(harnessFatal{}) }

func (h *Harness) Fatalf(format string, args ...any) {
	h.Errorf(format, args...)
	panic(harnessFatal{})
}

func (h *Harness) fail() {
	h.mu.Lock()
	h.failed = true
	h.mu.Unlock()
}

// Close runs the cleanups, last first, and forgets them.
func (h *Harness) Close() {
	h.mu.Lock()
	fs := h.cleanups
	h.cleanups = nil
	h.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

var _ TB = (*Harness)(nil)

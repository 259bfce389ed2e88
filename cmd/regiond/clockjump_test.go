//go:build clockjump

package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/internal/testingutil/roles"
	"github.com/meridian-db/meridian/regiond"
)

// TestClockJump: the machine's wall clock jumps 2 h forward under a
// primary holding the Consul lease while a client writes to it with
// durability: sync, then back to 3 min behind the true time (less than the
// certificates' backdating, so TLS still accepts them), then is put right.
// The lease, its renewals, the write deadline and Consul's session and
// check timers all run on monotonic clocks: the primary keeps the lease
// and goes on committing through every jump, no other node ever believes
// it is primary, and every write the client saw acknowledged is on every
// node afterwards.
//
// It sets the system clock (CAP_SYS_TIME), for the whole machine, which
// is why it runs alone, in make test-clock (build tag clockjump), on a
// machine of its own, and neither in make test nor in CI: whatever else
// runs on the machine meanwhile sees the jumps (coreutils timeout, which
// bounds CI's runs, counts on the wall clock, and ended a run the jump
// made look 2 h long). The clock is put right when the test ends, however
// it ends, short of SIGKILL (SIGTERM and SIGINT too): from the monotonic
// time elapsed since the test read it.
func TestClockJump(t *testing.T) {
	mono0 := time.Now()
	wall0 := mono0.Round(0) // the wall clock's reading alone
	var restoreOnce sync.Once
	restore := func() {
		restoreOnce.Do(func() {
			if err := setClock(wall0.Add(time.Since(mono0))); err != nil {
				t.Errorf("put the clock right: %v", err)
			}
		})
	}
	t.Cleanup(restore)
	watchdog := time.AfterFunc(2*time.Minute, restore) // a test past its timeout runs no cleanup
	defer watchdog.Stop()
	stopped := make(chan os.Signal, 1)
	signal.Notify(stopped, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(stopped)
	go func() {
		if sig, ok := <-stopped; ok {
			restore()
			fmt.Fprintf(os.Stderr, "TestClockJump: %v: the clock is put right\n", sig)
			os.Exit(1)
		}
	}()
	jump := func(d time.Duration) {
		t.Helper()
		if err := setClock(wall0.Add(time.Since(mono0) + d)); err != nil {
			t.Fatalf("set the clock %v off (this test needs CAP_SYS_TIME): %v", d, err)
		}
	}

	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	for i := range specs {
		specs[i].Replication = []string{"durability: sync", "sync_acks: 1"}
	}
	_, c := consulCluster(t, specs)
	c.Start(t)
	primary, epoch := waitOnePrimary(t, c, 0)
	c.Primary = primary.Name
	createSyncDB(t, c, primary, "delete")
	mon := monitorRoles(t, c)

	var (
		mu     sync.Mutex
		acked  []int
		failed int
	)
	ctx, stop := context.WithCancel(context.Background())
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		for id := 1; ctx.Err() == nil; id++ {
			err := insertRow(primary, id)
			mu.Lock()
			if err == nil {
				acked = append(acked, id)
			} else {
				failed++
				t.Logf("write %d: %v", id, err)
			}
			mu.Unlock()
			if err != nil {
				time.Sleep(20 * time.Millisecond)
			}
		}
	}()
	defer func() { stop(); <-writerDone }()
	ackedNow := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(acked)
	}

	// Each phase lasts three check TTLs: long enough for a lease that
	// counted its time on the wall clock to be lost or to be taken.
	phases := []struct {
		name   string
		offset time.Duration
	}{
		{"before the jumps", 0},
		{"2h ahead", 2 * time.Hour},
		{"3m behind", -3 * time.Minute},
		{"put right", 0},
	}
	for _, p := range phases {
		if p.name != phases[0].name {
			jump(p.offset)
		}
		from := ackedNow()
		time.Sleep(3 * time.Second)
		n := ackedNow() - from
		st, err := roles.Status(primary)
		t.Logf("clock %s: %d writes acknowledged in 3 s; %s: %s at epoch %d (%v)", p.name, n, primary.Name, st.Role, st.Epoch, err)
		if n == 0 {
			t.Errorf("clock %s: no write acknowledged in 3 s", p.name)
		}
		if err != nil || st.Role != regiond.RolePrimary || st.Epoch != epoch {
			t.Errorf("clock %s: %s is %s at epoch %d (%v), want still primary at epoch %d", p.name, primary.Name, st.Role, st.Epoch, err, epoch)
		}
	}
	restore()
	stop()
	<-writerDone
	mon.stop(t)
	c.WaitCaughtUp(t, time.Minute, "sync.db")
	if failed > 0 {
		t.Errorf("%d writes failed on %s across the jumps", failed, primary.Name)
	}
	for _, n := range c.Nodes {
		have := rowIDs(t, openOnReplica(t, n, "sync.db"))
		var missing []int
		for _, id := range acked {
			if !have[id] {
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			t.Errorf("%s lacks %d of the %d acknowledged writes, e.g. %d", n.Name, len(missing), len(acked), missing[0])
		}
	}
	t.Logf("%d writes acknowledged, each on all %d nodes", len(acked), len(c.Nodes))
}

// setClock sets the system's wall clock to t.
func setClock(t time.Time) error {
	tv := syscall.NsecToTimeval(t.UnixNano())
	return syscall.Settimeofday(&tv)
}

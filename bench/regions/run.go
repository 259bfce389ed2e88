package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/regiond"
)

// seedEntries are written before a workload starts, so that its first
// reads have entries to read.
const seedEntries = 50

// lagSample is one replication lag figure: a transaction committed on the
// primary at "at" (from the start of the workload) became visible in
// region after lag.
type lagSample struct {
	region string
	at     time.Duration
	lag    time.Duration
}

// phase is what one architecture did under the workload.
type phase struct {
	name    string // "replicated" or "central"
	ops     []op
	elapsed time.Duration
	// lagBench is measured by the bench: a row committed on the primary's
	// app, polled for in each other region's app; lagCluster is the
	// cluster's own figure of the last transaction each replica applied
	// (its /status committed_at and applied_at, the same figure as the
	// meridian.replication.lag histogram).
	lagBench, lagCluster []lagSample
	// steps are the throughput steps run after the workload.
	steps []step
}

func nodeName(region string) string { return region + "-1" }

// replicated runs the workload against Meridian: a node per region, each
// regiond running the app behind its router, cfg.Primary holding a
// static lease, and every link between two regions (replication and
// router to router) delayed as between the regions. Each client talks to
// its own region's router.
func replicated(ctx context.Context, tb testingutil.TB, cfg *Config, exe, app string) (*phase, error) {
	command := func(args ...string) *exec.Cmd { return exec.Command(exe, args...) }
	var specs []testingutil.ClusterNodeSpec
	for _, r := range cfg.Regions {
		specs = append(specs, testingutil.ClusterNodeSpec{Name: nodeName(r), Region: r, App: []string{app}})
	}
	c := testingutil.NewCluster(tb, command, nodeName(cfg.Primary), specs...)
	if err := c.DelayLinks(tb, func(from, to *testingutil.ClusterNode) time.Duration {
		return cfg.oneWay(from.Region, to.Region)
	}); err != nil {
		return nil, err
	}
	c.Start(tb)
	targets := map[string]target{}
	for _, n := range c.Nodes {
		if err := testingutil.WaitHTTP(ctx, n.RouterURL()+"/healthz", 30*time.Second); err != nil {
			return nil, fmt.Errorf("%s's router: %w", n.Name, err)
		}
		targets[n.Region] = target{base: n.RouterURL(), local: n.Name}
	}
	primary := c.Node(nodeName(cfg.Primary))
	maxID, err := seed(ctx, "http://"+primary.AppAddr)
	if err != nil {
		return nil, err
	}
	c.WaitCaughtUp(tb, time.Minute, "app.db")

	p := &phase{name: "replicated"}
	pctx, stop := context.WithCancel(ctx)
	start := time.Now()
	var wg sync.WaitGroup
	var probeErr error
	wg.Add(2)
	go func() { defer wg.Done(); probeErr = probeLag(pctx, cfg, c, start, p) }()
	go func() { defer wg.Done(); sampleClusterLag(pctx, cfg, c, start, p) }()
	p.ops = workload(ctx, cfg, targets, maxID)
	p.elapsed = time.Since(start)
	stop()
	wg.Wait()
	if probeErr != nil {
		return nil, probeErr
	}
	p.steps = loadSteps(ctx, cfg, targets, maxID)
	return p, nil
}

// step is one throughput step: every region offering rate requests a
// second.
type step struct {
	rate    int // offered by each region, per second
	ops     []op
	elapsed time.Duration // the time requests were sent in; every answer is in ops
}

// loadSteps runs cfg.LoadSteps against targets, open loop.
func loadSteps(ctx context.Context, cfg *Config, targets map[string]target, maxID *atomic.Int64) []step {
	var out []step
	for _, rate := range cfg.LoadSteps {
		ops := openLoop(ctx, cfg, targets, maxID, rate, cfg.StepDuration)
		out = append(out, step{rate: rate, ops: ops, elapsed: cfg.StepDuration})
	}
	return out
}

// seed writes seedEntries entries at base (waiting up to 30 s for the
// first) and returns the highest ID.
func seed(ctx context.Context, base string) (*atomic.Int64, error) {
	hc := &http.Client{Timeout: 10 * time.Second}
	var maxID atomic.Int64
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; i < seedEntries; {
		id, err := post(ctx, hc, base, "seed")
		if err != nil {
			if time.Now().After(deadline) || ctx.Err() != nil {
				return nil, fmt.Errorf("seeding the database: %w", err)
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		raise(&maxID, id)
		i++
	}
	return &maxID, nil
}

// probeLag commits a row on the primary's app every cfg.ProbeEvery and
// polls every other region's app for it every millisecond: the time from
// the primary's answer to the first read that finds it is the lag.
func probeLag(ctx context.Context, cfg *Config, c *testingutil.Cluster, start time.Time, p *phase) error {
	hc := &http.Client{Timeout: 10 * time.Second}
	primary := "http://" + c.Node(nodeName(cfg.Primary)).AppAddr
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	defer wg.Wait()
	tick := time.NewTicker(cfg.ProbeEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		id, err := post(ctx, hc, primary, "probe")
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("lag probe: %w", err)
		}
		committed := time.Now()
		for _, r := range cfg.replicas() {
			base := "http://" + c.Node(nodeName(r)).AppAddr
			wg.Add(1)
			go func() {
				defer wg.Done()
				for deadline := committed.Add(10 * time.Second); time.Now().Before(deadline) && ctx.Err() == nil; time.Sleep(time.Millisecond) {
					if found(ctx, hc, base, id) {
						mu.Lock()
						p.lagBench = append(p.lagBench, lagSample{region: r, at: committed.Sub(start), lag: time.Since(committed)})
						mu.Unlock()
						return
					}
				}
			}()
		}
	}
}

// sampleClusterLag reads every replica's /status every 20 ms and keeps,
// for each transaction it has not seen there before, the lag the replica
// reports for the last transaction it applied.
func sampleClusterLag(ctx context.Context, cfg *Config, c *testingutil.Cluster, start time.Time, p *phase) {
	last := map[string]uint64{}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, r := range cfg.replicas() {
			code, body, err := c.Node(nodeName(r)).AdminGet("/status")
			if err != nil || code != http.StatusOK {
				continue
			}
			var st regiond.Status
			if json.Unmarshal(body, &st) != nil {
				continue
			}
			for _, db := range st.Databases {
				if db.Name != "app.db" || db.TXID <= last[r] || db.CommittedAt.IsZero() || db.AppliedAt.IsZero() {
					continue
				}
				last[r] = db.TXID
				p.lagCluster = append(p.lagCluster, lagSample{region: r, at: db.CommittedAt.Sub(start), lag: db.AppliedAt.Sub(db.CommittedAt)})
			}
		}
	}
}

// central runs the workload against the baseline: the same app on one
// SQLite database in the primary's region (no regiond, no FUSE), every
// client outside that region reaching it across the simulated WAN.
func central(ctx context.Context, tb testingutil.TB, cfg *Config, app string) (*phase, error) {
	dir := tb.TempDir()
	addr := testingutil.FreeAddr(tb)
	cmd := exec.Command(app, "-db", filepath.Join(dir, "app.db"), "-listen", addr)
	cmd.Env = append(os.Environ(), "MERIDIAN_REGION="+cfg.Primary, "MERIDIAN_NODE=central")
	logf, err := os.Create(filepath.Join(dir, "app.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	testingutil.DieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("the central app %s: %w", app, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	tb.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	base := "http://" + addr
	if err := testingutil.WaitHTTP(ctx, base+"/healthz", 30*time.Second); err != nil {
		return nil, fmt.Errorf("the central app: %w", err)
	}
	targets := map[string]target{cfg.Primary: {base: base, central: true}}
	for _, r := range cfg.replicas() {
		listen, err := testingutil.LatencyProxy(tb, nil, r+"-central", addr, cfg.oneWay(r, cfg.Primary))
		if err != nil {
			return nil, fmt.Errorf("the proxy from %s to the central app: %w", r, err)
		}
		targets[r] = target{base: "http://" + listen, central: true}
	}
	maxID, err := seed(ctx, base)
	if err != nil {
		return nil, err
	}
	p := &phase{name: "central"}
	start := time.Now()
	p.ops = workload(ctx, cfg, targets, maxID)
	p.elapsed = time.Since(start)
	p.steps = loadSteps(ctx, cfg, targets, maxID)
	if errors.Is(ctx.Err(), context.Canceled) {
		return nil, ctx.Err()
	}
	return p, nil
}

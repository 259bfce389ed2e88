package main

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/internal/testingutil/roles"
)

// The lease settings of the failover phase (lease.check_ttl and
// lease.lock_delay): bench/failover measures others.
const (
	failoverCheckTTL  = time.Second
	failoverLockDelay = 500 * time.Millisecond
	// failoverWriteEvery is how often each region's writer writes.
	failoverWriteEvery = 25 * time.Millisecond
)

// failover is what the failover phase measured.
type failover struct {
	kills  []kill
	writes []op // every region's writer, through its own router
	end    time.Duration
}

// kill is one crash of the primary.
type kill struct {
	node string
	at   time.Duration // from the start of the phase
	// first is how long after the kill a write sent after it was first
	// acknowledged, through any region's router; next the primary then.
	first time.Duration
	next  string
	// regions is, per region, how long after the kill its writer's first
	// acknowledged write sent after the kill came back.
	regions map[string]time.Duration
}

// failoverPhase runs a cluster like replicated's on the Consul lease,
// every node a candidate, with one writer per region writing through its
// own router every failoverWriteEvery, and kills the primary (SIGKILL)
// cfg.Kills times, each time restarting it once another node took writes
// and waiting until it is a replica again.
func failoverPhase(ctx context.Context, tb testingutil.TB, cfg *Config, exe, app string) (*failover, error) {
	agent := testingutil.StartConsul(tb)
	command := func(args ...string) *exec.Cmd { return exec.Command(exe, args...) }
	var specs []testingutil.ClusterNodeSpec
	for _, r := range cfg.Regions {
		specs = append(specs, testingutil.ClusterNodeSpec{Name: nodeName(r), Region: r, App: []string{app}})
	}
	c := testingutil.NewCluster(tb, command, "", specs...)
	c.UseConsul(agent.URL, "check_ttl: "+failoverCheckTTL.String(), "lock_delay: "+failoverLockDelay.String())
	if err := c.DelayLinks(tb, func(from, to *testingutil.ClusterNode) time.Duration {
		return cfg.oneWay(from.Region, to.Region)
	}); err != nil {
		return nil, err
	}
	c.Start(tb)
	primary, epoch := roles.WaitOnePrimary(tb, c, 0, time.Minute)
	if _, err := seed(ctx, primary.RouterURL()); err != nil {
		return nil, err
	}
	for _, n := range c.Nodes {
		if err := testingutil.WaitHTTP(ctx, "http://"+n.Admin+"/readyz", time.Minute); err != nil {
			return nil, fmt.Errorf("%s: %w", n.Name, err)
		}
	}

	fo := &failover{}
	start := time.Now()
	wctx, stopWriters := context.WithCancel(ctx)
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	for _, n := range c.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hc := &http.Client{Timeout: 30 * time.Second}
			for wctx.Err() == nil {
				o := op{region: n.Region, kind: kindWrite, at: time.Since(start)}
				began := time.Now()
				_, err := post(wctx, hc, n.RouterURL(), "failover-"+n.Region)
				o.took = time.Since(began)
				if wctx.Err() != nil {
					return
				}
				if err != nil {
					o.err = err.Error()
				}
				mu.Lock()
				fo.writes = append(fo.writes, o)
				mu.Unlock()
				select {
				case <-wctx.Done():
				case <-time.After(failoverWriteEvery):
				}
			}
		}()
	}
	var err error
	for range cfg.Kills {
		time.Sleep(time.Second)
		k := kill{node: primary.Name, at: time.Since(start), regions: map[string]time.Duration{}}
		primary.Kill(tb)
		// The first acknowledged writes sent after the kill, per region.
		deadline := time.Now().Add(time.Minute)
		for {
			mu.Lock()
			for _, o := range fo.writes {
				if o.err == "" && o.at > k.at {
					if _, ok := k.regions[o.region]; !ok {
						k.regions[o.region] = o.at + o.took - k.at
					}
				}
			}
			mu.Unlock()
			_, back := k.regions[primary.Region]
			if len(k.regions) == len(cfg.Regions)-1 && !back || len(k.regions) == len(cfg.Regions) {
				break
			}
			if time.Now().After(deadline) {
				err = fmt.Errorf("kill of %s at %v: after a minute, writes were acknowledged again only in %s", k.node, k.at.Round(time.Millisecond), strings.Join(slices.Sorted(maps.Keys(k.regions)), ", "))
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			break
		}
		k.first = slices.Min(slices.Collect(maps.Values(k.regions)))
		next, e := roles.WaitOnePrimary(tb, c, epoch, time.Minute)
		k.next, epoch = next.Name, e
		fo.kills = append(fo.kills, k)
		tb.Logf("failover: %s killed at %v; writes acknowledged again %v later (%s primary)", k.node, k.at.Round(time.Millisecond), k.first.Round(time.Millisecond), k.next)
		primary.Start(tb)
		if err = testingutil.WaitHTTP(ctx, "http://"+primary.Admin+"/readyz", time.Minute); err != nil {
			err = fmt.Errorf("%s, restarted after its kill: %w", primary.Name, err)
			break
		}
		primary = next
	}
	stopWriters()
	wg.Wait()
	fo.end = time.Since(start)
	return fo, err
}

// markdown writes the failover section of the report.
func (fo *failover) markdown(b *strings.Builder) {
	f := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	f("\n## Failover\n\n")
	f("Measured in a phase of its own after the workloads (not during them): the same regions and latencies on the Consul lease (a Consul agent on loopback, reached without WAN delay; every node a candidate; `check_ttl: %v`, `lock_delay: %v`), a writer in every region writing through its own router every %v, and the primary killed with SIGKILL %d times (restarted, and a replica again, before the next kill). *First write*: from the kill to the first acknowledged write sent after it, in any region; per region, the same for that region's writer (the forwarded write's round trip to the new primary included; the killed node's region is left out of its own kill: its router is down until its node is back).\n\n", failoverCheckTTL, failoverLockDelay, failoverWriteEvery, len(fo.kills))
	var firsts []time.Duration
	per := map[string][]time.Duration{}
	for _, k := range fo.kills {
		firsts = append(firsts, k.first)
		for r, d := range k.regions {
			per[r] = append(per[r], d)
		}
	}
	f("| | kills | p50 ms | p99 ms | max ms |\n| --- | ---: | ---: | ---: | ---: |\n")
	s := summarize(firsts)
	f("| first write, any region | %d | %s | %s | %s |\n", s.n, ms(s.p50), ms(s.p99), ms(s.max))
	for _, r := range slices.Sorted(maps.Keys(per)) {
		s := summarize(per[r])
		f("| first write from %s | %d | %s | %s | %s |\n", r, s.n, ms(s.p50), ms(s.p99), ms(s.max))
	}
	failed := 0
	for _, o := range fo.writes {
		if o.err != "" {
			failed++
		}
	}
	f("\nThe writers made %d writes, %d of them failed (%s).\n", len(fo.writes), failed, percent(failed, len(fo.writes)))
	f("\n| kill | node killed | at s | first write ms | next primary |\n| ---: | --- | ---: | ---: | --- |\n")
	for i, k := range fo.kills {
		f("| %d | %s | %.1f | %s | %s |\n", i+1, k.node, k.at.Seconds(), ms(k.first), k.next)
	}
}

// plot draws the failover timeline, two panels wide: each region's
// writes at the time their answer came and their latency (acknowledged:
// dots; failed: crosses), the kills as dashed vertical lines.
func (fo *failover) plot(path string, cfg *Config) error {
	p := plot.New()
	p.Title.Text = "failover: writes through each region's router, the primary killed at the dashed lines"
	p.X.Label.Text = "time into the phase, s"
	p.Y.Label.Text = "write latency, ms (log)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	top := 1.0
	for _, o := range fo.writes {
		top = max(top, float64(o.took)/float64(time.Millisecond))
	}
	p.Y.Min, p.Y.Max = 0.1, top*100 // the room above the writes is the legend's
	for i, r := range cfg.Regions {
		var ok, failed plotter.XYs
		for _, o := range fo.writes {
			if o.region != r {
				continue
			}
			xy := plotter.XY{X: (o.at + o.took).Seconds(), Y: max(0.1, float64(o.took)/float64(time.Millisecond))}
			if o.err != "" {
				failed = append(failed, xy)
			} else {
				ok = append(ok, xy)
			}
		}
		c := palette[i%len(palette)]
		for _, set := range []struct {
			xy    plotter.XYs
			shape draw.GlyphDrawer
			label string
		}{{ok, draw.CircleGlyph{}, r + ": acknowledged"}, {failed, draw.CrossGlyph{}, r + ": failed"}} {
			if len(set.xy) == 0 {
				continue
			}
			s, err := plotter.NewScatter(set.xy)
			if err != nil {
				return err
			}
			s.Color, s.Radius, s.Shape = c, vg.Points(1.5), set.shape
			p.Add(s)
			p.Legend.Add(set.label, s)
		}
	}
	for _, k := range fo.kills {
		l, err := plotter.NewLine(plotter.XYs{{X: k.at.Seconds(), Y: 0.1}, {X: k.at.Seconds(), Y: top * 100}})
		if err != nil {
			return err
		}
		l.Color, l.Dashes = red, []vg.Length{vg.Points(2), vg.Points(2)}
		p.Add(l)
	}
	p.Legend.Top, p.Legend.Left = true, true
	return savePanels(path, [][]*plot.Plot{{p}}, 2)
}

package main

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// Plot geometry: each panel is panelW × panelH at plotDPI, so a PNG of
// n panels in a row is n·panelW·plotDPI/72 pixels wide.
const (
	panelW  = 5 * vg.Inch
	panelH  = 4 * vg.Inch
	plotDPI = 96
)

// panelPixels is the size in pixels of one panel.
func panelPixels() (w, h int) {
	return int(math.Round(float64(panelW) * plotDPI / 72)), int(math.Round(float64(panelH) * plotDPI / 72))
}

// summary is p50, p99 and max of a set of durations.
type summary struct {
	n             int
	p50, p99, max time.Duration
}

func summarize(d []time.Duration) summary {
	if len(d) == 0 {
		return summary{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) time.Duration { return s[max(0, int(math.Ceil(p*float64(len(s))))-1)] }
	return summary{n: len(s), p50: q(0.5), p99: q(0.99), max: s[len(s)-1]}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)) }

func (s summary) String() string {
	if s.n == 0 {
		return "–"
	}
	return ms(s.p50) + " / " + ms(s.p99) + " / " + ms(s.max)
}

// latencies are the durations of p's successful requests of kind from
// region.
func (p *phase) latencies(region, kind string) []time.Duration {
	var out []time.Duration
	for _, o := range p.ops {
		if o.region == region && o.kind == kind && o.err == "" {
			out = append(out, o.took)
		}
	}
	return out
}

// counts of p's requests from region ("" for all): reads (both kinds),
// those served in the client's region, and errors.
func (p *phase) counts(region string) (reads, local, errs, total int) {
	for _, o := range p.ops {
		if region != "" && o.region != region {
			continue
		}
		total++
		if o.err != "" {
			errs++
			continue
		}
		if o.kind != kindWrite {
			reads++
			if o.local {
				local++
			}
		}
	}
	return
}

func (p *phase) notYet(region string) int {
	n := 0
	for _, o := range p.ops {
		if o.region == region && o.notYet {
			n++
		}
	}
	return n
}

func (p *phase) rywWaits(region string) (waits []time.Duration, toPrimary int) {
	for _, o := range p.ops {
		if o.region == region && o.kind == kindRYW && o.err == "" {
			waits = append(waits, o.rywWait)
			if o.rywPrimary {
				toPrimary++
			}
		}
	}
	return
}

func lags(s []lagSample, region string) []time.Duration {
	var out []time.Duration
	for _, l := range s {
		if l.region == region {
			out = append(out, l.lag)
		}
	}
	return out
}

// firstErrors lists up to n distinct error messages of p.
func (p *phase) firstErrors(n int) []string {
	var out []string
	for _, o := range p.ops {
		if o.err != "" && !slices.Contains(out, o.err) && len(out) < n {
			out = append(out, o.err)
		}
	}
	return out
}

// windowSpread is the noise figure of p: the run cut into windows, the
// largest relative distance of a window's p50 (of kind from region) from
// the whole run's p50, over every region and kind with enough requests.
func (p *phase) windowSpread(windows int) float64 {
	worst := 0.0
	w := p.elapsed / time.Duration(windows)
	if w <= 0 {
		return 0
	}
	kinds := []string{kindRead, kindWrite}
	regions := map[string]bool{}
	for _, o := range p.ops {
		regions[o.region] = true
	}
	for r := range regions {
		for _, k := range kinds {
			whole := summarize(p.latencies(r, k)).p50
			if whole == 0 {
				continue
			}
			for i := range windows {
				var d []time.Duration
				for _, o := range p.ops {
					if o.region == r && o.kind == k && o.err == "" && o.at >= time.Duration(i)*w && o.at < time.Duration(i+1)*w {
						d = append(d, o.took)
					}
				}
				if len(d) < 10 {
					continue
				}
				worst = max(worst, math.Abs(float64(summarize(d).p50-whole))/float64(whole))
			}
		}
	}
	return worst
}

// Report is what a run writes: the Markdown report and its plots.
type Report struct {
	Markdown string   // the report's path
	Plots    []string // the PNG files' paths
}

// writeReport writes the report of a run to dir/<name>.md and its plots
// to dir/<name>/.
func writeReport(dir, name string, cfg *Config, machine, command string, rep, cen *phase, fo *failover) (*Report, error) {
	plotDir := filepath.Join(dir, name)
	if err := os.MkdirAll(plotDir, 0o755); err != nil {
		return nil, err
	}
	out := &Report{Markdown: filepath.Join(dir, name+".md")}
	var b strings.Builder
	f := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }

	f("# Cross-region benchmark: %s\n\n", name)
	f("Meridian (a regiond per region, the example app behind each region's router, %s holding the lease) against a central database (the same app on one SQLite file in %s, every request from another region crossing the WAN), the same workload, in one run.\n\n", cfg.Primary, cfg.Primary)
	f("Machine: %s.\n\nCommand: `%s`\n\n", machine, command)

	f("## Configuration\n\n")
	f("| region | stands for | clients |\n| --- | --- | ---: |\n")
	for _, r := range cfg.Regions {
		role := ""
		if r == cfg.Primary {
			role = " (primary)"
		}
		f("| %s%s | %s | %d |\n", r, role, orDash(awsRegion[r]), cfg.Clients[r])
	}
	f("\nRound trips between the regions (each direction delayed by half with toxiproxy, on replication, router-to-router and client-to-central links; a client and its own region's router are on loopback):\n\n")
	f("| | %s |\n|---|%s\n", strings.Join(cfg.Regions, " | "), strings.Repeat("---:|", len(cfg.Regions)))
	for _, a := range cfg.Regions {
		f("| %s |", a)
		for _, c := range cfg.Regions {
			if a == c {
				f(" – |")
			} else {
				f(" %v |", cfg.RTT[pair(a, c)])
			}
		}
		f("\n")
	}
	f("\nWorkload: each client runs a closed loop for %v per architecture, %v between requests; %.0f%% of its requests are writes (POST /entries), each followed by a read of the entry it wrote (with its read-your-writes token through a router), the rest reads of a random entry (GET /api/entries/{id}). Lag probe: a row committed on the primary's app every %v. Seed %d.\n\n", cfg.Duration, cfg.Think, 100*cfg.WriteFraction, cfg.ProbeEvery, cfg.Seed)

	f("## Latency by client region\n\n")
	f("p50 / p99 / max in ms; n is the number of requests; *not there yet*: reads of a random entry written through another region moments before that the client's region did not have yet (404; a replica is behind by its lag: not an error, counted apart). A write from the primary's region is local; from any other region, Meridian forwards it from the client's router to the primary's.\n\n")
	f("| client in | architecture | reads (n) | read latency | writes (n) | write latency | read of own write | RYW wait at the router | errors |\n")
	f("| --- | --- | ---: | --- | ---: | --- | --- | --- | ---: |\n")
	for _, r := range cfg.Regions {
		for _, p := range []*phase{rep, cen} {
			reads, writes, ryws := p.latencies(r, kindRead), p.latencies(r, kindWrite), p.latencies(r, kindRYW)
			_, _, errs, _ := p.counts(r)
			wait := "–"
			if p == rep {
				w, toPrimary := p.rywWaits(r)
				wait = summarize(w).String()
				if toPrimary > 0 {
					wait += fmt.Sprintf(" (%d sent to the primary)", toPrimary)
				}
			}
			n := fmt.Sprint(len(reads))
			if k := p.notYet(r); k > 0 {
				n += fmt.Sprintf(" (%d not there yet)", k)
			}
			f("| %s | %s | %s | %s | %d | %s | %s | %s | %d |\n", r, p.name, n, summarize(reads), len(writes), summarize(writes), summarize(ryws), wait, errs)
		}
	}

	f("\n## Replication lag\n\n")
	f("From the commit on the primary to visibility in each region, in ms (p50 / p99 / max). *Bench*: the lag probe's row, from the primary app's answer to the first read in the region's app that finds it (polled every millisecond). *Cluster*: the cluster's own figure, each replica's `/status` `applied_at − committed_at` for the transactions it reported (sampled every 20 ms; the `meridian.replication.lag` histogram holds the same figure).\n\n")
	f("| region | one way from %s | bench (n) | bench | cluster (n) | cluster |\n| --- | ---: | ---: | --- | ---: | --- |\n", cfg.Primary)
	for _, r := range cfg.replicas() {
		lb, lc := lags(rep.lagBench, r), lags(rep.lagCluster, r)
		f("| %s | %v | %d | %s | %d | %s |\n", r, cfg.oneWay(cfg.Primary, r), len(lb), summarize(lb), len(lc), summarize(lc))
	}

	f("\n## Throughput\n\n| architecture | requests | per second | reads served in the client's region | errors |\n| --- | ---: | ---: | ---: | ---: |\n")
	for _, p := range []*phase{rep, cen} {
		reads, local, errs, total := p.counts("")
		f("| %s | %d | %.1f | %s | %d |\n", p.name, total, float64(total)/p.elapsed.Seconds(), percent(local, reads), errs)
	}
	f("\nThe clients are a closed loop with think time, so these requests per second follow from the latencies; the steps below load each architecture with no think time.\n")
	if len(cfg.LoadSteps) > 0 {
		writeSteps(&b, cfg, rep, cen)
	}
	for _, p := range []*phase{rep, cen} {
		if errs := p.firstErrors(5); len(errs) > 0 {
			f("\nErrors of %s:\n\n", p.name)
			for _, e := range errs {
				f("- `%s`\n", e)
			}
		}
	}

	if fo != nil {
		fo.markdown(&b)
	}

	f("\n## Noise\n\n")
	f("Each workload cut into 5 windows of equal time: the p50 of reads and writes of every client region in a window differs from the whole run's by at most %.0f%% (replicated) and %.0f%% (central). Figures of two runs of the same configuration within that are the same.\n", 100*rep.windowSpread(5), 100*cen.windowSpread(5))

	f("\n## Plots\n\n")
	cdf := filepath.Join(plotDir, "latency-cdf.png")
	if err := plotCDFs(cdf, cfg, rep, cen); err != nil {
		return nil, err
	}
	lag := filepath.Join(plotDir, "lag.png")
	if err := plotLag(lag, cfg, rep); err != nil {
		return nil, err
	}
	out.Plots = append(out.Plots, cdf, lag)
	f("![Latency CDFs per client region](%s/latency-cdf.png)\n\n![Replication lag over time](%s/lag.png)\n", name, name)
	if fo != nil {
		timeline := filepath.Join(plotDir, "failover.png")
		if err := fo.plot(timeline, cfg); err != nil {
			return nil, err
		}
		out.Plots = append(out.Plots, timeline)
		f("\n![Failover timeline](%s/failover.png)\n", name)
	}
	if err := os.WriteFile(out.Markdown, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	return out, nil
}

func orDash(s string) string {
	if s == "" {
		return "–"
	}
	return s
}

func percent(a, b int) string {
	if b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(a)/float64(b))
}

// cdf is the empirical distribution of d in ms, at most 400 points.
func cdf(d []time.Duration) plotter.XYs {
	s := slices.Clone(d)
	slices.Sort(s)
	step := max(1, len(s)/400)
	var xy plotter.XYs
	for i := 0; i < len(s); i += step {
		xy = append(xy, plotter.XY{X: max(0.01, float64(s[i])/float64(time.Millisecond)), Y: float64(i+1) / float64(len(s))})
	}
	if len(s) > 0 && (len(s)-1)%step != 0 {
		xy = append(xy, plotter.XY{X: max(0.01, float64(s[len(s)-1])/float64(time.Millisecond)), Y: 1})
	}
	return xy
}

var (
	blue   = color.RGBA{R: 31, G: 119, B: 180, A: 255}
	orange = color.RGBA{R: 255, G: 127, B: 14, A: 255}
	green  = color.RGBA{R: 44, G: 160, B: 44, A: 255}
	red    = color.RGBA{R: 214, G: 39, B: 40, A: 255}
	purple = color.RGBA{R: 148, G: 103, B: 189, A: 255}
)

var palette = []color.Color{blue, orange, green, red, purple}

// plotCDFs draws, per client region, the latency CDFs of reads and
// writes for both architectures, on a log scale, panels in a row.
func plotCDFs(path string, cfg *Config, rep, cen *phase) error {
	var row []*plot.Plot
	for _, r := range cfg.Regions {
		p := plot.New()
		p.Title.Text = "clients in " + r
		if r == cfg.Primary {
			p.Title.Text += " (primary)"
		}
		p.X.Label.Text = "latency, ms (log)"
		p.Y.Label.Text = "fraction of requests"
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
		// The room above 1 is the legend's.
		p.Y.Min, p.Y.Max = 0, 1.3
		p.Y.Tick.Marker = plot.ConstantTicks{{Value: 0, Label: "0"}, {Value: 0.25, Label: "0.25"}, {Value: 0.5, Label: "0.5"}, {Value: 0.75, Label: "0.75"}, {Value: 1, Label: "1"}}
		p.Legend.Top, p.Legend.Left = true, true
		for i, s := range []struct {
			ph     *phase
			kind   string
			label  string
			dashes []vg.Length
		}{
			{rep, kindRead, "Meridian read", nil},
			{cen, kindRead, "central read", []vg.Length{vg.Points(4), vg.Points(2)}},
			{rep, kindWrite, "Meridian write", nil},
			{cen, kindWrite, "central write", []vg.Length{vg.Points(4), vg.Points(2)}},
		} {
			xy := cdf(s.ph.latencies(r, s.kind))
			if len(xy) == 0 {
				continue
			}
			l, err := plotter.NewLine(xy)
			if err != nil {
				return err
			}
			l.Color = palette[i/2*2]
			if s.ph == cen {
				l.Color = palette[i/2*2+1]
			}
			l.Width = vg.Points(1.5)
			l.Dashes = s.dashes
			p.Add(l)
			p.Legend.Add(s.label, l)
		}
		row = append(row, p)
	}
	return savePanels(path, [][]*plot.Plot{row}, 1)
}

// plotLag draws the bench's lag samples over time, one series per
// replica region.
func plotLag(path string, cfg *Config, rep *phase) error {
	p := plot.New()
	p.Title.Text = "replication lag from " + cfg.Primary + " (bench probe)"
	p.X.Label.Text = "time into the run, s"
	p.Y.Label.Text = "lag, ms"
	p.Y.Min = 0
	top := 0.0
	for _, l := range rep.lagBench {
		top = max(top, float64(l.lag)/float64(time.Millisecond))
	}
	p.Y.Max = top * 1.4 // the room above the samples is the legend's
	for i, r := range cfg.replicas() {
		var xy plotter.XYs
		for _, l := range rep.lagBench {
			if l.region == r {
				xy = append(xy, plotter.XY{X: l.at.Seconds(), Y: float64(l.lag) / float64(time.Millisecond)})
			}
		}
		slices.SortFunc(xy, func(a, b plotter.XY) int { return int(math.Copysign(1, a.X-b.X)) })
		if len(xy) == 0 {
			continue
		}
		l, s, err := plotter.NewLinePoints(xy)
		if err != nil {
			return err
		}
		l.Color, s.Color = palette[i%len(palette)], palette[i%len(palette)]
		s.Radius = vg.Points(1.5)
		p.Add(l, s)
		p.Legend.Add(fmt.Sprintf("%s (one way %v)", r, cfg.oneWay(cfg.Primary, r)), l, s)
	}
	p.Legend.Top = true
	return savePanels(path, [][]*plot.Plot{{p}}, 1)
}

// savePanels draws plots as a grid of panels, each wide times panelW
// wide and panelH high, into a PNG.
func savePanels(path string, plots [][]*plot.Plot, wide int) error {
	rows, cols := len(plots), len(plots[0])
	img := vgimg.NewWith(vgimg.UseWH(panelW*vg.Length(cols*wide), panelH*vg.Length(rows)), vgimg.UseDPI(plotDPI))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Millimeter * 4, PadY: vg.Millimeter * 4, PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 2}
	canvases := plot.Align(plots, tiles, dc)
	for i := range plots {
		for j := range plots[i] {
			plots[i][j].Draw(canvases[i][j])
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// keepUp bounds how long after the end of a step its last answer may
// come for the architecture to count as keeping up with the step (no
// queue building).
const keepUp = time.Second

// localShareTarget is the share of reads served in the client's region
// the throughput figure is taken at.
const localShareTarget = 0.8

// writeSteps writes the throughput steps of both architectures and the
// highest throughput of each with at least localShareTarget of the reads
// served in the client's region.
func writeSteps(b *strings.Builder, cfg *Config, rep, cen *phase) {
	f := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	f("\n### Throughput steps\n\n")
	f("After each workload, the same mix offered open loop: every region sends %s requests a second (evenly spaced, each sent when its time comes, whatever the ones before it are doing; a write's read of its entry follows it), %v a step. Served: requests answered without error, per second of the step (every request sent in the step is waited for). Latencies p50 / p99 in ms over every region.\n\n", joinInts(cfg.LoadSteps), cfg.StepDuration)
	f("| offered per region | architecture | served per second | reads served in the client's region | read latency | write latency | last answer after the step, ms | errors |\n| ---: | --- | ---: | ---: | --- | --- | ---: | ---: |\n")
	best := map[string]float64{}
	atLast := map[string]bool{} // the best is the highest step tried
	for i := range cfg.LoadSteps {
		for _, p := range []*phase{rep, cen} {
			if i >= len(p.steps) {
				continue
			}
			s := p.steps[i]
			q := &phase{ops: s.ops}
			reads, local, errs, total := q.counts("")
			var rl, wl []time.Duration
			for _, r := range cfg.Regions {
				rl = append(rl, q.latencies(r, kindRead)...)
				wl = append(wl, q.latencies(r, kindWrite)...)
			}
			// Keeping up: the last answer came within keepUp of the end of
			// the step, so no queue was building.
			var last time.Duration
			for _, o := range s.ops {
				last = max(last, o.at+o.took)
			}
			drain := max(0, last-s.elapsed)
			rps := float64(total-errs) / s.elapsed.Seconds()
			f("| %d | %s | %.1f | %s | %s | %s | %s | %d |\n", s.rate, p.name, rps, percent(local, reads), p50p99(rl), p50p99(wl), ms(drain), errs)
			if reads > 0 && float64(local) >= localShareTarget*float64(reads) && errs == 0 && drain <= keepUp {
				if rps > best[p.name] {
					best[p.name], atLast[p.name] = rps, i == len(cfg.LoadSteps)-1
				}
			}
		}
	}
	for _, p := range []*phase{rep, cen} {
		q := &phase{name: p.name}
		for _, s := range p.steps {
			q.ops = append(q.ops, s.ops...)
		}
		if errs := q.firstErrors(5); len(errs) > 0 {
			f("\nErrors of %s in the steps (the first, distinct):\n\n", p.name)
			for _, e := range errs {
				f("- `%s`\n", e)
			}
		}
	}
	f("\nThe highest throughput with at least %.0f%% of the reads served in the client's region, no errors, and the last answer within %v of the step's end: ", 100*localShareTarget, keepUp)
	var parts []string
	for _, p := range []*phase{rep, cen} {
		if v, ok := best[p.name]; ok {
			part := fmt.Sprintf("%s %.1f requests per second", p.name, v)
			if atLast[p.name] {
				part += " (at the highest step tried: more steps find where it stops)"
			}
			parts = append(parts, part)
		} else {
			parts = append(parts, fmt.Sprintf("%s: no step (it serves locally only the reads of the clients in %s)", p.name, cfg.Primary))
		}
	}
	f("%s.\n", strings.Join(parts, "; "))
}

func p50p99(d []time.Duration) string {
	s := summarize(d)
	if s.n == 0 {
		return "–"
	}
	return ms(s.p50) + " / " + ms(s.p99)
}

func joinInts(v []int) string {
	var s []string
	for _, n := range v {
		s = append(s, fmt.Sprint(n))
	}
	return strings.Join(s, ", ")
}

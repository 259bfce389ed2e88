package main

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// minMountWriteRate is the floor for mount write tx/s wherever bare
// manages more.
const minMountWriteRate = 1000

// capture is what the FUSE capture left in data_dir/dbs/bench.db/ltx/
// after the last run of a measurement on a regiond mount. LTX files are
// the files in the log: standalone .ltx files and those appended to
// segments, one record each in the segment's .index.
type capture struct {
	Commits  int    `json:"measured_commits"` // timed write transactions
	Setup    int    `json:"setup_commits"`    // CREATE TABLE, and the load for reads
	Expected int    `json:"expected_ltx"`     // Commits + Setup, + 1 in WAL mode (the switch to WAL)
	Files    int    `json:"ltx_files"`        // LTX files in the log after the run
	Before   int    `json:"ltx_files_before"` // LTX files after removing the database, before the run
	Pos      string `json:"pos,omitempty"`    // mount_dir/bench.db-pos after the run, if readable
}

// result is one workload in one mode: a sample per round on each side.
type result struct {
	Workload        workload
	Mode            mode
	Bare            []sample
	Mount           []sample
	Baseline        []sample // the -baseline regiond's mount
	Fuse            []sample // the passthrough mount, without capture
	Capture         *capture
	BaselineCapture *capture
}

// goal is the target for a result: mount/bare ratio, and for writes the
// mount rate floor.
type goal struct {
	MinRatio float64 `json:"min_ratio"`
	MinRate  float64 `json:"min_mount_rate,omitempty"`
}

func (r *result) goal() goal {
	switch {
	case r.Workload.isRead():
		return goal{MinRatio: 0.9}
	case r.Mode.Sync == "NORMAL" || r.Mode.Sync == "OFF":
		return goal{MinRatio: 0.5, MinRate: minMountWriteRate}
	default:
		return goal{MinRatio: 0.8, MinRate: minMountWriteRate}
	}
}

func (g goal) String() string {
	s := fmt.Sprintf("≥%.2f", g.MinRatio)
	if g.MinRate > 0 {
		s += fmt.Sprintf(", ≥%s/s", commas(g.MinRate))
	}
	return s
}

// summary is the medians across rounds of one side.
type summary struct {
	Rate  float64 `json:"rate"`
	P50us float64 `json:"p50_us"`
	P99us float64 `json:"p99_us"`
	// CPUPerWriteUS is the daemon's CPU time per write transaction, on a
	// regiond mount in a write workload.
	CPUPerWriteUS *float64        `json:"daemon_cpu_us_per_write,omitempty"`
	Rounds        []sampleSummary `json:"rounds"`
}

type sampleSummary struct {
	Ops      int     `json:"ops"`
	Seconds  float64 `json:"seconds"`
	Rate     float64 `json:"rate"`
	P50us    float64 `json:"p50_us"`
	P99us    float64 `json:"p99_us"`
	SetupTxs int     `json:"setup_commits"`
	// The daemon's CPU time, user and system, during the run, and the
	// write transactions it covers, on a regiond mount.
	DaemonCPUus *float64 `json:"daemon_cpu_us,omitempty"`
	Writes      int      `json:"writes,omitempty"`
}

func summarize(ss []sample) *summary {
	if len(ss) == 0 {
		return nil
	}
	var rates, p50s, p99s, cpus []float64
	s := &summary{}
	for _, x := range ss {
		rates, p50s, p99s = append(rates, x.Rate()), append(p50s, us(x.P50)), append(p99s, us(x.P99))
		round := sampleSummary{Ops: x.Ops, Seconds: x.Elapsed.Seconds(), Rate: x.Rate(), P50us: us(x.P50), P99us: us(x.P99), SetupTxs: x.Setup, Writes: x.Writes}
		if x.HasCPU {
			cpu := us(x.DaemonCPU)
			round.DaemonCPUus = &cpu
		}
		if c, ok := x.cpuPerWrite(); ok {
			cpus = append(cpus, us(c))
		}
		s.Rounds = append(s.Rounds, round)
	}
	s.Rate, s.P50us, s.P99us = median(rates), median(p50s), median(p99s)
	if len(cpus) > 0 {
		c := median(cpus)
		s.CPUPerWriteUS = &c
	}
	return s
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func median(xs []float64) float64 {
	xs = slices.Clone(xs)
	slices.Sort(xs)
	n := len(xs)
	if n%2 == 1 {
		return xs[n/2]
	}
	return (xs[n/2-1] + xs[n/2]) / 2
}

// verdict compares the medians with the goal; ok is false without a mount
// side.
func (r *result) verdict() (ratio float64, meets, ok bool) {
	b, m := summarize(r.Bare), summarize(r.Mount)
	if b == nil || m == nil {
		return 0, false, false
	}
	g := r.goal()
	ratio = m.Rate / b.Rate
	meets = ratio >= g.MinRatio && (g.MinRate == 0 || b.Rate <= g.MinRate || m.Rate >= g.MinRate)
	return ratio, meets, true
}

// machine describes where the benchmark ran.
type machine struct {
	GOMAXPROCS    int    `json:"gomaxprocs"`
	NumCPU        int    `json:"num_cpu"`
	Kernel        string `json:"kernel"`
	Dir           string `json:"dir"`
	DirFS         string `json:"dir_fs"`
	SQLite        string `json:"sqlite"`
	Go            string `json:"go"`
	LoadAvg       string `json:"loadavg"` // /proc/loadavg at the start: 1, 5, 15 minutes
	Regiond       string `json:"regiond,omitempty"`
	RegiondBuilt  string `json:"regiond_built,omitempty"`
	RegiondCommit string `json:"regiond_commit,omitempty"`
	// The -baseline regiond, if any.
	Baseline       string `json:"baseline,omitempty"`
	BaselineBuilt  string `json:"baseline_built,omitempty"`
	BaselineCommit string `json:"baseline_commit,omitempty"`
}

func describeMachine(dir, regiond, baseline string) machine {
	m := machine{GOMAXPROCS: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(), Dir: dir, Go: runtime.Version()}
	var u unix.Utsname
	if err := unix.Uname(&u); err == nil {
		m.Kernel = fmt.Sprintf("%s %s %s", unix.ByteSliceToString(u.Sysname[:]), unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Machine[:]))
	}
	if data, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(data)); len(f) >= 3 {
			m.LoadAvg = strings.Join(f[:3], " ")
		}
	}
	if e, err := mountOf(dir); err == nil {
		m.DirFS = fmt.Sprintf("%s (%s on %s)", e.FSType, e.Source, e.Point)
	}
	if db, err := sql.Open("sqlite3", ":memory:"); err == nil {
		_ = db.QueryRow("SELECT sqlite_version()").Scan(&m.SQLite)
		_ = db.Close()
	}
	if regiond != "" {
		m.Regiond = regiond
		m.RegiondBuilt, m.RegiondCommit = describeBinary(regiond)
	}
	if baseline != "" {
		m.Baseline = baseline
		m.BaselineBuilt, m.BaselineCommit = describeBinary(baseline)
	}
	return m
}

// describeBinary returns when the binary at path was built (its mtime) and
// the commit of the git tree it sits in (bin/regiond sits in the
// repository), each "" if unknown: a binary outside a tree, e.g. in /tmp,
// has no commit.
func describeBinary(path string) (built, commit string) {
	if fi, err := os.Stat(path); err == nil {
		built = fi.ModTime().Format(time.RFC3339)
	}
	git := func(args ...string) ([]byte, error) {
		cmd := exec.Command("git", args...)
		cmd.Dir = filepath.Dir(path)
		return cmd.Output()
	}
	if out, err := git("rev-parse", "--short", "HEAD"); err == nil {
		commit = strings.TrimSpace(string(out))
		if st, err := git("status", "--porcelain", "--untracked-files=no"); err == nil && len(st) > 0 {
			commit += " (uncommitted changes in the tree)"
		}
	}
	return built, commit
}

func printHeader(w io.Writer, m machine, o options) {
	fmt.Fprintf(w, "machine: GOMAXPROCS=%d (NumCPU %d), load average %s, kernel %s, -dir %s on %s, SQLite %s, %s\n",
		m.GOMAXPROCS, m.NumCPU, m.LoadAvg, m.Kernel, m.Dir, m.DirFS, m.SQLite, m.Go)
	if m.Regiond != "" {
		fmt.Fprintf(w, "daemon: %s, built %s, source tree at commit %s, fs.locks: %s, fs.passthrough: %v, fs.log_segment_size: %s\n",
			m.Regiond, orUnknown(m.RegiondBuilt), commitOrUnknown(m.RegiondCommit), o.locks, o.walPassthrough, segmentSetting(o.segmentSize))
	} else {
		fmt.Fprintln(w, "daemon: none (-bare-only)")
	}
	if m.Baseline != "" {
		fmt.Fprintf(w, "baseline: %s, %s, built %s, source tree at commit %s, fs.locks: %s, fs.passthrough: %v, fs.log_segment_size: %s\n",
			baselineName(o), m.Baseline, orUnknown(m.BaselineBuilt), commitOrUnknown(m.BaselineCommit), o.locks, o.walPassthrough, segmentSetting(o.baselineSegment))
	}
	fmt.Fprintf(w, "run: %d rounds of %s per measurement and side, sides alternating (order reversed each round); medians across rounds\n",
		o.rounds, o.duration)
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func commitOrUnknown(commit string) string {
	if commit == "" {
		return "unknown (not in a git tree)"
	}
	return commit
}

// segmentSetting describes a -segment-size flag's effect on the config.
func segmentSetting(n int64) string {
	switch {
	case n < 0:
		return "not set (the binary's default)"
	case n == 0:
		return "0 (one file per transaction)"
	default:
		return fmt.Sprintf("%d bytes", n)
	}
}

// baselineName is how the report names the -baseline side.
func baselineName(o options) string {
	if o.baselineLabel != "" {
		return fmt.Sprintf("%q", o.baselineLabel)
	}
	return "unlabelled"
}

var workloadTitles = map[string]string{
	"insert-1":  "insert-1: BEGIN; INSERT 1 row; COMMIT — tx/s and commit latency",
	"insert-10": "insert-10: BEGIN; INSERT 10 rows; COMMIT — tx/s and commit latency",
	"read":      fmt.Sprintf("read: SELECT a,b FROM t WHERE id=? on %s rows, warm cache — queries/s and query latency", commas(readRows)),
}

// printTables prints one table per workload, a row per mode.
func printTables(w io.Writer, results []*result, workloads []workload) {
	for _, wl := range workloads {
		fmt.Fprintf(w, "\n%s\n", workloadTitles[wl.Name])
		unit := "tx/s"
		if wl.isRead() {
			unit = "q/s"
		}
		fmt.Fprintf(w, "%-12s %11s %11s %7s  %-19s %-19s %-18s %s\n", "mode",
			"bare "+unit, "mount "+unit, "ratio", "bare p50 / p99", "mount p50 / p99", "goal", "result")
		for _, r := range results {
			if r.Workload != wl {
				continue
			}
			b, m := summarize(r.Bare), summarize(r.Mount)
			ratio, meets, ok := r.verdict()
			mountRate, ratioS, mountLat, verdict := "-", "-", "-", "no mount run"
			if ok {
				mountRate, ratioS, mountLat = commas(m.Rate), fmt.Sprintf("%.2f", ratio), latencies(m)
				verdict = "below goal"
				if meets {
					verdict = "meets"
				}
			}
			fmt.Fprintf(w, "%-12s %11s %11s %7s  %-19s %-19s %-18s %s\n", r.Mode.Name,
				commas(b.Rate), mountRate, ratioS, latencies(b), mountLat, r.goal(), verdict)
		}
		printBaseline(w, results, wl, unit)
		printPassthrough(w, results, wl, unit)
	}
}

// printBaseline prints, for workload wl, the -baseline regiond's figures
// and the mount's against them.
func printBaseline(w io.Writer, results []*result, wl workload, unit string) {
	printSide(w, results, wl, unit, func(r *result) []sample { return r.Baseline },
		"Mount vs baseline: the -baseline regiond's mount, same fs.locks and fs.passthrough", "baseline", "mount vs baseline")
}

// printPassthrough prints, for workload wl, the passthrough mount's
// figures against bare, and the capturing mount's against it.
func printPassthrough(w io.Writer, results []*result, wl workload, unit string) {
	printSide(w, results, wl, unit, func(r *result) []sample { return r.Fuse },
		"Passthrough: a go-fuse loopback mount, nothing captured, reads and writes passed to the backing file by the kernel", "passthrough", "mount vs it")
}

// printSide prints, for workload wl, the figures of the side samples
// picks, under title, against bare, and the mount's against them.
func printSide(w io.Writer, results []*result, wl workload, unit string, samples func(*result) []sample, title, name, vsName string) {
	header := false
	for _, r := range results {
		f := summarize(samples(r))
		if r.Workload != wl || f == nil {
			continue
		}
		if !header {
			fmt.Fprintf(w, "  %s\n", title)
			fmt.Fprintf(w, "  %-12s %17s %-19s %12s %18s\n", "mode", name+" "+unit, "p50 / p99", "vs bare", vsName)
			header = true
		}
		b, m := summarize(r.Bare), summarize(r.Mount)
		vsMount := "-"
		if m != nil {
			vsMount = fmt.Sprintf("%.2f", m.Rate/f.Rate)
		}
		fmt.Fprintf(w, "  %-12s %17s %-19s %12s %18s\n", r.Mode.Name, commas(f.Rate), latencies(f), fmt.Sprintf("%.2f", f.Rate/b.Rate), vsMount)
	}
}

// printCapture prints, per measurement and regiond mount, what the FUSE
// capture wrote during its last run, and the daemon's CPU per write.
func printCapture(w io.Writer, results []*result) {
	fmt.Fprintln(w, "\nFUSE capture: LTX files in data_dir/dbs/bench.db/ltx/ after the last run of each measurement on each regiond mount")
	fmt.Fprintln(w, "(LTX files = files in the log, standalone or appended to a segment: .ltx files, plus one per 56-byte record of each segment's .index;")
	fmt.Fprintln(w, " write transactions = timed commits + setup: CREATE TABLE, and the 10,000-row load for read; expected = write transactions, + 1 in WAL mode for the switch to WAL;")
	fmt.Fprintf(w, " cpu/write = regiond's user+system CPU during a run (/proc/PID/stat, %s ticks) / the run's expected LTX files, median across rounds; writes only)\n", clockTick())
	fmt.Fprintf(w, "%-12s %-10s %-9s %9s %7s %9s %10s %11s %10s  %s\n", "mode", "workload", "side", "commits", "setup", "expected", "ltx files", "before run", "cpu/write", "bench.db-pos")
	for _, r := range results {
		for _, sc := range []struct {
			name    string
			c       *capture
			samples []sample
		}{{"mount", r.Capture, r.Mount}, {"baseline", r.BaselineCapture, r.Baseline}} {
			c := sc.c
			if c == nil {
				continue
			}
			pos := c.Pos
			if pos == "" {
				pos = "-"
			}
			mark := ""
			if c.Files != c.Expected {
				mark = "  MISMATCH"
			}
			cpu := "-"
			if s := summarize(sc.samples); s != nil && s.CPUPerWriteUS != nil {
				cpu = fmtUS(*s.CPUPerWriteUS)
			}
			fmt.Fprintf(w, "%-12s %-10s %-9s %9d %7d %9d %10d %11d %10s  %s%s\n", r.Mode.Name, r.Workload.Name, sc.name, c.Commits, c.Setup, c.Expected, c.Files, c.Before, cpu, pos, mark)
		}
	}
}

func latencies(s *summary) string {
	return fmtUS(s.P50us) + " / " + fmtUS(s.P99us)
}

func fmtUS(v float64) string {
	switch {
	case v < 10:
		return fmt.Sprintf("%.1fµs", v)
	case v < 1000:
		return fmt.Sprintf("%.0fµs", v)
	case v < 100_000:
		return fmt.Sprintf("%.2fms", v/1000)
	default:
		return fmt.Sprintf("%.0fms", v/1000)
	}
}

// commas formats v rounded to an integer with thousands separators.
func commas(v float64) string {
	s := fmt.Sprintf("%.0f", v)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 && s[i-1] != '-' {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// jsonReport is the -json output.
type jsonReport struct {
	Machine  machine `json:"machine"`
	Rounds   int     `json:"rounds"`
	Duration string  `json:"duration"`
	// The fs.log_segment_size written into each daemon's config; absent
	// where the key was left out.
	SegmentSize         *int64       `json:"log_segment_size,omitempty"`
	BaselineLabel       string       `json:"baseline_label,omitempty"`
	BaselineSegmentSize *int64       `json:"baseline_log_segment_size,omitempty"`
	Results             []jsonResult `json:"results"`
}

type jsonResult struct {
	Workload string   `json:"workload"`
	Mode     string   `json:"mode"`
	Unit     string   `json:"unit"`
	Bare     *summary `json:"bare"`
	Mount    *summary `json:"mount,omitempty"`
	Ratio    float64  `json:"ratio,omitempty"`
	// Passthrough is a go-fuse loopback mount with nothing captured.
	Passthrough      *summary `json:"passthrough,omitempty"`
	PassthroughRatio float64  `json:"passthrough_ratio,omitempty"`
	// Baseline is the -baseline regiond's mount; BaselineRatio is the
	// mount's rate over it.
	Baseline        *summary `json:"baseline,omitempty"`
	BaselineRatio   float64  `json:"mount_baseline_ratio,omitempty"`
	Goal            goal     `json:"goal"`
	Meets           *bool    `json:"meets,omitempty"`
	Capture         *capture `json:"capture,omitempty"`
	BaselineCapture *capture `json:"baseline_capture,omitempty"`
}

func writeJSON(path string, m machine, o options, results []*result) error {
	rep := jsonReport{Machine: m, Rounds: o.rounds, Duration: o.duration.String(), BaselineLabel: o.baselineLabel}
	if o.segmentSize >= 0 {
		rep.SegmentSize = &o.segmentSize
	}
	if o.baselineSegment >= 0 {
		rep.BaselineSegmentSize = &o.baselineSegment
	}
	for _, r := range results {
		jr := jsonResult{Workload: r.Workload.Name, Mode: r.Mode.Name, Unit: "tx/s",
			Bare: summarize(r.Bare), Mount: summarize(r.Mount), Goal: r.goal(), Capture: r.Capture,
			Baseline: summarize(r.Baseline), BaselineCapture: r.BaselineCapture}
		if jr.Baseline != nil && jr.Mount != nil {
			jr.BaselineRatio = jr.Mount.Rate / jr.Baseline.Rate
		}
		if r.Workload.isRead() {
			jr.Unit = "queries/s"
		}
		if ratio, meets, ok := r.verdict(); ok {
			jr.Ratio, jr.Meets = ratio, &meets
		}
		if f := summarize(r.Fuse); f != nil {
			jr.Passthrough, jr.PassthroughRatio = f, f.Rate/jr.Bare.Rate
		}
		rep.Results = append(rep.Results, jr)
	}
	data, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

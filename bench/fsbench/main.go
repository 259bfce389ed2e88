// Command fsbench measures the same SQLite workloads on a bare directory and
// through a Meridian FUSE mount served by `regiond run`, side by side in one
// run, and prints the ratio of mount to bare throughput against the goals.
//
// Workloads, each in every mode of -modes (journal mode and synchronous
// setting, e.g. wal-full):
//
//   - insert-1: BEGIN; INSERT one row; COMMIT, on one connection and a fresh
//     database, for -duration. Transactions/s and commit latency.
//   - insert-10: the same with ten rows per transaction.
//   - read: point queries by random id on a 10,000-row table, after a full
//     scan to warm the caches. Queries/s and query latency.
//
// Each measurement runs -rounds times on each side, bare and mount
// alternating with the order swapped every round so drift hits both, and the
// tables show medians across rounds. After each mount run the program counts
// the LTX files the FUSE capture wrote for the database (standalone files,
// and the LTX files appended to log segments, one record each in the
// segment's index), and reads the CPU time regiond used during the run
// (user and system, from /proc/PID/stat) to report the daemon's CPU per
// write transaction. Only regiond's CPU is counted: SQLite runs in fsbench.
//
// Usage:
//
//	go build -o bin/regiond ./cmd/regiond
//	go run ./bench/fsbench [-rounds 5] [-duration 3s] [-modes wal-normal,wal-full,delete-full] [-json out.json]
//	go run ./bench/fsbench -bare-only    # without regiond: the bare half only
//	go run ./bench/fsbench -baseline /tmp/regiond-old -baseline-label "26762fb per-file"
//
// Other flags: -workloads (a subset, e.g. read), -keep (keep the work
// directory), -stall (how long past -duration a mount measurement may run
// before the mount is taken for hung: regiond is then made to dump its
// goroutines to its log and killed, and the work directory is kept).
//
// With -passthrough (the default) a third side is measured: a go-fuse
// loopback mount served by fsbench itself, nothing captured, which on
// kernels with FUSE passthrough (6.9+) lets the kernel read and write the
// backing files without asking the daemon: the best a FUSE mount does here.
//
// With -baseline BIN a fourth side, "baseline", is measured: a second
// regiond, e.g. a build of an earlier commit, serving its own mount with
// the same fs.locks and fs.passthrough, so a change to the daemon is
// measured against what it replaces on the same machine in the same run.
// -baseline-label names it in the report (e.g. "26762fb per-file").
// -segment-size N and -baseline-segment-size N write fs.log_segment_size: N
// into the daemon's and the baseline's config (0: one file per
// transaction); by default the key is not written, as a regiond from
// before it rejects it, and the binary's default applies. So one binary can
// be measured against itself: -baseline bin/regiond -baseline-segment-size 0.
//
// Everything lives in a fresh directory under -dir (default /var/tmp): bare/
// for the bare directory, data/ and mnt/ for regiond, baseline-data/ and
// baseline-mnt/ for the baseline regiond, passthrough-data/ and
// passthrough-mnt/ for the loopback, so all sides share one filesystem.
// It is removed at the end unless -keep is set. Each regiond is stopped and
// the loopback unmounted on every exit path, Ctrl-C included (SIGTERM, then
// SIGKILL after 10 s and `fusermount3 -u -z`); a second Ctrl-C kills them
// at once.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	_ "github.com/mattn/go-sqlite3"

	"github.com/meridian-db/meridian/internal/testingutil"
)

// dbName is the database both sides open.
const dbName = "bench.db"

type options struct {
	locks     string // fs.locks of the daemon
	regiond   string
	dir       string
	keep      bool
	duration  time.Duration
	rounds    int
	modes     []mode
	workloads []workload
	jsonPath  string
	bareOnly  bool
	fuse      bool // also measure a passthrough FUSE mount
	stall     time.Duration
	// walPassthrough is the daemon's fs.passthrough.
	walPassthrough bool
	// segmentSize is the daemon's fs.log_segment_size; -1 leaves it out.
	segmentSize int64

	// trace: the "mount" side traces every commit and exports the spans
	// over OTLP/gRPC to a collector in fsbench.
	trace bool

	baseline        string // a second regiond measured as the "baseline" side; "" for none
	baselineLabel   string // how the report names it
	baselineSegment int64  // the baseline's fs.log_segment_size; -1 leaves it out
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("fsbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.regiond, "regiond", "bin/regiond", "regiond binary that serves the mount (`regiond run -config FILE`)")
	fs.StringVar(&o.dir, "dir", "/var/tmp", "parent of the fresh work directory (bare/, data/, mnt/); on disk, not tmpfs")
	fs.BoolVar(&o.keep, "keep", false, "keep the work directory at the end")
	fs.DurationVar(&o.duration, "duration", 3*time.Second, "length of each measurement")
	fs.IntVar(&o.rounds, "rounds", 5, "rounds per measurement and side; the tables show medians")
	modes := fs.String("modes", "wal-normal,wal-full,delete-full", "comma-separated JOURNAL-SYNC modes")
	workloads := fs.String("workloads", "insert-1,insert-10,read", "comma-separated workloads")
	fs.StringVar(&o.jsonPath, "json", "", "also write the results as JSON to this file")
	fs.BoolVar(&o.bareOnly, "bare-only", false, "measure the bare directory only; no regiond")
	fs.BoolVar(&o.fuse, "passthrough", true, "also measure a go-fuse loopback mount served by fsbench, nothing captured, with kernel FUSE passthrough where the kernel has it: the best a FUSE mount does here")
	fs.StringVar(&o.locks, "locks", "mount", "the daemon's fs.locks: mount or kernel")
	fs.BoolVar(&o.walPassthrough, "wal-passthrough", true, "the daemon's fs.passthrough: false serves every WAL write through the daemon")
	fs.DurationVar(&o.stall, "stall", time.Minute, "take the mount for hung when a measurement runs this long past -duration")
	fs.Int64Var(&o.segmentSize, "segment-size", -1, "the daemon's fs.log_segment_size in bytes (0: one file per transaction); -1 leaves the key out of its config")
	fs.BoolVar(&o.trace, "trace", false, "the daemon traces every commit (telemetry.sample_commits: 1) and exports the spans over OTLP/gRPC to a collector in fsbench; with -baseline bin/regiond, the cost of tracing")
	fs.StringVar(&o.baseline, "baseline", "", "a second regiond `binary` (e.g. a build of an earlier commit) measured as a fourth side, \"baseline\", with the same fs.locks and fs.passthrough")
	fs.StringVar(&o.baselineLabel, "baseline-label", "", "names the -baseline binary in the report, e.g. \"26762fb per-file\"")
	fs.Int64Var(&o.baselineSegment, "baseline-segment-size", -1, "the baseline's fs.log_segment_size in bytes; -1 leaves the key out of its config (a regiond from before the key rejects it)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.rounds < 1 || o.duration <= 0 || o.stall <= 0 {
		return o, errors.New("-rounds must be at least 1, -duration and -stall positive")
	}
	if o.segmentSize < -1 || o.baselineSegment < -1 {
		return o, errors.New("-segment-size and -baseline-segment-size must be a size in bytes, 0 for one file per transaction, or -1 to leave the key out")
	}
	if o.baseline == "" && (o.baselineLabel != "" || o.baselineSegment != -1) {
		return o, errors.New("-baseline-label and -baseline-segment-size describe the -baseline binary; pass -baseline PATH too")
	}
	if o.bareOnly && (o.baseline != "" || o.segmentSize != -1) {
		return o, errors.New("-baseline and -segment-size need a daemon; drop -bare-only")
	}
	var err error
	if o.modes, err = parseModes(*modes); err != nil {
		return o, err
	}
	if o.workloads, err = parseWorkloads(*workloads); err != nil {
		return o, err
	}
	if !o.bareOnly {
		if o.regiond, err = filepath.Abs(o.regiond); err != nil {
			return o, err
		}
	}
	if o.baseline != "" {
		if o.baseline, err = filepath.Abs(o.baseline); err != nil {
			return o, err
		}
	}
	return o, nil
}

func main() {
	o, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(2)
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "fsbench:", err)
		os.Exit(2)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b := &bench{opts: o}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go b.watchSignals(sigs, cancel) // lives as long as the process
	err = b.run(ctx)
	switch {
	case err != nil && ctx.Err() != nil:
		fmt.Fprintln(os.Stderr, "fsbench: interrupted:", err)
		os.Exit(130)
	case err != nil:
		fmt.Fprintln(os.Stderr, "fsbench:", err)
		os.Exit(1)
	}
}

// bench is one benchmark run.
type bench struct {
	opts options
	// otlp receives the mount side's spans with -trace.
	otlp *testingutil.OTLPReceiver

	mu       sync.Mutex
	daemons  []*daemon // each regiond, added as soon as it is started
	ptMount  string    // the passthrough mount point, once mounted
	workDir  string
	keepWork atomic.Bool // a mount run failed: keep the work directory
}

func (b *bench) passthroughMount() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ptMount
}

func (b *bench) addDaemon(d *daemon) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.daemons = append(b.daemons, d)
}

// watchSignals cancels the run on the first SIGINT or SIGTERM, which stops
// each regiond in order on the way out. On a second signal, or if the run
// has not ended well after the daemons' own stop timeout (e.g. a syscall
// stuck on a hung mount), it kills them, detaches their mounts and exits.
func (b *bench) watchSignals(sigs <-chan os.Signal, cancel context.CancelFunc) {
	<-sigs
	fmt.Fprintln(os.Stderr, "\nfsbench: interrupted; stopping regiond and cleaning up (interrupt again to kill at once)")
	cancel()
	b.mu.Lock()
	n := max(1, len(b.daemons)) // they stop one after the other
	b.mu.Unlock()
	select {
	case <-sigs:
	case <-time.After(time.Duration(n)*(2*termTimeout) + 5*time.Second):
	}
	b.mu.Lock()
	ds, work := slices.Clone(b.daemons), b.workDir
	b.mu.Unlock()
	for _, d := range ds {
		d.Kill(syscall.SIGKILL)
		fmt.Fprintf(os.Stderr, "fsbench: killed %s and detached its mount\n", d.name)
	}
	if pt := b.passthroughMount(); pt != "" {
		_ = exec.Command("fusermount3", "-u", "-z", pt).Run()
	}
	if work != "" {
		b.removeWork(work)
	}
	os.Exit(130)
}

// side is where one half of a measurement opens its database.
type side struct {
	name   string  // "bare", "fuse" (passthrough), "mount" or "baseline"
	dir    string  // directory of bench.db
	ltxDir string  // the capture's LTX directory; empty for bare and fuse
	daemon *daemon // the regiond serving the mount; nil for bare and fuse
}

// daemonSpec is a regiond mount side to start: its side name, binary and
// fs.log_segment_size (-1: not written).
type daemonSpec struct {
	name, bin string
	segment   int64
}

// Work directory layout: a mount side's data_dir, mount_dir, config and
// log, by side name.
var daemonFiles = map[string]struct{ data, mnt, cfg, log string }{
	"mount":    {"data", "mnt", "regiond.yaml", "regiond.log"},
	"baseline": {"baseline-data", "baseline-mnt", "baseline.yaml", "baseline.log"},
}

// mountDirs are the work directory's mount points.
var mountDirs = []string{"mnt", "baseline-mnt", "passthrough-mnt"}

func (b *bench) run(ctx context.Context) (err error) {
	o := b.opts
	parent, err := filepath.EvalSymlinks(o.dir) // mountinfo has resolved paths
	if err == nil {
		parent, err = filepath.Abs(parent)
	}
	if err != nil {
		return fmt.Errorf("-dir: %w", err)
	}
	work, err := os.MkdirTemp(parent, "fsbench-")
	if err != nil {
		return fmt.Errorf("make work directory under -dir: %w", err)
	}
	b.mu.Lock()
	b.workDir = work
	b.mu.Unlock()
	defer b.removeWork(work)
	bare := side{name: "bare", dir: filepath.Join(work, "bare")}
	ptData, ptMnt := filepath.Join(work, "passthrough-data"), filepath.Join(work, "passthrough-mnt")
	if err := os.Mkdir(bare.dir, 0o755); err != nil {
		return err
	}

	regiond := o.regiond
	if o.bareOnly {
		regiond = ""
	}
	mach := describeMachine(work, regiond, o.baseline)
	printHeader(os.Stdout, mach, o)

	if o.trace {
		if b.otlp, err = testingutil.NewOTLPReceiver(); err != nil {
			return fmt.Errorf("start the OTLP collector: %w", err)
		}
		b.otlp.Discard = true
		defer b.otlp.Close()
	}
	sides := []side{bare}
	if !o.bareOnly {
		specs := []daemonSpec{{"mount", o.regiond, o.segmentSize}}
		if o.baseline != "" {
			specs = append(specs, daemonSpec{"baseline", o.baseline, o.baselineSegment})
		}
		for _, spec := range specs {
			s, err := b.startMountSide(ctx, work, spec)
			if err != nil {
				return err
			}
			defer func() {
				if serr := s.daemon.Stop(); serr != nil {
					err = errors.Join(err, fmt.Errorf("stop %s: %w", s.daemon.name, serr))
				}
			}()
			sides = append(sides, s)
		}
		if o.fuse {
			for _, d := range []string{ptData, ptMnt} {
				if err := os.Mkdir(d, 0o755); err != nil {
					return err
				}
			}
			unmount, err := mountPassthrough(ptData, ptMnt)
			if err != nil {
				return err
			}
			b.mu.Lock()
			b.ptMount = ptMnt
			b.mu.Unlock()
			defer func() {
				if uerr := unmount(); uerr != nil {
					err = errors.Join(err, fmt.Errorf("unmount passthrough: %w", uerr))
				}
			}()
			sides = append(sides, side{name: "fuse", dir: ptMnt})
		}
	}

	results, err := b.measureAll(ctx, sides)
	if err != nil {
		return err
	}
	printTables(os.Stdout, results, o.workloads)
	if !o.bareOnly {
		printCapture(os.Stdout, results)
	}
	if b.otlp != nil {
		fmt.Printf("\nTracing: the collector received %d spans from the mount side's regiond (telemetry.sample_commits: 1, OTLP/gRPC on loopback).\n", b.otlp.Count())
	}
	if o.jsonPath != "" {
		if err := writeJSON(o.jsonPath, mach, o, results); err != nil {
			return fmt.Errorf("write -json: %w", err)
		}
	}
	return nil
}

// startMountSide writes the config of the regiond serving the mount side
// spec.name ("mount" or "baseline") under work, starts spec.bin with it and
// waits for the mount. The caller stops the side's daemon.
func (b *bench) startMountSide(ctx context.Context, work string, spec daemonSpec) (side, error) {
	name := spec.name
	f := daemonFiles[name]
	dataDir, mountDir := filepath.Join(work, f.data), filepath.Join(work, f.mnt)
	for _, d := range []string{dataDir, mountDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return side{}, err
		}
	}
	cfg := filepath.Join(work, f.cfg)
	extra := ""
	if name == "mount" && b.otlp != nil {
		extra = fmt.Sprintf("telemetry:\n  otlp_endpoint: %s\n  sample_commits: 1\n", b.otlp.Endpoint)
	}
	if err := writeConfig(cfg, dataDir, mountDir, b.opts.locks, b.opts.walPassthrough, spec.segment, extra); err != nil {
		return side{}, err
	}
	dname := "regiond"
	if name != "mount" {
		dname = name + " regiond"
	}
	d, err := startDaemon(ctx, dname, spec.bin, cfg, mountDir, filepath.Join(work, f.log), b.addDaemon)
	if err != nil {
		return side{}, err
	}
	return side{name: name, dir: mountDir, ltxDir: filepath.Join(dataDir, "dbs", dbName, "ltx"), daemon: d}, nil
}

// measureAll runs every workload in every mode for the rounds, alternating
// the sides and swapping their order each round.
func (b *bench) measureAll(ctx context.Context, sides []side) ([]*result, error) {
	o := b.opts
	var results []*result
	for _, m := range o.modes {
		for _, w := range o.workloads {
			r := &result{Workload: w, Mode: m}
			results = append(results, r)
			for round := range o.rounds {
				order := slices.Clone(sides)
				if round%2 == 1 {
					slices.Reverse(order)
				}
				progress := fmt.Sprintf("fsbench: %s %s round %d/%d:", m.Name, w.Name, round+1, o.rounds)
				for _, s := range order {
					// Same seed on every side: the same rows and ids.
					rng := rand.New(rand.NewPCG(uint64(round), 0x6d6572696469616e))
					smp, c, err := b.measureSide(ctx, s, m, w, rng)
					if err != nil {
						return nil, fmt.Errorf("%s %s round %d on %s (%s): %w", w.Name, m.Name, round+1, s.name, s.dir, err)
					}
					switch s.name {
					case "fuse":
						r.Fuse = append(r.Fuse, smp)
					case "mount":
						r.Mount, r.Capture = append(r.Mount, smp), c
					case "baseline":
						r.Baseline, r.BaselineCapture = append(r.Baseline, smp), c
					default:
						r.Bare = append(r.Bare, smp)
					}
					progress += fmt.Sprintf(" %s %s/s p99 %s;", s.name, commas(smp.Rate()), fmtUS(us(smp.P99)))
				}
				fmt.Fprintln(os.Stderr, progress)
			}
		}
	}
	return results, nil
}

// measureSide runs one measurement on a fresh database; on a regiond mount
// it also counts the LTX files the capture wrote and reads the CPU time the
// daemon used.
func (b *bench) measureSide(ctx context.Context, s side, m mode, w workload, rng *rand.Rand) (sample, *capture, error) {
	path := filepath.Join(s.dir, dbName)
	if s.daemon == nil {
		if err := removeDB(path); err != nil {
			return sample{}, nil, err
		}
		smp, err := measure(ctx, path, m, w, b.opts.duration, rng)
		return smp, nil, err
	}

	// A mount that stops answering would hang the run in a system call;
	// past the deadline the daemon is made to dump its goroutines and is
	// killed, which fails the stuck calls.
	stall := time.AfterFunc(b.opts.duration+b.opts.stall, func() { b.stalled(s) })
	defer stall.Stop()
	fail := func(err error) (sample, *capture, error) {
		b.keepWork.Store(true)
		if ctx.Err() == nil {
			err = s.daemon.explain(err)
		}
		return sample{}, nil, err
	}
	if err := removeDB(path); err != nil {
		return fail(err)
	}
	before := countLTX(s.ltxDir)
	cpu0, cpuErr0 := s.daemon.cpuTime()
	smp, err := measure(ctx, path, m, w, b.opts.duration, rng)
	if err != nil {
		return fail(err)
	}
	cpu1, cpuErr1 := s.daemon.cpuTime()
	c := &capture{Commits: smp.Ops, Setup: smp.Setup, Before: before, Files: countLTX(s.ltxDir), Pos: readPos(path + "-pos")}
	if w.isRead() {
		c.Commits = 0 // queries commit nothing
	}
	c.Expected = c.Commits + c.Setup
	if strings.EqualFold(m.Journal, "wal") {
		c.Expected++ // PRAGMA journal_mode=WAL writes the header
	}
	if cpuErr := errors.Join(cpuErr0, cpuErr1); cpuErr != nil {
		fmt.Fprintf(os.Stderr, "fsbench: %v; no CPU figure for this run\n", cpuErr)
	} else {
		smp.DaemonCPU, smp.HasCPU = cpu1-cpu0, true
	}
	if !w.isRead() {
		smp.Writes = c.Expected
	}
	return smp, c, nil
}

// stalled reports a measurement on a regiond mount that has run
// stallTimeout past its duration, and kills the daemon after a goroutine
// dump to its log.
func (b *bench) stalled(s side) {
	fmt.Fprintf(os.Stderr, "fsbench: no answer from the mount %s for %s past the measurement; killing %s (goroutine dump in its log)\n", s.dir, b.opts.stall, s.daemon.name)
	b.keepWork.Store(true)
	s.daemon.Kill(syscall.SIGQUIT)
}

// removeWork deletes the work directory unless -keep is set, a mount run
// failed (the daemons' logs and data are kept for a look), or a mount is
// still attached (removing through a live or dead mount would fail or reach
// into a daemon's files).
func (b *bench) removeWork(work string) {
	if b.opts.keep || b.keepWork.Load() {
		logs := "regiond's output in regiond.log"
		if b.opts.baseline != "" {
			logs += ", the baseline's in baseline.log"
		}
		fmt.Fprintf(os.Stderr, "fsbench: work directory kept at %s (%s)\n", work, logs)
		return
	}
	for _, mnt := range mountDirs {
		mountDir := filepath.Join(work, mnt)
		if ok, err := isMounted(mountDir, ""); err != nil || ok {
			fmt.Fprintf(os.Stderr, "fsbench: %s is still mounted; left %s in place\n", mountDir, work)
			return
		}
	}
	if err := os.RemoveAll(work); err != nil {
		fmt.Fprintln(os.Stderr, "fsbench: remove work directory:", err)
	}
}

// Command regions is the cross-region benchmark (make bench-regions): it
// starts N regions on this machine (default iad, fra and syd; up to 5),
// each a regiond running the example app (bin/guestbook) behind its
// router, puts simulated WAN latency between every pair with toxiproxy
// (round trips between the AWS regions they stand for, cited in
// config.go), and runs a mixed read/write HTTP workload from clients
// placed in every region, each talking to its own region's router. In the
// same run, the same workload runs against a central database: the same
// app on one SQLite file in the primary's region, every client outside
// it crossing the WAN. A third phase kills the primary -kills times on
// the Consul lease and times the first write after each. It writes a
// report, -out/<date>-<machine>.md, with PNG plots beside it.
//
//	make build && go run ./bench/regions -duration 60s
package main

import (
	"context"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, opts, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "regions: %v\n", err)
		os.Exit(2)
	}
	h := &testingutil.Harness{Prefix: "bench-regions"}
	var rep *Report
	err = h.Run(func() error {
		var err error
		rep, err = run(ctx, h, cfg, opts)
		return err
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "regions: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("report: %s\n", rep.Markdown)
	for _, p := range rep.Plots {
		fmt.Printf("plot:   %s\n", p)
	}
}

// options are the flags that are not the benchmark's configuration.
type options struct {
	regiond, app string
	out          string // the directory of reports
	name         string // the report's name: <date>-<machine>
	machine      string // what the report says of the machine
	command      string // the command line, for the report
}

func parseFlags(args []string) (*Config, *options, error) {
	fl := flag.NewFlagSet("regions", flag.ContinueOnError)
	regions := fl.String("regions", "iad,fra,syd", "the regions, comma-separated (2 to 5; with default round trips: iad, fra, syd, sin, gru)")
	primary := fl.String("primary", "iad", "the region holding the write lease and the central database")
	rtt := fl.String("rtt", "", "round trips to use instead of the defaults, e.g. iad-fra=90ms,iad-syd=198ms")
	clients := fl.String("clients", "2", "clients per region: N for every region, or REGION=N,... (regions not named get none)")
	duration := fl.Duration("duration", 60*time.Second, "how long each workload (Meridian, central) runs")
	writes := fl.Float64("writes", 0.2, "the fraction of requests that are writes (each followed by a read of what it wrote)")
	think := fl.Duration("think", 20*time.Millisecond, "each client's pause between requests")
	probe := fl.Duration("probe-every", 100*time.Millisecond, "how often the lag probe commits a row on the primary")
	steps := fl.String("load-steps", "50,100,200,400,800", "request rates each region offers in the throughput steps after each workload, per second, comma-separated (\"\": none)")
	stepDuration := fl.Duration("step-duration", 10*time.Second, "how long each throughput step runs")
	kills := fl.Int("kills", 10, "primary crashes in the failover phase (0: no failover phase)")
	seed := fl.Int64("seed", 1, "the seed of the clients' random choices")
	o := &options{}
	fl.StringVar(&o.regiond, "regiond", "bin/regiond", "regiond binary (make build)")
	fl.StringVar(&o.app, "app", "bin/guestbook", "the example app (make build)")
	fl.StringVar(&o.out, "out", "bench/results", "the directory the report is written to")
	fl.StringVar(&o.machine, "machine", "", "the machine's name in the report's file name (default: its host name)")
	if err := fl.Parse(args); err != nil {
		return nil, nil, err
	}
	cfg := &Config{Primary: *primary, Duration: *duration, WriteFraction: *writes, Think: *think, ProbeEvery: *probe, Kills: *kills, Seed: *seed, RTT: map[[2]string]time.Duration{}}
	cfg.StepDuration = *stepDuration
	var err error
	if cfg.LoadSteps, err = parseSteps(*steps); err != nil {
		return nil, nil, err
	}
	if cfg.Regions, err = parseRegions(*regions); err != nil {
		return nil, nil, err
	}
	for i, a := range cfg.Regions {
		for _, b := range cfg.Regions[i+1:] {
			if d, ok := defaultRTT[pair(a, b)]; ok {
				cfg.RTT[pair(a, b)] = d
			}
		}
	}
	given, err := parseRTT(*rtt, cfg.Regions)
	if err != nil {
		return nil, nil, err
	}
	maps.Copy(cfg.RTT, given)
	if cfg.Clients, err = parseClients(*clients, cfg.Regions); err != nil {
		return nil, nil, err
	}
	if err := cfg.validate(); err != nil {
		return nil, nil, err
	}
	if o.machine == "" {
		o.machine, _ = os.Hostname()
	}
	o.name = time.Now().UTC().Format("2006-01-02") + "-" + o.machine
	o.command = "go run ./bench/regions " + strings.Join(args, " ")
	return cfg, o, nil
}

// run runs the phases and writes the report.
func run(ctx context.Context, tb testingutil.TB, cfg *Config, o *options) (*Report, error) {
	exe, err := testingutil.Executable(o.regiond)
	if err != nil {
		return nil, err
	}
	app, err := testingutil.Executable(o.app)
	if err != nil {
		return nil, err
	}
	if cfg.Kills > 0 {
		if _, err := testingutil.ConsulBinary(); err != nil {
			return nil, fmt.Errorf("%v (make bench-regions sets MERIDIAN_CONSUL from scripts/install-consul.sh; -kills 0 skips the failover phase)", err)
		}
	}
	say := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "regions: "+format+"\n", args...) }
	say("Meridian: %s, primary %s, %v of workload", strings.Join(cfg.Regions, ", "), cfg.Primary, cfg.Duration)
	rep, err := replicated(ctx, tb, cfg, exe, app)
	if err != nil {
		return nil, fmt.Errorf("the Meridian phase: %w", err)
	}
	say("central database in %s: %v of workload", cfg.Primary, cfg.Duration)
	cen, err := central(ctx, tb, cfg, app)
	if err != nil {
		return nil, fmt.Errorf("the central phase: %w", err)
	}
	var fo *failover
	if cfg.Kills > 0 {
		say("failover: %d kills of the primary on the Consul lease", cfg.Kills)
		if fo, err = failoverPhase(ctx, tb, cfg, exe, app); err != nil {
			return nil, fmt.Errorf("the failover phase: %w", err)
		}
	}
	machine := machineDescription()
	return writeReport(o.out, o.name, cfg, machine, o.command, rep, cen, fo)
}

// machineDescription says what the report ran on: CPUs, kernel, Go.
func machineDescription() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel := "unknown kernel"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = "Linux " + strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("%d CPUs (%s), %s, %s, every region on this one machine over loopback", runtime.NumCPU(), cpu, kernel, runtime.Version())
}

package main

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// awsRegion names the AWS region each bench region stands for.
var awsRegion = map[string]string{
	"iad": "us-east-1 (N. Virginia)",
	"fra": "eu-central-1 (Frankfurt)",
	"syd": "ap-southeast-2 (Sydney)",
	"sin": "ap-southeast-1 (Singapore)",
	"gru": "sa-east-1 (São Paulo)",
}

// defaultRTT holds round-trip times between the AWS regions above: medians
// read off the inter-region latency grid at https://www.cloudping.co/grid
// (p50 over its default period, rounded to the millisecond). The iad, fra
// and syd figures are the ones make demo uses. Each direction of a link is
// delayed by half the round trip.
var defaultRTT = map[[2]string]time.Duration{
	{"fra", "iad"}: 90 * time.Millisecond,
	{"iad", "syd"}: 198 * time.Millisecond,
	{"fra", "syd"}: 252 * time.Millisecond,
	{"iad", "sin"}: 213 * time.Millisecond,
	{"gru", "iad"}: 115 * time.Millisecond,
	{"fra", "sin"}: 158 * time.Millisecond,
	{"fra", "gru"}: 203 * time.Millisecond,
	{"sin", "syd"}: 92 * time.Millisecond,
	{"gru", "syd"}: 310 * time.Millisecond,
	{"gru", "sin"}: 325 * time.Millisecond,
}

// maxRegions bounds the regions of one run: each is a regiond with its
// app and router, and this machine has two CPUs.
const maxRegions = 5

// Config is one run of the benchmark; every field is printed in the
// report.
type Config struct {
	Regions []string // the regions, each one node: <region>-1
	Primary string   // the region holding the lease (and the central database)
	// RTT is the round trip between every pair of regions, keyed by the
	// pair in name order; each direction is delayed by half.
	RTT map[[2]string]time.Duration
	// Clients is how many clients each region has.
	Clients map[string]int
	// Duration is how long each workload (replicated, central) runs.
	Duration time.Duration
	// WriteFraction of a client's requests are writes (POST /entries); the
	// rest reads of an entry (GET /api/entries/{id}). The read right after
	// a client's own write reads that entry with its read-your-writes
	// token.
	WriteFraction float64
	// Think is a client's pause between two requests.
	Think time.Duration
	// ProbeEvery is how often the lag probe commits a row on the primary
	// and times its arrival in every other region.
	ProbeEvery time.Duration
	// LoadSteps are the request rates each region offers in the
	// throughput steps (open loop, per second), each run for StepDuration,
	// after each workload.
	LoadSteps    []int
	StepDuration time.Duration
	// Kills is how many times the failover phase kills the primary; 0
	// skips it.
	Kills int
	Seed  int64
}

// pair is the key of RTT for regions a and b.
func pair(a, b string) [2]string {
	if a > b {
		a, b = b, a
	}
	return [2]string{a, b}
}

// oneWay is the delay of each direction between regions a and b.
func (c *Config) oneWay(a, b string) time.Duration {
	if a == b {
		return 0
	}
	return c.RTT[pair(a, b)] / 2
}

// parseRegions parses -regions: comma-separated region names.
func parseRegions(s string) ([]string, error) {
	var out []string
	for _, r := range strings.Split(s, ",") {
		r = strings.TrimSpace(r)
		if r == "" {
			return nil, fmt.Errorf("-regions %q: an empty region name", s)
		}
		if slices.Contains(out, r) {
			return nil, fmt.Errorf("-regions %q: %s is listed twice", s, r)
		}
		out = append(out, r)
	}
	return out, nil
}

// parseRTT parses -rtt: "a-b=90ms,..." round trips between regions that
// replace or add to the defaults.
func parseRTT(s string, regions []string) (map[[2]string]time.Duration, error) {
	out := map[[2]string]time.Duration{}
	if strings.TrimSpace(s) == "" {
		return out, nil
	}
	for _, item := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(item), "=")
		a, b, ok2 := strings.Cut(k, "-")
		if !ok || !ok2 || a == "" || b == "" {
			return nil, fmt.Errorf("-rtt: %q is not REGION-REGION=DURATION (e.g. iad-fra=90ms)", item)
		}
		if a == b {
			return nil, fmt.Errorf("-rtt: %q: a region has no round trip to itself", item)
		}
		for _, r := range []string{a, b} {
			if !slices.Contains(regions, r) {
				return nil, fmt.Errorf("-rtt: %q names %s, which is not one of -regions (%s)", item, r, strings.Join(regions, ","))
			}
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			return nil, fmt.Errorf("-rtt: %q: %q is not a duration (e.g. 90ms)", item, v)
		}
		if d < 0 {
			return nil, fmt.Errorf("-rtt: %q: a round trip cannot be negative", item)
		}
		out[pair(a, b)] = d
	}
	return out, nil
}

// parseClients parses -clients: "N" for every region or "a=N,b=M,..."
// per region (regions not named get none).
func parseClients(s string, regions []string) (map[string]int, error) {
	out := map[string]int{}
	if n, err := strconv.Atoi(strings.TrimSpace(s)); err == nil {
		if n < 1 {
			return nil, fmt.Errorf("-clients %q: want at least 1 client per region", s)
		}
		for _, r := range regions {
			out[r] = n
		}
		return out, nil
	}
	for _, item := range strings.Split(s, ",") {
		r, v, ok := strings.Cut(strings.TrimSpace(item), "=")
		n, err := strconv.Atoi(v)
		if !ok || err != nil || n < 0 {
			return nil, fmt.Errorf("-clients: %q is not REGION=COUNT (e.g. syd=2)", item)
		}
		if !slices.Contains(regions, r) {
			return nil, fmt.Errorf("-clients: %q places clients in region %s, which is not one of -regions (%s)", item, r, strings.Join(regions, ","))
		}
		out[r] = n
	}
	return out, nil
}

// validate checks the configuration before anything starts.
func (c *Config) validate() error {
	var errs []error
	if len(c.Regions) < 2 || len(c.Regions) > maxRegions {
		errs = append(errs, fmt.Errorf("-regions: %d regions; the bench runs 2 to %d", len(c.Regions), maxRegions))
	}
	if !slices.Contains(c.Regions, c.Primary) {
		errs = append(errs, fmt.Errorf("-primary %s is not one of -regions (%s)", c.Primary, strings.Join(c.Regions, ",")))
	}
	for i, a := range c.Regions {
		for _, b := range c.Regions[i+1:] {
			d, ok := c.RTT[pair(a, b)]
			switch {
			case !ok:
				errs = append(errs, fmt.Errorf("no round trip between %s and %s: give it with -rtt %s-%s=DURATION", a, b, a, b))
			case d < 0:
				errs = append(errs, fmt.Errorf("the round trip between %s and %s is negative (%v)", a, b, d))
			}
		}
	}
	total := 0
	for r, n := range c.Clients {
		if !slices.Contains(c.Regions, r) {
			errs = append(errs, fmt.Errorf("clients are placed in region %s, which is not one of -regions (%s)", r, strings.Join(c.Regions, ",")))
		}
		total += n
	}
	if total == 0 {
		errs = append(errs, errors.New("-clients: no client in any region"))
	}
	if c.WriteFraction < 0 || c.WriteFraction > 1 {
		errs = append(errs, fmt.Errorf("-writes %v: a fraction from 0 to 1", c.WriteFraction))
	}
	if c.Duration <= 0 {
		errs = append(errs, fmt.Errorf("-duration %v: must be above 0", c.Duration))
	}
	if c.ProbeEvery <= 0 {
		errs = append(errs, fmt.Errorf("-probe-every %v: must be above 0", c.ProbeEvery))
	}
	for _, n := range c.LoadSteps {
		if n < 1 {
			errs = append(errs, fmt.Errorf("-load-steps: %d requests a second per region; want at least 1", n))
		}
	}
	if len(c.LoadSteps) > 0 && c.StepDuration <= 0 {
		errs = append(errs, fmt.Errorf("-step-duration %v: must be above 0", c.StepDuration))
	}
	if c.Kills < 0 {
		errs = append(errs, fmt.Errorf("-kills %d: cannot be negative", c.Kills))
	}
	return errors.Join(errs...)
}

// replicas are the regions other than the primary's.
func (c *Config) replicas() []string {
	var out []string
	for _, r := range c.Regions {
		if r != c.Primary {
			out = append(out, r)
		}
	}
	return out
}

// parseSteps parses -load-steps: comma-separated rates per region; ""
// for none.
func parseSteps(s string) ([]int, error) {
	var out []int
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	for _, item := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(item))
		if err != nil {
			return nil, fmt.Errorf("-load-steps: %q is not a number of requests a second", item)
		}
		out = append(out, n)
	}
	return out, nil
}

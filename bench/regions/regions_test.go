package main

import (
	"context"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestParseFlags_BadInput: a configuration that cannot run is refused
// before anything starts, with an error that names what is wrong.
func TestParseFlags_BadInput(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-regions", "iad,fra,ams"}, "no round trip between iad and ams: give it with -rtt iad-ams=DURATION"},
		{[]string{"-regions", "iad,fra", "-rtt", "iad-fra=-5ms"}, `-rtt: "iad-fra=-5ms": a round trip cannot be negative`},
		{[]string{"-rtt", "iad-fra=90"}, `-rtt: "iad-fra=90": "90" is not a duration`},
		{[]string{"-rtt", "iadfra=90ms"}, `-rtt: "iadfra=90ms" is not REGION-REGION=DURATION`},
		{[]string{"-rtt", "iad-ams=90ms"}, `-rtt: "iad-ams=90ms" names ams, which is not one of -regions (iad,fra,syd)`},
		{[]string{"-clients", "iad=2,tok=1"}, `-clients: "tok=1" places clients in region tok, which is not one of -regions (iad,fra,syd)`},
		{[]string{"-clients", "0"}, "want at least 1 client per region"},
		{[]string{"-regions", "iad,fra,iad"}, "iad is listed twice"},
		{[]string{"-regions", "iad"}, "-regions: 1 regions; the bench runs 2 to 5"},
		{[]string{"-regions", "iad,fra,syd,sin,gru,nrt"}, "-regions: 6 regions; the bench runs 2 to 5"},
		{[]string{"-primary", "sin"}, "-primary sin is not one of -regions (iad,fra,syd)"},
		{[]string{"-writes", "1.5"}, "-writes 1.5: a fraction from 0 to 1"},
		{[]string{"-load-steps", "1,0"}, "-load-steps: 0 requests a second per region; want at least 1"},
		{[]string{"-load-steps", "1,x"}, `-load-steps: "x" is not a number of requests a second`},
	} {
		_, _, err := parseFlags(append(c.args, "-machine", "test"))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("regions %s: error %v; want one saying %q", strings.Join(c.args, " "), err, c.want)
		}
	}
	cfg, _, err := parseFlags([]string{"-regions", "iad,fra,syd,sin,gru", "-rtt", "fra-iad=100ms", "-clients", "syd=3,iad=1"})
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.RTT[pair("iad", "fra")]; got != 100*time.Millisecond {
		t.Errorf("-rtt fra-iad=100ms: iad-fra is %v", got)
	}
	if got := cfg.oneWay("syd", "gru"); got != 155*time.Millisecond {
		t.Errorf("one way syd-gru: %v, want half the default 310 ms round trip", got)
	}
	if cfg.Clients["syd"] != 3 || cfg.Clients["iad"] != 1 || cfg.Clients["fra"] != 0 {
		t.Errorf("-clients syd=3,iad=1: %v", cfg.Clients)
	}
}

// TestRegions_ShortRun runs the benchmark for a few seconds on three
// regions with short round trips (iad-fra 30 ms, iad-syd 60 ms, fra-syd
// 80 ms) and one kill of the primary, and reads its report as a user
// would: the figures must follow from the configured latencies (a write
// forwarded from syd takes at least the syd-iad round trip, and so does
// every request of a syd client to the central database; a read through
// syd's own router takes less than that and is served in syd; each
// region's replication lag is at least its one-way latency from the
// primary, as the bench measures it and as the cluster reports it), and
// the plots decode as PNG images of the size the report draws.
func TestRegions_ShortRun(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the benchmark mounts FUSE filesystems: run the tests as root")
	}
	bin := t.TempDir()
	for _, b := range [][2]string{{"regiond", "../../cmd/regiond"}, {"guestbook", "../../examples/guestbook"}} {
		if out, err := exec.Command("go", "build", "-o", filepath.Join(bin, b[0]), b[1]).CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", b[1], err, out)
		}
	}
	out := t.TempDir()
	cfg, o, err := parseFlags([]string{"-duration", "3s", "-kills", "1", "-machine", "test", "-out", out, "-load-steps", "10,20", "-step-duration", "1s",
		"-rtt", "iad-fra=30ms,iad-syd=60ms,fra-syd=80ms",
		"-regiond", filepath.Join(bin, "regiond"), "-app", filepath.Join(bin, "guestbook")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := run(ctx, t, cfg, o)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(rep.Markdown)
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	t.Logf("the report:\n%s", md)
	if want := filepath.Join(out, time.Now().UTC().Format("2006-01-02")+"-test.md"); rep.Markdown != want {
		t.Errorf("the report is %s, want %s", rep.Markdown, want)
	}

	// p50 of a "p50 / p99 / max" cell, in ms.
	p50 := func(cell string) float64 {
		t.Helper()
		v, err := strconv.ParseFloat(strings.TrimSpace(strings.Split(cell, "/")[0]), 64)
		if err != nil {
			t.Fatalf("a figure %q: %v", cell, err)
		}
		return v
	}
	row := func(prefix string) []string {
		t.Helper()
		for _, l := range strings.Split(md, "\n") {
			if strings.HasPrefix(l, prefix) {
				return strings.Split(l, " | ")
			}
		}
		t.Fatalf("the report has no row starting %q", prefix)
		return nil
	}
	const rttSyd, oneWayFra, oneWaySyd = 60.0, 15.0, 30.0
	syd := row("| syd | replicated |")
	if w := p50(syd[5]); w < rttSyd {
		t.Errorf("a write forwarded from syd took %v ms (p50), less than the syd-iad round trip", w)
	}
	if r := p50(syd[3]); r >= rttSyd {
		t.Errorf("a read through syd's own router took %v ms (p50), as long as a round trip to the primary", r)
	}
	if ryw := p50(syd[6]); ryw >= rttSyd {
		t.Errorf("a read of its own write through syd's router took %v ms (p50): it should be served in syd", ryw)
	}
	sydCentral := row("| syd | central |")
	for _, c := range []int{3, 5, 6} {
		if v := p50(sydCentral[c]); v < rttSyd {
			t.Errorf("a request from syd to the central database took %v ms (p50, column %d), less than the round trip", v, c)
		}
	}
	if iad := row("| iad | replicated |"); p50(iad[5]) >= rttSyd/2 {
		t.Errorf("a write in the primary's region took %v ms (p50): it crosses no WAN", p50(iad[5]))
	}
	for r, oneWay := range map[string]float64{"fra": oneWayFra, "syd": oneWaySyd} {
		lag := row("| " + r + " | " + strconv.Itoa(int(oneWay)) + "ms | ")
		if n, _ := strconv.Atoi(lag[2]); n == 0 {
			t.Errorf("no lag sample of the bench for %s", r)
		}
		if n, _ := strconv.Atoi(lag[4]); n == 0 {
			t.Errorf("no lag figure of the cluster for %s", r)
		}
		if v := p50(lag[3]); v < oneWay {
			t.Errorf("the bench measured a lag of %v ms (p50) in %s, less than the one-way latency", v, r)
		}
		if v := p50(lag[5]); v < oneWay {
			t.Errorf("the cluster reported a lag of %v ms (p50) in %s, less than the one-way latency", v, r)
		}
	}
	if m := regexp.MustCompile(`(?m)^\| replicated \| \d+ \| [\d.]+ \| ([\d.]+)% \|`).FindStringSubmatch(md); m == nil {
		t.Error("no throughput row for replicated")
	} else if v, _ := strconv.ParseFloat(m[1], 64); v < 90 {
		t.Errorf("%v%% of the reads were served in the client's region, want nearly all", v)
	}
	for _, n := range []string{"10", "20"} {
		for _, arch := range []string{"replicated", "central"} {
			m := regexp.MustCompile(`(?m)^\| ` + n + ` \| ` + arch + ` \| ([\d.]+) \| ([\d.]+)% \|`).FindStringSubmatch(md)
			if m == nil {
				t.Errorf("no throughput step of %s requests a second per region for %s", n, arch)
				continue
			}
			if rps, _ := strconv.ParseFloat(m[1], 64); rps <= 0 {
				t.Errorf("throughput step %s, %s: %v requests per second", n, arch, rps)
			}
			// A third of the clients are in the primary's region: the
			// central database serves a third of the reads locally.
			if share, _ := strconv.ParseFloat(m[2], 64); arch == "central" && (share < 20 || share > 50) {
				t.Errorf("throughput step %s, central: %v%% of the reads local, want about a third", n, share)
			}
		}
	}
	if !regexp.MustCompile(`The highest throughput with at least 80% of the reads served in the client's region, no errors, and the last answer within 1s of the step's end: replicated [\d.]+ requests per second( \(at the highest step tried[^)]*\))?; central: no step`).MatchString(md) {
		t.Error("no throughput figure at 80% of the reads served locally, or one for the central database")
	}
	if m := regexp.MustCompile(`(?m)^\| 1 \| (iad|fra|syd)-1 \| [\d.]+ \| ([\d.]+) \| (iad|fra|syd)-1 \|$`).FindStringSubmatch(md); m == nil {
		t.Error("no row for the kill of the primary")
	} else if m[1] == m[3] {
		t.Errorf("%s was killed and was the next primary", m[1])
	}

	pw, ph := panelPixels()
	want := map[string][2]int{"latency-cdf.png": {3 * pw, ph}, "lag.png": {pw, ph}, "failover.png": {2 * pw, ph}}
	if len(rep.Plots) != len(want) {
		t.Errorf("plots %v, want %d", rep.Plots, len(want))
	}
	for _, p := range rep.Plots {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		img, err := png.Decode(f)
		f.Close()
		if err != nil {
			t.Errorf("%s: %v", p, err)
			continue
		}
		w, ok := want[filepath.Base(p)]
		if got := img.Bounds().Size(); !ok || got.X != w[0] || got.Y != w[1] {
			t.Errorf("%s is %v, want %dx%d", p, got, w[0], w[1])
		}
		if !strings.Contains(md, "("+o.name+"/"+filepath.Base(p)+")") {
			t.Errorf("the report does not show %s", filepath.Base(p))
		}
	}
}

//go:build democheck

package main

import (
	"bytes"
	"context"
	"image/png"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDemo_Check takes the demo's scripted tour (make demo-check) and
// reads its output as a user would: every region listed, the write's
// lag in each replica region at least the one-way latency to it, a new
// primary after the kill, a write through every region, and nothing of
// the demo left after it exits.
func TestDemo_Check(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "demo")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build the demo: %v\n%s", err, out)
	}
	dir := filepath.Join(t.TempDir(), "state")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-check", "-dir", dir, "-regiond", "../../bin/regiond", "-app", "../../bin/guestbook")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := stdout.String()
	t.Logf("the demo's output:\n%s", out)
	if err != nil {
		t.Fatalf("the demo failed: %v\n%s", err, stderr.String())
	}

	for _, r := range regions {
		if !regexp.MustCompile(`(?m)^  ` + r.name + `\s+` + r.node + `\s+http://` + regexp.QuoteMeta(r.router) + `\s+http://` + regexp.QuoteMeta(r.admin) + `\s+(primary|replica)$`).MatchString(out) {
			t.Errorf("no line for region %s with its node, router and admin API", r.name)
		}
	}
	m := regexp.MustCompile(`A write through (\w+), the region farthest from the primary (\S+): \S+ forwarded it to (\S+), which answered in ([\d.]+) ms`).FindStringSubmatch(out)
	if m == nil {
		t.Fatal("no line for the write through the farthest region")
	}
	from, primary := m[1], strings.TrimSuffix(m[2], "-1")
	if m[3] != m[2] {
		t.Errorf("the write was answered by %s, want the primary %s", m[3], m[2])
	}
	if took, _ := strconv.ParseFloat(m[4], 64); took < 2*float64(oneWay(from, primary).Milliseconds()) {
		t.Errorf("the forwarded write took %s ms, less than the round trip %s-%s (%v)", m[4], from, primary, 2*oneWay(from, primary))
	}
	lags := regexp.MustCompile(`(?m)^  visible in (\w+) after\s+([\d.]+) ms \((?:one-way latency from (\w+): (\S+)\)|the primary: committed there\))$`).FindAllStringSubmatch(out, -1)
	if len(lags) != 3 {
		t.Fatalf("got %d lines of lag, want one per region", len(lags))
	}
	for _, l := range lags {
		lag, _ := strconv.ParseFloat(l[2], 64)
		if l[1] == primary {
			continue
		}
		want := oneWay(primary, l[1])
		if l[4] != want.String() || lag < float64(want.Milliseconds()) || lag > 10000 {
			t.Errorf("visible in %s after %v ms (latency printed %s), want at least the one-way latency %v", l[1], lag, l[4], want)
		}
	}
	// The write's trace: eight spans, an apply in each replica region,
	// and its page in Chromium, a PNG of the window's size.
	if m := regexp.MustCompile(`(?m)^  its trace, (\d+) spans from the router in (\w+) to the apply in every replica region: http://127\.0\.0\.1:16600/trace/[0-9a-f]{32}$`).FindStringSubmatch(out); m == nil || m[1] != "8" || m[2] != from {
		t.Errorf("no line for the write's trace of 8 spans from %s: %q", from, m)
	}
	for _, r := range regions {
		if r.name == primary {
			continue
		}
		if !regexp.MustCompile(`(?m)^    apply in ` + r.name + `\s+.*lag_ms=[\d.]+`).MatchString(out) {
			t.Errorf("no apply span of the write's trace in %s", r.name)
		}
	}
	if m := regexp.MustCompile(`check: the trace page in headless Chromium shows (.*); screenshot (\S+)`).FindStringSubmatch(out); m == nil {
		t.Error("no screenshot of the trace page")
	} else {
		f, err := os.Open(m[2])
		if err != nil {
			t.Fatal(err)
		}
		img, err := png.Decode(f)
		f.Close()
		if err != nil || img.Bounds().Dx() != 1400 || img.Bounds().Dy() != 700 {
			t.Errorf("screenshot %s: %v, %v; want a 1400x700 PNG", m[2], err, img)
		}
	}
	if !regexp.MustCompile(`check: new primary (\S+), [\d.]+ s after the kill`).MatchString(out) {
		t.Error("no new primary after the kill")
	}
	for _, r := range regions {
		if !regexp.MustCompile(`check: a write through ` + r.name + `: 201 Created in [\d.]+ ms, entry \d+, served by \S+`).MatchString(out) {
			t.Errorf("no successful write through %s after the failover", r.name)
		}
	}
	if !strings.Contains(out, "stopped: no process, mount or port of the demo is left") {
		t.Error("the demo did not say it left nothing")
	}
	if left := leftovers(dir); left != "" {
		t.Fatalf("left after the demo: %s", left)
	}
	for _, r := range regions {
		if l, err := net.Listen("tcp", r.router); err != nil {
			t.Errorf("port %s still taken", r.router)
		} else {
			l.Close()
		}
	}
	_ = os.RemoveAll(dir)
}

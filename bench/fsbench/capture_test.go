package main

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestCountLTX(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		dir := t.TempDir()
		files := map[string]int{
			"0000000000000001-0000000000000001.ltx": 10,
			"0000000000000002-0000000000000003.ltx": 10,
			"0000000000000004.segment":              4096,
			"0000000000000004.index":                3 * indexRecordSize,
			"0000000000000007.segment":              4096,
			"0000000000000007.index":                2*indexRecordSize + 20, // a record being written
			"0000000000000009.ltx.tmp":              10,
			"pos":                                   10,
		}
		for name, size := range files {
			if err := os.WriteFile(filepath.Join(dir, name), make([]byte, size), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if got, want := countLTX(dir), 2+3+2; got != want {
			t.Fatalf("got %d, want %d", got, want)
		}
	})
	t.Run("Missing", func(t *testing.T) {
		if got := countLTX(filepath.Join(t.TempDir(), "ltx")); got != 0 {
			t.Fatalf("got %d, want 0", got)
		}
	})
}

func TestParseStatCPU(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		// A command name with a space and a parenthesis; utime 250, stime 50.
		stat := "4242 (reg iond) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 12 0 100 0 0"
		got, err := parseStatCPU(stat)
		if err != nil {
			t.Fatal(err)
		}
		if want := 300 * clockTick(); got != want {
			t.Fatalf("got %v, want %v", got, want)
		}
	})
	t.Run("Self", func(t *testing.T) {
		data, err := os.ReadFile("/proc/self/stat")
		if err != nil {
			t.Skip("no /proc:", err)
		}
		if _, err := parseStatCPU(string(data)); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("ErrShort", func(t *testing.T) {
		if _, err := parseStatCPU("4242 (regiond) S 1 4242"); err == nil {
			t.Fatal("got no error for a truncated stat")
		}
	})
	t.Run("ClockTick", func(t *testing.T) {
		if got := clockTick(); got <= 0 || got > time.Second {
			t.Fatalf("got a tick of %v", got)
		}
	})
}

func TestParseFlags_Baseline(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		o, err := parseFlags([]string{"-baseline", "/tmp/regiond-old", "-baseline-label", "old", "-baseline-segment-size", "0"}, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if o.baseline != "/tmp/regiond-old" || o.baselineLabel != "old" || o.baselineSegment != 0 || o.segmentSize != -1 {
			t.Fatalf("got baseline %q label %q segment %d, daemon segment %d", o.baseline, o.baselineLabel, o.baselineSegment, o.segmentSize)
		}
	})
	for name, args := range map[string][]string{
		"ErrLabelWithoutBaseline":   {"-baseline-label", "old"},
		"ErrSegmentWithoutBaseline": {"-baseline-segment-size", "0"},
		"ErrBareOnly":               {"-bare-only", "-baseline", "/tmp/regiond-old"},
		"ErrSegmentSize":            {"-segment-size", "-2"},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := parseFlags(args, io.Discard); err == nil {
				t.Fatalf("got no error for %q", args)
			}
		})
	}
}

func TestWriteConfig_SegmentSize(t *testing.T) {
	path := filepath.Join(t.TempDir(), "regiond.yaml")
	for _, tc := range []struct {
		size int64
		want string
	}{{-1, ""}, {0, "  log_segment_size: 0\n"}, {1 << 20, "  log_segment_size: 1048576\n"}} {
		if err := writeConfig(path, "/d", "/m", "mount", true, tc.size, ""); err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		want := "node: bench-1\nregion: local\ndata_dir: \"/d\"\nmount_dir: \"/m\"\nfs:\n  locks: mount\n  passthrough: true\n" +
			tc.want + "lease:\n  type: static\n  static_primary: bench-1\n"
		if got := string(data); got != want {
			t.Fatalf("size %d: got\n%s\nwant\n%s", tc.size, got, want)
		}
	}
}

func TestWriteJSON_Baseline(t *testing.T) {
	smp := func(ops int, cpu time.Duration) sample {
		return sample{Ops: ops, Elapsed: time.Second, P50: time.Millisecond, P99: 2 * time.Millisecond, Setup: 1, DaemonCPU: cpu, HasCPU: true, Writes: ops}
	}
	r := &result{Workload: allWorkloads[0], Mode: mode{Name: "wal-full", Journal: "WAL", Sync: "FULL"},
		Bare: []sample{{Ops: 2000, Elapsed: time.Second}}, Mount: []sample{smp(1000, 500*time.Millisecond)},
		Baseline: []sample{smp(500, 250*time.Millisecond)}, Capture: &capture{Files: 1000}, BaselineCapture: &capture{Files: 500}}
	o := options{rounds: 1, duration: time.Second, segmentSize: -1, baselineSegment: 0, baselineLabel: "old"}
	path := filepath.Join(t.TempDir(), "out.json")
	if err := writeJSON(path, machine{}, o, []*result{r}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var got jsonReport
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	jr := got.Results[0]
	switch {
	case got.SegmentSize != nil || got.BaselineSegmentSize == nil || *got.BaselineSegmentSize != 0 || got.BaselineLabel != "old":
		t.Fatalf("got segment sizes %v, %v and label %q, want none, 0 and old", got.SegmentSize, got.BaselineSegmentSize, got.BaselineLabel)
	case jr.Baseline == nil || jr.BaselineRatio != 2 || jr.BaselineCapture == nil || jr.BaselineCapture.Files != 500:
		t.Fatalf("got baseline %+v, ratio %v, capture %+v; want rate 500, ratio 2, 500 files", jr.Baseline, jr.BaselineRatio, jr.BaselineCapture)
	case jr.Mount.CPUPerWriteUS == nil || *jr.Mount.CPUPerWriteUS != 500 || *jr.Baseline.CPUPerWriteUS != 500:
		t.Fatalf("got CPU per write %v (mount), %v (baseline), want 500µs each", jr.Mount.CPUPerWriteUS, jr.Baseline.CPUPerWriteUS)
	}
}

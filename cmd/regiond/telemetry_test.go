package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/regiond"
	"github.com/meridian-db/meridian/router"
)

// telemetryCluster starts three regions running the guestbook behind their
// routers, exporting to rcv; commits outside a traced request are not
// traced, so every commit trace is a request's.
func telemetryCluster(t *testing.T, rcv *testingutil.OTLPReceiver) *testingutil.Cluster {
	t.Helper()
	return appCluster(t, "", func(s *testingutil.ClusterNodeSpec) {
		s.Extra = append(s.Extra, fmt.Sprintf("telemetry: {otlp_endpoint: %q, sample_commits: 0}", rcv.Endpoint))
		// Batches out fast, for the test not to wait.
		s.Env = []string{"OTEL_BSP_SCHEDULE_DELAY=100", "OTEL_METRIC_EXPORT_INTERVAL=500"}
	})
}

// tracedWrite posts an entry through base with a traceparent of a new
// trace, and returns the trace's ID, the client's span ID and the TXID
// the write committed.
func tracedWrite(t *testing.T, base, msg string) (traceID, spanID []byte, txid uint64) {
	t.Helper()
	traceID, spanID = make([]byte, 16), make([]byte, 8)
	_, _ = rand.Read(traceID)
	_, _ = rand.Read(spanID)
	tp := fmt.Sprintf("00-%x-%x-01", traceID, spanID)
	resp, _, err := postEntry(http.DefaultClient, base, "tracer", msg, "traceparent", tp)
	if err != nil {
		t.Fatalf("write through %s: %v", base, err)
	}
	tok, err := router.ParseToken(resp.Header.Get(router.TXIDHeader))
	if err != nil || tok["app.db"] == 0 {
		t.Fatalf("write through %s: %s %q: %v", base, router.TXIDHeader, resp.Header.Get(router.TXIDHeader), err)
	}
	return traceID, spanID, tok["app.db"]
}

// TestTelemetry_OneTracePerWrite: one HTTP write through a replica
// region's router is one trace, exported over OTLP by three regiond
// processes and the app: fra's router → iad's router → the app's request
// → the commit on iad → a ship span per replica → an apply span in fra
// and in syd, each the child of the one before. The apply spans' lag is
// the replicas' own (/status), and the metrics agree with /status.
func TestTelemetry_OneTracePerWrite(t *testing.T) {
	rcv := testingutil.StartOTLPReceiver(t)
	c := telemetryCluster(t, rcv)
	primary, fraN, sydN := c.Node(iad.Name), c.Node(fra.Name), c.Node(syd.Name)
	waitSchema(t, primary.RouterURL())
	c.WaitCaughtUp(t, 30*time.Second, "app.db")
	before := make(map[string]float64)
	for _, n := range []*testingutil.ClusterNode{fraN, sydN} {
		before[n.Name] = lagCount(t, n)
	}

	// Nine more writes, then the one whose trace is checked: each a
	// trace of its own.
	traces := make(map[uint64]string) // TXID → trace ID
	var first uint64
	for i := range 9 {
		id, _, txid := tracedWrite(t, fraN.RouterURL(), fmt.Sprintf("warm-up %d", i))
		traces[txid] = hex.EncodeToString(id)
		if first == 0 {
			first = txid
		}
	}
	traceID, clientSpan, txid := tracedWrite(t, fraN.RouterURL(), "traced")
	traces[txid] = hex.EncodeToString(traceID)
	if txid != first+9 {
		t.Fatalf("the ten writes committed TXIDs %d to %d, want ten in a row", first, txid)
	}

	// Router (fra) and router (iad), the app, the commit, two ships and
	// two applies.
	var spans []testingutil.Span
	deadline := time.Now().Add(20 * time.Second)
	for {
		spans = rcv.Trace(traceID)
		if len(spans) >= 8 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	byName := map[string][]testingutil.Span{}
	for _, s := range spans {
		byName[s.Name] = append(byName[s.Name], s)
	}
	describe := func() string {
		var b strings.Builder
		for _, s := range spans {
			fmt.Fprintf(&b, "\n  %s %q span %x parent %x", s.Service, s.Name, s.SpanId, s.ParentSpanId)
		}
		return b.String()
	}
	if len(spans) != 8 || len(byName["router"]) != 2 || len(byName["POST /entries"]) != 1 || len(byName["commit"]) != 1 ||
		len(byName["ship"]) != 2 || len(byName["apply"]) != 2 {
		t.Fatalf("trace %x: %d spans, want 2 router, 1 POST /entries, 1 commit, 2 ship, 2 apply:%s", traceID, len(spans), describe())
	}
	find := func(name, service string) testingutil.Span {
		for _, s := range byName[name] {
			if s.Service == service {
				return s
			}
		}
		t.Fatalf("trace %x has no %q span of %s:%s", traceID, name, service, describe())
		return testingutil.Span{}
	}
	parentOf := func(child, parent testingutil.Span, what string) {
		t.Helper()
		if !bytes.Equal(child.ParentSpanId, parent.SpanId) {
			t.Errorf("%s: %s %q has parent %x, want %s %q %x:%s", what, child.Service, child.Name, child.ParentSpanId, parent.Service, parent.Name, parent.SpanId, describe())
		}
	}
	fraRouter, iadRouter := find("router", "meridian-fra"), find("router", "meridian-iad")
	app, commit := find("POST /entries", "guestbook-iad"), find("commit", "meridian-iad")
	if !bytes.Equal(fraRouter.ParentSpanId, clientSpan) {
		t.Errorf("fra's router span has parent %x, want the client's %x", fraRouter.ParentSpanId, clientSpan)
	}
	parentOf(iadRouter, fraRouter, "the write is forwarded to the primary's router")
	parentOf(app, iadRouter, "the primary's router sends it to the app")
	parentOf(commit, app, "the app's request commits")
	if got := commit.Attr("meridian.txid").GetIntValue(); uint64(got) != txid {
		t.Errorf("commit span: txid %d, want %d (the write's %s)", got, txid, router.TXIDHeader)
	}
	if commit.Attr("meridian.db").GetStringValue() != "app.db" || commit.Attr("meridian.pages").GetIntValue() < 1 || commit.Attr("meridian.bytes").GetIntValue() < 100 {
		t.Errorf("commit span attributes: %v, want db app.db, pages and bytes", commit.Attributes)
	}
	for _, out := range []struct {
		node   *testingutil.ClusterNode
		region string
	}{{fraN, "fra"}, {sydN, "syd"}} {
		var ship testingutil.Span
		for _, s := range byName["ship"] {
			if s.Attr("meridian.replica").GetStringValue() == out.node.Name {
				ship = s
			}
		}
		if ship.Span == nil {
			t.Fatalf("no ship span to %s:%s", out.node.Name, describe())
		}
		parentOf(ship, commit, "the primary ships the commit to "+out.node.Name)
		apply := find("apply", "meridian-"+out.region)
		parentOf(apply, ship, out.node.Name+" applies what was shipped to it")
		if apply.Attr("meridian.region").GetStringValue() != out.region || uint64(apply.Attr("meridian.txid").GetIntValue()) != txid {
			t.Errorf("apply span of %s: %v, want region %s, txid %d", out.node.Name, apply.Attributes, out.region, txid)
		}
		// The lag is the replica's own: from the commit, on the
		// primary's clock, to the apply, on its own.
		st := adminStatus(t, out.node)
		var db regiond.DatabaseStatus
		for _, d := range st.Databases {
			if d.Name == "app.db" {
				db = d
			}
		}
		lag := apply.Attr("meridian.lag_ms").GetDoubleValue()
		want := float64(db.AppliedAt.Sub(db.CommittedAt).Microseconds()) / 1000
		if db.TXID != txid || math.Abs(lag-want) > 0.0015 || lag <= 0 {
			t.Errorf("%s: apply span lag %.3f ms; /status has app.db at txid %d, committed %v, applied %v: %.3f ms",
				out.node.Name, lag, db.TXID, db.CommittedAt, db.AppliedAt, want)
		}

		// Metrics: the position is /status's; the lag histogram counted
		// each of the ten transactions once; its exemplars name TXIDs
		// with the traces that wrote them.
		mustMetrics(t, out.node, fmt.Sprintf(`meridian_db_txid{db="app.db"} %d`, db.TXID))
		if got := lagCount(t, out.node) - before[out.node.Name]; got != 10 {
			t.Errorf("%s: meridian_replication_lag_seconds_count went up by %v over ten transactions, want 10", out.node.Name, got)
		}
		checkExemplars(t, out.node, traces)
	}
	mustMetrics(t, primary, fmt.Sprintf(`meridian_db_txid{db="app.db"} %d`, txid),
		`meridian_router_requests_total{kind="write",outcome="local"} `)
	mustMetrics(t, fraN, `meridian_router_requests_total{kind="write",outcome="forwarded"} 10`)

	// The same metrics went out over OTLP, from every node.
	deadline = time.Now().Add(10 * time.Second)
	for {
		seen := map[string]bool{}
		for _, rm := range rcv.Metrics() {
			for _, kv := range rm.GetResource().GetAttributes() {
				if kv.Key == "service.name" {
					for _, sm := range rm.GetScopeMetrics() {
						for _, m := range sm.GetMetrics() {
							if m.Name == "meridian.db.txid" {
								seen[kv.GetValue().GetStringValue()] = true
							}
						}
					}
				}
			}
		}
		if len(seen) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("meridian.db.txid over OTLP from %v, want meridian-iad, meridian-fra and meridian-syd", seen)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lagCount returns the count of n's replication lag histogram of app.db.
func lagCount(t *testing.T, n *testingutil.ClusterNode) float64 {
	t.Helper()
	_, b, err := n.AdminGet("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`(?m)^meridian_replication_lag_seconds_count\{db="app.db",region="[a-z]+"\} (\S+)$`)
	m := re.FindSubmatch(b)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// checkExemplars checks n's lag histogram in OpenMetrics: it has
// exemplars, and those of the TXIDs in traces carry their traces' IDs.
func checkExemplars(t *testing.T, n *testingutil.ClusterNode, traces map[uint64]string) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+n.Admin+"/metrics", nil)
	req.Header.Set("Accept", "application/openmetrics-text; version=1.0.0")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	re := regexp.MustCompile(`(?m)^meridian_replication_lag_seconds_bucket\{[^}]*\} \S+ # \{([^}]*)\}`)
	matches := re.FindAllSubmatch(buf.Bytes(), -1)
	ours := 0
	for _, m := range matches {
		labels := map[string]string{}
		for _, kv := range strings.Split(string(m[1]), ",") {
			k, v, _ := strings.Cut(kv, "=")
			labels[k] = strings.Trim(v, `"`)
		}
		txid, err := strconv.ParseUint(labels["txid"], 10, 64)
		if err != nil {
			t.Errorf("%s: exemplar {%s} has no txid", n.Name, m[1])
			continue
		}
		if want, ok := traces[txid]; ok {
			ours++
			if labels["trace_id"] != want {
				t.Errorf("%s: the exemplar of txid %d has trace_id %q, want %s", n.Name, txid, labels["trace_id"], want)
			}
		}
	}
	if ours == 0 {
		t.Errorf("%s: no lag exemplar names a TXID of the writes; exemplars: %q", n.Name, matches)
	}
}

// TestTelemetry_CollectorUnreachable: with the collector's port closed
// and every commit traced, commits go on as ever, every one counted, and
// the node logs the failed exports once (the first of each minute), not
// once per attempt.
func TestTelemetry_CollectorUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close() // nothing listens there now
	s := iad
	s.Extra = []string{fmt.Sprintf("telemetry: {otlp_endpoint: %q, sample_commits: 1}", "http://"+dead)}
	// Exports every 50 ms, each given up after 300 ms: many attempts.
	s.Env = []string{"OTEL_BSP_SCHEDULE_DELAY=50", "OTEL_EXPORTER_OTLP_TIMEOUT=300", "OTEL_METRIC_EXPORT_INTERVAL=200"}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, s)
	c.Start(t)
	n := c.Node(iad.Name)
	db := testingutil.MustOpenSQLite(t, filepath.Join(n.MountDir, "app.db"), "wal")
	const commits = 2000
	done := make(chan error, 1)
	go func() {
		if _, err := db.Exec("CREATE TABLE t (x INTEGER)"); err != nil {
			done <- err
			return
		}
		for i := range commits {
			if _, err := db.Exec("INSERT INTO t VALUES (?)", i); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("commits stalled with the collector unreachable")
	}
	time.Sleep(2 * time.Second) // export attempts go on failing
	st := adminStatus(t, n)
	var txid uint64
	for _, d := range st.Databases {
		if d.Name == "app.db" {
			txid = d.TXID
		}
	}
	if txid < commits+1 {
		t.Fatalf("app.db at txid %d after %d commits", txid, commits+1)
	}
	mustMetrics(t, n, fmt.Sprintf(`meridian_commits_total{db="app.db"} %d`, txid))
	log, err := os.ReadFile(n.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(string(log), "telemetry: export failed"); got != 1 {
		t.Errorf("the log says %d times that exports failed in %s, want once (at most one a minute):\n%s", got, dead, log)
	}
	if !strings.Contains(string(log), dead) {
		t.Errorf("the log does not name the collector's address %s", dead)
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/internal/testingutil/roles"
	"github.com/meridian-db/meridian/regiond"
)

// TestAdmin_Status runs a primary and a replica, with a third node of
// their peers down, and checks what the admin API and `regiond status`
// say against the mounts' -pos files: roles, epochs, positions, the
// primary's view of the replica, readiness; then stops the primary and
// waits for the replica to say it is not ready, once it is further
// behind than router.max_lag.
func TestAdmin_Status(t *testing.T) {
	t.Parallel()
	fraLag := fra
	fraLag.Extra = []string{"router: {max_lag: 1s}"}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fraLag, syd)
	primary, replica, down := c.Node(iad.Name), c.Node(fra.Name), c.Node(syd.Name)
	primary.Start(t)
	replica.Start(t)
	evs := watchEvents(t, primary)
	db := testingutil.MustOpenSQLite(t, filepath.Join(primary.MountDir, "app.db"), "wal")
	if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if _, err := db.Exec(`INSERT INTO t VALUES (?)`, i); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	want := c.WaitCaughtUp(t, time.Minute, "app.db")["app.db"]
	// The replica's acknowledgement reaches the primary a moment after
	// its -pos file moves.
	var ps regiond.Status
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		ps = adminStatus(t, primary)
		if len(ps.Replicas) == 1 && len(ps.Replicas[0].Databases) == 1 && ps.Replicas[0].Databases[0].Acked == want.String() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s /status after a minute: replicas %+v, want %s to have acknowledged app.db at %s", primary.Name, ps.Replicas, replica.Name, want)
		}
	}

	if ps.Addr != primary.Addr {
		t.Errorf("%s /status addr %q, want its replication.listen %s (no replication.advertise)", primary.Name, ps.Addr, primary.Addr)
	}
	if ps.Node != primary.Name || ps.Region != "iad" || ps.Role != regiond.RolePrimary || ps.Primary != primary.Name || ps.Epoch != 1 || !ps.Ready {
		t.Errorf("%s /status: node %q region %q role %q primary %q epoch %d ready %v; want %s, iad, primary, %s, 1, true",
			primary.Name, ps.Node, ps.Region, ps.Role, ps.Primary, ps.Epoch, ps.Ready, primary.Name, primary.Name)
	}
	if len(ps.Databases) != 1 || ps.Databases[0].Name != "app.db" || ps.Databases[0].Pos != want.String() || ps.Databases[0].TXID != uint64(want.TXID) {
		t.Errorf("%s /status databases %+v, want app.db at %s", primary.Name, ps.Databases, want)
	}
	if r := ps.Replicas[0]; r.Node != replica.Name || r.Region != "fra" || !r.Connected || r.LagMS != 0 || r.Databases[0].LagMS != 0 {
		t.Errorf("%s /status replica %+v, want %s of fra, connected, 0 ms behind", primary.Name, r, replica.Name)
	}
	if ps.Durability == nil || ps.Durability.Mode != "async" {
		t.Errorf("%s /status durability %+v, want async", primary.Name, ps.Durability)
	}
	if got := fmt.Sprint(ps.Peers); got != fmt.Sprintf("[{%s fra %s %s } {%s syd %s %s }]", replica.Name, replica.Addr, replica.Admin, down.Name, down.Addr, down.Admin) {
		t.Errorf("%s /status peers %s, want fra-1 and syd-1 with their addresses", primary.Name, got)
	}

	rs := adminStatus(t, replica)
	if rs.Role != regiond.RoleReplica || rs.Primary != primary.Name || rs.Epoch != 1 || !rs.Ready || rs.LagMS != 0 || rs.MaxLagMS != 1000 {
		t.Errorf("%s /status: role %q primary %q epoch %d ready %v (%s) lag %d ms max %d ms; want replica of %s, epoch 1, ready, 0 ms behind, max 1000 ms",
			replica.Name, rs.Role, rs.Primary, rs.Epoch, rs.Ready, rs.NotReady, rs.LagMS, rs.MaxLagMS, primary.Name)
	}
	if got, ok := replica.Pos(t, "app.db"); !ok || len(rs.Databases) != 1 || rs.Databases[0].Pos != got.String() || rs.Databases[0].Primary != want.String() || rs.Databases[0].LagMS != 0 {
		t.Errorf("%s /status databases %+v; its app.db-pos says %s, the primary's %s", replica.Name, rs.Databases, got, want)
	}
	if rs.Stream == nil || !rs.Stream.Connected || rs.Stream.LastHeard.IsZero() {
		t.Errorf("%s /status stream %+v, want connected, with a heartbeat", replica.Name, rs.Stream)
	}
	if rs.Replicas != nil || rs.Durability != nil {
		t.Errorf("%s /status has a primary's replicas %+v or durability %+v", replica.Name, rs.Replicas, rs.Durability)
	}
	mustAdmin(t, primary, "/readyz", http.StatusOK, "ready: primary\n")
	mustAdmin(t, replica, "/readyz", http.StatusOK, "ready: replica of iad-1, 0 ms behind (router.max_lag 1000 ms)\n")
	mustAdmin(t, replica, "/healthz", http.StatusOK, "ok\n")
	// /events told of every commit, in order, the last at the position
	// the -pos file says.
	var commits []regiond.Event
	for _, ev := range evs() {
		if ev.Type == regiond.EventCommit {
			commits = append(commits, ev)
		}
	}
	if len(commits) != int(want.TXID) {
		t.Errorf("%s /events: %d commit events, want %d", primary.Name, len(commits), want.TXID)
	}
	for i, ev := range commits {
		if ev.DB != "app.db" || ev.Node != primary.Name || ev.Size <= 0 || !strings.HasPrefix(ev.Pos, fmt.Sprintf("%016x/", i+1)) {
			t.Errorf("commit event %d: %+v, want app.db on %s at txid %d, with its size", i, ev, primary.Name, i+1)
		}
	}
	if len(commits) > 0 && commits[len(commits)-1].Pos != want.String() {
		t.Errorf("last commit event at %s, want %s", commits[len(commits)-1].Pos, want)
	}
	txid := fmt.Sprint(uint64(want.TXID))
	mustMetrics(t, primary, `meridian_role{role="primary"} 1`, "meridian_lease_epoch 1", "meridian_ready 1",
		`meridian_db_txid{db="app.db"} `+txid, `meridian_commits_total{db="app.db"} `+txid,
		`meridian_replica_connected{replica="fra-1",replica_region="fra"} 1`,
		`meridian_replica_acked_txid{db="app.db",replica="fra-1",replica_region="fra"} `+txid,
		`meridian_replica_lag_seconds{db="app.db",replica="fra-1",replica_region="fra"} 0`,
		"go_goroutines ", "process_resident_memory_bytes ")
	mustMetrics(t, replica, `meridian_role{role="replica"} 1`, "meridian_lease_epoch 1", "meridian_ready 1", "meridian_lag_seconds 0",
		`meridian_db_txid{db="app.db"} `+txid, `meridian_db_lag_seconds{db="app.db"} 0`,
		"meridian_stream_connected 1", "meridian_stream_reconnects_total 0")
	if code, _, err := replica.AdminGet("/nothing"); err != nil || code != http.StatusNotFound {
		t.Errorf("GET /nothing: %d, %v; want 404", code, err)
	}

	// `regiond status`, from the replica's config: every node, the one
	// that is down too.
	out := runStatusCmd(t, "-config", replica.Config)
	for _, row := range [][]string{
		{"iad-1", "iad", "primary", "1", "yes", "-", primary.Admin},
		{"fra-1", "fra", "replica", "1", "yes", "0 ms", replica.Admin},
		{"syd-1", "syd", "?", "ask " + down.Admin + ":", "connection refused"},
		{"app.db", "iad-1", want.String(), "-"},
		{"app.db", "fra-1", want.String(), "0 ms"},
	} {
		if !hasRow(out, row) {
			t.Errorf("regiond status printed:\n%s\nwant a row with %q", out, row)
		}
	}
	var nodes []nodeStatus
	if err := json.Unmarshal([]byte(runStatusCmd(t, "-json", "-admin", primary.Admin)), &nodes); err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 3 || nodes[0].Status.Node != primary.Name || nodes[1].Status.Node != replica.Name || nodes[1].Status.Databases[0].Pos != want.String() ||
		nodes[2].Status.Node != down.Name || !strings.Contains(nodes[2].Error, "connection refused") {
		t.Errorf("regiond status -json: %+v, want iad-1, fra-1 at %s, syd-1 unreachable", nodes, want)
	}

	// The primary stops: the replica is soon further behind than its
	// max_lag of 1s, and not ready.
	if err := primary.Stop(); err != nil {
		t.Fatal(err)
	}
	var body []byte
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		code, b, err := replica.AdminGet("/readyz")
		if err != nil {
			t.Fatal(err)
		}
		if code == http.StatusServiceUnavailable {
			body = b
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s /readyz still %d (%q) 30 s after the primary stopped, want 503", replica.Name, code, b)
		}
	}
	if !strings.HasPrefix(string(body), "not ready: ") || !strings.Contains(string(body), "behind the primary iad-1, more than router.max_lag 1s") {
		t.Errorf("%s /readyz: %q, want it not ready, further behind the primary than router.max_lag 1s", replica.Name, body)
	}
	out = runStatusCmd(t, "-admin", replica.Admin)
	if !hasRow(out, []string{"fra-1", "fra", "replica", "1", "no:", "behind the primary iad-1"}) || !hasRow(out, []string{"iad-1", "iad", "?", "connection refused"}) {
		t.Errorf("regiond status with the primary down printed:\n%s\nwant fra-1 not ready and iad-1 unreachable", out)
	}
}

// TestAdmin_StatusErrors: `regiond status` with nothing to ask says what
// to do.
func TestAdmin_StatusErrors(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "regiond.yml")
	if err := os.WriteFile(cfg, []byte("node: iad-1\nregion: iad\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	err := Run(context.Background(), []string{"status", "-config", cfg}, &stdout, &stderr)
	if err == nil || !strings.Contains(err.Error(), cfg+" sets no admin.listen; set it (and restart the node), or give -admin HOST:PORT") {
		t.Errorf("status without admin.listen: %v", err)
	}
	addr := testingutil.FreeAddr(t)
	err = Run(context.Background(), []string{"status", "-admin", addr}, &stdout, &stderr)
	if err == nil || !strings.Contains(err.Error(), "ask "+addr+": ") || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("status of a node that is down: %v", err)
	}
}

// adminStatus gets n's /status.
func adminStatus(t *testing.T, n *testingutil.ClusterNode) regiond.Status {
	t.Helper()
	st, err := roles.Status(n)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// mustMetrics checks that n's /metrics has a line starting with each of
// lines.
func mustMetrics(t *testing.T, n *testingutil.ClusterNode, lines ...string) {
	t.Helper()
	code, b, err := n.AdminGet("/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("%s /metrics: %d, %v", n.Name, code, err)
	}
	for _, want := range lines {
		found := false
		for line := range strings.SplitSeq(string(b), "\n") {
			if strings.HasPrefix(line, want) {
				found = true
				break
			}
		}
		if !found {
			t.Errorf("%s /metrics has no line %q:\n%s", n.Name, want, grepMeridian(string(b)))
		}
	}
}

// grepMeridian returns the lines of metrics text about meridian.
func grepMeridian(text string) string {
	var out []string
	for line := range strings.SplitSeq(text, "\n") {
		if strings.HasPrefix(line, "meridian_") {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// mustAdmin checks that n's admin API answers path with code and body.
func mustAdmin(t *testing.T, n *testingutil.ClusterNode, path string, code int, body string) {
	t.Helper()
	got, b, err := n.AdminGet(path)
	if err != nil || got != code || string(b) != body {
		t.Errorf("%s GET %s: %d %q, %v; want %d %q", n.Name, path, got, b, err, code, body)
	}
}

// runStatusCmd runs `regiond status args` and returns what it printed.
func runStatusCmd(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if err := Run(context.Background(), append([]string{"status"}, args...), &stdout, &stderr); err != nil {
		t.Fatalf("regiond status %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// hasRow reports whether a line of out holds every cell of row, in order.
func hasRow(out string, row []string) bool {
	for line := range strings.SplitSeq(out, "\n") {
		rest, ok := line, true
		for _, cell := range row {
			i := strings.Index(rest, cell)
			if i < 0 {
				ok = false
				break
			}
			rest = rest[i+len(cell):]
		}
		if ok {
			return true
		}
	}
	return false
}

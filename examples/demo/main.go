// Command demo runs Meridian in three regions on one machine (make demo):
// a Consul dev agent; iad, fra and syd, each a regiond running the
// guestbook (examples/guestbook) as its child with the router in front;
// mutual TLS between the nodes from a CA made on the spot; and toxiproxy
// proxies, in this process, between every pair of regions, for
// replication and for writes forwarded between routers, that delay each
// direction by the one-way latency between the two regions. It makes a
// write through the region farthest from the primary, prints when it was
// visible in each region, then a menu of things to try, and runs until
// Ctrl-C. With -check it takes a scripted tour (a write, the primary
// killed, a write through every region) and exits (make demo-check).
//
//	make demo
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/internal/testingutil/roles"
	"github.com/meridian-db/meridian/router"
)

// region is one region of the demo, on fixed loopback ports so that the
// menu's commands can be pasted as they are.
type region struct {
	name, node               string
	router, app, admin, repl string
	lat, lon                 float64
}

var regions = []region{
	{"iad", "iad-1", "127.0.0.1:8081", "127.0.0.1:3001", "127.0.0.1:20211", "127.0.0.1:20210", 38.9, -77.4},
	{"fra", "fra-1", "127.0.0.1:8082", "127.0.0.1:3002", "127.0.0.1:20221", "127.0.0.1:20220", 50.1, 8.7},
	{"syd", "syd-1", "127.0.0.1:8083", "127.0.0.1:3003", "127.0.0.1:20231", "127.0.0.1:20230", -33.9, 151.2},
}

// roundTrips are median round-trip times between the AWS regions the
// demo's regions are named after (us-east-1 in Virginia, eu-central-1 in
// Frankfurt, ap-southeast-2 in Sydney), as published on the inter-region
// latency grid at https://www.cloudping.co/grid (p50, rounded). Each
// direction of a link between two regions is delayed by half of it.
var roundTrips = map[[2]string]time.Duration{
	{"iad", "fra"}: 90 * time.Millisecond,
	{"iad", "syd"}: 198 * time.Millisecond,
	{"fra", "syd"}: 252 * time.Millisecond,
}

func oneWay(a, b string) time.Duration {
	if rt, ok := roundTrips[[2]string{a, b}]; ok {
		return rt / 2
	}
	return roundTrips[[2]string{b, a}] / 2
}

func main() {
	check := flag.Bool("check", false, "take the scripted tour unattended and exit (make demo-check)")
	dir := flag.String("dir", envOr("DEMO_DIR", "/tmp/meridian-demo"), "the demo's state directory, wiped at start unless DEMO_KEEP=1 (DEMO_DIR)")
	bin := flag.String("regiond", "bin/regiond", "regiond binary (make build)")
	app := flag.String("app", "bin/guestbook", "the example app (make build)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *dir, *bin, *app, *check); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

// demoTB is the harness the cluster runs under, with its directories in
// the demo's state directory, kept after the demo for a look.
type demoTB struct {
	*testingutil.Harness
	dir   string
	n     int
	notes []string
}

// While the demo stops, what the harness finds wrong is kept, not
// printed: a Ctrl-C from a terminal reaches the nodes and Consul too,
// which then stop on their own, and the harness says so. Whether
// anything is left is what counts (leftovers); the nodes' logs are in
// their files.
func (t *demoTB) Error(args ...any) { t.notes = append(t.notes, fmt.Sprint(args...)) }

func (t *demoTB) Errorf(format string, args ...any) {
	t.notes = append(t.notes, fmt.Sprintf(format, args...))
}

func (t *demoTB) Logf(string, ...any) {}

func (t *demoTB) Failed() bool { return false }

func (t *demoTB) TempDir() string {
	t.n++
	d := filepath.Join(t.dir, fmt.Sprintf("d%d", t.n))
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

func run(ctx context.Context, dir, bin, app string, check bool) error {
	exes, err := preflight(bin, app)
	if err != nil {
		return err
	}
	if err := prepareDir(dir); err != nil {
		return err
	}
	h := &demoTB{Harness: &testingutil.Harness{Prefix: "meridian-demo"}, dir: dir}
	// A second Ctrl-C exits at once: the nodes get SIGTERM from the
	// kernel as their parent dies, and unmount.
	go func() {
		<-ctx.Done()
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
		<-sig
		fmt.Println("\nsecond Ctrl-C: exiting now; the nodes stop and unmount by themselves")
		os.Exit(130)
	}()
	err = h.Run(func() error { return tour(ctx, h, dir, exes[0], exes[1], check) })
	if left := leftovers(dir); left != "" {
		err = errors.Join(err, fmt.Errorf("after stopping, left: %s; on the way: %s", left, strings.Join(h.notes, "; ")))
	} else if check && len(h.notes) > 0 {
		// Unattended, only the demo stops the nodes: anything the
		// harness found is wrong.
		err = errors.Join(err, fmt.Errorf("stopping: %s", strings.Join(h.notes, "; ")))
	}
	if err != nil {
		return err
	}
	fmt.Println("stopped: no process, mount or port of the demo is left")
	return nil
}

// preflight checks what the demo needs before it starts anything.
func preflight(bin, app string) ([2]string, error) {
	var exes [2]string
	if os.Geteuid() != 0 {
		return exes, errors.New("the demo mounts FUSE filesystems, which needs root: run make demo as root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return exes, errors.New("no /dev/fuse: install FUSE (apt-get install -y fuse3) or load the module (modprobe fuse)")
	}
	if _, err := exec.LookPath("fusermount3"); err != nil {
		return exes, errors.New("no fusermount3 on PATH: apt-get install -y fuse3")
	}
	for i, p := range []string{bin, app} {
		exe, err := filepath.Abs(p)
		if err == nil {
			_, err = os.Stat(exe)
		}
		if err != nil {
			return exes, fmt.Errorf("%s: %v (make build builds bin/regiond and bin/guestbook)", p, err)
		}
		exes[i] = exe
	}
	if _, err := testingutil.ConsulBinary(); err != nil {
		return exes, fmt.Errorf("%v (make demo sets MERIDIAN_CONSUL from scripts/install-consul.sh)", err)
	}
	if os.Getenv("MERIDIAN_JAEGER") == "" {
		return exes, errors.New("MERIDIAN_JAEGER is not set (make demo sets it from scripts/install-jaeger.sh)")
	}
	for _, p := range [][2]string{{jaegerOTLP, "Jaeger's OTLP receiver"}, {jaegerUI, "Jaeger's API"}, {jaegerGRPC, "Jaeger's gRPC API"}, {traceViewer, "the trace page"}} {
		l, err := net.Listen("tcp", p[0])
		if err != nil {
			return exes, fmt.Errorf("port %s (%s) is taken: stop what listens there (ss -ltnp | grep %s) and run the demo again", p[0], p[1], p[0])
		}
		l.Close()
	}
	for _, r := range regions {
		for _, p := range [][2]string{{r.router, "router"}, {r.app, "app"}, {r.admin, "admin API"}, {r.repl, "replication"}} {
			l, err := net.Listen("tcp", p[0])
			if err != nil {
				return exes, fmt.Errorf("port %s (%s's %s) is taken: stop what listens there (ss -ltnp | grep %s) and run the demo again", p[0], r.name, p[1], p[0])
			}
			l.Close()
		}
	}
	return exes, nil
}

// prepareDir wipes the state of an earlier demo, unless DEMO_KEEP=1,
// unmounting what a demo that was killed left mounted.
func prepareDir(dir string) error {
	for _, m := range mountsUnder(dir) {
		if err := testingutil.Unmount(m); err != nil {
			return fmt.Errorf("unmount %s, left by an earlier demo: %w", m, err)
		}
	}
	if os.Getenv("DEMO_KEEP") != "1" {
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("wipe %s: %w", dir, err)
		}
	}
	return os.MkdirAll(dir, 0o755)
}

// mountsUnder returns the mount points under dir.
func mountsUnder(dir string) []string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for line := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			out = append(out, f[4])
		}
	}
	return out
}

// leftovers says what of the demo still runs, is mounted or listens.
func leftovers(dir string) string {
	var left []string
	if m := mountsUnder(dir); len(m) > 0 {
		left = append(left, "mounted: "+strings.Join(m, ", "))
	}
	// regiond names a file under dir in its arguments, its app in its
	// environment (MERIDIAN_MOUNT_DIR).
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		if filepath.Base(p) == fmt.Sprint(os.Getpid()) {
			continue
		}
		cmdline, _ := os.ReadFile(p + "/cmdline")
		environ, _ := os.ReadFile(p + "/environ")
		if bytes.Contains(cmdline, []byte(dir+"/")) || bytes.Contains(environ, []byte("MERIDIAN_MOUNT_DIR="+dir+"/")) {
			left = append(left, "process "+filepath.Base(p)+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	addrs := []string{jaegerOTLP, jaegerUI, jaegerGRPC, traceViewer}
	for _, r := range regions {
		addrs = append(addrs, r.router, r.app, r.admin, r.repl)
	}
	for _, a := range addrs {
		if l, err := net.Listen("tcp", a); err != nil {
			left = append(left, "port "+a+" in use")
		} else {
			l.Close()
		}
	}
	return strings.Join(left, "; ")
}

func tour(ctx context.Context, h *demoTB, dir, exe, app string, check bool) error {
	fmt.Printf("Meridian demo: three regions on this machine; state in %s\n", dir)
	agent := testingutil.StartConsul(h)
	j, err := startJaeger(ctx, dir)
	if err != nil {
		return err
	}
	h.Cleanup(j.stop) // after the nodes, which send their last spans as they stop
	command := func(args ...string) *exec.Cmd { return exec.Command(exe, args...) }
	var specs []testingutil.ClusterNodeSpec
	for _, r := range regions {
		specs = append(specs, testingutil.ClusterNodeSpec{Name: r.node, Region: r.name, App: []string{app},
			Extra: []string{fmt.Sprintf("telemetry: {otlp_endpoint: %q}", "http://"+jaegerOTLP)},
			// Spans reach Jaeger within a fifth of a second.
			Env: []string{"OTEL_BSP_SCHEDULE_DELAY=200"}})
	}
	c := testingutil.NewCluster(h, command, "", specs...)
	for i, n := range c.Nodes {
		r := regions[i]
		n.Router, n.AppAddr, n.Admin, n.Addr = r.router, r.app, r.admin, r.repl
	}
	if err := c.DelayLinks(h, func(from, to *testingutil.ClusterNode) time.Duration { return oneWay(from.Region, to.Region) }); err != nil {
		return err
	}
	c.UseConsul(agent.URL, "check_ttl: 1s", "lock_delay: 500ms", "prefer_regions: [iad, fra, syd]")
	c.Start(h)
	primary, _ := roles.WaitOnePrimary(h, c, 0, time.Minute)
	c.Primary = primary.Name
	for _, n := range c.Nodes {
		if err := testingutil.WaitHTTP(ctx, n.RouterURL()+"/healthz", time.Minute); err != nil {
			return err
		}
	}
	first, err := firstWrite(ctx, primary)
	if err != nil {
		return err
	}
	c.WaitCaughtUp(h, time.Minute, "app.db")

	fmt.Printf("  consul: %s (a dev agent; it holds the write lease)\n", agent.URL)
	fmt.Printf("  traces: Jaeger, OTLP/gRPC on %s, its API on http://%s; trace pages on http://%s/trace/<trace id>\n\n", jaegerOTLP, jaegerUI, traceViewer)
	fmt.Printf("  %-6s %-6s %-24s %-25s %s\n", "region", "node", "app, through its router", "admin API", "role")
	for _, n := range c.Nodes {
		role := "replica"
		if n == primary {
			role = "primary"
		}
		fmt.Printf("  %-6s %-6s %-24s %-25s %s\n", n.Region, n.Name, n.RouterURL(), "http://"+n.Admin, role)
	}
	fmt.Printf("\n  one-way latency between regions (half the round trips published at cloudping.co): iad-fra %v, iad-syd %v, fra-syd %v\n\n",
		oneWay("iad", "fra"), oneWay("iad", "syd"), oneWay("fra", "syd"))

	far := farthest(c, primary)
	traceID, err := writeAndWatch(ctx, c, primary, far, first.ID)
	if err != nil {
		return err
	}
	menu(c, primary, exe)
	if !check {
		fmt.Println("The cluster runs until Ctrl-C.")
		<-ctx.Done()
		fmt.Println("\nstopping: the nodes stop their apps and unmount")
		return nil
	}
	if err := checkTracePage(ctx, dir, traceID, primary, far, c); err != nil {
		return err
	}
	return checkTour(ctx, h, c, primary)
}

// firstWrite writes through the primary's router until its app has made
// its table.
func firstWrite(ctx context.Context, primary *testingutil.ClusterNode) (entry, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		_, e, err := post(primary.RouterURL(), "demo", "the first entry")
		if err == nil {
			return e, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return entry{}, fmt.Errorf("no write through %s succeeded: %w", primary.RouterURL(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// farthest returns the replica region farthest from the primary.
func farthest(c *testingutil.Cluster, primary *testingutil.ClusterNode) *testingutil.ClusterNode {
	var far *testingutil.ClusterNode
	for _, n := range c.Nodes {
		if n != primary && n.Running() && (far == nil || oneWay(primary.Region, n.Region) > oneWay(primary.Region, far.Region)) {
			far = n
		}
	}
	return far
}

// writeAndWatch writes an entry through the router of from and prints
// when each region's app could read it: every region is watched from
// before the write is sent, for an entry past after.
func writeAndWatch(ctx context.Context, c *testingutil.Cluster, primary, from *testingutil.ClusterNode, after int64) (traceID string, err error) {
	msg := fmt.Sprintf("hello from %s at %s", from.Region, time.Now().Format(time.RFC3339Nano))
	type seen struct {
		n   *testingutil.ClusterNode
		at  time.Time
		e   entry
		err error
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan seen, len(c.Nodes))
	for _, n := range c.Nodes {
		go func() {
			at, e, err := watch(wctx, n, after, msg)
			ch <- seen{n, at, e, err}
		}()
	}
	began := time.Now()
	tp, traceID := newTraceparent()
	hdr, e, err := post(from.RouterURL(), "demo", msg, "traceparent", tp)
	if err != nil {
		return "", err
	}
	took := time.Since(began)
	committed, err := time.Parse(time.RFC3339Nano, e.CreatedAt)
	if err != nil {
		return "", fmt.Errorf("entry %d: created_at %q", e.ID, e.CreatedAt)
	}
	fmt.Printf("A write through %s, the region farthest from the primary %s: %s forwarded it to %s, which answered in %.1f ms\n",
		from.Region, primary.Name, from.Name, hdr.Get(router.ServedByHeader), ms(took))
	fmt.Printf("  (entry %d, %s: %s)\n", e.ID, router.TXIDHeader, hdr.Get(router.TXIDHeader))
	lags := map[string]seen{}
	for range c.Nodes {
		s := <-ch
		lags[s.n.Name] = s
	}
	for _, n := range c.Nodes {
		s := lags[n.Name]
		switch {
		case s.err != nil:
			return "", fmt.Errorf("entry %d in %s: %w", e.ID, n.Region, s.err)
		case n == primary:
			fmt.Printf("  visible in %s after %6.1f ms (the primary: committed there)\n", n.Region, 0.0)
		default:
			fmt.Printf("  visible in %s after %6.1f ms (one-way latency from %s: %v)\n", n.Region, ms(s.at.Sub(committed)), primary.Region, oneWay(primary.Region, n.Region))
		}
	}
	fmt.Println("  (from the commit on the primary, by the entry's created_at, to the first read of it through the region's router; the nodes share this machine's clock)")
	// Both routers, the app, the commit, and a ship and an apply per
	// replica.
	want := 4 + 2*(len(c.Nodes)-1)
	t, err := awaitTrace(ctx, traceID, want)
	if err != nil {
		return "", err
	}
	fmt.Printf("  its trace, %d spans from the router in %s to the apply in every replica region: http://%s/trace/%s\n", len(t.Spans), from.Region, traceViewer, traceID)
	for _, r := range rows(t) {
		if r.Operation == "apply" {
			fmt.Printf("    apply in %-13s %s\n", strings.TrimPrefix(r.Service, "meridian-"), r.Details)
		}
	}
	fmt.Println()
	return traceID, nil
}

// checkTracePage renders the page of trace id in headless Chromium,
// saves a screenshot in dir, and checks that the page shows the commit on
// the primary and an apply span in every other region (make demo-check).
func checkTracePage(ctx context.Context, dir, id string, primary, from *testingutil.ClusterNode, c *testingutil.Cluster) error {
	png := filepath.Join(dir, "trace.png")
	dom, err := screenshot(ctx, fmt.Sprintf("http://%s/trace/%s", traceViewer, id), png)
	if err != nil {
		return err
	}
	var named []string
	want := []string{"meridian-" + from.Region + "</td><td>router<", "meridian-" + primary.Region + "</td><td>commit<"}
	for _, n := range c.Nodes {
		if n != primary {
			want = append(want, "meridian-"+n.Region+"</td><td>apply<")
		}
	}
	for _, w := range want {
		if !strings.Contains(dom, w) {
			return fmt.Errorf("the trace page in Chromium does not show %q (screenshot %s)", strings.TrimSuffix(strings.ReplaceAll(w, "</td><td>", " "), "<"), png)
		}
		named = append(named, strings.TrimSuffix(strings.ReplaceAll(w, "</td><td>", " "), "<"))
	}
	fmt.Printf("check: the trace page in headless Chromium shows %s; screenshot %s\n", strings.Join(named, ", "), png)
	return nil
}

// watch reads the entries past after through the node's router (plain
// reads, no token), every millisecond, until one has message msg, and
// returns when it saw it.
func watch(ctx context.Context, n *testingutil.ClusterNode, after int64, msg string) (time.Time, entry, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("%s/api/entries?after=%d", n.RouterURL(), after))
		if err == nil {
			var es []entry
			if resp.StatusCode == http.StatusOK {
				err = json.NewDecoder(resp.Body).Decode(&es)
			}
			resp.Body.Close()
			for _, e := range es {
				if e.Message == msg {
					return time.Now(), e, nil
				}
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return time.Time{}, entry{}, fmt.Errorf("not visible within 30s (last: %v)", err)
		}
		time.Sleep(time.Millisecond)
	}
}

// menu prints the things to try, as commands to paste.
func menu(c *testingutil.Cluster, primary *testingutil.ClusterNode, exe string) {
	other := c.Nodes[1]
	if other == primary {
		other = c.Nodes[0]
	}
	fra := c.Node("fra-1")
	fmt.Println("Things to try (paste them in another terminal):")
	fmt.Printf("  open %s/ and %s/live in a browser: sign in one region, watch it stream in another\n", c.Node("iad-1").RouterURL(), c.Node("syd-1").RouterURL())
	fmt.Printf("  write through fra:        curl -si -H 'Content-Type: application/json' -d '{\"name\":\"you\",\"message\":\"hi\"}' %s/entries\n", fra.RouterURL())
	fmt.Printf("  read your write in fra:   curl -si -H 'Meridian-TXID: <the Meridian-Txid it answered>' %s/api/entries/<id>\n", fra.RouterURL())
	fmt.Printf("  read in each region:      for p in 8081 8082 8083; do curl -s http://127.0.0.1:$p/api/entries | head -c 200; echo; done\n")
	fmt.Printf("  the cluster:              %s status -config %s\n", exe, primary.Config)
	fmt.Printf("  hand the lease over:      %s handoff -to %s -config %s\n", exe, other.Name, primary.Config)
	fmt.Printf("  kill the primary:         kill -9 %d   # %s; then watch status: another node takes the lease within a few seconds\n", primary.Pid(), primary.Name)
	fmt.Printf("  logs:                     %s\n\n", filepath.Join(filepath.Dir(primary.LogPath), "..", "*", "regiond.log"))
}

// checkTour kills the primary, waits for the next, starts the old one
// again, and writes through every region's router (make demo-check).
func checkTour(ctx context.Context, h *demoTB, c *testingutil.Cluster, primary *testingutil.ClusterNode) error {
	fmt.Printf("check: kill -9 %s (pid %d), the primary\n", primary.Name, primary.Pid())
	killed := time.Now()
	primary.Kill(h)
	next, _ := roles.WaitOnePrimary(h, c, 0, time.Minute)
	fmt.Printf("check: new primary %s, %.2f s after the kill\n", next.Name, time.Since(killed).Seconds())
	primary.Start(h)
	if err := testingutil.WaitHTTP(ctx, primary.RouterURL()+"/healthz", time.Minute); err != nil {
		return err
	}
	fmt.Printf("check: %s started again, a replica of %s\n", primary.Name, next.Name)
	for _, n := range c.Nodes {
		began := time.Now()
		hdr, e, err := post(n.RouterURL(), "check", "through "+n.Region)
		if err != nil {
			return fmt.Errorf("write through %s: %w", n.Region, err)
		}
		fmt.Printf("check: a write through %s: 201 Created in %.1f ms, entry %d, served by %s\n", n.Region, ms(time.Since(began)), e.ID, hdr.Get(router.ServedByHeader))
	}
	fmt.Println("check: stopping")
	return nil
}

type entry struct {
	ID        int64  `json:"id"`
	Message   string `json:"message"`
	CreatedAt string `json:"created_at"`
}

// post writes an entry through base, with the request headers hdr (name,
// value, ...).
func post(base, name, msg string, hdr ...string) (http.Header, entry, error) {
	b, _ := json.Marshal(map[string]string{"name": name, "message": msg})
	req, err := http.NewRequest("POST", base+"/entries", bytes.NewReader(b))
	if err != nil {
		return nil, entry{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, entry{}, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		return nil, entry{}, fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var e entry
	if err := json.Unmarshal(body, &e); err != nil {
		return nil, entry{}, fmt.Errorf("%s: %w", body, err)
	}
	return resp.Header, e, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

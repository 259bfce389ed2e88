// Command routerbench measures what the router costs and what it saves:
// three real regiond processes (iad-1 primary by the static lease, fra-1
// and syd-1 replicas, mutual TLS), each running the example app
// (bin/guestbook) as its child with the router in front. With -latency,
// every link between two nodes (replication and router to router) goes
// through a toxiproxy proxy that delays each direction by that much, as
// between regions; clients and each node's own app stay on loopback.
//
// Side by side, per latency, from a client in fra:
//
//   - reads: GET /api/entries/1 through fra's router against straight to
//     fra's app;
//
//   - writes: POST /entries through fra's router (forwarded to iad's)
//     against the client in fra sending it across the WAN to iad's
//     router itself (as to a central database), and against a client in
//     iad writing through iad's router and straight to iad's app;
//     forwarding should cost one round trip (2 × latency) plus the
//     router's own time;
//
//   - read-your-writes: a read through fra's router right after each
//     forwarded write, with its token: how long it waited (Meridian-RYW).
//
//     make build && go run ./bench/routerbench -latency 0,40ms
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/router"
)

func main() {
	bin := flag.String("regiond", "bin/regiond", "regiond binary (make build)")
	app := flag.String("app", "bin/guestbook", "the example app (make build)")
	n := flag.Int("n", 500, "requests of each kind per latency")
	latencies := flag.String("latency", "0,40ms", "one-way latencies between the nodes, comma-separated")
	flag.Parse()
	var exes [2]string
	for i, p := range []string{*bin, *app} {
		exe, err := testingutil.Executable(p)
		if err != nil {
			fmt.Fprintf(os.Stderr, "routerbench: %v\n", err)
			os.Exit(2)
		}
		exes[i] = exe
	}
	lats, err := testingutil.Latencies(*latencies)
	if err != nil {
		fmt.Fprintf(os.Stderr, "routerbench: -latency: %v\n", err)
		os.Exit(2)
	}
	fmt.Printf("routerbench: 3 regiond nodes with the guestbook behind the router (iad-1 primary, WAL, durability async), %d requests of each kind, one at a time\n\n", *n)
	fmt.Printf("%8s  %-44s %24s %10s\n", "latency", "requests", "p50 / p99 / max ms", "ratio p50")
	for _, lat := range lats {
		h := &testingutil.Harness{Prefix: "routerbench"}
		if err := h.Run(func() error { return measure(h, exes[0], exes[1], lat, *n) }); err != nil {
			fmt.Fprintf(os.Stderr, "routerbench: latency %v: %v\n", lat, err)
			os.Exit(1)
		}
	}
	fmt.Println("\nratio p50: against the row above it (the router against straight to the app; across the WAN against local;")
	fmt.Println("forwarded by fra's router against the client in fra writing to iad's router itself, as to a central database).")
	fmt.Println("forward cost: forwarded write p50 − the same write sent across the WAN by the client: what fra's router adds.")
}

func measure(h *testingutil.Harness, exe, app string, lat time.Duration, n int) error {
	command := func(args ...string) *exec.Cmd { return exec.Command(exe, args...) }
	var specs []testingutil.ClusterNodeSpec
	for _, s := range [][2]string{{"iad-1", "iad"}, {"fra-1", "fra"}, {"syd-1", "syd"}} {
		specs = append(specs, testingutil.ClusterNodeSpec{Name: s[0], Region: s[1], App: []string{app}})
	}
	c := testingutil.NewCluster(h, command, "iad-1", specs...)
	// The links between nodes go through proxies at any latency, 0 too,
	// so that the direct write across the WAN below takes the same path
	// as a forwarded one.
	if err := c.DelayLinks(h, func(_, _ *testingutil.ClusterNode) time.Duration { return lat }); err != nil {
		return err
	}
	c.Start(h)
	iad, fra := c.Node("iad-1"), c.Node("fra-1")
	for _, node := range c.Nodes {
		if err := testingutil.WaitHTTP(context.Background(), node.RouterURL()+"/healthz", 30*time.Second); err != nil {
			return err
		}
	}
	client := &http.Client{Timeout: 30 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, _, err := post(client, iad.RouterURL()); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("no write through iad's router succeeded within 30s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.WaitCaughtUp(h, time.Minute, "app.db")

	// Warm every connection first.
	for range 20 {
		_, _, _ = get(client, fra.RouterURL()+"/api/entries/1", "")
		_, _, _ = get(client, "http://"+fra.AppAddr+"/api/entries/1", "")
		_, _, _ = post(client, fra.RouterURL())
	}
	var (
		readApp, readRouter, writeApp, writeLocal, writeWAN, writeFwd, ryw []time.Duration
		fallback                                                           int
	)
	wan := "http://" + c.PeerRouter(c.Node("fra-1"), c.Node("iad-1")) // from fra to iad's router
	for range n {
		d, _, err := get(client, "http://"+fra.AppAddr+"/api/entries/1", "")
		if err != nil {
			return err
		}
		readApp = append(readApp, d)
		if d, _, err = get(client, fra.RouterURL()+"/api/entries/1", ""); err != nil {
			return err
		}
		readRouter = append(readRouter, d)
		if d, _, err = post(client, "http://"+iad.AppAddr); err != nil {
			return err
		}
		writeApp = append(writeApp, d)
		if d, _, err = post(client, iad.RouterURL()); err != nil {
			return err
		}
		writeLocal = append(writeLocal, d)
		if d, _, err = post(client, wan); err != nil {
			return err
		}
		writeWAN = append(writeWAN, d)
		d, resp, err := post(client, fra.RouterURL())
		if err != nil {
			return err
		}
		writeFwd = append(writeFwd, d)
		var e struct {
			ID int64 `json:"id"`
		}
		_ = json.Unmarshal(resp.body, &e)
		_, rresp, err := get(client, fmt.Sprintf("%s/api/entries/%d", fra.RouterURL(), e.ID), resp.Header.Get(router.TXIDHeader))
		if err != nil {
			return err
		}
		kind, msStr, _ := strings.Cut(rresp.Header.Get(router.RYWHeader), " ")
		ms, err := strconv.ParseFloat(msStr, 64)
		if err != nil {
			return fmt.Errorf("read after a write: %s %q", router.RYWHeader, rresp.Header.Get(router.RYWHeader))
		}
		if kind == "primary" {
			fallback++
		}
		ryw = append(ryw, time.Duration(ms*float64(time.Millisecond)))
	}
	row := func(label string, d []time.Duration, base []time.Duration) {
		ratio := ""
		if base != nil {
			ratio = fmt.Sprintf("%.2f", float64(pct(d, 50))/float64(pct(base, 50)))
		}
		fmt.Printf("%8v  %-44s %24s %10s\n", lat, label, stats(d), ratio)
	}
	row("read in fra, straight to fra's app", readApp, nil)
	row("read in fra, through fra's router", readRouter, readApp)
	row("write in iad, straight to iad's app", writeApp, nil)
	row("write in iad, through iad's router", writeLocal, writeApp)
	row("write in fra, to iad's router across the WAN", writeWAN, writeLocal)
	row("write in fra, through fra's router to iad's", writeFwd, writeWAN)
	row(fmt.Sprintf("read-your-writes wait in fra (%d to iad)", fallback), ryw, nil)
	cost := pct(writeFwd, 50) - pct(writeWAN, 50)
	fmt.Printf("%8v  %-44s %24s\n\n", lat, "forward cost: fra's router (p50 ms)", fmt.Sprintf("%.2f", float64(cost.Microseconds())/1000))
	return nil
}

type response struct {
	http.Header
	body []byte
}

func get(client *http.Client, url, token string) (time.Duration, response, error) {
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set(router.TXIDHeader, token)
	}
	return do(client, req, http.StatusOK)
}

func post(client *http.Client, base string) (time.Duration, response, error) {
	req, _ := http.NewRequest("POST", base+"/entries", bytes.NewReader([]byte(`{"name":"bench","message":"hello"}`)))
	req.Header.Set("Content-Type", "application/json")
	return do(client, req, http.StatusCreated)
}

func do(client *http.Client, req *http.Request, want int) (time.Duration, response, error) {
	began := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, response{}, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	took := time.Since(began)
	if err != nil {
		return 0, response{}, err
	}
	if resp.StatusCode != want {
		return 0, response{}, fmt.Errorf("%s %s: %s %s", req.Method, req.URL, resp.Status, b)
	}
	return took, response{resp.Header, b}, nil
}

func pct(d []time.Duration, q int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[max(0, (len(s)*q+99)/100-1)]
}

func stats(d []time.Duration) string {
	f := func(q int) string { return fmt.Sprintf("%.2f", float64(pct(d, q).Microseconds())/1000) }
	return f(50) + " / " + f(99) + " / " + f(100)
}

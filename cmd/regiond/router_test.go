package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/router"
)

var guestbookBuild struct {
	sync.Mutex
	path string
}

// guestbook builds the example app, once per test binary, and returns its
// path (in the run's temporary directory, which the test run removes).
func guestbook(t *testing.T) string {
	t.Helper()
	guestbookBuild.Lock()
	defer guestbookBuild.Unlock()
	if guestbookBuild.path != "" {
		return guestbookBuild.path
	}
	dir, err := os.MkdirTemp("", "guestbook-")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "guestbook")
	cmd := testingutil.Command(t, 5*time.Minute, "go", "build", "-o", bin, "../../examples/guestbook")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the guestbook: %v\n%s", err, out)
	}
	guestbookBuild.path = bin
	return bin
}

// appCluster starts three nodes, each running the guestbook as its child
// with the router in front; iad-1 holds the static lease. Each adjust
// changes every spec before the start.
func appCluster(t *testing.T, routerKeys string, adjust ...func(*testingutil.ClusterNodeSpec)) *testingutil.Cluster {
	t.Helper()
	app := []string{guestbook(t)}
	var specs []testingutil.ClusterNodeSpec
	for _, s := range []testingutil.ClusterNodeSpec{iad, fra, syd} {
		s.App, s.RouterKeys = app, routerKeys
		for _, f := range adjust {
			f(&s)
		}
		specs = append(specs, s)
	}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, specs...)
	c.Start(t)
	for _, n := range c.Nodes {
		waitHTTP(t, n.RouterURL()+"/healthz", 30*time.Second)
	}
	return c
}

// waitHTTP waits until url answers 200.
func waitHTTP(t *testing.T, url string, timeout time.Duration) {
	t.Helper()
	if err := testingutil.WaitHTTP(context.Background(), url, timeout); err != nil {
		t.Fatal(err)
	}
}

type entry struct {
	ID      int64  `json:"id"`
	Name    string `json:"name"`
	Message string `json:"message"`
	Node    string `json:"node"`
}

// postEntry writes an entry through the router at base.
func postEntry(client *http.Client, base, name, msg string, hdr ...string) (*http.Response, entry, error) {
	b, _ := json.Marshal(entry{Name: name, Message: msg})
	req, err := http.NewRequest("POST", base+"/entries", bytes.NewReader(b))
	if err != nil {
		return nil, entry{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, entry{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp, entry{}, err
	}
	var e entry
	if resp.StatusCode == http.StatusCreated {
		if err := json.Unmarshal(body, &e); err != nil {
			return resp, e, fmt.Errorf("%s: %w", body, err)
		}
	} else {
		err = fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return resp, e, err
}

// waitSchema waits until the primary's app has made its table: a write
// through the primary's router succeeds.
func waitSchema(t *testing.T, base string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, _, err := postEntry(http.DefaultClient, base, "setup", "first")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no write through %s succeeded within 30s: %v", base, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRouter_ReadYourWrites runs three regions, each a regiond with the
// guestbook as its child and the router in front. Writes sent to the
// replica regions land on the primary and come back with a token; a read
// right after, with the token in the header or the cookie, sees the
// write: 1,000 sequences, none stale (10,000 in TestLong_ReadYourWrites).
func TestRouter_ReadYourWrites(t *testing.T) {
	testReadYourWrites(t, 1000)
}

// testReadYourWrites runs sequences read-your-writes sequences (10,000 in
// TestLong_ReadYourWrites, make test-long).
func testReadYourWrites(t *testing.T, sequences int64) {
	c := appCluster(t, "")
	primary, replicas := c.Node(iad.Name), []*testingutil.ClusterNode{c.Node(fra.Name), c.Node(syd.Name)}
	waitSchema(t, primary.RouterURL())

	const workers = 8
	var (
		next, stale, fallback, local atomic.Int64
		mu                           sync.Mutex
		firstErr                     error
	)
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if firstErr == nil {
			firstErr = err
		}
	}
	var wg sync.WaitGroup
	began := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			useCookie := w%2 == 1
			client := &http.Client{Timeout: 30 * time.Second}
			if useCookie {
				client.Jar, _ = cookiejar.New(nil)
			}
			for {
				i := next.Add(1)
				if i > sequences {
					return
				}
				n := replicas[i%2]
				resp, e, err := postEntry(client, n.RouterURL(), fmt.Sprintf("w%d", w), fmt.Sprintf("sequence %d", i))
				if err != nil {
					fail(fmt.Errorf("write %d through %s: %w", i, n.Name, err))
					return
				}
				if got := resp.Header.Get(router.ServedByHeader); got != primary.Name {
					fail(fmt.Errorf("write %d through %s served by %q, want %s", i, n.Name, got, primary.Name))
					return
				}
				tok := resp.Header.Get(router.TXIDHeader)
				if !strings.HasPrefix(tok, "app.db=") {
					fail(fmt.Errorf("write %d: %s %q, want a token for app.db", i, router.TXIDHeader, tok))
					return
				}
				req, _ := http.NewRequest("GET", fmt.Sprintf("%s/api/entries/%d", n.RouterURL(), e.ID), nil)
				if !useCookie {
					req.Header.Set(router.TXIDHeader, tok)
				}
				rresp, err := client.Do(req)
				if err != nil {
					fail(fmt.Errorf("read %d through %s: %w", i, n.Name, err))
					return
				}
				body, _ := io.ReadAll(rresp.Body)
				rresp.Body.Close()
				var got entry
				if rresp.StatusCode != http.StatusOK || json.Unmarshal(body, &got) != nil || got.ID != e.ID || got.Message != fmt.Sprintf("sequence %d", i) {
					stale.Add(1)
					pos, _ := n.Pos(t, "app.db")
					time.Sleep(200 * time.Millisecond)
					again, _ := http.Get(fmt.Sprintf("%s/api/entries/%d", n.RouterURL(), e.ID))
					againBody, _ := io.ReadAll(again.Body)
					again.Body.Close()
					fail(fmt.Errorf("read %d of entry %d through %s right after its write (token %s, %s %q, served by %s): %s %s; %s at %v; 200 ms later: %s %s", i, e.ID, n.Name, tok,
						router.RYWHeader, rresp.Header.Get(router.RYWHeader), rresp.Header.Get(router.ServedByHeader), rresp.Status, body, n.Name, pos, again.Status, againBody))
					continue
				}
				switch ryw := rresp.Header.Get(router.RYWHeader); {
				case strings.HasPrefix(ryw, "primary"):
					fallback.Add(1)
				case rresp.Header.Get(router.ServedByHeader) == n.Name:
					local.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(began)
	if firstErr != nil {
		t.Fatalf("%v (stale reads: %d)", firstErr, stale.Load())
	}
	if s := stale.Load(); s != 0 {
		t.Fatalf("%d stale reads of %d sequences", s, sequences)
	}
	if got := local.Load() + fallback.Load(); got != sequences {
		t.Fatalf("%d reads served by the replica or, past ryw_timeout, the primary; want %d", got, sequences)
	}
	t.Logf("%d read-your-writes sequences through fra and syd in %v, none stale: %d reads served by the replica, %d by the primary after ryw_timeout",
		sequences, took.Round(time.Millisecond), local.Load(), fallback.Load())

	// Every write is on every node, once.
	c.WaitCaughtUp(t, catchUpTimeout, "app.db")
	for _, n := range c.Nodes {
		var es []entry
		resp, err := http.Get(n.RouterURL() + "/api/entries?after=0")
		if err != nil {
			t.Fatal(err)
		}
		json.NewDecoder(resp.Body).Decode(&es)
		resp.Body.Close()
		if len(es) != 100 || resp.Header.Get(router.ServedByHeader) != n.Name {
			t.Fatalf("%s: got %d entries served by %q, want the 100 newest from its own app", n.Name, len(es), resp.Header.Get(router.ServedByHeader))
		}
	}
}

// TestRouter_Streams checks that server-sent events and a WebSocket pass
// through a replica region's router, and that an entry written in one
// replica region streams to a client of another.
func TestRouter_Streams(t *testing.T) {
	c := appCluster(t, "")
	waitSchema(t, c.Node(iad.Name).RouterURL())
	fraNode, sydNode := c.Node(fra.Name), c.Node(syd.Name)

	// A geo entry in front of the three regions, placing clients by the
	// Fly-Region header.
	var regions []router.Region
	for _, n := range c.Nodes {
		ru, _ := url.Parse(n.RouterURL())
		ready, _ := url.Parse("http://" + n.Admin + "/readyz")
		regions = append(regions, router.Region{Name: n.Region, Router: ru, Ready: ready})
	}
	geo := router.NewGeo(regions)
	geo.Headers = []string{"Fly-Region"}
	geo.Start()
	defer geo.Close()
	if down := geo.Down(); len(down) > 0 {
		t.Fatalf("the geo entry takes regions for down: %v", down)
	}
	entry := httptest.NewServer(geo)
	defer entry.Close()

	for _, via := range []string{"router", "geo"} {
		t.Run(via, func(t *testing.T) {
			streams(t, via, entry.URL, fraNode, sydNode)
		})
	}
}

// streams reads server-sent events from syd and talks to a WebSocket on
// fra, through their routers or through the geo entry at entry.
func streams(t *testing.T, via, entry string, fraNode, sydNode *testingutil.ClusterNode) {
	events, wsURL, hdr := sydNode.RouterURL()+"/events", "ws://"+fraNode.Router+"/ws", http.Header{}
	if via == "geo" {
		events, wsURL = entry+"/events", "ws"+strings.TrimPrefix(entry, "http")+"/ws"
	}
	req, _ := http.NewRequest("GET", events, nil)
	if via == "geo" {
		req.Header.Set("Fly-Region", "syd")
		hdr.Set("Fly-Region", "fra")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" || resp.Header.Get(router.ServedByHeader) != sydNode.Name {
		t.Fatalf("GET /events through syd's %s: Content-Type %q served by %q", via, ct, resp.Header.Get(router.ServedByHeader))
	}
	lines := make(chan string, 100)
	go func() {
		br := bufio.NewReader(resp.Body)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				close(lines)
				return
			}
			lines <- line
		}
	}()
	// The stream's first line says who serves it, before any entry.
	select {
	case l := <-lines:
		if !strings.Contains(l, sydNode.Name) {
			t.Fatalf("first line of the stream: %q", l)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no first line on the event stream within 10s: not streamed")
	}
	_, e, err := postEntry(http.DefaultClient, fraNode.RouterURL(), "ada", "streamed "+via)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.After(20 * time.Second)
	for found := false; !found; {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("the event stream ended")
			}
			found = strings.HasPrefix(l, "data: ") && strings.Contains(l, fmt.Sprintf(`"id":%d,`, e.ID)) && strings.Contains(l, `"message":"streamed `+via+`"`)
		case <-deadline:
			t.Fatalf("entry %d written through fra did not stream to a client of syd within 20s", e.ID)
		}
	}

	conn, _, err := websocket.DefaultDialer.Dial(wsURL, hdr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, msg := range []string{"hello", "again"} {
		if err := conn.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, b, err := conn.ReadMessage()
		if want := fraNode.Name + ": " + msg; err != nil || string(b) != want {
			t.Fatalf("WebSocket through fra's %s: got %q, %v; want %q", via, b, err, want)
		}
	}
}

// TestRouter_Failover writes through the routers of two regions while the
// primary is killed and, later, while the new primary hands the lease to
// the other node (Consul lease, durability sync): every write a client
// was told succeeded is in the final database, once; the others got 503s
// or errors, counted. Writes are never sent twice.
func TestRouter_Failover(t *testing.T) {
	app := []string{guestbook(t)}
	specs := []testingutil.ClusterNodeSpec{iad, fra, syd}
	for i := range specs {
		specs[i].App, specs[i].RouterKeys = app, "primary_wait: 10s"
		specs[i].Replication = []string{"durability: sync", "sync_acks: 1"}
	}
	_, c := consulCluster(t, specs)
	c.Start(t)
	primary, _ := waitOnePrimary(t, c, 0)
	for _, n := range c.Nodes {
		waitHTTP(t, n.RouterURL()+"/healthz", 30*time.Second)
	}
	waitSchema(t, primary.RouterURL())
	var clients []*testingutil.ClusterNode
	for _, n := range c.Nodes {
		if n != primary {
			clients = append(clients, n)
		}
	}

	type outcome struct {
		msg    string
		status int
		err    string
	}
	var (
		mu       sync.Mutex
		outcomes []outcome
		stop     atomic.Bool
		wg       sync.WaitGroup
	)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Timeout: 30 * time.Second}
			for i := 0; !stop.Load(); i++ {
				msg := fmt.Sprintf("w%d-%d", w, i)
				resp, _, err := postEntry(client, clients[w%2].RouterURL(), "failover", msg)
				o := outcome{msg: msg}
				if resp != nil {
					o.status = resp.StatusCode
				}
				if err != nil {
					o.err = err.Error()
				}
				mu.Lock()
				outcomes = append(outcomes, o)
				mu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	time.Sleep(time.Second)
	killedAt := time.Now()
	primary.Kill(t)
	next, _ := waitOnePrimary(t, c, 0)
	t.Logf("%s killed; %s primary %v later", primary.Name, next.Name, time.Since(killedAt).Round(time.Millisecond))
	time.Sleep(2 * time.Second)
	other := clients[0]
	if other == next {
		other = clients[1]
	}
	var stdout, stderr strings.Builder
	if err := Run(context.Background(), []string{"handoff", "-to", other.Name, "-admin", next.Admin}, &stdout, &stderr); err != nil {
		t.Fatalf("handoff from %s to %s: %v\n%s", next.Name, other.Name, err, stderr.String())
	}
	time.Sleep(time.Second)
	stop.Store(true)
	wg.Wait()
	final, _ := waitOnePrimary(t, c, 0)

	db := testingutil.MustOpenSQLite(t, filepath.Join(final.MountDir, "app.db"), "wal")
	rows, err := db.Query(`SELECT message, count(*) FROM entries WHERE name = 'failover' GROUP BY message`)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]int{}
	for rows.Next() {
		var msg string
		var n int
		if err := rows.Scan(&msg, &n); err != nil {
			t.Fatal(err)
		}
		have[msg] = n
	}
	rows.Close()
	counts := map[string]int{}
	var lost []string
	failedButThere := 0
	for _, o := range outcomes {
		switch {
		case o.status == http.StatusCreated:
			counts["201"]++
			if have[o.msg] != 1 {
				lost = append(lost, o.msg)
			}
		case o.status != 0:
			counts[fmt.Sprint(o.status)]++
			if have[o.msg] > 0 {
				failedButThere++
			}
		default:
			counts["no answer"]++
		}
	}
	for msg, n := range have {
		if n > 1 {
			t.Errorf("%q is in the database %d times: a write was applied twice", msg, n)
		}
	}
	if len(lost) > 0 {
		t.Fatalf("%d writes answered 201 are not in %s's database once, e.g. %q (outcomes %v)", len(lost), final.Name, lost[0], counts)
	}
	if counts["201"] < 50 {
		t.Fatalf("only %d writes succeeded (outcomes %v): the writers did not get through", counts["201"], counts)
	}
	var firstErrs []string
	for _, o := range outcomes {
		if o.err != "" && len(firstErrs) < 3 {
			firstErrs = append(firstErrs, o.err)
		}
	}
	t.Logf("outcomes of %d writes through %s and %s across a kill and a handoff: %v; %d that failed are in the database all the same; first errors: %q",
		len(outcomes), clients[0].Name, clients[1].Name, counts, failedButThere, firstErrs)
}

// TestRouter_TLS forwards writes between routers over mutual TLS
// (router.peer_listen, and the peer's router as https://): a write through
// fra lands on iad; a client without a certificate of the cluster gets
// nothing from iad's peer listener.
func TestRouter_TLS(t *testing.T) {
	app := []string{guestbook(t)}
	var specs []testingutil.ClusterNodeSpec
	for _, s := range []testingutil.ClusterNodeSpec{iad, fra} {
		s.App = app
		specs = append(specs, s)
	}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, specs...)
	c.RouterTLS = true
	c.RewriteConfigs()
	c.Start(t)
	primary, replica := c.Node(iad.Name), c.Node(fra.Name)
	for _, n := range c.Nodes {
		waitHTTP(t, n.RouterURL()+"/healthz", 30*time.Second)
	}
	waitSchema(t, primary.RouterURL())
	if b, err := os.ReadFile(replica.Config); err != nil || !strings.Contains(string(b), `router: "https://`+primary.RouterPeer+`"`) {
		t.Fatalf("%s's config does not name %s's router as https://%s: %v\n%s", replica.Name, primary.Name, primary.RouterPeer, err, b)
	}
	resp, e, err := postEntry(http.DefaultClient, replica.RouterURL(), "tls", "over mutual TLS")
	if err != nil || resp.Header.Get(router.ServedByHeader) != primary.Name {
		t.Fatalf("write through %s: %v, served by %q", replica.Name, err, resp.Header.Get(router.ServedByHeader))
	}
	if !strings.Contains(primary.Log(), "router listening for peers (mutual TLS)") {
		t.Fatalf("%s did not log its peer listener", primary.Name)
	}
	stranger := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	if r, err := stranger.Get("https://" + primary.RouterPeer + fmt.Sprintf("/api/entries/%d", e.ID)); err == nil {
		r.Body.Close()
		t.Fatalf("a client without a certificate got %s from %s's peer listener", r.Status, primary.Name)
	} else if !strings.Contains(err.Error(), "certificate required") {
		t.Fatalf("a client without a certificate: %v, want the server to require one", err)
	}
	if r, err := http.Get("http://" + primary.RouterPeer + "/"); err == nil {
		defer r.Body.Close()
		if r.StatusCode != http.StatusBadRequest {
			t.Fatalf("plain HTTP to the peer listener: %s, want 400 (the server speaks TLS)", r.Status)
		}
	}
}

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
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

// guestbook builds the example app into a temporary directory and returns
// its path.
func guestbook(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "guestbook")
	cmd := testingutil.Command(t, 5*time.Minute, "go", "build", "-o", bin, "../../examples/guestbook")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the guestbook: %v\n%s", err, out)
	}
	return bin
}

// appCluster starts three nodes, each running the guestbook as its child
// with the router in front; iad-1 holds the static lease.
func appCluster(t *testing.T, routerKeys string) *testingutil.Cluster {
	t.Helper()
	app := []string{guestbook(t)}
	var specs []testingutil.ClusterNodeSpec
	for _, s := range []testingutil.ClusterNodeSpec{iad, fra, syd} {
		s.App, s.RouterKeys = app, routerKeys
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
	deadline := time.Now().Add(timeout)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not answer 200 within %v: %v", url, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
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
// write: 10,000 sequences, none stale.
func TestRouter_ReadYourWrites(t *testing.T) {
	t.Parallel()
	c := appCluster(t, "")
	primary, replicas := c.Node(iad.Name), []*testingutil.ClusterNode{c.Node(fra.Name), c.Node(syd.Name)}
	waitSchema(t, primary.RouterURL())

	const sequences, workers = 10000, 8
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
	t.Parallel()
	c := appCluster(t, "")
	waitSchema(t, c.Node(iad.Name).RouterURL())
	fraNode, sydNode := c.Node(fra.Name), c.Node(syd.Name)

	resp, err := http.Get(sydNode.RouterURL() + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" || resp.Header.Get(router.ServedByHeader) != sydNode.Name {
		t.Fatalf("GET /events through syd: Content-Type %q served by %q", ct, resp.Header.Get(router.ServedByHeader))
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
	_, e, err := postEntry(http.DefaultClient, fraNode.RouterURL(), "ada", "streamed")
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
			found = strings.HasPrefix(l, "data: ") && strings.Contains(l, fmt.Sprintf(`"id":%d,`, e.ID)) && strings.Contains(l, `"message":"streamed"`)
		case <-deadline:
			t.Fatalf("entry %d written through fra did not stream to a client of syd within 20s", e.ID)
		}
	}

	conn, _, err := websocket.DefaultDialer.Dial("ws://"+fraNode.Router+"/ws", nil)
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
			t.Fatalf("WebSocket through fra's router: got %q, %v; want %q", b, err, want)
		}
	}
}

package router_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/meridian-db/meridian/router"
)

// cluster is an in-memory cluster of nodes, each with an app (a real HTTP
// server) and a router (a real HTTP server) in front of it. Which node is
// primary and how far each node's database is are set by the test.
type cluster struct {
	mu      sync.Mutex
	primary string // "" none
	changed chan struct{}
	nodes   map[string]*node
}

type node struct {
	name, region string
	c            *cluster
	app          *httptest.Server
	srv          *httptest.Server
	rt           *router.Router
	// app behaviour
	appCalls atomic.Int64
	onWrite  func(n *node, w http.ResponseWriter, r *http.Request) // nil: commit and answer 200
	// positions
	pmu     sync.Mutex
	pos     map[string]uint64
	pchange chan struct{}
	// what the app saw of the last request
	lastMu   sync.Mutex
	lastReq  *http.Request
	lastBody string
}

func newCluster(t *testing.T, names ...string) *cluster {
	t.Helper()
	c := &cluster{changed: make(chan struct{}), nodes: make(map[string]*node)}
	for _, name := range names {
		n := &node{name: name, region: strings.SplitN(name, "-", 2)[0], c: c, pos: map[string]uint64{}, pchange: make(chan struct{})}
		n.app = httptest.NewServer(http.HandlerFunc(n.serveApp))
		t.Cleanup(n.app.Close)
		target, _ := url.Parse(n.app.URL)
		n.rt = router.New(router.Node{Name: name, Region: n.region}, target, view{c, name}, n)
		n.rt.PrimaryWait = 2 * time.Second
		n.rt.RYWTimeout = 300 * time.Millisecond
		n.srv = httptest.NewServer(n.rt)
		t.Cleanup(n.srv.Close)
		c.nodes[name] = n
	}
	return c
}

func (c *cluster) setPrimary(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.primary = name
	close(c.changed)
	c.changed = make(chan struct{})
}

type view struct {
	c    *cluster
	self string
}

func (v view) Primary() (router.Node, bool, <-chan struct{}) {
	v.c.mu.Lock()
	defer v.c.mu.Unlock()
	if v.c.primary == "" {
		return router.Node{}, false, v.c.changed
	}
	n := v.c.nodes[v.c.primary]
	u, _ := url.Parse(n.srv.URL)
	return router.Node{Name: n.name, Region: n.region, URL: u, Self: n.name == v.self}, true, v.c.changed
}

func (n *node) Positions() (map[string]uint64, <-chan struct{}) {
	n.pmu.Lock()
	defer n.pmu.Unlock()
	m := make(map[string]uint64, len(n.pos))
	for k, v := range n.pos {
		m[k] = v
	}
	return m, n.pchange
}

func (n *node) Committed(context.Context) (map[string]uint64, error) {
	m, _ := n.Positions()
	return m, nil
}

func (n *node) setPos(db string, txid uint64) {
	n.pmu.Lock()
	defer n.pmu.Unlock()
	n.pos[db] = txid
	close(n.pchange)
	n.pchange = make(chan struct{})
}

// serveApp is the app: reads answer "read by NODE"; writes commit one
// transaction to app.db (its position advances) and answer "wrote N".
func (n *node) serveApp(w http.ResponseWriter, r *http.Request) {
	n.appCalls.Add(1)
	b, _ := io.ReadAll(r.Body)
	n.lastMu.Lock()
	n.lastReq, n.lastBody = r.Clone(r.Context()), string(b)
	n.lastMu.Unlock()
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		fmt.Fprintf(w, "read by %s", n.name)
		return
	}
	if n.onWrite != nil {
		n.onWrite(n, w, r)
		return
	}
	n.commit(w)
}

func (n *node) commit(w http.ResponseWriter) {
	pos, _ := n.Positions()
	n.setPos("app.db", pos["app.db"]+1)
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, "wrote %d", pos["app.db"]+1)
}

func (n *node) last() (*http.Request, string) {
	n.lastMu.Lock()
	defer n.lastMu.Unlock()
	return n.lastReq, n.lastBody
}

func do(t *testing.T, method, u string, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

func TestRouter_ReadsLocalWritesForwarded(t *testing.T) {
	c := newCluster(t, "iad-1", "fra-1")
	c.setPrimary("iad-1")
	iad, fra := c.nodes["iad-1"], c.nodes["fra-1"]

	resp, body := do(t, "GET", fra.srv.URL+"/entries", "")
	if body != "read by fra-1" || resp.Header.Get(router.ServedByHeader) != "fra-1" {
		t.Fatalf("read in fra: got %q served by %q, want fra-1's app", body, resp.Header.Get(router.ServedByHeader))
	}
	if got := iad.appCalls.Load(); got != 0 {
		t.Fatalf("iad's app got %d requests for a read in fra, want 0", got)
	}

	const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	resp, body = do(t, "POST", fra.srv.URL+"/entries?x=1", "name=ada", "Content-Type", "application/x-www-form-urlencoded",
		"traceparent", tp, "tracestate", "meridian=1", "X-App", "kept")
	if resp.StatusCode != http.StatusCreated || body != "wrote 1" {
		t.Fatalf("write through fra: got %d %q, want 201 \"wrote 1\"", resp.StatusCode, body)
	}
	if got := resp.Header.Get(router.ServedByHeader); got != "iad-1" {
		t.Fatalf("write served by %q, want iad-1", got)
	}
	if got := resp.Header.Get(router.TXIDHeader); got != "app.db=0000000000000001" {
		t.Fatalf("%s: got %q, want app.db=0000000000000001", router.TXIDHeader, got)
	}
	var cookie *http.Cookie
	for _, ck := range resp.Cookies() {
		if ck.Name == router.TXIDCookie {
			cookie = ck
		}
	}
	if cookie == nil || cookie.Value != "app.db=0000000000000001" || cookie.Path != "/" || !cookie.HttpOnly {
		t.Fatalf("cookie %s: got %+v", router.TXIDCookie, cookie)
	}
	if got := fra.appCalls.Load(); got != 1 {
		t.Fatalf("fra's app got %d requests, want 1 (the read)", got)
	}
	req, gotBody := iad.last()
	if req.Method != "POST" || req.URL.RequestURI() != "/entries?x=1" || gotBody != "name=ada" {
		t.Fatalf("iad's app got %s %s %q, want POST /entries?x=1 \"name=ada\"", req.Method, req.URL.RequestURI(), gotBody)
	}
	for h, want := range map[string]string{"traceparent": tp, "tracestate": "meridian=1", "X-App": "kept", "Content-Type": "application/x-www-form-urlencoded"} {
		if got := req.Header.Get(h); got != want {
			t.Fatalf("iad's app got %s %q, want %q", h, got, want)
		}
	}
	// The client's address, then fra's router's: both loopback here.
	if got := req.Header.Get("X-Forwarded-For"); got != "127.0.0.1, 127.0.0.1" {
		t.Fatalf("X-Forwarded-For: got %q, want the client and fra's router", got)
	}
	if got, want := req.Header.Get("X-Forwarded-Host"), strings.TrimPrefix(fra.srv.URL, "http://"); got != want {
		t.Fatalf("X-Forwarded-Host: got %q, want %q (where the client sent it)", got, want)
	}
	if got := req.Header.Get(router.ForwardedByHeader); got != "" {
		t.Fatalf("the app saw %s %q; routers keep it to themselves", router.ForwardedByHeader, got)
	}

	// A write on the primary: local, with a token.
	resp, body = do(t, "PUT", iad.srv.URL+"/entries/1", "x")
	if body != "wrote 2" || resp.Header.Get(router.TXIDHeader) != "app.db=0000000000000002" {
		t.Fatalf("write in iad: got %q token %q", body, resp.Header.Get(router.TXIDHeader))
	}
}

func TestRouter_ReadYourWrites(t *testing.T) {
	c := newCluster(t, "iad-1", "fra-1")
	c.setPrimary("iad-1")
	iad, fra := c.nodes["iad-1"], c.nodes["fra-1"]
	iad.setPos("app.db", 10)
	fra.setPos("app.db", 9)

	t.Run("NoTokenNoWait", func(t *testing.T) {
		resp, body := do(t, "GET", fra.srv.URL+"/", "")
		if body != "read by fra-1" || resp.Header.Get(router.RYWHeader) != "" {
			t.Fatalf("got %q, %s %q; want fra's app at once", body, router.RYWHeader, resp.Header.Get(router.RYWHeader))
		}
	})
	t.Run("Header", func(t *testing.T) {
		go func() {
			time.Sleep(50 * time.Millisecond)
			fra.setPos("app.db", 10)
		}()
		began := time.Now()
		resp, body := do(t, "GET", fra.srv.URL+"/", "", router.TXIDHeader, "app.db=000000000000000a")
		if body != "read by fra-1" || !strings.HasPrefix(resp.Header.Get(router.RYWHeader), "local ") {
			t.Fatalf("got %q, %s %q; want fra's app after the wait", body, router.RYWHeader, resp.Header.Get(router.RYWHeader))
		}
		if took := time.Since(began); took < 50*time.Millisecond {
			t.Fatalf("served after %v, before fra reached the token", took)
		}
	})
	t.Run("CookiePastTimeoutGoesToPrimary", func(t *testing.T) {
		req, _ := http.NewRequest("GET", fra.srv.URL+"/", nil)
		req.AddCookie(&http.Cookie{Name: router.TXIDCookie, Value: "app.db=000000000000000b,other.db=0000000000000001"})
		iad.setPos("app.db", 11)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "read by iad-1" || !strings.HasPrefix(resp.Header.Get(router.RYWHeader), "primary ") {
			t.Fatalf("got %q, %s %q; want iad's app after %v", b, router.RYWHeader, resp.Header.Get(router.RYWHeader), fra.rt.RYWTimeout)
		}
	})
	t.Run("ReadWithBodyToPrimary", func(t *testing.T) {
		rule, err := router.ParseRule("POST /search", false)
		if err != nil {
			t.Fatal(err)
		}
		fra.rt.Rules = []router.Rule{rule}
		defer func() { fra.rt.Rules = nil }()
		resp, _ := do(t, "POST", fra.srv.URL+"/search", "q=ada", router.TXIDHeader, "app.db=00000000000000ff")
		if got, body := iad.last(); resp.Header.Get(router.ServedByHeader) != "iad-1" || got.URL.Path != "/search" || body != "q=ada" {
			t.Fatalf("a read past ryw_timeout with a body: served by %s, the primary got %s %q; want iad-1 with the body", resp.Header.Get(router.ServedByHeader), got.URL.Path, body)
		}
	})
	t.Run("BadTokenServedLocally", func(t *testing.T) {
		_, body := do(t, "GET", fra.srv.URL+"/", "", router.TXIDHeader, "app.db=12")
		if body != "read by fra-1" {
			t.Fatalf("got %q", body)
		}
	})
}

func TestRouter_NoPrimary(t *testing.T) {
	c := newCluster(t, "iad-1", "fra-1")
	fra := c.nodes["fra-1"]
	fra.rt.PrimaryWait = 200 * time.Millisecond

	began := time.Now()
	resp, body := do(t, "POST", fra.srv.URL+"/entries", "x")
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "1" || !strings.Contains(body, "no primary") {
		t.Fatalf("write with no primary: got %d Retry-After %q %q", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
	if took := time.Since(began); took < 200*time.Millisecond {
		t.Fatalf("answered after %v, before router.primary_wait", took)
	}
	// Reads are served all the same.
	if _, body := do(t, "GET", fra.srv.URL+"/", ""); body != "read by fra-1" {
		t.Fatalf("read with no primary: got %q", body)
	}

	// A primary that appears while the write waits takes it.
	fra.rt.PrimaryWait = 5 * time.Second
	go func() {
		time.Sleep(100 * time.Millisecond)
		c.setPrimary("iad-1")
	}()
	resp, body = do(t, "POST", fra.srv.URL+"/entries", "x")
	if resp.StatusCode != http.StatusCreated || resp.Header.Get(router.ServedByHeader) != "iad-1" {
		t.Fatalf("write while the primary appears: got %d %q from %q", resp.StatusCode, body, resp.Header.Get(router.ServedByHeader))
	}
}

// A write that fails on a primary that steps down under it is sent to the
// new primary only if it is marked idempotent.
func TestRouter_PrimaryChangesDuringWrite(t *testing.T) {
	for _, idempotent := range []bool{false, true} {
		t.Run(fmt.Sprintf("idempotent=%v", idempotent), func(t *testing.T) {
			c := newCluster(t, "iad-1", "fra-1", "syd-1")
			c.setPrimary("iad-1")
			iad, fra, syd := c.nodes["iad-1"], c.nodes["fra-1"], c.nodes["syd-1"]
			iad.onWrite = func(n *node, w http.ResponseWriter, r *http.Request) {
				c.setPrimary("fra-1") // a handoff: the held write fails
				http.Error(w, "attempt to write a readonly database", http.StatusInternalServerError)
			}
			hdr := []string{}
			if idempotent {
				hdr = []string{"Idempotency-Key", "k1"}
			}
			resp, body := do(t, "POST", syd.srv.URL+"/entries", "name=ada", hdr...)
			if idempotent {
				if resp.StatusCode != http.StatusCreated || resp.Header.Get(router.ServedByHeader) != "fra-1" || body != "wrote 1" {
					t.Fatalf("got %d %q from %q, want 201 from fra-1", resp.StatusCode, body, resp.Header.Get(router.ServedByHeader))
				}
				if _, got := fra.last(); got != "name=ada" {
					t.Fatalf("fra's app got body %q, want the whole body again", got)
				}
			} else {
				if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || !strings.Contains(body, "not marked idempotent") {
					t.Fatalf("got %d %q, want 503 saying it was not sent again", resp.StatusCode, body)
				}
				if got := fra.appCalls.Load(); got != 0 {
					t.Fatalf("fra's app got %d requests, want 0: the write must not be sent twice", got)
				}
			}
			if got := iad.appCalls.Load(); got != 1 {
				t.Fatalf("iad's app got %d requests, want 1", got)
			}
		})
	}
}

// A write forwarded to a router that is down, or to a node that no longer
// takes writes, was never applied: it goes to the new primary.
func TestRouter_ForwardRetried(t *testing.T) {
	t.Run("RouterDown", func(t *testing.T) {
		c := newCluster(t, "iad-1", "fra-1", "syd-1")
		c.setPrimary("iad-1")
		iad, fra, syd := c.nodes["iad-1"], c.nodes["fra-1"], c.nodes["syd-1"]
		iad.srv.Close() // the primary's region is gone; the lease moves a moment later
		go func() {
			time.Sleep(150 * time.Millisecond)
			c.setPrimary("fra-1")
		}()
		resp, body := do(t, "POST", syd.srv.URL+"/entries", "name=ada")
		if resp.StatusCode != http.StatusCreated || resp.Header.Get(router.ServedByHeader) != "fra-1" {
			t.Fatalf("got %d %q from %q, want 201 from fra-1", resp.StatusCode, body, resp.Header.Get(router.ServedByHeader))
		}
		if _, got := fra.last(); got != "name=ada" {
			t.Fatalf("fra's app got %q", got)
		}
	})
	t.Run("NotPrimary", func(t *testing.T) {
		c := newCluster(t, "iad-1", "fra-1")
		c.setPrimary("iad-1")
		iad, fra := c.nodes["iad-1"], c.nodes["fra-1"]
		// iad's router sees another primary than fra's does.
		resp, body := do(t, "POST", iad.srv.URL+"/entries", "x", router.ForwardedByHeader, "fra-1")
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("forwarded to the primary: got %d %q", resp.StatusCode, body)
		}
		resp, body = do(t, "POST", fra.srv.URL+"/entries", "x", router.ForwardedByHeader, "iad-1")
		if resp.StatusCode != http.StatusMisdirectedRequest || resp.Header.Get(router.NotPrimaryHeader) == "" || fra.appCalls.Load() != 0 {
			t.Fatalf("forwarded to a replica: got %d %q, app calls %d; want 421 and no call", resp.StatusCode, body, fra.appCalls.Load())
		}
	})
}

func TestRouter_Limits(t *testing.T) {
	c := newCluster(t, "iad-1", "fra-1")
	c.setPrimary("iad-1")
	fra := c.nodes["fra-1"]
	fra.rt.MaxBodyBytes = 1000
	resp, body := do(t, "POST", fra.srv.URL+"/entries", strings.Repeat("x", 1001))
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(body, "router.max_body") {
		t.Fatalf("body over the limit: got %d %q", resp.StatusCode, body)
	}
	// Without a length: cut off as it streams.
	pr, pw := io.Pipe()
	go func() {
		pw.Write([]byte(strings.Repeat("y", 3000)))
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", fra.srv.URL+"/entries", pr)
	r2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(r2.Body)
	r2.Body.Close()
	if r2.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("chunked body over the limit: got %d %q", r2.StatusCode, b)
	}
	if n := c.nodes["iad-1"].appCalls.Load(); n != 0 {
		// The streamed body reached iad's app, which read an error.
		if _, got := c.nodes["iad-1"].last(); len(got) > 1000 {
			t.Fatalf("iad's app read %d bytes of a body over the limit", len(got))
		}
	}
}

func TestRouter_Rules(t *testing.T) {
	c := newCluster(t, "iad-1", "fra-1")
	c.setPrimary("iad-1")
	fra := c.nodes["fra-1"]
	for _, s := range []string{"GET /admin/", "/rebuild"} {
		r, err := router.ParseRule(s, true)
		if err != nil {
			t.Fatal(err)
		}
		fra.rt.Rules = append(fra.rt.Rules, r)
	}
	r, err := router.ParseRule("POST /search", false)
	if err != nil {
		t.Fatal(err)
	}
	fra.rt.Rules = append(fra.rt.Rules, r)
	for _, tc := range []struct{ method, path, want string }{
		{"GET", "/admin/x", "iad-1"}, {"GET", "/rebuild", "iad-1"}, {"POST", "/search", "fra-1"},
		{"GET", "/search", "fra-1"}, {"POST", "/other", "iad-1"},
	} {
		resp, _ := do(t, tc.method, fra.srv.URL+tc.path, "")
		if got := resp.Header.Get(router.ServedByHeader); got != tc.want {
			t.Errorf("%s %s served by %s, want %s", tc.method, tc.path, got, tc.want)
		}
	}
	for _, bad := range []string{"post /x", "x", "GET x"} {
		if _, err := router.ParseRule(bad, true); err == nil {
			t.Errorf("ParseRule(%q): no error", bad)
		}
	}
}

func TestRouter_Replay(t *testing.T) {
	c := newCluster(t, "iad-1", "fra-1")
	c.setPrimary("iad-1")
	fra := c.nodes["fra-1"]
	fra.rt.Replay = "fly-replay"
	resp, _ := do(t, "POST", fra.srv.URL+"/entries", "x")
	if resp.StatusCode != http.StatusConflict || resp.Header.Get("fly-replay") != "region=iad" {
		t.Fatalf("got %d fly-replay %q, want 409 region=iad", resp.StatusCode, resp.Header.Get("fly-replay"))
	}
	if n := c.nodes["iad-1"].appCalls.Load() + fra.appCalls.Load(); n != 0 {
		t.Fatalf("apps got %d requests, want 0", n)
	}
	// A replayed request that lands on a replica all the same is forwarded.
	resp, _ = do(t, "POST", fra.srv.URL+"/entries", "x", "fly-replay-src", "region=fra")
	if resp.StatusCode != http.StatusCreated || resp.Header.Get(router.ServedByHeader) != "iad-1" {
		t.Fatalf("replayed write on a replica: got %d from %q", resp.StatusCode, resp.Header.Get(router.ServedByHeader))
	}
}

func TestRouter_Streams(t *testing.T) {
	c := newCluster(t, "iad-1", "fra-1")
	c.setPrimary("iad-1")
	fra := c.nodes["fra-1"]
	upgrader := websocket.Upgrader{}
	fra.onWrite = nil
	mux := http.NewServeMux()
	mux.HandleFunc("/events", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			fmt.Fprintf(w, "data: %d\n\n", i)
			w.(http.Flusher).Flush()
			time.Sleep(20 * time.Millisecond)
		}
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		conn, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer conn.Close()
		for {
			mt, b, err := conn.ReadMessage()
			if err != nil {
				return
			}
			conn.WriteMessage(mt, append([]byte("echo "), b...))
		}
	})
	fra.app.Config.Handler = mux

	resp, err := http.Get(fra.srv.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	first := time.Now()
	var got []string
	for len(got) < 3 {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("SSE: %v after %q", err, got)
		}
		if strings.HasPrefix(line, "data: ") {
			got = append(got, strings.TrimSpace(line))
			if len(got) == 1 && time.Since(first) > time.Second {
				t.Fatalf("first event after %v: not streamed", time.Since(first))
			}
		}
	}
	if strings.Join(got, ";") != "data: 0;data: 1;data: 2" {
		t.Fatalf("SSE: got %q", got)
	}

	conn, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(fra.srv.URL, "http")+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, msg := range []string{"hello", "again"} {
		if err := conn.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, b, err := conn.ReadMessage()
		if err != nil || string(b) != "echo "+msg {
			t.Fatalf("WebSocket: got %q, %v; want echo %s", b, err, msg)
		}
	}
}

func TestToken(t *testing.T) {
	tok, err := router.ParseToken("b.db=0000000000000003, app.db=000000000000002a")
	if err != nil {
		t.Fatal(err)
	}
	if got := tok.String(); got != "app.db=000000000000002a,b.db=0000000000000003" {
		t.Fatalf("got %q", got)
	}
	for _, bad := range []string{"app.db", "=0000000000000001", "app.db=1", "app.db=zzzzzzzzzzzzzzzz"} {
		if _, err := router.ParseToken(bad); err == nil {
			t.Errorf("ParseToken(%q): no error", bad)
		}
	}
}

func FuzzParseToken(f *testing.F) {
	f.Add("app.db=000000000000002a,b.db=0000000000000003")
	f.Add("a=b=0000000000000001")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := router.ParseToken(s)
		if err != nil {
			return
		}
		again, err := router.ParseToken(tok.String())
		if err != nil {
			t.Fatalf("ParseToken(%q) of its own String: %v", tok.String(), err)
		}
		if again.String() != tok.String() {
			t.Fatalf("round trip: %q != %q", again.String(), tok.String())
		}
	})
}

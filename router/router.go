// Package router is the HTTP router a region runs in front of its app:
// reads go to the local app, writes to the app of the primary region
// through that region's router, and a read that follows a write waits
// until the local replica has the write (read-your-writes).
//
// The router knows the cluster only through two small interfaces that
// the daemon implements: Cluster (who takes writes, and where) and
// Positions (how far each local database is, with a way to wait for it).
package router

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// Node is a node of the cluster as the router sees it.
type Node struct {
	Name   string   // node name, e.g. iad-1
	Region string   // its region, e.g. iad
	URL    *url.URL // its router, where writes are forwarded; nil if unknown
	Self   bool     // the node this router runs on
}

// Cluster says which node takes writes.
type Cluster interface {
	// Primary returns the node that takes writes now, ok false while
	// none does (no lease holder, or a failover or handoff under way),
	// and a channel closed when that changes. Any goroutine may call it.
	Primary() (p Node, ok bool, changed <-chan struct{})
}

// Positions tells how far the local databases are.
type Positions interface {
	// Positions returns, for each local database, the TXID up to which
	// its transactions are visible to the app's readers, and a channel
	// closed at the next change. The router does not modify the map.
	// Any goroutine may call it.
	Positions() (pos map[string]uint64, changed <-chan struct{})
	// Committed returns, on the primary, the position of each database
	// after every transaction committed so far, once each is known (the
	// capture layer may take a moment to log a commit). The router calls
	// it after a write, to make its token. Any goroutine may call it.
	Committed(ctx context.Context) (map[string]uint64, error)
}

// Headers between routers and to clients.
const (
	// ForwardedByHeader names the node whose router forwarded a request
	// to another router. Such a request is never forwarded again.
	ForwardedByHeader = "Meridian-Forwarded-By"
	// ServedByHeader names the node whose app answered a request.
	ServedByHeader = "Meridian-Served-By"
	// NotPrimaryHeader marks a 421 answer to a forwarded write: the node
	// does not take writes (any more); the sender finds the primary again.
	NotPrimaryHeader = "Meridian-Not-Primary"
	// RYWHeader says how a read with a token was served: "local" and the
	// wait in milliseconds, or "primary" after waiting that long in vain.
	RYWHeader = "Meridian-RYW"
)

// Defaults of the Router's tunables.
const (
	DefaultRYWTimeout       = 2 * time.Second
	DefaultPrimaryWait      = 5 * time.Second
	DefaultUpstreamTimeout  = 60 * time.Second
	DefaultDialTimeout      = 5 * time.Second
	DefaultMaxBodyBytes     = 32 << 20
	DefaultMaxHeaderBytes   = 64 << 10
	DefaultCookieMaxAge     = 5 * time.Minute
	DefaultIdempotentHeader = "Idempotency-Key"
)

var (
	// errNoPrimary: no node took writes within PrimaryWait.
	errNoPrimary = errors.New("no primary")
	// errPrimaryChanged: the node stopped being primary while its app
	// handled a write, which failed; it was not retried.
	errPrimaryChanged = errors.New("primary changed")
)

// Router routes one region's HTTP requests. Set its tunables before the
// first request; it is an http.Handler.
type Router struct {
	// RYWTimeout bounds how long a read with a read-your-writes token
	// waits for the local databases to reach it; past it the read is
	// served by the primary.
	RYWTimeout time.Duration
	// PrimaryWait bounds how long a write waits for a primary (during a
	// failover or handoff) before it is answered 503 with Retry-After.
	PrimaryWait time.Duration
	// UpstreamTimeout bounds the wait for the response headers of an app
	// or of another router.
	UpstreamTimeout time.Duration
	// DialTimeout bounds a connection to the app or to another router.
	DialTimeout time.Duration
	// MaxBodyBytes is the largest request body accepted (413 past it).
	MaxBodyBytes int64
	// CookieMaxAge is how long a browser keeps the TXIDCookie.
	CookieMaxAge time.Duration
	// IdempotentHeader marks a write the client may safely have applied
	// twice: one that failed because the primary changed under it is
	// sent again to the new primary. Requests without it (and not of an
	// IdempotentMethods method) are never sent twice.
	IdempotentHeader  string
	IdempotentMethods []string
	// Rules classify requests by method and path before the default
	// (GET, HEAD, OPTIONS and TRACE read; all else writes); the first
	// that matches wins.
	Rules []Rule
	// Replay, if set, is the name of a response header (such as
	// "fly-replay") with which a replica region answers a write instead
	// of forwarding it: "region=" the primary's region, for an edge
	// that replays the request there.
	Replay string
	// TrustForwarded keeps the X-Forwarded-For, -Host and -Proto headers
	// of requests from clients (a proxy in front); those of requests
	// forwarded by another router are always kept.
	TrustForwarded bool
	// PeerTransport carries requests to other routers (mutual TLS, say);
	// nil uses a plain HTTP transport with the timeouts above.
	PeerTransport http.RoundTripper
	Logger        *slog.Logger
	// TracerProvider and MeterProvider, if set, get a "router" span per
	// request (a child of the span its traceparent header names, and the
	// parent of the requests the router sends on) and the router's
	// metrics (meridian.router.*).
	TracerProvider trace.TracerProvider
	MeterProvider  metric.MeterProvider
	// TrackWrite, if set, is called as a write goes to the local app on
	// the primary, with the context of the request to it (the router's
	// span); the function it returns is called once the write's commits
	// are in the log, with the app's span named by its response's
	// traceresponse header (invalid if none): how the commits a request
	// makes join its trace.
	TrackWrite func(ctx context.Context) (done func(app trace.SpanContext))

	self      Node
	target    *url.URL
	cluster   Cluster
	positions Positions

	once    sync.Once
	tel     *telemetry
	toLocal http.RoundTripper
	toPeer  http.RoundTripper
	local   *httputil.ReverseProxy // reads, to the local app
	primary *httputil.ReverseProxy // writes and fallen-back reads, to the primary
}

// New returns a router for the node self (Name and Region) in front of the
// app at target.
func New(self Node, target *url.URL, cluster Cluster, positions Positions) *Router {
	self.Self = true
	return &Router{
		RYWTimeout:       DefaultRYWTimeout,
		PrimaryWait:      DefaultPrimaryWait,
		UpstreamTimeout:  DefaultUpstreamTimeout,
		DialTimeout:      DefaultDialTimeout,
		MaxBodyBytes:     DefaultMaxBodyBytes,
		CookieMaxAge:     DefaultCookieMaxAge,
		IdempotentHeader: DefaultIdempotentHeader,
		Logger:           slog.New(slog.DiscardHandler),
		self:             self,
		target:           target,
		cluster:          cluster,
		positions:        positions,
	}
}

// Rule classifies the requests of one method (any if "") whose path
// starts with Prefix as writes or reads.
type Rule struct {
	Method string
	Prefix string
	Write  bool
}

// ParseRule parses "[METHOD ]/prefix", as in router.write_paths.
func ParseRule(s string, write bool) (Rule, error) {
	r := Rule{Write: write}
	s = strings.TrimSpace(s)
	if m, p, ok := strings.Cut(s, " "); ok {
		r.Method, s = m, strings.TrimSpace(p)
		if r.Method != strings.ToUpper(r.Method) || strings.ContainsAny(r.Method, "/ ") {
			return Rule{}, fmt.Errorf("path rule %q: the method %q must be upper case, e.g. POST /search", s, r.Method)
		}
	}
	if !strings.HasPrefix(s, "/") {
		return Rule{}, fmt.Errorf("path rule %q: the path must start with /, e.g. POST /search", s)
	}
	r.Prefix = s
	return r, nil
}

func (r Rule) match(req *http.Request) bool {
	return (r.Method == "" || r.Method == req.Method) && strings.HasPrefix(req.URL.Path, r.Prefix)
}

func (rt *Router) isWrite(r *http.Request) bool {
	for _, rule := range rt.Rules {
		if rule.match(r) {
			return rule.Write
		}
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return false
	}
	return true
}

func (rt *Router) init() {
	rt.once.Do(func() {
		rt.tel = rt.newTelemetry()
		rt.toLocal = rt.transport()
		rt.toPeer = rt.PeerTransport
		if rt.toPeer == nil {
			rt.toPeer = rt.transport()
		}
		rt.local = &httputil.ReverseProxy{
			Rewrite:      rt.rewrite,
			Transport:    localTransport{rt},
			ErrorHandler: rt.proxyError,
			ErrorLog:     slog.NewLogLogger(rt.Logger.Handler(), slog.LevelWarn),
		}
		rt.primary = &httputil.ReverseProxy{
			Rewrite:      rt.rewrite,
			Transport:    primaryTransport{rt},
			ErrorHandler: rt.proxyError,
			ErrorLog:     slog.NewLogLogger(rt.Logger.Handler(), slog.LevelWarn),
		}
	})
}

func (rt *Router) transport() *http.Transport {
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: rt.DialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		ResponseHeaderTimeout: rt.UpstreamTimeout,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
	}
}

// ServeHTTP routes one request.
func (rt *Router) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rt.init()
	write := rt.isWrite(r)
	rt.traced(w, r, write, func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > rt.MaxBodyBytes {
			setOutcome(r.Context(), OutcomeTooLarge)
			http.Error(w, fmt.Sprintf("request body of %d bytes is larger than this router accepts (%d bytes, router.max_body)", r.ContentLength, rt.MaxBodyBytes), http.StatusRequestEntityTooLarge)
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = http.MaxBytesReader(w, r.Body, rt.MaxBodyBytes)
		}
		if write {
			rt.serveWrite(w, r)
		} else {
			rt.serveRead(w, r)
		}
	})
}

func (rt *Router) serveRead(w http.ResponseWriter, r *http.Request) {
	tok, err := tokenOf(r)
	if err != nil {
		rt.Logger.Debug("read with a token that does not parse, served as one without", "err", err)
	}
	if len(tok) == 0 || r.Header.Get(ForwardedByHeader) != "" {
		rt.local.ServeHTTP(w, r)
		return
	}
	if p, ok, _ := rt.cluster.Primary(); ok && p.Self {
		rt.local.ServeHTTP(w, r)
		return
	}
	began := time.Now()
	if rt.waitFor(r.Context(), tok) {
		waited := time.Since(began)
		rt.tel.ryw.Record(r.Context(), waited.Seconds(), metric.WithAttributes(attribute.String("outcome", OutcomeLocal)))
		w.Header().Set(RYWHeader, fmt.Sprintf("local %.3f", ms(waited)))
		rt.local.ServeHTTP(w, r)
		return
	}
	if r.Context().Err() != nil {
		setOutcome(r.Context(), OutcomeClientGone)
		return // the client went away
	}
	waited := time.Since(began)
	rt.tel.ryw.Record(r.Context(), waited.Seconds(), metric.WithAttributes(attribute.String("outcome", OutcomePrimary)))
	w.Header().Set(RYWHeader, fmt.Sprintf("primary %.3f", ms(waited)))
	c, err := replayable(r)
	if err != nil {
		rt.proxyError(w, r, err)
		return
	}
	rt.primary.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callKey{}, c)))
}

// replayable returns the call of a request that may be sent more than
// once: its body read whole (bounded by MaxBodyBytes).
func replayable(r *http.Request) (*call, error) {
	c := &call{replay: []byte{}}
	if r.Body != nil && r.Body != http.NoBody {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return nil, err
		}
		c.replay = b
	}
	return c, nil
}

// waitFor waits until the local databases reach tok, at most RYWTimeout,
// and reports whether they did.
func (rt *Router) waitFor(ctx context.Context, tok Token) bool {
	timer := time.NewTimer(rt.RYWTimeout)
	defer timer.Stop()
	for {
		pos, changed := rt.positions.Positions()
		if reached(pos, tok) {
			return true
		}
		select {
		case <-changed:
		case <-timer.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

func reached(pos map[string]uint64, tok Token) bool {
	for db, txid := range tok {
		if pos[db] < txid {
			return false
		}
	}
	return true
}

func (rt *Router) serveWrite(w http.ResponseWriter, r *http.Request) {
	p, ok, _ := rt.cluster.Primary()
	if rt.Replay != "" && ok && !p.Self && r.Header.Get(ForwardedByHeader) == "" && r.Header.Get(rt.Replay+"-src") == "" {
		setOutcome(r.Context(), OutcomeReplayed)
		w.Header().Set(rt.Replay, "region="+p.Region)
		w.WriteHeader(http.StatusConflict)
		fmt.Fprintf(w, "writes go to the primary %s in region %s: replay there\n", p.Name, p.Region)
		return
	}
	if r.Header.Get(ForwardedByHeader) != "" && !(ok && p.Self) {
		// A router forwarded it here as to the primary, which this node
		// is not (any more): it finds the primary again.
		setOutcome(r.Context(), OutcomeMisdirected)
		w.Header().Set(NotPrimaryHeader, "1")
		http.Error(w, fmt.Sprintf("%s does not take writes now: the primary is %s", rt.self.Name, orNone(p.Name, ok)), http.StatusMisdirectedRequest)
		return
	}
	c := &call{write: true}
	if rt.idempotent(r) {
		// Read whole, so that it can be sent again.
		var err error
		if c, err = replayable(r); err != nil {
			rt.proxyError(w, r, err)
			return
		}
		c.write = true
	} else if r.Body != nil && r.Body != http.NoBody {
		c.body = &onceBody{r: r.Body}
	}
	rt.primary.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callKey{}, c)))
}

func (rt *Router) idempotent(r *http.Request) bool {
	return rt.IdempotentHeader != "" && r.Header.Get(rt.IdempotentHeader) != "" || slices.Contains(rt.IdempotentMethods, r.Method)
}

func orNone(s string, ok bool) string {
	if !ok || s == "" {
		return "not known (a failover or handoff is under way)"
	}
	return s
}

// rewrite sets the X-Forwarded headers of a request to the app or to
// another router; its URL is set by the transport.
func (rt *Router) rewrite(pr *httputil.ProxyRequest) {
	pr.SetURL(rt.target)
	pr.Out.Host = pr.In.Host
	trusted := rt.TrustForwarded || pr.In.Header.Get(ForwardedByHeader) != ""
	if trusted {
		pr.Out.Header["X-Forwarded-For"] = pr.In.Header["X-Forwarded-For"]
	}
	pr.SetXForwarded()
	if trusted {
		for _, h := range []string{"X-Forwarded-Host", "X-Forwarded-Proto"} {
			if v := pr.In.Header.Get(h); v != "" {
				pr.Out.Header.Set(h, v)
			}
		}
	}
	pr.Out.Header.Del(ForwardedByHeader)
	pr.Out.Header.Del(NotPrimaryHeader)
	inject(pr.In.Context(), pr.Out.Header)
}

// proxyError answers a request the router could not get answered.
func (rt *Router) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		setOutcome(r.Context(), OutcomeTooLarge)
		http.Error(w, fmt.Sprintf("request body larger than this router accepts (%d bytes, router.max_body)", tooBig.Limit), http.StatusRequestEntityTooLarge)
	case errors.Is(err, errNoPrimary):
		setOutcome(r.Context(), OutcomeNoPrimary)
		w.Header().Set("Retry-After", "1")
		http.Error(w, fmt.Sprintf("no primary took writes within %v (router.primary_wait): a failover or handoff is under way; retry", rt.PrimaryWait), http.StatusServiceUnavailable)
	case errors.Is(err, errPrimaryChanged):
		setOutcome(r.Context(), OutcomePrimaryChanged)
		w.Header().Set("Retry-After", "1")
		http.Error(w, fmt.Sprintf("the write failed: %s stopped being the primary while the app handled it (a handoff or failover), and it was not sent again because the request is not marked idempotent (%s header); retry", rt.self.Name, rt.IdempotentHeader), http.StatusServiceUnavailable)
	case r.Context().Err() != nil:
		setOutcome(r.Context(), OutcomeClientGone)
		w.WriteHeader(499) // the client went away; nobody reads this
	default:
		setOutcome(r.Context(), OutcomeFailed)
		rt.Logger.Warn("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		http.Error(w, fmt.Sprintf("%s: %v", rt.self.Name, err), http.StatusBadGateway)
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

package router

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"
)

type callKey struct{}

// call is what the router knows of a request it sends to the primary.
type call struct {
	write bool
	// replay is the whole body of a request that may be sent again (an
	// idempotent write, a read); nil for a body streamed as it comes.
	replay []byte
	body   *onceBody // the streamed body, if any
}

// bodyFor returns the body of one attempt, and its length.
func (c *call) bodyFor(req *http.Request) (io.ReadCloser, int64) {
	switch {
	case c.replay != nil && len(c.replay) == 0:
		return http.NoBody, 0
	case c.replay != nil:
		return io.NopCloser(bytes.NewReader(c.replay)), int64(len(c.replay))
	case c.body != nil:
		return c.body, req.ContentLength
	}
	return http.NoBody, 0
}

// untouched reports whether no byte of the body has been read, so that a
// request that was never sent can be sent elsewhere.
func (c *call) untouched() bool {
	return c.body == nil || c.body.n.Load() == 0
}

// onceBody is a streamed request body that an attempt which failed before
// reading it leaves whole for the next (the transport closes the body it
// is given; the server closes the real one).
type onceBody struct {
	r io.ReadCloser
	n atomic.Int64
}

func (b *onceBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.n.Add(int64(n))
	return n, err
}

func (b *onceBody) Close() error { return nil }

// notSent reports whether err says the request never left: no
// connection was made.
func notSent(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// localTransport sends reads to the local app.
type localTransport struct{ rt *Router }

func (t localTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.rt.toLocal.RoundTrip(req)
	if err == nil {
		setOutcome(req.Context(), OutcomeLocal)
		resp.Header.Set(ServedByHeader, t.rt.self.Name)
	}
	return resp, err
}

// primaryTransport sends a request to the primary: to the local app on
// the primary, else to the primary's router. It waits for a primary while
// there is none, and tries again where that is safe: a request that never
// reached a router, one that reached a node that no longer takes writes,
// and a request marked idempotent that failed because the primary
// changed. All of it within PrimaryWait.
type primaryTransport struct{ rt *Router }

// retryAfter is how soon a request that met a node that does not take
// writes is tried again when the cluster's view of the primary does not
// change first.
const retryAfter = 50 * time.Millisecond

func (t primaryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	rt := t.rt
	ctx := req.Context()
	c, _ := ctx.Value(callKey{}).(*call)
	if c == nil {
		c = &call{replay: []byte{}}
	}
	deadline := time.NewTimer(rt.PrimaryWait)
	defer deadline.Stop()
	for {
		p, ok, changed := rt.cluster.Primary()
		if !ok {
			select {
			case <-changed:
				continue
			case <-deadline.C:
				return nil, errNoPrimary
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		out := req.Clone(ctx)
		out.Body, out.ContentLength = c.bodyFor(req)
		var (
			resp  *http.Response
			err   error
			retry bool
		)
		if p.Self {
			resp, err, retry = t.self(out, c)
		} else {
			resp, err, retry = t.peer(out, c, p)
		}
		if !retry {
			return resp, err
		}
		rt.Logger.Info("request to the primary tried again", "method", req.Method, "path", req.URL.Path, "primary", p.Name, "err", err)
		wait := time.NewTimer(retryAfter)
		select {
		case <-changed:
		case <-wait.C:
		case <-deadline.C:
			wait.Stop()
			return nil, errNoPrimary
		case <-ctx.Done():
			wait.Stop()
			return nil, ctx.Err()
		}
		wait.Stop()
	}
}

// self sends a request to the local app, on the primary. A write's
// response gets the read-your-writes token of the databases it advanced.
func (t primaryTransport) self(out *http.Request, c *call) (*http.Response, error, bool) {
	rt := t.rt
	out.URL.Scheme, out.URL.Host = rt.target.Scheme, rt.target.Host
	var before map[string]uint64
	if c.write {
		before, _ = rt.positions.Positions()
	}
	app := trace.SpanContext{}
	if c.write && rt.TrackWrite != nil {
		done := rt.TrackWrite(out.Context())
		defer func() { done(app) }()
	}
	resp, err := rt.toLocal.RoundTrip(out)
	if err != nil {
		return nil, err, false
	}
	resp.Header.Set(ServedByHeader, rt.self.Name)
	if !c.write {
		// A read that waited for its token, on a node that became the
		// primary since.
		setOutcome(out.Context(), OutcomePrimary)
		return resp, nil, false
	}
	setOutcome(out.Context(), OutcomeLocal)
	app = appSpan(out.Context(), resp)
	if resp.StatusCode >= 500 {
		if p, ok, _ := rt.cluster.Primary(); !ok || !p.Self {
			// The node stopped taking writes while the app wrote: the
			// write failed for that.
			resp.Body.Close()
			return nil, errPrimaryChanged, c.replay != nil
		}
	}
	after, err := rt.positions.Committed(out.Context())
	if err != nil {
		// The write is done; a later read may not see it at once.
		rt.Logger.Warn("no read-your-writes token for a write", "method", out.Method, "path", out.URL.Path, "err", err)
	}
	if tok := advanced(before, after); tok != nil {
		resp.Header.Set(TXIDHeader, tok.String())
		cookie := &http.Cookie{Name: TXIDCookie, Value: tok.String(), Path: "/", MaxAge: int(rt.CookieMaxAge / time.Second), HttpOnly: true, SameSite: http.SameSiteLaxMode}
		resp.Header.Add("Set-Cookie", cookie.String())
	}
	return resp, nil, false
}

// peer forwards a request to the primary's router.
func (t primaryTransport) peer(out *http.Request, c *call, p Node) (*http.Response, error, bool) {
	rt := t.rt
	if p.URL == nil {
		return nil, fmt.Errorf("the primary %s has no router address (peers' router in the configuration)", p.Name), true
	}
	out.URL.Scheme, out.URL.Host = p.URL.Scheme, p.URL.Host
	out.Header.Set(ForwardedByHeader, rt.self.Name)
	resp, err := rt.toPeer.RoundTrip(out)
	if err != nil {
		if out.Context().Err() != nil {
			return nil, err, false
		}
		if notSent(err) && c.untouched() || c.replay != nil {
			return nil, fmt.Errorf("forward to the primary %s: %w", p.Name, err), true
		}
		return nil, fmt.Errorf("the primary %s did not answer, and the request may or may not have been applied: %w", p.Name, err), false
	}
	if resp.StatusCode == http.StatusMisdirectedRequest && resp.Header.Get(NotPrimaryHeader) != "" {
		resp.Body.Close()
		return nil, fmt.Errorf("%s does not take writes now", p.Name), true
	}
	if c.write {
		setOutcome(out.Context(), OutcomeForwarded)
	} else {
		setOutcome(out.Context(), OutcomePrimary)
	}
	return resp, nil, false
}

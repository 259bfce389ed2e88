package regiond

import (
	"context"
	"slices"
	"sync"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// How a commit joins the trace of the request that made it
//
// The app is not told anything and does not tell regiond anything but
// what otelhttp does. The primary's router knows which write requests it
// has sent the app and when (writeTracker); the capture layer knows when
// SQLite committed. A commit made while exactly one traced write request
// was with the app belongs to it: its "commit" span is made a child of
// that request's router span, and its "ship" and "apply" spans follow in
// the same trace. If the app names its own request span in a
// traceresponse header (the example app does), the commit span is moved
// under that span once the response is in (reparenter), so the trace
// reads router → app → commit → ship → apply. A commit made while several
// traced writes were with the app is linked to each of them and starts a
// trace of its own.

// writeTracker knows the traced write requests the primary's router has
// sent the local app, in flight and ended in the last trackKeep.
type writeTracker struct {
	rp      *reparenter
	mu      sync.Mutex
	writes  []*trackedWrite // in the order they began
	pruneAt int             // prune writes when there are this many
}

type trackedWrite struct {
	sc           trace.SpanContext // the router's span
	began, ended time.Time         // ended is zero while in flight
}

// trackKeep is how long an ended write is kept for commits that SQLite
// made while it was with the app: a WAL commit is logged after COMMIT
// returns, but the router waits for every commit so far to be logged
// (Positions.Committed) before it ends the write, so a moment is enough.
const trackKeep = time.Second

// endedKeep is how long the reparenter keeps the app span of an ended
// write for the commit spans exported after it: the batcher exports
// every OTEL_BSP_SCHEDULE_DELAY (5 s by default).
const endedKeep = 30 * time.Second

// track is router.Router.TrackWrite.
func (w *writeTracker) track(ctx context.Context) func(app trace.SpanContext) {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsSampled() {
		return func(trace.SpanContext) {}
	}
	tw := &trackedWrite{sc: sc, began: time.Now()}
	w.rp.begin(sc.SpanID())
	w.mu.Lock()
	if len(w.writes) >= w.pruneAt {
		// Those ended long enough ago go; what stays (in flight, or
		// ended just now) sets when to look again.
		now := tw.began
		w.writes = slices.DeleteFunc(w.writes, func(x *trackedWrite) bool { return !x.ended.IsZero() && now.Sub(x.ended) > trackKeep })
		w.pruneAt = max(2*len(w.writes), 64)
	}
	w.writes = append(w.writes, tw)
	w.mu.Unlock()
	return func(app trace.SpanContext) {
		w.mu.Lock()
		tw.ended = time.Now()
		w.mu.Unlock()
		w.rp.end(sc.SpanID(), app)
	}
}

// parent is fs.CommitParent: the write request a commit at at belongs to.
func (w *writeTracker) parent(_ string, at time.Time) (trace.SpanContext, []trace.Link) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var found []trace.SpanContext
	for _, tw := range w.writes {
		if !tw.began.After(at) && (tw.ended.IsZero() || !tw.ended.Before(at)) {
			found = append(found, tw.sc)
		}
	}
	switch len(found) {
	case 0:
		return trace.SpanContext{}, nil
	case 1:
		return found[0], nil
	}
	links := make([]trace.Link, len(found))
	for i, sc := range found {
		links[i] = trace.Link{SpanContext: sc}
	}
	return trace.SpanContext{}, links
}

// reparenter is the span exporter in front of the OTLP one that moves each
// commit span from its router span to the app's request span, once the
// router knows it: spans that are children of a write still with the app
// are held until it ends.
type reparenter struct {
	next sdktrace.SpanExporter

	mu      sync.Mutex
	pending map[trace.SpanID][]sdktrace.ReadOnlySpan // writes in flight: the spans held for each
	ended   map[trace.SpanID]endedWrite
	order   []trace.SpanID // of ended, oldest first
}

type endedWrite struct {
	app trace.SpanContext
	at  time.Time
}

func newReparenter(next sdktrace.SpanExporter) *reparenter {
	return &reparenter{next: next, pending: make(map[trace.SpanID][]sdktrace.ReadOnlySpan), ended: make(map[trace.SpanID]endedWrite)}
}

func (r *reparenter) begin(id trace.SpanID) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pending[id] = nil
}

// end records the app span of the write whose router span is id, and
// exports the spans held for it.
func (r *reparenter) end(id trace.SpanID, app trace.SpanContext) {
	r.mu.Lock()
	held := r.pending[id]
	delete(r.pending, id)
	now := time.Now()
	n := 0
	for n < len(r.order) && now.Sub(r.ended[r.order[n]].at) > endedKeep {
		delete(r.ended, r.order[n])
		n++
	}
	r.order = append(r.order[n:], id)
	r.ended[id] = endedWrite{app, now}
	r.mu.Unlock()
	if len(held) == 0 {
		return
	}
	for i, s := range held {
		held[i] = reparent(s, app)
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = r.next.ExportSpans(ctx, held) // its errors go to OpenTelemetry's handler
	}()
}

func reparent(s sdktrace.ReadOnlySpan, app trace.SpanContext) sdktrace.ReadOnlySpan {
	if !app.IsValid() {
		return s
	}
	return reparented{ReadOnlySpan: s, parent: app}
}

// reparented is a span with another parent.
type reparented struct {
	sdktrace.ReadOnlySpan
	parent trace.SpanContext
}

func (s reparented) Parent() trace.SpanContext { return s.parent }

// ExportSpans exports spans, holding those of writes still in flight and
// moving those of ended writes.
func (r *reparenter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	out := make([]sdktrace.ReadOnlySpan, 0, len(spans))
	r.mu.Lock()
	for _, s := range spans {
		if s.Name() == "commit" {
			id := s.Parent().SpanID()
			if held, ok := r.pending[id]; ok {
				r.pending[id] = append(held, s)
				continue
			}
			if e, ok := r.ended[id]; ok {
				s = reparent(s, e.app)
			}
		}
		out = append(out, s)
	}
	r.mu.Unlock()
	if len(out) == 0 {
		return nil
	}
	return r.next.ExportSpans(ctx, out)
}

// Shutdown exports the spans still held, as they are, and shuts the next
// exporter down.
func (r *reparenter) Shutdown(ctx context.Context) error {
	r.mu.Lock()
	var held []sdktrace.ReadOnlySpan
	for id, h := range r.pending {
		held = append(held, h...)
		delete(r.pending, id)
	}
	r.mu.Unlock()
	if len(held) > 0 {
		_ = r.next.ExportSpans(ctx, held)
	}
	return r.next.Shutdown(ctx)
}

package regiond

import (
	"context"
	"sync"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

func spanCtx(trace0, span byte) trace.SpanContext {
	return trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{trace0}, SpanID: trace.SpanID{span}, TraceFlags: trace.FlagsSampled})
}

// TestWriteTracker_Parent: a commit belongs to the one traced write with
// the app when it committed; with two, it is linked to both; with none,
// to nothing.
func TestWriteTracker_Parent(t *testing.T) {
	w := &writeTracker{rp: newReparenter(&captured{})}
	a, b := spanCtx(1, 1), spanCtx(2, 2)
	before := time.Now()
	doneA := w.track(trace.ContextWithSpanContext(context.Background(), a))
	onlyA := time.Now()
	time.Sleep(time.Millisecond)
	doneB := w.track(trace.ContextWithSpanContext(context.Background(), b))
	both := time.Now()
	time.Sleep(time.Millisecond)
	doneA(trace.SpanContext{})
	time.Sleep(time.Millisecond)
	onlyB := time.Now()
	defer doneB(trace.SpanContext{})
	if p, links := w.parent("app.db", before.Add(-time.Millisecond)); p.IsValid() || len(links) != 0 {
		t.Errorf("before any write: parent %v, links %v; want none", p, links)
	}
	if p, links := w.parent("app.db", onlyA); !p.Equal(a) || len(links) != 0 {
		t.Errorf("with a alone: parent %v, links %v; want a", p, links)
	}
	if p, links := w.parent("app.db", both); p.IsValid() || len(links) != 2 || !links[0].SpanContext.Equal(a) || !links[1].SpanContext.Equal(b) {
		t.Errorf("with a and b: parent %v, links %v; want no parent, links to a and b", p, links)
	}
	if p, links := w.parent("app.db", onlyB); !p.Equal(b) || len(links) != 0 {
		t.Errorf("after a ended: parent %v, links %v; want b", p, links)
	}
	// An unsampled request is not tracked.
	w.track(trace.ContextWithSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{3}, SpanID: trace.SpanID{3}})))(trace.SpanContext{})
	if p, _ := w.parent("app.db", time.Now()); !p.Equal(b) {
		t.Errorf("after an unsampled write: parent %v, want b still", p)
	}
}

// captured is a span exporter that keeps what it is given.
type captured struct {
	mu    sync.Mutex
	spans []sdktrace.ReadOnlySpan
	more  chan struct{}
}

func (c *captured) ExportSpans(_ context.Context, spans []sdktrace.ReadOnlySpan) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.spans = append(c.spans, spans...)
	if c.more != nil {
		select {
		case c.more <- struct{}{}:
		default:
		}
	}
	return nil
}

func (c *captured) Shutdown(context.Context) error { return nil }

func (c *captured) got() []sdktrace.ReadOnlySpan {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]sdktrace.ReadOnlySpan(nil), c.spans...)
}

// TestReparenter: a commit span whose parent is a write still with the app
// is held until the write ends, then exported as a child of the app's
// span; other spans go out at once; a commit span of an ended write is
// moved at once; without an app span it keeps its parent.
func TestReparenter(t *testing.T) {
	out := &captured{more: make(chan struct{}, 1)}
	r := newReparenter(out)
	router, app, other := spanCtx(1, 1), spanCtx(1, 2), spanCtx(1, 3)
	span := func(name string, id byte, parent trace.SpanContext) sdktrace.ReadOnlySpan {
		return tracetest.SpanStub{Name: name, SpanContext: spanCtx(1, id), Parent: parent}.Snapshot()
	}
	r.begin(router.SpanID())
	if err := r.ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{span("commit", 10, router), span("ship", 11, other)}); err != nil {
		t.Fatal(err)
	}
	if got := out.got(); len(got) != 1 || got[0].Name() != "ship" {
		t.Fatalf("exported %v while the write is with the app, want only the ship span", got)
	}
	<-out.more // that export's
	r.end(router.SpanID(), app)
	select {
	case <-out.more:
	case <-time.After(10 * time.Second):
		t.Fatal("the held commit span was not exported when the write ended")
	}
	got := out.got()
	if len(got) != 2 || got[1].Name() != "commit" || !got[1].Parent().Equal(app) || got[1].SpanContext().SpanID() != (trace.SpanID{10}) {
		t.Fatalf("after the write ended: %v, want the commit span with the app's span as its parent", got)
	}
	// Late, and with no app span.
	_ = r.ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{span("commit", 12, router)})
	r.begin(other.SpanID())
	r.end(other.SpanID(), trace.SpanContext{})
	_ = r.ExportSpans(context.Background(), []sdktrace.ReadOnlySpan{span("commit", 13, other)})
	got = out.got()
	if len(got) != 4 || !got[2].Parent().Equal(app) || !got[3].Parent().Equal(other) {
		t.Errorf("late commit spans: parents %v and %v, want the app's %v and, with no app span, the router's %v", got[2].Parent(), got[3].Parent(), app, other)
	}
}

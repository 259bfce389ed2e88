package router_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"

	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/meridian-db/meridian/router"
)

// TestRouter_Telemetry: a write through a replica region is a "router"
// span there, the parent of the primary router's span, which is the
// parent the app sees in traceparent; the primary's router tells
// TrackWrite of the write and then of the app's span from its
// traceresponse header. A traceparent that does not parse starts a new
// trace and is counted. Requests are counted by kind and outcome.
func TestRouter_Telemetry(t *testing.T) {
	c := newCluster(t, "iad-1", "fra-1")
	c.setPrimary("iad-1")
	iad, fra := c.nodes["iad-1"], c.nodes["fra-1"]
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	readers := map[string]*sdkmetric.ManualReader{}
	for _, n := range []*node{iad, fra} {
		readers[n.name] = sdkmetric.NewManualReader()
		n.rt.TracerProvider, n.rt.MeterProvider = tp, sdkmetric.NewMeterProvider(sdkmetric.WithReader(readers[n.name]))
	}
	var (
		mu      sync.Mutex
		tracked []trace.SpanContext // the routers' spans TrackWrite was given
		apps    []trace.SpanContext // the app spans it was told of
	)
	iad.rt.TrackWrite = func(ctx context.Context) func(trace.SpanContext) {
		mu.Lock()
		tracked = append(tracked, trace.SpanContextFromContext(ctx))
		mu.Unlock()
		return func(app trace.SpanContext) {
			mu.Lock()
			apps = append(apps, app)
			mu.Unlock()
		}
	}
	// The app names a span of its own, a child of the traceparent it got.
	appSpan := trace.SpanID{0xa, 0xb}
	iad.onWrite = func(n *node, w http.ResponseWriter, r *http.Request) {
		parent := trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(), propagation.HeaderCarrier(r.Header)))
		w.Header().Set(router.TraceResponseHeader, fmt.Sprintf("00-%s-%s-01", parent.TraceID(), appSpan))
		n.commit(w)
	}

	clientTrace, clientSpan := trace.TraceID{1, 2, 3}, trace.SpanID{4, 5, 6}
	resp, _ := do(t, "POST", fra.srv.URL+"/entries", "x", "traceparent", fmt.Sprintf("00-%s-%s-01", clientTrace, clientSpan))
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("write through fra: %s", resp.Status)
	}
	spans := rec.Ended()
	if len(spans) != 2 {
		t.Fatalf("%d spans, want fra's and iad's router spans", len(spans))
	}
	var fraSpan, iadSpan sdktrace.ReadOnlySpan
	for _, s := range spans {
		for _, a := range s.Attributes() {
			if a.Key == "meridian.node" && a.Value.AsString() == "fra-1" {
				fraSpan = s
			} else if a.Key == "meridian.node" && a.Value.AsString() == "iad-1" {
				iadSpan = s
			}
		}
	}
	if fraSpan == nil || iadSpan == nil {
		t.Fatalf("spans %v, want one per router", spans)
	}
	if fraSpan.Name() != "router" || fraSpan.SpanKind() != trace.SpanKindServer || fraSpan.Parent().TraceID() != clientTrace || fraSpan.Parent().SpanID() != clientSpan {
		t.Errorf("fra's span %q, kind %v, parent %v; want a server span \"router\", a child of the client's", fraSpan.Name(), fraSpan.SpanKind(), fraSpan.Parent())
	}
	if iadSpan.Parent().SpanID() != fraSpan.SpanContext().SpanID() || iadSpan.SpanContext().TraceID() != clientTrace {
		t.Errorf("iad's span has parent %v, want fra's %v in the client's trace", iadSpan.Parent(), fraSpan.SpanContext())
	}
	req, _ := iad.last()
	got := trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(), propagation.HeaderCarrier(req.Header)))
	if got.SpanID() != iadSpan.SpanContext().SpanID() {
		t.Errorf("the app got traceparent %q, want iad's router span %v", req.Header.Get("traceparent"), iadSpan.SpanContext().SpanID())
	}
	mu.Lock()
	if len(tracked) != 1 || tracked[0].SpanID() != iadSpan.SpanContext().SpanID() || len(apps) != 1 || apps[0].SpanID() != appSpan || apps[0].TraceID() != clientTrace {
		t.Errorf("TrackWrite: given %v, told of %v; want iad's router span, then the app's %v", tracked, apps, appSpan)
	}
	mu.Unlock()

	// A traceparent that does not parse: a new trace, counted.
	rec2 := len(rec.Ended())
	resp, _ = do(t, "GET", fra.srv.URL+"/entries", "", "traceparent", "00-not-a-trace-context")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("read through fra: %s", resp.Status)
	}
	if s := rec.Ended()[rec2]; s.Parent().IsValid() || !s.SpanContext().IsValid() {
		t.Errorf("the read with a bad traceparent: span with parent %v, want a new trace", s.Parent())
	}
	counts := collect(t, readers["fra-1"])
	for _, want := range []string{
		"meridian.router.requests{kind=write,outcome=forwarded} 1",
		"meridian.router.requests{kind=read,outcome=local} 1",
		"meridian.trace.context.invalid{where=http} 1",
	} {
		if !counts[want] {
			t.Errorf("fra's metrics have no %q: %v", want, counts)
		}
	}
	if counts := collect(t, readers["iad-1"]); !counts["meridian.router.requests{kind=write,outcome=local} 1"] {
		t.Errorf("iad's metrics: %v, want a local write", counts)
	}
}

// collect returns the int64 sums a reader has, as "name{k=v,...} value".
func collect(t *testing.T, r *sdkmetric.ManualReader) map[string]bool {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if sum, ok := m.Data.(metricdata.Sum[int64]); ok {
				for _, dp := range sum.DataPoints {
					var kv []string
					for _, a := range dp.Attributes.ToSlice() {
						kv = append(kv, string(a.Key)+"="+a.Value.String())
					}
					out[fmt.Sprintf("%s{%s} %d", m.Name, strings.Join(kv, ","), dp.Value)] = true
				}
			}
		}
	}
	return out
}

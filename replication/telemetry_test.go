package replication

import (
	"context"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/meridian-db/meridian/ltx"
)

// TestClient_Observe: a group of applied files gives an "apply" span for
// each file with a trace context (a child of it, with its lag), a lag
// measurement for every file, and a count, not a span, for a trace
// context that does not parse.
func TestClient_Observe(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	reader := sdkmetric.NewManualReader()
	c := NewClient("fra-1", "fra", nil, t.TempDir())
	c.Telemetry = Telemetry{
		TracerProvider: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec)),
		MeterProvider:  sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)),
	}
	ship := trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{9}, SpanID: trace.SpanID{8}, TraceFlags: trace.FlagsSampled})
	tp, _ := traceparent(ship)
	now := time.Now()
	file := func(txid ltx.TXID, committed time.Duration, parent string) *File {
		f := &File{DB: "app.db", CommittedAt: now.Add(-committed), Traceparent: parent}
		f.Info.Header.MinTXID, f.Info.Header.MaxTXID = txid, txid
		return f
	}
	files := []*File{
		file(7, 30*time.Millisecond, tp),
		file(8, 20*time.Millisecond, "00-not-a-trace-context"),
		file(9, 10*time.Millisecond, ""),
	}
	c.observe(context.Background(), "app.db", files, now.Add(-time.Millisecond), now)

	spans := rec.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans, want 1 (the file with a valid trace context)", len(spans))
	}
	s := spans[0]
	attrs := map[attribute.Key]attribute.Value{}
	for _, kv := range s.Attributes() {
		attrs[kv.Key] = kv.Value
	}
	if s.Name() != "apply" || !s.Parent().Equal(trace.NewSpanContext(trace.SpanContextConfig{TraceID: ship.TraceID(), SpanID: ship.SpanID(), TraceFlags: ship.TraceFlags(), Remote: true})) ||
		attrs["meridian.txid"].AsInt64() != 7 || attrs["meridian.region"].AsString() != "fra" || attrs["meridian.lag_ms"].AsFloat64() != 30 {
		t.Errorf("span %q parent %v attributes %v; want apply, a child of %v, txid 7, region fra, lag 30 ms", s.Name(), s.Parent(), s.Attributes(), ship)
	}

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var lagCount uint64
	var invalid int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Histogram[float64]:
				if m.Name == "meridian.replication.lag" {
					for _, dp := range d.DataPoints {
						lagCount += dp.Count
					}
				}
			case metricdata.Sum[int64]:
				if m.Name == "meridian.trace.context.invalid" {
					for _, dp := range d.DataPoints {
						invalid += dp.Value
					}
				}
			}
		}
	}
	if lagCount != 3 || invalid != 1 {
		t.Errorf("lag measurements %d, invalid trace contexts %d; want 3 and 1", lagCount, invalid)
	}
}

// FuzzTraceContext feeds remoteContext the trace context fields of an
// LTXBegin frame: it never panics, reports only a parsed context as ok,
// and what it parses encodes back to itself.
func FuzzTraceContext(f *testing.F) {
	f.Add("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "congo=t61rcWkgMzE")
	f.Add("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", "")
	f.Add("00-00000000000000000000000000000000-b7ad6b7169203331-01", "")
	f.Add("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "a=b,c=d")
	f.Add("", "")
	f.Add("00-not-a-trace-context", "=")
	f.Fuzz(func(t *testing.T, parent, state string) {
		sc, ok := remoteContext(parent, state)
		if parent == "" {
			if !ok || sc.IsValid() {
				t.Fatalf("no traceparent: %v, %v; want nothing, ok", sc, ok)
			}
			return
		}
		if ok != sc.IsValid() {
			t.Fatalf("remoteContext(%q, %q) = %v, ok %v", parent, state, sc, ok)
		}
		if !ok {
			return
		}
		p2, s2 := traceparent(sc)
		sc2, ok2 := remoteContext(p2, s2)
		if !ok2 || sc2.TraceID() != sc.TraceID() || sc2.SpanID() != sc.SpanID() || sc2.TraceFlags() != sc.TraceFlags() || sc2.TraceState().String() != sc.TraceState().String() {
			t.Fatalf("%q %q parsed to %v, encoded as %q %q, parsed again to %v", parent, state, sc, p2, s2, sc2)
		}
	})
}

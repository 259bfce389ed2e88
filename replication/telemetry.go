package replication

import (
	"context"
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"

	"github.com/meridian-db/meridian/ltx"
)

// scope names this package's tracer and meter.
const scope = "github.com/meridian-db/meridian/replication"

// propagator carries a commit's trace context in LTXBegin frames.
var propagator = propagation.TraceContext{}

// LagBuckets are the bounds, in seconds, of the replication lag and apply
// duration histograms: from a tenth of a millisecond (a replica on the
// same machine) to a minute (one catching up).
var LagBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}

// Telemetry is the tracer and meter a Streamer or Client reports to;
// the zero value reports nothing. The replication lag histogram
// (meridian.replication.lag) is recorded with a "txid" attribute meant
// for exemplars only: a MeterProvider should drop it from the series
// with a view that keeps "db" and "region" (as regiond's does), or every
// transaction makes a series of its own.
type Telemetry struct {
	TracerProvider trace.TracerProvider
	MeterProvider  metric.MeterProvider
}

func (t Telemetry) tracer() trace.Tracer {
	if t.TracerProvider == nil {
		return tracenoop.NewTracerProvider().Tracer(scope)
	}
	return t.TracerProvider.Tracer(scope)
}

func (t Telemetry) meter() metric.Meter {
	if t.MeterProvider == nil {
		return metricnoop.NewMeterProvider().Meter(scope)
	}
	return t.MeterProvider.Meter(scope)
}

// streamerMetrics are the primary's instruments.
type streamerMetrics struct {
	tracer    trace.Tracer
	traced    bool // a TracerProvider is set
	bytes     metric.Int64Counter
	files     metric.Int64Counter
	snapshots metric.Int64Counter
}

func newStreamerMetrics(t Telemetry) *streamerMetrics {
	m := t.meter()
	sm := &streamerMetrics{tracer: t.tracer(), traced: t.TracerProvider != nil}
	// Errors come only from invalid names or options, fixed here.
	sm.bytes, _ = m.Int64Counter("meridian.replication.sent", metric.WithUnit("By"),
		metric.WithDescription("Bytes of LTX files the primary sent to each replica, by database."))
	sm.files, _ = m.Int64Counter("meridian.replication.files.sent",
		metric.WithDescription("LTX files the primary sent to each replica, by database (snapshots included)."))
	sm.snapshots, _ = m.Int64Counter("meridian.replication.snapshots.sent",
		metric.WithDescription("Snapshots the primary sent, by replica, database and reason."))
	return sm
}

// clientMetrics are a replica's instruments.
type clientMetrics struct {
	tracer     trace.Tracer
	lag        metric.Float64Histogram
	apply      metric.Float64Histogram
	reconnects metric.Int64Counter
	badContext metric.Int64Counter
}

func newClientMetrics(t Telemetry) *clientMetrics {
	m := t.meter()
	cm := &clientMetrics{tracer: t.tracer()}
	cm.lag, _ = m.Float64Histogram("meridian.replication.lag", metric.WithUnit("s"),
		metric.WithDescription("From a transaction's commit on the primary (its clock) to its apply on this replica (this node's clock), by database and region; exemplars carry the TXID."),
		metric.WithExplicitBucketBoundaries(LagBuckets...))
	cm.apply, _ = m.Float64Histogram("meridian.replication.apply.duration", metric.WithUnit("s"),
		metric.WithDescription("How long applying one group of received files took, by database."),
		metric.WithExplicitBucketBoundaries(LagBuckets...))
	cm.reconnects, _ = m.Int64Counter("meridian.stream.reconnects",
		metric.WithDescription("Replication streams from the primary that ended and were opened again."))
	cm.badContext, _ = m.Int64Counter("meridian.trace.context.invalid",
		metric.WithDescription("Trace contexts that did not parse, ignored: in a request's traceparent header (where=http) or a replication frame (where=frame)."))
	return cm
}

// traceparent returns the W3C trace context headers of sc.
func traceparent(sc trace.SpanContext) (parent, state string) {
	if !sc.IsValid() {
		return "", ""
	}
	c := propagation.MapCarrier{}
	propagator.Inject(trace.ContextWithSpanContext(context.Background(), sc), c)
	return c["traceparent"], c["tracestate"]
}

// remoteContext returns the span context that a frame's traceparent and
// tracestate carry; ok is false if there is one that does not parse.
func remoteContext(parent, state string) (sc trace.SpanContext, ok bool) {
	if parent == "" {
		return sc, true
	}
	c := propagation.MapCarrier{"traceparent": parent}
	if state != "" {
		c["tracestate"] = state
	}
	sc = trace.SpanContextFromContext(propagator.Extract(context.Background(), c))
	return sc, sc.IsValid()
}

// ships are the "ship" spans of one stream waiting for the replica's
// acknowledgement, by database, oldest first.
type ships struct {
	mu sync.Mutex
	by map[string][]ship
}

type ship struct {
	txid ltx.TXID
	span trace.Span
}

// maxShips bounds the ship spans a stream keeps waiting per database; the
// oldest past it ends unacknowledged.
const maxShips = 1024

func (s *ships) add(db string, txid ltx.TXID, span trace.Span) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.by == nil {
		s.by = make(map[string][]ship)
	}
	q := s.by[db]
	if len(q) == maxShips {
		q[0].span.SetStatus(codes.Error, "too many files in flight to wait for this one's acknowledgement")
		q[0].span.End()
		q = q[1:]
	}
	s.by[db] = append(q, ship{txid, span})
}

// acked ends the spans of db up to txid: the replica applied them.
func (s *ships) acked(db string, txid ltx.TXID) {
	s.mu.Lock()
	q := s.by[db]
	if len(q) == 0 {
		s.mu.Unlock()
		return
	}
	n := 0
	for n < len(q) && q[n].txid <= txid {
		n++
	}
	done := q[:n]
	s.by[db] = q[n:]
	s.mu.Unlock()
	for _, sh := range done {
		sh.span.SetAttributes(attribute.Int64("meridian.acked_txid", int64(txid)))
		sh.span.End()
	}
}

// end ends every span still waiting: the stream ended.
func (s *ships) end(err error) {
	s.mu.Lock()
	by := s.by
	s.by = nil
	s.mu.Unlock()
	for _, q := range by {
		for _, sh := range q {
			msg := "the stream ended before the replica acknowledged the file"
			if err != nil {
				msg += ": " + err.Error()
			}
			sh.span.SetStatus(codes.Error, msg)
			sh.span.End()
		}
	}
}

package router

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
)

const scope = "github.com/meridian-db/meridian/router"

// TraceResponseHeader is the W3C trace-context response header
// ("traceresponse: 00-<trace id>-<span id>-<flags>") with which an app
// names the span of its request: the router makes that span the parent of
// the commits the request made (see Router.TrackWrite).
const TraceResponseHeader = "traceresponse"

// propagator reads and writes W3C trace context headers.
var propagator = propagation.TraceContext{}

// Outcomes of a request, the "outcome" attribute of its span and of
// meridian.router.requests.
const (
	OutcomeLocal          = "local"           // served by this region's app
	OutcomeForwarded      = "forwarded"       // sent to the primary's router
	OutcomePrimary        = "primary"         // a read the replica could not serve in time, served by the primary
	OutcomeReplayed       = "replayed"        // answered with the replay header
	OutcomeMisdirected    = "misdirected"     // forwarded here, but this node takes no writes (421)
	OutcomeTooLarge       = "too_large"       // 413
	OutcomeNoPrimary      = "no_primary"      // 503 after router.primary_wait
	OutcomePrimaryChanged = "primary_changed" // 503: the primary stepped down under a write
	OutcomeClientGone     = "client_gone"
	OutcomeFailed         = "failed" // 502
)

// telemetry is a router's tracer and instruments.
type telemetry struct {
	tracer     trace.Tracer
	requests   metric.Int64Counter
	duration   metric.Float64Histogram
	ryw        metric.Float64Histogram
	badContext metric.Int64Counter
}

func (rt *Router) newTelemetry() *telemetry {
	tp, mp := rt.TracerProvider, rt.MeterProvider
	if tp == nil {
		tp = tracenoop.NewTracerProvider()
	}
	if mp == nil {
		mp = metricnoop.NewMeterProvider()
	}
	m := mp.Meter(scope)
	t := &telemetry{tracer: tp.Tracer(scope)}
	// Errors come only from invalid names or options, fixed here.
	t.requests, _ = m.Int64Counter("meridian.router.requests",
		metric.WithDescription("Requests the router answered, by kind (read, write) and outcome (local, forwarded, primary, replayed, misdirected, too_large, no_primary, primary_changed, client_gone, failed)."))
	t.duration, _ = m.Float64Histogram("meridian.router.duration", metric.WithUnit("s"),
		metric.WithDescription("How long the router took to answer a request, by kind and outcome."),
		metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
	t.ryw, _ = m.Float64Histogram("meridian.router.ryw.wait", metric.WithUnit("s"),
		metric.WithDescription("How long reads with a read-your-writes token waited for this replica, by outcome: local (it caught up) or primary (served by the primary after router.ryw_timeout)."),
		metric.WithExplicitBucketBoundaries(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
	t.badContext, _ = m.Int64Counter("meridian.trace.context.invalid",
		metric.WithDescription("Trace contexts that did not parse, ignored: in a request's traceparent header (where=http) or a replication frame (where=frame)."))
	return t
}

// served is what the router learns of a request while it answers it.
type served struct {
	outcome string
}

type servedKey struct{}

// setOutcome records how the request of ctx was answered.
func setOutcome(ctx context.Context, outcome string) {
	if s, ok := ctx.Value(servedKey{}).(*served); ok {
		s.outcome = outcome
	}
}

// traced serves a request in a "router" span, a child of the span its
// traceparent header names, and counts it.
func (rt *Router) traced(w http.ResponseWriter, r *http.Request, write bool, serve func(http.ResponseWriter, *http.Request)) {
	t := rt.tel
	began := time.Now()
	kind := "read"
	if write {
		kind = "write"
	}
	ctx := propagator.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
	if r.Header.Get("traceparent") != "" && !trace.SpanContextFromContext(ctx).IsValid() {
		// A new trace begins here instead.
		t.badContext.Add(ctx, 1, metric.WithAttributes(attribute.String("where", "http")))
	}
	ctx, span := t.tracer.Start(ctx, "router", trace.WithSpanKind(trace.SpanKindServer), trace.WithAttributes(
		attribute.String("meridian.node", rt.self.Name),
		attribute.String("meridian.region", rt.self.Region),
		attribute.String("meridian.kind", kind),
		attribute.String("http.request.method", r.Method),
		attribute.String("url.path", r.URL.Path),
	))
	s := &served{}
	ctx = context.WithValue(ctx, servedKey{}, s)
	rec := &statusWriter{ResponseWriter: w}
	serve(rec, r.WithContext(ctx))
	code := rec.code
	if code == 0 {
		code = http.StatusOK
	}
	if s.outcome == "" {
		s.outcome = OutcomeFailed
	}
	span.SetAttributes(attribute.String("meridian.outcome", s.outcome), attribute.Int("http.response.status_code", code))
	if code >= 500 {
		span.SetStatus(codes.Error, strconv.Itoa(code)+" "+http.StatusText(code))
	}
	span.End()
	attrs := metric.WithAttributes(attribute.String("kind", kind), attribute.String("outcome", s.outcome))
	t.requests.Add(ctx, 1, attrs)
	t.duration.Record(ctx, time.Since(began).Seconds(), attrs)
}

// inject sets the trace context headers of an outgoing request to the
// router's span in ctx.
func inject(ctx context.Context, h http.Header) {
	propagator.Inject(ctx, propagation.HeaderCarrier(h))
}

// appSpan returns the span an app's response names in its traceresponse
// header, invalid if it names none or one of another trace than the
// request's.
func appSpan(ctx context.Context, resp *http.Response) trace.SpanContext {
	v := resp.Header.Get(TraceResponseHeader)
	if v == "" {
		return trace.SpanContext{}
	}
	sc := trace.SpanContextFromContext(propagator.Extract(context.Background(), propagation.MapCarrier{"traceparent": v}))
	if sc.TraceID() != trace.SpanContextFromContext(ctx).TraceID() {
		return trace.SpanContext{}
	}
	return sc
}

// statusWriter records the status code of a response. It unwraps for
// http.ResponseController (flushes, hijacks).
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

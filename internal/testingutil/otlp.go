package testingutil

import (
	"bytes"
	"context"
	"net"
	"sync"

	collectormetrics "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	metricspb "go.opentelemetry.io/proto/otlp/metrics/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
)

// OTLPReceiver is an OTLP/gRPC collector on loopback that keeps every span
// and metric it is sent, for tests of what processes export.
type OTLPReceiver struct {
	// Endpoint is its URL, http://127.0.0.1:PORT, for
	// OTEL_EXPORTER_OTLP_ENDPOINT or telemetry.otlp_endpoint.
	Endpoint string

	// Discard, set before the first export, counts spans (Count) without
	// keeping them: for benchmarks.
	Discard bool

	srv     *grpc.Server
	mu      sync.Mutex
	count   int
	spans   []Span
	metrics []*metricspb.ResourceMetrics
	collectortrace.UnimplementedTraceServiceServer
}

// Span is a span received, with the service.name of its resource.
type Span struct {
	Service string
	*tracepb.Span
}

// Attr returns the value of the span's attribute key, nil if it has none.
func (s Span) Attr(key string) *commonpb.AnyValue {
	for _, kv := range s.Attributes {
		if kv.Key == key {
			return kv.Value
		}
	}
	return nil
}

// StartOTLPReceiver starts a receiver, stopped at the test's end.
func StartOTLPReceiver(tb TB) *OTLPReceiver {
	tb.Helper()
	r, err := NewOTLPReceiver()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(r.Close)
	return r
}

// NewOTLPReceiver starts a receiver on a free loopback port; Close stops it.
func NewOTLPReceiver() (*OTLPReceiver, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &OTLPReceiver{Endpoint: "http://" + ln.Addr().String(), srv: grpc.NewServer()}
	collectortrace.RegisterTraceServiceServer(r.srv, r)
	collectormetrics.RegisterMetricsServiceServer(r.srv, metricsService{r: r})
	go func() { _ = r.srv.Serve(ln) }()
	return r, nil
}

// Close stops the receiver.
func (r *OTLPReceiver) Close() { r.srv.Stop() }

// Count returns how many spans it received.
func (r *OTLPReceiver) Count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.count
}

// Export receives spans.
func (r *OTLPReceiver) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		service := ""
		for _, kv := range rs.GetResource().GetAttributes() {
			if kv.Key == "service.name" {
				service = kv.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			r.count += len(ss.GetSpans())
			if r.Discard {
				continue
			}
			for _, s := range ss.GetSpans() {
				r.spans = append(r.spans, Span{Service: service, Span: s})
			}
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

// Trace returns the spans received of the trace traceID.
func (r *OTLPReceiver) Trace(traceID []byte) []Span {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Span
	for _, s := range r.spans {
		if bytes.Equal(s.TraceId, traceID) {
			out = append(out, s)
		}
	}
	return out
}

// Spans returns every span received.
func (r *OTLPReceiver) Spans() []Span {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Span(nil), r.spans...)
}

// Metrics returns every batch of metrics received.
func (r *OTLPReceiver) Metrics() []*metricspb.ResourceMetrics {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*metricspb.ResourceMetrics(nil), r.metrics...)
}

type metricsService struct {
	r *OTLPReceiver
	collectormetrics.UnimplementedMetricsServiceServer
}

func (m metricsService) Export(_ context.Context, req *collectormetrics.ExportMetricsServiceRequest) (*collectormetrics.ExportMetricsServiceResponse, error) {
	m.r.mu.Lock()
	defer m.r.mu.Unlock()
	m.r.metrics = append(m.r.metrics, req.GetResourceMetrics()...)
	return &collectormetrics.ExportMetricsServiceResponse{}, nil
}

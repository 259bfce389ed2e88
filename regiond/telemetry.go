package regiond

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetricgrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/exemplar"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/meridian-db/meridian/replication"
)

// telemetry is a daemon's OpenTelemetry: the providers it builds and
// hands to fs, replication and the router, and its own instruments.
type telemetry struct {
	// tp is nil when nothing is exported: nothing is traced then.
	tp       *sdktrace.TracerProvider
	mp       *sdkmetric.MeterProvider
	registry *prometheus.Registry // what /metrics serves
	writes   *writeTracker        // nil when nothing is traced

	commits      metric.Int64Counter
	commitsDB    sync.Map // db name → its metric.AddOption, made once
	leaseChanges metric.Int64Counter
	stopOnce     sync.Once
}

// committed counts a commit of db: on every write, so the attribute set
// of each database is made once.
func (t *telemetry) committed(db string) {
	opt, ok := t.commitsDB.Load(db)
	if !ok {
		opt, _ = t.commitsDB.LoadOrStore(db, metric.WithAttributes(attribute.String("db", db)))
	}
	t.commits.Add(context.Background(), 1, opt.(metric.AddOption))
}

// tracerProvider returns the provider to hand to libraries, nil if none.
func (t *telemetry) tracerProvider() trace.TracerProvider {
	if t == nil || t.tp == nil {
		return nil
	}
	return t.tp
}

// replication returns what the replication streams report to.
func (t *telemetry) replication() replication.Telemetry {
	return replication.Telemetry{TracerProvider: t.tracerProvider(), MeterProvider: t.mp}
}

// otlpEndpoint returns the collector telemetry goes to: the config's, else
// whether OTEL_EXPORTER_OTLP_ENDPOINT (or a per-signal variant) names one
// (the exporters read those themselves).
func otlpEndpoint(c TelemetryConfig) (endpoint string, fromEnv bool) {
	if c.OTLPEndpoint != "" {
		return c.OTLPEndpoint, false
	}
	for _, v := range []string{"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"} {
		if e := os.Getenv(v); e != "" {
			return e, true
		}
	}
	return "", false
}

// validateTelemetry checks the telemetry keys.
func (c *Config) validateTelemetry(p *problems) {
	t := c.Telemetry
	if t.SampleCommits < 0 || t.SampleCommits > 1 {
		p.add("telemetry.sample_commits: %v is not between 0 (no commit outside a traced request is traced) and 1 (all are)", t.SampleCommits)
	}
	if t.OTLPEndpoint != "" {
		u, err := url.Parse(t.OTLPEndpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			p.add("telemetry.otlp_endpoint: %q is not an OTLP/gRPC collector URL (e.g. http://127.0.0.1:4317, or https:// for TLS)", t.OTLPEndpoint)
		}
	}
}

// startTelemetry builds the daemon's providers: metrics always (for
// /metrics), and, when an OTLP endpoint is configured, traces and
// metrics exported there.
func (d *Daemon) startTelemetry(ctx context.Context) error {
	c := d.Config
	setErrorHandler(d.Logger)
	attrs := []attribute.KeyValue{
		semconv.ServiceName("meridian-" + c.Region),
		semconv.ServiceInstanceID(c.Node),
		semconv.CloudRegion(c.Region),
		attribute.String("meridian.node", c.Node),
		attribute.String("meridian.region", c.Region),
	}
	opts := []resource.Option{resource.WithAttributes(attrs...), resource.WithFromEnv()}
	if c.Telemetry.ServiceName != "" {
		opts = append(opts, resource.WithAttributes(semconv.ServiceName(c.Telemetry.ServiceName)))
	}
	res, err := resource.New(ctx, opts...)
	if err != nil {
		return fmt.Errorf("telemetry: %w (check OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME)", err)
	}
	t := &telemetry{registry: prometheus.NewRegistry()}
	prom, err := otelprom.New(otelprom.WithRegisterer(t.registry), otelprom.WithoutScopeInfo())
	if err != nil {
		return fmt.Errorf("telemetry: the Prometheus exporter: %w", err)
	}
	t.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mopts := []sdkmetric.Option{
		sdkmetric.WithResource(res),
		sdkmetric.WithReader(prom),
		// Every lag measurement may be an exemplar, with its TXID.
		sdkmetric.WithExemplarFilter(exemplar.AlwaysOnFilter),
		sdkmetric.WithView(sdkmetric.NewView(sdkmetric.Instrument{Name: "meridian.replication.lag"},
			sdkmetric.Stream{AttributeFilter: attribute.NewAllowKeysFilter("db", "region")})),
	}
	endpoint, fromEnv := otlpEndpoint(c.Telemetry)
	if endpoint != "" {
		var topts []otlptracegrpc.Option
		var mo []otlpmetricgrpc.Option
		if !fromEnv {
			topts = append(topts, otlptracegrpc.WithEndpointURL(endpoint))
			mo = append(mo, otlpmetricgrpc.WithEndpointURL(endpoint))
		}
		te, err := otlptracegrpc.New(ctx, topts...)
		if err != nil {
			return fmt.Errorf("telemetry.otlp_endpoint %s: traces: %w", endpoint, err)
		}
		me, err := otlpmetricgrpc.New(ctx, mo...)
		if err != nil {
			_ = te.Shutdown(ctx)
			return fmt.Errorf("telemetry.otlp_endpoint %s: metrics: %w", endpoint, err)
		}
		rp := newReparenter(te)
		t.writes = &writeTracker{rp: rp}
		// The batcher drops spans when its queue is full: a commit never
		// waits for the collector.
		t.tp = sdktrace.NewTracerProvider(sdktrace.WithResource(res), sdktrace.WithBatcher(rp))
		mopts = append(mopts, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(me)))
	}
	t.mp = sdkmetric.NewMeterProvider(mopts...)
	if err := d.instruments(t); err != nil {
		_ = t.shutdown(ctx)
		return err
	}
	d.tel = t
	if endpoint != "" {
		d.Logger.Info("telemetry: exporting traces and metrics over OTLP/gRPC", "endpoint", endpoint,
			"sample_commits", c.Telemetry.SampleCommits)
	}
	return nil
}

// stopTelemetry flushes what is batched, for up to 5 s, and stops the
// exporters, once.
func (d *Daemon) stopTelemetry() {
	if d.tel == nil {
		return
	}
	d.tel.stopOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := d.tel.shutdown(ctx); err != nil {
			d.Logger.Warn("telemetry: not all spans and metrics were sent before shutdown", "err", err)
		}
	})
}

// shutdown flushes what is batched and stops the exporters.
func (t *telemetry) shutdown(ctx context.Context) error {
	var errs []error
	if t.tp != nil {
		errs = append(errs, t.tp.Shutdown(ctx))
	}
	errs = append(errs, t.mp.Shutdown(ctx))
	return errors.Join(errs...)
}

// metricsHandler serves /metrics: the node's metrics, and the Go
// runtime's and the process's own, in Prometheus's text format (and
// OpenMetrics, with exemplars, to a scraper that asks for it).
func (d *Daemon) metricsHandler() http.Handler {
	return promhttp.HandlerFor(d.tel.registry, promhttp.HandlerOpts{EnableOpenMetrics: true})
}

// instruments makes the daemon's own instruments: counters it adds to as
// things happen, and gauges read from Status at each collection.
func (d *Daemon) instruments(t *telemetry) error {
	m := t.mp.Meter("github.com/meridian-db/meridian/regiond")
	var err error
	if t.commits, err = m.Int64Counter("meridian.commits",
		metric.WithDescription("Transactions this node recorded in each database's log as primary, since it started.")); err != nil {
		return err
	}
	if t.leaseChanges, err = m.Int64Counter("meridian.lease.changes",
		metric.WithDescription("Times this node took a role (primary or replica) since it started, by role.")); err != nil {
		return err
	}
	gauge := func(name, unit, help string) metric.Float64ObservableGauge {
		g, gerr := m.Float64ObservableGauge(name, metric.WithUnit(unit), metric.WithDescription(help))
		err = errors.Join(err, gerr)
		return g
	}
	role := gauge("meridian.role", "", "1 for the node's role now (primary or replica).")
	epoch := gauge("meridian.lease.epoch", "", "The newest lease epoch the node knows: the one it holds as primary, the newest it accepted as a replica.")
	ready := gauge("meridian.ready", "", "1 if /readyz answers ready.")
	lag := gauge("meridian.lag", "s", "On a replica, how far behind the primary it is (see /status lag_ms).")
	dbTXID := gauge("meridian.db.txid", "", "The TXID of each database's position on this node.")
	dbLag := gauge("meridian.db.lag", "s", "On a replica, how far behind the primary each database is.")
	replicaConnected := gauge("meridian.replica.connected", "", "On the primary, 1 for each replica streaming now.")
	replicaTXID := gauge("meridian.replica.acked_txid", "", "On the primary, the TXID each replica acknowledged of each database.")
	replicaLag := gauge("meridian.replica.lag", "s", "On the primary, the time since it committed the oldest transaction a replica has not acknowledged.")
	streamConnected := gauge("meridian.stream.connected", "", "On a replica, 1 while its stream from the primary is up.")
	syncDegraded := gauge("meridian.sync.degraded", "", "On a primary in sync durability, 1 while it has degraded to async.")
	syncWaiting := gauge("meridian.sync.waiting", "", "On a primary in sync durability, commits waiting for acknowledgements now.")
	syncTimeouts, terr := m.Int64ObservableCounter("meridian.sync.timeouts",
		metric.WithDescription("On a primary in sync durability, commits that waited longer than replication.sync_timeout."))
	if err = errors.Join(err, terr); err != nil {
		return err
	}
	seconds := func(ms int64) float64 { return (time.Duration(ms) * time.Millisecond).Seconds() }
	_, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		if d.FS == nil {
			return nil // not open yet, or closed
		}
		st := d.Status()
		o.ObserveFloat64(role, 1, metric.WithAttributes(attribute.String("role", st.Role)))
		o.ObserveFloat64(epoch, float64(st.Epoch))
		o.ObserveFloat64(ready, bool01(st.Ready))
		for _, db := range st.Databases {
			o.ObserveFloat64(dbTXID, float64(db.TXID), metric.WithAttributes(attribute.String("db", db.Name)))
		}
		if st.Role == RoleReplica {
			o.ObserveFloat64(lag, seconds(st.LagMS))
			for _, db := range st.Databases {
				o.ObserveFloat64(dbLag, seconds(db.LagMS), metric.WithAttributes(attribute.String("db", db.Name)))
			}
		}
		for _, r := range st.Replicas {
			ra := []attribute.KeyValue{attribute.String("replica", r.Node), attribute.String("replica_region", r.Region)}
			o.ObserveFloat64(replicaConnected, bool01(r.Connected), metric.WithAttributes(ra...))
			for _, db := range r.Databases {
				a := metric.WithAttributes(append(ra, attribute.String("db", db.Name))...)
				o.ObserveFloat64(replicaTXID, float64(db.ackedTXID), a)
				o.ObserveFloat64(replicaLag, seconds(db.LagMS), a)
			}
		}
		if s := st.Stream; s != nil {
			o.ObserveFloat64(streamConnected, bool01(s.Connected))
		}
		if du := st.Durability; du != nil && du.Mode == DurabilitySync {
			o.ObserveFloat64(syncDegraded, bool01(du.Degraded))
			o.ObserveInt64(syncTimeouts, int64(du.Timeouts))
			o.ObserveFloat64(syncWaiting, float64(du.Waiting))
		}
		return nil
	}, role, epoch, ready, lag, dbTXID, dbLag, replicaConnected, replicaTXID, replicaLag, streamConnected, syncDegraded, syncWaiting, syncTimeouts)
	return err
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// errorLog is where OpenTelemetry's errors go (an unreachable collector,
// say): the first of each minute is logged, with how many were not.
var errorLog struct {
	once       sync.Once
	mu         sync.Mutex
	logger     *slog.Logger
	last       time.Time
	suppressed int
}

// errorEvery is how often at most an OpenTelemetry error is logged.
const errorEvery = time.Minute

func setErrorHandler(logger *slog.Logger) {
	errorLog.mu.Lock()
	errorLog.logger = logger
	errorLog.mu.Unlock()
	errorLog.once.Do(func() {
		otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
			errorLog.mu.Lock()
			defer errorLog.mu.Unlock()
			if time.Since(errorLog.last) < errorEvery {
				errorLog.suppressed++
				return
			}
			errorLog.last = time.Now()
			errorLog.logger.Warn("telemetry: export failed; commits go on, their spans and metrics are dropped until the collector answers",
				"err", err, "errors_not_logged", errorLog.suppressed, "next_log_in", errorEvery)
			errorLog.suppressed = 0
		}))
	})
}

// roleEvent publishes a role change on /events and counts it.
func (d *Daemon) roleEvent(ev Event) {
	d.tel.leaseChanges.Add(context.Background(), 1, metric.WithAttributes(attribute.String("role", ev.Role)))
	d.events.publish(ev)
}

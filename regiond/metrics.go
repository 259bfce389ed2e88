package regiond

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// statusCollector exports a node's Status as Prometheus metrics, read at
// each scrape.
type statusCollector struct {
	d *Daemon

	role, epoch, ready, lag                   *prometheus.Desc
	dbTXID, dbLag                             *prometheus.Desc
	replicaConnected, replicaTXID, replicaLag *prometheus.Desc
	streamConnected, reconnects               *prometheus.Desc
	syncDegraded, syncTimeouts, syncWaiting   *prometheus.Desc
}

func newStatusCollector(d *Daemon) *statusCollector {
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("meridian_"+name, help, labels, nil)
	}
	return &statusCollector{
		d:                d,
		role:             desc("role", "1 for the node's role now (primary or replica).", "role"),
		epoch:            desc("lease_epoch", "The newest lease epoch the node knows: the one it holds as primary, the newest it accepted as a replica."),
		ready:            desc("ready", "1 if /readyz answers ready."),
		lag:              desc("lag_seconds", "On a replica, how far behind the primary it is (see /status lag_ms)."),
		dbTXID:           desc("db_txid", "The TXID of each database's position on this node.", "db"),
		dbLag:            desc("db_lag_seconds", "On a replica, how far behind the primary each database is.", "db"),
		replicaConnected: desc("replica_connected", "On the primary, 1 for each replica streaming now.", "replica", "replica_region"),
		replicaTXID:      desc("replica_acked_txid", "On the primary, the TXID each replica acknowledged of each database.", "replica", "replica_region", "db"),
		replicaLag:       desc("replica_lag_seconds", "On the primary, the time since it committed the oldest transaction a replica has not acknowledged.", "replica", "replica_region", "db"),
		streamConnected:  desc("stream_connected", "On a replica, 1 while its stream from the primary is up."),
		reconnects:       desc("stream_reconnects_total", "On a replica, streams from the primary that ended and were opened again since it began following this primary."),
		syncDegraded:     desc("sync_degraded", "On a primary in sync durability, 1 while it has degraded to async."),
		syncTimeouts:     desc("sync_timeouts_total", "On a primary in sync durability, commits that waited longer than replication.sync_timeout."),
		syncWaiting:      desc("sync_waiting", "On a primary in sync durability, commits waiting for acknowledgements now."),
	}
}

func (c *statusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.role, c.epoch, c.ready, c.lag, c.dbTXID, c.dbLag, c.replicaConnected, c.replicaTXID,
		c.replicaLag, c.streamConnected, c.reconnects, c.syncDegraded, c.syncTimeouts, c.syncWaiting} {
		ch <- d
	}
}

func (c *statusCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.d.Status()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	seconds := func(ms int64) float64 { return (time.Duration(ms) * time.Millisecond).Seconds() }
	gauge(c.role, 1, st.Role)
	gauge(c.epoch, float64(st.Epoch))
	gauge(c.ready, bool01(st.Ready))
	for _, db := range st.Databases {
		gauge(c.dbTXID, float64(db.TXID), db.Name)
	}
	if st.Role == RoleReplica {
		gauge(c.lag, seconds(st.LagMS))
		for _, db := range st.Databases {
			gauge(c.dbLag, seconds(db.LagMS), db.Name)
		}
	}
	for _, r := range st.Replicas {
		gauge(c.replicaConnected, bool01(r.Connected), r.Node, r.Region)
		for _, db := range r.Databases {
			gauge(c.replicaTXID, float64(db.ackedTXID), r.Node, r.Region, db.Name)
			gauge(c.replicaLag, seconds(db.LagMS), r.Node, r.Region, db.Name)
		}
	}
	if s := st.Stream; s != nil {
		gauge(c.streamConnected, bool01(s.Connected))
		counter(c.reconnects, float64(s.Reconnects))
	}
	if du := st.Durability; du != nil && du.Mode == DurabilitySync {
		gauge(c.syncDegraded, bool01(du.Degraded))
		counter(c.syncTimeouts, float64(du.Timeouts))
		gauge(c.syncWaiting, float64(du.Waiting))
	}
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// metricsHandler serves /metrics: the node's status, and the Go runtime's
// and the process's own metrics, in Prometheus's text format.
func (d *Daemon) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newStatusCollector(d), d.commits, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

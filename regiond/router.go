package regiond

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/meridian-db/meridian/router"
)

// positions is how far each local database is, as its readers see it:
// the TXID of the last transaction the node committed as primary or
// applied as a replica. The router waits on it (read-your-writes).
type positions struct {
	mu      sync.Mutex
	pos     map[string]uint64
	changed chan struct{} // closed and replaced at every change
}

func (p *positions) set(db string, txid uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pos[db] == txid {
		return
	}
	p.pos[db] = txid
	close(p.changed)
	p.changed = make(chan struct{})
}

// notifyRole wakes whoever waits for the primary to change (the router).
func (d *Daemon) notifyRole() {
	d.roleMu.Lock()
	defer d.roleMu.Unlock()
	close(d.roleChanged)
	d.roleChanged = make(chan struct{})
}

// routerView is the daemon as its router sees it (router.Cluster and
// router.Positions).
type routerView struct{ d *Daemon }

var (
	_ router.Cluster   = routerView{}
	_ router.Positions = routerView{}
)

// Primary is the node that takes writes: none while this node hands the
// lease off, nor while it is named primary but holds no epoch yet.
func (v routerView) Primary() (router.Node, bool, <-chan struct{}) {
	d := v.d
	d.roleMu.Lock()
	ch := d.roleChanged
	d.roleMu.Unlock()
	name := d.Primary()
	if name == "" || d.handingOff.Load() {
		return router.Node{}, false, ch
	}
	c := d.Config
	if name == c.Node {
		if !d.IsPrimary() {
			return router.Node{}, false, ch
		}
		return router.Node{Name: c.Node, Region: c.Region, Self: true}, true, ch
	}
	n := router.Node{Name: name}
	if p, ok := c.Peer(name); ok {
		n.Region = p.Region
		if p.Router != "" {
			n.URL, _ = RouterURL(p.Router) // validated
		}
	}
	return n, true, ch
}

func (v routerView) Positions() (map[string]uint64, <-chan struct{}) {
	p := &v.d.pos
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.pos), p.changed
}

// Committed flushes every database's commits into its log, then returns
// the logs' positions.
func (v routerView) Committed(ctx context.Context) (map[string]uint64, error) {
	f := v.d.FS
	if f == nil {
		return nil, errors.New("not open")
	}
	m := make(map[string]uint64)
	for _, name := range f.DBs() {
		db := f.DB(name)
		if db == nil {
			continue
		}
		if err := db.Flush(); err != nil {
			return m, fmt.Errorf("%s: %w", name, err)
		}
		m[name] = uint64(db.Log().Pos().TXID)
	}
	return m, nil
}

// routerServer serves the router on router.listen, and with mutual TLS
// on router.peer_listen.
type routerServer struct {
	srvs []*http.Server
	done []chan struct{} // each closed when its Serve has returned
}

// Router returns the node's router, set up from the router.* keys.
func (d *Daemon) Router() (*router.Router, error) {
	c := d.Config.Router
	target, err := RouterURL(c.Target)
	if err != nil {
		return nil, fmt.Errorf("router.target: %w", err)
	}
	v := routerView{d}
	rt := router.New(router.Node{Name: d.Config.Node, Region: d.Config.Region}, target, v, v)
	rt.RYWTimeout = time.Duration(c.RYWTimeout)
	rt.PrimaryWait = time.Duration(c.PrimaryWait)
	rt.UpstreamTimeout = time.Duration(c.UpstreamTimeout)
	rt.MaxBodyBytes = c.MaxBody
	rt.IdempotentHeader = c.IdempotentHeader
	rt.IdempotentMethods = c.IdempotentMethods
	rt.Replay = c.Replay
	rt.TrustForwarded = c.TrustForwarded
	rt.Logger = d.Logger.With("component", "router")
	rt.TracerProvider, rt.MeterProvider = d.tel.tracerProvider(), d.tel.mp
	if d.tel.writes != nil {
		rt.TrackWrite = d.tel.writes.track
	}
	if pt, err := d.peerTransport(); err != nil {
		return nil, err
	} else if pt != nil {
		rt.PeerTransport = pt
	}
	for _, s := range c.WritePaths {
		r, err := router.ParseRule(s, true)
		if err != nil {
			return nil, fmt.Errorf("router.write_paths: %w", err)
		}
		rt.Rules = append(rt.Rules, r)
	}
	for _, s := range c.ReadPaths {
		r, err := router.ParseRule(s, false)
		if err != nil {
			return nil, fmt.Errorf("router.read_paths: %w", err)
		}
		rt.Rules = append(rt.Rules, r)
	}
	return rt, nil
}

// peerTransport returns the transport to the routers of peers whose
// router is an https:// URL: mutual TLS with this node's certificate,
// each server required to be the node its entry names. nil if no peer's
// router is https.
func (d *Daemon) peerTransport() (http.RoundTripper, error) {
	c := d.Config
	byAddr := map[string]string{}
	for _, p := range c.Replication.Peers {
		if u, err := RouterURL(p.Router); err == nil && p.Router != "" && u.Scheme == "https" {
			byAddr[u.Host] = p.Node
		}
	}
	if len(byAddr) == 0 {
		return nil, nil
	}
	configs := map[string]*tls.Config{}
	for addr, node := range byAddr {
		cfg, err := c.ClientTLS(node)
		if err != nil {
			return nil, fmt.Errorf("router to %s: %w", node, err)
		}
		configs[addr] = cfg
	}
	dialer := &net.Dialer{Timeout: router.DefaultDialTimeout, KeepAlive: 30 * time.Second}
	return &http.Transport{
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			cfg, ok := configs[addr]
			if !ok {
				return nil, fmt.Errorf("%s is the https router of no node of replication.peers", addr)
			}
			td := &tls.Dialer{NetDialer: dialer, Config: cfg}
			return td.DialContext(ctx, network, addr)
		},
		ResponseHeaderTimeout: time.Duration(c.Router.UpstreamTimeout),
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
	}, nil
}

// startRouter serves the router on router.listen, if set.
func (d *Daemon) startRouter() (*routerServer, error) {
	addr := d.Config.Router.Listen
	if addr == "" {
		return nil, nil
	}
	rt, err := d.Router()
	if err != nil {
		return nil, err
	}
	s := &routerServer{}
	serve := func(ln net.Listener, what string) {
		srv := &http.Server{
			Handler:           rt,
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			MaxHeaderBytes:    router.DefaultMaxHeaderBytes,
			ErrorLog:          slog.NewLogLogger(rt.Logger.Handler(), slog.LevelWarn),
		}
		done := make(chan struct{})
		s.srvs, s.done = append(s.srvs, srv), append(s.done, done)
		go func() {
			defer close(done)
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				d.Logger.Error("router stopped", "listener", what, "err", err)
			}
		}()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("router.listen %s: %w", addr, err)
	}
	serve(ln, "router.listen")
	d.Logger.Info("router listening", "addr", ln.Addr().String(), "target", d.Config.Router.Target)
	if pl := d.Config.Router.PeerListen; pl != "" {
		cfg, err := d.Config.ServerTLS(d.Config.PeerNodes)
		if err == nil {
			var pln net.Listener
			if pln, err = net.Listen("tcp", pl); err == nil {
				serve(tls.NewListener(pln, cfg), "router.peer_listen")
				d.Logger.Info("router listening for peers (mutual TLS)", "addr", pln.Addr().String())
			}
		}
		if err != nil {
			s.close(context.Background())
			return nil, fmt.Errorf("router.peer_listen %s: %w", pl, err)
		}
	}
	return s, nil
}

// close stops the router: requests in progress get until ctx ends;
// streams still open (server-sent events, WebSockets) are then cut.
func (s *routerServer) close(ctx context.Context) {
	for i, srv := range s.srvs {
		if err := srv.Shutdown(ctx); err != nil {
			_ = srv.Close()
		}
		<-s.done[i]
	}
}

package regiond

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// AdminHandler returns the admin API:
//
//   - GET /status: the node's Status, as JSON;
//   - GET /healthz: 200 while the daemon serves;
//   - GET /readyz: 200 if the node is ready (the primary; a replica that is
//     connected and at most router.max_lag behind), else 503 saying why;
//   - POST /handoff?to=NODE: hand the lease to NODE (Daemon.Handoff);
//   - GET /events: a stream of Event, one JSON object a line, from the
//     moment of the request until the client goes away;
//   - GET /metrics: the status, and the Go runtime's and the process's
//     metrics, for Prometheus.
//
// /healthz and /readyz answer in plain text; other methods get 405.
func (d *Daemon) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(d.Status())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		st := d.Status()
		if !st.Ready {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %s\n", st.NotReady)
			return
		}
		if st.Role == RolePrimary {
			fmt.Fprintln(w, "ready: primary")
		} else {
			fmt.Fprintf(w, "ready: replica of %s, %d ms behind (router.max_lag %d ms)\n", st.Primary, st.LagMS, st.MaxLagMS)
		}
	})
	mux.HandleFunc("POST /handoff", d.serveHandoff)
	mux.HandleFunc("GET /events", d.events.serveEvents)
	mux.Handle("GET /metrics", d.metricsHandler())
	return mux
}

// adminServer is the admin API's HTTP server.
type adminServer struct {
	srv  *http.Server
	done chan struct{} // closed when Serve has returned
}

// startAdmin serves the admin API on admin.listen, if set.
func (d *Daemon) startAdmin() (*adminServer, error) {
	addr := d.Config.Admin.Listen
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin.listen %s: %w", addr, err)
	}
	a := &adminServer{
		srv:  &http.Server{Handler: d.AdminHandler(), ReadHeaderTimeout: 5 * time.Second},
		done: make(chan struct{}),
	}
	go func() {
		defer close(a.done)
		if err := a.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.Logger.Error("admin API stopped", "err", err)
		}
	}()
	d.Logger.Info("admin API listening", "addr", ln.Addr().String())
	return a, nil
}

// close stops the server: requests in progress get until ctx ends, and
// streams still open are then cut.
func (a *adminServer) close(ctx context.Context) {
	if err := a.srv.Shutdown(ctx); err != nil {
		_ = a.srv.Close()
	}
	<-a.done
}

// forwardedHeader marks a handoff request one node sent on to the
// primary, which does not send it on again.
const forwardedHeader = "Meridian-Forwarded-By"

// serveHandoff is POST /handoff?to=NODE: a graceful handoff of the lease
// to NODE (Handoff), answered with its HandoffResult as JSON, or with an
// error and why as text (409 if the handoff did not happen). A node that
// is not the primary sends the request on to the primary's admin API
// (its replication.peers entry), so that any node takes it.
func (d *Daemon) serveHandoff(w http.ResponseWriter, r *http.Request) {
	to := r.URL.Query().Get("to")
	if to == "" {
		http.Error(w, "handoff: name the node to hand the lease to: POST /handoff?to=NODE", http.StatusBadRequest)
		return
	}
	res, err := d.Handoff(r.Context(), to)
	if errors.Is(err, ErrNotPrimary) && r.Header.Get(forwardedHeader) == "" {
		primary := d.Primary()
		if ls := d.leaseStatus(); primary == "" && ls != nil {
			primary = ls.Holder
		}
		if p, ok := d.Config.Peer(primary); ok && p.Admin != "" {
			d.forwardHandoff(w, r, p.Admin)
			return
		}
		err = fmt.Errorf("%w, and no primary with an admin address in replication.peers to send the request on to", err)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(res)
}

// forwardHandoff sends handoff request r on to the admin API at admin and
// copies its answer to w.
func (d *Daemon) forwardHandoff(w http.ResponseWriter, r *http.Request, admin string) {
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, "http://"+admin+"/handoff?"+r.URL.RawQuery, nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	req.Header.Set(forwardedHeader, d.Config.Node)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		http.Error(w, fmt.Sprintf("handoff: sending the request on to the primary at %s: %v", admin, err), http.StatusBadGateway)
		return
	}
	defer func() { _ = resp.Body.Close() }()
	if ct := resp.Header.Get("Content-Type"); ct != "" {
		w.Header().Set("Content-Type", ct)
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
}

package regiond

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

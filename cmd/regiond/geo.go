package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/meridian-db/meridian/regiond"
	"github.com/meridian-db/meridian/router"
)

const geoUsage = `Usage: regiond geo -config FILE

Runs a geo entry: one HTTP router in front of every region, which sends
each request to the router of the client's region, placed by a trusted
header (headers), the regions' networks (cidrs), a GeoIP database
(geoip), or default_region; a region that is not ready (its node's
/readyz, polled every check_interval) or whose router cannot be reached
is skipped for the nearest one that is. Runs until SIGINT or SIGTERM.

`

func runGeo(ctx context.Context, args []string, stderr io.Writer) error {
	fl := flag.NewFlagSet("regiond geo", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, geoUsage); fl.PrintDefaults() }
	configPath := fl.String("config", "geo.yml", "configuration `file`")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		return usagef("geo: unexpected arguments %q", fl.Args())
	}
	cfg, err := regiond.LoadGeoConfig(*configPath)
	if err != nil {
		return err
	}
	g, err := cfg.Geo()
	if err != nil {
		return err
	}
	if db, ok := g.GeoIP.(*router.GeoIP); ok {
		defer db.Close()
	}
	g.Logger = cfg.Logger(stderr)
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("geo: listen %s: %w", cfg.Listen, err)
	}
	g.Start()
	defer g.Close()
	srv := &http.Server{Handler: g, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: router.DefaultMaxHeaderBytes}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	g.Logger.Info("geo entry listening", "addr", ln.Addr().String(), "regions", len(cfg.Regions), "down", g.Down())
	select {
	case err := <-errc:
		return fmt.Errorf("geo: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}

package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/oschwald/maxminddb-golang/v2"
)

// Region is a region as the geo entry sees it.
type Region struct {
	Name   string
	Router *url.URL // its router
	// Ready, if set, is polled: the region is up while it answers 200 (a
	// node's /readyz: a replica more than router.max_lag behind is not).
	Ready *url.URL
	// Lat and Lon place it, for the nearest region when the client's own
	// is down or the client was placed by coordinates; both 0 if unknown.
	Lat, Lon float64
	// Countries (ISO 3166 codes) and CIDRs are the clients it serves.
	Countries []string
	CIDRs     []netip.Prefix
}

func (r Region) placed() bool { return r.Lat != 0 || r.Lon != 0 }

// Location is where a GeoIP database places an address.
type Location struct {
	Country  string // ISO 3166 code, "" if unknown
	Lat, Lon float64
	Coords   bool // Lat and Lon are known
}

// Locator places client addresses: a GeoIP database.
type Locator interface {
	// Locate returns where addr is; ok false if the database does not
	// know. Any goroutine may call it.
	Locate(addr netip.Addr) (loc Location, ok bool, err error)
}

// GeoIP is a MaxMind-format database (GeoLite2/GeoIP2 Country or City).
type GeoIP struct{ r *maxminddb.Reader }

var _ Locator = (*GeoIP)(nil)

// OpenGeoIP opens the MaxMind-format database at path.
func OpenGeoIP(path string) (*GeoIP, error) {
	r, err := maxminddb.Open(path)
	if err != nil {
		return nil, fmt.Errorf("geoip %s: not a MaxMind DB file (want a GeoLite2 or GeoIP2 Country or City .mmdb): %w", path, err)
	}
	if !strings.Contains(r.Metadata.DatabaseType, "Country") && !strings.Contains(r.Metadata.DatabaseType, "City") {
		r.Close()
		return nil, fmt.Errorf("geoip %s: database type %q holds no countries or places (want a GeoLite2 or GeoIP2 Country or City database)", path, r.Metadata.DatabaseType)
	}
	return &GeoIP{r: r}, nil
}

// Close closes the database.
func (g *GeoIP) Close() error { return g.r.Close() }

type geoRecord struct {
	Country struct {
		ISOCode string `maxminddb:"iso_code"`
	} `maxminddb:"country"`
	Location struct {
		Latitude  *float64 `maxminddb:"latitude"`
		Longitude *float64 `maxminddb:"longitude"`
	} `maxminddb:"location"`
}

// Locate places addr by the database.
func (g *GeoIP) Locate(addr netip.Addr) (Location, bool, error) {
	res := g.r.Lookup(addr.Unmap())
	if err := res.Err(); err != nil {
		return Location{}, false, err
	}
	if !res.Found() {
		return Location{}, false, nil
	}
	var rec geoRecord
	if err := res.Decode(&rec); err != nil {
		return Location{}, false, err
	}
	loc := Location{Country: strings.ToUpper(rec.Country.ISOCode)}
	if rec.Location.Latitude != nil && rec.Location.Longitude != nil {
		loc.Lat, loc.Lon, loc.Coords = *rec.Location.Latitude, *rec.Location.Longitude, true
	}
	return loc, loc.Country != "" || loc.Coords, nil
}

// RegionHeader names, on a geo entry's response, the region it sent the
// request to; GeoHeader says how it placed the client.
const (
	RegionHeader = "Meridian-Region"
	GeoHeader    = "Meridian-Geo"
)

// DefaultCheckInterval is how often a geo entry polls each region's Ready.
const DefaultCheckInterval = time.Second

// Geo is the geo entry: a router in front of every region that sends each
// request to the router of the client's region, or of the nearest region
// that is up. It places a client by, in order: a trusted header naming a
// region or a country (Headers, e.g. Fly-Region, CF-IPCountry), the CIDR
// tables of the regions, a GeoIP database (coordinates, else country),
// and Default. Set the tunables, then Start it; it is an http.Handler.
type Geo struct {
	Regions []Region
	// Headers are trusted request headers that name the client's region
	// or country, tried in order. Only set them where an edge in front
	// sets them (and strips clients' own).
	Headers []string
	GeoIP   Locator // nil: none
	// Default is the region of a client nothing places; "" for the first.
	Default string
	// TrustForwarded takes the client's address from X-Forwarded-For
	// (the first address) rather than the connection.
	TrustForwarded  bool
	CheckInterval   time.Duration
	DialTimeout     time.Duration
	UpstreamTimeout time.Duration
	MaxBodyBytes    int64
	Logger          *slog.Logger

	mu     sync.Mutex
	down   map[string]string // region → why it is down
	proxy  *httputil.ReverseProxy
	cancel context.CancelFunc
	done   chan struct{}
}

// NewGeo returns a geo entry in front of regions.
func NewGeo(regions []Region) *Geo {
	return &Geo{
		Regions:         regions,
		CheckInterval:   DefaultCheckInterval,
		DialTimeout:     DefaultDialTimeout,
		UpstreamTimeout: DefaultUpstreamTimeout,
		MaxBodyBytes:    DefaultMaxBodyBytes,
		Logger:          slog.New(slog.DiscardHandler),
		down:            map[string]string{},
	}
}

// Start polls the regions' Ready URLs until Close. The first round is
// done when it returns.
func (g *Geo) Start() {
	rt := &Router{DialTimeout: g.DialTimeout, UpstreamTimeout: g.UpstreamTimeout}
	base := rt.transport()
	g.proxy = &httputil.ReverseProxy{
		Rewrite:      g.rewrite,
		Transport:    geoTransport{g: g, base: base},
		ErrorHandler: g.proxyError,
		ErrorLog:     slog.NewLogLogger(g.Logger.Handler(), slog.LevelWarn),
	}
	ctx, cancel := context.WithCancel(context.Background())
	g.cancel, g.done = cancel, make(chan struct{})
	client := &http.Client{Timeout: max(g.CheckInterval, 500*time.Millisecond), Transport: base}
	g.check(ctx, client)
	go func() {
		defer close(g.done)
		t := time.NewTicker(g.CheckInterval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				g.check(ctx, client)
			}
		}
	}()
}

// Close stops the polling.
func (g *Geo) Close() {
	if g.cancel != nil {
		g.cancel()
		<-g.done
	}
}

// check polls every region's Ready URL at once.
func (g *Geo) check(ctx context.Context, client *http.Client) {
	var wg sync.WaitGroup
	for _, r := range g.Regions {
		if r.Ready == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			why := ""
			req, _ := http.NewRequestWithContext(ctx, "GET", r.Ready.String(), nil)
			resp, err := client.Do(req)
			if err != nil {
				why = err.Error()
			} else {
				if resp.StatusCode != http.StatusOK {
					b := make([]byte, 200)
					n, _ := resp.Body.Read(b)
					why = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(b[:n])))
				}
				resp.Body.Close()
			}
			if ctx.Err() == nil {
				g.setDown(r.Name, why)
			}
		}()
	}
	wg.Wait()
}

func (g *Geo) setDown(region, why string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	was, wasDown := g.down[region]
	if why == "" {
		if wasDown {
			delete(g.down, region)
			g.Logger.Info("region up again", "region", region)
		}
		return
	}
	g.down[region] = why
	if !wasDown || was != why {
		g.Logger.Warn("region down: requests go to the nearest region that is up", "region", region, "why", why)
	}
}

// Down returns the regions taken for down, and why.
func (g *Geo) Down() map[string]string {
	g.mu.Lock()
	defer g.mu.Unlock()
	m := make(map[string]string, len(g.down))
	for k, v := range g.down {
		m[k] = v
	}
	return m
}

func (g *Geo) region(name string) (Region, bool) {
	for _, r := range g.Regions {
		if strings.EqualFold(r.Name, name) {
			return r, true
		}
	}
	return Region{}, false
}

// placement is where a request's client is.
type placement struct {
	region   string // the region that serves it, "" if placed by coordinates only
	lat, lon float64
	coords   bool
	how      string
}

// place finds the client's region or place.
func (g *Geo) place(r *http.Request) placement {
	for _, h := range g.Headers {
		v := strings.TrimSpace(r.Header.Get(h))
		if v == "" {
			continue
		}
		if reg, ok := g.region(v); ok {
			return placement{region: reg.Name, how: "header " + h}
		}
		if reg, ok := g.byCountry(v); ok {
			return placement{region: reg, how: "header " + h + " (country " + strings.ToUpper(v) + ")"}
		}
	}
	addr, ok := g.clientAddr(r)
	if ok {
		best, bits := "", -1
		for _, reg := range g.Regions {
			for _, p := range reg.CIDRs {
				if p.Contains(addr) && p.Bits() > bits {
					best, bits = reg.Name, p.Bits()
				}
			}
		}
		if best != "" {
			return placement{region: best, how: "cidr"}
		}
		if g.GeoIP != nil {
			loc, found, err := g.GeoIP.Locate(addr)
			if err != nil {
				g.Logger.Warn("geoip lookup", "addr", addr, "err", err)
			}
			if found && loc.Coords {
				return placement{lat: loc.Lat, lon: loc.Lon, coords: true, how: "geoip coordinates"}
			}
			if found {
				if reg, ok := g.byCountry(loc.Country); ok {
					return placement{region: reg, how: "geoip country " + loc.Country}
				}
			}
		}
	}
	def := g.Default
	if def == "" && len(g.Regions) > 0 {
		def = g.Regions[0].Name
	}
	return placement{region: def, how: "default"}
}

func (g *Geo) byCountry(code string) (string, bool) {
	for _, reg := range g.Regions {
		for _, c := range reg.Countries {
			if strings.EqualFold(c, code) {
				return reg.Name, true
			}
		}
	}
	return "", false
}

func (g *Geo) clientAddr(r *http.Request) (netip.Addr, bool) {
	s := r.RemoteAddr
	if g.TrustForwarded {
		if xff := r.Header.Get("X-Forwarded-For"); xff != "" {
			first, _, _ := strings.Cut(xff, ",")
			if a, err := netip.ParseAddr(strings.TrimSpace(first)); err == nil {
				return a.Unmap(), true
			}
		}
	}
	if host, _, err := net.SplitHostPort(s); err == nil {
		s = host
	}
	a, err := netip.ParseAddr(s)
	return a.Unmap(), err == nil
}

// choices returns the regions to try for p, best first: its region, then
// the others nearest first (by the region's coordinates, or the client's),
// in list order where places are unknown. Regions that are down come last,
// in the same order, to be tried only if every other fails.
func (g *Geo) choices(p placement) []Region {
	lat, lon, placed := p.lat, p.lon, p.coords
	if !placed {
		if reg, ok := g.region(p.region); ok && reg.placed() {
			lat, lon, placed = reg.Lat, reg.Lon, true
		}
	}
	order := slices.Clone(g.Regions)
	rank := func(r Region) float64 {
		if strings.EqualFold(r.Name, p.region) {
			return -1
		}
		if placed && r.placed() {
			return distance(lat, lon, r.Lat, r.Lon)
		}
		return math.Inf(1)
	}
	slices.SortStableFunc(order, func(a, b Region) int { return cmpFloat(rank(a), rank(b)) })
	down := g.Down()
	up := slices.DeleteFunc(slices.Clone(order), func(r Region) bool { _, d := down[r.Name]; return d })
	for _, r := range order {
		if _, d := down[r.Name]; d {
			up = append(up, r)
		}
	}
	return up
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// distance is the great-circle distance between two places, in km.
func distance(lat1, lon1, lat2, lon2 float64) float64 {
	const r = 6371
	rad := math.Pi / 180
	dlat, dlon := (lat2-lat1)*rad, (lon2-lon1)*rad
	a := math.Sin(dlat/2)*math.Sin(dlat/2) + math.Cos(lat1*rad)*math.Cos(lat2*rad)*math.Sin(dlon/2)*math.Sin(dlon/2)
	return 2 * r * math.Asin(math.Sqrt(a))
}

type geoKey struct{}

// geoCall is a request's way through the geo entry.
type geoCall struct {
	choices []Region
	how     string
}

// ServeHTTP sends the request to its region's router.
func (g *Geo) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength > g.MaxBodyBytes {
		http.Error(w, fmt.Sprintf("request body of %d bytes is larger than this router accepts (%d bytes)", r.ContentLength, g.MaxBodyBytes), http.StatusRequestEntityTooLarge)
		return
	}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &onceBody{r: http.MaxBytesReader(w, r.Body, g.MaxBodyBytes)}
	}
	p := g.place(r)
	c := &geoCall{choices: g.choices(p), how: p.how}
	if len(c.choices) == 0 {
		http.Error(w, "no region configured", http.StatusServiceUnavailable)
		return
	}
	g.proxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), geoKey{}, c)))
}

func (g *Geo) rewrite(pr *httputil.ProxyRequest) {
	c := pr.In.Context().Value(geoKey{}).(*geoCall)
	pr.SetURL(c.choices[0].Router)
	pr.Out.Host = pr.In.Host
	if g.TrustForwarded {
		pr.Out.Header["X-Forwarded-For"] = pr.In.Header["X-Forwarded-For"]
	}
	pr.SetXForwarded()
}

// geoTransport sends a request to the first region that takes it: one
// whose router cannot be reached (nothing was sent) is marked down and
// the next is tried.
type geoTransport struct {
	g    *Geo
	base http.RoundTripper
}

func (t geoTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	c := req.Context().Value(geoKey{}).(*geoCall)
	body, _ := req.Body.(*onceBody)
	var errs []error
	for i, reg := range c.choices {
		out := req
		if i > 0 {
			out = req.Clone(req.Context())
			out.URL.Scheme, out.URL.Host = reg.Router.Scheme, reg.Router.Host
		}
		resp, err := t.base.RoundTrip(out)
		if err == nil {
			resp.Header.Set(RegionHeader, reg.Name)
			resp.Header.Set(GeoHeader, c.how)
			return resp, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", reg.Name, err))
		if !notSent(err) || body != nil && body.n.Load() > 0 || req.Context().Err() != nil {
			break
		}
		t.g.setDown(reg.Name, err.Error())
	}
	return nil, errors.Join(errs...)
}

func (g *Geo) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		http.Error(w, fmt.Sprintf("request body larger than this router accepts (%d bytes)", tooBig.Limit), http.StatusRequestEntityTooLarge)
	case r.Context().Err() != nil:
		w.WriteHeader(499)
	default:
		g.Logger.Warn("no region answered", "method", r.Method, "path", r.URL.Path, "err", err)
		w.Header().Set("Retry-After", "1")
		http.Error(w, fmt.Sprintf("no region's router answered: %v", err), http.StatusBadGateway)
	}
}

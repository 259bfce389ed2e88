package regiond

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/meridian-db/meridian/router"
)

// GeoConfig is the configuration of a geo entry (`regiond geo`): a router
// in front of every region that sends each client to its region's router.
type GeoConfig struct {
	// Listen is the host:port the geo entry serves on, plain HTTP.
	Listen  string            `yaml:"listen"`
	Regions []GeoRegionConfig `yaml:"regions"`
	// Headers are trusted request headers naming the client's region or
	// country, tried in order, e.g. [Fly-Region, CF-IPCountry].
	Headers []string `yaml:"headers"`
	// GeoIP is a MaxMind-format database (GeoLite2/GeoIP2 Country or
	// City), relative to the file's directory; "" for none.
	GeoIP string `yaml:"geoip"`
	// DefaultRegion serves clients nothing places; the first region if "".
	DefaultRegion   string    `yaml:"default_region"`
	TrustForwarded  bool      `yaml:"trust_forwarded"`
	CheckInterval   Duration  `yaml:"check_interval"`
	UpstreamTimeout Duration  `yaml:"upstream_timeout"`
	MaxBody         int64     `yaml:"max_body"`
	Log             LogConfig `yaml:"log"`
}

// GeoRegionConfig is one region behind a geo entry.
type GeoRegionConfig struct {
	Name string `yaml:"name"`
	// Router is the region's router.listen, as a URL or host:port.
	Router string `yaml:"router"`
	// Ready is polled for the region's health: a URL, or the host:port of
	// a node's admin.listen (its /readyz); "" takes the region for up.
	Ready     string   `yaml:"ready"`
	Lat       float64  `yaml:"lat"`
	Lon       float64  `yaml:"lon"`
	Countries []string `yaml:"countries"` // ISO 3166 codes of its clients
	CIDRs     []string `yaml:"cidrs"`     // networks of its clients
}

// DefaultGeoConfig returns a GeoConfig with every default applied.
func DefaultGeoConfig() GeoConfig {
	return GeoConfig{CheckInterval: Duration(router.DefaultCheckInterval), UpstreamTimeout: Duration(router.DefaultUpstreamTimeout),
		MaxBody: router.DefaultMaxBodyBytes, Log: LogConfig{Level: DefaultLogLevel, Format: DefaultLogFormat}}
}

// LoadGeoConfig reads and validates the geo entry's configuration file.
func LoadGeoConfig(path string) (GeoConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return GeoConfig{}, fmt.Errorf("read config: %w", err)
	}
	c, err := ParseGeoConfig(bytes.NewReader(b), filepath.Dir(path))
	var cerr *Error
	if errors.As(err, &cerr) {
		cerr.File = path
	}
	return c, err
}

// ParseGeoConfig is LoadGeoConfig of one YAML document read from r, with
// relative paths resolved against dir.
func ParseGeoConfig(r io.Reader, dir string) (GeoConfig, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return GeoConfig{}, fmt.Errorf("read config: %w", err)
	}
	c := DefaultGeoConfig()
	if problems := decode(b, &c); len(problems) > 0 {
		return GeoConfig{}, &Error{Problems: problems}
	}
	c.GeoIP = resolvePath(c.GeoIP, dir)
	g, err := c.Geo()
	if err != nil {
		return GeoConfig{}, err
	}
	if db, ok := g.GeoIP.(*router.GeoIP); ok {
		db.Close()
	}
	return c, nil
}

// Geo builds the geo entry the configuration describes, and opens its
// GeoIP database. Problems come as one *Error.
func (c GeoConfig) Geo() (*router.Geo, error) {
	var p problems
	p.hostPort("listen", c.Listen, "127.0.0.1:8080")
	if c.Listen == "" {
		p.add("listen: required: the host:port the geo entry serves on (e.g. 0.0.0.0:8080)")
	}
	if len(c.Regions) == 0 {
		p.add("regions: list at least one region: {name, router, ready, lat, lon, countries, cidrs}")
	}
	var regions []router.Region
	seen := map[string]bool{}
	for i, rc := range c.Regions {
		key := fmt.Sprintf("regions[%d]", i)
		p.name(key+".name", rc.Name, "the region's name, e.g. fra")
		if seen[rc.Name] {
			p.add("%s.name: %q is listed twice", key, rc.Name)
		}
		seen[rc.Name] = true
		r := router.Region{Name: rc.Name, Lat: rc.Lat, Lon: rc.Lon}
		var err error
		if rc.Router == "" {
			p.add("%s.router: required: the region's router.listen (e.g. http://10.0.1.5:8080)", key)
		} else if r.Router, err = RouterURL(rc.Router); err != nil {
			p.add("%s.router: %v", key, err)
		}
		if rc.Ready != "" {
			ready := rc.Ready
			if !strings.Contains(ready, "://") {
				ready = "http://" + ready + "/readyz"
			}
			if r.Ready, err = url.Parse(ready); err != nil || r.Ready.Host == "" {
				p.add("%s.ready: %q is neither a URL nor the host:port of a node's admin.listen", key, rc.Ready)
			}
		}
		if rc.Lat < -90 || rc.Lat > 90 || rc.Lon < -180 || rc.Lon > 180 {
			p.add("%s: lat %v, lon %v is not a place (lat -90 to 90, lon -180 to 180)", key, rc.Lat, rc.Lon)
		}
		for j, cc := range rc.Countries {
			if len(cc) != 2 || strings.ToUpper(cc) != cc {
				p.add("%s.countries[%d]: %q is not an ISO 3166 country code (two capital letters, e.g. DE)", key, j, cc)
			}
		}
		for j, s := range rc.CIDRs {
			pre, err := netip.ParsePrefix(s)
			if err != nil {
				p.add("%s.cidrs[%d]: %q is not a network (e.g. 10.1.0.0/16)", key, j, s)
			}
			r.CIDRs = append(r.CIDRs, pre.Masked())
		}
		r.Countries = rc.Countries
		regions = append(regions, r)
	}
	if c.DefaultRegion != "" && !seen[c.DefaultRegion] {
		p.add("default_region: %q is not one of the regions (%s)", c.DefaultRegion, strings.Join(regionNames(c.Regions), ", "))
	}
	for i, h := range c.Headers {
		if h == "" || strings.ContainsAny(h, " :") {
			p.add("headers[%d]: %q is not a header name (e.g. Fly-Region)", i, h)
		}
	}
	if c.CheckInterval <= 0 || c.UpstreamTimeout <= 0 {
		p.add("check_interval and upstream_timeout: must be greater than 0 (e.g. 1s)")
	}
	if c.MaxBody <= 0 {
		p.add("max_body: %d must be greater than 0 (bytes)", c.MaxBody)
	}
	oneOf(&p, "log.level", c.Log.Level, logLevels)
	oneOf(&p, "log.format", c.Log.Format, logFormats)
	g := router.NewGeo(regions)
	if c.GeoIP != "" {
		db, err := router.OpenGeoIP(c.GeoIP)
		if err != nil {
			p.add("%v", err)
		} else {
			g.GeoIP = db
		}
	}
	if len(p) > 0 {
		if db, ok := g.GeoIP.(*router.GeoIP); ok {
			db.Close()
		}
		return nil, &Error{Problems: p}
	}
	g.Headers, g.Default, g.TrustForwarded = c.Headers, c.DefaultRegion, c.TrustForwarded
	g.CheckInterval, g.UpstreamTimeout, g.MaxBodyBytes = time.Duration(c.CheckInterval), time.Duration(c.UpstreamTimeout), c.MaxBody
	return g, nil
}

func regionNames(rs []GeoRegionConfig) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Name)
	}
	return out
}

// Logger returns the geo entry's logger.
func (c GeoConfig) Logger(w io.Writer) *slog.Logger {
	return c.Log.logger(w).With("component", "geo")
}

package router_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/maxmind/mmdbwriter"
	"github.com/maxmind/mmdbwriter/mmdbtype"

	"github.com/meridian-db/meridian/router"
)

// geoRegion is a region behind a geo entry: a router that answers with
// its name, and a readiness endpoint the test turns off.
type geoRegion struct {
	name   string
	srv    *httptest.Server
	ready  *httptest.Server
	down   atomic.Bool
	region router.Region
}

func newGeoRegions(t *testing.T) map[string]*geoRegion {
	t.Helper()
	places := map[string][2]float64{"iad": {38.9, -77.4}, "fra": {50.1, 8.7}, "syd": {-33.9, 151.2}}
	countries := map[string][]string{"iad": {"US", "CA"}, "fra": {"DE", "FR"}, "syd": {"AU"}}
	out := map[string]*geoRegion{}
	for _, name := range []string{"iad", "fra", "syd"} {
		g := &geoRegion{name: name}
		g.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "%s %s %s xff=%s", name, r.Method, b, r.Header.Get("X-Forwarded-For"))
		}))
		t.Cleanup(g.srv.Close)
		g.ready = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if g.down.Load() {
				http.Error(w, "not ready: 12s behind the primary", http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ready")
		}))
		t.Cleanup(g.ready.Close)
		ru, _ := url.Parse(g.srv.URL)
		rd, _ := url.Parse(g.ready.URL + "/readyz")
		g.region = router.Region{Name: name, Router: ru, Ready: rd, Lat: places[name][0], Lon: places[name][1], Countries: countries[name]}
		out[name] = g
	}
	return out
}

func geoEntry(t *testing.T, regions map[string]*geoRegion, setup func(*router.Geo)) *httptest.Server {
	t.Helper()
	var rs []router.Region
	for _, name := range []string{"iad", "fra", "syd"} {
		rs = append(rs, regions[name].region)
	}
	g := router.NewGeo(rs)
	g.Headers = []string{"Fly-Region", "CF-IPCountry"}
	if setup != nil {
		setup(g)
	}
	g.Start()
	t.Cleanup(g.Close)
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	return srv
}

func geoGet(t *testing.T, base string, hdr ...string) (string, string, string) {
	t.Helper()
	resp, body := do(t, "GET", base+"/", "", hdr...)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET through the geo entry: %d %s", resp.StatusCode, body)
	}
	return strings.Fields(body)[0], resp.Header.Get(router.RegionHeader), resp.Header.Get(router.GeoHeader)
}

func TestGeo_Placement(t *testing.T) {
	regions := newGeoRegions(t)
	srv := geoEntry(t, regions, nil)
	for _, tc := range []struct {
		hdr       []string
		want, how string
	}{
		{[]string{"Fly-Region", "fra"}, "fra", "header Fly-Region"},
		{[]string{"Fly-Region", "SYD"}, "syd", "header Fly-Region"},
		{[]string{"CF-IPCountry", "de"}, "fra", "header CF-IPCountry (country DE)"},
		{[]string{"Fly-Region", "ams", "CF-IPCountry", "AU"}, "syd", "header CF-IPCountry (country AU)"},
		{nil, "iad", "default"},
	} {
		got, hdr, how := geoGet(t, srv.URL, tc.hdr...)
		if got != tc.want || hdr != tc.want || how != tc.how {
			t.Errorf("%v: served by %s (%s: %s, %s: %s), want %s by %s", tc.hdr, got, router.RegionHeader, hdr, router.GeoHeader, how, tc.want, tc.how)
		}
	}
	// The body and method go through; X-Forwarded-For names the client.
	resp, body := do(t, "POST", srv.URL+"/entries", "hello", "Fly-Region", "fra")
	if body != "fra POST hello xff=127.0.0.1" {
		t.Fatalf("POST through the geo entry: %d %q", resp.StatusCode, body)
	}
}

func TestGeo_CIDR(t *testing.T) {
	regions := newGeoRegions(t)
	regions["syd"].region.CIDRs = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	regions["fra"].region.CIDRs = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	srv := geoEntry(t, regions, nil)
	if got, _, how := geoGet(t, srv.URL); got != "fra" || how != "cidr" {
		t.Fatalf("served by %s (%s), want fra, the longest prefix", got, how)
	}
}

// writeMMDB writes a GeoIP2-City database placing 127.0.0.1 in Sydney and
// 81.2.69.0/24 in Germany (a country without coordinates).
func writeMMDB(t *testing.T) string {
	t.Helper()
	tree, err := mmdbwriter.New(mmdbwriter.Options{DatabaseType: "GeoIP2-City", RecordSize: 28, IncludeReservedNetworks: true})
	if err != nil {
		t.Fatal(err)
	}
	_, lo, _ := net.ParseCIDR("127.0.0.1/32")
	if err := tree.Insert(lo, mmdbtype.Map{
		"country":  mmdbtype.Map{"iso_code": mmdbtype.String("AU")},
		"location": mmdbtype.Map{"latitude": mmdbtype.Float64(-33.87), "longitude": mmdbtype.Float64(151.21)},
	}); err != nil {
		t.Fatal(err)
	}
	_, de, _ := net.ParseCIDR("81.2.69.0/24")
	if err := tree.Insert(de, mmdbtype.Map{"country": mmdbtype.Map{"iso_code": mmdbtype.String("DE")}}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "city.mmdb")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := tree.WriteTo(f); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestGeo_GeoIP(t *testing.T) {
	db, err := router.OpenGeoIP(writeMMDB(t))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	regions := newGeoRegions(t)
	srv := geoEntry(t, regions, func(g *router.Geo) { g.GeoIP, g.TrustForwarded = db, true })
	if got, _, how := geoGet(t, srv.URL); got != "syd" || how != "geoip coordinates" {
		t.Fatalf("127.0.0.1: served by %s (%s), want syd by coordinates", got, how)
	}
	if got, _, how := geoGet(t, srv.URL, "X-Forwarded-For", "81.2.69.160, 10.0.0.1"); got != "fra" || how != "geoip country DE" {
		t.Fatalf("81.2.69.160: served by %s (%s), want fra by country", got, how)
	}
	if got, _, how := geoGet(t, srv.URL, "X-Forwarded-For", "192.0.2.1"); got != "iad" || how != "default" {
		t.Fatalf("192.0.2.1: served by %s (%s), want the default", got, how)
	}

	for _, bad := range []struct{ content, want string }{
		{"not a database", "not a MaxMind DB file"},
		{"", "not a MaxMind DB file"},
	} {
		path := filepath.Join(t.TempDir(), "bad.mmdb")
		os.WriteFile(path, []byte(bad.content), 0o644)
		if _, err := router.OpenGeoIP(path); err == nil || !strings.Contains(err.Error(), bad.want) || !strings.Contains(err.Error(), path) {
			t.Errorf("OpenGeoIP of %q: %v, want an error naming the file and %q", bad.content, err, bad.want)
		}
	}
}

// A region that is not ready (or whose router is gone) is skipped for
// the nearest one that is.
func TestGeo_RegionDown(t *testing.T) {
	regions := newGeoRegions(t)
	regions["fra"].down.Store(true)
	srv := geoEntry(t, regions, nil)
	// From fra, iad is nearer than syd.
	if got, _, _ := geoGet(t, srv.URL, "Fly-Region", "fra"); got != "iad" {
		t.Fatalf("fra down: served by %s, want iad, the nearest up", got)
	}
	if got, _, _ := geoGet(t, srv.URL, "Fly-Region", "syd"); got != "syd" {
		t.Fatalf("served by %s, want syd", got)
	}
	// A router that is gone between two polls: the next region serves,
	// and the region is taken for down from then on.
	regions["syd"].srv.Close()
	if got, _, _ := geoGet(t, srv.URL, "Fly-Region", "syd"); got != "iad" {
		t.Fatalf("syd's router gone: served by %s, want iad", got)
	}
}

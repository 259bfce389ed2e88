package regiond_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/regiond"
)

const geoConfig = `listen: 127.0.0.1:8080
regions:
  - {name: iad, router: 127.0.0.1:8081, ready: 127.0.0.1:20211, lat: 38.9, lon: -77.4, countries: [US, CA]}
  - {name: fra, router: "http://127.0.0.1:8082", ready: "http://127.0.0.1:20221/readyz", lat: 50.1, lon: 8.7, cidrs: [10.1.0.0/16]}
headers: [Fly-Region, CF-IPCountry]
default_region: fra
trust_forwarded: true
check_interval: 500ms
`

func TestParseGeoConfig(t *testing.T) {
	c, err := regiond.ParseGeoConfig(strings.NewReader(geoConfig), "/etc/meridian")
	if err != nil {
		t.Fatal(err)
	}
	g, err := c.Geo()
	if err != nil {
		t.Fatal(err)
	}
	if len(g.Regions) != 2 || g.Regions[0].Router.String() != "http://127.0.0.1:8081" || g.Regions[0].Ready.String() != "http://127.0.0.1:20211/readyz" ||
		g.Regions[1].Ready.String() != "http://127.0.0.1:20221/readyz" || g.Regions[1].CIDRs[0].String() != "10.1.0.0/16" || g.Regions[0].Countries[1] != "CA" {
		t.Fatalf("regions: %+v", g.Regions)
	}
	if g.Default != "fra" || !g.TrustForwarded || g.CheckInterval != 500*time.Millisecond || strings.Join(g.Headers, ",") != "Fly-Region,CF-IPCountry" {
		t.Fatalf("geo: default %q trust %v interval %v headers %v", g.Default, g.TrustForwarded, g.CheckInterval, g.Headers)
	}
}

func TestParseGeoConfig_Errors(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.mmdb")
	if err := os.WriteFile(bad, []byte("not a database"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ name, doc, want string }{
		{"NoListen", "regions: [{name: iad, router: 127.0.0.1:1}]\n", "listen: required"},
		{"NoRegions", "listen: 127.0.0.1:8080\n", "regions: list at least one region"},
		{"UnknownDefault", "listen: 127.0.0.1:8080\nregions: [{name: iad, router: 127.0.0.1:1}]\ndefault_region: ams\n", `default_region: "ams" is not one of the regions (iad)`},
		{"Twice", "listen: 127.0.0.1:8080\nregions: [{name: iad, router: 127.0.0.1:1}, {name: iad, router: 127.0.0.1:2}]\n", `regions[1].name: "iad" is listed twice`},
		{"NoRouter", "listen: 127.0.0.1:8080\nregions: [{name: iad}]\n", "regions[0].router: required"},
		{"BadCIDR", "listen: 127.0.0.1:8080\nregions: [{name: iad, router: 127.0.0.1:1, cidrs: [10.1.0.0]}]\n", `regions[0].cidrs[0]: "10.1.0.0" is not a network`},
		{"BadCountry", "listen: 127.0.0.1:8080\nregions: [{name: iad, router: 127.0.0.1:1, countries: [usa]}]\n", `regions[0].countries[0]: "usa" is not an ISO 3166 country code`},
		{"BadPlace", "listen: 127.0.0.1:8080\nregions: [{name: iad, router: 127.0.0.1:1, lat: 100}]\n", "regions[0]: lat 100, lon 0 is not a place"},
		{"UnknownKey", "listen: 127.0.0.1:8080\nregions: [{name: iad, router: 127.0.0.1:1, country: [US]}]\n", `unknown key "regions[0].country"`},
		{"BadGeoIP", "listen: 127.0.0.1:8080\nregions: [{name: iad, router: 127.0.0.1:1}]\ngeoip: " + bad + "\n", "geoip " + bad + ": not a MaxMind DB file"},
		{"MissingGeoIP", "listen: 127.0.0.1:8080\nregions: [{name: iad, router: 127.0.0.1:1}]\ngeoip: nowhere.mmdb\n", "geoip /etc/meridian/nowhere.mmdb: not a MaxMind DB file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := regiond.ParseGeoConfig(strings.NewReader(tt.doc), "/etc/meridian")
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func FuzzParseGeoConfig(f *testing.F) {
	f.Add(geoConfig)
	f.Add("listen: 127.0.0.1:1\nregions: [{name: a, router: 127.0.0.1:2, cidrs: [::/0]}]\n")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := regiond.ParseGeoConfig(strings.NewReader(s), "/etc/meridian")
		if err != nil {
			return
		}
		g, err := c.Geo()
		if err != nil {
			t.Fatalf("ParseGeoConfig returned a config whose Geo fails: %v", err)
		}
		if len(g.Regions) != len(c.Regions) || len(g.Regions) == 0 {
			t.Fatalf("geo entry with %d regions from a config of %d", len(g.Regions), len(c.Regions))
		}
		for _, r := range g.Regions {
			if r.Router == nil || r.Router.Host == "" {
				t.Fatalf("region %s without a router", r.Name)
			}
		}
	})
}

package regiond_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meridian-db/meridian/regiond"
)

// fullConfig sets every key to a value other than its default, except
// fs.locks: durability sync needs the default.
const fullConfig = `# every key the daemon reads
node: iad-1
region: iad
data_dir: /srv/meridian
mount_dir: /mnt/meridian
fs:
  locks: mount
  passthrough: false
  spare_files: 100
  log_segment_size: 1048576
lease:
  type: static
  candidate: false
  static_primary: iad-1
replication:
  listen: 127.0.0.1:20210
  advertise: iad-1.internal:20210
  peers:
    - {node: fra-1, region: fra, addr: 127.0.0.1:20220, admin: 127.0.0.1:20221, router: 127.0.0.1:8082}
    - node: syd-1
      region: syd
  retention: 90s
  max_retention: 1h
  durability: sync
  sync_acks: 2
  sync_regions: true
  sync_timeout: 2s
  sync_on_timeout: degrade
  max_in_flight_files: 8
  max_in_flight_bytes: 1073741824
  max_file_size: 536870912
tls:
  ca: /etc/pki/meridian/cluster.pem
  cert: certs/iad-1.crt
  key: certs/iad-1.key
  insecure: true
admin:
  listen: 127.0.0.1:20211
router:
  listen: 127.0.0.1:8081
  target: http://127.0.0.1:3000
  max_lag: 3s
  ryw_timeout: 1s
  primary_wait: 3s
  upstream_timeout: 30s
  max_body: 1048576
  write_paths: ["GET /admin/"]
  read_paths: ["POST /search"]
  idempotent_header: X-Request-Id
  idempotent_methods: [PUT, DELETE]
  replay: fly-replay
  trust_forwarded: true
log:
  level: debug
  format: json
telemetry:
  otlp_endpoint: https://otel.internal:4317
  service_name: meridian
  sample_commits: 0.5
`

func parse(t *testing.T, s string) (regiond.Config, error) {
	t.Helper()
	return regiond.ParseConfig(strings.NewReader(s), "/etc/meridian")
}

func TestParseConfig_Defaults(t *testing.T) {
	got, err := parse(t, "node: iad-1\nregion: iad\n")
	if err != nil {
		t.Fatal(err)
	}
	want := regiond.Config{
		Node:     "iad-1",
		Region:   "iad",
		DataDir:  "/var/lib/meridian",
		MountDir: "/data",
		FS:       regiond.FSConfig{Locks: "mount", Passthrough: true, SpareFiles: 4096, LogSegmentSize: 16 << 20},
		Lease: regiond.LeaseConfig{Type: "static", Candidate: true, StaticPrimary: "iad-1", ConsulURL: "http://127.0.0.1:8500", ConsulKey: "meridian/primary",
			TTL: regiond.Duration(10 * time.Second), CheckTTL: regiond.Duration(2 * time.Second), LockDelay: regiond.Duration(time.Second),
			HandoffTimeout: regiond.Duration(2 * time.Second)},
		Replication: regiond.ReplicationConfig{Retention: regiond.Duration(10 * time.Minute), MaxRetention: regiond.Duration(24 * time.Hour), Durability: "async",
			SyncAcks: 1, SyncTimeout: regiond.Duration(5 * time.Second), SyncOnTimeout: "fail", MaxInFlightFiles: 32, MaxInFlightBytes: 64 << 30,
			MaxFileSize: 64 << 30},
		TLS: regiond.TLSConfig{CA: "/etc/meridian/ca.pem", Cert: "/etc/meridian/iad-1.pem", Key: "/etc/meridian/iad-1-key.pem"},
		Router: regiond.RouterConfig{MaxLag: regiond.Duration(10 * time.Second), RYWTimeout: regiond.Duration(2 * time.Second), PrimaryWait: regiond.Duration(5 * time.Second),
			UpstreamTimeout: regiond.Duration(time.Minute), MaxBody: 32 << 20, IdempotentHeader: "Idempotency-Key"},
		Log:       regiond.LogConfig{Level: "info", Format: "text"},
		Telemetry: regiond.TelemetryConfig{SampleCommits: 0.01},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
}

func TestParseConfig_Full(t *testing.T) {
	got, err := parse(t, fullConfig)
	if err != nil {
		t.Fatal(err)
	}
	want := regiond.Config{
		Node:     "iad-1",
		Region:   "iad",
		DataDir:  "/srv/meridian",
		MountDir: "/mnt/meridian",
		FS:       regiond.FSConfig{Locks: "mount", Passthrough: false, SpareFiles: 100, LogSegmentSize: 1 << 20},
		Lease: regiond.LeaseConfig{Type: "static", Candidate: false, StaticPrimary: "iad-1", ConsulURL: "http://127.0.0.1:8500", ConsulKey: "meridian/primary",
			TTL: regiond.Duration(10 * time.Second), CheckTTL: regiond.Duration(2 * time.Second), LockDelay: regiond.Duration(time.Second),
			HandoffTimeout: regiond.Duration(2 * time.Second)},
		Replication: regiond.ReplicationConfig{Listen: "127.0.0.1:20210", Advertise: "iad-1.internal:20210", Peers: []regiond.Peer{
			{Node: "fra-1", Region: "fra", Addr: "127.0.0.1:20220", Admin: "127.0.0.1:20221", Router: "127.0.0.1:8082"}, {Node: "syd-1", Region: "syd"}},
			Retention: regiond.Duration(90 * time.Second), MaxRetention: regiond.Duration(time.Hour), Durability: "sync", SyncAcks: 2, SyncRegions: true,
			SyncTimeout: regiond.Duration(2 * time.Second), SyncOnTimeout: "degrade", MaxInFlightFiles: 8, MaxInFlightBytes: 1 << 30,
			MaxFileSize: 512 << 20},
		TLS: regiond.TLSConfig{CA: "/etc/pki/meridian/cluster.pem", Cert: "/etc/meridian/certs/iad-1.crt",
			Key: "/etc/meridian/certs/iad-1.key", Insecure: true},
		Admin: regiond.AdminConfig{Listen: "127.0.0.1:20211"},
		Router: regiond.RouterConfig{Listen: "127.0.0.1:8081", Target: "http://127.0.0.1:3000", MaxLag: regiond.Duration(3 * time.Second),
			RYWTimeout: regiond.Duration(time.Second), PrimaryWait: regiond.Duration(3 * time.Second), UpstreamTimeout: regiond.Duration(30 * time.Second),
			MaxBody: 1 << 20, WritePaths: []string{"GET /admin/"}, ReadPaths: []string{"POST /search"}, IdempotentHeader: "X-Request-Id",
			IdempotentMethods: []string{"PUT", "DELETE"}, Replay: "fly-replay", TrustForwarded: true},
		Log:       regiond.LogConfig{Level: "debug", Format: "json"},
		Telemetry: regiond.TelemetryConfig{OTLPEndpoint: "https://otel.internal:4317", ServiceName: "meridian", SampleCommits: 0.5},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	if a := got.AdvertiseAddr(); a != "iad-1.internal:20210" {
		t.Errorf("AdvertiseAddr() = %q, want replication.advertise", a)
	}
	got.Replication.Advertise = ""
	if a := got.AdvertiseAddr(); a != "127.0.0.1:20210" {
		t.Errorf("AdvertiseAddr() without replication.advertise = %q, want replication.listen", a)
	}
	got.Replication.Advertise = want.Replication.Advertise

	t.Run("RoundTrip", func(t *testing.T) {
		b, err := yaml.Marshal(got)
		if err != nil {
			t.Fatal(err)
		}
		again, err := regiond.ParseConfig(bytes.NewReader(b), "/")
		if err != nil {
			t.Fatalf("parse marshaled config: %v\n%s", err, b)
		}
		if !reflect.DeepEqual(again, want) {
			t.Fatalf("got %+v, want %+v", again, want)
		}
	})
}

func TestParseConfig_Consul(t *testing.T) {
	c, err := parse(t, `node: fra-1
region: fra
lease:
  type: consul
  candidate: false
  consul_url: https://consul.internal:8501
  consul_key: apps/notes/primary
  ttl: 15s
  check_ttl: 1500ms
  lock_delay: 0s
  prefer_regions: [iad, fra]
  handoff_timeout: 5s
replication: {listen: 127.0.0.1:20220}
tls: {insecure: true}
`)
	if err != nil {
		t.Fatal(err)
	}
	want := regiond.LeaseConfig{Type: regiond.LeaseConsul, Candidate: false, StaticPrimary: "fra-1", ConsulURL: "https://consul.internal:8501",
		ConsulKey: "apps/notes/primary", TTL: regiond.Duration(15 * time.Second), CheckTTL: regiond.Duration(1500 * time.Millisecond),
		PreferRegions: []string{"iad", "fra"}, HandoffTimeout: regiond.Duration(5 * time.Second)}
	if !reflect.DeepEqual(c.Lease, want) {
		t.Fatalf("got %+v, want %+v", c.Lease, want)
	}
	if c.IsPrimary() {
		t.Fatal("a node of the Consul lease is primary by its configuration")
	}
	if _, err := parse(t, "node: fra-1\nregion: fra\nlease: {type: consul}\nreplication: {peers: [{node: iad-1, region: iad, addr: 127.0.0.1:20210}]}\ntls: {insecure: true}\n"); err == nil ||
		!strings.Contains(err.Error(), "replication.listen: required on a candidate for the lease") {
		t.Fatalf("a candidate without replication.listen: %v", err)
	}

	// The ACL token: from lease.consul_token_file (relative to the
	// config's directory), else from $CONSUL_HTTP_TOKEN.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "consul.token"), []byte("  b1f4e2c8-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "empty.token"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CONSUL_HTTP_TOKEN", "from-the-environment")
	for _, tt := range []struct{ file, want, problem string }{
		{"", "from-the-environment", ""},
		{"consul.token", "b1f4e2c8-secret", ""},
		{"empty.token", "", "lease.consul_token_file: " + filepath.Join(dir, "empty.token") + " is empty; write the token's secret ID into it"},
		{"missing.token", "", "lease.consul_token_file: the ACL token cannot be read: open " + filepath.Join(dir, "missing.token") + ": no such file or directory"},
	} {
		yaml := "node: fra-1\nregion: fra\nlease: {type: consul, candidate: false}\ntls: {insecure: true}\n"
		if tt.file != "" {
			yaml = strings.Replace(yaml, "candidate: false", "candidate: false, consul_token_file: "+tt.file, 1)
		}
		c, err := regiond.ParseConfig(strings.NewReader(yaml), dir)
		if tt.problem != "" {
			if err == nil || !strings.Contains(err.Error(), tt.problem) {
				t.Errorf("consul_token_file %q: %v, want %q", tt.file, err, tt.problem)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if got, err := c.Lease.ConsulToken(); got != tt.want || err != nil {
			t.Errorf("consul_token_file %q: token %q, %v; want %q", tt.file, got, err, tt.want)
		}
	}
}

func TestParseConfig_NullKeepsDefault(t *testing.T) {
	got, err := parse(t, "node: iad-1\nregion: iad\ndata_dir:\nlease:\nreplication:\n  retention:\n")
	if err != nil {
		t.Fatal(err)
	}
	if got.DataDir != "/var/lib/meridian" || !got.Lease.Candidate || got.Replication.Retention != regiond.Duration(10*time.Minute) {
		t.Fatalf("got %+v, want defaults", got)
	}
}

func TestParseConfig_Errors(t *testing.T) {
	const base = "node: iad-1\nregion: iad\n"
	for _, tt := range []struct {
		name, yaml string
		want       []string // substrings of the error
	}{
		{"Empty", "", []string{"node: required (the unique name of this node, e.g. iad-1)"}},
		{"OnlyComments", "# nothing yet\n", []string{"node: required"}},
		{"NoRegion", "node: iad-1\n", []string{"region: required"}},
		{"BadNode", "node: IAD_1\nregion: iad\n", []string{`node: "IAD_1" is not a valid name`, "1-63 lowercase"}},
		{"NodeStartsWithDash", "node: -iad\nregion: iad\n", []string{`node: "-iad" is not a valid name`}},
		{"NodeTooLong", "node: " + strings.Repeat("a", 64) + "\nregion: iad\n", []string{"node: "}},
		{"BadRegion", "node: iad-1\nregion: us.east\n", []string{`region: "us.east" is not a valid name`}},
		{"NodeList", "node: [a, b]\nregion: iad\n", []string{"line 1: node: want a single value, got a list"}},
		{"EmptyDataDir", base + "data_dir: ''\n", []string{"data_dir: must not be empty (leave the key out to use /var/lib/meridian)"}},
		{"BothDirsEmpty", base + "data_dir: ''\nmount_dir: ''\n", []string{"config: data_dir: must not be empty", "\nconfig: mount_dir: must not be empty (leave the key out to use /data)"}},
		{"SameDirs", base + "data_dir: /x\nmount_dir: /x/\n", []string{`mount_dir: "/x" is also data_dir`}},
		{"MountInsideData", base + "data_dir: /var/lib/meridian\nmount_dir: /var/lib/meridian/mnt\n",
			[]string{`mount_dir: "/var/lib/meridian/mnt" is inside data_dir "/var/lib/meridian"`}},
		{"DataInsideMount", base + "data_dir: /data/meridian\n", []string{`data_dir: "/data/meridian" is inside mount_dir "/data"`}},
		{"DataDirRoot", base + "data_dir: /\n", []string{`mount_dir: "/data" is inside data_dir "/"`}},
		{"Consul", base + "lease:\n  type: consul\n  consul_url: 127.0.0.1:8500\n  consul_key: /meridian\n  ttl: 5s\n  check_ttl: 0s\n  lock_delay: -1s\n  prefer_regions: [iad, Fra]\n  handoff_timeout: 0s\n", []string{
			`lease.consul_url: "127.0.0.1:8500" is not the URL of a Consul agent's HTTP API (e.g. http://127.0.0.1:8500)`,
			`lease.consul_key: "/meridian" must be a KV key without a leading '/'`,
			`lease.ttl: 5s is outside Consul's session TTL bounds, 10s to 24h`,
			`lease.check_ttl: 0s must be greater than 0 and shorter than lease.ttl (5s)`,
			`lease.lock_delay: -1s cannot be negative`,
			`lease.handoff_timeout: 0s must be greater than 0; e.g. 2s`,
			`lease.prefer_regions: "Fra" is not a valid name`}},
		{"ConsulList", base + "lease:\n  type: consul\n  prefer_regions: iad\n", []string{`lease.prefer_regions: want a list, got`}},
		{"UnknownLeaseType", base + "lease:\n  type: etcd\n", []string{`lease.type: "etcd" is not accepted (use one of: static, consul)`}},
		{"BadStaticPrimary", base + "lease:\n  static_primary: Iad\n", []string{`lease.static_primary: "Iad" is not a valid name`}},
		{"BadCandidate", base + "lease:\n  candidate: maybe\n", []string{`line 4: lease.candidate: "maybe" is not a boolean (use true or false)`}},
		{"LeaseNotMapping", base + "lease: static\n", []string{`line 3: lease: want a mapping of keys (type, candidate, static_primary, consul_url, consul_key, consul_token_file, ttl, check_ttl, lock_delay, prefer_regions, handoff_timeout), got "static"`}},
		{"BadDuration", base + "replication:\n  retention: 10 minutes\n",
			[]string{`line 4: replication.retention: "10 minutes" is not a duration (use Go syntax like 10m or 2s)`}},
		{"NumberDuration", base + "replication:\n  retention: 600\n", []string{`replication.retention: "600" is not a duration`}},
		{"ZeroRetention", base + "replication:\n  retention: 0s\n", []string{"replication.retention: 0s must be greater than 0"}},
		{"NegativeRetention", base + "replication:\n  retention: -1m\n", []string{"replication.retention: -1m0s must be greater than 0"}},
		{"BadLevel", base + "log:\n  level: verbose\n", []string{`log.level: "verbose" is not accepted (use one of: debug, info, warn, error)`}},
		{"BadFormat", base + "log:\n  format: xml\n", []string{`log.format: "xml" is not accepted (use one of: text, json)`}},
		{"BadLocks", base + "fs:\n  locks: posix\n", []string{`fs.locks: "posix" is not accepted (use one of: mount, kernel)`}},
		{"NegativeSpareFiles", base + "fs:\n  spare_files: -1\n", []string{`fs.spare_files: -1 is not between 0 and 65536`}},
		{"TooManySpareFiles", base + "fs:\n  spare_files: 100000\n", []string{`fs.spare_files: 100000 is not between 0 and 65536`}},
		{"SmallSegments", base + "fs:\n  log_segment_size: 4096\n", []string{`fs.log_segment_size: 4096 is not 0 (a file per transaction) or between 65536 (64 KiB) and 1073741824 (1 GiB)`}},
		{"SampleCommitsAboveOne", base + "telemetry:\n  sample_commits: 2\n", []string{`telemetry.sample_commits: 2 is not between 0 (no commit outside a traced request is traced) and 1 (all are)`}},
		{"EndpointNotURL", base + "telemetry:\n  otlp_endpoint: 127.0.0.1:4317\n", []string{`telemetry.otlp_endpoint: "127.0.0.1:4317" is not an OTLP/gRPC collector URL (e.g. http://127.0.0.1:4317, or https:// for TLS)`}},
		{"UnknownKey", base + "replicaton:\n  retention: 1m\n",
			[]string{`line 3: unknown key "replicaton" (keys: node, region, data_dir, mount_dir, fs, lease, replication, tls, admin, router, log, telemetry)`}},
		{"UnknownNestedKey", base + "replication:\n  retenton: 1m\n", []string{`line 4: unknown key "replication.retenton" (keys under replication: listen, advertise, peers, retention, max_retention, durability, sync_acks, sync_regions, sync_timeout, sync_on_timeout, max_in_flight_files, max_in_flight_bytes, max_file_size)`}},
		{"FutureKey", base + "lease:\n  handoff_grace: 10s\n", []string{`unknown key "lease.handoff_grace"`}},
		{"UnknownTLSKey", base + "tls:\n  verify: false\n", []string{`line 4: unknown key "tls.verify" (keys under tls: ca, cert, key, insecure)`}},
		{"TLSNotMapping", base + "tls: off\n", []string{`line 3: tls: want a mapping of keys (ca, cert, key, insecure), got "off"`}},
		{"BadInsecure", base + "tls:\n  insecure: please\n", []string{`line 4: tls.insecure: "please" is not a boolean (use true or false)`}},
		{"TLSCertList", base + "tls:\n  cert: [a.pem, b.pem]\n", []string{"line 4: tls.cert: want a single value, got a list"}},
		{"RepeatedKey", base + "node: fra-1\n", []string{"line 3: node: repeats the key from line 1"}},
		{"NotMapping", "- node: iad-1\n", []string{"line 1: want a mapping of keys (node, region,", "got a list"}},
		{"Syntax", base + "lease:\n  type: static\n candidate: true\n", []string{"config: line 4: did not find expected key (fix the YAML syntax)"}},
		{"TwoDocuments", base + "---\nnode: fra-1\n", []string{"line 3: a second YAML document"}},
		{"SeveralProblems", "region: IAD\nlog:\n  level: loud\n", []string{"config: node: required", "\nconfig: region: ", "\nconfig: log.level: "}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parse(t, tt.yaml)
			if err == nil {
				t.Fatalf("got %+v, want error containing %q", c, tt.want)
			}
			var cerr *regiond.Error
			if !errors.As(err, &cerr) {
				t.Fatalf("got %T, want *regiond.Error", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("got %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

func TestLoadConfig(t *testing.T) {
	t.Run("RelativePaths", func(t *testing.T) {
		dir := t.TempDir()
		path := writeFile(t, dir, "regiond.yml", "node: iad-1\nregion: iad\ndata_dir: state\nmount_dir: ../mnt/db\ntls:\n  ca: ../pki/ca.pem\n  key: /secret/iad-1.key\n")
		c, err := regiond.LoadConfig(path)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := c.DataDir, filepath.Join(dir, "state"); got != want {
			t.Fatalf("got %v, want %v", got, want)
		}
		if got, want := c.MountDir, filepath.Join(filepath.Dir(dir), "mnt", "db"); got != want {
			t.Fatalf("got %v, want %v", got, want)
		}
		want := regiond.TLSConfig{CA: filepath.Join(filepath.Dir(dir), "pki", "ca.pem"), Cert: filepath.Join(dir, "iad-1.pem"), Key: "/secret/iad-1.key"}
		if c.TLS != want {
			t.Fatalf("got %+v, want %+v", c.TLS, want)
		}
	})

	t.Run("RelativeConfigPath", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, dir, "regiond.yml", "node: iad-1\nregion: iad\ndata_dir: ./state\n")
		t.Chdir(dir)
		c, err := regiond.LoadConfig("regiond.yml")
		if err != nil {
			t.Fatal(err)
		}
		if got, want := c.DataDir, filepath.Join(dir, "state"); got != want {
			t.Fatalf("got %v, want %v", got, want)
		}
	})

	t.Run("ErrorNamesFile", func(t *testing.T) {
		dir := t.TempDir()
		for _, tt := range []struct{ yaml, want string }{
			{"", "config regiond.yml: node: required (the unique name of this node, e.g. iad-1)"},
			{"node: iad-1\nregion: iad\nlease:\n  type: consul\n  consul_url: consul:8500\n", `config regiond.yml: lease.consul_url: "consul:8500" is not the URL`},
			{"node: iad-1\nregion: iad\n\n\n\n\nreplicaton: {}\n", `config regiond.yml: line 7: unknown key "replicaton" (keys: node, region,`},
			{"node: iad-1\nregion: iad\nlog: level: info\n", "config regiond.yml: line 3: mapping values are not allowed in this context (fix the YAML syntax)"},
		} {
			writeFile(t, dir, "regiond.yml", tt.yaml)
			t.Chdir(dir)
			_, err := regiond.LoadConfig("regiond.yml")
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want error containing %q", err, tt.want)
			}
		}
	})

	t.Run("Missing", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "nope.yml")
		_, err := regiond.LoadConfig(path)
		if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), path) {
			t.Fatalf("got %v, want a not-exist error naming %s", err, path)
		}
	})
}

func writeFile(t *testing.T, dir, name, data string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestConfig_Validate(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		c := regiond.DefaultConfig()
		c.Node, c.Region, c.Lease.StaticPrimary = "iad-1", "iad", "iad-1"
		c.TLS = regiond.TLSConfig{CA: "/etc/meridian/ca.pem", Cert: "/etc/meridian/iad-1.pem", Key: "/etc/meridian/iad-1-key.pem"}
		if err := c.Validate(); err != nil {
			t.Fatalf("got %v, want nil", err)
		}
	})
	t.Run("OKInsecure", func(t *testing.T) {
		c := regiond.DefaultConfig()
		c.Node, c.Region, c.Lease.StaticPrimary = "iad-1", "iad", "iad-1"
		c.TLS.Insecure = true
		if err := c.Validate(); err != nil {
			t.Fatalf("got %v, want nil: tls files are not needed with tls.insecure", err)
		}
	})
	t.Run("OKKernelLocksOnReplica", func(t *testing.T) {
		c := regiond.DefaultConfig()
		c.Node, c.Region, c.Lease.StaticPrimary = "fra-1", "fra", "iad-1"
		c.TLS.Insecure = true
		c.FS.Locks = "kernel"
		if err := c.Validate(); err != nil {
			t.Fatalf("got %v, want nil: a replica holds readers off with kernel locks through its lock holder", err)
		}
	})
	t.Run("TLSFiles", func(t *testing.T) {
		c := regiond.DefaultConfig()
		c.Node, c.Region, c.Lease.StaticPrimary = "iad-1", "iad", "iad-1"
		c.TLS.Cert = "iad-1.pem"
		err := c.Validate()
		var cerr *regiond.Error
		if !errors.As(err, &cerr) {
			t.Fatalf("got %v, want *regiond.Error", err)
		}
		want := []string{
			"tls.ca: required unless tls.insecure is true (the cluster's CA certificate, made by `regiond ca init`; in a config file it defaults to ca.pem beside the file)",
			`tls.cert: "iad-1.pem" must be an absolute path`,
			"tls.key: required unless tls.insecure is true (this node's private key, made by `regiond ca issue`; in a config file it defaults to <node>-key.pem beside the file)",
		}
		if !reflect.DeepEqual(cerr.Problems, want) {
			t.Fatalf("got %q, want %q", cerr.Problems, want)
		}
	})
	t.Run("DefaultConfigNeedsNames", func(t *testing.T) {
		c := regiond.DefaultConfig()
		err := c.Validate()
		var cerr *regiond.Error
		if !errors.As(err, &cerr) {
			t.Fatalf("got %v, want *regiond.Error", err)
		}
		want := []string{
			"node: required (the unique name of this node, e.g. iad-1)",
			"region: required (the region this node runs in, e.g. iad)",
			"lease.static_primary: required (the node that holds the write lease, e.g. iad-1)",
			"tls.ca: required unless tls.insecure is true (the cluster's CA certificate, made by `regiond ca init`; in a config file it defaults to ca.pem beside the file)",
		}
		if !reflect.DeepEqual(cerr.Problems, want) {
			t.Fatalf("got %q, want %q", cerr.Problems, want)
		}
	})
	t.Run("RelativeDir", func(t *testing.T) {
		c := regiond.DefaultConfig()
		c.Node, c.Region, c.Lease.StaticPrimary = "iad-1", "iad", "iad-1"
		c.MountDir = "data"
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), `mount_dir: "data" must be an absolute path`) {
			t.Fatalf("got %v, want mount_dir absolute path error", err)
		}
	})
}

func TestConfig_IsPrimary(t *testing.T) {
	for _, tt := range []struct {
		yaml string
		want bool
	}{
		{"node: iad-1\nregion: iad\n", true},
		{"node: iad-1\nregion: iad\nlease:\n  static_primary: iad-1\n", true},
		{"node: fra-1\nregion: fra\nlease:\n  static_primary: iad-1\n", false},
	} {
		c, err := parse(t, tt.yaml)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.IsPrimary(); got != tt.want {
			t.Fatalf("%q: got %v, want %v", tt.yaml, got, tt.want)
		}
	}
}

func TestConfig_Logger(t *testing.T) {
	t.Run("Text", func(t *testing.T) {
		c, err := parse(t, "node: iad-1\nregion: iad\n")
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		log := c.Logger(&buf)
		log.Debug("hidden")
		log.Info("started")
		got := buf.String()
		if want := "level=INFO msg=started node=iad-1 region=iad\n"; !strings.HasSuffix(got, want) || strings.Contains(got, "hidden") {
			t.Fatalf("got %q, want one line ending %q", got, want)
		}
	})
	t.Run("JSON", func(t *testing.T) {
		c, err := parse(t, fullConfig)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		c.Logger(&buf).Debug("applied", "txid", 7)
		var rec map[string]any
		if err := json.Unmarshal(buf.Bytes(), &rec); err != nil {
			t.Fatalf("got %q, want one JSON record: %v", buf.String(), err)
		}
		for k, want := range map[string]any{"level": "DEBUG", "msg": "applied", "node": "iad-1", "region": "iad", "txid": 7.0} {
			if rec[k] != want {
				t.Fatalf("%s: got %v, want %v", k, rec[k], want)
			}
		}
	})
}

func TestDuration_UnmarshalYAML(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want time.Duration
		err  string
	}{
		{"2s", 2 * time.Second, ""},
		{"1h30m", 90 * time.Minute, ""},
		{`"10m"`, 10 * time.Minute, ""},
		{"10 minutes", 0, `"10 minutes" is not a duration (use Go syntax like 10m or 2s)`},
		{"[1s]", 0, "want a duration (use Go syntax like 10m or 2s), got a list"},
	} {
		var d regiond.Duration
		err := yaml.Unmarshal([]byte(tt.in), &d)
		if tt.err != "" {
			if err == nil || err.Error() != tt.err {
				t.Fatalf("%s: got %v, want %q", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil || time.Duration(d) != tt.want {
			t.Fatalf("%s: got %v (%v), want %v", tt.in, d, err, tt.want)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add(fullConfig)
	f.Add("node: iad-1\nregion: iad\n")
	f.Add("node: iad-1\nregion: iad\nlease: &l {type: static}\nx: *l\n")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := regiond.ParseConfig(strings.NewReader(s), "/etc/meridian")
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("ParseConfig returned a config that fails Validate: %v", err)
		}
		b, err := yaml.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		again, err := regiond.ParseConfig(bytes.NewReader(b), "/")
		if err != nil || !reflect.DeepEqual(again, c) {
			t.Fatalf("got %+v (%v), want %+v", again, err, c)
		}
	})
}

func TestValidate_Replication(t *testing.T) {
	for _, tt := range []struct {
		name, yaml, want string
	}{
		{"PeerIsSelf", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, peers: [{node: iad-1, region: iad}]}\ntls: {insecure: true}\n",
			`replication.peers[0].node: "iad-1" is this node`},
		{"PeerTwice", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, peers: [{node: fra-1, region: fra}, {node: fra-1, region: fra}]}\ntls: {insecure: true}\n",
			`replication.peers[1].node: "fra-1" is listed twice`},
		{"BadAddr", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, peers: [{node: fra-1, region: fra, addr: nowhere}]}\ntls: {insecure: true}\n",
			`replication.peers[0].addr: "nowhere" is not host:port`},
		{"BadPeerAdmin", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, peers: [{node: fra-1, region: fra, admin: 20221}]}\ntls: {insecure: true}\n",
			`replication.peers[0].admin: "20221" is not host:port (e.g. 127.0.0.1:20211)`},
		{"BadAdminListen", "node: iad-1\nregion: iad\nadmin: {listen: localhost}\ntls: {insecure: true}\n",
			`admin.listen: "localhost" is not host:port (e.g. 127.0.0.1:20211)`},
		{"ZeroMaxLag", "node: iad-1\nregion: iad\nrouter: {max_lag: 0s}\ntls: {insecure: true}\n",
			`router.max_lag: 0s must be greater than 0 (e.g. 2s)`},
		{"RouterWithoutTarget", "node: iad-1\nregion: iad\nrouter: {listen: 127.0.0.1:8080}\ntls: {insecure: true}\n",
			`router.target: required with router.listen: the URL of the local app (e.g. http://127.0.0.1:3000)`},
		{"RouterBadTarget", "node: iad-1\nregion: iad\nrouter: {listen: 127.0.0.1:8080, target: 'ftp://x'}\ntls: {insecure: true}\n",
			`router.target: "ftp://x" is not an http:// or https:// URL with a host`},
		{"RouterBadRule", "node: iad-1\nregion: iad\nrouter: {write_paths: [admin]}\ntls: {insecure: true}\n",
			`router.write_paths[0]: path rule "admin": the path must start with /`},
		{"RouterBadMethod", "node: iad-1\nregion: iad\nrouter: {idempotent_methods: [put]}\ntls: {insecure: true}\n",
			`router.idempotent_methods[0]: "put" is not an upper-case HTTP method (e.g. PUT)`},
		{"PeerListenInsecure", "node: iad-1\nregion: iad\nrouter: {listen: 127.0.0.1:8080, target: 127.0.0.1:3000, peer_listen: 127.0.0.1:8443}\ntls: {insecure: true}\n",
			`router.peer_listen: serves mutual TLS, which tls.insecure turns off`},
		{"PeerListenAlone", "node: iad-1\nregion: iad\nrouter: {peer_listen: 127.0.0.1:8443}\n",
			`router.listen: required with router.peer_listen`},
		{"PeerHTTPSInsecure", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, peers: [{node: fra-1, region: fra, router: 'https://127.0.0.1:8443'}]}\ntls: {insecure: true}\n",
			`replication.peers[0].router: "https://127.0.0.1:8443" is https, which needs the cluster's TLS files`},
		{"RouterZeroWait", "node: iad-1\nregion: iad\nrouter: {ryw_timeout: 0s}\ntls: {insecure: true}\n",
			`router.ryw_timeout: 0s must be greater than 0`},
		{"PeerBadRouter", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, peers: [{node: fra-1, region: fra, router: 'fra'}]}\ntls: {insecure: true}\n",
			`replication.peers[0].router: "fra" is neither a URL nor host:port`},
		{"PrimaryWithoutListen", "node: iad-1\nregion: iad\nreplication: {peers: [{node: fra-1, region: fra}]}\ntls: {insecure: true}\n",
			`replication.listen: required on the primary`},
		{"ListenAnyHostNoAdvertise", "node: iad-1\nregion: iad\nreplication: {listen: \"0.0.0.0:20210\"}\ntls: {insecure: true}\n",
			`replication.advertise: required when replication.listen ("0.0.0.0:20210") names no host other nodes can dial`},
		{"ListenNoHostNoAdvertise", "node: iad-1\nregion: iad\nreplication: {listen: \":20210\"}\ntls: {insecure: true}\n",
			`replication.advertise: required when replication.listen (":20210") names no host`},
		{"AdvertiseUnspecified", "node: iad-1\nregion: iad\nreplication: {listen: \":20210\", advertise: \"[::]:20210\"}\ntls: {insecure: true}\n",
			`replication.advertise: "[::]:20210" is not an address other nodes can dial`},
		{"AdvertisePortZero", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:20210, advertise: 10.0.0.5:0}\ntls: {insecure: true}\n",
			`replication.advertise: "10.0.0.5:0" is not an address other nodes can dial`},
		{"AdvertiseNotHostPort", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:20210, advertise: 10.0.0.5}\ntls: {insecure: true}\n",
			`replication.advertise: "10.0.0.5" is not host:port (e.g. 10.0.0.5:20210)`},
		{"MaxRetentionShort", "node: iad-1\nregion: iad\nreplication: {retention: 1h, max_retention: 10m}\ntls: {insecure: true}\n",
			`replication.max_retention: 10m0s is shorter than replication.retention 1h0m0s`},
		{"BadDurability", "node: iad-1\nregion: iad\nreplication: {durability: semisync}\ntls: {insecure: true}\n",
			`replication.durability: "semisync" is not accepted (use one of: async, sync)`},
		{"BadOnTimeout", "node: iad-1\nregion: iad\nreplication: {sync_on_timeout: wait}\ntls: {insecure: true}\n",
			`replication.sync_on_timeout: "wait" is not accepted (use one of: fail, degrade)`},
		{"ZeroSyncTimeout", "node: iad-1\nregion: iad\nreplication: {sync_timeout: 0s}\ntls: {insecure: true}\n",
			`replication.sync_timeout: 0s must be greater than 0`},
		{"ZeroInFlightFiles", "node: iad-1\nregion: iad\nreplication: {max_in_flight_files: 0}\ntls: {insecure: true}\n",
			`replication.max_in_flight_files: 0 is not between 1 and 4096`},
		{"ManyInFlightFiles", "node: iad-1\nregion: iad\nreplication: {max_in_flight_files: 5000}\ntls: {insecure: true}\n",
			`replication.max_in_flight_files: 5000 is not between 1 and 4096`},
		{"FewInFlightBytes", "node: iad-1\nregion: iad\nreplication: {max_in_flight_bytes: 64}\ntls: {insecure: true}\n",
			`replication.max_in_flight_bytes: 64 is less than 1048576 (1 MiB); it counts bytes, e.g. 68719476736 for 64 GiB`},
		{"SmallMaxFileSize", "node: iad-1\nregion: iad\nreplication: {max_file_size: 4096}\ntls: {insecure: true}\n",
			`replication.max_file_size: 4096 is less than 1048576 (1 MiB); it counts bytes, e.g. 68719476736 for 64 GiB`},
		{"SyncAcksBeyondPeers", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, durability: sync, sync_acks: 2, peers: [{node: fra-1, region: fra}]}\ntls: {insecure: true}\n",
			`replication.sync_acks: 2, but replication.peers lists only 1 replica(s)`},
		{"SyncAcksBeyondReplicas", "node: fra-1\nregion: fra\nlease: {static_primary: iad-1}\nreplication: {durability: sync, sync_acks: 2, peers: [{node: iad-1, region: iad}, {node: syd-1, region: syd}]}\ntls: {insecure: true}\n",
			`replication.sync_acks: 2, but replication.peers lists only 1 replica(s)`},
		{"SyncNoAcks", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, durability: sync, sync_acks: 0, peers: [{node: fra-1, region: fra}]}\ntls: {insecure: true}\n",
			`replication.sync_acks: 0 with sync_regions off asks no replica`},
		{"SyncKernelLocks", "node: iad-1\nregion: iad\nfs: {locks: kernel}\nreplication: {listen: 127.0.0.1:1, durability: sync, peers: [{node: fra-1, region: fra}]}\ntls: {insecure: true}\n",
			`replication.durability: sync holds each WAL commit at the end of its write transaction, the release of SQLite's WAL write lock, which the mount sees only with fs.locks: mount (fs.locks is "kernel")`},
		{"SyncRegionsNone", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, durability: sync, sync_regions: true, peers: [{node: iad-2, region: iad}]}\ntls: {insecure: true}\n",
			`replication.sync_regions: no peer is in a region other than "iad"`},
		{"UnknownPeerKey", "node: iad-1\nregion: iad\nreplication: {listen: 127.0.0.1:1, peers: [{node: fra-1, region: fra, adr: x}]}\ntls: {insecure: true}\n",
			`unknown key "replication.peers[0].adr" (keys under replication.peers[0]: node, region, addr, admin, router)`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse(t, tt.yaml)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// Package regiond is the meridian daemon: it ties the replication, lease and
// FUSE components of one node together. This file holds its configuration,
// one YAML file whose keys are the contract shared by docs, tests and deploys.
package regiond

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meridian-db/meridian"
	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/lease/consul"
	"github.com/meridian-db/meridian/ltx"
	"github.com/meridian-db/meridian/replication"
	"github.com/meridian-db/meridian/router"
)

// Defaults for keys the configuration file leaves out. lease.static_primary
// defaults to node; tls.ca, tls.cert and tls.key default to ca.pem,
// <node>.pem and <node>-key.pem beside the configuration file.
const (
	DefaultDataDir   = "/var/lib/meridian"
	DefaultMountDir  = "/data"
	DefaultLeaseType = LeaseStatic
	DefaultCandidate = true
	// The Consul lease's defaults (lease.consul_*, ttl, check_ttl,
	// lock_delay).
	DefaultConsulURL = "http://127.0.0.1:8500"
	DefaultConsulKey = consul.DefaultKey
	DefaultLeaseTTL  = consul.DefaultSessionTTL
	DefaultCheckTTL  = consul.DefaultCheckTTL
	DefaultLockDelay = consul.DefaultLockDelay
	// DefaultHandoffTimeout is lease.handoff_timeout's default: long
	// enough for a replica a few seconds behind to catch up, short enough
	// for an app's busy timeout (often 5 s) to outlast the wait.
	DefaultHandoffTimeout = 2 * time.Second
	DefaultRetention      = 10 * time.Minute
	// DefaultMaxRetention is replication.max_retention.
	DefaultMaxRetention = 24 * time.Hour
	DefaultLogLevel     = "info"
	DefaultLogFormat    = "text"
	DefaultFSLocks      = LocksMount

	// DefaultMaxFileSize, DefaultMaxInFlightFiles and
	// DefaultMaxInFlightBytes are replication.max_file_size,
	// max_in_flight_files and max_in_flight_bytes.
	DefaultMaxFileSize      = replication.DefaultMaxFileSize
	DefaultMaxInFlightFiles = replication.DefaultMaxInFlightFiles
	DefaultMaxInFlightBytes = replication.DefaultMaxInFlightBytes

	DefaultDurability    = DurabilityAsync
	DefaultSyncAcks      = 1
	DefaultSyncTimeout   = 5 * time.Second
	DefaultSyncOnTimeout = OnTimeoutFail

	// DefaultMaxLag is router.max_lag.
	DefaultMaxLag = 10 * time.Second
)

// Bounds of replication.max_in_flight_files and max_in_flight_bytes: each
// file in flight holds a file descriptor; fewer bytes than a MiB is a
// value meant in other units.
const (
	maxInFlightFiles = 4096
	minInFlightBytes = 1 << 20
)

// Settings with a closed set of values are typed: a value is checked once,
// by Validate (through oneOf), and code compares it with these constants.
type (
	// LeaseType is lease.type.
	LeaseType string
	// Locks is fs.locks: who implements SQLite's POSIX locks on the mount.
	Locks string
	// Durability is replication.durability.
	Durability string
	// OnTimeout is replication.sync_on_timeout.
	OnTimeout string
)

const (
	// LeaseStatic is the lease type where lease.static_primary names the
	// primary; a SIGHUP that changes it moves the primary. It is the only
	// type accepted so far.
	LeaseStatic LeaseType = "static"
	// LeaseConsul is the lease held in Consul (package lease/consul): the
	// primary moves by itself when it dies.
	LeaseConsul LeaseType = "consul"

	// LocksMount: the mount's lock table implements SQLite's locks.
	LocksMount Locks = "mount"
	// LocksKernel: the kernel does, as on a local disk.
	LocksKernel Locks = "kernel"

	// DurabilityAsync: a commit returns once it is durable on the primary.
	DurabilityAsync Durability = "async"
	// DurabilitySync: a commit returns once replicas acknowledged it too.
	DurabilitySync Durability = "sync"

	// OnTimeoutFail fails a sync commit whose acknowledgements do not come
	// within replication.sync_timeout; OnTimeoutDegrade lets it and later
	// ones return, as async, until the replicas catch up.
	OnTimeoutFail    OnTimeout = "fail"
	OnTimeoutDegrade OnTimeout = "degrade"
)

var (
	durabilities   = []Durability{DurabilityAsync, DurabilitySync}
	syncOnTimeouts = []OnTimeout{OnTimeoutFail, OnTimeoutDegrade}
)

const (
	nodeNameHint       = "use " + meridian.NameRule
	durationSyntaxHint = "use Go syntax like 10m or 2s"
)

var (
	leaseTypes = []LeaseType{LeaseStatic, LeaseConsul}
	logLevels  = []string{"debug", "info", "warn", "error"}
	logFormats = []string{"text", "json"}
	fsLocks    = []Locks{LocksMount, LocksKernel}
)

// Config is the daemon's configuration. Load it with LoadConfig; a Config
// built in code should start from DefaultConfig and pass Validate.
type Config struct {
	Node        string            `yaml:"node"`      // unique node name, e.g. iad-1
	Region      string            `yaml:"region"`    // region name, e.g. iad
	DataDir     string            `yaml:"data_dir"`  // backing files and LTX logs
	MountDir    string            `yaml:"mount_dir"` // FUSE mount the app uses
	FS          FSConfig          `yaml:"fs"`
	Lease       LeaseConfig       `yaml:"lease"`
	Replication ReplicationConfig `yaml:"replication"`
	TLS         TLSConfig         `yaml:"tls"`
	Admin       AdminConfig       `yaml:"admin"`
	Router      RouterConfig      `yaml:"router"`
	Log         LogConfig         `yaml:"log"`
	Telemetry   TelemetryConfig   `yaml:"telemetry"`
}

// AdminConfig sets up the admin HTTP API (see Daemon.AdminHandler).
type AdminConfig struct {
	// Listen is the host:port the admin API listens on, plain HTTP; ""
	// serves none. It says what the node holds and lets anyone who
	// reaches it read that: bind it to loopback or a private interface.
	Listen string `yaml:"listen"`
}

// RouterConfig sets up the HTTP router in front of the local app (see
// package router).
type RouterConfig struct {
	// Listen is the host:port the router serves on, plain HTTP; "" runs
	// no router.
	Listen string `yaml:"listen"`
	// Target is the local app's URL, e.g. http://127.0.0.1:3000.
	Target string `yaml:"target"`
	// PeerListen, if set, is a host:port where the router also serves,
	// with mutual TLS, the nodes of replication.peers: those whose entry
	// for this node has an https:// router forward writes there.
	PeerListen string `yaml:"peer_listen"`
	// MaxLag is how far behind the primary a replica may be and still be
	// ready (/readyz): the time since the commit of the oldest transaction
	// it has not applied, or since it last heard from the primary.
	MaxLag Duration `yaml:"max_lag"`
	// RYWTimeout bounds the wait of a read with a read-your-writes token
	// on a replica; past it the primary serves the read.
	RYWTimeout Duration `yaml:"ryw_timeout"`
	// PrimaryWait bounds how long a write waits for a primary during a
	// failover or handoff before it is answered 503.
	PrimaryWait Duration `yaml:"primary_wait"`
	// UpstreamTimeout bounds the wait for response headers from the app
	// or from the primary's router.
	UpstreamTimeout Duration `yaml:"upstream_timeout"`
	// MaxBody is the largest request body accepted, in bytes.
	MaxBody int64 `yaml:"max_body"`
	// WritePaths and ReadPaths are "[METHOD ]/prefix" rules that make
	// requests writes or reads whatever their method.
	WritePaths []string `yaml:"write_paths"`
	ReadPaths  []string `yaml:"read_paths"`
	// IdempotentHeader marks writes that may be sent again to a new
	// primary after failing because the primary changed;
	// IdempotentMethods marks all requests of those methods so.
	IdempotentHeader  string   `yaml:"idempotent_header"`
	IdempotentMethods []string `yaml:"idempotent_methods"`
	// Replay, if set, is a response header (e.g. fly-replay) with which a
	// replica region answers writes instead of forwarding them.
	Replay string `yaml:"replay"`
	// TrustForwarded keeps clients' X-Forwarded-* headers (a trusted
	// proxy in front of the router).
	TrustForwarded bool `yaml:"trust_forwarded"`
}

// FSConfig tunes the FUSE mount.
type FSConfig struct {
	// Locks says who implements SQLite's POSIX locks on the mount's files:
	// "mount" (the filesystem's lock table: a reader that meets an apply
	// waits for it and goes before the next one, and new readers wait for
	// a waiting apply) or "kernel" (a system call instead of a FUSE round
	// trip per lock: reads at the speed of a local file; on a replica a
	// child process, "regiond lock-holder", takes the applier's locks, and
	// a reader that meets an apply sleeps in SQLite's busy handler).
	Locks Locks `yaml:"locks"`
	// Passthrough lets the kernel write WAL files straight to disk (FUSE
	// passthrough, Linux 6.9+) while capture reads them; the daemon falls
	// back to serving WAL writes itself where the kernel cannot.
	Passthrough bool `yaml:"passthrough"`
	// SpareFiles is how many spare files the daemon keeps ready to write
	// LTX files and journals over instead of creating them (see
	// fs.FileSystem.SpareFill); 0 keeps none ready.
	SpareFiles int `yaml:"spare_files"`
	// LogSegmentSize is the size in bytes at which a database's LTX log
	// starts a new segment file (see ltx.Log.SegmentSize); 0 writes one
	// file per transaction instead, the log's layout before segments.
	LogSegmentSize int64 `yaml:"log_segment_size"`
}

// LeaseConfig chooses how the write lease (who is primary) is decided.
type LeaseConfig struct {
	Type          LeaseType `yaml:"type"`           // static or consul
	Candidate     bool      `yaml:"candidate"`      // consul: this node may become primary
	StaticPrimary string    `yaml:"static_primary"` // static: the primary's node name

	// ConsulURL is the Consul agent's HTTP API; ConsulKey the KV key
	// that holds the lease.
	ConsulURL string `yaml:"consul_url"`
	ConsulKey string `yaml:"consul_key"`
	// ConsulTokenFile holds the ACL token of the lease's Consul requests
	// (see ConsulToken).
	ConsulTokenFile string `yaml:"consul_token_file"`
	// TTL is the Consul session's TTL (10s at least), a backstop;
	// CheckTTL the TTL of the health check the primary passes three times
	// within it, which ends the lease about CheckTTL after the primary
	// dies; LockDelay how long Consul then keeps the lease from the
	// other candidates.
	TTL       Duration `yaml:"ttl"`
	CheckTTL  Duration `yaml:"check_ttl"`
	LockDelay Duration `yaml:"lock_delay"`
	// PreferRegions orders regions for the lease: among caught-up
	// candidates, one in an earlier region tries first.
	PreferRegions []string `yaml:"prefer_regions"`
	// HandoffTimeout bounds a graceful handoff (Daemon.Handoff): how long
	// the primary holds new writes while the target catches up and takes
	// the lease, before it gives up and writes resume on it.
	HandoffTimeout Duration `yaml:"handoff_timeout"`
}

// ReplicationConfig holds the settings of LTX replication.
type ReplicationConfig struct {
	// Listen is the address the replication gRPC server listens on; ""
	// serves none (a replica nobody streams from).
	Listen string `yaml:"listen"`
	// Advertise is the host:port other nodes dial to reach Listen; ""
	// is Listen itself (see AdvertiseAddr).
	Advertise string `yaml:"advertise"`
	// Peers are the other nodes of the cluster: replicas stream from the
	// primary's addr, and the primary serves only the nodes listed here.
	Peers     []Peer   `yaml:"peers"`
	Retention Duration `yaml:"retention"` // how long LTX files are kept
	// MaxRetention is how long LTX files a peer has not acknowledged are
	// kept past Retention; a peer further behind gets a snapshot.
	MaxRetention Duration `yaml:"max_retention"`

	// Durability is async (a commit returns once it is durable here) or
	// sync (once replicas acknowledged it too, see SyncAcks).
	Durability Durability `yaml:"durability"`
	// SyncAcks is how many replicas must acknowledge a commit in sync
	// durability; with SyncRegions, at least one in every other region of
	// the peers must be among them.
	SyncAcks    int  `yaml:"sync_acks"`
	SyncRegions bool `yaml:"sync_regions"`
	// SyncTimeout bounds a commit's wait for its acknowledgements; then
	// SyncOnTimeout decides: fail the commit (where SQLite can be told;
	// a WAL commit keeps waiting) or degrade to async until the replicas
	// catch up.
	SyncTimeout   Duration  `yaml:"sync_timeout"`
	SyncOnTimeout OnTimeout `yaml:"sync_on_timeout"`

	// MaxInFlightFiles bounds the files a replica receives at once on its
	// stream, begun and not yet ended, and MaxInFlightBytes the bytes the
	// stream takes on its disk: the sizes of those files and of the files
	// received and waiting to be applied (see replication.Client). The
	// replica announces both to the primary, which keeps within them.
	MaxInFlightFiles int   `yaml:"max_in_flight_files"`
	MaxInFlightBytes int64 `yaml:"max_in_flight_bytes"`
	// MaxFileSize bounds one LTX file a replica receives, a snapshot
	// too: a database larger than it cannot join.
	MaxFileSize int64 `yaml:"max_file_size"`
}

// Peer is another node of the cluster.
type Peer struct {
	Node   string `yaml:"node"`   // its node name (its certificate's name)
	Region string `yaml:"region"` // its region
	Addr   string `yaml:"addr"`   // its replication.listen address, host:port
	Admin  string `yaml:"admin"`  // its admin.listen address, for `regiond status`; "" if unknown
	Router string `yaml:"router"` // its router's URL (or host:port), where writes are forwarded; "" if unknown
}

// TLSConfig names the mTLS material a node uses with its peers (see
// ServerTLS and ClientTLS), made by `regiond ca`.
type TLSConfig struct {
	CA   string `yaml:"ca"`   // the cluster's CA certificate(s), PEM
	Cert string `yaml:"cert"` // this node's certificate, naming node
	Key  string `yaml:"key"`  // this node's private key, mode 0600
	// Insecure turns TLS off between nodes: plaintext, no authentication.
	// For tests and demos only; see TLSWarning.
	Insecure bool `yaml:"insecure"`
}

// TelemetryConfig sets up OpenTelemetry (see the README, "Telemetry"):
// traces and metrics over OTLP/gRPC, and metrics on the admin API's
// /metrics in any case. The standard OTEL_* environment variables apply
// where a key is not set (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME,
// OTEL_TRACES_SAMPLER, OTEL_BSP_SCHEDULE_DELAY,
// OTEL_METRIC_EXPORT_INTERVAL, ...).
type TelemetryConfig struct {
	// OTLPEndpoint is the OTLP/gRPC collector's URL: http://host:4317 in the
	// clear, https://host:4317 with TLS. "" takes
	// OTEL_EXPORTER_OTLP_ENDPOINT (or the _TRACES_ and _METRICS_
	// variants); with neither, nothing is exported and nothing traced.
	OTLPEndpoint string `yaml:"otlp_endpoint"`
	// ServiceName names the node's traces and metrics; "" takes
	// OTEL_SERVICE_NAME, else "meridian-" and the region.
	ServiceName string `yaml:"service_name"`
	// SampleCommits is the share, 0 to 1, of the commits made outside a
	// traced request that get a trace of their own (a commit within a
	// traced request always joins its trace).
	SampleCommits float64 `yaml:"sample_commits"`
}

// DefaultSampleCommits is telemetry.sample_commits' default.
const DefaultSampleCommits = 0.01

// LogConfig sets up the daemon's log/slog logger.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug | info | warn | error
	Format string `yaml:"format"` // text | json
}

// Duration is a time.Duration written in YAML as a Go duration string, such
// as "10m" or "2s".
type Duration time.Duration

// String returns the Go syntax of d, e.g. "10m0s".
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalYAML writes d as a Go duration string.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// UnmarshalYAML parses a Go duration string. The error quotes the bad value
// and says how to write one; the caller adds the key.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("want a duration (%s), got %s", durationSyntaxHint, kindName(n))
	}
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("%q is not a duration (%s)", n.Value, durationSyntaxHint)
	}
	*d = Duration(v)
	return nil
}

// Error lists the problems found in a configuration. Each problem names its
// key in dotted form (lease.type) and, for problems found while reading the
// file, its line.
type Error struct {
	File     string   // path of the configuration file, "" if none
	Problems []string // e.g. `line 7: unknown key "replicaton" (keys: ...)`
}

// Error returns one line per problem, each starting "config <file>: ".
func (e *Error) Error() string {
	prefix := "config: "
	if e.File != "" {
		prefix = "config " + e.File + ": "
	}
	return prefix + strings.Join(e.Problems, "\n"+prefix)
}

// DefaultConfig returns a Config with every default applied. Node and Region
// are empty and must be set; Lease.StaticPrimary is empty and ParseConfig
// sets it to Node when the file leaves it out. The TLS files are empty:
// ParseConfig sets them to ca.pem, <node>.pem and <node>-key.pem in the
// file's directory, and a Config built in code must set them or set
// TLS.Insecure.
func DefaultConfig() Config {
	return Config{
		DataDir:  DefaultDataDir,
		MountDir: DefaultMountDir,
		FS:       FSConfig{Locks: DefaultFSLocks, Passthrough: true, SpareFiles: fs.DefaultSpareFill, LogSegmentSize: ltx.DefaultSegmentSize},
		Lease: LeaseConfig{Type: DefaultLeaseType, Candidate: DefaultCandidate, ConsulURL: DefaultConsulURL, ConsulKey: DefaultConsulKey,
			TTL: Duration(DefaultLeaseTTL), CheckTTL: Duration(DefaultCheckTTL), LockDelay: Duration(DefaultLockDelay),
			HandoffTimeout: Duration(DefaultHandoffTimeout)},
		Replication: ReplicationConfig{Retention: Duration(DefaultRetention), MaxRetention: Duration(DefaultMaxRetention), Durability: DefaultDurability,
			SyncAcks: DefaultSyncAcks, SyncTimeout: Duration(DefaultSyncTimeout), SyncOnTimeout: DefaultSyncOnTimeout,
			MaxInFlightFiles: DefaultMaxInFlightFiles, MaxInFlightBytes: DefaultMaxInFlightBytes,
			MaxFileSize: DefaultMaxFileSize},
		Router: RouterConfig{MaxLag: Duration(DefaultMaxLag), RYWTimeout: Duration(router.DefaultRYWTimeout), PrimaryWait: Duration(router.DefaultPrimaryWait),
			UpstreamTimeout: Duration(router.DefaultUpstreamTimeout), MaxBody: router.DefaultMaxBodyBytes, IdempotentHeader: router.DefaultIdempotentHeader},
		Log:       LogConfig{Level: DefaultLogLevel, Format: DefaultLogFormat},
		Telemetry: TelemetryConfig{SampleCommits: DefaultSampleCommits},
	}
}

// LoadConfig reads, completes and validates the configuration file at path.
// Relative data_dir, mount_dir and tls paths are resolved against the
// file's directory.
// Errors of the content are *Error with File set to path.
func LoadConfig(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	defer f.Close()
	c, err := ParseConfig(f, filepath.Dir(path))
	var cerr *Error
	if errors.As(err, &cerr) {
		cerr.File = path
	}
	return c, err
}

// ParseConfig reads one YAML document from r, applies defaults for the keys
// it leaves out, resolves relative data_dir, mount_dir, tls.ca, tls.cert,
// tls.key and lease.consul_token_file against dir (made absolute), and validates the result. Problems
// come as one *Error: the syntax error, or every unknown key and bad value,
// or every Validate problem.
func ParseConfig(r io.Reader, dir string) (Config, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	c := DefaultConfig()
	if problems := decode(b, &c); len(problems) > 0 {
		return Config{}, &Error{Problems: problems}
	}
	if c.Lease.StaticPrimary == "" {
		c.Lease.StaticPrimary = c.Node
	}
	c.DataDir, c.MountDir = resolvePath(c.DataDir, dir), resolvePath(c.MountDir, dir)
	c.TLS.defaults(c.Node)
	c.TLS.CA, c.TLS.Cert, c.TLS.Key = resolvePath(c.TLS.CA, dir), resolvePath(c.TLS.Cert, dir), resolvePath(c.TLS.Key, dir)
	c.Lease.ConsulTokenFile = resolvePath(c.Lease.ConsulTokenFile, dir)
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// decode reads the one YAML document in b into c. An empty document leaves
// c as it is.
func decode(b []byte, c any) []string {
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(b))
	switch err := dec.Decode(&doc); {
	case errors.Is(err, io.EOF):
		return nil
	case err != nil:
		return []string{strings.TrimPrefix(err.Error(), "yaml: ") + " (fix the YAML syntax)"}
	}
	if problems := decodeSection(&doc, reflect.ValueOf(c).Elem(), ""); len(problems) > 0 {
		return problems
	}
	var extra yaml.Node
	if dec.Decode(&extra) == nil {
		return []string{fmt.Sprintf("line %d: a second YAML document; keep one, without a second ---", extra.Line)}
	}
	return nil
}

// resolvePath makes a relative p absolute against dir. An empty p stays
// empty, and a path that cannot be made absolute stays relative, for
// Validate to report.
func resolvePath(p, dir string) string {
	if p == "" {
		return ""
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(dir, p)
	}
	if abs, err := filepath.Abs(p); err == nil {
		return abs
	}
	return p
}

// decodeSection decodes the mapping n into the struct v, key by key, using
// the yaml tags of v's fields. Keys of nested structs are named with prefix
// in dotted form. It returns one problem per unknown key or bad value.
// Keys left out and keys with an empty (null) value keep their defaults.
func decodeSection(n *yaml.Node, v reflect.Value, prefix string) []string {
	n = resolveAlias(n)
	if n.Kind == yaml.DocumentNode && len(n.Content) == 1 {
		n = resolveAlias(n.Content[0])
	}
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return nil
	}
	keys, label, under := strings.Join(keysOf(v.Type()), ", "), "", ""
	if prefix != "" {
		label, under = prefix+": ", " under "+prefix
	}
	if n.Kind != yaml.MappingNode {
		return []string{fmt.Sprintf("line %d: %swant a mapping of keys (%s), got %s", n.Line, label, keys, kindName(n))}
	}
	var problems []string
	seen := make(map[string]int)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], resolveAlias(n.Content[i+1])
		key := strings.TrimPrefix(prefix+"."+k.Value, ".")
		if line, ok := seen[k.Value]; ok {
			problems = append(problems, fmt.Sprintf("line %d: %s: repeats the key from line %d; keep one", k.Line, key, line))
			continue
		}
		seen[k.Value] = k.Line
		f, ok := fieldByTag(v, k.Value)
		if !ok {
			problems = append(problems, fmt.Sprintf("line %d: unknown key %q (keys%s: %s)", k.Line, key, under, keys))
			continue
		}
		if f.Kind() == reflect.Struct {
			problems = append(problems, decodeSection(val, f, key)...)
			continue
		}
		if f.Kind() == reflect.Slice && f.Type().Elem().Kind() == reflect.Struct {
			problems = append(problems, decodeList(val, f, key)...)
			continue
		}
		if err := decodeValue(val, f); err != nil {
			problems = append(problems, fmt.Sprintf("line %d: %s: %v", val.Line, key, err))
		}
	}
	return problems
}

// decodeList decodes the sequence n of mappings into the slice of structs
// f, naming items key[i].
func decodeList(n *yaml.Node, f reflect.Value, key string) []string {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		return []string{fmt.Sprintf("line %d: %s: want a list, got %s", n.Line, key, kindName(n))}
	}
	var problems []string
	list := reflect.MakeSlice(f.Type(), 0, len(n.Content))
	for i, item := range n.Content {
		elem := reflect.New(f.Type().Elem()).Elem()
		problems = append(problems, decodeSection(item, elem, fmt.Sprintf("%s[%d]", key, i))...)
		list = reflect.Append(list, elem)
	}
	if list.Len() > 0 {
		f.Set(list)
	}
	return problems
}

// decodeValue decodes the scalar n into the field f, or a list of scalars
// into a slice of strings.
func decodeValue(n *yaml.Node, f reflect.Value) error {
	if f.Kind() == reflect.Slice && f.Type().Elem().Kind() == reflect.String {
		if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
			return nil
		}
		if n.Kind != yaml.SequenceNode {
			return fmt.Errorf("want a list, got %s", kindName(n))
		}
		list := reflect.MakeSlice(f.Type(), len(n.Content), len(n.Content))
		for i, item := range n.Content {
			if item.Kind != yaml.ScalarNode {
				return fmt.Errorf("item %d: want a single value, got %s", i, kindName(item))
			}
			list.Index(i).SetString(item.Value)
		}
		if list.Len() > 0 {
			f.Set(list)
		}
		return nil
	}
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("want a single value, got %s", kindName(n))
	}
	if err := n.Decode(f.Addr().Interface()); err != nil {
		var terr *yaml.TypeError
		if !errors.As(err, &terr) {
			return err // Duration's own message
		}
		if f.Kind() == reflect.Bool {
			return fmt.Errorf("%q is not a boolean (use true or false)", n.Value)
		}
		return fmt.Errorf("%q is not a valid %s", n.Value, f.Kind())
	}
	return nil
}

func fieldByTag(v reflect.Value, name string) (reflect.Value, bool) {
	for i := range v.NumField() {
		if yamlName(v.Type().Field(i)) == name {
			return v.Field(i), true
		}
	}
	return reflect.Value{}, false
}

// keysOf lists the yaml keys of struct type t in declaration order.
func keysOf(t reflect.Type) []string {
	keys := make([]string, 0, t.NumField())
	for i := range t.NumField() {
		keys = append(keys, yamlName(t.Field(i)))
	}
	return keys
}

func yamlName(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	return name
}

func resolveAlias(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	default:
		return fmt.Sprintf("%q", n.Value)
	}
}

// problems collects what Validate finds, one line per bad key.
type problems []string

func (p *problems) add(format string, args ...any) { *p = append(*p, fmt.Sprintf(format, args...)) }

// hostPort adds a problem if v is set and not host:port.
func (p *problems) hostPort(key, v, example string) {
	if v == "" {
		return
	}
	if _, _, err := net.SplitHostPort(v); err != nil {
		p.add("%s: %q is not host:port (e.g. %s)", key, v, example)
	}
}

func (p *problems) name(key, v, what string) {
	if v == "" {
		p.add("%s: required (%s)", key, what)
	} else if !meridian.ValidName(v) {
		p.add("%s: %q is not a valid name (%s)", key, v, nodeNameHint)
	}
}

func oneOf[T ~string](p *problems, key string, v T, accepted []T) {
	if !slices.Contains(accepted, v) {
		names := make([]string, len(accepted))
		for i, a := range accepted {
			names[i] = string(a)
		}
		p.add("%s: %q is not accepted (use one of: %s)", key, v, strings.Join(names, ", "))
	}
}

// dir reports an empty or relative directory and says whether dir is usable
// for further checks.
func (p *problems) dir(key, dir, def string) bool {
	switch {
	case dir == "":
		p.add("%s: must not be empty (leave the key out to use %s)", key, def)
	case !filepath.IsAbs(dir):
		p.add("%s: %q must be an absolute path", key, dir)
	default:
		return true
	}
	return false
}

// Validate checks every key and returns an *Error naming each bad key and
// what to do, or nil. It does not change c.
func (c *Config) Validate() error {
	var p problems
	p.name("node", c.Node, "the unique name of this node, e.g. iad-1")
	p.name("region", c.Region, "the region this node runs in, e.g. iad")
	c.validateDirs(&p)
	switch c.Lease.Type {
	case LeaseStatic:
		p.name("lease.static_primary", c.Lease.StaticPrimary, "the node that holds the write lease, e.g. iad-1")
	case LeaseConsul:
		c.validateConsul(&p)
	default:
		oneOf(&p, "lease.type", c.Lease.Type, leaseTypes)
	}
	if c.Replication.Retention <= 0 {
		p.add("replication.retention: %v must be greater than 0 (e.g. 10m)", c.Replication.Retention)
	}
	if c.Replication.MaxRetention < c.Replication.Retention {
		p.add("replication.max_retention: %v is shorter than replication.retention %v", c.Replication.MaxRetention, c.Replication.Retention)
	}
	c.validateReplication(&p)
	c.validateTLS(&p)
	p.hostPort("admin.listen", c.Admin.Listen, "127.0.0.1:20211")
	c.validateRouter(&p)
	oneOf(&p, "fs.locks", c.FS.Locks, fsLocks)
	if c.FS.SpareFiles < 0 || c.FS.SpareFiles > fs.DefaultMaxSpares {
		p.add("fs.spare_files: %d is not between 0 and %d", c.FS.SpareFiles, fs.DefaultMaxSpares)
	}
	if s := c.FS.LogSegmentSize; s != 0 && (s < 64<<10 || s > 1<<30) {
		p.add("fs.log_segment_size: %d is not 0 (a file per transaction) or between 65536 (64 KiB) and 1073741824 (1 GiB)", s)
	}
	c.validateTelemetry(&p)
	oneOf(&p, "log.level", c.Log.Level, logLevels)
	oneOf(&p, "log.format", c.Log.Format, logFormats)
	if len(p) > 0 {
		return &Error{Problems: p}
	}
	return nil
}

// dialable reports whether host:port addr names a host and a port another
// node can dial: not an empty or unspecified host (0.0.0.0, ::), not
// port 0. Addresses that do not parse are reported elsewhere.
func dialable(addr string) bool {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return true
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		return false
	}
	return port != "" && port != "0"
}

// AdvertiseAddr returns the address other nodes dial to reach this node's
// replication server: replication.advertise, or replication.listen.
func (c Config) AdvertiseAddr() string {
	if c.Replication.Advertise != "" {
		return c.Replication.Advertise
	}
	return c.Replication.Listen
}

// validateReplication checks replication.listen and replication.peers:
// names valid and unique, addresses host:port, and a listen address on a
// primary with peers. (A replica whose primary has no address runs, read
// only and not replicating; the daemon says so.)
func (c *Config) validateReplication(p *problems) {
	p.hostPort("replication.listen", c.Replication.Listen, "127.0.0.1:20210")
	seen := map[string]bool{}
	for i, peer := range c.Replication.Peers {
		key := fmt.Sprintf("replication.peers[%d]", i)
		p.name(key+".node", peer.Node, "the peer's node name")
		p.name(key+".region", peer.Region, "the peer's region")
		switch {
		case peer.Node == c.Node && peer.Node != "":
			p.add("%s.node: %q is this node; list only the other nodes", key, peer.Node)
		case seen[peer.Node]:
			p.add("%s.node: %q is listed twice", key, peer.Node)
		}
		seen[peer.Node] = true
		p.hostPort(key+".addr", peer.Addr, "127.0.0.1:20210")
		p.hostPort(key+".admin", peer.Admin, "127.0.0.1:20211")
		if peer.Router != "" {
			if _, err := RouterURL(peer.Router); err != nil {
				p.add("%s.router: %v", key, err)
			}
		}
	}
	p.hostPort("replication.advertise", c.Replication.Advertise, "10.0.0.5:20210")
	if a := c.Replication.Advertise; a != "" && !dialable(a) {
		p.add("replication.advertise: %q is not an address other nodes can dial: give a host and a port (e.g. 10.0.0.5:20210)", a)
	}
	if l := c.Replication.Listen; l != "" && c.Replication.Advertise == "" && !dialable(l) {
		p.add("replication.advertise: required when replication.listen (%q) names no host other nodes can dial: the address they reach it at (e.g. 10.0.0.5:20210)", l)
	}
	if c.IsPrimary() && c.Replication.Listen == "" && len(c.Replication.Peers) > 0 {
		p.add("replication.listen: required on the primary when replication.peers lists replicas (e.g. 127.0.0.1:20210)")
	}
	if c.Lease.Type == LeaseConsul && c.Lease.Candidate && c.Replication.Listen == "" && len(c.Replication.Peers) > 0 {
		p.add("replication.listen: required on a candidate for the lease (lease.candidate) when replication.peers lists other nodes (e.g. 127.0.0.1:20210)")
	}
	r := c.Replication
	if r.MaxInFlightFiles < 1 || r.MaxInFlightFiles > maxInFlightFiles {
		p.add("replication.max_in_flight_files: %d is not between 1 and %d", r.MaxInFlightFiles, maxInFlightFiles)
	}
	if r.MaxInFlightBytes < minInFlightBytes {
		p.add("replication.max_in_flight_bytes: %d is less than %d (1 MiB); it counts bytes, e.g. %d for 64 GiB", r.MaxInFlightBytes, minInFlightBytes, int64(64<<30))
	}
	if r.MaxFileSize < minInFlightBytes {
		p.add("replication.max_file_size: %d is less than %d (1 MiB); it counts bytes, e.g. %d for 64 GiB", r.MaxFileSize, minInFlightBytes, int64(64<<30))
	}
	oneOf(p, "replication.durability", r.Durability, durabilities)
	oneOf(p, "replication.sync_on_timeout", r.SyncOnTimeout, syncOnTimeouts)
	if r.SyncTimeout <= 0 {
		p.add("replication.sync_timeout: %v must be greater than 0 (e.g. 5s)", r.SyncTimeout)
	}
	switch {
	case r.SyncAcks < 0:
		p.add("replication.sync_acks: %d cannot be negative", r.SyncAcks)
	case r.Durability != DurabilitySync:
	case r.SyncAcks == 0 && !r.SyncRegions:
		p.add("replication.sync_acks: 0 with sync_regions off asks no replica to acknowledge; set it to 1 or more, or use durability: async")
	case r.SyncAcks > c.replicaCount():
		p.add("replication.sync_acks: %d, but replication.peers lists only %d replica(s): no commit could ever return", r.SyncAcks, c.replicaCount())
	}
	if r.Durability == DurabilitySync && c.FS.Locks == LocksKernel {
		p.add("replication.durability: sync holds each WAL commit at the end of its write transaction, the release of SQLite's WAL write lock, which the mount sees only with fs.locks: mount (fs.locks is %q)", c.FS.Locks)
	}
	if r.Durability == DurabilitySync && r.SyncRegions && len(c.SyncRegions()) == 0 {
		p.add("replication.sync_regions: no peer is in a region other than %q, so there is no region to acknowledge", c.Region)
	}
}

// replicaCount is how many of the peers are replicas of a static lease.
func (c Config) replicaCount() int {
	n := len(c.Replication.Peers)
	if c.Lease.Type == LeaseStatic && !c.IsPrimary() {
		n-- // the primary
	}
	return n
}

// SyncRegions returns the regions whose replicas must acknowledge a commit
// with replication.sync_regions: every region of the peers but this
// node's, sorted.
func (c Config) SyncRegions() []string {
	var out []string
	for _, p := range c.Replication.Peers {
		if p.Region != c.Region && !slices.Contains(out, p.Region) {
			out = append(out, p.Region)
		}
	}
	slices.Sort(out)
	return out
}

// Peer returns the peer named node.
func (c Config) Peer(node string) (Peer, bool) {
	for _, p := range c.Replication.Peers {
		if p.Node == node {
			return p, true
		}
	}
	return Peer{}, false
}

// PeerNodes returns the names of the peers.
func (c Config) PeerNodes() []string {
	nodes := make([]string, 0, len(c.Replication.Peers))
	for _, p := range c.Replication.Peers {
		nodes = append(nodes, p.Node)
	}
	return nodes
}

// validateDirs checks data_dir and mount_dir: absolute, different, and
// neither inside the other.
func (c *Config) validateDirs(p *problems) {
	dataOK := p.dir("data_dir", c.DataDir, DefaultDataDir)
	if !p.dir("mount_dir", c.MountDir, DefaultMountDir) || !dataOK {
		return
	}
	data, mount := filepath.Clean(c.DataDir), filepath.Clean(c.MountDir)
	switch {
	case data == mount:
		p.add("mount_dir: %q is also data_dir; give the FUSE mount its own directory", c.MountDir)
	case isInside(mount, data):
		p.add("mount_dir: %q is inside data_dir %q; choose a directory outside it", c.MountDir, c.DataDir)
	case isInside(data, mount):
		p.add("data_dir: %q is inside mount_dir %q; choose a directory outside it", c.DataDir, c.MountDir)
	}
}

// isInside reports whether path is strictly below dir. Both are clean and
// absolute.
func isInside(path, dir string) bool {
	if dir == string(filepath.Separator) {
		return path != dir
	}
	return strings.HasPrefix(path, dir+string(filepath.Separator))
}

// validateConsul checks the keys of lease.type: consul.
func (c *Config) validateConsul(p *problems) {
	l := c.Lease
	if u, err := url.Parse(l.ConsulURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		p.add("lease.consul_url: %q is not the URL of a Consul agent's HTTP API (e.g. http://127.0.0.1:8500)", l.ConsulURL)
	}
	if l.ConsulKey == "" || strings.HasPrefix(l.ConsulKey, "/") {
		p.add("lease.consul_key: %q must be a KV key without a leading '/' (e.g. meridian/primary)", l.ConsulKey)
	}
	if time.Duration(l.TTL) < 10*time.Second || time.Duration(l.TTL) > 24*time.Hour {
		p.add("lease.ttl: %v is outside Consul's session TTL bounds, 10s to 24h", l.TTL)
	}
	if l.CheckTTL <= 0 || l.CheckTTL >= l.TTL {
		p.add("lease.check_ttl: %v must be greater than 0 and shorter than lease.ttl (%v); e.g. 2s", l.CheckTTL, l.TTL)
	}
	if l.LockDelay < 0 {
		p.add("lease.lock_delay: %v cannot be negative", l.LockDelay)
	}
	if l.HandoffTimeout <= 0 {
		p.add("lease.handoff_timeout: %v must be greater than 0; e.g. 2s", l.HandoffTimeout)
	}
	if l.ConsulTokenFile != "" {
		if _, err := l.ConsulToken(); err != nil {
			p.add("lease.consul_token_file: %v", err)
		}
	}
	for _, r := range l.PreferRegions {
		p.name("lease.prefer_regions", r, "a region name, e.g. iad")
	}
}

// ConsulToken returns the ACL token of the lease's Consul requests: the
// content of lease.consul_token_file (surrounding white space dropped),
// or else $CONSUL_HTTP_TOKEN, as Consul's own tools read it; "" for
// none.
func (l LeaseConfig) ConsulToken() (string, error) {
	if l.ConsulTokenFile == "" {
		return os.Getenv("CONSUL_HTTP_TOKEN"), nil
	}
	b, err := os.ReadFile(l.ConsulTokenFile)
	if err != nil {
		return "", fmt.Errorf("the ACL token cannot be read: %w", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", fmt.Errorf("%s is empty; write the token's secret ID into it", l.ConsulTokenFile)
	}
	return token, nil
}

// IsPrimary reports whether this node holds the write lease: with a static
// lease, whether node equals lease.static_primary.
func (c Config) IsPrimary() bool {
	return c.Lease.Type == LeaseStatic && c.Node == c.Lease.StaticPrimary
}

// Logger returns a log/slog logger writing to w at log.level in log.format,
// with the attributes node and region on every record. Unknown values fall
// back to info and text; Validate reports them.
func (c Config) Logger(w io.Writer) *slog.Logger {
	return c.Log.logger(w).With("node", c.Node, "region", c.Region)
}

// logger returns a logger writing to w at the level and in the format l
// says.
func (l LogConfig) logger(w io.Writer) *slog.Logger {
	var level slog.Level
	if err := level.UnmarshalText([]byte(l.Level)); err != nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(w, opts)
	if l.Format == "json" {
		h = slog.NewJSONHandler(w, opts)
	}
	return slog.New(h)
}

// validateRouter checks the router's keys.
func (c *Config) validateRouter(p *problems) {
	r := c.Router
	for _, k := range []struct {
		key string
		d   Duration
	}{{"router.max_lag", r.MaxLag}, {"router.ryw_timeout", r.RYWTimeout}, {"router.primary_wait", r.PrimaryWait}, {"router.upstream_timeout", r.UpstreamTimeout}} {
		if k.d <= 0 {
			p.add("%s: %v must be greater than 0 (e.g. 2s)", k.key, k.d)
		}
	}
	p.hostPort("router.listen", r.Listen, "127.0.0.1:8080")
	p.hostPort("router.peer_listen", r.PeerListen, "10.0.0.5:8443")
	if r.PeerListen != "" && r.Listen == "" {
		p.add("router.listen: required with router.peer_listen: where the region's clients reach the router (e.g. 127.0.0.1:8080)")
	}
	if r.PeerListen != "" && c.TLS.Insecure {
		p.add("router.peer_listen: serves mutual TLS, which tls.insecure turns off: remove one of them")
	}
	for i, peer := range c.Replication.Peers {
		if strings.HasPrefix(peer.Router, "https://") && c.TLS.Insecure {
			p.add("replication.peers[%d].router: %q is https, which needs the cluster's TLS files: tls.insecure is true", i, peer.Router)
		}
	}
	if r.Listen != "" && r.Target == "" {
		p.add("router.target: required with router.listen: the URL of the local app (e.g. http://127.0.0.1:3000)")
	}
	if r.Target != "" {
		if _, err := RouterURL(r.Target); err != nil {
			p.add("router.target: %v", err)
		}
	}
	if r.MaxBody <= 0 {
		p.add("router.max_body: %d must be greater than 0 (bytes, e.g. 33554432)", r.MaxBody)
	}
	for i, s := range r.WritePaths {
		if _, err := router.ParseRule(s, true); err != nil {
			p.add("router.write_paths[%d]: %v", i, err)
		}
	}
	for i, s := range r.ReadPaths {
		if _, err := router.ParseRule(s, false); err != nil {
			p.add("router.read_paths[%d]: %v", i, err)
		}
	}
	for i, m := range r.IdempotentMethods {
		if m == "" || m != strings.ToUpper(m) {
			p.add("router.idempotent_methods[%d]: %q is not an upper-case HTTP method (e.g. PUT)", i, m)
		}
	}
}

// RouterURL parses a router or app address: a URL (http or https) or a
// host:port, taken as http.
func RouterURL(s string) (*url.URL, error) {
	if !strings.Contains(s, "://") {
		if _, _, err := net.SplitHostPort(s); err != nil {
			return nil, fmt.Errorf("%q is neither a URL nor host:port (e.g. http://127.0.0.1:8080)", s)
		}
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%q is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:8080)", s)
	}
	return u, nil
}

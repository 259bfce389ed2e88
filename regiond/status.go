package regiond

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
)

// Status is a node's view of itself and of the replication it takes part
// in: what the admin API serves as JSON at /status, the Status RPC as
// proto, and `regiond status` prints.
type Status struct {
	Node    string `json:"node"`
	Region  string `json:"region"`
	Role    string `json:"role"`    // RolePrimary or RoleReplica
	Primary string `json:"primary"` // the primary's node name
	// Addr is where other nodes reach this node's replication server
	// (replication.advertise, or replication.listen); "" if it serves
	// none.
	Addr string `json:"addr,omitempty"`
	// Epoch is the newest lease epoch the node knows: its own lease's on
	// the primary, the newest it has accepted frames from on a replica.
	Epoch uint64 `json:"epoch"`
	// Ready is what /readyz answers: a primary is ready; a replica once it
	// is connected and at most MaxLag behind the primary. NotReady says why
	// not.
	Ready    bool   `json:"ready"`
	NotReady string `json:"not_ready,omitempty"`
	// MaxLagMS is router.max_lag, in milliseconds.
	MaxLagMS int64 `json:"max_lag_ms"`
	// LagMS is, on a replica, how far behind the primary it is: 0 when
	// every database is at the primary's last known position, else the
	// time since the commit of the oldest transaction it has not applied
	// (by the primary's clock), or since it last heard from the primary.
	LagMS int64 `json:"lag_ms"`
	// Databases are the node's databases, in name order.
	Databases []DatabaseStatus `json:"databases"`
	// Replicas are, on the primary, the replicas that have streamed from
	// it since it started, in name order.
	Replicas []ReplicaStatus `json:"replicas,omitempty"`
	// Stream is, on a replica, its stream from the primary.
	Stream *StreamStatus `json:"stream,omitempty"`
	// Durability is, on the primary, replication.durability and how it
	// fares.
	Durability *DurabilityStatus `json:"durability,omitempty"`
	// Peers are the other nodes of replication.peers, with the admin
	// addresses `regiond status` asks next.
	Peers []PeerStatus `json:"peers"`
	// Lease is, with lease.type: consul, the lease as this node last read
	// it from Consul; Candidate whether this node may take it.
	Lease     *LeaseStatus `json:"lease,omitempty"`
	Candidate bool         `json:"candidate,omitempty"`
	// Handoff is the last handoff this node began as primary, if any.
	Handoff *HandoffStatus `json:"handoff,omitempty"`
}

// LeaseStatus is the lease in Consul as a node last read it.
type LeaseStatus struct {
	Type   LeaseType `json:"type"`
	Consul string    `json:"consul_url"`
	Key    string    `json:"key"`
	// Holder is the node the lease names, "" if none; Epoch its epoch (or
	// the last holder's).
	Holder string `json:"holder"`
	Epoch  uint64 `json:"epoch"`
	// Since is when the node learned of the lease as it is (the watch
	// reports changes only); zero if it could never read it.
	Since time.Time `json:"since,omitzero"`
}

// PeerStatus is a node of replication.peers.
type PeerStatus struct {
	Node   string `json:"node"`
	Region string `json:"region"`
	Addr   string `json:"addr,omitempty"`   // replication.listen
	Admin  string `json:"admin,omitempty"`  // admin.listen
	Router string `json:"router,omitempty"` // router, where writes are forwarded
}

// The roles of Status.Role.
const (
	RolePrimary = "primary"
	RoleReplica = "replica"
)

// DatabaseStatus is the position of one database on a node.
type DatabaseStatus struct {
	Name string `json:"name"`
	// Pos is the position as the logs and the mount's -pos files print it:
	// TXID/post-apply checksum, each 16 hex digits.
	Pos  string `json:"pos"`
	TXID uint64 `json:"txid"`
	// Primary is, on a replica, the primary's position from its last
	// heartbeat or file; LagMS how far behind it the database is.
	Primary string `json:"primary,omitempty"`
	LagMS   int64  `json:"lag_ms"`
	// CommittedAt and AppliedAt are, on a replica, when the last
	// transaction it applied of the database committed on the primary
	// (by the primary's clock) and when this node applied it (by its
	// own): the lag of that transaction, as its "apply" span and the
	// meridian.replication.lag histogram have it.
	CommittedAt time.Time `json:"committed_at,omitzero"`
	AppliedAt   time.Time `json:"applied_at,omitzero"`

	pos ltx.Pos
}

// ReplicaStatus is what the primary knows of one replica.
type ReplicaStatus struct {
	Node      string `json:"node"`
	Region    string `json:"region"`
	Connected bool   `json:"connected"`
	// LagMS is the largest of Databases' LagMS.
	LagMS     int64                   `json:"lag_ms"`
	Databases []ReplicaDatabaseStatus `json:"databases"`
}

// ReplicaDatabaseStatus is a replica's acknowledged position of one
// database, as the primary knows it.
type ReplicaDatabaseStatus struct {
	Name  string `json:"name"`
	Acked string `json:"acked"` // the position the replica acknowledged
	// LagMS is the time since the primary committed the oldest transaction
	// the replica has not acknowledged; 0 if it has them all.
	LagMS int64 `json:"lag_ms"`

	ackedTXID ltx.TXID
}

// StreamStatus is a replica's stream from the primary.
type StreamStatus struct {
	Connected  bool      `json:"connected"`
	Reconnects int       `json:"reconnects"`
	LastHeard  time.Time `json:"last_heard,omitzero"` // the primary's last heartbeat
}

// DurabilityStatus is the primary's replication.durability and how it
// fares (see replication.GateStatus).
type DurabilityStatus struct {
	Mode          Durability `json:"mode"`
	Quorum        string     `json:"quorum,omitempty"`
	Degraded      bool       `json:"degraded"`
	DegradedSince time.Time  `json:"degraded_since,omitzero"`
	Timeouts      uint64     `json:"timeouts"`
	Waiting       int        `json:"waiting"`
}

// Status returns the node's status now, once Open has returned and until
// Close.
func (d *Daemon) Status() Status {
	if d.FS == nil || d.repl == nil {
		c := d.Config
		return Status{Node: c.Node, Region: c.Region, Role: RoleReplica, Primary: d.Primary(), Addr: c.AdvertiseAddr(), NotReady: "not open", Peers: peerStatus(c)}
	}
	return d.statusOf(d.FS, d.repl)
}

// statusOf is Status, of the filesystem f and replication r.
func (d *Daemon) statusOf(f *fs.FileSystem, r *replicationNode) Status {
	c := d.Config
	now := time.Now()
	primary := d.Primary()
	st := Status{Node: c.Node, Region: c.Region, Role: RoleReplica, Primary: primary, Addr: c.AdvertiseAddr(),
		MaxLagMS: time.Duration(c.Router.MaxLag).Milliseconds(), Peers: peerStatus(c), Lease: d.leaseStatus(),
		Candidate: c.Lease.Type == LeaseConsul && c.Lease.Candidate, Handoff: d.lastHandoff()}
	names := f.DBs()
	slices.Sort(names)
	logs := make(map[string]*ltx.Log, len(names))
	for _, name := range names {
		if db := f.DB(name); db != nil {
			logs[name] = db.Log()
			p := db.Log().Pos()
			st.Databases = append(st.Databases, DatabaseStatus{Name: name, Pos: p.String(), TXID: uint64(p.TXID), pos: p})
		}
	}
	if epoch := d.epoch.Load(); epoch != 0 {
		st.Role, st.Epoch, st.Ready = RolePrimary, epoch, true
		if f.WriteDeadlinePassed() {
			// Paused or stalled past its lease: it may have lost it, and
			// its mount refuses writes until a renewal or the step-down.
			st.Ready, st.NotReady = false, "the lease ran out before this node could renew it: writes are refused until a renewal succeeds or the node steps down"
		}
		if r.streamer != nil {
			for _, rs := range r.streamer.Replicas() {
				st.Replicas = append(st.Replicas, replicaStatus(rs, logs, now))
			}
			slices.SortFunc(st.Replicas, func(a, b ReplicaStatus) int { return cmp.Compare(a.Node, b.Node) })
		}
		st.Durability = &DurabilityStatus{Mode: c.Replication.Durability}
		if g := r.gateNow(); g != nil {
			gs := g.Status()
			st.Durability.Quorum, st.Durability.Degraded, st.Durability.DegradedSince = gs.Quorum, gs.Degraded, gs.DegradedSince
			st.Durability.Timeouts, st.Durability.Waiting = gs.Timeouts, gs.Waiting
		}
		return st
	}
	cl := r.client()
	if why := d.deposedWhy(); why != "" {
		st.NotReady = why
		return st
	}
	if l := st.Lease; primary == "" && l != nil {
		if l.Since.IsZero() {
			st.NotReady = fmt.Sprintf("no primary: the lease in Consul at %s has not been read yet (see the log)", l.Consul)
		} else {
			st.NotReady = fmt.Sprintf("no primary: the lease in Consul (%s, key %s) names no holder", l.Consul, l.Key)
		}
		return st
	}
	if cl == nil {
		st.NotReady = fmt.Sprintf("not replicating: replication.peers has no addr for the primary %s", primary)
		return st
	}
	cs := cl.Status()
	st.Epoch = cs.Epoch
	st.Stream = &StreamStatus{Connected: cs.Connected, Reconnects: cs.Reconnects, LastHeard: cs.HeartbeatAt}
	for i := range st.Databases {
		db := &st.Databases[i]
		if p, ok := cs.Primary[db.Name]; ok {
			db.Primary = p.String()
		}
		db.LagMS = lagOf(cs, db.Name, now).Milliseconds()
		if a, ok := cs.Applied[db.Name]; ok {
			db.CommittedAt, db.AppliedAt = a.CommittedAt, a.AppliedAt
		}
	}
	st.LagMS = behind(cs, now).Milliseconds()
	maxLag := time.Duration(c.Router.MaxLag)
	switch {
	case !cs.Connected && cs.HeartbeatAt.IsZero():
		st.NotReady = fmt.Sprintf("not connected to the primary %s yet", primary)
	case time.Duration(st.LagMS)*time.Millisecond > maxLag:
		st.NotReady = fmt.Sprintf("%v behind the primary %s, more than router.max_lag %v", time.Duration(st.LagMS)*time.Millisecond, primary, maxLag)
	default:
		st.Ready = true
	}
	return st
}

func peerStatus(c Config) []PeerStatus {
	out := make([]PeerStatus, 0, len(c.Replication.Peers))
	for _, p := range c.Replication.Peers {
		out = append(out, PeerStatus(p))
	}
	return out
}

// replicaStatus is the primary's view of replica rs: its acknowledged
// positions and how long ago the primary committed the oldest transaction
// it has not acknowledged, by the log of each database.
func replicaStatus(rs replication.ReplicaStatus, logs map[string]*ltx.Log, now time.Time) ReplicaStatus {
	out := ReplicaStatus{Node: rs.Node, Region: rs.Region, Connected: rs.Connected}
	names := make([]string, 0, len(logs))
	for name := range logs {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		acked := rs.Acked[name]
		d := ReplicaDatabaseStatus{Name: name, Acked: acked.String(), ackedTXID: acked.TXID}
		if l := logs[name]; l.Pos() != acked {
			d.LagMS = unackedSince(l, acked.TXID, now).Milliseconds()
		}
		out.LagMS = max(out.LagMS, d.LagMS)
		out.Databases = append(out.Databases, d)
	}
	return out
}

// unackedSince returns the time since the primary committed the first
// file of l after txid, 0 if there is none.
func unackedSince(l *ltx.Log, txid ltx.TXID, now time.Time) time.Duration {
	files := l.Files()
	i, _ := slices.BinarySearchFunc(files, txid, func(f ltx.FileInfo, t ltx.TXID) int {
		return cmp.Compare(f.Header.MaxTXID, t)
	})
	for ; i < len(files); i++ {
		if files[i].Header.MaxTXID > txid {
			return max(now.Sub(time.UnixMilli(files[i].Header.Timestamp)), 0)
		}
	}
	return 0
}

// behind is how far behind the primary a replica is: the largest lagOf
// its databases, and, while it is not connected, at least the time since
// it last heard from the primary.
func behind(cs replication.ClientStatus, now time.Time) time.Duration {
	var b time.Duration
	for db := range cs.Primary {
		b = max(b, lagOf(cs, db, now))
	}
	if !cs.Connected && !cs.HeartbeatAt.IsZero() {
		b = max(b, now.Sub(cs.HeartbeatAt))
	}
	return b
}

// lagOf is how far behind the primary a replica's database db is: 0 at
// the primary's last known position, else the time since the commit of
// the last transaction applied (an upper bound, by the primary's clock),
// or since the last heartbeat when it has applied none.
func lagOf(cs replication.ClientStatus, db string, now time.Time) time.Duration {
	hwm, known := cs.Primary[db]
	a, applied := cs.Applied[db]
	switch {
	case !known || applied && a.Pos == hwm:
		return 0
	case applied:
		return max(now.Sub(a.CommittedAt), 0)
	case !cs.HeartbeatAt.IsZero():
		return max(now.Sub(cs.HeartbeatAt), 0)
	}
	return 0
}

// proto renders s for the Status RPC.
func (s Status) proto() *meridianv1.StatusResponse {
	resp := &meridianv1.StatusResponse{Node: s.Node, Region: s.Region, Role: meridianv1.Role_ROLE_REPLICA, Epoch: s.Epoch, Candidate: s.Candidate}
	if s.Role == RolePrimary {
		resp.Role = meridianv1.Role_ROLE_PRIMARY
	}
	if d := s.Durability; d != nil {
		resp.Durability = &meridianv1.Durability{Mode: string(d.Mode), Quorum: d.Quorum, Degraded: d.Degraded, Timeouts: d.Timeouts, Waiting: uint32(d.Waiting)}
		if !d.DegradedSince.IsZero() {
			resp.Durability.DegradedSinceUnixNano = d.DegradedSince.UnixNano()
		}
	}
	for _, db := range s.Databases {
		p := db.pos
		resp.Positions = append(resp.Positions, &meridianv1.DatabasePosition{Db: db.Name, Txid: uint64(p.TXID), PostApplyChecksum: uint64(p.PostApplyChecksum)})
	}
	return resp
}

// Package replication ships every committed transaction from the primary to
// every replica: the primary's Streamer serves each replica's stream from
// the databases' LTX logs, and a replica's Client receives the files,
// verifies them and hands them to a Target that applies them.
//
// The core knows nothing of gRPC: a stream is a Conn (primary side) or a
// ClientConn (replica side), and the frames are the protocol buffer
// messages of proto/meridian/v1, whose file documents the protocol. The
// gRPC transport is package replication/rpc.
package replication

import (
	"errors"
	"time"

	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// Defaults for the tunables of Streamer and Client.
const (
	// DefaultChunkSize is the most file bytes one LTXChunk carries: the
	// protocol's bound, 256 KiB.
	DefaultChunkSize = 256 << 10

	// DefaultHeartbeatInterval is how often the primary sends a heartbeat.
	DefaultHeartbeatInterval = time.Second

	// DefaultMaxFileSize bounds the size of one LTX file a replica accepts,
	// so a damaged LTXBegin cannot make it fill its disk. Snapshots of
	// databases larger than this are refused: raise it for them.
	DefaultMaxFileSize = 64 << 30

	// DefaultMaxInFlightFiles is the most files a replica receives at once
	// on a stream, begun and not yet ended, each of another database; each
	// holds a file descriptor and a goroutine that verifies it.
	DefaultMaxInFlightFiles = 32

	// DefaultMaxInFlightBytes bounds the disk a stream takes on a
	// replica: the sizes of the files in flight and of those received and
	// waiting to be applied add up to no more. As large as the largest
	// file a replica accepts, which then goes alone.
	DefaultMaxInFlightBytes = DefaultMaxFileSize

	// DefaultMaxGroup is the most files a replica applies as one group,
	// and DefaultMaxGroupBytes about the most bytes.
	DefaultMaxGroup      = 256
	DefaultMaxGroupBytes = 64 << 20

	// DefaultSnapshotInterval is the least time between two snapshots of
	// a database for one replica. A replica that asks again sooner (it
	// reconnects without a position, in a loop) waits: each snapshot
	// reads the whole database on the primary.
	DefaultSnapshotInterval = 10 * time.Second

	// DefaultMinBackoff and DefaultMaxBackoff bound the wait before a
	// replica reconnects after a stream ends.
	DefaultMinBackoff = 100 * time.Millisecond
	DefaultMaxBackoff = 5 * time.Second
)

// Errors of the protocol. Compare with errors.Is.
var (
	// ErrProtocol is a frame that breaks the protocol: no Hello first, a
	// chunk outside a file, a size bound broken, bytes that do not add up.
	ErrProtocol = errors.New("replication protocol violation")

	// ErrStaleEpoch is a frame from a lease epoch older than the newest the
	// replica has seen: the sender has been deposed.
	ErrStaleEpoch = errors.New("frame from a stale lease epoch")

	// ErrNotPrimary is returned to a replica that opens a stream to a node
	// that does not hold the write lease.
	ErrNotPrimary = errors.New("not the primary")

	// ErrPermission is a peer that is not allowed to do what it asked: a
	// Hello naming another node than its certificate.
	ErrPermission = errors.New("permission denied")
)

// Conn is one replica's stream as the primary sees it. Send is called from
// one goroutine at a time, Recv from another; both fail once the stream
// ends.
type Conn interface {
	Send(*meridianv1.StreamResponse) error
	Recv() (*meridianv1.StreamRequest, error)
}

// ClientConn is the stream as the replica sees it, with the same rules.
type ClientConn interface {
	Send(*meridianv1.StreamRequest) error
	Recv() (*meridianv1.StreamResponse, error)
}

// SnapshotReason says why the primary sent a database whole (a snapshot)
// instead of continuing from the replica's position, as the Target sees
// it. Its values are the protocol's (meridianv1.SnapshotReason).
type SnapshotReason int32

const (
	// NoSnapshot: the file continues from the replica's position.
	NoSnapshot = SnapshotReason(meridianv1.SnapshotReason_SNAPSHOT_REASON_UNSPECIFIED)
	// SnapshotNoPosition: the replica had no position for the database,
	// which is new to it.
	SnapshotNoPosition = SnapshotReason(meridianv1.SnapshotReason_SNAPSHOT_REASON_NO_POSITION)
	// SnapshotRetention: the replica's position is older than the
	// primary's log retains.
	SnapshotRetention = SnapshotReason(meridianv1.SnapshotReason_SNAPSHOT_REASON_RETENTION)
	// SnapshotAhead and SnapshotChecksumMismatch: the replica's history
	// diverged from the primary's (it is ahead, or has another checksum
	// at its TXID).
	SnapshotAhead            = SnapshotReason(meridianv1.SnapshotReason_SNAPSHOT_REASON_AHEAD)
	SnapshotChecksumMismatch = SnapshotReason(meridianv1.SnapshotReason_SNAPSHOT_REASON_CHECKSUM_MISMATCH)
)

// String returns the protocol's name of r, e.g. SNAPSHOT_REASON_RETENTION.
func (r SnapshotReason) String() string { return meridianv1.SnapshotReason(r).String() }

// KeepsLost reports whether a snapshot for r may replace transactions
// that only the replica has, which the Target must then keep aside before
// applying it: a diverged history, and also a position past retention,
// where the primary cannot tell a replica that is behind from one that
// diverged.
func (r SnapshotReason) KeepsLost() bool { return r != NoSnapshot && r != SnapshotNoPosition }

// pbPos and fromPB convert positions to and from the wire.
func pbPos(db string, p ltx.Pos) *meridianv1.DatabasePosition {
	return &meridianv1.DatabasePosition{Db: db, Txid: uint64(p.TXID), PostApplyChecksum: uint64(p.PostApplyChecksum)}
}

func fromPB(p *meridianv1.DatabasePosition) ltx.Pos {
	return ltx.Pos{TXID: ltx.TXID(p.GetTxid()), PostApplyChecksum: ltx.Checksum(p.GetPostApplyChecksum())}
}

// Package meridian holds the vocabulary shared by every part of the kit:
// replication positions, node identities, roles and the errors callers
// compare against. It has no behaviour of its own.
package meridian

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/superfly/ltx"
)

// Errors shared across packages. Compare with errors.Is.
var (
	// ErrReadOnly is returned for a write to a database on a node that is
	// not the primary.
	ErrReadOnly = errors.New("database is read-only on this node")

	// ErrNoPrimary is returned when no node currently holds the write lease.
	ErrNoPrimary = errors.New("no primary")

	// ErrLeaseLost is returned for a write that was in flight when this node
	// lost the write lease. The write was not acknowledged.
	ErrLeaseLost = errors.New("write lease lost")

	// ErrDatabaseNotFound is returned for a database name the node does not
	// have.
	ErrDatabaseNotFound = errors.New("database not found")

	// ErrClosed is returned by a component used after Close.
	ErrClosed = errors.New("closed")
)

// Pos is the replication position of one database: the ID of the last
// transaction applied and the database checksum after applying it.
//
// Its text form is "%016x/%016x" (TXID/checksum), the form used in the
// `<db>-pos` file, logs, JSON and the command line. Pos converts to and
// from ltx.Pos without cost.
type Pos struct {
	TXID              ltx.TXID
	PostApplyChecksum ltx.Checksum
}

// posTextLen is the length of the text form of a Pos.
const posTextLen = 16 + 1 + 16

// ParsePos parses the text form of a position, "%016x/%016x". Hex digits
// must be lowercase, as written by Pos.String.
func ParsePos(s string) (Pos, error) {
	if len(s) != posTextLen || s[16] != '/' {
		return Pos{}, fmt.Errorf("parse position %q: want 16 hex digits, '/', 16 hex digits", s)
	}
	txid, err := parseHex64(s[:16])
	if err != nil {
		return Pos{}, fmt.Errorf("parse position %q: txid: %w", s, err)
	}
	chksum, err := parseHex64(s[17:])
	if err != nil {
		return Pos{}, fmt.Errorf("parse position %q: checksum: %w", s, err)
	}
	return Pos{TXID: ltx.TXID(txid), PostApplyChecksum: ltx.Checksum(chksum)}, nil
}

// parseHex64 parses exactly 16 lowercase hex digits.
func parseHex64(s string) (uint64, error) {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return 0, fmt.Errorf("invalid character %q at offset %d", c, i)
		}
	}
	return strconv.ParseUint(s, 16, 64)
}

// String returns the text form of p, "%016x/%016x".
func (p Pos) String() string {
	return fmt.Sprintf("%016x/%016x", uint64(p.TXID), uint64(p.PostApplyChecksum))
}

// IsZero reports whether p is the position of a database with no history.
func (p Pos) IsZero() bool { return p == Pos{} }

// MarshalText implements encoding.TextMarshaler.
func (p Pos) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (p *Pos) UnmarshalText(b []byte) error {
	v, err := ParsePos(string(b))
	if err != nil {
		return err
	}
	*p = v
	return nil
}

// Role is what a node does for its databases.
type Role int

const (
	// RoleReplica applies transactions streamed from the primary and serves
	// reads.
	RoleReplica Role = iota
	// RolePrimary holds the write lease: it accepts writes and streams them.
	RolePrimary
)

// String returns "primary" or "replica".
func (r Role) String() string {
	switch r {
	case RolePrimary:
		return "primary"
	case RoleReplica:
		return "replica"
	default:
		return fmt.Sprintf("Role(%d)", int(r))
	}
}

// MarshalText implements encoding.TextMarshaler.
func (r Role) MarshalText() ([]byte, error) {
	if r != RolePrimary && r != RoleReplica {
		return nil, fmt.Errorf("marshal role: unknown role %d", int(r))
	}
	return []byte(r.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (r *Role) UnmarshalText(b []byte) error {
	switch string(b) {
	case "primary":
		*r = RolePrimary
	case "replica":
		*r = RoleReplica
	default:
		return fmt.Errorf("parse role %q: want primary or replica", b)
	}
	return nil
}

// NameRule says how node and region names are written. A node's name is
// also the name in its TLS certificate.
const NameRule = "1-63 lowercase letters, digits and '-', starting with a letter or digit"

// ValidName reports whether s is a valid node or region name (NameRule).
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}

// NodeInfo identifies a node and says how to reach it. It is what the write
// lease names and what `regiond status` prints.
type NodeInfo struct {
	Name            string `json:"name"`             // unique node name, also its certificate name
	Region          string `json:"region"`           // region the node serves, e.g. "iad"
	ReplicationAddr string `json:"replication_addr"` // host:port of the replication gRPC server
	RouterURL       string `json:"router_url"`       // base URL of the node's HTTP router
	AdminURL        string `json:"admin_url"`        // base URL of the node's admin API
}

// String returns "name (region)".
func (n NodeInfo) String() string { return fmt.Sprintf("%s (%s)", n.Name, n.Region) }

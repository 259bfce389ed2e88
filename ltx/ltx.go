// Package ltx keeps the LTX log of one SQLite database: the sequence of LTX
// files, one per committed transaction, that replication streams and that a
// database can be rebuilt from.
//
// The file format is github.com/superfly/ltx (format version 3), used here as
// the codec; this package adds what a log needs on top of it: durable
// appends, the current position, reading from any position for a
// subscriber, retention, compaction that keeps every position servable,
// snapshots, restore, and the per-page checksum table that lets the
// database checksum be updated per transaction instead of rescanned.
//
// A log directory holds files named "%016x-%016x.ltx" (min and max TXID) and,
// for compacted files, a ".pos" sidecar with the checksum after every
// transaction inside the file. Nothing else belongs there; temporary files
// end in ".tmp" and are removed at Open.
package ltx

import (
	"errors"
	"fmt"

	"github.com/superfly/ltx"
)

// Codec types, re-exported so callers need one import.
type (
	TXID     = ltx.TXID
	Checksum = ltx.Checksum
	Pos      = ltx.Pos
	Header   = ltx.Header
)

// ChecksumFlag is set on every valid page and database checksum.
const ChecksumFlag = ltx.ChecksumFlag

// HeaderSize is the size of an LTX file's header, its first bytes.
const HeaderSize = ltx.HeaderSize

// Errors returned by the log. Position errors come wrapped in a *PosError.
var (
	// ErrPosUnknown: the log cannot say whether the position is in its
	// history: it is ahead of the log, or inside a file whose intermediate
	// positions were not recorded (a snapshot). The reader needs a snapshot.
	ErrPosUnknown = errors.New("position unknown to the log")

	// ErrPosTooOld: the position precedes the oldest file the log retains.
	// The reader needs a snapshot.
	ErrPosTooOld = errors.New("position older than the log retains")

	// ErrPosMismatch: the log has the position's TXID with another checksum,
	// so the reader's history diverged from the log's.
	ErrPosMismatch = errors.New("position checksum differs from the log")

	// ErrClosed is returned by a Log or Cursor used after Close.
	ErrClosed = errors.New("ltx log closed")
)

// PosError says why the log cannot serve a reader at Pos.
type PosError struct {
	DB    string // database name
	Pos   Pos    // the position asked for
	First Pos    // the oldest position the log can serve from
	Last  Pos    // the log's current position
	Have  Checksum
	Err   error // ErrPosUnknown, ErrPosTooOld or ErrPosMismatch
}

func (e *PosError) Error() string {
	switch e.Err {
	case ErrPosMismatch:
		return fmt.Sprintf("db %q: position %s: %s (the log has %s at that txid)", e.DB, e.Pos, e.Err, e.Have)
	case ErrPosTooOld:
		return fmt.Sprintf("db %q: position %s: %s (oldest is %s)", e.DB, e.Pos, e.Err, e.First)
	default:
		return fmt.Sprintf("db %q: position %s: %s (log is at %s)", e.DB, e.Pos, e.Err, e.Last)
	}
}

func (e *PosError) Unwrap() error { return e.Err }

// DatabaseMismatchError is returned by Open when the database file does not
// hold the state the log says it should.
type DatabaseMismatchError struct {
	DB       string   // database name
	Path     string   // database file
	Dir      string   // log directory
	Log      Pos      // the log's position
	Checksum Checksum // the database file's checksum
	Pages    uint32   // the database file's size in pages
}

func (e *DatabaseMismatchError) Error() string {
	return fmt.Sprintf("database %q (%s, %d pages) does not match its LTX log %s: "+
		"the database checksum is %s but the log's last transaction %s left %s; "+
		"the database was changed outside regiond or its last transaction was lost. "+
		"Check the log with `regiond ltx verify %s`, then rebuild the database from it with "+
		"`regiond ltx restore -o FILE %s`, or move the log aside to start a new history from the database as it is",
		e.DB, e.Path, e.Pages, e.Dir, e.Checksum, e.Log.TXID, e.Log.PostApplyChecksum, e.Dir, e.Dir)
}

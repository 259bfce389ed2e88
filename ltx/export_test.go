package ltx

// Internals exported for the external tests.
var (
	DecodePositions = decodePositions
	EncodePositions = encodePositions
)

// Waiting returns the number of cursors blocked in Next until the log
// changes, so that a test can commit or close once a cursor waits.
func (l *Log) Waiting() int { return int(l.waiting.Load()) }

// MaintenanceHeld reports whether something holds the log's maintenance
// lock (Prune, a compaction's install, a snapshot's apply), so that a test
// can check that an apply it stopped holds maintenance off.
func (l *Log) MaintenanceHeld() bool {
	if l.maint.TryLock() {
		l.maint.Unlock()
		return false
	}
	return true
}

// Encoder is the log's reusable LTX encoder.
type Encoder = encoder

// Pooled encoders, as the log takes and returns them.
var (
	GetEncoder = getEncoder
	PutEncoder = putEncoder
)

// SkipPages has e go on as though the file had pages up to pgno, so that a
// test reaches the lock page without writing a GiB of pages.
func (e *encoder) SkipPages(pgno uint32) { e.prevPgno = pgno }

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

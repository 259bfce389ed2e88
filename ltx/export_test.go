package ltx

// Internals exported for the external tests.
var (
	DecodePositions = decodePositions
	EncodePositions = encodePositions
)

// Waiting returns the number of cursors blocked in Next until the log
// changes, so that a test can commit or close once a cursor waits.
func (l *Log) Waiting() int { return int(l.waiting.Load()) }

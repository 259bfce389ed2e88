package ltx

// Internals exported for the external tests.
var (
	DecodePositions = decodePositions
	EncodePositions = encodePositions
)

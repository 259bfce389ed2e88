package ltx

import (
	"fmt"
	"strconv"
)

// The text form of a Pos, "%016x/%016x" (TXID/checksum, lowercase hex), is
// Pos.String's. It is the form of the mount's `<db>-pos` files, the logs,
// the admin API's JSON and the command line.

// posTextLen is the length of the text form of a Pos.
const posTextLen = 16 + 1 + 16

// ParsePos parses the text form of a position, "%016x/%016x". Unlike the
// codec's ParsePos it accepts only what Pos.String writes: lowercase hex
// digits and a '/' between them.
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
	return Pos{TXID: TXID(txid), PostApplyChecksum: Checksum(chksum)}, nil
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

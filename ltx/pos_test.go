package ltx_test

import (
	"strings"
	"testing"

	codec "github.com/superfly/ltx"

	"github.com/meridian-db/meridian/ltx"
)

func TestParsePos(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		for _, s := range []string{"00000000000004d2/8a2f000000000001", "0000000000000000/0000000000000000", "ffffffffffffffff/ffffffffffffffff"} {
			p, err := ltx.ParsePos(s)
			if err != nil {
				t.Fatalf("%q: %v", s, err)
			}
			if p.String() != s {
				t.Fatalf("round trip of %q gave %q", s, p.String())
			}
		}
		p, err := ltx.ParsePos("00000000000004d2/8a2f000000000001")
		if err != nil || p != (ltx.Pos{TXID: 0x4d2, PostApplyChecksum: 0x8a2f000000000001}) {
			t.Fatalf("got %v, %v", p, err)
		}
	})
	t.Run("Invalid", func(t *testing.T) {
		for _, s := range []string{
			"",
			"00000000000004d2",
			"00000000000004d2-8a2f000000000001",
			"00000000000004D2/8a2f000000000001", // uppercase
			"+0000000000004d2/8a2f000000000001", // sign
			"00000000000004d2/8a2f00000000001",  // short
			"00000000000004d2/8a2f0000000000011",
			"0x000000000004d2/8a2f000000000001",
			" 0000000000004d2/8a2f000000000001",
		} {
			if p, err := ltx.ParsePos(s); err == nil {
				t.Errorf("%q: parsed as %s, want an error", s, p)
			} else if !strings.Contains(err.Error(), "parse position") {
				t.Errorf("%q: error %q does not say what failed", s, err)
			}
		}
	})
}

func FuzzParsePos(f *testing.F) {
	for _, s := range []string{"00000000000004d2/8a2f000000000001", "0000000000000000/0000000000000000", "ffffffffffffffff/ffffffffffffffff", "", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ltx.ParsePos(s)
		if err != nil {
			return
		}
		// Whatever parses is in canonical form, and the codec agrees.
		if p.String() != s {
			t.Fatalf("%q parsed as %s", s, p)
		}
		if q, err := codec.ParsePos(s); err != nil || q != p {
			t.Fatalf("codec parses %q as %v, %v; we parse %s", s, q, err, p)
		}
	})
}

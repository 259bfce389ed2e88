package meridian_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/superfly/ltx"

	"github.com/meridian-db/meridian"
)

func TestPos_String(t *testing.T) {
	p := meridian.Pos{TXID: 0x4d2, PostApplyChecksum: 0x8a2f000000000001}
	if got, want := p.String(), "00000000000004d2/8a2f000000000001"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	if got := (meridian.Pos{}).String(); got != "0000000000000000/0000000000000000" {
		t.Fatalf("zero position: got %q", got)
	}
	// Same text form as the codec's, and converts to it.
	if got, want := p.String(), ltx.Pos(p).String(); got != want {
		t.Fatalf("codec form %q, ours %q", want, got)
	}
}

func TestParsePos(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		for _, s := range []string{"00000000000004d2/8a2f000000000001", "0000000000000000/0000000000000000", "ffffffffffffffff/ffffffffffffffff"} {
			p, err := meridian.ParsePos(s)
			if err != nil {
				t.Fatalf("%q: %v", s, err)
			}
			if p.String() != s {
				t.Fatalf("round trip of %q gave %q", s, p.String())
			}
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
			if p, err := meridian.ParsePos(s); err == nil {
				t.Errorf("%q: parsed as %s, want an error", s, p)
			} else if !strings.Contains(err.Error(), "parse position") {
				t.Errorf("%q: error %q does not say what failed", s, err)
			}
		}
	})
}

func TestPos_JSON(t *testing.T) {
	in := struct {
		Pos meridian.Pos `json:"pos"`
	}{meridian.Pos{TXID: 7, PostApplyChecksum: 0x8000000000000abc}}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(b), `{"pos":"0000000000000007/8000000000000abc"}`; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
	var out struct {
		Pos meridian.Pos `json:"pos"`
	}
	if err := json.Unmarshal(b, &out); err != nil || out != in {
		t.Fatalf("round trip: got %v, %v", out, err)
	}
	if err := json.Unmarshal([]byte(`{"pos":"7/abc"}`), &out); err == nil {
		t.Fatal("short position unmarshaled without error")
	}
}

func TestRole_Text(t *testing.T) {
	for _, r := range []meridian.Role{meridian.RolePrimary, meridian.RoleReplica} {
		b, err := r.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var got meridian.Role
		if err := got.UnmarshalText(b); err != nil || got != r {
			t.Fatalf("round trip of %s: got %s, %v", r, got, err)
		}
	}
	var r meridian.Role
	if err := r.UnmarshalText([]byte("leader")); err == nil {
		t.Fatal(`"leader" parsed as a role`)
	}
	if _, err := meridian.Role(7).MarshalText(); err == nil {
		t.Fatal("Role(7) marshaled")
	}
}

func FuzzParsePos(f *testing.F) {
	for _, s := range []string{"00000000000004d2/8a2f000000000001", "0000000000000000/0000000000000000", "ffffffffffffffff/ffffffffffffffff", "", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := meridian.ParsePos(s)
		if err != nil {
			return
		}
		// Whatever parses is in canonical form.
		if p.String() != s {
			t.Fatalf("%q parsed as %s", s, p)
		}
		if q, err := ltx.ParsePos(s); err != nil || meridian.Pos(q) != p {
			t.Fatalf("codec parses %q as %v, %v; we parse %s", s, q, err, p)
		}
	})
}

func TestValidName(t *testing.T) {
	for _, tt := range []struct {
		name string
		want bool
	}{
		{"iad-1", true},
		{"a", true},
		{"9", true},
		{"fra-", true},
		{strings.Repeat("a", 63), true},
		{"", false},
		{strings.Repeat("a", 64), false},
		{"-iad", false},
		{"IAD-1", false},
		{"iad_1", false},
		{"us.east", false},
		{"iad 1", false},
		{"ïad", false},
	} {
		if got := meridian.ValidName(tt.name); got != tt.want {
			t.Errorf("ValidName(%q): got %v, want %v", tt.name, got, tt.want)
		}
	}
}

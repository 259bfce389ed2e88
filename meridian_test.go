package meridian_test

import (
	"strings"
	"testing"

	"github.com/meridian-db/meridian"
)

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

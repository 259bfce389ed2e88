package ltx

import "testing"

// TestKeptBytes: the bytes of a file are kept up to maxRecentFile; one
// write past it drops what was kept, and nothing more is kept, so a large
// transaction costs no copy of itself in memory.
func TestKeptBytes(t *testing.T) {
	var k keptBytes
	if n, err := k.Write(make([]byte, maxRecentFile-10)); n != maxRecentFile-10 || err != nil || k.over || k.Len() != maxRecentFile-10 {
		t.Fatalf("write within the bound: %d, %v; over %v, kept %d", n, err, k.over, k.Len())
	}
	if n, err := k.Write(make([]byte, 20)); n != 20 || err != nil || !k.over || k.Len() != 0 || k.Cap() != 0 {
		t.Fatalf("write past the bound: %d, %v; over %v, kept %d (cap %d), want nothing kept", n, err, k.over, k.Len(), k.Cap())
	}
	if n, err := k.Write([]byte{1}); n != 1 || err != nil || k.Len() != 0 {
		t.Fatalf("write after: %d, %v; kept %d", n, err, k.Len())
	}
}

package fs

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/meridian-db/meridian/ltx"
)

// header returns a 100-byte SQLite header: rollback journal (1) or WAL
// (2) file format, change counter 7, version-valid-for vvf.
func header(format byte, vvf uint32) []byte {
	h := make([]byte, sqliteHeaderSize)
	copy(h, "SQLite format 3\x00")
	binary.BigEndian.PutUint16(h[16:], 4096)
	h[18], h[19] = format, format
	binary.BigEndian.PutUint32(h[24:], 7)
	binary.BigEndian.PutUint32(h[28:], 3) // pages
	binary.BigEndian.PutUint32(h[92:], vvf)
	return h
}

func TestServeChangeCounter(t *testing.T) {
	page := append(header(1, 7), bytes.Repeat([]byte{0xab}, 4096-sqliteHeaderSize)...)

	// A whole page 1: the counter and its copy become the TXID's low bits.
	got := bytes.Clone(page)
	serveChangeCounter(bytes.NewReader(page), ltx.TXID(0x1_0000_0042), got, 0)
	if c, v := binary.BigEndian.Uint32(got[24:]), binary.BigEndian.Uint32(got[92:]); c != 0x42 || v != 0x42 {
		t.Fatalf("served counter %#x, version-valid-for %#x; want 0x42, 0x42", c, v)
	}
	want := bytes.Clone(page)
	copy(want[24:28], got[24:28])
	copy(want[92:96], got[92:96])
	if !bytes.Equal(got, want) {
		t.Fatal("bytes other than 24-27 and 92-95 changed")
	}

	// A read of part of the header, as SQLite's 16 bytes at offset 24,
	// is served from the file's header.
	part := bytes.Clone(page[24:40])
	serveChangeCounter(bytes.NewReader(page), 0x42, part, 24)
	if c := binary.BigEndian.Uint32(part); c != 0x42 || !bytes.Equal(part[4:], page[28:40]) {
		t.Fatalf("bytes 24-39 served as %x, want counter 0x42 and the rest as is", part)
	}

	// A page count that is not valid (version-valid-for differs from the
	// counter) stays not valid.
	stale := header(1, 6)
	got = bytes.Clone(stale)
	serveChangeCounter(bytes.NewReader(stale), 0x42, got, 0)
	if c, v := binary.BigEndian.Uint32(got[24:]), binary.BigEndian.Uint32(got[92:]); c != 0x42 || v == c {
		t.Fatalf("served counter %#x, version-valid-for %#x; want 0x42 and another", c, v)
	}

	// WAL mode, past the header, and a file without a header: as is.
	for _, tc := range []struct {
		name string
		file []byte
		data []byte
		off  int64
	}{
		{"wal", header(2, 7), header(2, 7), 0},
		{"past the header", page, page[4096-8:], 4096 - 8},
		{"short file", page[:50], bytes.Clone(page[:50]), 0},
	} {
		got := bytes.Clone(tc.data)
		serveChangeCounter(bytes.NewReader(tc.file), 0x42, got, tc.off)
		if !bytes.Equal(got, tc.data) {
			t.Fatalf("%s: served bytes changed", tc.name)
		}
	}
}

func FuzzServeChangeCounter(f *testing.F) {
	f.Add(header(1, 7), uint64(5), int64(0), 100)
	f.Add(header(1, 6), uint64(1<<40), int64(24), 16)
	f.Add(header(2, 7), uint64(9), int64(90), 10)
	f.Fuzz(func(t *testing.T, file []byte, txid uint64, off int64, n int) {
		if off < 0 || off > int64(len(file)) || n < 0 || off+int64(n) > int64(len(file)) {
			return
		}
		data := bytes.Clone(file[off : off+int64(n)])
		serveChangeCounter(bytes.NewReader(file), ltx.TXID(txid), data, off)
		for i := range data {
			if pos := off + int64(i); data[i] != file[pos] && !(pos >= 24 && pos < 28 || pos >= 92 && pos < 96) {
				t.Fatalf("byte %d changed from %#x to %#x", pos, file[pos], data[i])
			}
		}
	})
}

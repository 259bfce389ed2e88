package fs

import (
	"bytes"
	"encoding/binary"
	"slices"
	"testing"
)

// walImage builds a valid WAL of the given page size: a header and, for
// each transaction, frames of the given pages with the commit mark on the
// last.
func walImage(pageSize uint32, txs [][]uint32) []byte {
	var b bytes.Buffer
	hdr := make([]byte, walHeaderSize)
	binary.BigEndian.PutUint32(hdr[0:], walMagicLE)
	binary.BigEndian.PutUint32(hdr[4:], 3007000)
	binary.BigEndian.PutUint32(hdr[8:], pageSize)
	binary.BigEndian.PutUint32(hdr[16:], 0x1234)
	binary.BigEndian.PutUint32(hdr[20:], 0x5678)
	s1, s2 := walChecksum(false, hdr[:24], 0, 0)
	binary.BigEndian.PutUint32(hdr[24:], s1)
	binary.BigEndian.PutUint32(hdr[28:], s2)
	b.Write(hdr)
	size := uint32(0)
	for _, tx := range txs {
		for i, pgno := range tx {
			fh := make([]byte, walFrameHeaderSize)
			page := bytes.Repeat([]byte{byte(pgno)}, int(pageSize))
			binary.BigEndian.PutUint32(fh[0:], pgno)
			size = max(size, pgno)
			if i == len(tx)-1 {
				binary.BigEndian.PutUint32(fh[4:], size)
			}
			binary.BigEndian.PutUint32(fh[8:], 0x1234)
			binary.BigEndian.PutUint32(fh[12:], 0x5678)
			s1, s2 = walChecksum(false, fh[:8], s1, s2)
			s1, s2 = walChecksum(false, page, s1, s2)
			binary.BigEndian.PutUint32(fh[16:], s1)
			binary.BigEndian.PutUint32(fh[20:], s2)
			b.Write(fh)
			b.Write(page)
		}
	}
	return b.Bytes()
}

func TestReadWAL(t *testing.T) {
	img := walImage(512, [][]uint32{{1, 2}, {3}, {2, 4, 2}})
	h, txs, err := readWAL(bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	if h.pageSize != 512 || len(txs) != 3 {
		t.Fatalf("got page size %d and %d transactions, want 512 and 3", h.pageSize, len(txs))
	}
	if got := txs[2]; got.first != 3 || got.last != 5 || got.commit != 4 || len(got.frames) != 2 || got.frames[2] != h.frameOffset(5) {
		t.Fatalf("got last transaction %+v", got)
	}
	// A torn last transaction is not committed; a flipped bit in a frame
	// ends the WAL there, as in SQLite's recovery.
	if _, txs, _ := readWAL(bytes.NewReader(img[:len(img)-1]), int64(len(img)-1)); len(txs) != 2 {
		t.Fatalf("torn: got %d transactions, want 2", len(txs))
	}
	bad := bytes.Clone(img)
	bad[h.frameOffset(2)+walFrameHeaderSize+7] ^= 1
	if _, txs, _ := readWAL(bytes.NewReader(bad), int64(len(bad))); len(txs) != 1 {
		t.Fatalf("flipped bit in frame 2: got %d transactions, want 1", len(txs))
	}
	// A frame whose salt is not the header's (left by an earlier WAL
	// generation) ends the WAL there too, whatever follows.
	bad = bytes.Clone(img)
	bad[h.frameOffset(3)+8] ^= 1
	if _, txs, _ := readWAL(bytes.NewReader(bad), int64(len(bad))); len(txs) != 2 {
		t.Fatalf("other salt in frame 3: got %d transactions, want 2", len(txs))
	}
}

// TestReadWAL_SectorPadding: copies of a commit frame after it (SQLite's
// padding to a sector boundary with psow=0) are not transactions of their
// own; the next transaction starts after them. isPadding agrees.
func TestReadWAL_SectorPadding(t *testing.T) {
	img := walImage(512, [][]uint32{{1, 2}, {2}, {2}, {3}, {3, 1}})
	h, txs, err := readWAL(bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	var got [][2]int64
	for _, tx := range txs {
		got = append(got, [2]int64{tx.first, tx.last})
	}
	if want := [][2]int64{{0, 1}, {4, 4}, {5, 6}}; !slices.Equal(got, want) {
		t.Fatalf("transactions (first, last frame): got %v, want %v", got, want)
	}
	for i, want := range []bool{false, false, true, true, false, false, false} {
		if i == 0 {
			continue
		}
		if pad, err := isPadding(bytes.NewReader(img), h, int64(i)); err != nil || pad != want {
			t.Errorf("isPadding(frame %d): got %v, %v, want %v", i, pad, err, want)
		}
	}
}

// FuzzReadWAL: any bytes as a WAL give a consistent result and no panic:
// transactions in order, inside the file, each ending at a commit frame.
func FuzzReadWAL(f *testing.F) {
	f.Add(walImage(512, [][]uint32{{1, 2}, {3}}))
	f.Add(walImage(1024, [][]uint32{{1}}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, txs, err := readWAL(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		next := int64(0)
		for _, tx := range txs {
			if tx.first != next || tx.last < tx.first || tx.commit == 0 || len(tx.frames) == 0 {
				t.Fatalf("bad transaction %+v after frame %d", tx, next)
			}
			if h.frameOffset(tx.last+1) > int64(len(b)) {
				t.Fatalf("transaction %+v ends past the file (%d bytes)", tx, len(b))
			}
			next = tx.last + 1
		}
	})
}

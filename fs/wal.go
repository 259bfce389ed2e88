package fs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// SQLite's WAL format (https://www.sqlite.org/fileformat2.html#walformat):
// a 32-byte header, then frames of a 24-byte header and one page.
const (
	walHeaderSize      = 32
	walFrameHeaderSize = 24
	walMagicLE         = 0x377f0682 // checksums over little-endian words
	walMagicBE         = 0x377f0683 // checksums over big-endian words
)

// walHeader is the header of a WAL file.
type walHeader struct {
	bigEndian    bool // byte order of the checksum words
	pageSize     uint32
	seq          uint32 // checkpoint sequence
	salt1, salt2 uint32
	sum1, sum2   uint32
}

// parseWALHeader decodes the first 32 bytes of a WAL file, checking its
// magic, page size and checksum.
func parseWALHeader(b []byte) (walHeader, error) {
	if len(b) < walHeaderSize {
		return walHeader{}, fmt.Errorf("WAL header is %d bytes, want %d", len(b), walHeaderSize)
	}
	var h walHeader
	switch magic := binary.BigEndian.Uint32(b[0:]); magic {
	case walMagicLE:
	case walMagicBE:
		h.bigEndian = true
	default:
		return walHeader{}, fmt.Errorf("not a WAL header: magic %#x", magic)
	}
	h.pageSize = binary.BigEndian.Uint32(b[8:])
	if h.pageSize == 1 {
		h.pageSize = 65536
	}
	if h.pageSize < 512 || h.pageSize > 65536 || h.pageSize&(h.pageSize-1) != 0 {
		return walHeader{}, fmt.Errorf("WAL header: invalid page size %d", h.pageSize)
	}
	h.seq = binary.BigEndian.Uint32(b[12:])
	h.salt1 = binary.BigEndian.Uint32(b[16:])
	h.salt2 = binary.BigEndian.Uint32(b[20:])
	h.sum1 = binary.BigEndian.Uint32(b[24:])
	h.sum2 = binary.BigEndian.Uint32(b[28:])
	if s1, s2 := walChecksum(h.bigEndian, b[:24], 0, 0); s1 != h.sum1 || s2 != h.sum2 {
		return walHeader{}, errors.New("WAL header: checksum mismatch")
	}
	return h, nil
}

// frameSize is the size of one frame of a WAL with this header.
func (h walHeader) frameSize() int64 { return walFrameHeaderSize + int64(h.pageSize) }

// frameOffset is the file offset of frame i (0-based).
func (h walHeader) frameOffset(i int64) int64 { return walHeaderSize + i*h.frameSize() }

// walFrameHeader is the header of one WAL frame.
type walFrameHeader struct {
	pgno         uint32
	commit       uint32 // database size in pages after a commit frame; 0 otherwise
	salt1, salt2 uint32
	sum1, sum2   uint32
}

func parseWALFrameHeader(b []byte) walFrameHeader {
	return walFrameHeader{
		pgno:   binary.BigEndian.Uint32(b[0:]),
		commit: binary.BigEndian.Uint32(b[4:]),
		salt1:  binary.BigEndian.Uint32(b[8:]),
		salt2:  binary.BigEndian.Uint32(b[12:]),
		sum1:   binary.BigEndian.Uint32(b[16:]),
		sum2:   binary.BigEndian.Uint32(b[20:]),
	}
}

// walChecksum is SQLite's WAL checksum of b (a multiple of 8 bytes),
// continuing from s1, s2.
func walChecksum(bigEndian bool, b []byte, s1, s2 uint32) (uint32, uint32) {
	order := binary.ByteOrder(binary.LittleEndian)
	if bigEndian {
		order = binary.BigEndian
	}
	for i := 0; i+8 <= len(b); i += 8 {
		s1 += order.Uint32(b[i:]) + s2
		s2 += order.Uint32(b[i+4:]) + s1
	}
	return s1, s2
}

// readFrame reads frame i of the WAL in r into frame (frameSize bytes) and
// checks it as SQLite's recovery does: its salts match the header and its
// checksum continues the chain s1, s2, which it then advances. ok is false
// at the first frame that is not valid, or not whole in r.
func (h walHeader) readFrame(r io.ReaderAt, i int64, frame []byte, s1, s2 *uint32) (fh walFrameHeader, ok bool, err error) {
	if n, err := r.ReadAt(frame, h.frameOffset(i)); n < len(frame) {
		if err != nil && err != io.EOF {
			return fh, false, fmt.Errorf("read WAL frame %d: %w", i, err)
		}
		return fh, false, nil
	}
	fh = parseWALFrameHeader(frame)
	if fh.salt1 != h.salt1 || fh.salt2 != h.salt2 || fh.pgno == 0 {
		return fh, false, nil
	}
	c1, c2 := walChecksum(h.bigEndian, frame[:8], *s1, *s2)
	c1, c2 = walChecksum(h.bigEndian, frame[walFrameHeaderSize:], c1, c2)
	if c1 != fh.sum1 || c2 != fh.sum2 {
		return fh, false, nil
	}
	*s1, *s2 = c1, c2
	return fh, true, nil
}

// walTx is one committed transaction found in a WAL.
type walTx struct {
	first, last int64            // frame indexes, inclusive
	commit      uint32           // database size in pages after it
	frames      map[uint32]int64 // page number → offset of its last frame in the tx
}

// readWAL reads the WAL in r of the given size as SQLite's recovery does:
// frames are valid while their salts match the header and their checksums
// chain from it; transactions end at valid commit frames. It returns the
// header and the committed transactions in order. A missing, short or
// invalid header means no transactions.
func readWAL(r io.ReaderAt, size int64) (walHeader, []walTx, error) {
	hb := make([]byte, walHeaderSize)
	if size < walHeaderSize {
		return walHeader{}, nil, nil
	}
	if _, err := r.ReadAt(hb, 0); err != nil {
		return walHeader{}, nil, fmt.Errorf("read WAL header: %w", err)
	}
	h, err := parseWALHeader(hb)
	if err != nil {
		return walHeader{}, nil, nil // SQLite ignores a WAL without a valid header
	}
	var txs []walTx
	s1, s2 := h.sum1, h.sum2
	frame := make([]byte, h.frameSize())
	prev := make([]byte, h.frameSize()) // the last commit frame
	cur := walTx{first: 0, frames: map[uint32]int64{}}
	for i := int64(0); h.frameOffset(i+1) <= size; i++ {
		fh, ok, err := h.readFrame(r, i, frame, &s1, &s2)
		if err != nil {
			return h, nil, err
		} else if !ok {
			break
		}
		cur.frames[fh.pgno] = h.frameOffset(i)
		if fh.commit != 0 {
			if i == cur.first && i > 0 && bytes.Equal(frame[:8], prev[:8]) && bytes.Equal(frame[walFrameHeaderSize:], prev[walFrameHeaderSize:]) {
				// Padding after the previous commit (see isPadding).
				cur = walTx{first: i + 1, frames: map[uint32]int64{}}
				continue
			}
			cur.last, cur.commit = i, fh.commit
			txs = append(txs, cur)
			cur = walTx{first: i + 1, frames: map[uint32]int64{}}
			copy(prev, frame)
		}
	}
	return h, txs, nil
}

// isPadding reports whether frame i of the WAL in r, a commit frame alone
// in its transaction, repeats the commit frame before it: page number,
// database size and page bytes. With powersafe overwrite off (psow=0) and
// synchronous=FULL, SQLite pads each commit to a sector boundary with such
// copies, each a valid commit frame; they belong to the transaction before
// them, and SQLite counts them in mxFrame. A real transaction that wrote
// exactly the page its predecessor committed, byte for byte, changed
// nothing: dropping it loses nothing either.
func isPadding(r io.ReaderAt, h walHeader, i int64) (bool, error) {
	b := make([]byte, 2*h.frameSize())
	if _, err := r.ReadAt(b, h.frameOffset(i-1)); err != nil {
		return false, fmt.Errorf("read WAL frames %d-%d: %w", i-1, i, err)
	}
	prev, cur := b[:h.frameSize()], b[h.frameSize():]
	return binary.BigEndian.Uint32(prev[4:]) != 0 &&
		bytes.Equal(prev[:8], cur[:8]) && bytes.Equal(prev[walFrameHeaderSize:], cur[walFrameHeaderSize:]), nil
}

package ltx

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc64"
	"os"
)

// A position sidecar ("%016x-%016x.pos") sits beside a compacted LTX file and
// records the database checksum after every transaction inside it, so that a
// reader positioned inside the file can still be served (see Cursor). A
// checksum of zero means that position is unknown (it was inside a snapshot).
//
// Layout, big-endian:
//
//	magic "LTXP" | version uint32 (1) | min TXID uint64 | max TXID uint64 |
//	(max-min+1) checksums uint64 | CRC-64/ISO of everything before, uint64
const (
	posMagic      = "LTXP"
	posVersion    = 1
	posHeaderSize = 4 + 4 + 8 + 8
)

var crc64Table = crc64.MakeTable(crc64.ISO)

// encodePositions returns the sidecar bytes for the checksums after TXIDs
// min, min+1, ..., min+len(sums)-1.
func encodePositions(min TXID, sums []Checksum) []byte {
	b := make([]byte, 0, posHeaderSize+8*len(sums)+8)
	b = append(b, posMagic...)
	b = binary.BigEndian.AppendUint32(b, posVersion)
	b = binary.BigEndian.AppendUint64(b, uint64(min))
	b = binary.BigEndian.AppendUint64(b, uint64(min)+uint64(len(sums))-1)
	for _, s := range sums {
		b = binary.BigEndian.AppendUint64(b, uint64(s))
	}
	return binary.BigEndian.AppendUint64(b, crc64.Checksum(b, crc64Table))
}

// decodePositions parses sidecar bytes and returns the TXID range and the
// checksum after each TXID in it.
func decodePositions(b []byte) (min, max TXID, sums []Checksum, err error) {
	if len(b) < posHeaderSize+8+8 {
		return 0, 0, nil, fmt.Errorf("%d bytes is too short", len(b))
	}
	if !bytes.Equal(b[:4], []byte(posMagic)) {
		return 0, 0, nil, fmt.Errorf("bad magic %q", b[:4])
	}
	if v := binary.BigEndian.Uint32(b[4:8]); v != posVersion {
		return 0, 0, nil, fmt.Errorf("unsupported version %d", v)
	}
	body, tail := b[:len(b)-8], b[len(b)-8:]
	if got, want := crc64.Checksum(body, crc64Table), binary.BigEndian.Uint64(tail); got != want {
		return 0, 0, nil, fmt.Errorf("checksum mismatch: computed %016x, stored %016x", got, want)
	}
	min, max = TXID(binary.BigEndian.Uint64(b[8:16])), TXID(binary.BigEndian.Uint64(b[16:24]))
	n := (len(body) - posHeaderSize) / 8
	if min == 0 || max < min || (len(body)-posHeaderSize)%8 != 0 || uint64(max-min) != uint64(n-1) {
		return 0, 0, nil, fmt.Errorf("txid range %d-%d does not match %d checksums", min, max, n)
	}
	sums = make([]Checksum, n)
	for i := range sums {
		s := Checksum(binary.BigEndian.Uint64(body[posHeaderSize+8*i:]))
		if s != 0 && s&ChecksumFlag == 0 {
			return 0, 0, nil, fmt.Errorf("invalid checksum %s for txid %s", s, min+TXID(i))
		}
		sums[i] = s
	}
	return min, max, sums, nil
}

// readPositions reads the sidecar at path and checks it describes info.
func readPositions(path string, info *FileInfo) ([]Checksum, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	min, max, sums, err := decodePositions(b)
	if err != nil {
		return nil, fmt.Errorf("%w: position sidecar %s: %v", ErrCorrupt, path, err)
	}
	if min != info.Header.MinTXID || max != info.Header.MaxTXID || sums[len(sums)-1] != info.PostApplyChecksum {
		return nil, fmt.Errorf("%w: position sidecar %s describes %s-%s ending at %s, not %s",
			ErrCorrupt, path, min, max, sums[len(sums)-1], info)
	}
	return sums, nil
}

package ltx

import (
	"encoding/binary"
	"errors"
	"hash"
	"hash/crc64"
	"os"

	"golang.org/x/sys/unix"
)

// An LTX file's own file checksum covers its header, page numbers,
// uncompressed page data, index and trailer, but not the LZ4-compressed bytes
// as stored: LZ4 can encode the same page in more than one way, so some
// changes to the compressed bytes (a match offset inside a run of zeros, say)
// decode to identical pages and pass the codec's checks. To catch every
// change to a file once written, the log seals each file with a CRC-64/ISO of
// its raw bytes, kept in an extended attribute beside the data, and checks
// it whenever it reads the file.
//
// A file copied without its extended attributes (cp without -a, git) has no
// seal: it is verified with the codec's checks alone, and sealed when a log
// opens it. On a filesystem without user extended attributes no file is
// sealed.
const sealAttr = "user.meridian.crc64"

// newSealHash returns the hash that seals files.
func newSealHash() hash.Hash64 { return crc64.New(crc64Table) }

// sealValue turns a seal hash into the stored value; never 0.
func sealValue(h hash.Hash64) Checksum { return ChecksumFlag | Checksum(h.Sum64()) }

// writeSeal stores seal on the open file f. A filesystem without extended
// attributes is not an error: the file is left unsealed.
func writeSeal(f *os.File, seal Checksum) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(seal))
	err := unix.Fsetxattr(int(f.Fd()), sealAttr, b[:], 0)
	if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP) {
		return nil
	}
	return err
}

// readSeal returns the seal of the open file f, or 0 if it has none.
func readSeal(f *os.File) (Checksum, error) {
	var b [8]byte
	n, err := unix.Fgetxattr(int(f.Fd()), sealAttr, b[:])
	switch {
	case errors.Is(err, unix.ENODATA) || errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP):
		return 0, nil
	case errors.Is(err, unix.ERANGE):
		return 0, errors.New("seal attribute is longer than 8 bytes")
	case err != nil:
		return 0, err
	case n != len(b):
		return 0, errors.New("seal attribute is shorter than 8 bytes")
	}
	return Checksum(binary.BigEndian.Uint64(b[:])), nil
}

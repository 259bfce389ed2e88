package ltx

import (
	"encoding/binary"
	"fmt"
	"hash/crc64"
	"io"
	"sync"

	"github.com/pierrec/lz4/v4"
	"github.com/superfly/ltx"
)

// encoder writes an LTX file byte for byte as the codec's ltx.Encoder does,
// for what the log needs of it: a header, pages in ascending order, the
// post-apply checksum, Close. Unlike the codec's it can be Reset and used
// again, so the LZ4 hash table it holds (about 136 KiB), its compression
// buffer and its page index are not allocated and zeroed once per file: the
// log writes one file per committed transaction. It never spills the page
// index to disk; the log never asked the codec to.
//
// Errors are those of the codec: the same sentinels, the same messages,
// save that a frame's page header and size field are one write here, two
// there. After a write fails the encoder is aborted, as the codec's is. An
// encoder is used by one goroutine at a time.
type encoder struct {
	w     io.Writer
	state encoderState

	header   ltx.Header
	trailer  ltx.Trailer
	lockPgno uint32
	prevPgno uint32
	crc      uint64 // CRC-64/ISO of what the file checksum covers so far
	n        int64  // bytes written

	// index holds one page index record per page written, already in the
	// form Close writes: uvarint page number, frame offset, frame size.
	index []byte

	compressor  lz4.Compressor // clears its own table for every block
	compressBuf []byte
	scratch     [ltx.HeaderSize]byte
}

// encoderState is where an encoder is in a file.
type encoderState uint8

const (
	encodeHeader  encoderState = iota // next is EncodeHeader
	encodePage                        // next is EncodePage or Close
	encodeClosed                      // Close succeeded
	encodeAborted                     // a write or Close failed
)

// String names the state as the codec's errors do.
func (s encoderState) String() string {
	switch s {
	case encodeHeader:
		return "header"
	case encodePage:
		return "page"
	case encodeClosed:
		return "closed"
	default:
		return "aborted"
	}
}

// maxPooledIndex is the largest page index, in bytes, that putEncoder keeps
// for the next file: about 7,000 pages. A snapshot's index can run to
// hundreds of MiB; the pool is not to hold on to one.
const maxPooledIndex = 64 << 10

// encoderPool holds encoders between files.
var encoderPool = sync.Pool{New: func() any { return new(encoder) }}

// getEncoder returns an encoder, reset to write a new file to w. Give it
// back with putEncoder once its Header, Trailer and N have been read.
func getEncoder(w io.Writer) *encoder {
	e := encoderPool.Get().(*encoder)
	e.Reset(w)
	return e
}

// putEncoder returns e to the pool. The caller must not use it after.
func putEncoder(e *encoder) {
	e.Reset(nil)
	if cap(e.index) > maxPooledIndex {
		e.index = nil
	}
	encoderPool.Put(e)
}

// Reset discards the file e was writing and readies it to write a new one
// to w, keeping what it has allocated.
func (e *encoder) Reset(w io.Writer) {
	e.w, e.state = w, encodeHeader
	e.header, e.trailer = ltx.Header{}, ltx.Trailer{}
	e.lockPgno, e.prevPgno = 0, 0
	e.crc, e.n = 0, 0
	e.index = e.index[:0]
}

// N returns the number of bytes written.
func (e *encoder) N() int64 { return e.n }

// Header returns the header written.
func (e *encoder) Header() ltx.Header { return e.header }

// Trailer returns the trailer; its file checksum is set by Close.
func (e *encoder) Trailer() ltx.Trailer { return e.trailer }

// SetPostApplyChecksum sets the checksum of the database once the file is
// applied. Call it before Close.
func (e *encoder) SetPostApplyChecksum(chksum ltx.Checksum) {
	e.trailer.PostApplyChecksum = chksum
}

// checkState returns the codec's error for a call that needs state want.
func (e *encoder) checkState(want encoderState, what string) error {
	switch e.state {
	case want:
		return nil
	case encodeClosed:
		return ltx.ErrEncoderClosed
	case encodeAborted:
		return ltx.ErrEncoderAborted
	}
	return fmt.Errorf("cannot encode %s, expected %s", what, e.state)
}

// EncodeHeader validates and writes hdr.
func (e *encoder) EncodeHeader(hdr ltx.Header) error {
	if err := e.checkState(encodeHeader, "header frame"); err != nil {
		return err
	} else if err := hdr.Validate(); err != nil {
		return err
	}
	e.header, e.lockPgno = hdr, ltx.LockPgno(hdr.PageSize)
	if bound := lz4.CompressBlockBound(int(hdr.PageSize)); cap(e.compressBuf) < bound {
		e.compressBuf = make([]byte, bound)
	}
	if err := e.write(putHeader(e.scratch[:], &hdr)); err != nil {
		return e.abort(fmt.Errorf("write header: %w", err))
	}
	e.state = encodePage
	return nil
}

// putHeader encodes hdr into b, which is ltx.HeaderSize long, as the codec
// does, and returns b.
func putHeader(b []byte, hdr *ltx.Header) []byte {
	b = b[:ltx.HeaderSize]
	clear(b)
	copy(b[0:4], ltx.Magic)
	binary.BigEndian.PutUint32(b[4:], hdr.Flags)
	binary.BigEndian.PutUint32(b[8:], hdr.PageSize)
	binary.BigEndian.PutUint32(b[12:], hdr.Commit)
	binary.BigEndian.PutUint64(b[16:], uint64(hdr.MinTXID))
	binary.BigEndian.PutUint64(b[24:], uint64(hdr.MaxTXID))
	binary.BigEndian.PutUint64(b[32:], uint64(hdr.Timestamp))
	binary.BigEndian.PutUint64(b[40:], uint64(hdr.PreApplyChecksum))
	binary.BigEndian.PutUint64(b[48:], uint64(hdr.WALOffset))
	binary.BigEndian.PutUint64(b[56:], uint64(hdr.WALSize))
	binary.BigEndian.PutUint32(b[64:], hdr.WALSalt1)
	binary.BigEndian.PutUint32(b[68:], hdr.WALSalt2)
	binary.BigEndian.PutUint64(b[72:], hdr.NodeID)
	return b
}

// EncodePage compresses data and writes it as the frame of page hdr.Pgno.
func (e *encoder) EncodePage(hdr ltx.PageHeader, data []byte) error {
	if err := e.checkPage(hdr, data); err != nil {
		return err
	}
	n, err := e.compressor.CompressBlock(data, e.compressBuf[:lz4.CompressBlockBound(len(data))])
	if err != nil {
		return fmt.Errorf("compress page data: %w", err)
	} else if n == 0 {
		return fmt.Errorf("lz4 block compression failed")
	}
	offset := e.n

	// Page header with the size flag, then the compressed size. The file
	// checksum covers the page uncompressed.
	b := e.scratch[:ltx.PageHeaderSize+4]
	binary.BigEndian.PutUint32(b[0:], hdr.Pgno)
	binary.BigEndian.PutUint16(b[4:], hdr.Flags|ltx.PageHeaderFlagSize)
	binary.BigEndian.PutUint32(b[ltx.PageHeaderSize:], uint32(n))
	if err := e.write(b); err != nil {
		return e.abort(fmt.Errorf("write page header: %w", err))
	}
	if m, err := e.w.Write(e.compressBuf[:n]); err != nil {
		return e.abort(fmt.Errorf("write page data: %w", err))
	} else if m < n {
		return e.abort(fmt.Errorf("write page data: %w", io.ErrShortWrite))
	}
	e.crc = crc64.Update(e.crc, crc64Table, data)
	e.n += int64(n)

	e.prevPgno = hdr.Pgno
	e.index = binary.AppendUvarint(e.index, uint64(hdr.Pgno))
	e.index = binary.AppendUvarint(e.index, uint64(offset))
	e.index = binary.AppendUvarint(e.index, uint64(e.n-offset))
	return nil
}

// checkPage returns the codec's error if page hdr with data cannot come
// next in the file.
func (e *encoder) checkPage(hdr ltx.PageHeader, data []byte) error {
	if err := e.checkState(encodePage, "page header"); err != nil {
		return err
	} else if hdr.Pgno > e.header.Commit {
		return fmt.Errorf("page number %d out-of-bounds for commit size %d", hdr.Pgno, e.header.Commit)
	} else if err := hdr.Validate(); err != nil {
		return err
	} else if uint32(len(data)) != e.header.PageSize {
		return fmt.Errorf("invalid page buffer size: %d, expecting %d", len(data), e.header.PageSize)
	} else if hdr.Pgno == e.lockPgno {
		return fmt.Errorf("cannot encode lock page: pgno=%d", hdr.Pgno)
	}

	// A snapshot has every page from 1 to its commit but the lock page;
	// other files have any pages, ascending.
	prev := e.prevPgno
	switch {
	case !e.header.IsSnapshot():
		if prev >= hdr.Pgno {
			return fmt.Errorf("out-of-order page numbers: %d,%d", prev, hdr.Pgno)
		}
	case prev == 0 && hdr.Pgno != 1:
		return fmt.Errorf("snapshot transaction file must start with page number 1")
	case prev == e.lockPgno-1:
		if hdr.Pgno != prev+2 {
			return fmt.Errorf("nonsequential page numbers in snapshot transaction (skip lock page): %d,%d", prev, hdr.Pgno)
		}
	case prev != 0 && hdr.Pgno != prev+1:
		return fmt.Errorf("nonsequential page numbers in snapshot transaction: %d,%d", prev, hdr.Pgno)
	}
	return nil
}

// Close writes the end-of-pages marker, the page index and the trailer
// with the file checksum. Closing a closed encoder does nothing.
func (e *encoder) Close() error {
	switch e.state {
	case encodeClosed:
		return nil
	case encodeAborted:
		return ltx.ErrEncoderAborted
	case encodeHeader:
		return fmt.Errorf("cannot close, expected %s", e.state)
	}
	// Checked before anything is written, where the codec checks after:
	// either way the file is not finished.
	check := e.trailer
	check.FileChecksum = ltx.ChecksumFlag
	if err := check.Validate(e.header); err != nil {
		return e.abort(fmt.Errorf("validate trailer: %w", err))
	} else if e.header.Commit == 0 && e.trailer.PostApplyChecksum != ltx.ChecksumFlag {
		return e.abort(fmt.Errorf("post-apply checksum must be empty for zero-length database"))
	}

	marker := e.scratch[:ltx.PageHeaderSize]
	clear(marker)
	if err := e.write(marker); err != nil {
		return e.abort(fmt.Errorf("write empty page header: %w", err))
	}
	// The index: its records, a zero page number, then its size.
	e.index = binary.AppendUvarint(e.index, 0)
	e.index = binary.BigEndian.AppendUint64(e.index, uint64(len(e.index)))
	if err := e.write(e.index); err != nil {
		return e.abort(fmt.Errorf("write page index: %w", err))
	}

	b := binary.BigEndian.AppendUint64(e.scratch[:0], uint64(e.trailer.PostApplyChecksum))
	e.crc = crc64.Update(e.crc, crc64Table, b)
	e.trailer.FileChecksum = ltx.ChecksumFlag | ltx.Checksum(e.crc)
	b = binary.BigEndian.AppendUint64(b, uint64(e.trailer.FileChecksum))
	if n, err := e.w.Write(b); err != nil {
		return e.abort(fmt.Errorf("write trailer: %w", err))
	} else if n < len(b) {
		return e.abort(fmt.Errorf("write trailer: %w", io.ErrShortWrite))
	}
	e.n += int64(len(b))
	e.state = encodeClosed
	return nil
}

// write writes b and adds what was written to the file checksum.
func (e *encoder) write(b []byte) error {
	n, err := e.w.Write(b)
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	e.crc = crc64.Update(e.crc, crc64Table, b[:n])
	e.n += int64(n)
	return err
}

// abort marks e unusable for the rest of the file and returns err.
func (e *encoder) abort(err error) error {
	e.state = encodeAborted
	return err
}

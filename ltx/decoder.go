package ltx

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"sync"

	"github.com/pierrec/lz4/v4"
	"github.com/superfly/ltx"
)

// Decoder is the codec's decoder with one guard added: it refuses a page
// frame whose compressed size is more than LZ4 can produce for a page, before
// the codec reads it. The codec allocates a frame's stated size up front, so
// in a damaged or hostile file a single size field could otherwise ask for
// up to 4 GiB. Use it for every LTX file read from outside the process.
type Decoder struct {
	*ltx.Decoder
	peek   *bufio.Reader // positioned where the codec reads next
	pooled bool          // peek is from readerPool
	done   bool          // the end-of-pages marker has been read
}

// NewDecoder returns a Decoder reading from r. Release gives back its read
// buffer once it is done with.
func NewDecoder(r io.Reader) *Decoder {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = getReader(r)
	}
	return &Decoder{Decoder: ltx.NewDecoder(br), peek: br, pooled: !ok}
}

// Release returns the decoder's read buffer, if it made one, for another
// to use. The decoder must not be used after.
func (d *Decoder) Release() {
	if d.pooled {
		putReader(d.peek)
		d.pooled, d.peek = false, nil
	}
}

// readerPool holds read buffers for LTX files: one per file read would be
// 64 KiB of garbage per transaction a replica applies, several times over.
var readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, readBufferSize) }}

// getReader returns a pooled buffered reader of r.
func getReader(r io.Reader) *bufio.Reader {
	br := readerPool.Get().(*bufio.Reader)
	br.Reset(r)
	return br
}

// putReader returns br to the pool.
func putReader(br *bufio.Reader) {
	br.Reset(nil)
	readerPool.Put(br)
}

// DecodePage reads the next page frame into hdr and data; see the codec.
func (d *Decoder) DecodePage(hdr *ltx.PageHeader, data []byte) error {
	if !d.done {
		if err := d.checkFrame(d.Header().PageSize); err != nil {
			return err
		}
	}
	err := d.Decoder.DecodePage(hdr, data)
	if err == io.EOF && hdr.IsZero() {
		d.done = true
	}
	return err
}

// checkFrame looks at the next page frame's header and size field without
// consuming them. A short read is left for the codec to report.
func (d *Decoder) checkFrame(pageSize uint32) error {
	b, err := d.peek.Peek(ltx.PageHeaderSize + 4)
	if err != nil {
		return nil
	}
	var ph ltx.PageHeader
	if err := ph.UnmarshalBinary(b); err != nil || ph.IsZero() || ph.Flags&ltx.PageHeaderFlagSize == 0 {
		return nil
	}
	if size, bound := binary.BigEndian.Uint32(b[ltx.PageHeaderSize:]), lz4.CompressBlockBound(int(pageSize)); uint64(size) > uint64(bound) {
		return fmt.Errorf("page %d: compressed size %d is more than a %d-byte page can need (%d)", ph.Pgno, size, pageSize, bound)
	}
	return nil
}

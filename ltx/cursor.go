package ltx

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/superfly/ltx"
)

// Cursor reads the log for one subscriber, a file at a time, starting from
// any position the log can serve. It is not safe for concurrent use.
type Cursor struct {
	log *Log
	pos Pos
}

// Cursor returns a cursor positioned at pos, or a *PosError saying why the
// log cannot serve a reader there: ErrPosTooOld (pruned), ErrPosMismatch
// (the log has another checksum at that TXID) or ErrPosUnknown (ahead of
// the log, or inside a snapshot). The zero position is served from the
// start if the log still starts with a snapshot.
func (l *Log) Cursor(pos Pos) (*Cursor, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if err := l.checkOpen(); err != nil {
		return nil, err
	}
	if _, err := l.locate(pos); err != nil {
		return nil, err
	}
	return &Cursor{log: l, pos: pos}, nil
}

// Contains reports whether pos is a position of the log's history that it
// can tell: its current position, or one a cursor could start from. A
// position of another history of the same name (a database deleted and
// created again) is not, whether its TXID is behind or ahead.
func (l *Log) Contains(pos Pos) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.checkOpen() != nil {
		return false
	}
	_, err := l.locate(pos)
	return err == nil
}

// Pos returns the position the cursor has reached: the position after the
// last file Next returned.
func (c *Cursor) Pos() Pos { return c.pos }

// Next waits until the log holds a transaction after the cursor's position
// and returns the LTX file that takes a database from that position to the
// end of the next file in the log. The cursor advances to that file's
// position. The caller must read the Reader to io.EOF, which verifies it,
// and close it.
//
// Next returns a *PosError if the position stopped being servable while the
// cursor waited (pruned), ErrClosed when the log closes, or ctx.Err().
func (c *Cursor) Next(ctx context.Context) (*Reader, error) {
	for {
		l := c.log
		l.mu.RLock()
		if err := l.checkOpen(); err != nil {
			l.mu.RUnlock()
			return nil, err
		}
		i, err := l.locate(c.pos)
		if err != nil {
			l.mu.RUnlock()
			return nil, err
		}
		if i < len(l.files) {
			f := l.files[i]
			if b := f.recent; b != nil && f.info.PreApplyPos() == c.pos {
				l.mu.RUnlock()
				c.pos = f.info.Pos()
				return &Reader{Info: f.info, r: bytes.NewReader(b), f: io.NopCloser(nil)}, nil
			}
			// Open under the lock: once open, pruning or compaction cannot
			// take the bytes away.
			fh, err := l.open(f)
			l.mu.RUnlock()
			if err != nil {
				return nil, fmt.Errorf("open %s: %w", f.info.Name, err)
			}
			r, err := newReader(fh, f.info, c.pos, l.Dir)
			if err != nil {
				return nil, err
			}
			c.pos = f.info.Pos()
			return r, nil
		}
		changed := l.changed
		l.waiting.Add(1)
		l.mu.RUnlock()

		select {
		case <-ctx.Done():
			l.waiting.Add(-1)
			return nil, ctx.Err()
		case <-changed:
			l.waiting.Add(-1)
		}
	}
}

// locate returns the index of the file a reader at pos needs next
// (len(l.files) when pos is the current position), or a *PosError. Caller
// holds l.mu.
func (l *Log) locate(pos Pos) (int, error) {
	posErr := func(err error, have Checksum) error {
		e := &PosError{DB: l.Name, Pos: pos, Last: l.pos(), Have: have, Err: err}
		if len(l.files) > 0 {
			e.First = l.files[0].info.PreApplyPos()
		}
		return e
	}
	last := l.pos()
	if pos == last {
		return len(l.files), nil
	}
	if pos.TXID > last.TXID || len(l.files) == 0 {
		return 0, posErr(ErrPosUnknown, 0)
	}
	if pos.TXID == last.TXID {
		return 0, posErr(ErrPosMismatch, last.PostApplyChecksum)
	}
	first := l.files[0].info.PreApplyPos()
	if pos.TXID < first.TXID {
		return 0, posErr(ErrPosTooOld, 0)
	}
	if pos.TXID == first.TXID {
		if pos.PostApplyChecksum != first.PostApplyChecksum {
			return 0, posErr(ErrPosMismatch, first.PostApplyChecksum)
		}
		return 0, nil
	}

	// The file holding pos.TXID: the first whose MaxTXID reaches it.
	i := sort.Search(len(l.files), func(i int) bool { return l.files[i].info.Header.MaxTXID >= pos.TXID })
	f := l.files[i]
	if f.info.Header.MaxTXID == pos.TXID {
		if pos.PostApplyChecksum != f.info.PostApplyChecksum {
			return 0, posErr(ErrPosMismatch, f.info.PostApplyChecksum)
		}
		return i + 1, nil
	}
	// Inside a multi-transaction file: servable if its sidecar knows pos.
	if f.positions == nil {
		return 0, posErr(ErrPosUnknown, 0)
	}
	have := f.positions[pos.TXID-f.info.Header.MinTXID]
	if have == 0 {
		return 0, posErr(ErrPosUnknown, 0)
	} else if have != pos.PostApplyChecksum {
		return 0, posErr(ErrPosMismatch, have)
	}
	return i, nil
}

// Reader is one LTX file served to a cursor. Bytes read from disk are
// verified as they are read (see VerifyReader); those of a file the log
// committed lately come from memory, as its encoder wrote them.
type Reader struct {
	// Info describes the file as served. Its header differs from the file
	// in the log when the reader started inside a compacted file.
	Info FileInfo

	r io.Reader
	f io.Closer
}

// newReader serves f to a reader at pos. If pos is inside the file, the file
// is re-encoded to apply at pos: a compacted file holds the final version of
// every page its transactions changed, so writing all of them over the
// database as it was at any position inside the range yields the state at
// its end.
func newReader(f *openFile, info FileInfo, pos Pos, tmpDir string) (*Reader, error) {
	if info.PreApplyPos() == pos {
		return &Reader{Info: info, r: NewVerifyReader(f, info.Seal), f: f}, nil
	}
	defer func() { _ = f.Close() }()
	tmp, err := createTemp(tmpDir, info.Name)
	if err != nil {
		return nil, err
	}
	// Unlinked at once: the reader keeps the only reference.
	_ = os.Remove(tmp.Name())
	bw := bufio.NewWriterSize(tmp, readBufferSize)
	seal := newSealHash()
	rebased, err := rebase(io.MultiWriter(bw, seal), NewVerifyReader(f, info.Seal), pos)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		_, err = tmp.Seek(0, io.SeekStart)
	}
	if err != nil {
		_ = tmp.Close()
		return nil, fmt.Errorf("serve %s from %s: %w", info.Name, pos, err)
	}
	rebased.Name, rebased.Seal = info.Name, sealValue(seal)
	return &Reader{Info: *rebased, r: NewVerifyReader(tmp, rebased.Seal), f: tmp}, nil
}

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) { return r.r.Read(p) }

// Close releases the file.
func (r *Reader) Close() error { return r.f.Close() }

// rebase re-encodes the LTX file from src to w so that it applies at pos,
// which must be inside its TXID range.
func rebase(w io.Writer, src io.Reader, pos Pos) (*FileInfo, error) {
	dec := NewDecoder(src)
	defer dec.Release()
	if err := dec.DecodeHeader(); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrCorrupt, err)
	}
	hdr := dec.Header()
	if pos.TXID < hdr.MinTXID || pos.TXID >= hdr.MaxTXID {
		return nil, fmt.Errorf("position %s is not inside txid %s-%s", pos, hdr.MinTXID, hdr.MaxTXID)
	}
	hdr.MinTXID, hdr.PreApplyChecksum = pos.TXID+1, pos.PostApplyChecksum

	enc := getEncoder(w)
	defer putEncoder(enc)
	if err := enc.EncodeHeader(hdr); err != nil {
		return nil, err
	}
	var ph ltx.PageHeader
	data := make([]byte, hdr.PageSize)
	for {
		if err := dec.DecodePage(&ph, data); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
		if err := enc.EncodePage(ltx.PageHeader{Pgno: ph.Pgno}, data); err != nil {
			return nil, err
		}
	}
	if err := dec.Close(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	enc.SetPostApplyChecksum(dec.Trailer().PostApplyChecksum)
	if err := enc.Close(); err != nil {
		return nil, err
	}
	t := enc.Trailer()
	return &FileInfo{Header: enc.Header(), PostApplyChecksum: t.PostApplyChecksum, FileChecksum: t.FileChecksum, Size: enc.N()}, nil
}

package ltx

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/superfly/ltx"
)

// ErrCorrupt wraps every error that says the bytes of an LTX file are wrong
// (as opposed to an I/O error reading them).
var ErrCorrupt = errors.New("corrupt LTX file")

// readBufferSize is the buffer for reading LTX files, which the codec
// otherwise reads a few bytes at a time.
const readBufferSize = 64 << 10

// File name suffixes in a log directory.
const (
	ltxExt = ".ltx"
	posExt = ".pos"
	tmpExt = ".tmp"
)

// FormatName returns the file name of an LTX file holding TXIDs min to max.
func FormatName(min, max TXID) string { return ltx.FormatFilename(min, max) }

// ParseName parses an LTX file name, "%016x-%016x.ltx", into its TXID range.
func ParseName(name string) (min, max TXID, err error) {
	min, max, err = ltx.ParseFilename(name)
	if err != nil {
		return 0, 0, err
	}
	if min == 0 || min > max {
		return 0, 0, fmt.Errorf("invalid ltx filename: %s: txid range %d-%d", name, min, max)
	}
	return min, max, nil
}

// posName returns the name of the position sidecar of an LTX file.
func posName(ltxName string) string { return strings.TrimSuffix(ltxName, ltxExt) + posExt }

// FileInfo describes one LTX file from its header and trailer.
type FileInfo struct {
	Name              string // base name, "%016x-%016x.ltx"
	Header            Header
	PostApplyChecksum Checksum
	FileChecksum      Checksum
	Size              int64
	// Seal is the CRC-64/ISO of the file's bytes as written, kept in an
	// extended attribute; 0 if the file is not sealed. See seal.go.
	Seal Checksum
}

// PreApplyPos returns the position the file applies at.
func (fi *FileInfo) PreApplyPos() Pos { return fi.Header.PreApplyPos() }

// Pos returns the position after the file is applied.
func (fi *FileInfo) Pos() Pos {
	return Pos{TXID: fi.Header.MaxTXID, PostApplyChecksum: fi.PostApplyChecksum}
}

// Time returns the commit time of the file's last transaction.
func (fi *FileInfo) Time() time.Time { return time.UnixMilli(fi.Header.Timestamp).UTC() }

// String returns "min-max pre -> post".
func (fi *FileInfo) String() string {
	return fmt.Sprintf("%s (txid %s-%s, %s -> %s)", fi.Name, fi.Header.MinTXID, fi.Header.MaxTXID, fi.PreApplyPos(), fi.Pos())
}

// ReadFileInfo reads the header and trailer of the LTX file at path and
// checks they are well formed and agree with the file name. It does not
// verify the page data or the file checksum; VerifyReader does.
func ReadFileInfo(path string) (*FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	info, err := readFileInfo(f, filepath.Base(path), fi.Size())
	if err != nil {
		return nil, err
	}
	if info.Seal, err = readSeal(f); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	return info, nil
}

// minFileSize is the smallest possible LTX file: header, end-of-pages
// marker, empty page index (end marker and size) and trailer.
const minFileSize = ltx.HeaderSize + ltx.PageHeaderSize + 1 + 8 + ltx.TrailerSize

func readFileInfo(r io.ReaderAt, name string, size int64) (*FileInfo, error) {
	info := &FileInfo{Name: name, Size: size}
	if size < minFileSize {
		return nil, fmt.Errorf("%w: %s: %d bytes is shorter than the smallest LTX file (%d bytes)", ErrCorrupt, name, size, minFileSize)
	}
	hb := make([]byte, ltx.HeaderSize)
	if _, err := r.ReadAt(hb, 0); err != nil {
		return nil, fmt.Errorf("read header of %s: %w", name, err)
	}
	if err := info.Header.UnmarshalBinary(hb); err != nil {
		return nil, fmt.Errorf("%w: %s: header: %v", ErrCorrupt, name, err)
	}
	if err := info.Header.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %s: header: %v", ErrCorrupt, name, err)
	}
	tb := make([]byte, ltx.TrailerSize)
	if _, err := r.ReadAt(tb, size-ltx.TrailerSize); err != nil {
		return nil, fmt.Errorf("read trailer of %s: %w", name, err)
	}
	var trailer ltx.Trailer
	if err := trailer.UnmarshalBinary(tb); err != nil {
		return nil, fmt.Errorf("%w: %s: trailer: %v", ErrCorrupt, name, err)
	}
	if err := trailer.Validate(info.Header); err != nil {
		return nil, fmt.Errorf("%w: %s: trailer: %v", ErrCorrupt, name, err)
	}
	info.PostApplyChecksum, info.FileChecksum = trailer.PostApplyChecksum, trailer.FileChecksum
	if err := info.checkName(); err != nil {
		return nil, err
	}
	return info, nil
}

// checkName checks that a file named like an LTX file holds the TXIDs its
// name says.
func (fi *FileInfo) checkName() error {
	if min, max, err := ParseName(fi.Name); err == nil && (min != fi.Header.MinTXID || max != fi.Header.MaxTXID) {
		return fmt.Errorf("%w: %s: name says txid %s-%s but header says %s-%s",
			ErrCorrupt, fi.Name, min, max, fi.Header.MinTXID, fi.Header.MaxTXID)
	}
	return nil
}

// VerifyReader passes an LTX file through while the codec decodes it. Read
// hands out only bytes the decoder has already accepted, and returns io.EOF
// only once the whole file decoded and its file checksum matched; any
// problem with the bytes is returned instead, wrapped in ErrCorrupt. A
// consumer that reads to io.EOF has therefore received a verified file.
type VerifyReader struct {
	tee   teeReader
	seal  hash.Hash64
	want  Checksum // expected seal; 0 for none
	dec   *Decoder
	out   bytes.Buffer // decoded bytes not yet handed out
	page  []byte
	pages uint32 // pages decoded
	state int
	err   error         // sticky result once decoding ends
	br    *bufio.Reader // from readerPool; returned when decoding ends
}

// VerifyReader states.
const (
	verifyHeader = iota
	verifyPages
	verifyIndex
	verifyDone
)

// NewVerifyReader returns a VerifyReader reading the LTX file from r. If
// seal is not 0, the bytes read must also match it (see seal.go).
func NewVerifyReader(r io.Reader, seal Checksum) *VerifyReader {
	// The buffer sits below the tee, so the codec never reads ahead of what
	// it has decoded and Read hands out nothing undecoded.
	br := getReader(r)
	vr := &VerifyReader{seal: newSealHash(), want: seal, br: br}
	vr.tee = teeReader{r: br, w: io.MultiWriter(&vr.out, vr.seal)}
	vr.dec = &Decoder{Decoder: ltx.NewDecoder(&vr.tee), peek: br}
	return vr
}

// Header returns the file header; valid once Read has returned data.
func (vr *VerifyReader) Header() Header { return vr.dec.Header() }

// Seal returns the seal of the bytes read (see seal.go): once Read has
// returned io.EOF, that of the whole file.
func (vr *VerifyReader) Seal() Checksum { return sealValue(vr.seal) }

// Trailer returns the trailer; valid once Read has returned io.EOF.
func (vr *VerifyReader) Trailer() ltx.Trailer { return vr.dec.Trailer() }

// Read implements io.Reader.
func (vr *VerifyReader) Read(p []byte) (int, error) {
	for vr.out.Len() == 0 {
		if vr.err != nil {
			return 0, vr.err
		}
		vr.step()
	}
	return vr.out.Read(p)
}

// step decodes the next part of the file: the header, one page, or the
// index and trailer.
func (vr *VerifyReader) step() {
	// Bytes of a step that fails are never handed out. Once decoding
	// ends, nothing reads the buffer again.
	kept := vr.out.Len()
	defer func() {
		if vr.err != nil && vr.err != io.EOF {
			vr.out.Truncate(kept)
		}
		if vr.err != nil && vr.br != nil {
			putReader(vr.br)
			vr.br = nil
		}
	}()
	switch vr.state {
	case verifyHeader:
		if err := vr.dec.DecodeHeader(); err != nil {
			vr.fail("header", err)
			return
		}
		vr.page = make([]byte, vr.dec.Header().PageSize)
		vr.state = verifyPages
	case verifyPages:
		var ph ltx.PageHeader
		before := vr.tee.n
		err := vr.dec.DecodePage(&ph, vr.page)
		if err == io.EOF && vr.tee.n-before == ltx.PageHeaderSize {
			vr.state = verifyIndex // end-of-pages marker
			return
		} else if err != nil {
			vr.fail(fmt.Sprintf("page frame %d", vr.pages+1), err)
			return
		}
		vr.pages++
		if err := vr.checkSnapshotPage(ph.Pgno); err != nil {
			vr.fail(fmt.Sprintf("page frame %d", vr.pages), err)
		}
	case verifyIndex:
		hdr := vr.dec.Header()
		if hdr.IsSnapshot() && vr.pages != snapshotPages(hdr) {
			vr.fail("page block", fmt.Errorf("snapshot holds %d pages, want %d for commit %d", vr.pages, snapshotPages(hdr), hdr.Commit))
			return
		}
		if err := vr.dec.Close(); err != nil {
			vr.fail("page index or trailer", err)
			return
		}
		if got := sealValue(vr.seal); vr.want != 0 && got != vr.want {
			vr.err = fmt.Errorf("%w: the file's bytes changed since it was written (sealed as %s, now %s) "+
				"in compressed page data, where the LTX file checksum does not reach", ErrCorrupt, vr.want, got)
			return
		}
		vr.state, vr.err = verifyDone, io.EOF
	}
}

// checkSnapshotPage checks that a snapshot's pages run 1..Commit, skipping
// only the lock page.
func (vr *VerifyReader) checkSnapshotPage(pgno uint32) error {
	hdr := vr.dec.Header()
	if !hdr.IsSnapshot() {
		return nil
	}
	want := vr.pages
	if want >= hdr.LockPgno() {
		want++
	}
	if pgno != want {
		return fmt.Errorf("snapshot page %d where page %d belongs", pgno, want)
	}
	return nil
}

// snapshotPages returns the number of page frames a snapshot holds.
func snapshotPages(hdr Header) uint32 {
	if hdr.Commit >= hdr.LockPgno() {
		return hdr.Commit - 1
	}
	return hdr.Commit
}

// fail records why decoding stopped: an I/O error from the underlying
// reader as is, anything else as corruption at the current offset.
func (vr *VerifyReader) fail(where string, err error) {
	if vr.tee.err != nil {
		vr.err = vr.tee.err
		return
	}
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		vr.err = fmt.Errorf("%w: truncated in %s at byte %d", ErrCorrupt, where, vr.tee.n)
		return
	}
	vr.err = fmt.Errorf("%w: %s near byte %d: %v", ErrCorrupt, where, vr.tee.n, err)
}

// teeReader copies what is read from r to w and counts it, remembering any
// error other than io.EOF.
type teeReader struct {
	r   io.Reader
	w   io.Writer
	n   int64
	err error
}

func (t *teeReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	t.w.Write(p[:n])
	t.n += int64(n)
	if err != nil && err != io.EOF && t.err == nil {
		t.err = err
	}
	return n, err
}

// VerifyFile reads the whole LTX file at path through a VerifyReader.
func VerifyFile(path string) (*FileInfo, error) {
	info, _, err := verifyFile(path)
	return info, err
}

// verifyFile is VerifyFile, also returning the seal of the bytes it read,
// which equals info.Seal if the file is sealed.
func verifyFile(path string) (*FileInfo, Checksum, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer func() { _ = f.Close() }()
	seal, err := readSeal(f)
	if err != nil {
		return nil, 0, fmt.Errorf("verify %s: %w: %v", path, ErrCorrupt, err)
	}
	vr := NewVerifyReader(f, seal)
	n, err := io.Copy(io.Discard, vr)
	if err != nil {
		return nil, 0, fmt.Errorf("verify %s: %w", path, err)
	}
	t := vr.Trailer()
	info := &FileInfo{Name: filepath.Base(path), Header: vr.Header(), PostApplyChecksum: t.PostApplyChecksum, FileChecksum: t.FileChecksum, Size: n, Seal: seal}
	if err := info.checkName(); err != nil {
		return nil, 0, fmt.Errorf("verify %s: %w", path, err)
	}
	return info, sealValue(vr.seal), nil
}

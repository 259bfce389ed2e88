package replication

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// File is one LTX file a replica received whole and verified: its bytes
// decode, their file checksum matches, and its header and trailer are what
// the primary announced.
type File struct {
	DB   string
	Path string // a temporary file holding the bytes; given back after Apply unless the Target moved it
	Info ltx.FileInfo
	// SnapshotReason says why the primary sent a snapshot instead of
	// continuing from the replica's position: NO_POSITION, RETENTION, or a
	// diverged history (AHEAD, CHECKSUM_MISMATCH), whose transactions the
	// Target must keep aside before applying. UNSPECIFIED otherwise.
	SnapshotReason meridianv1.SnapshotReason
	// Seal is the seal of the file's bytes as received and verified (see
	// ltx.VerifyReader.Seal).
	Seal ltx.Checksum
	// CommittedAt is when the file's last transaction committed on the
	// primary, by the primary's clock.
	CommittedAt time.Time
	// Traceparent and Tracestate are the W3C trace context of that commit.
	Traceparent, Tracestate string
}

// maxChunk is the protocol's bound on the data of one LTXChunk.
const maxChunk = 256 << 10

// receiver reassembles the files of one stream from its frames. Files of
// different databases may interleave; each database has at most one file
// in flight.
type receiver struct {
	dir     string      // where files are assembled
	spares  *ltx.Spares // files to write over instead, if not nil
	maxSize int64
	files   map[string]*incoming
}

// incoming is a file being received.
type incoming struct {
	begin  *meridianv1.LTXBegin
	f      *os.File
	n      uint64
	spares *ltx.Spares
}

func newReceiver(dir string, maxSize int64, spares *ltx.Spares) *receiver {
	return &receiver{dir: dir, spares: spares, maxSize: maxSize, files: make(map[string]*incoming)}
}

// close removes the files still in flight.
func (r *receiver) close() {
	for db, in := range r.files {
		in.discard()
		delete(r.files, db)
	}
}

func (in *incoming) discard() {
	_ = in.f.Close()
	_ = in.spares.Put(in.f.Name())
}

// begin starts a file.
func (r *receiver) begin(b *meridianv1.LTXBegin) error {
	db := b.GetDb()
	switch {
	case db == "":
		return fmt.Errorf("%w: LTXBegin without a database name", ErrProtocol)
	case r.files[db] != nil:
		return fmt.Errorf("%w: LTXBegin for %s while its file of TXIDs %d-%d is incomplete", ErrProtocol, db, r.files[db].begin.GetMinTxid(), r.files[db].begin.GetMaxTxid())
	case b.GetMinTxid() == 0 || b.GetMinTxid() > b.GetMaxTxid():
		return fmt.Errorf("%w: LTXBegin for %s with TXIDs %d-%d", ErrProtocol, db, b.GetMinTxid(), b.GetMaxTxid())
	case b.GetIsSnapshot() != (b.GetMinTxid() == 1):
		return fmt.Errorf("%w: LTXBegin for %s: is_snapshot %v with min_txid %d", ErrProtocol, db, b.GetIsSnapshot(), b.GetMinTxid())
	case b.GetSize() == 0 || b.GetSize() > uint64(r.maxSize):
		return fmt.Errorf("%w: LTXBegin for %s announces %d bytes; the bound is %d (replication max_file_size)", ErrProtocol, db, b.GetSize(), r.maxSize)
	}
	f, err := r.create()
	if err != nil {
		return fmt.Errorf("receive %s: %w", db, err)
	}
	r.files[db] = &incoming{begin: b, f: f, spares: r.spares}
	return nil
}

// create opens a spare file to write over, or creates a file.
func (r *receiver) create() (*os.File, error) {
	for {
		path := r.spares.Take()
		if path == "" {
			return os.CreateTemp(r.dir, "recv-*.ltx")
		}
		f, err := os.OpenFile(path, os.O_RDWR|os.O_TRUNC, 0)
		if errors.Is(err, os.ErrNotExist) {
			continue // removed by hand
		}
		return f, err
	}
}

// chunk appends the next bytes of a file.
func (r *receiver) chunk(c *meridianv1.LTXChunk) error {
	db := c.GetDb()
	in := r.files[db]
	switch {
	case in == nil:
		return fmt.Errorf("%w: LTXChunk for %s outside a file", ErrProtocol, db)
	case c.GetOffset() != in.n:
		return fmt.Errorf("%w: LTXChunk for %s at offset %d, want %d (a chunk was lost or repeated)", ErrProtocol, db, c.GetOffset(), in.n)
	case len(c.GetData()) == 0 || len(c.GetData()) > maxChunk:
		return fmt.Errorf("%w: LTXChunk for %s with %d bytes; want 1 to %d", ErrProtocol, db, len(c.GetData()), maxChunk)
	case in.n+uint64(len(c.GetData())) > in.begin.GetSize():
		return fmt.Errorf("%w: LTXChunk for %s runs past the %d bytes its LTXBegin announced", ErrProtocol, db, in.begin.GetSize())
	}
	if _, err := in.f.Write(c.GetData()); err != nil {
		return fmt.Errorf("receive %s: %w", db, err)
	}
	in.n += uint64(len(c.GetData()))
	return nil
}

// end completes a file and verifies it. The caller owns the returned
// file's Path.
func (r *receiver) end(e *meridianv1.LTXEnd) (*File, error) {
	db := e.GetDb()
	in := r.files[db]
	if in == nil {
		return nil, fmt.Errorf("%w: LTXEnd for %s outside a file", ErrProtocol, db)
	}
	delete(r.files, db)
	f, err := in.verify(e)
	if err != nil {
		in.discard()
		return nil, err
	}
	return f, nil
}

// verify checks the received bytes: the size announced, a file that
// decodes with a matching file checksum, and a header and trailer that
// agree with LTXBegin and LTXEnd.
func (in *incoming) verify(e *meridianv1.LTXEnd) (*File, error) {
	b, db := in.begin, in.begin.GetDb()
	if in.n != b.GetSize() {
		return nil, fmt.Errorf("%w: file of %s ended after %d of the %d bytes its LTXBegin announced", ErrProtocol, db, in.n, b.GetSize())
	}
	// Not fsynced: the Target makes it durable, once, where it keeps it.
	if _, err := in.f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("receive %s: %w", db, err)
	}
	vr := ltx.NewVerifyReader(in.f, 0)
	if _, err := io.Copy(io.Discard, vr); err != nil {
		return nil, fmt.Errorf("%w: file %d-%d of %s: %v", ErrProtocol, b.GetMinTxid(), b.GetMaxTxid(), db, err)
	}
	if err := in.f.Close(); err != nil {
		return nil, fmt.Errorf("receive %s: %w", db, err)
	}
	h, t := vr.Header(), vr.Trailer()
	switch {
	case uint64(h.MinTXID) != b.GetMinTxid() || uint64(h.MaxTXID) != b.GetMaxTxid():
		return nil, fmt.Errorf("%w: file of %s holds TXIDs %d-%d, its LTXBegin said %d-%d", ErrProtocol, db, h.MinTXID, h.MaxTXID, b.GetMinTxid(), b.GetMaxTxid())
	case uint64(h.PreApplyChecksum) != b.GetPreApplyChecksum():
		return nil, fmt.Errorf("%w: file %d-%d of %s has pre-apply checksum %s, its LTXBegin said %016x", ErrProtocol, h.MinTXID, h.MaxTXID, db, h.PreApplyChecksum, b.GetPreApplyChecksum())
	case uint64(t.FileChecksum) != e.GetFileChecksum() || uint64(t.PostApplyChecksum) != e.GetPostApplyChecksum():
		return nil, fmt.Errorf("%w: file %d-%d of %s has checksums %s/%s, its LTXEnd said %016x/%016x", ErrProtocol, h.MinTXID, h.MaxTXID, db, t.FileChecksum, t.PostApplyChecksum, e.GetFileChecksum(), e.GetPostApplyChecksum())
	}
	return &File{
		DB:   db,
		Path: in.f.Name(),
		Info: ltx.FileInfo{
			Name:              ltx.FormatName(h.MinTXID, h.MaxTXID),
			Header:            h,
			PostApplyChecksum: t.PostApplyChecksum,
			FileChecksum:      t.FileChecksum,
			Size:              int64(in.n),
		},
		Seal:           vr.Seal(),
		SnapshotReason: b.GetSnapshotReason(),
		CommittedAt:    time.Unix(0, b.GetCommittedAtUnixNano()),
		Traceparent:    b.GetTraceparent(),
		Tracestate:     b.GetTracestate(),
	}, nil
}

// errUnexpectedFrame is a frame with no known content (a newer protocol).
var errUnexpectedFrame = errors.New("frame of an unknown kind")

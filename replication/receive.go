package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// File is one LTX file a replica received whole and verified: its bytes
// decode, their file checksum matches, and its header and trailer are what
// the primary announced.
type File struct {
	DB string
	// Data holds the file's bytes when it was small enough to be received
	// in memory (maxInMemory); Path is then "". Else Path is a temporary
	// file holding them, given back after Apply unless the Target moved it.
	Data []byte
	Path string
	// Info describes the file; its Seal is that of the bytes received
	// (see ltx.VerifyReader.Seal), for the Target to keep.
	Info ltx.FileInfo
	// SnapshotReason says why the primary sent a snapshot instead of
	// continuing from the replica's position: NO_POSITION, RETENTION, or a
	// diverged history (AHEAD, CHECKSUM_MISMATCH), whose transactions the
	// Target must keep aside before applying. UNSPECIFIED otherwise.
	SnapshotReason SnapshotReason
	// CommittedAt is when the file's last transaction committed on the
	// primary, by the primary's clock.
	CommittedAt time.Time
	// Traceparent and Tracestate are the W3C trace context of that commit.
	Traceparent, Tracestate string
}

// maxChunk is the protocol's bound on the data of one LTXChunk.
const maxChunk = 256 << 10

// maxInMemory is the largest file received in memory rather than into a
// file, unless Client.ReceiveInMemory says otherwise: most files hold one
// transaction and are much smaller, and a replica appends them to its log
// from memory, with no file created, renamed or opened again per
// transaction. The files a stream holds in memory at once, in flight and
// received, take at most maxMemory bytes; past that they go to files too.
const maxInMemory = 1 << 20

// maxMemory bounds the bytes of the files a stream holds in memory.
const maxMemory = 64 << 20

// receiver reassembles the files of one stream from its frames. Files of
// different databases may interleave; each database has at most one file
// in flight, and the stream at most maxFiles, whose sizes, with those of
// the files received and not yet applied, add up to at most maxBytes.
//
// Files received and waiting to be applied are few: the stream stops being
// read while the queue to the applier is full, so there are at most
// MaxGroup of them queued, a group of at most MaxGroup applying and one
// waiting for room in the queue. Those received in memory, with those in
// flight in memory, take at most memory bytes (a file that would take
// more goes to a file); the others' disk is bounded with those in flight,
// by maxBytes: a file does not begin while they hold the room it needs.
type receiver struct {
	dir      string      // where files are assembled
	spares   *ltx.Spares // files to write over instead, if not nil
	maxSize  int64
	inMemory int64  // files of at most this size are received in memory
	memory   int64  // while the files in memory take less than this
	inMemIn  int64  // sizes announced of the files in flight in memory
	maxFiles int    // files in flight; 0: no bound
	maxBytes int64  // bytes in flight and held; 0: no bound
	peer     string // who sends the files, for errors: "primary iad-1"
	files    map[string]*incoming
	inFlight int64 // sizes announced of the files in flight
	held     *held // files received, not yet applied
}

// held counts the bytes of the files of a stream received whole and not
// yet applied or given back: the receiver adds them, and the applier takes
// them away, on another goroutine.
type held struct {
	bytes  atomic.Int64
	memory atomic.Int64  // of those, the bytes of files in memory
	freed  chan struct{} // takes a token when bytes go down
}

func newHeld() *held { return &held{freed: make(chan struct{}, 1)} }

// done takes away the bytes of a file applied or given back.
func (h *held) done(f *File) {
	h.bytes.Add(-f.Info.Size)
	if f.Data != nil {
		h.memory.Add(-f.Info.Size)
	}
	select {
	case h.freed <- struct{}{}:
	default:
	}
}

// incoming is a file being received: into memory if it is small, verified
// once whole; else into a file, its bytes verified as they arrive, on a
// goroutine of its own reading them through a pipe, so a large file is
// checked while the next chunks travel.
type incoming struct {
	begin *meridianv1.LTXBegin
	// room is the most bytes the file may have, which it takes of the
	// bounds: its size, or the bound of a file sent while encoded.
	room     uint64
	buf      []byte // the bytes received, if in memory; f is then nil
	f        *os.File
	n        uint64
	spares   *ltx.Spares
	pw       *io.PipeWriter
	verified chan verifyResult
	result   *verifyResult // once received from verified
}

// wait closes the pipe with err (nil: the file is complete) and returns
// what the verifier found.
func (in *incoming) wait(err error) verifyResult {
	if in.f == nil {
		if in.result == nil && err == nil {
			in.result = verifyBytes(in.buf)
		}
		if in.result == nil {
			return verifyResult{err: err}
		}
		return *in.result
	}
	if in.result == nil {
		_ = in.pw.CloseWithError(err)
		res := <-in.verified
		in.result = &res
	}
	return *in.result
}

// verifyResult is what the verifier of an incoming file found.
type verifyResult struct {
	header                     ltx.Header
	postApplySum, fileChecksum ltx.Checksum // from the trailer
	seal                       ltx.Checksum
	err                        error
}

// errExtraBytes ends the verifier of a file with bytes after its trailer.
var errExtraBytes = errors.New("bytes after the trailer")

// verify reads the file's bytes from pr as they arrive, decoding and
// checking them, then expects no more.
func verify(pr *io.PipeReader, out chan<- verifyResult) {
	vr := ltx.NewVerifyReader(pr, 0)
	_, err := io.Copy(io.Discard, vr)
	if err == nil {
		var b [1]byte
		if n, _ := pr.Read(b[:]); n > 0 {
			err = errExtraBytes
		}
	}
	_ = pr.CloseWithError(err) // writers see why it stopped reading
	t := vr.Trailer()
	out <- verifyResult{header: vr.Header(), postApplySum: t.PostApplyChecksum, fileChecksum: t.FileChecksum, seal: vr.Seal(), err: err}
}

// verifyBytes decodes and checks a file received in memory.
func verifyBytes(b []byte) *verifyResult {
	vr := ltx.NewVerifyReader(bytes.NewReader(b), 0)
	n, err := io.Copy(io.Discard, vr)
	if err == nil && n < int64(len(b)) {
		err = errExtraBytes
	}
	t := vr.Trailer()
	return &verifyResult{header: vr.Header(), postApplySum: t.PostApplyChecksum, fileChecksum: t.FileChecksum, seal: vr.Seal(), err: err}
}

// newReceiver returns a receiver of files of at most maxSize bytes, into
// spares or new files in dir, with no bound on the files in flight.
func newReceiver(dir string, maxSize int64, spares *ltx.Spares) *receiver {
	return &receiver{dir: dir, spares: spares, maxSize: maxSize, inMemory: maxInMemory, memory: maxMemory, peer: "the primary", files: make(map[string]*incoming), held: newHeld()}
}

// close removes the files still in flight.
func (r *receiver) close() {
	for db, in := range r.files {
		in.discard()
		delete(r.files, db)
	}
	r.inFlight, r.inMemIn = 0, 0
}

func (in *incoming) discard() {
	in.wait(errors.New("file discarded"))
	if in.f == nil {
		return
	}
	_ = in.f.Close()
	_ = in.spares.Put(in.f.Name())
}

// begin starts a file, once the files received and not yet applied leave
// room for it (ctx ends that wait).
func (r *receiver) begin(ctx context.Context, b *meridianv1.LTXBegin) error {
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
	case (b.GetSize() == 0) == (b.GetSizeBound() == 0):
		return fmt.Errorf("%w: LTXBegin for %s announces size %d and size_bound %d; want one of them", ErrProtocol, db, b.GetSize(), b.GetSizeBound())
	case max(b.GetSize(), b.GetSizeBound()) > uint64(r.maxSize):
		return fmt.Errorf("%w: LTXBegin for %s announces %d bytes; the bound is %d (replication.max_file_size)", ErrProtocol, db, max(b.GetSize(), b.GetSizeBound()), r.maxSize)
	}
	room := max(b.GetSize(), b.GetSizeBound())
	if err := r.room(ctx, db, int64(room)); err != nil {
		return err
	}
	if room <= uint64(r.inMemory) && r.inMemIn+r.held.memory.Load()+int64(room) <= r.memory {
		r.files[db] = &incoming{begin: b, room: room, buf: make([]byte, 0, room)}
		r.inFlight += int64(room)
		r.inMemIn += int64(room)
		return nil
	}
	f, err := r.create()
	if err != nil {
		return fmt.Errorf("receive %s: %w", db, err)
	}
	pr, pw := io.Pipe()
	in := &incoming{begin: b, room: room, f: f, spares: r.spares, pw: pw, verified: make(chan verifyResult, 1)}
	go verify(pr, in.verified)
	r.files[db] = in
	r.inFlight += int64(room)
	return nil
}

// room checks that a file of db of size bytes keeps the files in flight
// within the bounds the replica announced, and waits until the files held
// leave room for it. The primary keeps the files in flight within them;
// one that does not gets an error that names it, the database and the
// bound broken. Waiting for files in flight instead would never end: their
// ends come after this frame.
func (r *receiver) room(ctx context.Context, db string, size int64) error {
	switch {
	case r.maxFiles > 0 && len(r.files) >= r.maxFiles:
		return fmt.Errorf("%w: %s began a file of %s while %d files were in flight, the most this replica receives at once, "+
			"as its Hello announced (raise replication.max_in_flight_files to receive more)", ErrProtocol, r.peer, db, len(r.files))
	case r.maxBytes > 0 && size > r.maxBytes:
		return fmt.Errorf("%w: %s began a file of %s of %d bytes, more than the %d this replica receives at once "+
			"(raise replication.max_in_flight_bytes to receive it)", ErrProtocol, r.peer, db, size, r.maxBytes)
	case r.maxBytes > 0 && r.inFlight+size > r.maxBytes:
		return fmt.Errorf("%w: %s began a file of %s of %d bytes while %d files of %d bytes were in flight, more than the %d bytes "+
			"this replica receives at once, as its Hello announced (raise replication.max_in_flight_bytes to receive more)",
			ErrProtocol, r.peer, db, size, len(r.files), r.inFlight, r.maxBytes)
	}
	for r.maxBytes > 0 && r.inFlight+r.held.bytes.Load()+size > r.maxBytes && r.held.bytes.Load() > 0 {
		select {
		case <-r.held.freed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
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
	case in.n+uint64(len(c.GetData())) > in.room:
		return fmt.Errorf("%w: LTXChunk for %s runs past the %d bytes its LTXBegin announced", ErrProtocol, db, in.room)
	}
	if in.f == nil {
		in.buf = append(in.buf, c.GetData()...)
		in.n += uint64(len(c.GetData()))
		return nil
	}
	if _, err := in.f.Write(c.GetData()); err != nil {
		return fmt.Errorf("receive %s: %w", db, err)
	}
	if _, err := in.pw.Write(c.GetData()); err != nil {
		// The verifier stopped: the file is bad. It goes when the
		// stream ends, with the receiver.
		b := in.begin
		return fmt.Errorf("%w: file %d-%d of %s: %v", ErrProtocol, b.GetMinTxid(), b.GetMaxTxid(), db, err)
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
	r.inFlight -= int64(in.room)
	if in.f == nil {
		r.inMemIn -= int64(in.room)
	}
	f, err := in.verify(e)
	if err != nil {
		in.discard()
		return nil, err
	}
	r.held.bytes.Add(f.Info.Size)
	if f.Data != nil {
		r.held.memory.Add(f.Info.Size)
	}
	return f, nil
}

// verify checks the received bytes: the size announced, a file that
// decodes with a matching file checksum, and a header and trailer that
// agree with LTXBegin and LTXEnd.
func (in *incoming) verify(e *meridianv1.LTXEnd) (*File, error) {
	b, db := in.begin, in.begin.GetDb()
	switch {
	case b.GetSize() != 0 && in.n != b.GetSize():
		return nil, fmt.Errorf("%w: file of %s ended after %d of the %d bytes its LTXBegin announced", ErrProtocol, db, in.n, b.GetSize())
	case b.GetSize() != 0 && e.GetSize() != 0 && e.GetSize() != b.GetSize():
		return nil, fmt.Errorf("%w: LTXEnd for %s says %d bytes, its LTXBegin %d", ErrProtocol, db, e.GetSize(), b.GetSize())
	case b.GetSize() == 0 && in.n != e.GetSize():
		return nil, fmt.Errorf("%w: file of %s ended after %d bytes, its LTXEnd says %d", ErrProtocol, db, in.n, e.GetSize())
	}
	// Verified as it arrived; not fsynced: the Target makes it durable,
	// once, where it keeps it.
	res := in.wait(nil)
	if res.err != nil {
		return nil, fmt.Errorf("%w: file %d-%d of %s: %v", ErrProtocol, b.GetMinTxid(), b.GetMaxTxid(), db, res.err)
	}
	var path string
	if in.f != nil {
		if err := in.f.Close(); err != nil {
			return nil, fmt.Errorf("receive %s: %w", db, err)
		}
		path = in.f.Name()
	}
	h := res.header
	switch {
	case uint64(h.MinTXID) != b.GetMinTxid() || uint64(h.MaxTXID) != b.GetMaxTxid():
		return nil, fmt.Errorf("%w: file of %s holds TXIDs %d-%d, its LTXBegin said %d-%d", ErrProtocol, db, h.MinTXID, h.MaxTXID, b.GetMinTxid(), b.GetMaxTxid())
	case uint64(h.PreApplyChecksum) != b.GetPreApplyChecksum():
		return nil, fmt.Errorf("%w: file %d-%d of %s has pre-apply checksum %s, its LTXBegin said %016x", ErrProtocol, h.MinTXID, h.MaxTXID, db, h.PreApplyChecksum, b.GetPreApplyChecksum())
	case uint64(res.fileChecksum) != e.GetFileChecksum() || uint64(res.postApplySum) != e.GetPostApplyChecksum():
		return nil, fmt.Errorf("%w: file %d-%d of %s has checksums %s/%s, its LTXEnd said %016x/%016x", ErrProtocol, h.MinTXID, h.MaxTXID, db, res.fileChecksum, res.postApplySum, e.GetFileChecksum(), e.GetPostApplyChecksum())
	}
	return &File{
		DB:   db,
		Data: in.buf,
		Path: path,
		Info: ltx.FileInfo{
			Name:              ltx.FormatName(h.MinTXID, h.MaxTXID),
			Header:            h,
			PostApplyChecksum: res.postApplySum,
			FileChecksum:      res.fileChecksum,
			Seal:              res.seal, // of the bytes received, not stored yet
			Size:              int64(in.n),
		},
		SnapshotReason: SnapshotReason(b.GetSnapshotReason()),
		CommittedAt:    time.Unix(0, b.GetCommittedAtUnixNano()),
		Traceparent:    b.GetTraceparent(),
		Tracestate:     b.GetTracestate(),
	}, nil
}

// errUnexpectedFrame is a frame with no known content (a newer protocol).
var errUnexpectedFrame = errors.New("frame of an unknown kind")

package replication

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// The fuzz input of FuzzReceiver is a sequence of operations, each an
// opcode byte (taken modulo opCount) and its fields, big-endian; a field
// cut short by the end of the input ends the sequence.
const (
	// opBegin: db, flags (bit 0 is_snapshot, bits 1-3 snapshot reason),
	// min_txid u64, max_txid u64, pre_apply_checksum u64, size u32.
	opBegin = iota
	// opChunk: db, offset u32, n u32, then n bytes of data (fewer if the
	// input ends first).
	opChunk
	// opEnd: db, file_checksum u64, post_apply_checksum u64.
	opEnd
	// opFile: db, chunk size u16, n u32, then n bytes: a whole file sent
	// as the primary sends it, with LTXBegin and LTXEnd fields taken from
	// the bytes' header and trailer and chunks of the given size.
	opFile
	// opSnapshot: db, page size shift u8 (512 << shift%8), txid u8, n
	// u32, then n bytes of pages: a snapshot of those pages encoded with
	// ltx.EncodeSnapshot, sent as opFile sends a file.
	opSnapshot
	opCount
)

// fuzzDBs are the database names an operation's db byte picks from,
// modulo their number.
var fuzzDBs = []string{"a.db", "b.db", ""}

// frameEncoder writes FuzzReceiver inputs, for seeds.
type frameEncoder struct{ b []byte }

func (e *frameEncoder) u8(v ...byte) *frameEncoder { e.b = append(e.b, v...); return e }
func (e *frameEncoder) u16(v int) *frameEncoder {
	e.b = binary.BigEndian.AppendUint16(e.b, uint16(v))
	return e
}
func (e *frameEncoder) u32(v int) *frameEncoder {
	e.b = binary.BigEndian.AppendUint32(e.b, uint32(v))
	return e
}
func (e *frameEncoder) u64(v uint64) *frameEncoder {
	e.b = binary.BigEndian.AppendUint64(e.b, v)
	return e
}

func (e *frameEncoder) begin(db byte, flags byte, min, max, pre uint64, size int) *frameEncoder {
	return e.u8(opBegin, db, flags).u64(min).u64(max).u64(pre).u32(size)
}

func (e *frameEncoder) chunk(db byte, off int, data []byte) *frameEncoder {
	return e.u8(opChunk, db).u32(off).u32(len(data)).u8(data...)
}

func (e *frameEncoder) end(db byte, fileChecksum, post uint64) *frameEncoder {
	return e.u8(opEnd, db).u64(fileChecksum).u64(post)
}

func (e *frameEncoder) file(db byte, chunk int, data []byte) *frameEncoder {
	return e.u8(opFile, db).u16(chunk).u32(len(data)).u8(data...)
}

// framed writes an LTX file as explicit LTXBegin, LTXChunk and LTXEnd
// frames in chunks of size chunk, taking their fields from its header and
// trailer.
func (e *frameEncoder) framed(db byte, data []byte, chunk int) *frameEncoder {
	b := fileBegin(data)
	flags := byte(0)
	if b.GetIsSnapshot() {
		flags = 1 | byte(meridianv1.SnapshotReason_SNAPSHOT_REASON_NO_POSITION)<<1
	}
	e.begin(db, flags, b.GetMinTxid(), b.GetMaxTxid(), b.GetPreApplyChecksum(), len(data))
	for off := 0; off < len(data); off += chunk {
		e.chunk(db, off, data[off:min(off+chunk, len(data))])
	}
	end := fileEnd(data)
	return e.end(db, end.GetFileChecksum(), end.GetPostApplyChecksum())
}

// fuzzInput reads a FuzzReceiver input.
type fuzzInput struct {
	b  []byte
	ok bool
}

func (in *fuzzInput) bytes(n int) []byte {
	if len(in.b) < n {
		in.ok = false
		return make([]byte, n)
	}
	b := in.b[:n]
	in.b = in.b[n:]
	return b
}

func (in *fuzzInput) u8() byte    { return in.bytes(1)[0] }
func (in *fuzzInput) u16() int    { return int(binary.BigEndian.Uint16(in.bytes(2))) }
func (in *fuzzInput) u32() int    { return int(binary.BigEndian.Uint32(in.bytes(4))) }
func (in *fuzzInput) u64() uint64 { return binary.BigEndian.Uint64(in.bytes(8)) }
func (in *fuzzInput) db() string  { return fuzzDBs[int(in.u8())%len(fuzzDBs)] }

// data reads n bytes, or what is left if fewer.
func (in *fuzzInput) data(n int) []byte {
	n = min(n, len(in.b))
	b := in.b[:n]
	in.b = in.b[n:]
	return b
}

// next returns the frames of the next operation, nil at the end of the
// input.
func (in *fuzzInput) next() []*meridianv1.StreamResponse {
	if len(in.b) == 0 {
		return nil
	}
	in.ok = true
	var frames []*meridianv1.StreamResponse
	switch op := in.u8() % opCount; op {
	case opBegin:
		db, flags := in.db(), in.u8()
		b := &meridianv1.LTXBegin{Db: db, IsSnapshot: flags&1 != 0, SnapshotReason: meridianv1.SnapshotReason(flags >> 1 & 7),
			MinTxid: in.u64(), MaxTxid: in.u64(), PreApplyChecksum: in.u64(), Size: uint64(in.u32()), CommittedAtUnixNano: 1}
		frames = append(frames, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxBegin{LtxBegin: b}})
	case opChunk:
		db, off, n := in.db(), in.u32(), in.u32()
		c := &meridianv1.LTXChunk{Db: db, Offset: uint64(off), Data: bytes.Clone(in.data(n))}
		frames = append(frames, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxChunk{LtxChunk: c}})
	case opEnd:
		e := &meridianv1.LTXEnd{Db: in.db(), FileChecksum: in.u64(), PostApplyChecksum: in.u64()}
		frames = append(frames, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxEnd{LtxEnd: e}})
	case opFile:
		db, chunk, n := in.db(), in.u16(), in.u32()
		frames = fileFrames(db, bytes.Clone(in.data(n)), chunk)
	case opSnapshot:
		db, shift, txid, n := in.db(), in.u8(), in.u8(), in.u32()
		frames = fileFrames(db, snapshotOf(in.data(n), 512<<(shift%8), txid), DefaultChunkSize)
	}
	if !in.ok {
		return nil
	}
	return frames
}

// snapshotOf returns a snapshot, at TXID txid, of a database of the whole
// pages of size pageSize in pages, or nil if EncodeSnapshot refuses it.
func snapshotOf(pages []byte, pageSize int, txid byte) []byte {
	var buf bytes.Buffer
	commit := uint32(len(pages) / pageSize)
	if _, err := ltx.EncodeSnapshot(context.Background(), &buf, bytes.NewReader(pages), uint32(pageSize), commit, ltx.TXID(max(txid, 1)), time.UnixMilli(1)); err != nil {
		return nil
	}
	return buf.Bytes()
}

// fileFrames returns the frames that send data as a file of db, in chunks
// of size chunk (one chunk if 0), with LTXBegin and LTXEnd fields taken
// from data's header and trailer.
func fileFrames(db string, data []byte, chunk int) []*meridianv1.StreamResponse {
	if chunk == 0 {
		chunk = max(len(data), 1)
	}
	b, e := fileBegin(data), fileEnd(data)
	b.Db, e.Db = db, db
	frames := []*meridianv1.StreamResponse{{Frame: &meridianv1.StreamResponse_LtxBegin{LtxBegin: b}}}
	for off := 0; off < len(data); off += chunk {
		c := &meridianv1.LTXChunk{Db: db, Offset: uint64(off), Data: data[off:min(off+chunk, len(data))]}
		frames = append(frames, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxChunk{LtxChunk: c}})
	}
	return append(frames, &meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxEnd{LtxEnd: e}})
}

// LTX header and trailer offsets that fileBegin and fileEnd read.
const (
	ltxHeaderSize  = 100
	ltxMinTXIDOff  = 16
	ltxMaxTXIDOff  = 24
	ltxPreApplyOff = 40
	ltxTrailerSize = 16
)

// fileBegin returns the LTXBegin the primary sends for the LTX file data,
// from its header as it is (zeros if it is too short).
func fileBegin(data []byte) *meridianv1.LTXBegin {
	h := make([]byte, ltxHeaderSize)
	copy(h, data)
	b := &meridianv1.LTXBegin{
		MinTxid:             binary.BigEndian.Uint64(h[ltxMinTXIDOff:]),
		MaxTxid:             binary.BigEndian.Uint64(h[ltxMaxTXIDOff:]),
		PreApplyChecksum:    binary.BigEndian.Uint64(h[ltxPreApplyOff:]),
		Size:                uint64(len(data)),
		CommittedAtUnixNano: 1,
	}
	b.IsSnapshot = b.MinTxid == 1
	if b.IsSnapshot {
		b.SnapshotReason = meridianv1.SnapshotReason_SNAPSHOT_REASON_RETENTION
	}
	return b
}

// fileEnd returns the LTXEnd the primary sends for the LTX file data, from
// its trailer as it is (zeros if it is too short).
func fileEnd(data []byte) *meridianv1.LTXEnd {
	t := make([]byte, ltxTrailerSize)
	if len(data) >= ltxTrailerSize {
		copy(t, data[len(data)-ltxTrailerSize:])
	}
	return &meridianv1.LTXEnd{PostApplyChecksum: binary.BigEndian.Uint64(t), FileChecksum: binary.BigEndian.Uint64(t[8:])}
}

// seedLTX returns the LTX files of a small SQLite database's log: its
// snapshot at TXID 1 and the files of a few transactions.
func seedLTX(tb testing.TB) [][]byte {
	tb.Helper()
	dir := tb.TempDir()
	path := filepath.Join(dir, "seed.db")
	db := testingutil.MustOpenSQLite(tb, path, "delete")
	work := testingutil.NewWorkload(db, 7)
	if err := work.Init(); err != nil {
		tb.Fatal(err)
	}
	l := testingutil.MustOpenLog(tb, "seed.db", filepath.Join(dir, "ltx"), path)
	for range 4 {
		before := testingutil.MustReadFile(tb, path)
		if _, err := work.Step(); err != nil {
			tb.Fatal(err)
		}
		if _, err := testingutil.CommitChanged(l, before, testingutil.MustReadFile(tb, path)); err != nil {
			tb.Fatal(err)
		}
	}
	var files [][]byte
	for _, fi := range l.Files() {
		files = append(files, testingutil.MustReadFile(tb, filepath.Join(l.Dir, fi.Name)))
	}
	if len(files) < 3 {
		tb.Fatalf("seed log has %d files, want at least 3", len(files))
	}
	return files
}

// fuzzSeeds returns inputs made of real LTX files framed as the primary
// frames them, and damaged variants.
func fuzzSeeds(tb testing.TB) [][]byte {
	files := seedLTX(tb)
	snap, next := files[0], files[1]
	flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 0x10; return b }
	nb, ne := fileBegin(next), fileEnd(next)
	var seeds [][]byte
	add := func(e *frameEncoder) { seeds = append(seeds, e.b) }

	// The log's first files, in order, in explicit frames and as whole
	// files.
	all := &frameEncoder{}
	for _, f := range files[:3] {
		all.framed(0, f, 1000)
	}
	add(all)
	add((&frameEncoder{}).file(0, 0, snap).file(0, 512, next))
	// Two databases interleaved, as the primary may send them.
	b0, e0, b1 := fileBegin(snap), fileEnd(snap), fileBegin(next)
	add((&frameEncoder{}).
		begin(0, 1, b0.MinTxid, b0.MaxTxid, 0, len(snap)).
		begin(1, 0, b1.MinTxid, b1.MaxTxid, b1.PreApplyChecksum, len(next)).
		chunk(0, 0, snap[:len(snap)/2]).chunk(1, 0, next).chunk(0, len(snap)/2, snap[len(snap)/2:]).
		end(1, ne.FileChecksum, ne.PostApplyChecksum).end(0, e0.FileChecksum, e0.PostApplyChecksum))
	// A snapshot of pages built by the harness.
	add((&frameEncoder{}).u8(opSnapshot, 1, 0, 3).u32(2048).u8(bytes.Repeat([]byte{0xa5}, 2048)...))

	// Damaged: a flipped bit in the header, a page and the trailer; a
	// truncated file; a chunk lost, repeated or too long; LTXBegin and
	// LTXEnd that disagree with the bytes; frames outside a file.
	for _, i := range []int{ltxMinTXIDOff + 7, ltxHeaderSize + 20, len(next) / 2, len(next) - 1, len(next) - ltxTrailerSize} {
		add((&frameEncoder{}).file(0, 100, flip(next, i)))
	}
	add((&frameEncoder{}).file(0, 100, next[:len(next)-1]))
	add((&frameEncoder{}).begin(0, 0, nb.MinTxid, nb.MaxTxid, nb.PreApplyChecksum, len(next)).
		chunk(0, 0, next[:100]).chunk(0, 200, next[200:]).end(0, ne.FileChecksum, ne.PostApplyChecksum))
	add((&frameEncoder{}).begin(0, 0, nb.MinTxid, nb.MaxTxid, nb.PreApplyChecksum, len(next)).
		chunk(0, 0, next[:100]).chunk(0, 0, next[:100]).end(0, ne.FileChecksum, ne.PostApplyChecksum))
	add((&frameEncoder{}).begin(0, 0, nb.MinTxid, nb.MaxTxid, nb.PreApplyChecksum, len(next)+1).
		chunk(0, 0, next).end(0, ne.FileChecksum, ne.PostApplyChecksum))
	add((&frameEncoder{}).begin(0, 0, nb.MinTxid, nb.MaxTxid+1, nb.PreApplyChecksum, len(next)).
		chunk(0, 0, next).end(0, ne.FileChecksum, ne.PostApplyChecksum))
	add((&frameEncoder{}).begin(0, 0, nb.MinTxid, nb.MaxTxid, nb.PreApplyChecksum^1, len(next)).
		chunk(0, 0, next).end(0, ne.FileChecksum, ne.PostApplyChecksum))
	add((&frameEncoder{}).begin(0, 0, nb.MinTxid, nb.MaxTxid, nb.PreApplyChecksum, len(next)).
		chunk(0, 0, next).end(0, ne.FileChecksum, ne.PostApplyChecksum^1))
	add((&frameEncoder{}).begin(0, 1, nb.MinTxid, nb.MaxTxid, nb.PreApplyChecksum, len(next)).
		chunk(0, 0, next).end(0, ne.FileChecksum, ne.PostApplyChecksum))
	add((&frameEncoder{}).chunk(0, 0, next[:10]).end(1, 0, 0).begin(2, 0, 2, 2, 0, 10))
	// A snapshot framed as the file of another database.
	add((&frameEncoder{}).begin(0, 1, b0.MinTxid, b0.MaxTxid, 0, len(snap)).chunk(1, 0, snap).end(0, e0.FileChecksum, e0.PostApplyChecksum))
	return seeds
}

// FuzzReceiver feeds a receiver frames decoded from the input (see
// opBegin) and checks that it never panics, refuses what it refuses with
// ErrProtocol, returns only files whose bytes are the chunks it was sent,
// decode and verify, and match what their LTXBegin and LTXEnd said, and
// leaves no file behind but those it returned.
func FuzzReceiver(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	root := fuzzDir(f)
	f.Fuzz(func(t *testing.T, input []byte) {
		dir, err := os.MkdirTemp(root, "receiver-")
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = os.RemoveAll(dir) }()
		receive(t, dir, input)
	})
}

// fuzzDir returns a new directory for the receivers' files, removed when
// the test ends. It is on tmpfs (/dev/shm) where there is one: files are
// created, synced and removed there in a tenth of the time they take on
// disk, so the fuzzer tries ten times as many inputs.
func fuzzDir(tb testing.TB) string {
	tb.Helper()
	if fi, err := os.Stat("/dev/shm"); err != nil || !fi.IsDir() {
		return tb.TempDir()
	}
	dir, err := os.MkdirTemp("/dev/shm", "meridian-fuzz-")
	if err != nil {
		return tb.TempDir()
	}
	tb.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// receive runs the frames of input through a receiver of files in the
// empty directory dir and checks what it does (see FuzzReceiver).
func receive(t testing.TB, dir string, input []byte) {
	rv := newReceiver(dir, 1<<20, nil)
	// Two files of a MiB cannot be in flight at once. Each file returned
	// is taken as applied at once: the receiver never waits for room.
	rv.maxFiles, rv.maxBytes = 2, 3<<19
	// Files of up to 4 KiB are received in memory, larger ones into
	// files: both ways are fuzzed.
	rv.inMemory = 4 << 10
	var returned []string
	sent := make(map[string][]byte)                 // bytes of each file accepted so far
	begins := make(map[string]*meridianv1.LTXBegin) // of the files in flight
	in := &fuzzInput{b: input}
	for frames := in.next(); frames != nil; frames = in.next() {
		for _, fr := range frames {
			var err error
			switch fr := fr.GetFrame().(type) {
			case *meridianv1.StreamResponse_LtxBegin:
				if err = rv.begin(context.Background(), fr.LtxBegin); err == nil {
					begins[fr.LtxBegin.Db], sent[fr.LtxBegin.Db] = fr.LtxBegin, nil
				}
			case *meridianv1.StreamResponse_LtxChunk:
				if err = rv.chunk(fr.LtxChunk); err == nil {
					sent[fr.LtxChunk.Db] = append(sent[fr.LtxChunk.Db], fr.LtxChunk.Data...)
				}
			case *meridianv1.StreamResponse_LtxEnd:
				var file *File
				file, err = rv.end(fr.LtxEnd)
				db := fr.LtxEnd.Db
				if err == nil {
					checkReceived(t, dir, rv.inMemory, file, begins[db], fr.LtxEnd, sent[db])
					if file.Path != "" {
						returned = append(returned, file.Path)
					}
					rv.held.done(file)
				}
				delete(begins, db)
				delete(sent, db)
			}
			if err != nil && !errors.Is(err, ErrProtocol) {
				t.Fatalf("frame %v: %v, want an error wrapping ErrProtocol", fr, err)
			}
		}
	}
	rv.close()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, e := range entries {
		left = append(left, filepath.Join(dir, e.Name()))
	}
	slices.Sort(left)
	slices.Sort(returned)
	if !slices.Equal(left, returned) {
		t.Fatalf("after close the directory holds %q, want only the files returned, %q", left, returned)
	}
}

// checkReceived checks a file the receiver returned: its bytes are sent,
// they verify to the end, and its Info and fields are what its bytes, b and
// e say.
func checkReceived(t testing.TB, dir string, inMemory int64, file *File, b *meridianv1.LTXBegin, e *meridianv1.LTXEnd, sent []byte) {
	t.Helper()
	if b == nil {
		t.Fatalf("file %s of %s returned without an accepted LTXBegin", file.Info.Name, e.GetDb())
	}
	// A small file comes in memory, a large one in a file of the
	// receiver's directory.
	got := file.Data
	switch max(b.GetSize(), b.GetSizeBound()) <= uint64(inMemory) {
	case true:
		if file.Path != "" || file.Data == nil {
			t.Fatalf("file %s of %d bytes received into %q, want it in memory", file.Info.Name, len(sent), file.Path)
		}
	case false:
		if file.Data != nil || filepath.Dir(file.Path) != dir {
			t.Fatalf("file %s outside the receiver's directory %s (%d bytes in memory)", file.Path, dir, len(file.Data))
		}
		var err error
		if got, err = os.ReadFile(file.Path); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, sent) {
		t.Fatalf("file of %s holds %d bytes that differ from the %d sent", e.GetDb(), len(got), len(sent))
	}
	vr := ltx.NewVerifyReader(bytes.NewReader(got), 0)
	if n, err := io.Copy(io.Discard, vr); err != nil || n != int64(len(got)) {
		t.Fatalf("returned file of %s does not verify: %d of %d bytes, %v", e.GetDb(), n, len(got), err)
	}
	h, tr := vr.Header(), vr.Trailer()
	want := ltx.FileInfo{Name: ltx.FormatName(h.MinTXID, h.MaxTXID), Header: h, PostApplyChecksum: tr.PostApplyChecksum,
		FileChecksum: tr.FileChecksum, Size: int64(len(got)), Seal: vr.Seal()}
	if file.Info != want {
		t.Fatalf("got info %+v, want %+v from the bytes", file.Info, want)
	}
	switch {
	case file.DB != e.GetDb() || file.DB != b.GetDb():
		t.Fatalf("file of %q returned for an LTXEnd of %q", file.DB, e.GetDb())
	case uint64(h.MinTXID) != b.GetMinTxid() || uint64(h.MaxTXID) != b.GetMaxTxid() || uint64(h.PreApplyChecksum) != b.GetPreApplyChecksum():
		t.Fatalf("file header %+v differs from its LTXBegin %v", h, b)
	case h.IsSnapshot() != b.GetIsSnapshot() || file.SnapshotReason != SnapshotReason(b.GetSnapshotReason()):
		t.Fatalf("file header %+v, reason %v differ from its LTXBegin %v", h, file.SnapshotReason, b)
	case uint64(tr.FileChecksum) != e.GetFileChecksum() || uint64(tr.PostApplyChecksum) != e.GetPostApplyChecksum():
		t.Fatalf("file trailer %+v differs from its LTXEnd %v", tr, e)
	}
}

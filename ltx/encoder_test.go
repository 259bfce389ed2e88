package ltx_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"

	codec "github.com/superfly/ltx"

	"github.com/meridian-db/meridian/ltx"
)

// fileEncoder is what the log asks of an LTX encoder: the codec's and the
// log's reusable one both have it.
type fileEncoder interface {
	EncodeHeader(codec.Header) error
	EncodePage(codec.PageHeader, []byte) error
	SetPostApplyChecksum(codec.Checksum)
	Close() error
	Header() codec.Header
	Trailer() codec.Trailer
	N() int64
}

var (
	_ fileEncoder = (*codec.Encoder)(nil)
	_ fileEncoder = (*ltx.Encoder)(nil)
)

// encodeSpec writes the file of spec with enc.
func encodeSpec(enc fileEncoder, spec *codec.FileSpec) error {
	if err := enc.EncodeHeader(spec.Header); err != nil {
		return err
	}
	for _, p := range spec.Pages {
		if err := enc.EncodePage(p.Header, p.Data); err != nil {
			return err
		}
	}
	enc.SetPostApplyChecksum(spec.Trailer.PostApplyChecksum)
	return enc.Close()
}

// randomSpec returns a valid LTX file of random shape: a snapshot, some
// pages of a transaction, or a deletion, with any page size.
func randomSpec(rng *rand.Rand) *codec.FileSpec {
	pageSize := uint32(512) << rng.IntN(8)
	maxPages := min(24, (256<<10)/int(pageSize))
	hdr := codec.Header{Version: codec.Version, PageSize: pageSize, Timestamp: rng.Int64N(1 << 42), NodeID: rng.Uint64()}
	if rng.IntN(2) == 0 {
		hdr.WALOffset, hdr.WALSize = 32+rng.Int64N(1<<30), rng.Int64N(1<<20)
		hdr.WALSalt1, hdr.WALSalt2 = rng.Uint32(), rng.Uint32()
	}
	post := codec.ChecksumFlag | codec.Checksum(rng.Uint64())
	var pgnos []uint32
	switch n := rng.IntN(8); {
	case n < 3: // snapshot
		hdr.MinTXID, hdr.MaxTXID = 1, codec.TXID(1+rng.IntN(100))
		hdr.Commit = uint32(1 + rng.IntN(maxPages))
		for pgno := uint32(1); pgno <= hdr.Commit; pgno++ {
			pgnos = append(pgnos, pgno)
		}
	case n == 3: // deletion
		hdr.MinTXID = codec.TXID(2 + rng.IntN(1000))
		hdr.MaxTXID = hdr.MinTXID
		hdr.PreApplyChecksum = codec.ChecksumFlag | codec.Checksum(rng.Uint64())
		post = codec.ChecksumFlag
	default: // any pages of a transaction, maybe none
		hdr.MinTXID = codec.TXID(2 + rng.IntN(1000))
		hdr.MaxTXID = hdr.MinTXID + codec.TXID(rng.IntN(3))
		hdr.PreApplyChecksum = codec.ChecksumFlag | codec.Checksum(rng.Uint64())
		hdr.Commit = uint32(1 + rng.IntN(1000))
		for _, i := range rng.Perm(int(hdr.Commit))[:rng.IntN(min(maxPages, int(hdr.Commit))+1)] {
			pgnos = append(pgnos, uint32(i+1))
		}
		slices.Sort(pgnos)
	}
	if hdr.Commit > 0 && rng.IntN(6) == 0 {
		hdr.Flags, hdr.PreApplyChecksum, post = codec.HeaderFlagNoChecksum, 0, 0
	}
	spec := &codec.FileSpec{Header: hdr}
	sum := codec.ChecksumFlag
	for _, pgno := range pgnos {
		data := randomPage(rng, pageSize)
		sum ^= codec.ChecksumPage(pgno, data)
		spec.Pages = append(spec.Pages, codec.PageSpec{Header: codec.PageHeader{Pgno: pgno}, Data: data})
	}
	if hdr.IsSnapshot() && !hdr.NoChecksum() {
		post = codec.ChecksumFlag | sum // a decoder checks it
	}
	spec.Trailer.PostApplyChecksum = post
	return spec
}

// randomPage returns a page that LZ4 compresses well, somewhat, or not at
// all.
func randomPage(rng *rand.Rand, pageSize uint32) []byte {
	b := make([]byte, pageSize)
	switch rng.IntN(5) {
	case 0: // zeros
	case 1: // a short pattern, repeated
		pat := make([]byte, 1+rng.IntN(64))
		for i := range pat {
			pat[i] = byte(rng.Uint32())
		}
		for i := range b {
			b[i] = pat[i%len(pat)]
		}
	case 2: // zeros with a few bytes set
		for range 1 + rng.IntN(32) {
			b[rng.IntN(len(b))] = byte(rng.Uint32())
		}
	case 3: // random
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
	default: // random up to some point, zeros after
		for i := range b[:rng.IntN(len(b))] {
			b[i] = byte(rng.Uint32())
		}
	}
	return b
}

// startAbandoned has enc begin a file to w, maybe failing on a write, and
// leave it unfinished, so that what comes after shows whether any of it
// carries over to the next file.
func startAbandoned(enc *ltx.Encoder, rng *rand.Rand) {
	spec := randomSpec(rng)
	var w io.Writer = io.Discard
	if rng.IntN(2) == 0 {
		w = &failWriter{n: rng.IntN(4096)}
	}
	enc.Reset(w)
	if enc.EncodeHeader(spec.Header) != nil {
		return
	}
	for _, p := range spec.Pages[:rng.IntN(len(spec.Pages)+1)] {
		if enc.EncodePage(p.Header, p.Data) != nil {
			return
		}
	}
}

// failWriter takes n bytes, then fails every write.
type failWriter struct{ n int }

var errDiskFull = errors.New("disk full")

func (w *failWriter) Write(p []byte) (int, error) {
	if len(p) > w.n {
		n := w.n
		w.n = 0
		return n, errDiskFull
	}
	w.n -= len(p)
	return len(p), nil
}

// FuzzEncoder checks that one encoder, reset from file to file, writes
// every file as the codec writes it, and that the codec reads back its
// pages and trailer.
func FuzzEncoder(f *testing.F) {
	for seed := range uint64(12) {
		f.Add(seed, uint8(4+seed))
	}
	f.Fuzz(func(t *testing.T, seed uint64, files uint8) {
		rng := rand.New(rand.NewPCG(seed, 0x6c7478))
		enc := ltx.GetEncoder(nil)
		defer func() { ltx.PutEncoder(enc) }()
		var buf bytes.Buffer
		for i := range int(files%16) + 1 {
			switch rng.IntN(6) {
			case 0:
				startAbandoned(enc, rng)
			case 1:
				ltx.PutEncoder(enc)
				enc = ltx.GetEncoder(nil)
			}
			spec := randomSpec(rng)
			want := checkCodecEncode(t, spec)
			buf.Reset()
			enc.Reset(&buf)
			if err := encodeSpec(enc, spec); err != nil {
				t.Fatalf("file %d: encode: %v", i, err)
			}
			if got := buf.Bytes(); !bytes.Equal(got, want.b) {
				t.Fatalf("file %d (%d-byte pages, %d pages): got %d bytes differing from the codec's %d at offset %d",
					i, spec.Header.PageSize, len(spec.Pages), len(got), len(want.b), firstDiff(got, want.b))
			}
			if got := enc.N(); got != int64(len(want.b)) {
				t.Fatalf("file %d: got N %d, want %d", i, got, len(want.b))
			}
			if got := enc.Header(); got != spec.Header {
				t.Fatalf("file %d: got header %+v, want %+v", i, got, spec.Header)
			}
			if got := enc.Trailer(); got != want.trailer {
				t.Fatalf("file %d: got trailer %+v, want %+v", i, got, want.trailer)
			}
			checkDecode(t, buf.Bytes(), spec, want.trailer)
		}
	})
}

// encoded is a file as the codec encodes it.
type encoded struct {
	b       []byte
	trailer codec.Trailer
}

// checkCodecEncode returns spec as the codec encodes it.
func checkCodecEncode(tb testing.TB, spec *codec.FileSpec) encoded {
	tb.Helper()
	var buf bytes.Buffer
	enc, err := codec.NewEncoder(&buf)
	if err != nil {
		tb.Fatal(err)
	}
	if err := encodeSpec(enc, spec); err != nil {
		tb.Fatalf("codec encode: %v", err)
	}
	return encoded{b: buf.Bytes(), trailer: enc.Trailer()}
}

// checkDecode decodes b with the codec and checks it holds spec's pages
// and the trailer want.
func checkDecode(tb testing.TB, b []byte, spec *codec.FileSpec, want codec.Trailer) {
	tb.Helper()
	dec := codec.NewDecoder(bytes.NewReader(b))
	if err := dec.DecodeHeader(); err != nil {
		tb.Fatalf("decode header: %v", err)
	} else if got := dec.Header(); got != spec.Header {
		tb.Fatalf("got decoded header %+v, want %+v", got, spec.Header)
	}
	data := make([]byte, spec.Header.PageSize)
	for i := 0; ; i++ {
		var ph codec.PageHeader
		if err := dec.DecodePage(&ph, data); err == io.EOF {
			if i != len(spec.Pages) {
				tb.Fatalf("got %d pages decoded, want %d", i, len(spec.Pages))
			}
			break
		} else if err != nil {
			tb.Fatalf("decode page %d: %v", i, err)
		} else if i >= len(spec.Pages) {
			tb.Fatalf("got page %d decoded past the %d written", ph.Pgno, len(spec.Pages))
		}
		if want := spec.Pages[i]; ph.Pgno != want.Header.Pgno || !bytes.Equal(data, want.Data) {
			tb.Fatalf("page %d: got page %d decoded, want page %d (data equal: %v)", i, ph.Pgno, want.Header.Pgno, bytes.Equal(data, want.Data))
		}
	}
	if err := dec.Close(); err != nil {
		tb.Fatalf("decode close: %v", err)
	}
	if got := dec.Trailer(); got != want {
		tb.Fatalf("got decoded trailer %+v, want %+v", got, want)
	}
}

// firstDiff returns the first offset where a and b differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestEncoder_Errors checks that the encoder refuses what the codec refuses,
// with the same error.
func TestEncoder_Errors(t *testing.T) {
	page := make([]byte, 4096)
	txHeader := func(commit uint32) codec.Header {
		return codec.Header{Version: codec.Version, PageSize: 4096, Commit: commit, MinTXID: 2, MaxTXID: 2, PreApplyChecksum: codec.ChecksumFlag | 1}
	}
	snapHeader := codec.Header{Version: codec.Version, PageSize: 4096, Commit: 3, MinTXID: 1, MaxTXID: 1}
	pages := func(enc fileEncoder, hdr codec.Header, pgnos ...uint32) error {
		if err := enc.EncodeHeader(hdr); err != nil {
			return err
		}
		for _, pgno := range pgnos {
			if err := enc.EncodePage(codec.PageHeader{Pgno: pgno}, page); err != nil {
				return err
			}
		}
		return nil
	}
	closed := func(enc fileEncoder, hdr codec.Header, post codec.Checksum, pgnos ...uint32) error {
		if err := pages(enc, hdr, pgnos...); err != nil {
			return err
		}
		enc.SetPostApplyChecksum(post)
		return enc.Close()
	}
	// second returns the error of what follows a call that must fail.
	second := func(first error, then func() error) error {
		if first == nil {
			return errors.New("first call succeeded")
		}
		return then()
	}
	lockPgno := codec.LockPgno(4096)
	for _, c := range []struct {
		name  string
		write int // bytes the writer takes before it fails; 0 for no limit
		fn    func(enc fileEncoder) error
	}{
		{"PageBeforeHeader", 0, func(enc fileEncoder) error { return enc.EncodePage(codec.PageHeader{Pgno: 1}, page) }},
		{"CloseBeforeHeader", 0, func(enc fileEncoder) error { return enc.Close() }},
		{"InvalidHeader", 0, func(enc fileEncoder) error { return enc.EncodeHeader(codec.Header{PageSize: 4096}) }},
		{"HeaderTwice", 0, func(enc fileEncoder) error {
			if err := enc.EncodeHeader(txHeader(2)); err != nil {
				return err
			}
			return enc.EncodeHeader(txHeader(2))
		}},
		{"PageOutOfBounds", 0, func(enc fileEncoder) error { return pages(enc, txHeader(2), 1, 3) }},
		{"PageNumberZero", 0, func(enc fileEncoder) error { return pages(enc, txHeader(2), 0) }},
		{"PageFlags", 0, func(enc fileEncoder) error {
			if err := enc.EncodeHeader(txHeader(2)); err != nil {
				return err
			}
			return enc.EncodePage(codec.PageHeader{Pgno: 1, Flags: 2}, page)
		}},
		{"PageSize", 0, func(enc fileEncoder) error {
			if err := enc.EncodeHeader(txHeader(2)); err != nil {
				return err
			}
			return enc.EncodePage(codec.PageHeader{Pgno: 1}, page[:512])
		}},
		{"OutOfOrder", 0, func(enc fileEncoder) error { return pages(enc, txHeader(9), 3, 2) }},
		{"SamePage", 0, func(enc fileEncoder) error { return pages(enc, txHeader(9), 3, 3) }},
		{"LockPage", 0, func(enc fileEncoder) error { return pages(enc, txHeader(lockPgno+1), 1, lockPgno) }},
		{"SnapshotStart", 0, func(enc fileEncoder) error { return pages(enc, snapHeader, 2) }},
		{"SnapshotGap", 0, func(enc fileEncoder) error { return pages(enc, snapHeader, 1, 3) }},
		{"PostApplyRequired", 0, func(enc fileEncoder) error { return closed(enc, txHeader(2), 0, 1) }},
		{"PostApplyFormat", 0, func(enc fileEncoder) error { return closed(enc, txHeader(2), 1, 1) }},
		{"PostApplyNotAllowed", 0, func(enc fileEncoder) error {
			hdr := txHeader(2)
			hdr.Flags, hdr.PreApplyChecksum = codec.HeaderFlagNoChecksum, 0
			return closed(enc, hdr, codec.ChecksumFlag|1, 1)
		}},
		{"DeletionPostApply", 0, func(enc fileEncoder) error { return closed(enc, txHeader(0), codec.ChecksumFlag|1) }},
		{"CloseAfterFailedClose", 0, func(enc fileEncoder) error {
			return second(closed(enc, txHeader(2), 0, 1), enc.Close)
		}},
		{"PageAfterClose", 0, func(enc fileEncoder) error {
			if err := closed(enc, txHeader(2), codec.ChecksumFlag|1, 1); err != nil {
				return err
			}
			return enc.EncodePage(codec.PageHeader{Pgno: 2}, page)
		}},
		{"HeaderAfterClose", 0, func(enc fileEncoder) error {
			if err := closed(enc, txHeader(2), codec.ChecksumFlag|1, 1); err != nil {
				return err
			}
			return enc.EncodeHeader(txHeader(2))
		}},
		{"WriteHeader", 1, func(enc fileEncoder) error { return pages(enc, txHeader(2)) }},
		{"WritePage", codec.HeaderSize, func(enc fileEncoder) error { return pages(enc, txHeader(2), 1) }},
		{"PageAfterFailedWrite", codec.HeaderSize, func(enc fileEncoder) error {
			return second(pages(enc, txHeader(2), 1), func() error { return enc.EncodePage(codec.PageHeader{Pgno: 2}, page) })
		}},
		{"CloseAfterFailedWrite", codec.HeaderSize, func(enc fileEncoder) error {
			return second(pages(enc, txHeader(2), 1), enc.Close)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			writer := func() io.Writer {
				if c.write == 0 {
					return io.Discard
				}
				return &failWriter{n: c.write}
			}
			want, err := codec.NewEncoder(writer())
			if err != nil {
				t.Fatal(err)
			}
			wantErr := c.fn(want)
			if wantErr == nil {
				t.Fatal("the codec's encoder took it")
			}
			enc := ltx.GetEncoder(writer())
			defer ltx.PutEncoder(enc)
			if err := c.fn(enc); err == nil || err.Error() != wantErr.Error() {
				t.Fatalf("got %v, want %v", err, wantErr)
			}
		})
	}
}

// TestEncoder_LockPage checks that a snapshot goes from the page before the
// lock page to the one after it, and to no other.
func TestEncoder_LockPage(t *testing.T) {
	page := make([]byte, 4096)
	lockPgno := codec.LockPgno(4096)
	enc := ltx.GetEncoder(io.Discard)
	defer ltx.PutEncoder(enc)
	if err := enc.EncodeHeader(codec.Header{Version: codec.Version, PageSize: 4096, Commit: lockPgno + 3, MinTXID: 1, MaxTXID: 1}); err != nil {
		t.Fatal(err)
	}
	enc.SkipPages(lockPgno - 1)
	for _, c := range []struct {
		pgno uint32
		want string
	}{
		{lockPgno, fmt.Sprintf("cannot encode lock page: pgno=%d", lockPgno)},
		{lockPgno + 2, fmt.Sprintf("nonsequential page numbers in snapshot transaction (skip lock page): %d,%d", lockPgno-1, lockPgno+2)},
		{lockPgno + 1, ""},
		{lockPgno + 3, fmt.Sprintf("nonsequential page numbers in snapshot transaction: %d,%d", lockPgno+1, lockPgno+3)},
		{lockPgno + 2, ""},
	} {
		err := enc.EncodePage(codec.PageHeader{Pgno: c.pgno}, page)
		if got := fmt.Sprint(err); (c.want == "" && err != nil) || (c.want != "" && got != c.want) {
			t.Fatalf("page %d: got %v, want %q", c.pgno, err, c.want)
		}
	}
}

// TestEncoder_Allocs checks that an encoder Reset for each file writes a
// one-page file allocating nothing, where the codec's allocates itself
// (its LZ4 table is 136 KiB) and a dozen small buffers per file. It
// measures one encoder, not the pool, whose content a garbage collection
// may drop at any time; the bound is one allocation per file, as a race
// build may add one.
func TestEncoder_Allocs(t *testing.T) {
	spec := &codec.FileSpec{
		Header:  codec.Header{Version: codec.Version, PageSize: 4096, Commit: 1, MinTXID: 1, MaxTXID: 1},
		Pages:   []codec.PageSpec{{Header: codec.PageHeader{Pgno: 1}, Data: bytes.Repeat([]byte("page"), 1024)}},
		Trailer: codec.Trailer{PostApplyChecksum: codec.ChecksumFlag | 1},
	}
	var buf bytes.Buffer
	reused := ltx.GetEncoder(&buf)
	defer ltx.PutEncoder(reused)
	pooled := func() {
		buf.Reset()
		reused.Reset(&buf)
		if err := encodeSpec(reused, spec); err != nil {
			t.Fatal(err)
		}
	}
	upstream := func() {
		buf.Reset()
		enc, _ := codec.NewEncoder(&buf)
		if err := encodeSpec(enc, spec); err != nil {
			t.Fatal(err)
		}
	}
	pooled()
	got, bytesGot := allocs(pooled)
	want, bytesWant := allocs(upstream)
	t.Logf("reused: %v allocs, %d bytes per file; codec: %v allocs, %d bytes", got, bytesGot, want, bytesWant)
	if got > 1 {
		t.Fatalf("got %v allocs per file, want at most 1", got)
	}
	if bytesGot >= 1<<10 {
		t.Fatalf("got %d bytes allocated per file, want under 1 KiB", bytesGot)
	}
	if want <= got || bytesWant < 136<<10 {
		t.Fatalf("got the codec's encoder allocating %v times, %d bytes per file: not what it is to be compared with", want, bytesWant)
	}
}

// allocs returns the allocations and bytes allocated per call of fn.
func allocs(fn func()) (float64, uint64) {
	const runs = 100
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		fn()
	}
	runtime.ReadMemStats(&after)
	return testing.AllocsPerRun(runs, fn), (after.TotalAlloc - before.TotalAlloc) / runs
}

// BenchmarkEncoder compares the codec's encoder, made for every file, with
// a pooled one, on files of 4 KiB pages that are half random, half zeros.
func BenchmarkEncoder(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{1, 10} {
		spec := &codec.FileSpec{
			Header:  codec.Header{Version: codec.Version, PageSize: 4096, Commit: 100, MinTXID: 2, MaxTXID: 2, PreApplyChecksum: codec.ChecksumFlag | 1},
			Trailer: codec.Trailer{PostApplyChecksum: codec.ChecksumFlag | 2},
		}
		for i := range n {
			data := make([]byte, 4096)
			for j := range data[:2048] {
				data[j] = byte(rng.Uint32())
			}
			spec.Pages = append(spec.Pages, codec.PageSpec{Header: codec.PageHeader{Pgno: uint32(1 + 3*i)}, Data: data})
		}
		var buf bytes.Buffer
		b.Run(fmt.Sprintf("upstream/pages=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(4096 * n))
			for b.Loop() {
				buf.Reset()
				enc, _ := codec.NewEncoder(&buf)
				if err := encodeSpec(enc, spec); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("reused/pages=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(4096 * n))
			for b.Loop() {
				buf.Reset()
				enc := ltx.GetEncoder(&buf)
				if err := encodeSpec(enc, spec); err != nil {
					b.Fatal(err)
				}
				ltx.PutEncoder(enc)
			}
		})
	}
}

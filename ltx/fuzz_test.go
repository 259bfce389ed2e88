package ltx_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	codec "github.com/superfly/ltx"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// Byte offsets in an LTX file, for seeds that change one field.
const (
	hdrFlagsOff    = 4                                       // header flags, uint32
	hdrPageSizeOff = 8                                       // header page size, uint32
	hdrCommitOff   = 12                                      // header commit, uint32
	pgnoOff        = codec.HeaderSize                        // first page frame's page number, uint32
	frameFlagsOff  = codec.HeaderSize + 4                    // its flags, uint16
	frameSizeOff   = codec.HeaderSize + codec.PageHeaderSize // its compressed size, uint32
)

// sampleLTX returns the content of the sample log's LTX files, in order.
func sampleLTX(tb testing.TB) [][]byte {
	tb.Helper()
	var a [][]byte
	for _, name := range sampleFiles {
		a = append(a, testingutil.MustReadFile(tb, filepath.Join(sampleLog, name)))
	}
	return a
}

// truncations returns b cut where its parts meet: nothing, inside and after
// the header, after the first page header, halfway, before the trailer and
// one byte short.
func truncations(b []byte) [][]byte {
	var a [][]byte
	for _, n := range []int{0, 1, codec.HeaderSize - 1, codec.HeaderSize, pgnoOff + codec.PageHeaderSize, len(b) / 2, len(b) - codec.TrailerSize, len(b) - 1} {
		if n >= 0 && n < len(b) {
			a = append(a, b[:n])
		}
	}
	return a
}

// patched returns a copy of b with v written at off.
func patched(b []byte, off int, v ...byte) []byte {
	b = bytes.Clone(b)
	copy(b[off:], v)
	return b
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// sealOf returns the seal of a file with content b: its CRC-64/ISO with
// the checksum flag set.
func sealOf(b []byte) ltx.Checksum {
	return ltx.ChecksumFlag | ltx.Checksum(crc64.Checksum(b, crc64.MakeTable(crc64.ISO)))
}

// verifyBytes reads b through a VerifyReader expecting seal.
func verifyBytes(b []byte, seal ltx.Checksum) (*ltx.VerifyReader, []byte, error) {
	vr := ltx.NewVerifyReader(bytes.NewReader(b), seal)
	got, err := io.ReadAll(vr)
	return vr, got, err
}

// headerTrailer decodes the header at the start of b and the trailer at its
// end, without checking them.
func headerTrailer(b []byte) (codec.Header, codec.Trailer, bool) {
	var hdr codec.Header
	var tr codec.Trailer
	if len(b) < codec.HeaderSize+codec.TrailerSize {
		return hdr, tr, false
	}
	if hdr.UnmarshalBinary(b[:codec.HeaderSize]) != nil || tr.UnmarshalBinary(b[len(b)-codec.TrailerSize:]) != nil {
		return hdr, tr, false
	}
	return hdr, tr, true
}

// FuzzParseName checks that ParseName accepts exactly the canonical names
// of valid TXID ranges: what it accepts formats back to the same name with
// 1 <= min <= max, and what it refuses is no such name.
func FuzzParseName(f *testing.F) {
	for _, name := range append(append([]string(nil), sampleFiles...),
		"0000000000000002-0000000000000004.pos",
		"0000000000000001-0000000000000001.ltx.tmp",
		"0000000000000000-0000000000000000.ltx", // txid 0
		"0000000000000000-0000000000000001.ltx",
		"0000000000000005-0000000000000004.ltx", // range reversed
		"ffffffffffffffff-ffffffffffffffff.ltx",
		"000000000000000A-000000000000000A.ltx", // upper case
		"1-1.ltx",
		"0000000000000001-0000000000000001.ltx\n",
		"",
	) {
		f.Add(name)
	}
	f.Fuzz(func(t *testing.T, name string) {
		min, max, err := ltx.ParseName(name)
		if err != nil {
			cmin, cmax, cerr := codec.ParseFilename(name)
			if cerr == nil && cmin >= 1 && cmin <= cmax && ltx.FormatName(cmin, cmax) == name {
				t.Fatalf("ParseName(%q) refused the name of txid %s-%s: %v", name, cmin, cmax, err)
			}
			return
		}
		if min < 1 || min > max {
			t.Fatalf("ParseName(%q) = %s-%s, want 1 <= min <= max", name, min, max)
		}
		if got := ltx.FormatName(min, max); got != name {
			t.Fatalf("ParseName(%q) = %s-%s, which formats as %q", name, min, max, got)
		}
	})
}

// FuzzVerifyReader checks that a VerifyReader passes a file through
// unchanged exactly when it is valid: on success the output is the input
// and the codec's own Verify agrees, with the same header and trailer; on
// failure the error is ErrCorrupt and the output is a prefix of the input.
// A file that verifies also verifies with its seal and fails with any
// other; a seal never makes a bad file pass.
func FuzzVerifyReader(f *testing.F) {
	for _, b := range sampleLTX(f) {
		f.Add(b, uint64(sealOf(b)))
		f.Add(b, uint64(sealOf(b)^1))
		f.Add(b, uint64(sealOf(b)&^ltx.ChecksumFlag))
		for _, c := range truncations(b) {
			f.Add(c, uint64(0))
		}
		f.Add(append(bytes.Clone(b), 0), uint64(0))                     // a byte past the trailer
		f.Add(patched(b, frameSizeOff, be32(^uint32(0))...), uint64(0)) // a frame size the guard refuses
		f.Add(patched(b, frameFlagsOff, 0, 0), uint64(0))               // an LZ4 frame instead of a block
		f.Add(patched(b, pgnoOff, be32(0)...), uint64(0))               // page 0
		f.Add(patched(b, hdrPageSizeOff, be32(512)...), uint64(0))      // another page size
		commit := binary.BigEndian.Uint32(b[hdrCommitOff:])
		f.Add(patched(b, hdrCommitOff, be32(commit+1)...), uint64(0)) // one page more: a snapshot misses its last
	}
	f.Fuzz(func(t *testing.T, b []byte, other uint64) {
		vr, got, err := verifyBytes(b, 0)
		if !bytes.HasPrefix(b, got) {
			t.Fatalf("handed out %d bytes that are not a prefix of the %d-byte input", len(got), len(b))
		}
		seal := sealOf(b)
		if err != nil {
			if !errors.Is(err, ltx.ErrCorrupt) {
				t.Fatalf("err = %v, want ErrCorrupt", err)
			}
			if _, _, err := verifyBytes(b, seal); !errors.Is(err, ltx.ErrCorrupt) {
				t.Fatalf("with its seal a file that fails without one gives err = %v, want ErrCorrupt", err)
			}
			return
		}
		if !bytes.Equal(got, b) {
			t.Fatalf("verified %d bytes but handed out %d different ones", len(b), len(got))
		}
		dec := codec.NewDecoder(bytes.NewReader(b))
		if err := dec.Verify(); err != nil {
			t.Fatalf("VerifyReader accepted a file the codec refuses: %v", err)
		}
		if vr.Header() != dec.Header() || vr.Trailer() != dec.Trailer() {
			t.Fatalf("header %+v, trailer %+v; codec says %+v, %+v", vr.Header(), vr.Trailer(), dec.Header(), dec.Trailer())
		}
		if _, got, err := verifyBytes(b, seal); err != nil || !bytes.Equal(got, b) {
			t.Fatalf("with its seal %s: %d bytes, err = %v; want the file, nil", seal, len(got), err)
		}
		wrong := ltx.Checksum(other)
		if wrong == 0 || wrong == seal {
			wrong = seal ^ 1
		}
		if _, _, err := verifyBytes(b, wrong); !errors.Is(err, ltx.ErrCorrupt) {
			t.Fatalf("with seal %s instead of %s: err = %v, want ErrCorrupt", wrong, seal, err)
		}
	})
}

// FuzzReadFileInfo checks ReadFileInfo on any bytes under any file name:
// what it accepts has a valid header and trailer, which it reports as they
// are in the file, with the TXIDs of the name and the file's size; what it
// refuses is ErrCorrupt and does not decode in full with a valid trailer and
// a name that agrees.
func FuzzReadFileInfo(f *testing.F) {
	files := sampleLTX(f)
	for i, b := range files {
		f.Add(sampleFiles[i], b)
		for _, c := range truncations(b) {
			f.Add(sampleFiles[i], c)
		}
		f.Add(sampleFiles[i], patched(b, len(b)-codec.TrailerSize, 0)) // post-apply checksum without its flag
		f.Add(sampleFiles[(i+1)%len(files)], b)                        // another file's name
		f.Add("db.ltx", b)                                             // a name without TXIDs
	}
	f.Add(sampleFiles[1], testingutil.MustReadFile(f, filepath.Join(sampleLog, "0000000000000002-0000000000000004.pos")))
	f.Fuzz(func(t *testing.T, name string, b []byte) {
		if name == "" || name == "." || name == ".." || len(name) > 255 || strings.ContainsAny(name, "/\x00") {
			return // not a file name
		}
		path := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		hdr, tr, ok := headerTrailer(b)
		min, max, nameErr := ltx.ParseName(name)
		nameAgrees := nameErr != nil || (min == hdr.MinTXID && max == hdr.MaxTXID)

		info, err := ltx.ReadFileInfo(path)
		if err != nil {
			if !errors.Is(err, ltx.ErrCorrupt) {
				t.Fatalf("err = %v, want ErrCorrupt", err)
			}
			if _, _, verr := verifyBytes(b, 0); verr == nil && ok && tr.Validate(hdr) == nil && nameAgrees {
				t.Fatalf("refused a file that verifies, under a name that agrees: %v", err)
			}
			return
		}
		if !ok || info.Header != hdr || info.PostApplyChecksum != tr.PostApplyChecksum || info.FileChecksum != tr.FileChecksum {
			t.Fatalf("info %+v does not hold the header and trailer of the file", info)
		}
		if err := info.Header.Validate(); err != nil {
			t.Fatalf("accepted an invalid header: %v", err)
		}
		if err := tr.Validate(info.Header); err != nil {
			t.Fatalf("accepted an invalid trailer: %v", err)
		}
		if !nameAgrees {
			t.Fatalf("accepted %s with header txid %s-%s", name, info.Header.MinTXID, info.Header.MaxTXID)
		}
		if info.Name != name || info.Size != int64(len(b)) || info.Seal != 0 {
			t.Fatalf("name %q, size %d, seal %s; want %q, %d, 0 (unsealed)", info.Name, info.Size, info.Seal, name, len(b))
		}
	})
}

// FuzzDecodePositions checks that what decodePositions accepts encodes
// back to the same bytes, holds one checksum per TXID of a valid range,
// and each is 0 (unknown) or a valid checksum. Each input is also decoded
// with its trailing CRC made right, so the fuzzer gets past the CRC check.
func FuzzDecodePositions(f *testing.F) {
	sidecar := testingutil.MustReadFile(f, filepath.Join(sampleLog, "0000000000000002-0000000000000004.pos"))
	f.Add(sidecar)
	for _, c := range truncations(sidecar) {
		f.Add(c)
	}
	sum := ltx.ChecksumFlag | 0x1234
	for _, b := range [][]byte{
		ltx.EncodePositions(1, []ltx.Checksum{sum}),
		ltx.EncodePositions(3, []ltx.Checksum{0, sum, 0}),                  // positions inside a snapshot
		ltx.EncodePositions(^ltx.TXID(0), []ltx.Checksum{sum}),             // the last TXID
		ltx.EncodePositions(^ltx.TXID(0)-1, []ltx.Checksum{sum, sum, sum}), // range past the last TXID
		ltx.EncodePositions(0, []ltx.Checksum{sum}),                        // TXID 0
		ltx.EncodePositions(1, []ltx.Checksum{5}),                          // checksum without its flag
		ltx.EncodePositions(1, nil),                                        // no checksums
		patched(sidecar, 4, be32(2)...),                                    // version 2
		patched(sidecar, 0, 'L', 'T', 'X', '1'),                            // an LTX file's magic
	} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkPositions(t, b)
		if len(b) >= 8 {
			fixed := bytes.Clone(b)
			binary.BigEndian.PutUint64(fixed[len(b)-8:], crc64.Checksum(b[:len(b)-8], crc64.MakeTable(crc64.ISO)))
			checkPositions(t, fixed)
		}
	})
}

func checkPositions(t *testing.T, b []byte) {
	t.Helper()
	min, max, sums, err := ltx.DecodePositions(b)
	if err != nil {
		return
	}
	if min < 1 || max < min || uint64(max-min) != uint64(len(sums)-1) {
		t.Fatalf("txid range %s-%s with %d checksums", min, max, len(sums))
	}
	for i, s := range sums {
		if s != 0 && s&ltx.ChecksumFlag == 0 {
			t.Fatalf("checksum %d is %s, neither 0 nor valid", i, s)
		}
	}
	if got := ltx.EncodePositions(min, sums); !bytes.Equal(got, b) {
		t.Fatalf("decoded %s-%s %v, which encodes as\n%x\nnot\n%x", min, max, sums, got, b)
	}
}

// FuzzReadPageSize checks that ReadPageSize returns 0 only for an empty
// input and otherwise only the page size a SQLite header records: a power
// of two from 512 to 65536, read from a full header with the SQLite magic.
func FuzzReadPageSize(f *testing.F) {
	db := testingutil.MustReadFile(f, "testdata/sample.db")
	hdr := db[:100]
	for _, b := range [][]byte{
		db[:512], hdr, hdr[:99], hdr[:16], {},
		patched(hdr, 16, 0, 1),       // 1 means 65536
		patched(hdr, 16, 0x80, 0),    // 32768
		patched(hdr, 16, 2, 0),       // 512
		patched(hdr, 16, 1, 0),       // 256: too small
		patched(hdr, 16, 0, 0),       // 0
		patched(hdr, 16, 0x0c, 0),    // 3072: not a power of two
		patched(hdr, 16, 0xff, 0xff), // 65535
		patched(hdr, 0, 's'),         // magic in lower case
		[]byte("SQLite format 3\x00"),
	} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ps, err := ltx.ReadPageSize(bytes.NewReader(b))
		if err != nil {
			if len(b) == 0 {
				t.Fatalf("empty input: err = %v, want page size 0", err)
			}
			return
		}
		if ps == 0 {
			if len(b) != 0 {
				t.Fatalf("page size 0 for %d bytes", len(b))
			}
			return
		}
		if ps < 512 || ps > 65536 || ps&(ps-1) != 0 {
			t.Fatalf("page size %d", ps)
		}
		if len(b) < 100 || !bytes.HasPrefix(b, []byte("SQLite format 3\x00")) {
			t.Fatalf("page size %d from %d bytes that are no SQLite header: %q", ps, len(b), b[:min(len(b), 16)])
		}
		if field := uint32(binary.BigEndian.Uint16(b[16:])); field != ps && !(field == 1 && ps == 65536) {
			t.Fatalf("page size %d, header records %d", ps, field)
		}
	})
}

// boundFile is a database file in memory that records a write or truncate
// past limit, the commit size of the LTX file being applied. Past
// memFileMax it fails like a full disk.
type boundFile struct {
	memFile
	limit int64
	past  error // the first write or truncate past limit
}

const memFileMax = 64 << 20

var errMemFull = errors.New("memory file full")

func (m *boundFile) WriteAt(p []byte, off int64) (int, error) {
	if err := m.check("write", off+int64(len(p))); err != nil {
		return 0, err
	}
	return m.memFile.WriteAt(p, off)
}

func (m *boundFile) Truncate(size int64) error {
	if err := m.check("truncate", size); err != nil {
		return err
	}
	return m.memFile.Truncate(size)
}

func (m *boundFile) check(op string, end int64) error {
	if end > m.limit {
		if m.past == nil {
			m.past = fmt.Errorf("%s to byte %d, past the commit size of %d bytes", op, end, m.limit)
		}
		return m.past
	}
	if end > memFileMax {
		return errMemFull
	}
	return nil
}

// readTable returns the checksum table of a database image, computed from
// scratch.
func readTable(tb testing.TB, image []byte) *ltx.ChecksumTable {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "db")
	if err := os.WriteFile(path, image, 0o644); err != nil {
		tb.Fatal(err)
	}
	tbl, err := ltx.ReadChecksumTable(path)
	if err != nil {
		tb.Fatalf("the database left is unreadable: %v", err)
	}
	return tbl
}

// tableDiff says how two checksum tables differ, or returns "".
func tableDiff(got, want *ltx.ChecksumTable) string {
	if got.PageSize() != want.PageSize() || got.Pages() != want.Pages() || got.Checksum() != want.Checksum() {
		return fmt.Sprintf("page size %d, %d pages, checksum %s; want %d, %d, %s",
			got.PageSize(), got.Pages(), got.Checksum(), want.PageSize(), want.Pages(), want.Checksum())
	}
	for pgno := uint32(1); pgno <= got.Pages(); pgno++ {
		if got.Page(pgno) != want.Page(pgno) {
			return fmt.Sprintf("page %d checksum %s, want %s", pgno, got.Page(pgno), want.Page(pgno))
		}
	}
	return ""
}

// FuzzApply applies any bytes to the sample database as it was before its
// last file. Apply must never write or grow the database past the commit
// size in the file's header. On success the file applied at the database's
// position (or is a snapshot), the database is exactly commit pages, its
// checksum computed afresh is the returned position's, and the table it
// updated equals a fresh one. On failure the position and table are
// unchanged.
func FuzzApply(f *testing.F) {
	ctx := context.Background()
	files := sampleLTX(f)
	dbPath := filepath.Join(f.TempDir(), "db")
	pos, err := ltx.Restore(ctx, dbPath, bytes.NewReader(files[0]), bytes.NewReader(files[1]))
	if err != nil {
		f.Fatal(err)
	}
	base := testingutil.MustReadFile(f, dbPath)
	table, err := ltx.ReadChecksumTable(dbPath)
	if err != nil {
		f.Fatal(err)
	}

	last := files[2]
	commit := binary.BigEndian.Uint32(last[hdrCommitOff:])
	for _, b := range files {
		f.Add(b) // applies; a snapshot, which applies anywhere; applies elsewhere
	}
	for _, c := range truncations(last) {
		f.Add(c)
	}
	for _, b := range [][]byte{
		patched(last, pgnoOff, be32(commit+1)...), // a page past commit
		patched(last, pgnoOff, be32(0)...),        // page 0
		patched(last, hdrCommitOff, be32(1)...),   // shrinks below its own pages
		patched(patched(last, hdrCommitOff, be32(^uint32(0))...), pgnoOff, be32(codec.LockPgno(4096))...), // the lock page
		patched(patched(last, hdrCommitOff, be32(^uint32(0))...), pgnoOff, be32(^uint32(0))...),           // the last page there is
		patched(last, frameSizeOff, be32(^uint32(0))...),                                                  // a frame size the guard refuses
		patched(last, hdrFlagsOff, be32(codec.HeaderFlagNoChecksum)...),                                   // no checksums
	} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var hdr codec.Header
		mem := &boundFile{memFile: memFile{b: bytes.Clone(base)}}
		if hdr.UnmarshalBinary(b) == nil {
			mem.limit = int64(hdr.Commit) * int64(hdr.PageSize)
		}
		tbl := table.Clone()
		got, err := ltx.Apply(ctx, mem, tbl, pos, bytes.NewReader(b))
		if mem.past != nil {
			t.Fatalf("Apply wrote outside the database: %v (Apply returned %v)", mem.past, err)
		}
		if err != nil {
			if got != pos {
				t.Fatalf("failed (%v) but moved the position from %s to %s", err, pos, got)
			}
			if d := tableDiff(tbl, table); d != "" {
				t.Fatalf("failed (%v) but changed the table: %s", err, d)
			}
			return
		}
		_, tr, _ := headerTrailer(b)
		if !hdr.IsSnapshot() && hdr.PreApplyPos() != pos {
			t.Fatalf("applied a file for %s at %s", hdr.PreApplyPos(), pos)
		}
		if want := (ltx.Pos{TXID: hdr.MaxTXID, PostApplyChecksum: tr.PostApplyChecksum}); got != want {
			t.Fatalf("returned position %s, the file leaves %s", got, want)
		}
		if int64(len(mem.b)) != mem.limit {
			t.Fatalf("database is %d bytes, want %d pages of %d", len(mem.b), hdr.Commit, hdr.PageSize)
		}
		fresh := readTable(t, mem.b)
		if fresh.Checksum() != got.PostApplyChecksum {
			t.Fatalf("returned position %s, but the database written has checksum %s", got, fresh.Checksum())
		}
		if d := tableDiff(tbl, fresh); d != "" {
			t.Fatalf("updated table differs from the database written: %s", d)
		}
	})
}

// FuzzLogOpen opens the sample log with one of its files (chosen by which)
// replaced by content. If Open fails, the directory is as it was. If it
// succeeds, the log's files chain, a cursor from the first position reads
// each of them, byte for byte, to the log's position, and nothing is lost:
// see assertOpenLostNothing.
func FuzzLogOpen(f *testing.F) {
	entries, err := os.ReadDir(sampleLog)
	if err != nil {
		f.Fatal(err)
	}
	for i, e := range entries {
		b := testingutil.MustReadFile(f, filepath.Join(sampleLog, e.Name()))
		f.Add(uint8(i), b)
		for _, c := range truncations(b) {
			f.Add(uint8(i), c)
		}
		f.Add(uint8(i), patched(b, len(b)/2, b[len(b)/2]^1)) // a bit flipped halfway
	}
	f.Fuzz(func(t *testing.T, which uint8, content []byte) {
		ctx, dir, before, l := openRewritten(t, sampleLog, entries[int(which)%len(entries)].Name(), content)
		if l == nil {
			return
		}

		files := l.Files()
		for i := 1; i < len(files); i++ {
			if files[i].PreApplyPos() != files[i-1].Pos() {
				t.Fatalf("%s applies at %s but %s leaves %s", files[i].Name, files[i].PreApplyPos(), files[i-1].Name, files[i-1].Pos())
			}
		}
		c, err := l.Cursor(l.First())
		if err != nil {
			t.Fatalf("cursor at the log's first position %s: %v", l.First(), err)
		}
		for _, fi := range files {
			r, err := c.Next(ctx)
			if err != nil {
				t.Fatalf("next after %s: %v", c.Pos(), err)
			}
			got, err := io.ReadAll(r)
			_ = r.Close()
			if err != nil || r.Info.Name != fi.Name || !bytes.Equal(got, testingutil.MustReadFile(t, filepath.Join(dir, fi.Name))) {
				t.Fatalf("cursor served %s (%d bytes, err %v), want %s as it is on disk", r.Info.Name, len(got), err, fi.Name)
			}
		}
		if c.Pos() != l.Pos() {
			t.Fatalf("cursor read every file to %s, log is at %s", c.Pos(), l.Pos())
		}
		assertOpenLostNothing(t, dir, before, files)
	})
}

// assertOpenLostNothing checks what a successful Open did to a log
// directory that held the files before: each LTX file is in the log,
// unchanged; or was moved unchanged to corrupt/, does not verify and comes
// after the log's last TXID; or was removed, superseded by a file in the
// log. A sidecar of a file in the log is unchanged; any other is unchanged
// or removed. No other file appears.
func assertOpenLostNothing(t *testing.T, dir string, before map[string]string, files []ltx.FileInfo) {
	t.Helper()
	after := dirState(t, dir)
	kept := map[string]bool{}
	var last ltx.TXID
	for _, fi := range files {
		kept[fi.Name] = true
		last = fi.Header.MaxTXID
	}
	superseded := func(min, max ltx.TXID) bool {
		for _, fi := range files {
			if fi.Header.MinTXID <= min && max <= fi.Header.MaxTXID {
				return true
			}
		}
		return false
	}
	const aside = "corrupt/"
	for name, sum := range before {
		ltxName := name
		if base, ok := strings.CutSuffix(name, ".pos"); ok {
			ltxName = base + ".ltx"
		}
		min, max, _ := ltx.ParseName(ltxName)
		switch {
		case kept[ltxName]:
			if after[name] != sum {
				t.Errorf("%s: belongs to the log but was changed or removed", name)
			}
		case strings.HasSuffix(name, ".pos"):
			if after[name] != "" && after[name] != sum {
				t.Errorf("%s: changed", name)
			}
		case after[name] != "":
			t.Errorf("%s: left in the directory but not in the log", name)
		case after[aside+name] == sum:
			if min <= last {
				t.Errorf("%s: moved aside, but the log runs to txid %s", name, last)
			}
			if _, err := ltx.VerifyFile(filepath.Join(dir, aside+name)); !errors.Is(err, ltx.ErrCorrupt) {
				t.Errorf("%s: moved aside, but verifies: err = %v", name, err)
			}
		case superseded(min, max):
		default:
			t.Errorf("%s: lost", name)
		}
	}
	for name := range after {
		if _, ok := before[name]; !ok && !(strings.HasPrefix(name, aside) && before[strings.TrimPrefix(name, aside)] != "") {
			t.Errorf("%s: appeared", name)
		}
	}
}

// FuzzSegmentOpen opens a log of one segment whose segment file or index
// the fuzzer rewrote. Open either fails and changes nothing, or opens a
// log whose files form a chain, each served whole and verified by a
// cursor, and each of them one of the files the log was written with.
func FuzzSegmentOpen(f *testing.F) {
	base := f.TempDir()
	d := newSegmentDB(f, base, 11, 0)
	d.run(6, t0, nil)
	written := map[string]ltx.FileInfo{}
	for _, fi := range d.log.Files() {
		written[fi.Name] = fi
	}
	if err := d.log.Close(); err != nil {
		f.Fatal(err)
	}
	names := []string{"0000000000000001.segment", "0000000000000001.index"}
	for i, name := range names {
		b := testingutil.MustReadFile(f, filepath.Join(d.log.Dir, name))
		f.Add(uint8(i), b)
		for _, c := range truncations(b) {
			f.Add(uint8(i), c)
		}
		f.Add(uint8(i), patched(b, len(b)/2, b[len(b)/2]^1))
		f.Add(uint8(i), append(bytes.Clone(b), b[:min(len(b), 100)]...))
	}
	f.Fuzz(func(t *testing.T, which uint8, content []byte) {
		ctx, _, _, l := openRewritten(t, d.log.Dir, names[int(which)%len(names)], content)
		if l == nil {
			return
		}
		files := l.Files()
		for i, fi := range files {
			if w, ok := written[fi.Name]; !ok || w.Pos() != fi.Pos() || w.Size != fi.Size {
				t.Fatalf("log holds %s at %s, %d bytes: not a file it was written with", fi.Name, fi.Pos(), fi.Size)
			}
			if i > 0 && fi.PreApplyPos() != files[i-1].Pos() {
				t.Fatalf("%s applies at %s but %s leaves %s", fi.Name, fi.PreApplyPos(), files[i-1].Name, files[i-1].Pos())
			}
		}
		c, err := l.Cursor(l.First())
		if err != nil {
			t.Fatalf("cursor at the log's first position %s: %v", l.First(), err)
		}
		for range files {
			r, err := c.Next(ctx)
			if err != nil {
				t.Fatalf("next after %s: %v", c.Pos(), err)
			}
			n, err := io.Copy(io.Discard, r)
			_ = r.Close()
			if errors.Is(err, ltx.ErrCorrupt) {
				return // damage inside a file Open did not decode: found as it is read
			}
			if err != nil || n != r.Info.Size {
				t.Fatalf("cursor served %s: %d of %d bytes, err %v", r.Info.Name, n, r.Info.Size, err)
			}
		}
	})
}

// openRewritten copies the log directory src, writes content over its file
// name, and opens the copy as a log without a database. It returns a
// context that bounds the test's waits (a cursor that waited would hang
// the fuzzer), the copy, its state before Open, and the log; or a nil log
// if Open failed, having checked that Open changed nothing.
func openRewritten(t *testing.T, src, name string, content []byte) (context.Context, string, map[string]string, *ltx.Log) {
	t.Helper()
	dir := copyDir(t, src)
	if err := os.WriteFile(filepath.Join(dir, name), content, 0o644); err != nil {
		t.Fatal(err)
	}
	before := dirState(t, dir)
	l := ltx.NewLog("fuzz", dir, "")
	l.Logger = slog.New(slog.DiscardHandler)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	if err := l.Open(ctx); err != nil {
		assertDirState(t, dir, before)
		return ctx, dir, before, nil
	}
	t.Cleanup(func() { _ = l.Close() })
	return ctx, dir, before, l
}

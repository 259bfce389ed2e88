package ltx_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// newSegmentDB is newFakeDB with a log that writes segments of size bytes
// (0: the default).
func newSegmentDB(tb testing.TB, dir string, seed uint64, size int64) *fakeDB {
	tb.Helper()
	d := newFakeData(tb, dir, seed)
	l, err := openSegmentLog(tb, filepath.Join(dir, "ltx"), d.path, size, nil)
	if err != nil {
		tb.Fatal(err)
	}
	d.log = l
	return d
}

// openSegmentLog opens the segment log in dir of the database at dbPath.
func openSegmentLog(tb testing.TB, dir, dbPath string, size int64, mayBeUnsynced func(ltx.Header) bool) (*ltx.Log, error) {
	l := testingutil.NewSegmentLog(tb, "db", dir, dbPath)
	if size > 0 {
		l.SegmentSize = size
	}
	l.MayBeUnsynced = mayBeUnsynced
	if err := l.Open(context.Background()); err != nil {
		return nil, err
	}
	tb.Cleanup(func() { _ = l.Close() })
	return l, nil
}

// reopen closes d's log and opens it again, as a restart does.
func (d *fakeDB) reopen(size int64, mayBeUnsynced func(ltx.Header) bool) error {
	d.tb.Helper()
	if err := d.log.Close(); err != nil {
		d.tb.Fatal(err)
	}
	l, err := openSegmentLog(d.tb, d.log.Dir, d.path, size, mayBeUnsynced)
	if err == nil {
		d.log = l
	}
	return err
}

// logNames returns the names in dir, sorted, directories with a slash.
func logNames(tb testing.TB, dir string) []string {
	tb.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() {
			name += "/"
		}
		names = append(names, name)
	}
	return names
}

// readAll reads every file of l through a cursor from the start, each to
// io.EOF (which verifies it), and returns their infos.
func readAll(tb testing.TB, l *ltx.Log) []ltx.FileInfo {
	tb.Helper()
	c, err := l.Cursor(ltx.Pos{})
	if err != nil {
		tb.Fatal(err)
	}
	var infos []ltx.FileInfo
	for c.Pos() != l.Pos() {
		r := mustNext(tb, c)
		if _, err := io.Copy(io.Discard, r); err != nil {
			tb.Fatalf("read %s: %v", r.Info.Name, err)
		}
		_ = r.Close()
		infos = append(infos, r.Info)
	}
	return infos
}

func TestSegment_CommitAndReopen(t *testing.T) {
	d := newSegmentDB(t, t.TempDir(), 1, 0)
	d.run(40, t0, nil)
	dir := d.log.Dir
	if got, want := logNames(t, dir), []string{"0000000000000001.index", "0000000000000001.segment"}; !slices.Equal(got, want) {
		t.Fatalf("log directory holds %v, want %v: one segment, no file per transaction", got, want)
	}
	files := d.log.Files()
	if len(files) != 40 {
		t.Fatalf("%d files in the log, want 40", len(files))
	}
	for i, f := range files {
		if want := ltx.FormatName(ltx.TXID(i+1), ltx.TXID(i+1)); f.Name != want || f.Seal == 0 {
			t.Fatalf("file %d is %s with seal %s, want %s, sealed", i, f.Name, f.Seal, want)
		}
	}
	if st := mustStat(t, filepath.Join(dir, "0000000000000001.index")); st.Size() != 40*56 {
		t.Fatalf("index holds %d bytes, want 40 records of 56", st.Size())
	}
	var size int64
	for _, f := range files {
		size += f.Size
	}
	if st := mustStat(t, filepath.Join(dir, "0000000000000001.segment")); st.Size() != size {
		t.Fatalf("segment holds %d bytes, its files %d", st.Size(), size)
	}
	if got := readAll(t, d.log); !slices.Equal(got, files) {
		t.Fatalf("cursor read %d files, not the log's %d as listed", len(got), len(files))
	}

	pos := d.log.Pos()
	if err := d.reopen(0, nil); err != nil {
		t.Fatal(err)
	}
	if d.log.Pos() != pos || !slices.Equal(d.log.Files(), files) {
		t.Fatalf("reopened at %s with %d files, want %s and the same %d files", d.log.Pos(), len(d.log.Files()), pos, len(files))
	}
	// A reopened log appends to a segment of its own.
	d.run(5, t0.Add(time.Hour), nil)
	if got, want := logNames(t, dir), []string{"0000000000000001.index", "0000000000000001.segment", "0000000000000029.index", "0000000000000029.segment"}; !slices.Equal(got, want) {
		t.Fatalf("log directory holds %v, want %v", got, want)
	}

	r, err := ltx.VerifyDir(dir)
	if err != nil {
		t.Fatal(err)
	} else if !r.OK() || len(r.Files) != 45 || len(r.Stored) != 45 || !r.Stored[44].Segment {
		t.Fatalf("verify: %d files, %d stored, problems %v", len(r.Files), len(r.Stored), r.Problems)
	}
	restored := filepath.Join(t.TempDir(), "restored")
	if _, err := d.log.Restore(context.Background(), restored); err != nil {
		t.Fatal(err)
	} else if !bytes.Equal(testingutil.MustReadFile(t, restored), d.data) {
		t.Fatal("restored database differs")
	}
}

// TestSegment_RollPruneCompact checks that segments roll at their size,
// that a segment goes when its last file leaves the log (pruned or
// compacted) and not before, that a reader keeps reading a file whose
// segment went, and that compaction leaves a log that reopens the same.
func TestSegment_RollPruneCompact(t *testing.T) {
	d := newSegmentDB(t, t.TempDir(), 2, 24<<10)
	h := history{}
	d.run(30, t0, h)
	dir := d.log.Dir
	segments := func() []string {
		var a []string
		for _, n := range logNames(t, dir) {
			if strings.HasSuffix(n, ".segment") {
				a = append(a, n)
			}
		}
		return a
	}
	if n := len(segments()); n < 4 {
		t.Fatalf("%d segments for 30 transactions of 24 KiB segments, want several", n)
	}

	// Compact the first half: its segments go once all their files are
	// compacted; positions inside stay servable.
	before := segments()
	held := map[string][]string{} // each segment's files, by name
	for _, s := range before {
		rep, err := ltx.ReadSegment(filepath.Join(dir, s))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range rep.Entries {
			held[s] = append(held[s], e.Name)
		}
	}
	merged, err := d.log.Compact(context.Background(), t0.Add(15*time.Minute))
	if err != nil || merged == 0 {
		t.Fatalf("compact: %d merged, %v", merged, err)
	}
	files := d.log.Files()
	first, last := files[0], files[len(files)-1]
	if first.Header.MinTXID != 1 || first.Header.MaxTXID < 10 {
		t.Fatalf("first file after compaction is %s", first.Name)
	}
	// A segment stays exactly while one of its files is in the log.
	inLog, emptied := names(files), 0
	for _, s := range before {
		live := slices.ContainsFunc(held[s], func(n string) bool { return slices.Contains(inLog, n) })
		if stays := slices.Contains(segments(), s); stays != live {
			t.Errorf("segment %s: on disk %v, holding a file of the log %v", s, stays, live)
		}
		if !live {
			emptied++
		}
	}
	if emptied == 0 {
		t.Fatal("compaction emptied no segment: the test compacts too little to check their removal")
	}
	if err := d.reopen(24<<10, nil); err != nil {
		t.Fatal(err)
	}
	if got := d.log.Files(); !slices.Equal(got, files) {
		t.Fatalf("reopened after compaction with files %v, want %v", names(got), names(files))
	}
	readAll(t, d.log)

	// A reader holds the oldest segment file open while every file but
	// the newest is pruned: it reads its file whole.
	c, err := d.log.Cursor(files[1].PreApplyPos())
	if err != nil {
		t.Fatal(err)
	}
	r := mustNext(t, c)
	n, err := d.log.Prune(context.Background(), last.Header.MaxTXID, t0.Add(100*time.Hour))
	if err != nil || n != len(files)-1 {
		t.Fatalf("prune: %d files, %v; want %d", n, err, len(files)-1)
	}
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatalf("read a file pruned while open: %v", err)
	}
	_ = r.Close()
	if got := segments(); len(got) != 1 {
		t.Fatalf("segments after pruning all but the newest file: %v, want only the newest's", got)
	}
	if d.log.Readers() != 0 {
		t.Fatalf("%d readers left", d.log.Readers())
	}
}

func names(files []ltx.FileInfo) []string {
	a := make([]string, len(files))
	for i, f := range files {
		a[i] = f.Name
	}
	return a
}

// segmentFile returns the path of the segment holding the log's only
// segment's files, and where each of them is.
func onlySegment(tb testing.TB, l *ltx.Log) (string, []ltx.SegmentEntry) {
	tb.Helper()
	path := filepath.Join(l.Dir, "0000000000000001.segment")
	rep, err := ltx.ReadSegment(path)
	if err != nil {
		tb.Fatal(err)
	}
	return path, rep.Entries
}

func flipByte(tb testing.TB, path string, off int64) {
	tb.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		tb.Fatal(err)
	}
	b[0] ^= 0x10
	if _, err := f.WriteAt(b, off); err != nil {
		tb.Fatal(err)
	}
}

func appendBytes(tb testing.TB, path string, b []byte) {
	tb.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if _, err := f.Write(b); err != nil {
		tb.Fatal(err)
	}
}

// rewriteRecord changes index record i of the segment at segPath with
// change, and gives it a valid record checksum.
func rewriteRecord(tb testing.TB, segPath string, i int, change func(rec []byte)) {
	tb.Helper()
	path := strings.TrimSuffix(segPath, ".segment") + ".index"
	b := testingutil.MustReadFile(tb, path)
	rec := b[i*56 : (i+1)*56]
	change(rec)
	binary.BigEndian.PutUint64(rec[48:], crc64.Checksum(rec[:48], crc64.MakeTable(crc64.ISO)))
	if err := os.WriteFile(path, b, 0o644); err != nil {
		tb.Fatal(err)
	}
}

// TestSegment_Damage damages a closed log's segment and index the ways a
// crash, a bad disk or a hand can, and checks what Open, a cursor and
// VerifyDir make of it: a torn append is cut off, a committed file that
// does not read is an error naming the segment and the offset, and no
// file before the damage is lost.
func TestSegment_Damage(t *testing.T) {
	const n = 12
	h := history{}
	// at sets the database file to the image the log's file i leaves, as
	// the log's owner does when the log loses its later files.
	at := func(d *fakeDB, files []ltx.FileInfo, i int) {
		d.data = bytes.Clone(h[files[i].Pos()])
		d.write()
	}
	setup := func(t *testing.T) (*fakeDB, string, []ltx.SegmentEntry, []ltx.FileInfo) {
		d := newSegmentDB(t, t.TempDir(), 3, 0)
		d.run(n, t0, h)
		files := d.log.Files()
		if err := d.log.Close(); err != nil {
			t.Fatal(err)
		}
		path, entries := onlySegment(t, d.log)
		if len(entries) != n {
			t.Fatalf("%d files in the segment, want %d", len(entries), n)
		}
		return d, path, entries, files
	}
	corrupt := func(t *testing.T, dir string) []string {
		entries, _ := os.ReadDir(filepath.Join(dir, "corrupt"))
		var a []string
		for _, e := range entries {
			a = append(a, e.Name())
		}
		return a
	}

	t.Run("UncommittedAppend", func(t *testing.T) {
		d, path, entries, files := setup(t)
		end := entries[n-1].Offset + entries[n-1].Size
		appendBytes(t, path, bytes.Repeat([]byte{0xab}, 5000))
		if err := d.reopen(0, nil); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(d.log.Files(), files) {
			t.Fatal("files changed")
		}
		if st := mustStat(t, path); st.Size() != end {
			t.Fatalf("segment is %d bytes after open, want %d: the uncommitted append cut off", st.Size(), end)
		}
		if c := corrupt(t, d.log.Dir); len(c) != 0 {
			t.Fatalf("an append that never committed kept as corrupt: %v", c)
		}
	})

	t.Run("TornIndexRecord", func(t *testing.T) {
		d, path, _, files := setup(t)
		appendBytes(t, strings.TrimSuffix(path, ".segment")+".index", make([]byte, 30))
		if err := d.reopen(0, nil); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(d.log.Files(), files) {
			t.Fatal("files changed")
		}
		if st := mustStat(t, strings.TrimSuffix(path, ".segment")+".index"); st.Size() != n*56 {
			t.Fatalf("index is %d bytes after open, want %d", st.Size(), n*56)
		}
	})

	t.Run("LastFileBitFlip", func(t *testing.T) {
		d, path, entries, files := setup(t)
		last := entries[n-1]
		flipByte(t, path, last.Offset+last.Size/2)
		at(d, files, n-2)
		if err := d.reopen(0, nil); err != nil {
			t.Fatal(err)
		}
		if got := d.log.Files(); !slices.Equal(got, files[:n-1]) {
			t.Fatalf("log holds %d files, want the %d before the damaged last one", len(got), n-1)
		}
		want := filepath.Base(path) + "." + itoa(last.Offset)
		if c := corrupt(t, d.log.Dir); !slices.Equal(c, []string{want}) {
			t.Fatalf("corrupt directory holds %v, want %s", c, want)
		}
		if got := testingutil.MustReadFile(t, filepath.Join(d.log.Dir, "corrupt", want)); int64(len(got)) != last.Size {
			t.Fatalf("kept %d bytes of the damaged file, want %d", len(got), last.Size)
		}
		// The log goes on from the file before.
		d.run(2, t0.Add(time.Hour), nil)
		if p := d.log.Pos(); p.TXID != n+1 {
			t.Fatalf("log at %s after two commits, want txid %d", p, n+1)
		}
		readAll(t, d.log)
	})

	t.Run("MiddleFileBitFlip", func(t *testing.T) {
		d, path, entries, files := setup(t)
		mid := entries[5]
		flipByte(t, path, mid.Offset+mid.Size/2)
		// Open checks the last file in full, and the records of the others.
		if err := d.reopen(0, nil); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(d.log.Files(), files) {
			t.Fatal("files changed")
		}
		mustReadCorrupt(t, d.log, files[5].PreApplyPos(), "the damaged file")
		rep, err := ltx.VerifyDir(d.log.Dir)
		if err != nil {
			t.Fatal(err)
		}
		msg := rep.Err()
		if msg == nil || !strings.Contains(msg.Error(), path) || !strings.Contains(msg.Error(), "offset "+itoa(mid.Offset)) {
			t.Fatalf("verify: %v, want the segment %s and offset %d named", msg, path, mid.Offset)
		}
	})

	t.Run("IndexDisagrees", func(t *testing.T) {
		d, path, entries, _ := setup(t)
		rewriteRecord(t, path, 4, func(rec []byte) {
			binary.BigEndian.PutUint64(rec[16:], uint64(entries[4].Size+1))
		})
		err := d.reopen(0, nil)
		if err == nil || !errors.Is(err, ltx.ErrCorrupt) || !strings.Contains(err.Error(), path) ||
			!strings.Contains(err.Error(), "record 4") || !strings.Contains(err.Error(), "offset "+itoa(entries[4].Offset)) {
			t.Fatalf("open with an index record that disagrees with the segment: %v", err)
		}
		// Nothing was changed: the files are all still there to recover by hand.
		if st := mustStat(t, path); st.Size() != entries[n-1].Offset+entries[n-1].Size {
			t.Fatal("open changed the segment it refused")
		}
	})

	t.Run("RecordBitFlip", func(t *testing.T) {
		d, path, _, _ := setup(t)
		flipByte(t, strings.TrimSuffix(path, ".segment")+".index", 3*56+10)
		err := d.reopen(0, nil)
		if err == nil || !strings.Contains(err.Error(), "record 3") || !strings.Contains(err.Error(), "record checksum") {
			t.Fatalf("open with a damaged index record: %v", err)
		}
	})

	// A power failure lost the bytes of files written without an fsync
	// while their index records reached the disk.
	t.Run("UnsyncedFilesLost", func(t *testing.T) {
		for _, unsynced := range []bool{true, false} {
			d, path, entries, files := setup(t)
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(make([]byte, entries[n-1].Offset+entries[n-1].Size-entries[8].Offset), entries[8].Offset); err != nil {
				t.Fatal(err)
			}
			_ = f.Close()
			at(d, files, 7)
			var hint func(ltx.Header) bool
			if unsynced {
				hint = func(h ltx.Header) bool { return h.MinTXID >= 9 }
			}
			err = d.reopen(0, hint)
			if !unsynced {
				if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "not the last file") {
					t.Fatalf("open with files lost that were synced: %v", err)
				}
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := d.log.Files(); !slices.Equal(got, files[:8]) {
				t.Fatalf("log holds %d files, want the 8 synced ones", len(got))
			}
			readAll(t, d.log)
		}
	})
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func mustStat(tb testing.TB, path string) os.FileInfo {
	tb.Helper()
	st, err := os.Stat(path)
	if err != nil {
		tb.Fatal(err)
	}
	return st
}

// TestSegment_Prepare checks the two halves of a commit on segments: a
// prepared file is in the log only once committed; one aborted, or not
// committed before a crash, never is; and a prepared file written over by
// a commit since does not commit.
func TestSegment_Prepare(t *testing.T) {
	d := newSegmentDB(t, t.TempDir(), 4, 0)
	d.run(3, t0, nil)
	tx := func() ltx.Tx {
		pgnos := d.step()
		return ltx.Tx{DB: bytes.NewReader(d.data), PageSize: d.pageSize, Commit: uint32(len(d.data)) / d.pageSize, Pgnos: pgnos, Timestamp: t0}
	}
	ctx := context.Background()

	p, err := d.log.Prepare(ctx, tx())
	if err != nil {
		t.Fatal(err)
	}
	if d.log.Pos().TXID != 3 {
		t.Fatal("prepared file in the log before its commit")
	}
	if info, err := p.Commit(); err != nil || info.Header.MinTXID != 4 || d.log.Pos() != info.Pos() {
		t.Fatalf("commit prepared: %v, %v", info, err)
	}

	before := bytes.Clone(d.data)
	p, err = d.log.Prepare(ctx, tx())
	if err != nil {
		t.Fatal(err)
	}
	p.Abort()
	d.data = before        // rolled back
	d.commit(d.step(), t0) // txid 5, written over the aborted file
	if _, err := p.Commit(); err == nil {
		t.Fatal("an aborted prepared file committed after another commit")
	}
	committed := bytes.Clone(d.data)

	p, err = d.log.Prepare(ctx, tx())
	if err != nil {
		t.Fatal(err)
	}
	q, err := d.log.Prepare(ctx, tx())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Commit(); err == nil {
		t.Fatal("a prepared file written over by a later prepare committed")
	}
	q.Abort()
	d.data = bytes.Clone(committed) // both rolled back
	d.write()

	if _, err := d.log.Prepare(ctx, tx()); err != nil {
		t.Fatal(err)
	}
	pos, files := d.log.Pos(), d.log.Files()
	d.data = bytes.Clone(committed) // the prepared transaction rolled back
	d.write()
	if err := d.reopen(0, nil); err != nil {
		t.Fatal(err)
	}
	if d.log.Pos() != pos || !slices.Equal(d.log.Files(), files) {
		t.Fatalf("reopened at %s, want %s: a prepared file never committed is not in the log", d.log.Pos(), pos)
	}
	readAll(t, d.log)
}

// TestSegment_SnapshotReplaces applies a snapshot to a log whose own
// history is in segments: the files it replaces go to the lost directory
// as LTX files of their own that verify, and the segments go.
func TestSegment_SnapshotReplaces(t *testing.T) {
	src := newSegmentDB(t, t.TempDir(), 5, 0)
	src.run(6, t0, nil)
	st := src.log.Unsynced()
	if len(st) != 0 {
		t.Fatalf("%d unsynced files after synced commits", len(st))
	}
	rep, err := ltx.VerifyDir(src.log.Dir)
	if err != nil || !rep.OK() {
		t.Fatalf("verify: %v %v", err, rep.Problems)
	}
	snap := filepath.Join(t.TempDir(), rep.Files[0].Name)
	copyStored(t, rep.Stored[0], snap)

	dst := newSegmentDB(t, t.TempDir(), 6, 0)
	dst.run(4, t0, nil)
	lost := t.TempDir()
	if _, _, err := dst.log.Apply(context.Background(), snap, lost); err != nil {
		t.Fatal(err)
	}
	if got := logNames(t, dst.log.Dir); !slices.Equal(got, []string{".applying", rep.Files[0].Name}) {
		t.Fatalf("log directory after the snapshot: %v", got)
	}
	dirs, _ := os.ReadDir(lost)
	if len(dirs) != 1 {
		t.Fatalf("lost directory holds %d entries", len(dirs))
	}
	kept := filepath.Join(lost, dirs[0].Name())
	lr, err := ltx.VerifyDir(kept)
	if err != nil || !lr.OK() || len(lr.Files) != 4 || lr.Stored[0].Segment {
		t.Fatalf("lost files: %v, %d files, problems %v", err, len(lr.Files), lr.Problems)
	}
	// The next commit starts a new segment.
	dst.commit(dst.step(), t0)
	if !slices.Contains(logNames(t, dst.log.Dir), "0000000000000002.segment") {
		t.Fatalf("no new segment after the snapshot: %v", logNames(t, dst.log.Dir))
	}
}

func copyStored(tb testing.TB, st ltx.Stored, dst string) {
	tb.Helper()
	r, err := ltx.OpenStored(st)
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	b, err := io.ReadAll(r)
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		tb.Fatal(err)
	}
}

// TestSegment_DiskFull fills the volume under a segment log: the commit
// that does not fit fails saying the volume is full and leaves the log's
// position and files as they were; once pruning has freed whole segments,
// commits go on, and the log reopens and verifies.
func TestSegment_DiskFull(t *testing.T) {
	mnt := mountTmpfs(t, "256k")
	d := newSegmentDB(t, t.TempDir(), 7, 0)
	if err := d.log.Close(); err != nil {
		t.Fatal(err)
	}
	l, err := openSegmentLog(t, filepath.Join(mnt, "ltx"), d.path, 32<<10, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.log = l

	var full error
	for i := 0; i < 1000 && full == nil; i++ {
		committed := bytes.Clone(d.data)
		pgnos := d.step()
		pos, files := d.log.Pos(), d.log.Files()
		_, full = d.log.Commit(context.Background(), ltx.Tx{
			DB: bytes.NewReader(d.data), PageSize: d.pageSize, Commit: uint32(len(d.data)) / d.pageSize, Pgnos: pgnos, Timestamp: t0,
		})
		if full != nil {
			if !errors.Is(full, syscall.ENOSPC) || !strings.Contains(full.Error(), "the volume is full") || !strings.Contains(full.Error(), "nothing was added to the log") {
				t.Fatalf("commit on a full volume: err = %v", full)
			}
			if d.log.Pos() != pos || !slices.Equal(d.log.Files(), files) {
				t.Fatalf("failed commit changed the log from %s to %s", pos, d.log.Pos())
			}
			d.data = committed // the app's transaction failed
			d.write()
		}
	}
	if full == nil {
		t.Fatal("the volume never filled")
	}
	if n, err := d.log.Prune(context.Background(), d.log.Pos().TXID, t0.Add(time.Hour)); err != nil || n == 0 {
		t.Fatalf("prune: %d files, %v", n, err)
	}
	d.run(3, t0.Add(time.Hour), nil)
	pos := d.log.Pos()
	if err := d.reopen(32<<10, nil); err != nil {
		t.Fatal(err)
	}
	if d.log.Pos() != pos {
		t.Fatalf("reopened at %s, want %s", d.log.Pos(), pos)
	}
	if r, err := ltx.VerifyDir(d.log.Dir); err != nil || !r.OK() {
		t.Fatalf("verify: %v %v", err, r.Problems)
	}
}

// TestSnapshotBound encodes snapshots of pages LZ4 cannot compress and of
// pages it can, for several page sizes, and checks each stays within
// SnapshotBound, and, for the pages it cannot compress, that the bound is
// above the size by no more than 2% and the varints' worst case of 30
// bytes a page.
func TestSnapshotBound(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	for _, pageSize := range []uint32{512, 4096, 65536} {
		for _, random := range []bool{true, false} {
			const pages = 40
			data := make([]byte, pages*int(pageSize))
			if random {
				for i := range data {
					data[i] = byte(rng.Uint32())
				}
			}
			copy(data, "SQLite format 3\x00")
			var buf bytes.Buffer
			info, err := ltx.EncodeSnapshot(context.Background(), &buf, bytes.NewReader(data), pageSize, pages, 7, t0)
			if err != nil {
				t.Fatal(err)
			}
			bound := ltx.SnapshotBound(info.Header)
			if info.Size > bound || (random && bound-info.Size > info.Size/50+pages*30) {
				t.Fatalf("page size %d, random %v: %d bytes, bound %d", pageSize, random, info.Size, bound)
			}
		}
	}
}

// exportFiles writes the log's files from the one after pos on, each as a
// file of its own under dir, and returns their paths in order.
func exportFiles(tb testing.TB, l *ltx.Log, from ltx.TXID, dir string) []string {
	tb.Helper()
	rep, err := ltx.VerifyDir(l.Dir)
	if err != nil || !rep.OK() {
		tb.Fatalf("verify %s: %v %v", l.Dir, err, rep.Problems)
	}
	var paths []string
	for i, fi := range rep.Files {
		if fi.Header.MinTXID < from {
			continue
		}
		p := filepath.Join(dir, fi.Name)
		copyStored(tb, rep.Stored[i], p)
		paths = append(paths, p)
	}
	return paths
}

// TestSegment_Apply applies a primary's files to a replica whose log
// writes segments, alone and in groups: they go into its segment (the
// snapshot that starts the log stays a file of its own), the database
// ends byte for byte the primary's, and the log reopens the same.
func TestSegment_Apply(t *testing.T) {
	src := newSegmentDB(t, t.TempDir(), 21, 0)
	src.run(30, t0, nil)
	dir := t.TempDir()
	dst := newSegmentDB(t, dir, 22, 0) // no database yet: the snapshot makes it
	paths := exportFiles(t, src.log, 1, t.TempDir())
	ctx := context.Background()
	for _, g := range [][2]int{{0, 1}, {1, 2}, {2, 7}, {7, 17}, {17, 30}} {
		if _, _, err := dst.log.ApplyFiles(ctx, paths[g[0]:g[1]], ltx.ApplyOptions{}); err != nil {
			t.Fatalf("apply files %d to %d: %v", g[0], g[1], err)
		}
	}
	if got, want := logNames(t, dst.log.Dir), []string{".applying", "0000000000000001-0000000000000001.ltx", "0000000000000002.index", "0000000000000002.segment"}; !slices.Equal(got, want) {
		t.Fatalf("replica's log directory: %v, want %v", got, want)
	}
	mustMatchPrimary(t, dst, src)
}

// mustMatchPrimary checks that replica dst holds the files of primary src
// and its database, and again once its log is reopened.
func mustMatchPrimary(t *testing.T, dst, src *fakeDB) {
	t.Helper()
	if !slices.Equal(names(dst.log.Files()), names(src.log.Files())) || dst.log.Pos() != src.log.Pos() {
		t.Fatalf("replica at %s with %d files, primary at %s with %d", dst.log.Pos(), len(dst.log.Files()), src.log.Pos(), len(src.log.Files()))
	}
	if !bytes.Equal(testingutil.MustReadFile(t, dst.path), src.data) {
		t.Fatal("replica's database differs from the primary's")
	}
	files := dst.log.Files()
	dst.data = bytes.Clone(src.data)
	if err := dst.reopen(0, nil); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(dst.log.Files(), files) {
		t.Fatal("replica's log reopened with other files")
	}
	readAll(t, dst.log)
}

// TestSegment_ApplyInterrupted leaves a replica's segment log as a crash
// in the middle of a group's apply does, and opens it: a group whose
// records reached the disk but not all of its bytes (before the fsync that
// precedes the database's writes) is cut off, the log back where the
// database is; a group in the log whose pages were half written to the
// database is finished. Both whether the marker names the group or, its
// new name not yet on disk, the group before.
func TestSegment_ApplyInterrupted(t *testing.T) {
	src := newSegmentDB(t, t.TempDir(), 23, 0)
	h := history{}
	src.run(20, t0, h)
	srcFiles := src.log.Files()
	paths := exportFiles(t, src.log, 1, t.TempDir())
	ctx := context.Background()
	setup := func(t *testing.T, marker int) (*fakeDB, ltx.SegmentEntry, string) {
		dst := newSegmentDB(t, t.TempDir(), 24, 0)
		for _, g := range [][2]int{{0, 1}, {1, 10}, {10, 20}} {
			if _, _, err := dst.log.ApplyFiles(ctx, paths[g[0]:g[1]], ltx.ApplyOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		if err := dst.log.Close(); err != nil {
			t.Fatal(err)
		}
		// The marker is left naming the last group's first file.
		markerPath := filepath.Join(dst.log.Dir, ".applying")
		if got := string(testingutil.MustReadFile(t, markerPath)); got != srcFiles[10].Name {
			t.Fatalf("marker after the groups applied: %q, want %q", got, srcFiles[10].Name)
		}
		seg := filepath.Join(dst.log.Dir, "0000000000000002.segment")
		rep, err := ltx.ReadSegment(seg)
		if err != nil || len(rep.Entries) != 19 {
			t.Fatalf("read segment: %v", err)
		}
		// The last group, txids 11 to 20, was being applied.
		if err := os.WriteFile(markerPath, []byte(srcFiles[marker].Name), 0o644); err != nil {
			t.Fatal(err)
		}
		return dst, rep.Entries[9], seg
	}

	for _, marker := range []int{10, 1} {
		t.Run(fmt.Sprintf("Marker%d", marker+1), func(t *testing.T) {
			applyInterrupted(t, func(t *testing.T) (*fakeDB, ltx.SegmentEntry, string) { return setup(t, marker) }, src, h, srcFiles, paths)
		})
	}
}

// applyInterrupted runs the cases of TestSegment_ApplyInterrupted on logs
// setup makes.
func applyInterrupted(t *testing.T, setup func(t *testing.T) (*fakeDB, ltx.SegmentEntry, string), src *fakeDB, h history, srcFiles []ltx.FileInfo, paths []string) {
	ctx := context.Background()
	t.Run("BytesLost", func(t *testing.T) {
		dst, first, seg := setup(t)
		f, err := os.OpenFile(seg, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		st := mustStat(t, seg)
		if _, err := f.WriteAt(make([]byte, st.Size()-first.Offset-first.Size/2), first.Offset+first.Size/2); err != nil {
			t.Fatal(err)
		}
		_ = f.Close()
		dst.data = bytes.Clone(h[srcFiles[9].Pos()]) // the group never reached the database
		dst.write()
		if err := dst.reopen(0, nil); err != nil {
			t.Fatalf("open after a group lost its bytes before its fsync: %v", err)
		}
		if got := dst.log.Pos(); got != srcFiles[9].Pos() {
			t.Fatalf("log at %s, want %s, where the database is", got, srcFiles[9].Pos())
		}
		// The group applies again.
		if _, _, err := dst.log.ApplyFiles(ctx, paths[10:], ltx.ApplyOptions{}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(testingutil.MustReadFile(t, dst.path), src.data) {
			t.Fatal("replica's database differs from the primary's after the group applied again")
		}
	})

	t.Run("HalfWritten", func(t *testing.T) {
		dst, _, _ := setup(t)
		// The database holds the group's first file's pages only, over
		// the image before the group: a torn apply.
		img := bytes.Clone(h[srcFiles[10].Pos()])
		dst.data = img
		dst.write()
		if err := dst.reopen(0, nil); err != nil {
			t.Fatalf("open after a group half written to the database: %v", err)
		}
		if dst.log.Pos() != src.log.Pos() || !bytes.Equal(testingutil.MustReadFile(t, dst.path), src.data) {
			t.Fatalf("log at %s, want %s, and the database finished", dst.log.Pos(), src.log.Pos())
		}
		// Once the database is where the log is, the marker names nothing.
		if got := testingutil.MustReadFile(t, filepath.Join(dst.log.Dir, ".applying")); len(got) != 0 {
			t.Fatalf("marker after Open finished the group: %q, want it empty", got)
		}
	})
}

// TestSegment_ApplyData applies files from memory, as a replica receives
// them: the snapshot into a file of its own, the rest into the segment,
// with no path read. Bytes that do not verify, or that differ from what
// the caller verified, change nothing.
func TestSegment_ApplyData(t *testing.T) {
	src := newSegmentDB(t, t.TempDir(), 25, 0)
	src.run(30, t0, nil)
	dst := newSegmentDB(t, t.TempDir(), 26, 0)
	paths := exportFiles(t, src.log, 1, t.TempDir())
	data := make([][]byte, len(paths))
	infos := make([]ltx.FileInfo, len(paths))
	for i, p := range paths {
		data[i] = testingutil.MustReadFile(t, p)
		info, err := ltx.VerifyFile(p)
		if err != nil {
			t.Fatal(err)
		}
		// Sealed as a receiver seals what it received.
		vr := ltx.NewVerifyReader(bytes.NewReader(data[i]), 0)
		if _, err := io.Copy(io.Discard, vr); err != nil {
			t.Fatal(err)
		}
		info.Seal = vr.Seal()
		infos[i] = *info
	}
	ctx := context.Background()
	apply := func(from, to int, verified bool, bytes [][]byte) error {
		opts := ltx.ApplyOptions{Data: bytes}
		if verified {
			opts.Verified = infos[from:to]
		}
		_, _, err := dst.log.ApplyFiles(ctx, make([]string, to-from), opts)
		return err
	}
	for _, g := range []struct {
		from, to int
		verified bool
	}{{0, 1, false}, {1, 2, true}, {2, 7, false}, {7, 17, true}} {
		if err := apply(g.from, g.to, g.verified, data[g.from:g.to]); err != nil {
			t.Fatalf("apply files %d to %d from memory: %v", g.from, g.to, err)
		}
	}
	if dst.log.Pos() != infos[16].Pos() {
		t.Fatalf("replica at %s, want %s", dst.log.Pos(), infos[16].Pos())
	}
	before := testingutil.MustReadFile(t, dst.path)
	for _, verified := range []bool{false, true} {
		bad := slices.Clone(data[17:20])
		bad[1] = bytes.Clone(bad[1])
		bad[1][len(bad[1])/2] ^= 0x10
		if err := apply(17, 20, verified, bad); !errors.Is(err, ltx.ErrCorrupt) {
			t.Fatalf("damaged bytes (verified by the caller: %v): %v, want ErrCorrupt", verified, err)
		}
		if dst.log.Pos() != infos[16].Pos() || !bytes.Equal(testingutil.MustReadFile(t, dst.path), before) {
			t.Fatalf("damaged bytes (verified by the caller: %v) moved the replica to %s or changed its database", verified, dst.log.Pos())
		}
	}
	if err := apply(17, 30, false, data[17:30]); err != nil {
		t.Fatalf("apply files 17 to 30 from memory after the damaged ones: %v", err)
	}
	mustMatchPrimary(t, dst, src)
}

// failingTarget writes a group's pages into the database file, and fails
// its Sync while fail is set.
type failingTarget struct {
	*os.File
	fail bool
}

func (t *failingTarget) Sync(bool) error {
	if t.fail {
		return errors.New("injected: sync failed")
	}
	return t.File.Sync()
}

// TestSegment_ApplyRetried: a group whose apply to the database failed
// after its records were written keeps them until the next apply, which
// takes their place: applied again, the log holds each file once, and
// opens again.
func TestSegment_ApplyRetried(t *testing.T) {
	src := newSegmentDB(t, t.TempDir(), 27, 0)
	src.run(20, t0, nil)
	dst := newSegmentDB(t, t.TempDir(), 28, 0)
	paths := exportFiles(t, src.log, 1, t.TempDir())
	ctx := context.Background()
	for _, g := range [][2]int{{0, 1}, {1, 10}} { // the snapshot in a file of its own
		if _, _, err := dst.log.ApplyFiles(ctx, paths[g[0]:g[1]], ltx.ApplyOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	db, err := os.OpenFile(dst.path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	target := &failingTarget{File: db, fail: true}
	var partly *ltx.PartlyAppliedError
	if _, _, err := dst.log.ApplyFiles(ctx, paths[10:15], ltx.ApplyOptions{Target: target}); !errors.As(err, &partly) {
		t.Fatalf("apply with a failing sync: %v, want a PartlyAppliedError", err)
	}
	seg := filepath.Join(dst.log.Dir, "0000000000000002.segment")
	if rep, err := ltx.ReadSegment(seg); err != nil || len(rep.Entries) != 14 {
		t.Fatalf("segment after the failed apply: %v; want the 9 files applied and the 5 of the failed group", err)
	}
	target.fail = false
	if _, _, err := dst.log.ApplyFiles(ctx, paths[10:], ltx.ApplyOptions{Target: target}); err != nil {
		t.Fatalf("apply again: %v", err)
	}
	rep, err := ltx.ReadSegment(seg)
	if err != nil || len(rep.Entries) != 19 {
		t.Fatalf("segment after the group applied again: %v", err)
	}
	for i, e := range rep.Entries {
		if want := ltx.TXID(i + 2); e.Header.MinTXID != want {
			t.Fatalf("segment record %d holds txid %s, want %s", i, e.Header.MinTXID, want)
		}
	}
	mustMatchPrimary(t, dst, src)
}

// TestSegment_ApplySpareTable: an apply changes a spare of the checksum
// table, which the next apply reuses, instead of copying a table as large
// as the database per group. After every group, failed ones included, the
// log's table is the database's, and the log holds a spare only when the
// last apply succeeded.
func TestSegment_ApplySpareTable(t *testing.T) {
	src := newSegmentDB(t, t.TempDir(), 29, 0)
	src.run(40, t0, nil)
	dst := newSegmentDB(t, t.TempDir(), 30, 0)
	paths := exportFiles(t, src.log, 1, t.TempDir())
	ctx := context.Background()
	db, err := os.OpenFile(dst.path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	target := &failingTarget{File: db}
	check := func(what string, spare bool) {
		t.Helper()
		want, err := ltx.ReadChecksumTable(dst.path)
		if err != nil {
			t.Fatal(err)
		}
		if sum, pages := dst.log.Checksum(); sum != want.Checksum() || pages != want.Pages() {
			t.Fatalf("%s: log's table says %s, %d pages; the database is %s, %d pages", what, sum, pages, want.Checksum(), want.Pages())
		}
		if got := dst.log.SpareTable(); got != spare {
			t.Fatalf("%s: spare table kept %v, want %v", what, got, spare)
		}
	}
	groups := [][2]int{{0, 1}, {1, 2}, {2, 3}, {3, 7}, {7, 8}, {8, 20}, {20, 21}, {21, 40}}
	for i, g := range groups {
		if _, _, err := dst.log.ApplyFiles(ctx, paths[g[0]:g[1]], ltx.ApplyOptions{Target: target}); err != nil {
			t.Fatalf("apply files %d to %d: %v", g[0], g[1], err)
		}
		// The snapshot makes a new table: no spare until the group after.
		check(fmt.Sprintf("after files %d to %d", g[0], g[1]), i > 0)
		if g[1] == 8 || g[1] == 21 {
			// A group that fails at the database's sync (its pages are
			// written) leaves the log's table as it was, and no spare:
			// the next apply copies it.
			sum, pages := dst.log.Checksum()
			target.fail = true
			if _, _, err := dst.log.ApplyFiles(ctx, paths[g[1]:g[1]+3], ltx.ApplyOptions{Target: target}); err == nil {
				t.Fatal("apply with a failing sync succeeded")
			}
			target.fail = false
			if sum2, pages2 := dst.log.Checksum(); sum2 != sum || pages2 != pages || dst.log.SpareTable() {
				t.Fatalf("after a failed apply of files %d to %d: table %s, %d pages, spare %v; want %s, %d pages as before, no spare",
					g[1], g[1]+3, sum2, pages2, dst.log.SpareTable(), sum, pages)
			}
		}
	}
	mustMatchPrimary(t, dst, src)
}

// TestSegment_CursorRecent: a cursor gets the files the log committed
// lately from memory, the bytes the encoder wrote, and older ones from
// the segment, verified as they are read. Bytes damaged on disk after the
// commit show which: the last file is served whole, the first one (past
// the bytes kept) fails its verification.
func TestSegment_CursorRecent(t *testing.T) {
	defer ltx.SetMaxRecentBytes(32 << 10)()
	d := newSegmentDB(t, t.TempDir(), 33, 0)
	d.run(30, t0, nil)
	files := d.log.Files()
	seg := filepath.Join(d.log.Dir, "0000000000000001.segment")
	rep, err := ltx.ReadSegment(seg)
	if err != nil || len(rep.Entries) != len(files) {
		t.Fatalf("read segment: %v, %d entries for %d files", err, len(rep.Entries), len(files))
	}
	disk := testingutil.MustReadFile(t, seg)
	fileBytes := func(i int) []byte {
		e := rep.Entries[i]
		return disk[e.Offset : e.Offset+e.Size]
	}
	c, err := d.log.Cursor(ltx.Pos{})
	if err != nil {
		t.Fatal(err)
	}
	for i, fi := range files {
		r, b := readNext(t, c)
		if r.Info != fi || !bytes.Equal(b, fileBytes(i)) {
			t.Fatalf("file %d (%s): served %v, %d bytes, not the file on disk", i, fi.Name, r.Info, len(b))
		}
	}

	// Damage the first and the last file on disk.
	f, err := os.OpenFile(seg, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, len(files) - 1} {
		e := rep.Entries[i]
		off := e.Offset + e.Size/2
		if _, err := f.WriteAt([]byte{disk[off] ^ 0xff}, off); err != nil {
			t.Fatal(err)
		}
	}
	_ = f.Close()

	last := len(files) - 1
	c, err = d.log.Cursor(files[last].PreApplyPos())
	if err != nil {
		t.Fatal(err)
	}
	if r, b := readNext(t, c); r.Info != files[last] || !bytes.Equal(b, fileBytes(last)) {
		t.Fatalf("last file, damaged on disk after its commit: served %v, %d bytes; want its bytes as committed", r.Info, len(b))
	}
	mustReadCorrupt(t, d.log, ltx.Pos{}, "the first file, damaged on disk and read from it")

	// A file larger than the bytes kept of one (256 KiB) is read from
	// disk even when it is the last: 100 pages of random bytes.
	at := d.log.Pos()
	first := len(d.data) / int(d.pageSize)
	grow := make([]byte, 100*int(d.pageSize))
	for i := range grow {
		grow[i] = byte(d.rng.Uint32())
	}
	d.data = append(d.data, grow...)
	var pgnos []uint32
	for i := range 100 {
		pgnos = append(pgnos, uint32(first+1+i))
	}
	big := d.commit(pgnos, t0.Add(time.Hour))
	if big.Size <= 256<<10 {
		t.Fatalf("the large file is %d bytes, not larger than 256 KiB", big.Size)
	}
	rep, err = ltx.ReadSegment(seg)
	if err != nil {
		t.Fatal(err)
	}
	e := rep.Entries[len(rep.Entries)-1]
	if f, err = os.OpenFile(seg, os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, e.Offset+e.Size/2); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{b[0] ^ 0xff}, e.Offset+e.Size/2); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	mustReadCorrupt(t, d.log, at, "the large last file, damaged on disk")
}

// mustReadCorrupt reads the file a cursor of l at pos gets next, what,
// and fails the test unless the read fails with ErrCorrupt.
func mustReadCorrupt(t *testing.T, l *ltx.Log, pos ltx.Pos, what string) {
	t.Helper()
	c, err := l.Cursor(pos)
	if err != nil {
		t.Fatal(err)
	}
	r := mustNext(t, c)
	_, err = io.Copy(io.Discard, r)
	_ = r.Close()
	if !errors.Is(err, ltx.ErrCorrupt) {
		t.Fatalf("reading %s: err = %v, want ErrCorrupt", what, err)
	}
}

// signalTarget writes a group's pages into the database file, and reports
// each Sync on synced.
type signalTarget struct {
	*os.File
	synced chan struct{}
}

func (t *signalTarget) Sync(bool) error {
	t.synced <- struct{}{}
	return t.File.Sync()
}

// TestSegment_ApplyOverlap: with ApplyOptions.Overlap the Target gets a
// group's pages while the fsync of its records is held at its start, and
// ApplyFiles returns without waiting for it; the next group applies
// meanwhile, and AwaitLogged waits for both. Without Overlap the records
// are durable before the Target gets anything. A Target whose Sync fails
// leaves the group for the next apply, as without Overlap.
func TestSegment_ApplyOverlap(t *testing.T) {
	src := newSegmentDB(t, t.TempDir(), 31, 0)
	src.run(30, t0, nil)
	dst := newSegmentDB(t, t.TempDir(), 32, 0)
	paths := exportFiles(t, src.log, 1, t.TempDir())
	ctx := context.Background()
	if _, _, err := dst.log.ApplyFiles(ctx, paths[:1], ltx.ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	db, err := os.OpenFile(dst.path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	target := &signalTarget{File: db, synced: make(chan struct{}, 2)}

	// Without Overlap the group-sync failpoint is never passed.
	reached, resume := stopAt(t, "group-sync")
	if _, _, err := dst.log.ApplyFiles(ctx, paths[1:5], ltx.ApplyOptions{Target: target}); err != nil {
		t.Fatal(err)
	}
	<-target.synced
	select {
	case <-reached:
		t.Fatal("an apply without Overlap fsynced its records in a goroutine")
	default:
	}

	// With it, the Target syncs while the records' fsync is held, and
	// two groups apply before it goes on.
	errc := goErr(func() error {
		_, _, err := dst.log.ApplyFiles(ctx, paths[5:10], ltx.ApplyOptions{Target: target, Overlap: true})
		return err
	})
	testingutil.Within(t, waitTimeout, "the records' fsync to start", func() { <-reached })
	testingutil.Within(t, waitTimeout, "the Target's Sync while the records' fsync is held", func() { <-target.synced })
	testingutil.Within(t, waitTimeout, "ApplyFiles to return while the records' fsync is held", func() {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	})
	if _, _, err := dst.log.ApplyFiles(ctx, paths[10:12], ltx.ApplyOptions{Target: target, Overlap: true}); err != nil {
		t.Fatal(err)
	}
	<-target.synced
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := dst.log.AwaitLogged(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("AwaitLogged while the records' fsync is held: %v, want the deadline", err)
	}
	resume()
	if err := dst.log.AwaitLogged(ctx); err != nil {
		t.Fatal(err)
	}
	if got := dst.log.Pos(); got != src.log.Files()[11].Pos() {
		t.Fatalf("after the overlapped groups the log is at %s, want %s", got, src.log.Files()[11].Pos())
	}

	// A Target that fails: the group stays for the next apply.
	failing := &failingTarget{File: db, fail: true}
	var partly *ltx.PartlyAppliedError
	if _, _, err := dst.log.ApplyFiles(ctx, paths[12:15], ltx.ApplyOptions{Target: failing, Overlap: true}); !errors.As(err, &partly) {
		t.Fatalf("overlapped apply with a failing sync: %v, want a PartlyAppliedError", err)
	}
	failing.fail = false
	for _, g := range [][2]int{{12, 20}, {20, 21}, {21, 30}} {
		if _, _, err := dst.log.ApplyFiles(ctx, paths[g[0]:g[1]], ltx.ApplyOptions{Target: failing, Overlap: true}); err != nil {
			t.Fatalf("apply files %d to %d: %v", g[0], g[1], err)
		}
	}
	if err := dst.log.AwaitLogged(ctx); err != nil {
		t.Fatal(err)
	}
	mustMatchPrimary(t, dst, src)
}

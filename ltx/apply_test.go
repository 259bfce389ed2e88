package ltx_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// newReplicaLog opens an empty log for a database file that is empty, as a
// replica has for a database it has not received yet.
func newReplicaLog(tb testing.TB) *ltx.Log {
	tb.Helper()
	dir := tb.TempDir()
	path := filepath.Join(dir, "db")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		tb.Fatal(err)
	}
	return testingutil.MustOpenLog(tb, "db", filepath.Join(dir, "ltx"), path)
}

// applyAll applies the files of src to dst, in order.
func applyAll(tb testing.TB, dst, src *ltx.Log, files []ltx.FileInfo) {
	tb.Helper()
	for _, f := range files {
		info, pgnos, err := dst.Apply(context.Background(), filepath.Join(src.Dir, f.Name), "")
		if err != nil {
			tb.Fatal(err)
		}
		if info.Pos() != f.Pos() || info.FileChecksum != f.FileChecksum || info.Name != f.Name {
			tb.Fatalf("applied %s as %s at %s, want %s", f.Name, info.Name, info.Pos(), f.Pos())
		}
		if len(pgnos) == 0 {
			tb.Fatalf("applying %s reported no pages", f.Name)
		}
	}
}

func TestLog_Apply(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	src := newFakeDB(t, t.TempDir(), 1)
	src.run(40, t0, nil)
	dst := newReplicaLog(t)

	t.Run("OK", func(t *testing.T) {
		applyAll(t, dst, src.log, src.log.Files())
		if dst.Pos() != src.log.Pos() {
			t.Fatalf("replica log at %s, want %s", dst.Pos(), src.log.Pos())
		}
		if !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), src.data) {
			t.Fatal("replica database differs from the source")
		}
		if sum, pages := dst.Checksum(); sum != src.log.Pos().PostApplyChecksum || int(pages)*int(src.pageSize) != len(src.data) {
			t.Fatalf("replica checksum table %s, %d pages; want %s, %d", sum, pages, src.log.Pos().PostApplyChecksum, len(src.data)/int(src.pageSize))
		}
		rep, err := ltx.VerifyDir(dst.Dir)
		if err != nil || len(rep.Files) != 40 {
			t.Fatalf("replica log directory: %+v, %v", rep, err)
		}
	})

	t.Run("ErrWrongPosition", func(t *testing.T) {
		before := testingutil.MustReadFile(t, dst.DBPath)
		src.run(2, t0.Add(time.Hour), nil)
		files := src.log.Files()
		_, _, err := dst.Apply(context.Background(), filepath.Join(src.log.Dir, files[len(files)-1].Name), "")
		if err == nil {
			t.Fatal("a file that skips a transaction applied")
		}
		if !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), before) || len(dst.Files()) != 40 {
			t.Fatal("a refused file changed the replica")
		}
		applyAll(t, dst, src.log, files[len(files)-2:])
	})

	t.Run("ErrCorrupt", func(t *testing.T) {
		src.run(1, t0.Add(2*time.Hour), nil)
		files := src.log.Files()
		next := files[len(files)-1]
		b := testingutil.MustReadFile(t, filepath.Join(src.log.Dir, next.Name))
		b[len(b)/2] ^= 0x40
		bad := filepath.Join(t.TempDir(), next.Name)
		if err := os.WriteFile(bad, b, 0o644); err != nil {
			t.Fatal(err)
		}
		before, n := testingutil.MustReadFile(t, dst.DBPath), len(dst.Files())
		if _, _, err := dst.Apply(context.Background(), bad, ""); !errors.Is(err, ltx.ErrCorrupt) {
			t.Fatalf("applying a damaged file: %v, want ErrCorrupt", err)
		}
		entries := logEntries(t, dst)
		if !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), before) || len(dst.Files()) != n || len(entries) != n {
			t.Fatalf("a damaged file changed the replica: %d files in the log, entries %v in its directory, want %d", len(dst.Files()), entries, n)
		}
		applyAll(t, dst, src.log, files[len(files)-1:])
	})

	t.Run("SnapshotKeepsLost", func(t *testing.T) {
		// Another history: a source with other content and fewer files.
		other := newFakeDB(t, t.TempDir(), 2)
		other.run(5, t0, nil)
		lost := filepath.Join(t.TempDir(), "lost")
		snap := filepath.Join(t.TempDir(), "snapshot.ltx")
		f, err := os.Create(snap)
		if err != nil {
			t.Fatal(err)
		}
		db, _ := os.Open(other.path)
		info, err := other.log.Snapshot(context.Background(), f, db)
		_ = db.Close()
		_ = f.Close()
		if err != nil {
			t.Fatal(err)
		}
		old := dst.Files()
		got, _, err := dst.Apply(context.Background(), snap, lost)
		if err != nil {
			t.Fatal(err)
		}
		if got.Pos() != info.Pos() || len(dst.Files()) != 1 || dst.Pos() != other.log.Pos() {
			t.Fatalf("after the snapshot the log holds %d files at %s, want 1 at %s", len(dst.Files()), dst.Pos(), other.log.Pos())
		}
		if !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), other.data) {
			t.Fatal("replica database differs from the snapshot's")
		}
		kept, _ := filepath.Glob(filepath.Join(lost, "*", "*.ltx"))
		if len(kept) != len(old) {
			t.Fatalf("%d files kept in %s, want the %d replaced", len(kept), lost, len(old))
		}
		for _, path := range kept {
			if _, err := ltx.VerifyFile(path); err != nil {
				t.Fatalf("kept file: %v", err)
			}
		}
	})
}

func TestLog_ApplyRollForward(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	src := newFakeDB(t, t.TempDir(), 1)
	src.run(10, t0, nil)
	files := src.log.Files()

	for _, tt := range []struct {
		name   string
		crash  func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) // leaves dst's directory as a crash would
		want   error                                               // nil: rolled forward
		behind int                                                 // files the database lacks before the last (in the log)
	}{
		{"FileInLogOnly", func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) {
			copyFile(t, filepath.Join(src.log.Dir, last.Name), filepath.Join(dst.Dir, last.Name))
			writeMarker(t, dst, last)
		}, nil, 0},
		// A replica's WAL frames of the groups before the marker's lost
		// too, and the marker names a group the crash kept from the log:
		// the database is at the end of an earlier file of the log.
		{"BehindTheMarker", func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) {
			copyFile(t, filepath.Join(src.log.Dir, last.Name), filepath.Join(dst.Dir, last.Name))
			next := last.Header.MaxTXID + 1
			if err := os.WriteFile(filepath.Join(dst.Dir, ".applying"), []byte(ltx.FormatName(next, next)), 0o644); err != nil {
				t.Fatal(err)
			}
		}, nil, 3},
		{"ErrBehindNoMarker", func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) {
			copyFile(t, filepath.Join(src.log.Dir, last.Name), filepath.Join(dst.Dir, last.Name))
		}, &ltx.DatabaseMismatchError{}, 3},
		{"ErrNoMarker", func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) {
			// The same files without the marker: a database behind its
			// log that nothing says was being applied is left alone.
			copyFile(t, filepath.Join(src.log.Dir, last.Name), filepath.Join(dst.Dir, last.Name))
		}, &ltx.DatabaseMismatchError{}, 0},
		{"PartlyWritten", func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) {
			copyFile(t, filepath.Join(src.log.Dir, last.Name), filepath.Join(dst.Dir, last.Name))
			writeMarker(t, dst, last)
			// One page of the file reached the database.
			want := src.data
			db, err := os.OpenFile(dst.DBPath, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			have := testingutil.MustReadFile(t, dst.DBPath)
			pgnos := testingutil.ChangedPages(have, want, int(src.pageSize))
			if len(pgnos) == 0 {
				t.Fatal("the last file changes nothing")
			}
			off := int64(pgnos[0]-1) * int64(src.pageSize)
			if _, err := db.WriteAt(want[off:off+int64(src.pageSize)], off); err != nil {
				t.Fatal(err)
			}
		}, nil, 0},
		{"ErrOtherChange", func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) {
			copyFile(t, filepath.Join(src.log.Dir, last.Name), filepath.Join(dst.Dir, last.Name))
			writeMarker(t, dst, last)
			db, err := os.OpenFile(dst.DBPath, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if _, err := db.WriteAt([]byte("not from any file"), 100); err != nil {
				t.Fatal(err)
			}
		}, &ltx.DatabaseMismatchError{}, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dst := newReplicaLog(t)
			applied := len(files) - 1 - tt.behind
			applyAll(t, dst, src.log, files[:applied])
			before := testingutil.MustReadFile(t, dst.DBPath)
			if err := dst.Close(); err != nil {
				t.Fatal(err)
			}
			for _, f := range files[applied : len(files)-1] {
				copyFile(t, filepath.Join(src.log.Dir, f.Name), filepath.Join(dst.Dir, f.Name))
			}
			tt.crash(t, dst, files[len(files)-1])
			l := testingutil.NewLog(t, "db", dst.Dir, dst.DBPath)
			var logged testingutil.LockedBuffer
			l.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logged, testingutil.LogWriter(t)), nil))
			err := l.Open(context.Background())
			if tt.want != nil {
				var mismatch *ltx.DatabaseMismatchError
				if !errors.As(err, &mismatch) {
					t.Fatalf("Open: %v, want a DatabaseMismatchError", err)
				}
				if got := testingutil.MustReadFile(t, dst.DBPath); bytes.Equal(got, src.data) || (tt.name != "ErrOtherChange" && !bytes.Equal(got, before)) {
					t.Fatal("Open changed a database that does not match the log")
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer l.Close()
			if want := fmt.Sprintf("files=%d from=%s", 1+tt.behind, files[applied].PreApplyPos()); !strings.Contains(logged.String(), want) {
				t.Fatalf("Open logged:\n%s\nwant the files it applied again, %q", logged.String(), want)
			}
			if l.Pos() != src.log.Pos() || !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), src.data) {
				t.Fatalf("after Open the log is at %s and the database equal to the source's: %v; want %s and true",
					l.Pos(), bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), src.data), src.log.Pos())
			}
		})
	}
}

// logEntries returns the names in l's directory but its empty marker,
// which Apply leaves between files.
func logEntries(tb testing.TB, l *ltx.Log) []string {
	tb.Helper()
	entries, err := os.ReadDir(l.Dir)
	if err != nil {
		tb.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if e.Name() == ".applying" {
			if fi, err := e.Info(); err == nil && fi.Size() == 0 {
				continue
			}
		}
		names = append(names, e.Name())
	}
	return names
}

func copyFile(tb testing.TB, src, dst string) {
	tb.Helper()
	if err := os.WriteFile(dst, testingutil.MustReadFile(tb, src), 0o644); err != nil {
		tb.Fatal(err)
	}
}

// writeMarker leaves the marker Apply writes while it applies last.
func writeMarker(tb testing.TB, dst *ltx.Log, last ltx.FileInfo) {
	tb.Helper()
	if err := os.WriteFile(filepath.Join(dst.Dir, ".applying"), []byte(last.Name), 0o644); err != nil {
		tb.Fatal(err)
	}
}

// TestLog_ApplyFiles applies a source's files in groups of different
// sizes, as a replica catching up does: after each group the database is
// the source's at the group's last position, and the pages reported are
// every page that changed.
func TestLog_ApplyFiles(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	src := newFakeDB(t, t.TempDir(), 3)
	h := history{}
	src.run(60, t0, h)
	files := src.log.Files()
	dst := newReplicaLog(t)
	paths := func(fs []ltx.FileInfo) []string {
		var out []string
		for _, f := range fs {
			out = append(out, filepath.Join(src.log.Dir, f.Name))
		}
		return out
	}

	t.Run("Groups", func(t *testing.T) {
		// 20 files go through the syncfs(2) path, 3 through fsyncs.
		i := 0
		for _, n := range []int{1, 3, 20, 1, 35} {
			group := files[i : i+n]
			before := testingutil.MustReadFile(t, dst.DBPath)
			infos, pgnos, err := dst.ApplyFiles(context.Background(), paths(group), ltx.ApplyOptions{})
			if err != nil {
				t.Fatalf("group of %d from %s: %v", n, group[0].Name, err)
			}
			i += n
			last := group[n-1]
			if len(infos) != n || infos[n-1].Pos() != last.Pos() || dst.Pos() != last.Pos() {
				t.Fatalf("group of %d: %d files, log at %s; want %d, %s", n, len(infos), dst.Pos(), n, last.Pos())
			}
			for j, info := range infos {
				if info.Name != group[j].Name || info.FileChecksum != group[j].FileChecksum {
					t.Fatalf("group of %d: file %d is %s, want %s", n, j, info.Name, group[j].Name)
				}
			}
			after := testingutil.MustReadFile(t, dst.DBPath)
			if !bytes.Equal(after, h[last.Pos()]) {
				t.Fatalf("group of %d: database differs from the source's at %s", n, last.Pos())
			}
			if !slices.IsSorted(pgnos) || len(slices.Compact(slices.Clone(pgnos))) != len(pgnos) {
				t.Fatalf("group of %d: pages %v are not ascending and unique", n, pgnos)
			}
			for _, pgno := range testingutil.ChangedPages(before, after, int(src.pageSize)) {
				if _, ok := slices.BinarySearch(pgnos, pgno); !ok && int(pgno)*int(src.pageSize) <= len(after) {
					t.Fatalf("group of %d: page %d changed but is not among the pages reported, %v", n, pgno, pgnos)
				}
			}
		}
		rep, err := ltx.VerifyDir(dst.Dir)
		if err != nil || len(rep.Files) != len(files) {
			t.Fatalf("replica log directory: %d files, %v; want %d", len(rep.Files), err, len(files))
		}
		if marker, err := os.ReadFile(filepath.Join(dst.Dir, ".applying")); err != nil || len(marker) != 0 {
			t.Fatalf("marker after the groups: %q, %v; want it empty", marker, err)
		}
	})

	t.Run("ErrGap", func(t *testing.T) {
		src.run(3, t0.Add(time.Hour), h)
		files := src.log.Files()
		before, n := testingutil.MustReadFile(t, dst.DBPath), len(dst.Files())
		gap := paths([]ltx.FileInfo{files[len(files)-3], files[len(files)-1]})
		if _, _, err := dst.ApplyFiles(context.Background(), gap, ltx.ApplyOptions{}); err == nil || !strings.Contains(err.Error(), "applies at") {
			t.Fatalf("a group with a gap: %v, want an error naming the position", err)
		}
		entries := logEntries(t, dst)
		if !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), before) || len(dst.Files()) != n || len(entries) != n {
			t.Fatalf("a refused group changed the replica: %d files, entries %v; want %d", len(dst.Files()), entries, n)
		}
		if _, _, err := dst.ApplyFiles(context.Background(), paths(files[len(files)-3:]), ltx.ApplyOptions{}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("ErrSnapshotNotFirst", func(t *testing.T) {
		snap := filepath.Join(t.TempDir(), "snapshot.ltx")
		f, err := os.Create(snap)
		if err != nil {
			t.Fatal(err)
		}
		db, _ := os.Open(src.path)
		_, err = src.log.Snapshot(context.Background(), f, db)
		_ = db.Close()
		_ = f.Close()
		if err != nil {
			t.Fatal(err)
		}
		src.run(1, t0.Add(2*time.Hour), h)
		files := src.log.Files()
		next := filepath.Join(src.log.Dir, files[len(files)-1].Name)
		if _, _, err := dst.ApplyFiles(context.Background(), []string{next, snap}, ltx.ApplyOptions{}); err == nil || !strings.Contains(err.Error(), "snapshot must be the first") {
			t.Fatalf("a snapshot second in a group: %v", err)
		}
		// First, followed by the file after it: the same database.
		infos, _, err := dst.ApplyFiles(context.Background(), []string{snap, next}, ltx.ApplyOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(infos) != 2 || len(dst.Files()) != 2 || dst.Pos() != src.log.Pos() || !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), src.data) {
			t.Fatalf("snapshot and file: log of %d files at %s, want 2 at %s and the source's database", len(dst.Files()), dst.Pos(), src.log.Pos())
		}
	})
}

// TestLog_ApplyFilesMove moves received files into the log instead of
// copying them: they leave where they were, sealed in the log; a damaged
// one changes nothing.
func TestLog_ApplyFilesMove(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	src := newFakeDB(t, t.TempDir(), 5)
	src.run(12, t0, nil)
	files := src.log.Files()
	dst := newReplicaLog(t)
	recv := t.TempDir() // on the log's filesystem, as a replica's data_dir/tmp is
	received := func(fs []ltx.FileInfo, damage bool) []string {
		var out []string
		for _, f := range fs {
			b := testingutil.MustReadFile(t, filepath.Join(src.log.Dir, f.Name))
			if damage {
				b[len(b)/2] ^= 0x10
			}
			path := filepath.Join(recv, "recv-"+f.Name)
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			out = append(out, path)
		}
		return out
	}
	ctx := context.Background()
	if _, _, err := dst.ApplyFiles(ctx, received(files[:8], false), ltx.ApplyOptions{Move: true}); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(recv); len(left) != 0 {
		t.Fatalf("%d received files left after they moved into the log", len(left))
	}
	before := testingutil.MustReadFile(t, dst.DBPath)
	bad := received(files[8:10], true)
	if _, _, err := dst.ApplyFiles(ctx, bad, ltx.ApplyOptions{Move: true}); !errors.Is(err, ltx.ErrCorrupt) {
		t.Fatalf("a damaged file moved in: %v, want ErrCorrupt", err)
	}
	if entries := logEntries(t, dst); len(entries) != 8 || len(dst.Files()) != 8 || !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), before) {
		t.Fatalf("a damaged group changed the replica: entries %v, %d files", entries, len(dst.Files()))
	}
	for _, path := range bad {
		_ = os.Remove(path)
	}
	// One file alone is fsynced on its own, not with syncfs.
	if _, _, err := dst.ApplyFiles(ctx, received(files[8:11], false), ltx.ApplyOptions{Move: true}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := dst.ApplyFiles(ctx, received(files[11:], false), ltx.ApplyOptions{Move: true}); err != nil {
		t.Fatal(err)
	}
	rep, err := ltx.VerifyDir(dst.Dir)
	if err != nil || len(rep.Files) != len(files) {
		t.Fatalf("replica log directory: %d files, %v; want %d", len(rep.Files), err, len(files))
	}
	for _, f := range dst.Files() {
		if f.Seal == 0 {
			t.Fatalf("%s moved into the log without a seal", f.Name)
		}
	}

	// Files the caller verified go in unread; applying them still checks
	// them: bytes that changed since are refused, and the same files sent
	// again repair the database.
	src.run(4, t0.Add(time.Hour), nil)
	files = src.log.Files()
	next := files[len(files)-4:]
	infoOf := func(path string) ltx.FileInfo {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		vr := ltx.NewVerifyReader(f, 0)
		n, err := io.Copy(io.Discard, vr)
		if err != nil {
			t.Fatal(err)
		}
		h, tr := vr.Header(), vr.Trailer()
		return ltx.FileInfo{Name: ltx.FormatName(h.MinTXID, h.MaxTXID), Header: h, PostApplyChecksum: tr.PostApplyChecksum,
			FileChecksum: tr.FileChecksum, Size: n, Seal: vr.Seal()}
	}
	var verified []ltx.FileInfo
	for _, path := range received(next, false) {
		verified = append(verified, infoOf(path))
	}
	changed := received(next, true) // over the files verified
	if _, _, err := dst.ApplyFiles(ctx, changed, ltx.ApplyOptions{Move: true, Verified: verified}); !errors.Is(err, ltx.ErrCorrupt) {
		t.Fatalf("files changed after they were verified: %v, want ErrCorrupt", err)
	}
	if got := dst.Pos(); got != files[len(files)-5].Pos() {
		t.Fatalf("log moved to %s on files that did not apply", got)
	}
	if _, _, err := dst.ApplyFiles(ctx, received(next, false), ltx.ApplyOptions{Move: true, Verified: verified}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := dst.ApplyFiles(ctx, received(next[:2], false), ltx.ApplyOptions{Move: true, Verified: verified}); err == nil || !strings.Contains(err.Error(), "4 files described as verified for 2") {
		t.Fatalf("2 files described by 4: %v", err)
	}
	if rep, err := ltx.VerifyDir(dst.Dir); err != nil || len(rep.Files) != len(files) {
		t.Fatalf("replica log directory: %d files, %v; want %d", len(rep.Files), err, len(files))
	}
	if dst.Pos() != src.log.Pos() || !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), src.data) {
		t.Fatalf("replica at %s, want %s and the source's database", dst.Pos(), src.log.Pos())
	}
}

// TestLog_ApplyFilesRollForward opens a log that a crash stopped in the
// middle of a group: its files are in the log and the database holds some
// pages of its last file but not those of the first.
func TestLog_ApplyFilesRollForward(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	src := newFakeDB(t, t.TempDir(), 4)
	h := history{}
	src.run(20, t0, h)
	files := src.log.Files()
	const k = 12 // the group is files[k:]
	for _, tt := range []struct {
		name   string
		marker string
		ok     bool
	}{
		{"PartlyWritten", files[k].Name, true},
		// A marker naming an earlier group: its files are applied again,
		// which leaves the database where applying them once does.
		{"MarkerBeforeGroup", files[k-3].Name, true},
		{"MarkerInFirstFile", "0000000000000001-0000000000000999.ltx", true},
		{"ErrMarkerNotInLog", "0000000000000999-0000000000000999.ltx", false},
		{"ErrMarkerAtLastFile", files[len(files)-1].Name, false}, // the group's earlier files are not accounted for
	} {
		t.Run(tt.name, func(t *testing.T) {
			dst := newReplicaLog(t)
			applyAll(t, dst, src.log, files[:k])
			if err := dst.Close(); err != nil {
				t.Fatal(err)
			}
			for _, f := range files[k:] {
				copyFile(t, filepath.Join(src.log.Dir, f.Name), filepath.Join(dst.Dir, f.Name))
			}
			if err := os.WriteFile(filepath.Join(dst.Dir, ".applying"), []byte(tt.marker), 0o644); err != nil {
				t.Fatal(err)
			}
			// Pages of the final image that the group's first file does not
			// write reached the database; nothing of the first file did.
			have := testingutil.MustReadFile(t, dst.DBPath)
			ps := int(src.pageSize)
			firstImage := h[files[k].Pos()]
			var wrote int
			for _, pgno := range testingutil.ChangedPages(have, src.data, ps) {
				off := (int(pgno) - 1) * ps
				if off+ps > len(src.data) || off+ps > len(have) || (off+ps <= len(firstImage) && !bytes.Equal(firstImage[off:off+ps], have[off:off+ps])) {
					continue
				}
				copy(have[off:], src.data[off:off+ps])
				wrote++
			}
			if wrote == 0 {
				t.Fatal("no page of the group's last files to write")
			}
			if err := os.WriteFile(dst.DBPath, have, 0o644); err != nil {
				t.Fatal(err)
			}
			l := testingutil.NewLog(t, "db", dst.Dir, dst.DBPath)
			err := l.Open(context.Background())
			if !tt.ok {
				var mismatch *ltx.DatabaseMismatchError
				if !errors.As(err, &mismatch) {
					t.Fatalf("Open: %v, want a DatabaseMismatchError", err)
				}
				if !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), have) {
					t.Fatal("Open changed a database it could not roll forward")
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer l.Close()
			if l.Pos() != src.log.Pos() || !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), src.data) {
				t.Fatalf("after Open the log is at %s, want %s and the source's database", l.Pos(), src.log.Pos())
			}
		})
	}
}

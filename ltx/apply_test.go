package ltx_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
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
		entries, _ := os.ReadDir(dst.Dir)
		if !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), before) || len(dst.Files()) != n || len(entries) != n {
			t.Fatalf("a damaged file changed the replica: %d files in the log, %d entries in its directory, want %d", len(dst.Files()), len(entries), n)
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
		name  string
		crash func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) // leaves dst's directory as a crash would
		want  error                                               // nil: rolled forward
	}{
		{"FileInLogOnly", func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) {
			copyFile(t, filepath.Join(src.log.Dir, last.Name), filepath.Join(dst.Dir, last.Name))
			writeMarker(t, dst, last)
		}, nil},
		{"ErrNoMarker", func(t *testing.T, dst *ltx.Log, last ltx.FileInfo) {
			// The same files without the marker: a database behind its
			// log that nothing says was being applied is left alone.
			copyFile(t, filepath.Join(src.log.Dir, last.Name), filepath.Join(dst.Dir, last.Name))
		}, &ltx.DatabaseMismatchError{}},
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
		}, nil},
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
		}, &ltx.DatabaseMismatchError{}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dst := newReplicaLog(t)
			applyAll(t, dst, src.log, files[:len(files)-1])
			before := testingutil.MustReadFile(t, dst.DBPath)
			if err := dst.Close(); err != nil {
				t.Fatal(err)
			}
			tt.crash(t, dst, files[len(files)-1])
			l := testingutil.NewLog(t, "db", dst.Dir, dst.DBPath)
			err := l.Open(context.Background())
			if tt.want != nil {
				var mismatch *ltx.DatabaseMismatchError
				if !errors.As(err, &mismatch) {
					t.Fatalf("Open: %v, want a DatabaseMismatchError", err)
				}
				if got := testingutil.MustReadFile(t, dst.DBPath); bytes.Equal(got, src.data) || (tt.name == "ErrNoMarker" && !bytes.Equal(got, before)) {
					t.Fatal("Open changed a database that does not match the log")
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer l.Close()
			if l.Pos() != src.log.Pos() || !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), src.data) {
				t.Fatalf("after Open the log is at %s and the database equal to the source's: %v; want %s and true",
					l.Pos(), bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), src.data), src.log.Pos())
			}
		})
	}
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

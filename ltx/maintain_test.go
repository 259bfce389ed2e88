package ltx_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// mustSnapshotFile writes a snapshot of d's database at its log's position
// to a new file and returns its path and description.
func mustSnapshotFile(tb testing.TB, d *fakeDB) (string, *ltx.FileInfo) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "snapshot.ltx")
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	db, err := os.Open(d.path)
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = db.Close() }()
	info, err := d.log.Snapshot(context.Background(), f, db)
	if err != nil {
		tb.Fatal(err)
	}
	if err := f.Close(); err != nil {
		tb.Fatal(err)
	}
	return path, info
}

// stopAt makes the first pass of the failpoint name, in whatever goroutine,
// wait until the returned resume is called, and returns a channel that
// gets a value when it is reached. The failpoint gives up after waitTimeout, failing
// the test. The hook is reset at cleanup.
func stopAt(tb testing.TB, name string) (reached <-chan struct{}, resume func()) {
	stopped, resumed := make(chan struct{}, 1), make(chan struct{})
	var once, resumeOnce sync.Once
	ltx.SetFailpoint(func(n string) {
		if n != name {
			return
		}
		once.Do(func() {
			stopped <- struct{}{}
			select {
			case <-resumed:
			case <-time.After(waitTimeout):
				tb.Errorf("held at failpoint %q for %v: the test never resumed it", name, waitTimeout)
			}
		})
	})
	tb.Cleanup(func() { ltx.SetFailpoint(func(string) {}) })
	return stopped, func() { resumeOnce.Do(func() { close(resumed) }) }
}

// goErr runs fn in a new goroutine and returns a channel that gets its
// error.
func goErr(fn func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	return ch
}

// assertLogHolds fails unless l's directory holds exactly the files of
// want, with the bytes of the files at paths, and no other entry (the
// empty marker an apply leaves aside).
func assertLogHolds(tb testing.TB, l *ltx.Log, want []ltx.FileInfo, paths []string) {
	tb.Helper()
	var names []string
	for _, fi := range want {
		names = append(names, fi.Name)
	}
	if got := logEntries(tb, l); !slices.Equal(got, names) {
		tb.Fatalf("log directory holds %v, want %v", got, names)
	}
	for i, fi := range want {
		if !bytes.Equal(testingutil.MustReadFile(tb, filepath.Join(l.Dir, fi.Name)), testingutil.MustReadFile(tb, paths[i])) {
			tb.Fatalf("%s in the log is not the file applied", fi.Name)
		}
	}
}

// assertFiles fails unless l holds exactly the files of want.
func assertFiles(tb testing.TB, l *ltx.Log, want []ltx.FileInfo) {
	tb.Helper()
	got := l.Files()
	same := len(got) == len(want)
	for i := 0; same && i < len(got); i++ {
		same = got[i].Name == want[i].Name && got[i].Pos() == want[i].Pos() && got[i].FileChecksum == want[i].FileChecksum
	}
	if !same {
		tb.Fatalf("log holds %v, want %v", got, want)
	}
}

// TestLog_Compact_SnapshotApplied applies a snapshot to a replica while a
// compaction of its log has written the compacted file but not put it in
// the log: the compaction discards the file and returns without error, and
// the log, also reopened, holds the snapshot alone, with no file of the
// compaction in its directory. In SameName the compacted file and the
// snapshot have the same name. Not parallel: the failpoint hook is global.
func TestLog_Compact_SnapshotApplied(t *testing.T) {
	for _, tt := range []struct {
		name   string
		before time.Duration // compact the files committed before t0 + before
		txids  int           // transactions in the snapshot
	}{
		{"OtherName", 6 * time.Minute, 20},
		{"SameName", time.Hour, 11},
	} {
		t.Run(tt.name, func(t *testing.T) {
			src := newFakeDB(t, t.TempDir(), 21)
			src.run(12, t0, nil)
			dst := newReplicaLog(t)
			applyAll(t, dst, src.log, src.log.Files())
			other := newFakeDB(t, t.TempDir(), 22)
			other.run(tt.txids, t0, nil)
			snap, info := mustSnapshotFile(t, other)
			info.Name = ltx.FormatName(info.Header.MinTXID, info.Header.MaxTXID)

			written, resume := stopAt(t, "compact-written")
			defer resume()
			type result struct {
				merged int
				err    error
			}
			compacted := make(chan result, 1)
			go func() {
				n, err := dst.Compact(t.Context(), t0.Add(tt.before))
				compacted <- result{n, err}
			}()
			testingutil.Recv(t, written, waitTimeout, "the compaction to write its file")
			applied := goErr(func() error {
				_, _, err := dst.ApplyFiles(t.Context(), []string{snap}, ltx.ApplyOptions{})
				return err
			})
			if err := testingutil.Recv(t, applied, waitTimeout, "the snapshot to apply while the compaction waits"); err != nil {
				t.Fatalf("apply the snapshot: %v", err)
			}
			resume()
			res := testingutil.Recv(t, compacted, waitTimeout, "the compaction to finish")
			if res.err != nil || res.merged != 0 {
				t.Fatalf("compaction across a snapshot: merged %d, err %v; want 0, nil", res.merged, res.err)
			}
			want := []ltx.FileInfo{*info}
			assertFiles(t, dst, want)
			assertLogHolds(t, dst, want, []string{snap})

			_ = dst.Close()
			reopened := testingutil.MustOpenLog(t, "db", dst.Dir, dst.DBPath)
			assertFiles(t, reopened, want)
			assertLogHolds(t, reopened, want, []string{snap})
			if !bytes.Equal(testingutil.MustReadFile(t, dst.DBPath), other.data) {
				t.Fatal("replica database differs from the snapshot's")
			}
		})
	}
}

// TestLog_Prune_SnapshotApplied prunes a replica's log while a snapshot,
// followed by files named as files the prune removes, replaces it: the
// apply holds maintenance off until the log holds its files, so the prune
// runs after it, on the new files (of which it removes none), and removes
// none of them by the name of an old one. Not parallel: the failpoint hook
// is global.
func TestLog_Prune_SnapshotApplied(t *testing.T) {
	src := newFakeDB(t, t.TempDir(), 23)
	src.run(12, t0, nil)
	dst := newReplicaLog(t)
	applyAll(t, dst, src.log, src.log.Files())
	other := newFakeDB(t, t.TempDir(), 24)
	other.run(5, t0.Add(48*time.Hour), nil)
	snap, info := mustSnapshotFile(t, other)
	info.Name = ltx.FormatName(info.Header.MinTXID, info.Header.MaxTXID)
	other.run(5, t0.Add(49*time.Hour), nil)
	want, paths := []ltx.FileInfo{*info}, []string{snap}
	for _, fi := range other.log.Files()[5:] {
		want, paths = append(want, fi), append(paths, filepath.Join(other.log.Dir, fi.Name))
	}

	// Stopped once the group's files are in the log directory, before the
	// log lists them.
	installed, resume := stopAt(t, "syncdir")
	defer resume()
	applied := goErr(func() error {
		_, _, err := dst.ApplyFiles(t.Context(), paths, ltx.ApplyOptions{})
		return err
	})
	testingutil.Recv(t, installed, waitTimeout, "the snapshot's files to enter the log directory")
	if !dst.MaintenanceHeld() {
		t.Error("a snapshot replacing the log does not hold maintenance off")
	}
	// Every old file is past MaxRetention at t0+30h; the new ones are not.
	var pruned int
	prunedErr := goErr(func() (err error) {
		pruned, err = dst.Prune(t.Context(), 1<<20, t0.Add(30*time.Hour))
		return err
	})
	resume()
	if err := testingutil.Recv(t, applied, waitTimeout, "the snapshot to apply"); err != nil {
		t.Fatalf("apply the snapshot: %v", err)
	}
	if err := testingutil.Recv(t, prunedErr, waitTimeout, "the prune to finish"); err != nil || pruned != 0 {
		t.Fatalf("prune across a snapshot: %d files, err %v; want 0, nil", pruned, err)
	}
	assertFiles(t, dst, want)
	assertLogHolds(t, dst, want, paths)
	_ = dst.Close()
	reopened := testingutil.MustOpenLog(t, "db", dst.Dir, dst.DBPath)
	assertFiles(t, reopened, want)
	assertLogHolds(t, reopened, want, paths)
}

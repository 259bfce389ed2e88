package ltx_test

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// inode returns the inode number of the file at path.
func inode(tb testing.TB, path string) uint64 {
	tb.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		tb.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// TestSpares checks that a log writes new files over spares, takes pruned
// files as spares, and never recycles a file a reader has open.
func TestSpares(t *testing.T) {
	dir := t.TempDir()
	spareDir := filepath.Join(dir, "spare")
	if err := os.MkdirAll(spareDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// A spare far longer than any file the log will write, and a file that
	// is not a spare's.
	junk := make([]byte, 1<<20)
	for i := range junk {
		junk[i] = byte(i * 7)
	}
	if err := os.WriteFile(filepath.Join(spareDir, "7"), junk, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(spareDir, "notes.txt"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	spares, err := ltx.OpenSpares(spareDir, 5)
	if err != nil {
		t.Fatal(err)
	}
	if n := spares.Len(); n != 1 {
		t.Fatalf("opened %d spares, want 1", n)
	}
	if _, err := os.Stat(filepath.Join(spareDir, "notes.txt")); !os.IsNotExist(err) {
		t.Fatalf("a file with a name that is not a spare's is still in the pool: %v", err)
	}
	junkIno := inode(t, filepath.Join(spareDir, "7"))

	d := newFakeDB(t, dir, 1)
	d.log.Spares = spares
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	d.run(10, t0, nil) // TXIDs 1 (a snapshot) to 10
	files := d.log.Files()
	if len(files) != 10 {
		t.Fatalf("log has %d files, want 10", len(files))
	}
	// The first commit wrote over the 1 MiB spare.
	first := filepath.Join(d.log.Dir, files[0].Name)
	if got := inode(t, first); got != junkIno {
		t.Fatalf("%s: inode %d, want the spare's %d", files[0].Name, got, junkIno)
	}
	if fi, err := os.Stat(first); err != nil || fi.Size() != files[0].Size || fi.Size() >= int64(len(junk)) {
		t.Fatalf("%s written over a spare: size %v (err %v), want %d", files[0].Name, fi.Size(), err, files[0].Size)
	}
	if spares.Len() != 0 {
		t.Fatalf("%d spares left, want 0", spares.Len())
	}

	// A reader holds the third file open while pruning removes it.
	c, err := d.log.Cursor(files[1].Pos())
	if err != nil {
		t.Fatal(err)
	}
	r := mustNext(t, c)
	if r.Info.Name != files[2].Name {
		t.Fatalf("reader opened %s, want %s", r.Info.Name, files[2].Name)
	}
	held := inode(t, filepath.Join(d.log.Dir, files[2].Name))
	var pruned []uint64
	for _, f := range files[:7] {
		pruned = append(pruned, inode(t, filepath.Join(d.log.Dir, f.Name)))
	}
	d.log.Retention = time.Minute
	if n, err := d.log.Prune(context.Background(), files[6].Header.MaxTXID, t0.Add(24*time.Hour)); err != nil || n != 7 {
		t.Fatalf("prune removed %d files, err %v; want 7", n, err)
	}
	// Seven removed, one of them read: six could be spares, the pool keeps
	// five, the rest are deleted.
	if n := spares.Len(); n != 5 {
		t.Fatalf("%d spares after prune, want 5", n)
	}
	entries, err := os.ReadDir(spareDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		ino := inode(t, filepath.Join(spareDir, e.Name()))
		if ino == held {
			t.Fatal("the file a reader has open became a spare")
		}
		if !slices.Contains(pruned, ino) {
			t.Fatalf("spare %s (inode %d) is not a pruned file", e.Name(), ino)
		}
		if fi, err := e.Info(); err != nil || fi.Size() != 0 {
			t.Fatalf("spare %s keeps %d bytes (err %v), want 0", e.Name(), fi.Size(), err)
		}
	}
	// The reader still reads the file whole and verified.
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatalf("read %s after it was pruned: %v", r.Info.Name, err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}

	// New files are written over the spares and verify.
	d.run(3, t0.Add(time.Hour), nil)
	if n := spares.Len(); n != 2 {
		t.Fatalf("%d spares after 3 commits, want 2", n)
	}
	for _, f := range d.log.Files() {
		info, err := ltx.VerifyFile(filepath.Join(d.log.Dir, f.Name))
		if err != nil {
			t.Fatal(err)
		}
		if info.FileChecksum != f.FileChecksum || info.Size != f.Size {
			t.Fatalf("%s: checksum %s size %d on disk, log says %s size %d", f.Name, info.FileChecksum, info.Size, f.FileChecksum, f.Size)
		}
	}
	for _, f := range d.log.Files()[4:] {
		if ino := inode(t, filepath.Join(d.log.Dir, f.Name)); !slices.Contains(pruned, ino) {
			t.Fatalf("%s (inode %d) was not written over a spare", f.Name, ino)
		}
	}
	// The log reopens: its chain and the database agree.
	if err := d.log.Close(); err != nil {
		t.Fatal(err)
	}
	l := testingutil.MustOpenLog(t, "db", d.log.Dir, d.path)
	if l.Pos() != d.log.Pos() {
		t.Fatalf("reopened at %s, want %s", l.Pos(), d.log.Pos())
	}
}

// TestSpares_Fill checks that Fill creates empty spare files up to the
// number asked and the pool's limit, that they survive a reopen, and that
// a done context stops it.
func TestSpares_Fill(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spare")
	s, err := ltx.OpenSpares(dir, 100)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := s.Fill(context.Background(), 70); err != nil || n != 70 || s.Len() != 70 {
		t.Fatalf("Fill(70): created %d, %v; pool holds %d; want 70, nil, 70", n, err, s.Len())
	}
	if n, err := s.Fill(context.Background(), 70); err != nil || n != 0 {
		t.Fatalf("Fill(70) again: created %d, %v; want 0, nil", n, err)
	}
	if n, err := s.Fill(context.Background(), 500); err != nil || n != 30 || s.Len() != 100 {
		t.Fatalf("Fill(500) with a limit of 100: created %d, %v; pool holds %d; want 30, nil, 100", n, err, s.Len())
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 100 {
		t.Fatalf("%s holds %d files (%v), want 100", dir, len(entries), err)
	}
	for _, e := range entries {
		if fi, err := e.Info(); err != nil || !fi.Mode().IsRegular() || fi.Size() != 0 {
			t.Fatalf("spare %s: %v, %v; want an empty regular file", e.Name(), fi, err)
		}
	}
	// Taken, written and put back, a filled spare is like any other.
	p := s.Take()
	if err := os.WriteFile(p, []byte("ltx"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(p); err != nil {
		t.Fatal(err)
	}
	again, err := ltx.OpenSpares(dir, 100)
	if err != nil || again.Len() != 100 {
		t.Fatalf("reopened pool holds %d (%v), want 100", again.Len(), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	big, err := ltx.OpenSpares(filepath.Join(t.TempDir(), "spare"), 1000)
	if err != nil {
		t.Fatal(err)
	}
	// It stops at the first rest after ctx is done: after one batch.
	if n, err := big.Fill(ctx, 1000); err != context.Canceled || n == 0 || n >= 1000 {
		t.Fatalf("Fill with a cancelled context: created %d, %v; want fewer than 1000, context.Canceled", n, err)
	}
	var nilPool *ltx.Spares
	if n, err := nilPool.Fill(context.Background(), 10); n != 0 || err != nil {
		t.Fatalf("Fill of a nil pool: %d, %v; want 0, nil", n, err)
	}
}

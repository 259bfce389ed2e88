package ltx_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// readNext reads the cursor's next file, which the log already holds, in
// full.
func readNext(tb testing.TB, c *ltx.Cursor) (*ltx.Reader, []byte) {
	tb.Helper()
	r := mustNext(tb, c)
	defer func() { _ = r.Close() }()
	b, err := io.ReadAll(r)
	if err != nil {
		tb.Fatal(err)
	}
	return r, b
}

// nextResult is what a Next called by goNext returned.
type nextResult struct {
	r   *ltx.Reader
	err error
}

// goNext calls c.Next(ctx) in a new goroutine and returns a channel that
// gets what it returned.
func goNext(ctx context.Context, c *ltx.Cursor) <-chan nextResult {
	ch := make(chan nextResult, 1)
	go func() {
		r, err := c.Next(ctx)
		ch <- nextResult{r, err}
	}()
	return ch
}

// awaitNext returns what the Next of goNext returned, or fails the test
// after waitTimeout saying what it waited for.
func awaitNext(tb testing.TB, next <-chan nextResult, what string) nextResult {
	tb.Helper()
	select {
	case res := <-next:
		return res
	case <-time.After(waitTimeout):
		tb.Fatalf("waited %v for %s", waitTimeout, what)
		return nextResult{}
	}
}

// waitCursorWaits returns once the Next of goNext, on a cursor of l, is
// blocked waiting for the log to change. It fails the test if that Next
// returns first, or after waitTimeout.
func waitCursorWaits(tb testing.TB, l *ltx.Log, next <-chan nextResult) {
	tb.Helper()
	deadline := time.Now().Add(waitTimeout)
	for l.Waiting() == 0 {
		select {
		case res := <-next:
			name := "no file"
			if res.r != nil {
				name = res.r.Info.Name
			}
			tb.Fatalf("Next returned (%s, err %v) instead of waiting for the log to change", name, res.err)
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			tb.Fatalf("waited %v for a cursor to wait in Next for the log to change", waitTimeout)
		}
	}
}

func TestCursor_ReadsEveryFileThenWaits(t *testing.T) {
	d := newFakeDB(t, t.TempDir(), 10)
	d.run(5, t0, nil)

	c, err := d.log.Cursor(ltx.Pos{})
	if err != nil {
		t.Fatal(err)
	}
	for _, fi := range d.log.Files() {
		r, b := readNext(t, c)
		if r.Info != fi {
			t.Fatalf("served %v, want %v", r.Info, fi)
		}
		if !bytes.Equal(b, testingutil.MustReadFile(t, filepath.Join(d.log.Dir, fi.Name))) {
			t.Fatalf("%s: bytes served differ from the file", fi.Name)
		}
		if c.Pos() != fi.Pos() {
			t.Fatalf("cursor at %s, want %s", c.Pos(), fi.Pos())
		}
	}

	// At the end, Next waits for the next commit.
	next := goNext(t.Context(), c)
	waitCursorWaits(t, d.log, next)
	info := d.commit(d.step(), t0.Add(time.Hour))
	res := awaitNext(t, next, "Next to return the file committed while it waited")
	if res.err != nil {
		t.Fatalf("Next waiting for a commit: %v", res.err)
	}
	_, err = io.ReadAll(res.r)
	_ = res.r.Close()
	if err != nil {
		t.Fatalf("read %s: %v", res.r.Info.Name, err)
	}
	if res.r.Info != *info {
		t.Fatalf("served %v after waiting, want %v", res.r.Info, info)
	}

	// A closed log wakes a waiting cursor.
	next = goNext(t.Context(), c)
	waitCursorWaits(t, d.log, next)
	_ = d.log.Close()
	if res := awaitNext(t, next, "Next to return once the log closed"); !errors.Is(res.err, ltx.ErrClosed) {
		t.Fatalf("Next on a closed log: err = %v, want ErrClosed", res.err)
	}
}

func TestCursor_PosErrors(t *testing.T) {
	d := newFakeDB(t, t.TempDir(), 11)
	d.run(10, t0, nil)
	files := d.log.Files()
	pos := func(i int) ltx.Pos { return files[i].Pos() }
	wrong := func(p ltx.Pos) ltx.Pos { p.PostApplyChecksum ^= 0x10; return p }

	for name, tc := range map[string]struct {
		pos  ltx.Pos
		want error
		have ltx.Checksum
	}{
		"ahead":           {ltx.Pos{TXID: 11, PostApplyChecksum: pos(9).PostApplyChecksum}, ltx.ErrPosUnknown, 0},
		"mismatch":        {wrong(pos(4)), ltx.ErrPosMismatch, pos(4).PostApplyChecksum},
		"mismatch at end": {wrong(pos(9)), ltx.ErrPosMismatch, pos(9).PostApplyChecksum},
		"zero checksum":   {ltx.Pos{TXID: 3}, ltx.ErrPosMismatch, pos(2).PostApplyChecksum},
	} {
		_, err := d.log.Cursor(tc.pos)
		var pe *ltx.PosError
		if !errors.Is(err, tc.want) || !errors.As(err, &pe) || pe.Have != tc.have || pe.Pos != tc.pos || pe.DB != "db" {
			t.Errorf("%s: err = %v, want %v with have %s", name, err, tc.want, tc.have)
		}
	}
	for i := range files {
		if _, err := d.log.Cursor(pos(i)); err != nil {
			t.Errorf("position %s: %v", pos(i), err)
		}
	}

	// Pruned away under a cursor.
	c, err := d.log.Cursor(pos(2))
	if err != nil {
		t.Fatal(err)
	}
	d.log.Retention = time.Minute
	if n, err := d.log.Prune(context.Background(), 6, t0.Add(time.Hour)); err != nil || n != 6 {
		t.Fatalf("prune removed %d files, err %v; want 6", n, err)
	}
	if res := awaitNext(t, goNext(t.Context(), c), "Next after prune to return"); !errors.Is(res.err, ltx.ErrPosTooOld) {
		t.Fatalf("Next after prune: err = %v, want ErrPosTooOld", res.err)
	}
	for _, p := range []ltx.Pos{{}, pos(0), pos(4)} {
		if _, err := d.log.Cursor(p); !errors.Is(err, ltx.ErrPosTooOld) {
			t.Errorf("position %s after prune: err = %v, want ErrPosTooOld", p, err)
		}
	}
	if _, err := d.log.Cursor(pos(5)); err != nil {
		t.Errorf("oldest position after prune: %v", err)
	}
}

// TestCursor_ContextCanceled checks that a waiting Next returns when its
// context ends.
func TestCursor_ContextCanceled(t *testing.T) {
	d := newFakeDB(t, t.TempDir(), 12)
	d.run(1, t0, nil)
	c, err := d.log.Cursor(d.log.Pos())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if res := awaitNext(t, goNext(ctx, c), "Next to return when its context ended"); !errors.Is(res.err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", res.err)
	}
}

// applyFrom brings a copy of image, the database at pos, to the log's end
// through a cursor, and returns the resulting bytes.
func applyFrom(tb testing.TB, l *ltx.Log, pos ltx.Pos, image []byte) []byte {
	tb.Helper()
	ctx := context.Background()
	f, table := openImage(tb, image)
	c, err := l.Cursor(pos)
	if err != nil {
		tb.Fatalf("cursor at %s: %v", pos, err)
	}
	for c.Pos() != l.Pos() {
		r := mustNext(tb, c)
		if r.Info.PreApplyPos() != pos && !(pos.TXID == 0 && r.Info.Header.IsSnapshot()) {
			tb.Fatalf("served %v to a reader at %s", r.Info, pos)
		}
		if pos, err = ltx.Apply(ctx, f, table, pos, r); err != nil {
			tb.Fatalf("apply %s: %v", r.Info.Name, err)
		}
		_ = r.Close()
	}
	b, err := os.ReadFile(f.Name())
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// TestLog_Compact_KeepsEveryPosition compacts a log twice and checks that a
// reader at every position the log had before, with the database as it was
// there, is still served and reaches the final database byte for byte, also
// after the log is reopened.
func TestLog_Compact_KeepsEveryPosition(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := newFakeDB(t, dir, 13)
	h := history{{}: nil}
	d.run(60, t0, h)
	d.log.CompactionSize = 16 << 10 // a few groups

	before := len(d.log.Files())
	merged, err := d.log.Compact(ctx, t0.Add(40*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	after := d.log.Files()
	if merged == 0 || len(after) != before-merged {
		t.Fatalf("compaction merged %d files: %d before, %d after", merged, before, len(after))
	}
	var compacted int
	for _, fi := range after {
		if fi.Header.MaxTXID > fi.Header.MinTXID {
			compacted++
			if _, err := os.Stat(filepath.Join(d.log.Dir, fi.Name[:33]+".pos")); err != nil {
				t.Fatalf("%s has no position sidecar: %v", fi.Name, err)
			}
		}
	}
	if compacted < 2 {
		t.Fatalf("%d compacted files, want several: %v", compacted, after)
	}

	// More transactions, then compact again over compacted files.
	d.run(20, t0.Add(60*time.Minute), h)
	d.log.CompactionSize = 1 << 30
	if _, err := d.log.Compact(ctx, t0.Add(70*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if files := d.log.Files(); len(files) != 1+(80-70) {
		t.Fatalf("after second compaction: %d files, want 11: %v", len(files), files)
	}

	check := func(l *ltx.Log) {
		for pos, image := range h {
			if got := applyFrom(t, l, pos, image); !bytes.Equal(got, d.data) {
				t.Fatalf("from %s: database differs from the primary's", pos)
			}
		}
		if got, want := mustRestoreSHA(t, l), testingutil.FileSHA256(t, d.path); got != want {
			t.Fatalf("restore after compaction: sha256 %s, want %s", got, want)
		}
	}
	check(d.log)

	_ = d.log.Close()
	reopened := testingutil.MustOpenLog(t, "db", d.log.Dir, d.path)
	if reopened.Pos() != d.log.Pos() || len(reopened.Files()) != len(d.log.Files()) {
		t.Fatalf("reopened at %s with %d files, want %s with %d", reopened.Pos(), len(reopened.Files()), d.log.Pos(), len(d.log.Files()))
	}
	check(reopened)

	// A wrong checksum inside a compacted file is still a mismatch.
	for pos := range h {
		if pos.TXID == 30 {
			pos.PostApplyChecksum ^= 0x100
			if _, err := reopened.Cursor(pos); !errors.Is(err, ltx.ErrPosMismatch) {
				t.Fatalf("wrong checksum inside a compacted file: err = %v", err)
			}
		}
	}
}

// TestLog_Compact_Interrupted checks that a log holding both a compacted
// file and its inputs (a crash before the inputs were removed) opens with
// the compacted file alone, also when the inputs were compacted files with
// position sidecars of their own.
func TestLog_Compact_Interrupted(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := newFakeDB(t, dir, 14)
	d.run(20, t0, nil)
	d.log.CompactionSize = 24 << 10
	if _, err := d.log.Compact(ctx, t0.Add(10*time.Minute)); err != nil {
		t.Fatal(err)
	}
	inputs := copyDir(t, d.log.Dir)
	var sidecars int
	entries, _ := os.ReadDir(inputs)
	for _, e := range entries {
		if filepath.Ext(e.Name()) == ".pos" {
			sidecars++
		}
	}
	if sidecars < 2 {
		t.Fatalf("first compaction left %d sidecars, want several", sidecars)
	}
	d.log.CompactionSize = 1 << 30
	if _, err := d.log.Compact(ctx, t0.Add(15*time.Minute)); err != nil {
		t.Fatal(err)
	}
	want := d.log.Files()
	_ = d.log.Close()
	for _, e := range entries {
		if err := os.WriteFile(filepath.Join(d.log.Dir, e.Name()), testingutil.MustReadFile(t, filepath.Join(inputs, e.Name())), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	l := testingutil.MustOpenLog(t, "db", d.log.Dir, d.path)
	if got := l.Files(); len(got) != len(want) || got[0].Name != want[0].Name {
		t.Fatalf("files after recovery = %v, want %v", got, want)
	}
	if entries, _ := os.ReadDir(d.log.Dir); len(entries) != len(want)+1 { // + the sidecar
		t.Fatalf("%d entries in the log directory, want %d", len(entries), len(want)+1)
	}
	if got, want := mustRestoreSHA(t, l), testingutil.FileSHA256(t, d.path); got != want {
		t.Fatalf("restored sha256 %s, want %s", got, want)
	}
}

func TestLog_Prune(t *testing.T) {
	ctx := context.Background()
	d := newFakeDB(t, t.TempDir(), 15)
	d.run(20, t0, nil) // txid i+1 committed at t0 + i minutes
	d.log.Retention, d.log.MaxRetention = 10*time.Minute, 24*time.Hour
	now := t0.Add(30 * time.Minute)

	for _, tc := range []struct {
		acked     ltx.TXID
		now       time.Time
		wantFirst ltx.TXID
	}{
		{0, now, 1},                       // nothing acknowledged
		{5, now, 6},                       // acknowledged and old: txids 1-5 go
		{15, t0.Add(12 * time.Minute), 6}, // acknowledged but within retention
		{15, now, 16},                     // txids up to 15 are past retention
		{18, t0.Add(48 * time.Hour), 20},  // past MaxRetention: all but the last
	} {
		if _, err := d.log.Prune(ctx, tc.acked, tc.now); err != nil {
			t.Fatal(err)
		}
		files := d.log.Files()
		if got := files[0].Header.MinTXID; got != tc.wantFirst {
			t.Fatalf("acked %d at %s: first txid %d, want %d", tc.acked, tc.now, got, tc.wantFirst)
		}
		if d.log.First() != files[0].PreApplyPos() || d.log.Pos().TXID != 20 {
			t.Fatalf("first %s, pos %s", d.log.First(), d.log.Pos())
		}
		entries, _ := os.ReadDir(d.log.Dir)
		if len(entries) != len(files) {
			t.Fatalf("%d files on disk, %d in the log", len(entries), len(files))
		}
	}
	if _, err := d.log.Restore(ctx, filepath.Join(t.TempDir(), "x")); err == nil {
		t.Fatal("restore from a pruned log without a snapshot succeeded")
	}
}

// TestLog_CloseDuringCommit closes the log while a commit is between
// writing its file and installing it: the commit completes, no panic, and
// a cursor waiting on the log is told it closed. Not parallel: the
// failpoint hook is global.
func TestLog_CloseDuringCommit(t *testing.T) {
	d := newFakeDB(t, t.TempDir(), 16)
	d.run(2, t0, nil)
	c, err := d.log.Cursor(d.log.Pos())
	if err != nil {
		t.Fatal(err)
	}
	waiting := goNext(t.Context(), c)
	waitCursorWaits(t, d.log, waiting)

	closed := false
	ltx.SetFailpoint(func(name string) {
		if name == "syncdir" && !closed {
			closed = true
			_ = d.log.Close()
		}
	})
	defer ltx.SetFailpoint(func(string) {})
	info := d.commit(d.step(), t0.Add(time.Hour))
	if !closed || info.Header.MaxTXID != 3 || d.log.Pos() != info.Pos() {
		t.Fatalf("commit across Close: closed %t, file %v, log at %s", closed, info, d.log.Pos())
	}
	if res := awaitNext(t, waiting, "the waiting cursor to return once the log closed"); !errors.Is(res.err, ltx.ErrClosed) {
		t.Fatalf("waiting cursor: err = %v, want ErrClosed", res.err)
	}
	if _, err := d.log.Commit(context.Background(), ltx.Tx{DB: bytes.NewReader(d.data), PageSize: d.pageSize, Commit: 1}); !errors.Is(err, ltx.ErrClosed) {
		t.Fatalf("commit after Close: err = %v, want ErrClosed", err)
	}
}

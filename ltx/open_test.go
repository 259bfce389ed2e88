package ltx_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// openErr opens a log of dir (without a database) and returns the error.
func openErr(t *testing.T, dir, dbPath string) (*ltx.Log, error) {
	t.Helper()
	l := testingutil.NewLog(t, "db", dir, dbPath)
	err := l.Open(context.Background())
	t.Cleanup(func() { _ = l.Close() })
	return l, err
}

func TestLog_Open_DatabaseMismatch(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDB(t, dir, 1)
	d.run(5, t0, nil)
	want := d.log.Pos()
	_ = d.log.Close()
	d.step() // changed outside the log
	state := dirState(t, dir)

	_, err := openErr(t, d.log.Dir, d.path)
	var mismatch *ltx.DatabaseMismatchError
	if !errors.As(err, &mismatch) {
		t.Fatalf("err = %v, want DatabaseMismatchError", err)
	}
	table, _ := ltx.ReadChecksumTable(d.path)
	if mismatch.Log != want || mismatch.Checksum != table.Checksum() {
		t.Fatalf("mismatch log %s db %s, want %s and %s", mismatch.Log, mismatch.Checksum, want, table.Checksum())
	}
	for _, s := range []string{`"db"`, d.path, d.log.Dir, want.PostApplyChecksum.String(), table.Checksum().String(), "regiond ltx restore"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error does not mention %q: %v", s, err)
		}
	}
	assertDirState(t, dir, state)
}

func TestLog_Open_StartsFromExistingDatabase(t *testing.T) {
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "db")
	db := testingutil.MustOpenSQLite(t, dbPath, "delete")
	w := testingutil.NewWorkload(db, 7)
	if err := w.Init(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		if _, err := w.Step(); err != nil {
			t.Fatal(err)
		}
	}
	l := testingutil.MustOpenLog(t, "db", filepath.Join(dir, "ltx"), dbPath)
	files := l.Files()
	if len(files) != 1 || !files[0].Header.IsSnapshot() || files[0].Header.MaxTXID != 1 {
		t.Fatalf("files = %v, want one snapshot at txid 1", files)
	}
	table, _ := ltx.ReadChecksumTable(dbPath)
	if l.Pos().PostApplyChecksum != table.Checksum() {
		t.Fatalf("position %s, database checksum %s", l.Pos(), table.Checksum())
	}
	if got, want := mustRestoreSHA(t, l), testingutil.FileSHA256(t, dbPath); got != want {
		t.Fatalf("restored sha256 %s, want %s", got, want)
	}
}

func TestLog_Open_RemovesUnfinishedFiles(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDB(t, dir, 2)
	d.run(3, t0, nil)
	_ = d.log.Close()
	state := dirState(t, dir)
	tmp := filepath.Join(d.log.Dir, ".0000000000000005-0000000000000005.ltx.123.tmp")
	if err := os.WriteFile(tmp, []byte("LTX1 half written"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := openErr(t, d.log.Dir, d.path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Fatalf("temporary file still there: %v", err)
	}
	if l.Pos() != d.log.Pos() || l.Pos().TXID != 3 {
		t.Fatalf("position %s, want %s", l.Pos(), d.log.Pos())
	}
	assertDirState(t, dir, state)
}

// TestLog_Open_TornLastFile checks that a half-written last file is taken
// out of the log (kept in corrupt/) and never applied, whatever the cut.
func TestLog_Open_TornLastFile(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDB(t, dir, 3)
	d.run(4, t0, nil)
	_ = d.log.Close()
	files := d.log.Files()
	last := files[len(files)-1]
	lastPath := filepath.Join(d.log.Dir, last.Name)
	full := testingutil.MustReadFile(t, lastPath)

	for _, cut := range []int{0, 1, 99, 100, 107, len(full) / 2, len(full) - 17, len(full) - 1} {
		logDir := copyDir(t, d.log.Dir)
		if err := os.WriteFile(filepath.Join(logDir, last.Name), full[:cut], 0o644); err != nil {
			t.Fatal(err)
		}
		l, err := openErr(t, logDir, "")
		if err != nil {
			t.Fatalf("cut %d: %v", cut, err)
		}
		if got, want := l.Pos(), files[len(files)-2].Pos(); got != want {
			t.Fatalf("cut %d: position %s, want %s", cut, got, want)
		}
		kept := testingutil.MustReadFile(t, filepath.Join(logDir, "corrupt", last.Name))
		if string(kept) != string(full[:cut]) {
			t.Fatalf("cut %d: torn file not kept as it was", cut)
		}
	}
}

func TestLog_Open_CorruptMiddleFile(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDB(t, dir, 4)
	d.run(4, t0, nil)
	_ = d.log.Close()
	name := d.log.Files()[2].Name
	path := filepath.Join(d.log.Dir, name)
	b := testingutil.MustReadFile(t, path)
	b[20] ^= 0x10 // header: MinTXID no longer matches the name
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	state := dirState(t, dir)
	_, err := openErr(t, d.log.Dir, d.path)
	if !errors.Is(err, ltx.ErrCorrupt) || !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), "not the last file") {
		t.Fatalf("err = %v", err)
	}
	assertDirState(t, dir, state)
}

// TestLog_Open_UnsyncedMiddleFile empties a file that later files follow,
// as a power failure may do to files never fsynced: when every later file
// may be unsynced (MayBeUnsynced), the empty file and all after it are
// moved aside and the log opens at the file before; otherwise Open fails
// as for any unreadable file in the middle, changing nothing.
func TestLog_Open_UnsyncedMiddleFile(t *testing.T) {
	for _, tc := range []struct {
		name     string
		unsynced ltx.TXID // files from this TXID on may be unsynced; 0: no MayBeUnsynced
		opens    bool
	}{
		{name: "later files unsynced", unsynced: 3, opens: true},
		{name: "a later file synced", unsynced: 5},
		{name: "no hint"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			d := newFakeDB(t, dir, 5)
			d.run(5, t0, nil)
			_ = d.log.Close()
			files := d.log.Files()
			if err := os.Truncate(filepath.Join(d.log.Dir, files[2].Name), 0); err != nil {
				t.Fatal(err)
			}
			state := dirState(t, dir)
			l := testingutil.NewLog(t, "db", d.log.Dir, "")
			if tc.unsynced != 0 {
				l.MayBeUnsynced = func(h ltx.Header) bool { return h.MinTXID >= tc.unsynced }
			}
			err := l.Open(context.Background())
			t.Cleanup(func() { _ = l.Close() })
			if !tc.opens {
				if !errors.Is(err, ltx.ErrCorrupt) || !strings.Contains(err.Error(), files[2].Name) || !strings.Contains(err.Error(), "not the last file") {
					t.Fatalf("err = %v, want one naming %s, not the last file", err, files[2].Name)
				}
				assertDirState(t, dir, state)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got, want := l.Pos(), files[1].Pos(); got != want {
				t.Fatalf("position %s, want %s, the file before the empty one", got, want)
			}
			for _, f := range files[2:] {
				if _, err := os.Stat(filepath.Join(d.log.Dir, "corrupt", f.Name)); err != nil {
					t.Fatalf("%s not moved aside: %v", f.Name, err)
				}
			}
		})
	}
}

func TestLog_Open_Gap(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDB(t, dir, 5)
	d.run(5, t0, nil)
	_ = d.log.Close()
	files := d.log.Files()
	if err := os.Remove(filepath.Join(d.log.Dir, files[2].Name)); err != nil {
		t.Fatal(err)
	}
	state := dirState(t, dir)
	_, err := openErr(t, d.log.Dir, d.path)
	if err == nil || !strings.Contains(err.Error(), "gap in TXIDs") || !strings.Contains(err.Error(), files[1].Name) || !strings.Contains(err.Error(), files[3].Name) {
		t.Fatalf("err = %v", err)
	}
	assertDirState(t, dir, state)
}

func TestLog_Open_OtherHistory(t *testing.T) {
	dirA, dirB := t.TempDir(), t.TempDir()
	a, b := newFakeDB(t, dirA, 6), newFakeDB(t, dirB, 7)
	a.run(4, t0, nil)
	b.run(4, t0, nil)
	_ = a.log.Close()
	name := a.log.Files()[2].Name
	if err := os.WriteFile(filepath.Join(a.log.Dir, name), testingutil.MustReadFile(t, filepath.Join(b.log.Dir, name)), 0o644); err != nil {
		t.Fatal(err)
	}
	state := dirState(t, dirA)
	_, err := openErr(t, a.log.Dir, "")
	if err == nil || !strings.Contains(err.Error(), "different histories") || !strings.Contains(err.Error(), name) {
		t.Fatalf("err = %v", err)
	}
	assertDirState(t, dirA, state)
}

func TestLog_Open_IgnoresForeignFiles(t *testing.T) {
	dir := t.TempDir()
	d := newFakeDB(t, dir, 8)
	d.run(2, t0, nil)
	_ = d.log.Close()
	if err := os.WriteFile(filepath.Join(d.log.Dir, "README"), []byte("notes"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d.log.Dir, "0000000000000009-0000000000000009.pos"), []byte("orphan"), 0o644); err != nil {
		t.Fatal(err)
	}
	state := dirState(t, dir)
	delete(state, "ltx/0000000000000009-0000000000000009.pos")
	if _, err := openErr(t, d.log.Dir, d.path); err != nil {
		t.Fatal(err)
	}
	assertDirState(t, dir, state) // README kept, orphan sidecar removed
}

func TestLog_Open_BadName(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "00000000000000AB-00000000000000AB.ltx"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := openErr(t, dir, ""); err == nil || !strings.Contains(err.Error(), "00000000000000AB") {
		t.Fatalf("err = %v", err)
	}
}

func TestReadChecksumTable_BadDatabase(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"short":      "SQLite format 3\x00",
		"not-sqlite": strings.Repeat("x", 4096),
		"odd-size":   "SQLite format 3\x00\x10\x00" + strings.Repeat("\x00", 5000),
	} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ltx.ReadChecksumTable(path); err == nil || !strings.Contains(err.Error(), path) {
			t.Errorf("%s: err = %v, want an error naming the file", name, err)
		}
	}
}

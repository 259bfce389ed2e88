package ltx_test

import (
	"context"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
)

var update = flag.Bool("update", false, "regenerate testdata/log from SQLite")

// sampleLog is a small log made by real SQLite: a snapshot, a compacted
// file of three transactions with its position sidecar, and one
// transaction. sample.db is the database at its end.
const sampleLog = "testdata/log"

// sampleFiles are the LTX files of sampleLog, one of each kind.
var sampleFiles = []string{
	"0000000000000001-0000000000000001.ltx", // snapshot
	"0000000000000002-0000000000000004.ltx", // compacted
	"0000000000000005-0000000000000005.ltx", // one transaction
}

// TestTestdata_Regenerate rebuilds testdata/log when run with -update, and
// otherwise checks that the committed sample still opens, verifies and
// restores to sample.db.
func TestTestdata_Regenerate(t *testing.T) {
	if *update {
		regenerate(t)
	}
	l := testingutil.MustOpenLog(t, "sample", copyDir(t, sampleLog), "")
	var names []string
	for _, fi := range l.Files() {
		names = append(names, fi.Name)
	}
	if len(names) != len(sampleFiles) {
		t.Fatalf("sample log files = %v, want %v", names, sampleFiles)
	}
	for i := range names {
		if names[i] != sampleFiles[i] {
			t.Fatalf("sample log files = %v, want %v", names, sampleFiles)
		}
	}
	if got, want := mustRestoreSHA(t, l), testingutil.FileSHA256(t, "testdata/sample.db"); got != want {
		t.Fatalf("sample log restores to sha256 %s, sample.db is %s", got, want)
	}
}

func regenerate(t *testing.T) {
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "db")
	db := testingutil.MustOpenSQLite(t, dbPath, "delete")
	l := testingutil.MustOpenLog(t, "sample", filepath.Join(dir, "ltx"), dbPath)
	c := newCapture(t, dbPath, l)
	for _, q := range []string{
		`CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); CREATE TABLE blobs (b BLOB); INSERT INTO notes (body) VALUES ('first'); INSERT INTO blobs VALUES (randomblob(2500))`,
		`INSERT INTO notes (body) VALUES ('second')`,
		`UPDATE notes SET body = 'first, edited' WHERE id = 1`,
		`INSERT INTO notes (body) VALUES ('third')`,
		`DELETE FROM notes WHERE id = 2`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
		c.commit()
	}
	files := l.Files()
	l.CompactionSize = files[1].Size + files[2].Size + files[3].Size
	if files[0].Size <= l.CompactionSize {
		t.Fatalf("snapshot (%d bytes) would be compacted with the next files (%d bytes)", files[0].Size, l.CompactionSize)
	}
	if _, err := l.Compact(context.Background(), time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(sampleLog); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(sampleLog, 0o755); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(l.Dir)
	for _, e := range entries {
		if err := os.WriteFile(filepath.Join(sampleLog, e.Name()), testingutil.MustReadFile(t, filepath.Join(l.Dir, e.Name())), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile("testdata/sample.db", testingutil.MustReadFile(t, dbPath), 0o644); err != nil {
		t.Fatal(err)
	}
}

package durable_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/meridian-db/meridian/internal/durable"
)

func TestWriteAndReplaceFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := durable.WriteFile(path, []byte("one")); err != nil {
		t.Fatal(err)
	}
	if err := durable.ReplaceFile(path, []byte("two\n")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "two\n" {
		t.Fatalf("after ReplaceFile: %q, %v; want \"two\\n\"", b, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("directory after ReplaceFile: %v, %v; want only the file, no temporary one", entries, err)
	}
	if err := durable.ReplaceFile(filepath.Join(dir, "missing", "f"), nil); err == nil {
		t.Fatal("ReplaceFile into a missing directory: no error")
	}
	if err := durable.SyncDir(filepath.Join(dir, "missing")); !os.IsNotExist(err) {
		t.Fatalf("SyncDir of a missing directory: %v, want not exist", err)
	}
}

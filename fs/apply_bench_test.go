package fs_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
)

// BenchmarkFileSystem_ApplyFiles applies a primary's small transactions,
// one LTX file each, to a read-only mount, as a replica does: each file is
// first written to a file of its own, as received, then applied one at a
// time (a replica keeping up) or in groups (one catching up), copied into
// the log or moved there. The time is per file.
func BenchmarkFileSystem_ApplyFiles(b *testing.B) {
	for _, bc := range []struct {
		group int
		move  bool
	}{{1, false}, {1, true}, {4, true}, {16, true}, {64, true}} {
		b.Run(fmt.Sprintf("group=%d/move=%t", bc.group, bc.move), func(b *testing.B) {
			src := newBank(b, "wal") // no journal created and deleted per transaction: deletes slow creates down on some filesystems
			for range b.N {
				src.step()
			}
			f := testingutil.MustMount(b)
			f.SetReadOnly(true)
			ctx := context.Background()
			files := src.log.Files()
			if _, err := f.Apply(ctx, "bank.db", filepath.Join(src.log.Dir, files[0].Name), false); err != nil {
				b.Fatal(err)
			}
			files = files[1:]
			tmp := filepath.Join(f.DataDir, "tmp")
			if err := os.MkdirAll(tmp, 0o700); err != nil {
				b.Fatal(err)
			}
			syscall.Sync() // the set-up's writes, not flushed while the files apply
			b.ResetTimer()
			for i := 0; i < len(files); i += bc.group {
				var paths []string
				for _, file := range files[i:min(i+bc.group, len(files))] {
					paths = append(paths, receive(b, f, tmp, filepath.Join(src.log.Dir, file.Name)))
				}
				if _, err := f.ApplyFiles(ctx, "bank.db", paths, fs.ApplyOptions{Move: bc.move}); err != nil {
					b.Fatal(err)
				}
				for _, path := range paths {
					if err := f.Spares().Put(path); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// receive writes the file at path into a spare file of f, or a new one in
// dir, as a replica receiving it does, and returns where.
func receive(b *testing.B, f *fs.FileSystem, dir, path string) string {
	src, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	var dst *os.File
	if spare := f.Spares().Take(); spare != "" {
		dst, err = os.OpenFile(spare, os.O_RDWR|os.O_TRUNC, 0)
	} else {
		dst, err = os.CreateTemp(dir, "recv-*.ltx")
	}
	if err != nil {
		b.Fatal(err)
	}
	defer dst.Close()
	if _, err := io.Copy(dst, src); err != nil {
		b.Fatal(err)
	}
	return dst.Name()
}

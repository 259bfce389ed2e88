package ltx_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	codec "github.com/superfly/ltx"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// damaged calls fn with every single-bit flip and every truncation of b.
func damaged(b []byte, fn func(what string, bad []byte)) {
	bad := make([]byte, len(b))
	for i := range b {
		for bit := 0; bit < 8; bit++ {
			copy(bad, b)
			bad[i] ^= 1 << bit
			fn("flip", bad)
		}
	}
	for n := 0; n < len(b); n++ {
		fn("truncate", b[:n])
	}
}

// TestSampleFiles_Damage checks that every single-bit flip and every
// truncation of the three sample LTX files, made to the file in a log after
// the log sealed it, is rejected by VerifyFile (what `regiond ltx verify`
// runs) and by the log's reader (what a cursor serves a subscriber). Apply,
// which is given bytes without a seal, must reject the damage or leave
// exactly the database the undamaged file leaves: LZ4 can encode a page in
// more than one way, so some flips in compressed data change no page.
func TestSampleFiles_Damage(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	logDir := copyDir(t, sampleLog)
	l := testingutil.MustOpenLog(t, "sample", logDir, "")
	files := l.Files()

	// The group returns once its parallel subtests are done.
	t.Run("group", func(t *testing.T) {
		for i, name := range sampleFiles {
			t.Run(name, func(t *testing.T) {
				t.Parallel() // each damages its own file
				if files[i].Name != name || files[i].Seal == 0 {
					t.Fatalf("log file %d is %v, want %s, sealed", i, files[i], name)
				}
				good := testingutil.MustReadFile(t, filepath.Join(sampleLog, name))
				onDisk := filepath.Join(logDir, name)

				// The database as it was before the file, and after it.
				var prior []io.Reader
				for _, f := range files[:i] {
					prior = append(prior, bytes.NewReader(testingutil.MustReadFile(t, filepath.Join(sampleLog, f.Name))))
				}
				before := []byte{}
				if i > 0 {
					path := filepath.Join(t.TempDir(), "before.db")
					if _, err := ltx.Restore(ctx, path, prior...); err != nil {
						t.Fatal(err)
					}
					before = testingutil.MustReadFile(t, path)
				}
				db := filepath.Join(t.TempDir(), "db")
				if err := os.WriteFile(db, before, 0o644); err != nil {
					t.Fatal(err)
				}
				beforeTable, err := ltx.ReadChecksumTable(db)
				if err != nil {
					t.Fatal(err)
				}
				apply := func(b []byte) ([]byte, error) {
					mem := &memFile{b: bytes.Clone(before)}
					if _, err := ltx.Apply(ctx, mem, beforeTable.Clone(), files[i].PreApplyPos(), bytes.NewReader(b)); err != nil {
						return nil, err
					}
					return mem.b, nil
				}
				after, err := apply(good)
				if err != nil {
					t.Fatal(err)
				}

				var n, harmless int
				damaged(good, func(what string, bad []byte) {
					n++
					// Damage the file in place, as bit rot would: same inode,
					// so the seal stays.
					if err := os.WriteFile(onDisk, bad, 0o644); err != nil {
						t.Fatal(err)
					}
					if _, err := ltx.VerifyFile(onDisk); !errors.Is(err, ltx.ErrCorrupt) {
						t.Fatalf("%s to %d bytes: VerifyFile err = %v, want ErrCorrupt", what, len(bad), err)
					}

					c, err := l.Cursor(files[i].PreApplyPos())
					if err != nil {
						t.Fatal(err)
					}
					r := mustNext(t, c)
					got, err := io.ReadAll(r)
					_ = r.Close()
					if !errors.Is(err, ltx.ErrCorrupt) {
						t.Fatalf("%s to %d bytes: cursor read %d bytes, err = %v, want ErrCorrupt", what, len(got), len(bad), err)
					}

					if result, err := apply(bad); err == nil {
						if !bytes.Equal(result, after) {
							t.Fatalf("%s to %d bytes: Apply accepted the file and wrote a different database", what, len(bad))
						}
						harmless++
					}
				})
				if err := os.WriteFile(onDisk, good, 0o644); err != nil {
					t.Fatal(err)
				}
				t.Logf("%d damaged versions of %d bytes rejected by VerifyFile and the cursor; Apply rejected %d, the other %d decode to the same pages",
					n, len(good), n-harmless, harmless)
			})
		}
	})
	if got := mustRestoreSHA(t, l); got != testingutil.FileSHA256(t, "testdata/sample.db") {
		t.Fatal("sample log no longer restores")
	}
}

// memFile is a database file in memory.
type memFile struct{ b []byte }

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(m.b) {
		m.b = append(m.b, make([]byte, end-len(m.b))...)
	}
	return copy(m.b[off:], p), nil
}

func (m *memFile) Truncate(size int64) error {
	if int(size) <= len(m.b) {
		m.b = m.b[:size]
	} else {
		m.b = append(m.b, make([]byte, int(size)-len(m.b))...)
	}
	return nil
}

// TestApply_GrowthMustCarryPages checks that a file that grows the database
// must carry every page it grows it by, and that one that does not is
// refused before the database file grows: a page-size change carrying one
// page, a growth with a hole, and a commit size of a billion pages.
func TestApply_GrowthMustCarryPages(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := newFakeDB(t, dir, 21)
	d.run(3, t0, nil)
	pos, pages := d.log.Pos(), uint32(len(d.data))/d.pageSize
	page := func(pgno uint32, size uint32) codec.PageSpec {
		data := make([]byte, size)
		data[0] = byte(pgno)
		return codec.PageSpec{Header: codec.PageHeader{Pgno: pgno}, Data: data}
	}
	for name, spec := range map[string]codec.FileSpec{
		"page size change": {
			Header: codec.Header{Version: codec.Version, PageSize: 512, Commit: 24, MinTXID: 4, MaxTXID: 4, Timestamp: 1, PreApplyChecksum: pos.PostApplyChecksum},
			Pages:  []codec.PageSpec{page(1, 512)},
		},
		"hole": {
			Header: codec.Header{Version: codec.Version, PageSize: d.pageSize, Commit: pages + 2, MinTXID: 4, MaxTXID: 4, Timestamp: 1, PreApplyChecksum: pos.PostApplyChecksum},
			Pages:  []codec.PageSpec{page(2, d.pageSize), page(pages+2, d.pageSize)},
		},
		"huge commit": {
			Header: codec.Header{Version: codec.Version, PageSize: d.pageSize, Commit: 1 << 30, MinTXID: 4, MaxTXID: 4, Timestamp: 1, PreApplyChecksum: pos.PostApplyChecksum},
			Pages:  []codec.PageSpec{page(2, d.pageSize), page(1<<30-1, d.pageSize)},
		},
	} {
		t.Run(name, func(t *testing.T) {
			spec.Trailer.PostApplyChecksum = ltx.ChecksumFlag | 0x1234 // whatever it claims
			var buf bytes.Buffer
			if _, err := spec.WriteTo(&buf); err != nil {
				t.Fatal(err)
			}
			f, table := openImage(t, d.data)
			_, err := ltx.Apply(ctx, f, table, pos, &buf)
			if !errors.Is(err, ltx.ErrCorrupt) || !strings.Contains(err.Error(), "does not carry") {
				t.Fatalf("err = %v, want ErrCorrupt about a page it does not carry", err)
			}
			if fi, _ := f.Stat(); fi.Size() > int64(len(d.data)) {
				t.Fatalf("refused file grew the database to %d bytes", fi.Size())
			}
		})
	}
}

package ltx_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// fakeDB is a database file with a SQLite header on page 1 and random
// content elsewhere, changed a few pages at a time. Tests use it where they
// need exact control of pages and commit times; SQLite-made databases are
// used where realism matters.
type fakeDB struct {
	tb       testing.TB
	path     string
	pageSize uint32
	data     []byte
	rng      *rand.Rand
	log      *ltx.Log
}

// newFakeDB opens the log, in dir/ltx, of a database in dir that does not
// exist yet; its first three pages are written and recorded (as a snapshot)
// with the first commit.
func newFakeDB(tb testing.TB, dir string, seed uint64) *fakeDB {
	return newFakeDBAt(tb, dir, filepath.Join(dir, "ltx"), seed)
}

// newFakeDBAt is newFakeDB with the log in logDir.
func newFakeDBAt(tb testing.TB, dir, logDir string, seed uint64) *fakeDB {
	d := newFakeData(tb, dir, seed)
	d.log = testingutil.MustOpenLog(tb, "db", logDir, d.path)
	return d
}

// newFakeData returns a fakeDB of a database in dir, its first three
// pages in memory only, without a log.
func newFakeData(tb testing.TB, dir string, seed uint64) *fakeDB {
	d := &fakeDB{tb: tb, path: filepath.Join(dir, "db"), pageSize: 4096, rng: rand.New(rand.NewPCG(seed, 1))}
	d.data = make([]byte, 3*d.pageSize)
	for i := range d.data {
		d.data[i] = byte(d.rng.Uint32())
	}
	copy(d.data, "SQLite format 3\x00")
	binary.BigEndian.PutUint16(d.data[16:], uint16(d.pageSize))
	return d
}

func (d *fakeDB) write() {
	if err := os.WriteFile(d.path, d.data, 0o644); err != nil {
		d.tb.Fatal(err)
	}
}

// step changes a few random pages, sometimes growing or shrinking the
// database, and returns the pages written.
func (d *fakeDB) step() []uint32 {
	ps := int(d.pageSize)
	var pgnos []uint32
	switch n := d.rng.IntN(10); {
	case n == 0 && len(d.data) > 4*ps:
		d.data = d.data[:len(d.data)-ps*(1+d.rng.IntN(2))]
	case n < 3:
		grow := make([]byte, ps*(1+d.rng.IntN(3)))
		for i := range grow {
			grow[i] = byte(d.rng.Uint32())
		}
		d.data = append(d.data, grow...)
	}
	pages := len(d.data) / ps
	for i := d.rng.IntN(4) + 1; i > 0; i-- {
		pgno := 2 + d.rng.IntN(pages-1)
		off := (pgno-1)*ps + d.rng.IntN(ps-8)
		binary.BigEndian.PutUint64(d.data[off:], d.rng.Uint64())
		pgnos = append(pgnos, uint32(pgno))
	}
	d.write()
	return pgnos
}

// commit records the pages written since the last commit, at ts.
func (d *fakeDB) commit(pgnos []uint32, ts time.Time) *ltx.FileInfo {
	d.tb.Helper()
	info, err := d.log.Commit(context.Background(), ltx.Tx{
		DB:        bytes.NewReader(d.data),
		PageSize:  d.pageSize,
		Commit:    uint32(len(d.data)) / d.pageSize,
		Pgnos:     pgnos,
		Timestamp: ts,
	})
	if err != nil {
		d.tb.Fatal(err)
	}
	return info
}

// history records the database image after each transaction.
type history map[ltx.Pos][]byte

// run makes n transactions, one minute apart from start, recording each
// resulting image in h when h is not nil.
func (d *fakeDB) run(n int, start time.Time, h history) {
	d.tb.Helper()
	for i := 0; i < n; i++ {
		info := d.commit(d.step(), start.Add(time.Duration(i)*time.Minute))
		if h != nil {
			h[info.Pos()] = bytes.Clone(d.data)
		}
	}
}

// dirState returns the SHA-256 of every file under dir by relative path.
func dirState(tb testing.TB, dir string) map[string]string {
	tb.Helper()
	state := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		sum := sha256.Sum256(b)
		state[rel] = hex.EncodeToString(sum[:])
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return state
}

// assertDirState fails unless dir holds exactly the files of want.
func assertDirState(tb testing.TB, dir string, want map[string]string) {
	tb.Helper()
	got := dirState(tb, dir)
	for name, sum := range want {
		if got[name] != sum {
			tb.Errorf("%s: changed or gone", name)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			tb.Errorf("%s: unexpected new file", name)
		}
	}
}

// copyDir copies the regular files of src into a new directory.
func copyDir(tb testing.TB, src string) string {
	tb.Helper()
	dst := tb.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		tb.Fatal(err)
	}
	for _, e := range entries {
		if e.Type().IsRegular() {
			if err := os.WriteFile(filepath.Join(dst, e.Name()), testingutil.MustReadFile(tb, filepath.Join(src, e.Name())), 0o644); err != nil {
				tb.Fatal(err)
			}
		}
	}
	return dst
}

// openImage writes a database image to a new file and returns it open for
// writing, with its checksum table.
func openImage(tb testing.TB, image []byte) (*os.File, *ltx.ChecksumTable) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "db")
	if err := os.WriteFile(path, image, 0o644); err != nil {
		tb.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = f.Close() })
	table, err := ltx.ReadChecksumTable(path)
	if err != nil {
		tb.Fatal(err)
	}
	return f, table
}

// waitTimeout bounds every wait of these tests, so that one that is not
// met fails its test instead of hanging it. It is a deadline against
// hangs, never a measure of speed.
const waitTimeout = 10 * time.Second

// mustNext returns the cursor's next file, which the log already holds: a
// Next that waits for a commit instead fails the test after waitTimeout.
func mustNext(tb testing.TB, c *ltx.Cursor) *ltx.Reader {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	r, err := c.Next(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		tb.Fatalf("cursor at %s waited %v for a file the log already holds", c.Pos(), waitTimeout)
	} else if err != nil {
		tb.Fatalf("next file after %s: %v", c.Pos(), err)
	}
	return r
}

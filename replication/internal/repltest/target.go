package repltest

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/meridian-db/meridian/ltx"
	"github.com/meridian-db/meridian/replication"
)

// Target is a replication.Target that applies files to plain database
// files and records what it applied.
type Target struct {
	tb  testing.TB
	dir string

	mu        sync.Mutex
	dbs       map[string]*targetDB
	snapshots []replication.SnapshotReason // reasons of the snapshots applied
	first     map[string]ltx.TXID          // by database: the TXID of its first snapshot
	applied   int
	appliedOf map[string]int // by database
	calls     int            // Apply calls, whether they applied or not
	offered   int            // files passed to Apply, whether they applied or not
	largest   int64          // size of the largest file applied
	groups    []int          // files passed to each Apply call
	fail      error          // returned by the next Apply
	// before, if set, runs at the start of every Apply call.
	before func(db string, files []*replication.File)
}

var _ replication.Target = (*Target)(nil)

type targetDB struct {
	path  string
	table *ltx.ChecksumTable
	pos   ltx.Pos
}

// NewTarget returns a Target without databases, in a temporary directory
// of tb.
func NewTarget(tb testing.TB) *Target {
	return &Target{tb: tb, dir: tb.TempDir(), dbs: make(map[string]*targetDB), first: make(map[string]ltx.TXID), appliedOf: make(map[string]int)}
}

func (t *Target) Positions() map[string]ltx.Pos {
	t.mu.Lock()
	defer t.mu.Unlock()
	m := make(map[string]ltx.Pos)
	for name, d := range t.dbs {
		m[name] = d.pos
	}
	return m
}

func (t *Target) Apply(ctx context.Context, db string, files []*replication.File) (ltx.Pos, error) {
	t.mu.Lock()
	before := t.before
	t.mu.Unlock()
	if before != nil {
		before(db, files)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.calls++
	t.offered += len(files)
	t.groups = append(t.groups, len(files))
	if err := t.fail; err != nil {
		t.fail = nil
		return ltx.Pos{}, err
	}
	for i, f := range files {
		if f.DB != db || (i > 0 && f.Info.Header.IsSnapshot()) {
			t.tb.Errorf("Apply to %s got file %s of %s, a snapshot: %v, at %d in its group", db, f.Info.Name, f.DB, f.Info.Header.IsSnapshot(), i)
		}
	}
	// The table and position change only if the whole group applies; a
	// file refused for its position writes nothing.
	d := t.dbs[db]
	if d != nil {
		d = &targetDB{path: d.path, table: d.table.Clone(), pos: d.pos}
	}
	var snapshots []replication.SnapshotReason
	for _, f := range files {
		if d == nil || f.Info.Header.IsSnapshot() {
			d = &targetDB{path: filepath.Join(t.dir, db), table: ltx.NewChecksumTable(f.Info.Header.PageSize)}
		}
		if f.Info.Header.IsSnapshot() {
			snapshots = append(snapshots, f.SnapshotReason)
		}
		if err := applyTo(ctx, d, f); err != nil {
			return ltx.Pos{}, err
		}
	}
	if len(snapshots) > 0 {
		t.snapshots = append(t.snapshots, snapshots...)
		if _, ok := t.first[db]; !ok {
			t.first[db] = files[0].Info.Header.MaxTXID
		}
	}
	t.dbs[db] = d
	t.applied += len(files)
	t.appliedOf[db] += len(files)
	for _, f := range files {
		t.largest = max(t.largest, f.Info.Size)
	}
	return d.pos, nil
}

// applyTo applies f to the database file of d, which holds its checksums
// and position.
func applyTo(ctx context.Context, d *targetDB, f *replication.File) error {
	db, err := os.OpenFile(d.path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer db.Close()
	var r io.Reader = bytes.NewReader(f.Data)
	if f.Data == nil {
		fh, err := os.Open(f.Path)
		if err != nil {
			return err
		}
		defer fh.Close()
		r = fh
	}
	pos, err := ltx.Apply(ctx, db, d.table, d.pos, r)
	if err != nil {
		return err
	}
	d.pos = pos
	return nil
}

// SetBefore makes fn run at the start of every later Apply call, before
// the call takes t's lock; nil runs nothing.
func (t *Target) SetBefore(fn func(db string, files []*replication.File)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.before = fn
}

// FailNext makes the next Apply call return err and apply nothing.
func (t *Target) FailNext(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.fail = err
}

// Path returns the file of database name.
func (t *Target) Path(name string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.dbs[name].path
}

// CountOf returns how many files of database name were applied.
func (t *Target) CountOf(name string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.appliedOf[name]
}

// Count returns how many files were applied.
func (t *Target) Count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.applied
}

// Calls returns how many times Apply was called, whether it applied or
// not.
func (t *Target) Calls() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.calls
}

// Groups returns how many files each Apply call was passed, in order.
func (t *Target) Groups() []int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.groups)
}

// Pos returns the position of database name, the zero Pos if t has none.
func (t *Target) Pos(name string) ltx.Pos {
	t.mu.Lock()
	defer t.mu.Unlock()
	if d := t.dbs[name]; d != nil {
		return d.pos
	}
	return ltx.Pos{}
}

// Counts returns how many files were applied, how many were passed to
// Apply, and the size of the largest file applied.
func (t *Target) Counts() (applied, offered int, largest int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.applied, t.offered, t.largest
}

// WantApplied is how many files t applied if it got every database of p
// as a snapshot, then each of the log's files after it once: no file
// twice, none left out.
func (t *Target) WantApplied(p *Primary) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, name := range p.DBs() {
		first, ok := t.first[name]
		if !ok {
			continue
		}
		n++
		for _, f := range p.Log(name).Files() {
			if f.Header.MinTXID > first {
				n++
			}
		}
	}
	return n
}

// SnapshotReasons returns the reasons of the snapshots applied, in order.
func (t *Target) SnapshotReasons() []replication.SnapshotReason {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.snapshots)
}

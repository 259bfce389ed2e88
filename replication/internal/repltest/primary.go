package repltest

import (
	"context"
	"database/sql"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
	"github.com/meridian-db/meridian/replication"
)

// Primary is a replication.Source over SQLite databases in rollback
// (DELETE) mode on a plain directory: each write runs through SQLite and
// is committed to the database's log with the pages it changed.
type Primary struct {
	tb  testing.TB
	dir string

	mu      sync.Mutex
	dbs     map[string]*DB
	changed chan struct{}
}

var _ replication.Source = (*Primary)(nil)

// DB is one database of a Primary.
type DB struct {
	Path string  // the database file
	SQL  *sql.DB // open on Path
	Log  *ltx.Log
	Work *testingutil.Workload // random transactions on SQL
}

// NewPrimary returns a Primary without databases, in a temporary
// directory of tb.
func NewPrimary(tb testing.TB) *Primary {
	return &Primary{tb: tb, dir: tb.TempDir(), dbs: make(map[string]*DB), changed: make(chan struct{})}
}

// Create adds database name, with its schema committed as TXID 1.
func (p *Primary) Create(name string, seed uint64) {
	p.tb.Helper()
	d := p.Register(name, seed)
	p.Write(name, func() error { return d.Work.Init() })
}

// Register adds database name with an empty log, as a database is between
// its creation and its first transaction.
func (p *Primary) Register(name string, seed uint64) *DB {
	p.tb.Helper()
	dir := filepath.Join(p.dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		p.tb.Fatal(err)
	}
	path := filepath.Join(dir, "db")
	d := &DB{Path: path, SQL: testingutil.MustOpenSQLite(p.tb, path, "delete"),
		Log: testingutil.MustOpenLog(p.tb, name, filepath.Join(dir, "ltx"), path)}
	d.Work = testingutil.NewWorkload(d.SQL, seed)
	p.mu.Lock()
	p.dbs[name] = d
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
	return d
}

// Drop deletes database name: its log closes, its files go.
func (p *Primary) Drop(name string) {
	p.tb.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.dbs[name]
	if err := errors.Join(d.Log.Close(), d.SQL.Close(), os.RemoveAll(filepath.Dir(d.Path))); err != nil {
		p.tb.Fatal(err)
	}
	delete(p.dbs, name)
	close(p.changed)
	p.changed = make(chan struct{})
}

// Write runs fn on database name and commits what it changed.
func (p *Primary) Write(name string, fn func() error) {
	p.tb.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.dbs[name]
	before, _ := os.ReadFile(d.Path)
	if err := fn(); err != nil {
		p.tb.Fatal(err)
	}
	_, err := testingutil.CommitChanged(d.Log, before, testingutil.MustReadFile(p.tb, d.Path))
	if err != nil && !errors.Is(err, context.Canceled) {
		p.tb.Fatal(err)
	}
}

// Steps runs n random transactions on database name.
func (p *Primary) Steps(name string, n int) {
	p.tb.Helper()
	d := p.DB(name)
	for range n {
		p.Write(name, func() error { _, err := d.Work.Step(); return err })
	}
}

// DB returns database name, or nil if there is none.
func (p *Primary) DB(name string) *DB {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dbs[name]
}

func (p *Primary) DBs() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	names := make([]string, 0, len(p.dbs))
	for n := range p.dbs {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (p *Primary) Log(name string) *ltx.Log {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d := p.dbs[name]; d != nil {
		return d.Log
	}
	return nil
}

func (p *Primary) Snapshot(ctx context.Context, name string, w io.Writer) (*ltx.FileInfo, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.dbs[name]
	f, err := os.Open(d.Path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return d.Log.Snapshot(ctx, w, f)
}

func (p *Primary) Changed() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.changed
}

package replication_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
)

// primary is a replication.Source over SQLite databases in rollback
// (DELETE) mode on a plain directory: each write runs through SQLite and
// is committed to the database's log with the pages it changed.
type primary struct {
	tb  testing.TB
	dir string

	mu      sync.Mutex
	dbs     map[string]*primaryDB
	changed chan struct{}
}

type primaryDB struct {
	path string
	sql  *sql.DB
	log  *ltx.Log
	work *testingutil.Workload
}

func newPrimary(tb testing.TB) *primary {
	return &primary{tb: tb, dir: tb.TempDir(), dbs: make(map[string]*primaryDB), changed: make(chan struct{})}
}

// create adds database name, with its schema committed as TXID 1.
func (p *primary) create(name string, seed uint64) {
	p.tb.Helper()
	d := p.register(name, seed)
	p.write(name, func() error { return d.work.Init() })
}

// register adds database name with an empty log, as a database is between
// its creation and its first transaction.
func (p *primary) register(name string, seed uint64) *primaryDB {
	p.tb.Helper()
	dir := filepath.Join(p.dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		p.tb.Fatal(err)
	}
	path := filepath.Join(dir, "db")
	d := &primaryDB{path: path, sql: testingutil.MustOpenSQLite(p.tb, path, "delete"),
		log: testingutil.MustOpenLog(p.tb, name, filepath.Join(dir, "ltx"), path)}
	d.work = testingutil.NewWorkload(d.sql, seed)
	p.mu.Lock()
	p.dbs[name] = d
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
	return d
}

// drop deletes database name: its log closes, its files go.
func (p *primary) drop(name string) {
	p.tb.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.dbs[name]
	if err := errors.Join(d.log.Close(), d.sql.Close(), os.RemoveAll(filepath.Dir(d.path))); err != nil {
		p.tb.Fatal(err)
	}
	delete(p.dbs, name)
	close(p.changed)
	p.changed = make(chan struct{})
}

// write runs fn on database name and commits what it changed.
func (p *primary) write(name string, fn func() error) {
	p.tb.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.dbs[name]
	before, _ := os.ReadFile(d.path)
	if err := fn(); err != nil {
		p.tb.Fatal(err)
	}
	_, err := testingutil.CommitChanged(d.log, before, testingutil.MustReadFile(p.tb, d.path))
	if err != nil && !errors.Is(err, context.Canceled) {
		p.tb.Fatal(err)
	}
}

// steps runs n random transactions on database name.
func (p *primary) steps(name string, n int) {
	p.tb.Helper()
	d := p.dbs[name]
	for range n {
		p.write(name, func() error { _, err := d.work.Step(); return err })
	}
}

func (p *primary) DBs() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	names := make([]string, 0, len(p.dbs))
	for n := range p.dbs {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (p *primary) Log(name string) *ltx.Log {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d := p.dbs[name]; d != nil {
		return d.log
	}
	return nil
}

func (p *primary) Snapshot(ctx context.Context, name string, w io.Writer) (*ltx.FileInfo, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.dbs[name]
	f, err := os.Open(d.path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return d.log.Snapshot(ctx, w, f)
}

func (p *primary) Changed() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.changed
}

// target is a replication.Target that applies files to plain database
// files and records what it applied.
type target struct {
	tb  testing.TB
	dir string

	mu        sync.Mutex
	dbs       map[string]*targetDB
	snapshots []meridianv1.SnapshotReason // reasons of the snapshots applied
	first     map[string]ltx.TXID         // by database: the TXID of its first snapshot
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

type targetDB struct {
	path  string
	table *ltx.ChecksumTable
	pos   ltx.Pos
}

func newTarget(tb testing.TB) *target {
	return &target{tb: tb, dir: tb.TempDir(), dbs: make(map[string]*targetDB), first: make(map[string]ltx.TXID), appliedOf: make(map[string]int)}
}

func (t *target) Positions() map[string]ltx.Pos {
	t.mu.Lock()
	defer t.mu.Unlock()
	m := make(map[string]ltx.Pos)
	for name, d := range t.dbs {
		m[name] = d.pos
	}
	return m
}

func (t *target) Apply(ctx context.Context, db string, files []*replication.File) (ltx.Pos, error) {
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
	var snapshots []meridianv1.SnapshotReason
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

// path returns the file of database name.
func (t *target) path(name string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.dbs[name].path
}

// countOf returns how many files of database name were applied.
func (t *target) countOf(name string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.appliedOf[name]
}

// count returns how many files were applied.
func (t *target) count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.applied
}

func (t *target) pos(name string) ltx.Pos {
	t.mu.Lock()
	defer t.mu.Unlock()
	if d := t.dbs[name]; d != nil {
		return d.pos
	}
	return ltx.Pos{}
}

// counts returns how many files were applied, how many were passed to
// Apply, and the size of the largest file applied.
func (t *target) counts() (applied, offered int, largest int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.applied, t.offered, t.largest
}

// wantApplied is how many files t applied if it got every database of p
// as a snapshot, then each of the log's files after it once: no file
// twice, none left out.
func (t *target) wantApplied(p *primary) int {
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

// snapshotReasons returns the reasons of the snapshots applied, in order.
func (t *target) snapshotReasons() []meridianv1.SnapshotReason {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.snapshots)
}

// waitSynced waits until t has every database of p at p's position, then
// checks the files are byte-identical and sound.
func waitSynced(tb testing.TB, p *primary, t *target) {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, name := range p.DBs() {
		want := p.Log(name).Pos()
		for t.pos(name) != want {
			if time.Now().After(deadline) {
				tb.Fatalf("replica's %s at %s, primary's at %s after 30s", name, t.pos(name), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
		got := testingutil.MustReadFile(tb, t.path(name))
		if !bytes.Equal(got, testingutil.MustReadFile(tb, p.dbs[name].path)) {
			tb.Fatalf("%s: replica's database differs from the primary's at %s", name, want)
		}
		db, err := sql.Open("sqlite3", "file:"+t.path(name)+"?mode=ro")
		if err != nil {
			tb.Fatal(err)
		}
		var ok string
		if err := db.QueryRow("PRAGMA integrity_check").Scan(&ok); err != nil || ok != "ok" {
			tb.Fatalf("%s: integrity_check = %q, %v", name, ok, err)
		}
		_ = db.Close()
	}
}

// pipe connects a Streamer and a Client in memory.
type pipe struct {
	toPrimary chan *meridianv1.StreamRequest
	toReplica chan *meridianv1.StreamResponse
	done      chan struct{}
	once      sync.Once
}

func newPipe() *pipe {
	return &pipe{toPrimary: make(chan *meridianv1.StreamRequest), toReplica: make(chan *meridianv1.StreamResponse), done: make(chan struct{})}
}

func (p *pipe) close() { p.once.Do(func() { close(p.done) }) }

// primaryEnd and replicaEnd are the two ends of a pipe. Like a gRPC
// server stream, the primary's end fails once the context of its call is
// done.
type primaryEnd struct {
	*pipe
	ctx context.Context
}
type replicaEnd struct {
	*pipe
	ctx context.Context
	// served gets what Serve returned for this stream.
	served chan error
	// filter, if set, sees every frame to the replica and may change it.
	filter func(*meridianv1.StreamResponse)
}

func (e primaryEnd) Send(f *meridianv1.StreamResponse) error {
	select {
	case e.toReplica <- f:
		return nil
	case <-e.done:
		return io.EOF
	case <-e.ctx.Done():
		return e.ctx.Err()
	}
}

func (e primaryEnd) Recv() (*meridianv1.StreamRequest, error) {
	select {
	case f := <-e.toPrimary:
		return f, nil
	case <-e.done:
		return nil, io.EOF
	case <-e.ctx.Done():
		return nil, e.ctx.Err()
	}
}

func (e replicaEnd) Send(f *meridianv1.StreamRequest) error {
	select {
	case e.toPrimary <- f:
		return nil
	case <-e.done:
		return io.EOF
	case <-e.ctx.Done():
		return e.ctx.Err()
	}
}

func (e replicaEnd) Recv() (*meridianv1.StreamResponse, error) {
	select {
	case f := <-e.toReplica:
		if e.filter != nil {
			e.filter(f)
		}
		return f, nil
	case <-e.done:
		return nil, io.EOF
	case <-e.ctx.Done():
		return nil, e.ctx.Err()
	}
}

// waitTimeout bounds every wait of these tests that has no deadline of its
// own, so that one that is not met fails its test instead of hanging it. It
// is a deadline against hangs, never a measure of speed.
const waitTimeout = 30 * time.Second

// waitClosed returns once done is closed, or fails the test after
// waitTimeout saying what it waited for.
func waitClosed(tb testing.TB, done <-chan struct{}, what string) {
	tb.Helper()
	testingutil.Within(tb, waitTimeout, what, func() { <-done })
}

// waitGroup is wg.Wait with waitClosed's deadline.
func waitGroup(tb testing.TB, wg *sync.WaitGroup, what string) {
	tb.Helper()
	testingutil.Within(tb, waitTimeout, what, wg.Wait)
}

// awaitErr returns the error from errc, or fails the test after
// waitTimeout saying what it waited for.
func awaitErr(tb testing.TB, errc <-chan error, what string) error {
	tb.Helper()
	return testingutil.Recv(tb, errc, waitTimeout, what)
}

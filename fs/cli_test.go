package fs_test

import (
	"bytes"
	"database/sql"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/superfly/ltx"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
)

// cliTable is what a cliScript knows of one table it made.
type cliTable struct {
	name    string
	rows    int    // exact row count
	index   string // name of its index, "" for none
	dropped bool
}

// cliScript generates SQL scripts for the sqlite3 CLI, deterministically
// from a seed, and counts the write transactions they commit. Every
// BEGIN…COMMIT group inserts a row, so it surely changes the database;
// schema statements and VACUUM change the schema cookie; groups that end in
// ROLLBACK commit nothing. It tracks exact row counts, so the database
// stays small and the test can check that every statement ran.
type cliScript struct {
	rng     *rand.Rand
	tables  []*cliTable
	nTables int // tables ever made, for names
	nIndex  int // indexes ever made, for names
}

func newCLIScript(seed uint64) *cliScript {
	return &cliScript{rng: rand.New(rand.NewPCG(seed, seed^0x5851f42d4c957f2d))}
}

// live returns the tables that exist.
func (s *cliScript) live() []*cliTable {
	var live []*cliTable
	for _, t := range s.tables {
		if !t.dropped {
			live = append(live, t)
		}
	}
	return live
}

func (s *cliScript) table() *cliTable {
	live := s.live()
	return live[s.rng.IntN(len(live))]
}

// createTable writes a CREATE TABLE statement: one transaction.
func (s *cliScript) createTable(b *strings.Builder) {
	t := &cliTable{name: fmt.Sprintf("t%d", s.nTables)}
	s.nTables++
	s.tables = append(s.tables, t)
	fmt.Fprintf(b, "CREATE TABLE %s (id INTEGER PRIMARY KEY, k INTEGER, v TEXT, b BLOB);\n", t.name)
}

// insert writes an INSERT of n rows into t.
func (s *cliScript) insert(b *strings.Builder, t *cliTable, n int) {
	fmt.Fprintf(b, "INSERT INTO %s (k, v, b) VALUES ", t.name)
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(b, "(%d, '%s', randomblob(%d))", s.rng.IntN(1e6), strings.Repeat("x", s.rng.IntN(50)), 100+s.rng.IntN(19901))
	}
	b.WriteString(";\n")
	t.rows += n
}

// blobSize returns a random blob size from 100 to 20000 bytes: mostly
// small, one in eight big enough for a chain of overflow pages.
func (s *cliScript) blobSize() int {
	if s.rng.IntN(8) == 0 {
		return 4000 + s.rng.IntN(16001)
	}
	return 100 + s.rng.IntN(1401)
}

// deleteRows writes a DELETE of exactly min(n, rows) rows of t.
func (s *cliScript) deleteRows(b *strings.Builder, t *cliTable, n int) {
	fmt.Fprintf(b, "DELETE FROM %s WHERE id IN (SELECT id FROM %[1]s ORDER BY random() LIMIT %d);\n", t.name, n)
	t.rows -= min(n, t.rows)
}

// tx writes one transaction and returns how many it commits (0 or 1).
func (s *cliScript) tx(b *strings.Builder) int {
	switch n := s.rng.IntN(1000); {
	case n < 55:
		s.schema(b, n)
		return 1
	case n < 60:
		b.WriteString("VACUUM;\n")
		return 1
	case n < 100:
		t := s.table()
		rows := t.rows
		b.WriteString("BEGIN;\n")
		s.insert(b, t, 1+s.rng.IntN(3))
		b.WriteString("ROLLBACK;\n")
		t.rows = rows
		return 0
	case n < 250:
		s.insert(b, s.table(), 1+s.rng.IntN(3)) // autocommit
		return 1
	}
	s.group(b)
	return 1
}

// schema writes one schema change, chosen by n in [0,55).
func (s *cliScript) schema(b *strings.Builder, n int) {
	live := s.live()
	switch {
	case n < 20 && len(live) < 6:
		s.createTable(b)
	case n < 40 || len(live) == 1:
		// Create an index on a table that has none, else drop its index.
		t := s.table()
		if t.index == "" {
			t.index = fmt.Sprintf("i%d", s.nIndex)
			s.nIndex++
			fmt.Fprintf(b, "CREATE INDEX %s ON %s (k);\n", t.index, t.name)
		} else {
			fmt.Fprintf(b, "DROP INDEX %s;\n", t.index)
			t.index = ""
		}
	default:
		t := live[1+s.rng.IntN(len(live)-1)] // t0 stays
		t.dropped = true
		fmt.Fprintf(b, "DROP TABLE %s;\n", t.name)
	}
}

// group writes a BEGIN…COMMIT group: an insert, then a random mix of
// inserts, updates and deletes.
func (s *cliScript) group(b *strings.Builder) {
	if s.rng.IntN(2) == 0 {
		b.WriteString("BEGIN;\n")
	} else {
		b.WriteString("BEGIN IMMEDIATE;\n")
	}
	s.insert(b, s.table(), 1+s.rng.IntN(4))
	for i := s.rng.IntN(4); i > 0; i-- {
		t := s.table()
		switch s.rng.IntN(3) {
		case 0:
			s.insert(b, t, 1+s.rng.IntN(3))
		case 1:
			fmt.Fprintf(b, "UPDATE %s SET k = k + 1, v = v || 'y', b = randomblob(%d) WHERE id IN (SELECT id FROM %[1]s ORDER BY random() LIMIT 2);\n", t.name, s.blobSize())
		default:
			s.deleteRows(b, t, 1+s.rng.IntN(4))
		}
	}
	// Keep every table near 20 rows so the database stays small.
	for _, t := range s.live() {
		if t.rows > 25 {
			s.deleteRows(b, t, t.rows-15)
		}
	}
	b.WriteString("COMMIT;\n")
}

// spillRollback returns a script of one transaction that is rolled back
// after spilling pages out of a ten-page cache: to the database file in a
// rollback-journal mode, as uncommitted frames to the WAL in WAL mode.
func (s *cliScript) spillRollback(mode string) string {
	var b strings.Builder
	fmt.Fprintf(&b, ".bail on\nPRAGMA journal_mode=%s;\nPRAGMA synchronous=FULL;\nPRAGMA cache_size=10;\nBEGIN;\n", mode)
	t := s.table()
	rows := t.rows
	s.insert(&b, t, 20)
	fmt.Fprintf(&b, "UPDATE %s SET b = randomblob(3000);\nROLLBACK;\nSELECT 'done';\n", t.name)
	t.rows = rows
	return b.String()
}

// batch returns a script of n transactions in journal mode mode, and how
// many of them commit.
func (s *cliScript) batch(mode string, n int) (string, int) {
	var b strings.Builder
	fmt.Fprintf(&b, ".bail on\nPRAGMA journal_mode=%s;\nPRAGMA synchronous=FULL;\n", mode)
	committed := 0
	for range n {
		committed += s.tx(&b)
	}
	b.WriteString("SELECT 'done';\n")
	return b.String(), committed
}

// freeLeaves returns the free-list leaf pages of the database image img.
func freeLeaves(tb testing.TB, img []byte) map[uint32]bool {
	tb.Helper()
	pageSize := int(binary.BigEndian.Uint16(img[16:]))
	if pageSize == 1 {
		pageSize = 65536
	}
	leaves := map[uint32]bool{}
	for trunk, n := binary.BigEndian.Uint32(img[32:]), 0; trunk != 0; n++ {
		off := int(trunk-1) * pageSize
		if off+pageSize > len(img) || n > len(img)/pageSize {
			tb.Fatalf("bad free-list trunk page %d", trunk)
		}
		count := int(binary.BigEndian.Uint32(img[off+4:]))
		for i := range count {
			leaves[binary.BigEndian.Uint32(img[off+8+4*i:])] = true
		}
		trunk = binary.BigEndian.Uint32(img[off:])
	}
	return leaves
}

// cliTimeout bounds a run of the sqlite3 CLI: a script of hundreds of
// transactions takes seconds.
const cliTimeout = 2 * time.Minute

// runCLI runs the sqlite3 CLI on path with script as its input and returns
// its standard output, failing the test on any error.
func runCLI(tb testing.TB, path, script string) string {
	tb.Helper()
	cmd := testingutil.Command(tb, cliTimeout, "sqlite3", path)
	cmd.Stdin = strings.NewReader(script)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil || stderr.Len() > 0 {
		tb.Fatalf("sqlite3: %v: %s", err, stderr.String())
	}
	return stdout.String()
}

func TestCapture_CLI(t *testing.T) {
	if _, err := exec.LookPath("sqlite3"); err != nil {
		t.Fatalf("the sqlite3 CLI is needed: %v (apt-get install sqlite3)", err)
	}
	const batches, perBatch = 4, 525
	// The modes run at once: they mostly wait for fsync and FUSE round
	// trips. (t.Parallel would run only GOMAXPROCS of them at a time.)
	var wg sync.WaitGroup
	defer wg.Wait()
	for i, mode := range journalModes {
		wg.Go(func() { t.Run(mode, func(t *testing.T) { testCLI(t, mode, uint64(i+1), batches, perBatch) }) })
	}
}

// testCLI runs batches scripts of perBatch transactions in journal mode
// mode through the sqlite3 CLI, checking the log after each.
func testCLI(t *testing.T, mode string, seed uint64, batches, perBatch int) {
	start := time.Now()
	fsys := testingutil.MustMount(t)
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, mode)
	log := fsys.DB("app.db")

	s := newCLIScript(seed)
	var init strings.Builder
	s.createTable(&init)
	runCLI(t, path, init.String())

	total := 0
	for batch := range batches {
		script, want := s.batch(mode, perBatch)
		before := log.Pos().TXID
		if out := runCLI(t, path, script); out != mode+"\ndone\n" {
			t.Fatalf("batch %d: sqlite3 printed %q, want %q", batch, out, mode+"\ndone\n")
		}
		if got := log.Pos().TXID - before; got != ltx.TXID(want) {
			t.Fatalf("batch %d: the log gained %d transactions, want %d", batch, got, want)
		}
		total += want + checkSpillRollback(t, fsys, s, mode)
		after := log.Pos()
		checkLog(t, fsys, "app.db", db, mode == "wal")
		if got := log.Pos(); got != after {
			t.Fatalf("batch %d: checking moved the log from %s to %s", batch, after, got)
		}
	}
	checkCLIModel(t, db, s)
	if total < 2000 {
		t.Fatalf("%d transactions, want at least 2000", total)
	}
	t.Logf("%s: %d transactions through the sqlite3 CLI in %v, log at %s", mode, total, time.Since(start).Round(time.Millisecond), log.Pos())
}

// checkSpillRollback runs a transaction that spills pages and rolls back,
// then one that commits, and returns how many transactions they added to
// the log. The rollback commits nothing in WAL mode. In a rollback-journal
// mode it may leave new bytes on free-list leaf pages, which SQLite reuses
// without journaling them: then, and only then, the log gains the bytes
// as a transaction.
func checkSpillRollback(tb testing.TB, fsys *fs.FileSystem, s *cliScript, mode string) int {
	tb.Helper()
	path := filepath.Join(fsys.MountDir, "app.db")
	backing := filepath.Join(fsys.DataDir, "dbs", "app.db", "database")
	log := fsys.DB("app.db")
	img, before := testingutil.MustReadFile(tb, backing), log.Pos().TXID
	if out := runCLI(tb, path, s.spillRollback(mode)); out != mode+"\ndone\n" {
		tb.Fatalf("spill rollback: sqlite3 printed %q", out)
	}
	after := testingutil.MustReadFile(tb, backing)
	changed := testingutil.ChangedPages(img, after, int(binary.BigEndian.Uint16(img[16:])))
	want := 0
	if mode == "wal" && len(changed) > 0 {
		tb.Fatalf("a rolled-back transaction changed pages %v of the database file in WAL mode", changed)
	} else if len(changed) > 0 {
		want = 1
		free := freeLeaves(tb, after)
		for _, pgno := range changed {
			if !free[pgno] {
				tb.Fatalf("a rolled-back transaction changed page %d, not a free-list leaf (changed %v)", pgno, changed)
			}
		}
	}
	if got := log.Pos().TXID - before; got != ltx.TXID(want) {
		tb.Fatalf("spill rollback changed pages %v of the database file; the log gained %d transactions, want %d", changed, got, want)
	}

	// In WAL mode the next transaction overwrites the frames the rollback
	// left, unless the WAL restarts.
	var b strings.Builder
	fmt.Fprintf(&b, ".bail on\nPRAGMA journal_mode=%s;\nPRAGMA synchronous=FULL;\n", mode)
	s.insert(&b, s.table(), 3)
	before = log.Pos().TXID
	if out := runCLI(tb, path, b.String()); out != mode+"\n" {
		tb.Fatalf("insert: sqlite3 printed %q", out)
	}
	if got := log.Pos().TXID - before; got != 1 {
		tb.Fatalf("an INSERT after a rollback: the log gained %d transactions, want 1", got)
	}
	return want + 1
}

// checkCLIModel asserts that db holds the tables and row counts of s: that
// every statement of the scripts ran.
func checkCLIModel(tb testing.TB, db *sql.DB, s *cliScript) {
	tb.Helper()
	var want []string
	for _, t := range s.live() {
		want = append(want, t.name)
		var rows int
		if err := db.QueryRow(`SELECT count(*) FROM ` + t.name).Scan(&rows); err != nil {
			tb.Fatal(err)
		} else if rows != t.rows {
			tb.Fatalf("%s has %d rows, want %d", t.name, rows, t.rows)
		}
	}
	slices.Sort(want)
	var tables []string
	rows, err := db.Query(`SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name`)
	if err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = rows.Close() }()
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			tb.Fatal(err)
		}
		tables = append(tables, name)
	}
	if err := rows.Err(); err != nil {
		tb.Fatal(err)
	}
	if !slices.Equal(tables, want) {
		tb.Fatalf("tables %v, want %v", tables, want)
	}
}

package main

import (
	"cmp"
	"context"
	"database/sql"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// Rows each phase of TestCluster_Divergence commits, one per transaction.
const (
	commonRows = 50 // on both nodes
	lostRows   = 30 // on the old primary only
	newRows    = 20 // on the new primary
)

// TestCluster_Divergence makes the history of an old primary diverge from
// its successor's and checks what happens when it rejoins: iad-1 commits
// rows that reach fra-1, then more while fra-1 is down, and dies; fra-1
// becomes the primary (the static lease moved by hand) and commits rows
// of its own; iad-1 restarts as its replica. It must end equal to fra-1,
// with its unreplicated transactions kept as intact LTX files under
// data_dir/lost/<db>/ that rebuild its old database, rows and all, and a
// log line saying where they are.
func TestCluster_Divergence(t *testing.T) {
	t.Parallel()
	c, old, next, dbs, common, oldPos := startDiverging(t)
	old.Kill(t)

	c.SetPrimary(next.Name)
	next.Start(t)
	openOnPrimary(t, c, dbs)
	for _, d := range dbs {
		insertRows(t, d.db, next.Name, newRows)
	}
	old.Start(t)
	checkDiverged(t, c, old, next, dbs, common, oldPos)
}

// startPair starts a cluster of iad-1, the primary, and fra-1, and opens a
// WAL and a DELETE database on iad-1's mount, with a table rows.
func startPair(t *testing.T) (c *testingutil.Cluster, primary, replica *testingutil.ClusterNode, dbs []*clusterDB) {
	t.Helper()
	c = testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fra)
	c.Start(t)
	dbs = []*clusterDB{{name: "wal.db", mode: "wal"}, {name: "delete.db", mode: "delete"}}
	openOnPrimary(t, c, dbs)
	for _, d := range dbs {
		if _, err := d.db.Exec(`CREATE TABLE rows (node TEXT, i INTEGER, pad BLOB)`); err != nil {
			t.Fatal(err)
		}
	}
	return c, c.Node(iad.Name), c.Node(fra.Name), dbs
}

// startDiverging starts a cluster of iad-1, the primary, and fra-1, and
// has iad-1 commit commonRows rows that reach fra-1, in a WAL and a DELETE
// database, and then lostRows more while fra-1 is down. It returns the
// cluster, the two nodes, the databases (closed), the positions both
// share and iad-1's last TXIDs.
func startDiverging(t *testing.T) (c *testingutil.Cluster, old, next *testingutil.ClusterNode, dbs []*clusterDB, common map[string]ltx.Pos, oldPos map[string]ltx.TXID) {
	t.Helper()
	c, old, next, dbs = startPair(t)
	for _, d := range dbs {
		insertRows(t, d.db, old.Name, commonRows)
	}
	common = c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	if err := next.Stop(); err != nil {
		t.Fatal(err)
	}
	oldPos = map[string]ltx.TXID{}
	for _, d := range dbs {
		insertRows(t, d.db, old.Name, lostRows)
		p, _ := old.Pos(t, d.name)
		oldPos[d.name] = p.TXID
		_ = d.db.Close()
	}
	return c, old, next, dbs, common, oldPos
}

// checkDiverged checks the end of a divergence: old, the primary before
// next, has rejoined as next's replica; both hold commonRows rows of old
// (the common position is common) and newRows of next, and old kept its
// transactions up to oldPos, which next never had, under data_dir/lost/,
// whole, and said so.
func checkDiverged(t *testing.T, c *testingutil.Cluster, old, next *testingutil.ClusterNode, dbs []*clusterDB, common map[string]ltx.Pos, oldPos map[string]ltx.TXID) {
	t.Helper()
	checkpointAll(t, dbs)
	pos := c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	checkReplicas(t, c, dbs, pos)

	for _, d := range dbs {
		r := openOnReplica(t, old, d.name)
		if got := countRows(t, r, old.Name); got != commonRows {
			t.Fatalf("%s on %s after rejoining: %d rows of %s, want the %d both had", d.name, old.Name, got, old.Name, commonRows)
		}
		if got := countRows(t, r, next.Name); got != newRows {
			t.Fatalf("%s on %s after rejoining: %d rows of %s, want %d", d.name, old.Name, got, next.Name, newRows)
		}
		// Its unreplicated transactions are kept, whole.
		dir := filepath.Join(old.DataDir, "lost", d.name)
		sets, err := os.ReadDir(dir)
		if err != nil || len(sets) != 1 {
			t.Fatalf("%s: %v (%v), want one set of lost transactions", dir, sets, err)
		}
		set := filepath.Join(dir, sets[0].Name())
		files := lostFiles(t, set)
		first, last := files[0], files[len(files)-1]
		if first.Header.MinTXID != 1 || last.Header.MaxTXID != oldPos[d.name] {
			t.Fatalf("%s: lost files from txid %v to %v, want 1 to %v, the old primary's last", set, first.Header.MinTXID, last.Header.MaxTXID, oldPos[d.name])
		}
		if common[d.name].TXID >= oldPos[d.name] {
			t.Fatalf("%s: the old primary ended at %v, not past the common position %v", d.name, oldPos[d.name], common[d.name])
		}
		rebuilt := rebuild(t, set, files)
		if got := countRows(t, rebuilt, old.Name); got != commonRows+lostRows {
			t.Fatalf("%s rebuilt from %s: %d rows of %s, want %d", d.name, set, got, old.Name, commonRows+lostRows)
		}
		if got := countRows(t, rebuilt, next.Name); got != 0 {
			t.Fatalf("%s rebuilt from %s: %d rows of %s, want none", d.name, set, got, next.Name)
		}
		if l := logLine(old.Log(), "kept the transactions a snapshot replaces", "db="+d.name); l == "" {
			t.Fatalf("%s did not log where the lost transactions of %s went", old.Name, d.name)
		} else {
			t.Logf("%s", l)
		}
	}
}

// insertRows commits n rows of node to db, one per transaction.
func insertRows(t *testing.T, db *sql.DB, node string, n int) {
	t.Helper()
	for i := range n {
		if _, err := db.Exec(`INSERT INTO rows VALUES (?, ?, randomblob(300))`, node, i); err != nil {
			t.Fatal(err)
		}
	}
}

// countRows counts the rows of node in db.
func countRows(t *testing.T, db *sql.DB, node string) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT count(*) FROM rows WHERE node = ?`, node).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// lostFiles verifies the LTX files in dir and returns them in order,
// failing the test unless each continues from the one before.
func lostFiles(t *testing.T, dir string) []*ltx.FileInfo {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []*ltx.FileInfo
	for _, e := range entries {
		info, err := ltx.VerifyFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatalf("lost file %s: %v", e.Name(), err)
		}
		files = append(files, info)
	}
	slices.SortFunc(files, func(a, b *ltx.FileInfo) int { return cmp.Compare(a.Header.MinTXID, b.Header.MinTXID) })
	for i := 1; i < len(files); i++ {
		if files[i].Header.MinTXID != files[i-1].Header.MaxTXID+1 {
			t.Fatalf("lost files in %s: %s after %s, not contiguous", dir, files[i].Name, files[i-1].Name)
		}
	}
	if len(files) == 0 {
		t.Fatalf("no lost files in %s", dir)
	}
	return files
}

// rebuild restores a database from the LTX files in dir and opens it.
func rebuild(t *testing.T, dir string, files []*ltx.FileInfo) *sql.DB {
	t.Helper()
	var readers []io.Reader
	for _, f := range files {
		r, err := os.Open(filepath.Join(dir, f.Name))
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		readers = append(readers, r)
	}
	dst := filepath.Join(t.TempDir(), "rebuilt.db")
	if _, err := ltx.Restore(context.Background(), dst, readers...); err != nil {
		t.Fatalf("restore from %s: %v", dir, err)
	}
	db, err := sql.Open("sqlite3", "file:"+dst+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	var ok string
	if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
		t.Fatalf("rebuilt %s: integrity_check %q, %v", dir, ok, err)
	}
	return db
}

package main

import (
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
)

// syncTrials is how many times TestCluster_SyncKill kills the primary.
const syncTrials = 20

// TestCluster_SyncKill runs the primary with sync durability (one replica
// must acknowledge) and, syncTrials times, commits a row through its mount
// and kills it with SIGKILL the moment COMMIT returns, alternating a
// WAL-mode and a DELETE-mode database. Every time, the row must already be
// on a replica, read through the replica's mount with no waiting; then the
// primary restarts and the next trial goes on.
func TestCluster_SyncKill(t *testing.T) {
	t.Parallel()
	primarySpec := iad
	// A generous timeout: the first commit after a restart waits for
	// a replica to reconnect, with its backoff.
	primarySpec.Replication = []string{"durability: sync", "sync_acks: 1", "sync_timeout: 60s"}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, primarySpec, fra, syd)
	c.Start(t)
	primary := c.Node(iad.Name)
	dbs := []*clusterDB{{name: "wal.db", mode: "wal"}, {name: "delete.db", mode: "delete"}}
	for _, d := range dbs {
		db := testingutil.MustOpenSQLite(t, filepath.Join(primary.MountDir, d.name), d.mode)
		if _, err := db.Exec(`CREATE TABLE acked (trial INTEGER PRIMARY KEY, token TEXT)`); err != nil {
			t.Fatal(err)
		}
		_ = db.Close()
	}
	found := map[string]int{}
	for trial := range syncTrials {
		d := dbs[trial%len(dbs)]
		token := randomToken(t)
		db := testingutil.MustOpenSQLite(t, filepath.Join(primary.MountDir, d.name), d.mode)
		start := time.Now()
		if _, err := db.Exec(`INSERT INTO acked VALUES (?, ?)`, trial, token); err != nil {
			t.Fatalf("trial %d (%s): commit: %v", trial, d.name, err)
		}
		committed := time.Since(start)
		primary.Kill(t)
		_ = db.Close()
		var on []string
		for _, n := range c.Nodes {
			if n.Name != c.Primary && hasToken(t, n, d.name, trial, token) {
				on = append(on, n.Name)
				found[n.Name]++
			}
		}
		if len(on) == 0 {
			var where []string
			for _, n := range c.Nodes {
				if n.Name != c.Primary {
					pos, _ := n.Pos(t, d.name)
					where = append(where, fmt.Sprintf("%s at %v", n.Name, pos))
				}
			}
			primary.Start(t)
			pos, _ := primary.Pos(t, d.name)
			t.Fatalf("trial %d (%s): COMMIT returned after %v, the primary was killed, and no replica has the row: %s; the primary restarted at %v, with the row: %v",
				trial, d.name, committed, strings.Join(where, ", "), pos, hasToken(t, primary, d.name, trial, token))
		}
		t.Logf("trial %d (%s): COMMIT returned after %v; the row was on %v when the primary died", trial, d.name, committed.Round(time.Microsecond), on)
		primary.Start(t)
	}
	t.Logf("%d trials: rows found on %v", syncTrials, found)
}

// randomToken returns 16 random bytes in hex, a value no other trial
// writes.
func randomToken(t *testing.T) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// hasToken reports whether table acked of db, read through n's mount,
// holds token for trial.
func hasToken(t *testing.T, n *testingutil.ClusterNode, db string, trial int, token string) bool {
	t.Helper()
	path := filepath.Join(n.MountDir, db)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return false // not replicated there yet
	}
	r, err := sql.Open("sqlite3", "file:"+path+"?mode=ro&_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var got string
	switch err := r.QueryRow(`SELECT token FROM acked WHERE trial = ?`, trial).Scan(&got); {
	case err == sql.ErrNoRows:
		return false
	case err != nil:
		t.Fatalf("%s: read %s: %v", n.Name, db, err)
	case got != token:
		t.Fatalf("%s: %s has token %s for trial %d, want %s", n.Name, db, got, trial, token)
	}
	return true
}

// TestCluster_SyncTimeout runs a sync primary whose only replica is down:
// a DELETE-mode COMMIT fails after replication.sync_timeout with a disk
// I/O error and a log line saying why, the transaction stays committed on
// the primary, and once the replica starts it gets the transaction and
// commits return again.
func TestCluster_SyncTimeout(t *testing.T) {
	t.Parallel()
	primarySpec := iad
	primarySpec.Replication = []string{"durability: sync", "sync_timeout: 300ms", "sync_on_timeout: fail"}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, primarySpec, fra)
	primary, replica := c.Node(iad.Name), c.Node(fra.Name)
	primary.Start(t)
	db := testingutil.MustOpenSQLite(t, filepath.Join(primary.MountDir, "d.db"), "delete")
	start := time.Now()
	_, err := db.Exec(`CREATE TABLE acked (trial INTEGER PRIMARY KEY, token TEXT)`)
	if err == nil || !strings.Contains(err.Error(), "disk I/O error") {
		t.Fatalf("commit with the only replica down: %v, want a disk I/O error", err)
	}
	t.Logf("commit failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
	if l := logLine(primary.Log(), "sync commit failed", "d.db"); l == "" {
		t.Fatalf("primary did not log the failed sync commit:\n%s", primary.LogTail(4<<10))
	}
	// Committed here all the same, as the log line says.
	if _, err := db.Exec(`INSERT INTO acked VALUES (1, 'x')`); err == nil || !strings.Contains(err.Error(), "disk I/O error") {
		t.Fatalf("insert into the table of the failed commit: %v, want it to exist and the commit to fail", err)
	}
	replica.Start(t)
	if _, err := db.Exec(`INSERT INTO acked VALUES (2, 'y')`); err != nil {
		t.Fatalf("commit with the replica back: %v", err)
	}
	if !hasToken(t, replica, "d.db", 1, "x") || !hasToken(t, replica, "d.db", 2, "y") {
		t.Fatal("the replica lacks a row committed on the primary")
	}
}

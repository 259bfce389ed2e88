package main

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// joinMB is the size of the database TestCluster_Join sends to a node
// joining from scratch.
const joinMB = 50

// TestCluster_Join starts a replica with no database while the primary
// holds a 50 MB one and a small one, and checks that it receives both as
// snapshots (no position) and ends byte-identical. Then it kills the
// primary with SIGKILL, restarts it, commits more, and checks that both
// replicas resume their streams rather than take a snapshot again.
func TestCluster_Join(t *testing.T) {
	t.Parallel()
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fra, syd)
	primary, joiner := c.Node(iad.Name), c.Node(syd.Name)
	primary.Start(t)
	c.Node(fra.Name).Start(t)
	dbs := []*clusterDB{{name: "big.db", mode: "wal"}, {name: "small.db", mode: "delete"}}
	openOnPrimary(t, c, dbs)
	fillMB(t, dbs[0].db, joinMB)
	if _, err := dbs[1].db.Exec(`CREATE TABLE rows (node TEXT, i INTEGER, pad BLOB)`); err != nil {
		t.Fatal(err)
	}
	insertRows(t, dbs[1].db, primary.Name, 20)
	c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)

	// Not checkpointed: the snapshot reads the last transactions of
	// big.db from the WAL.
	start := time.Now()
	joiner.Start(t)
	c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	joined := time.Since(start)
	checkpointAll(t, dbs)
	pos := c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	fi, err := os.Stat(joiner.BackingFile("big.db"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() < joinMB<<20 {
		t.Fatalf("big.db on %s: %d bytes, want at least %d MB", joiner.Name, fi.Size(), joinMB)
	}
	t.Logf("%s joined with %.1f MB in %v", joiner.Name, float64(fi.Size())/1e6, joined.Round(time.Millisecond))
	checkReplicas(t, c, dbs, pos)
	for _, d := range dbs {
		if l := logLine(joiner.Log(), "applying a snapshot", "db="+d.name, "SNAPSHOT_REASON_NO_POSITION"); l == "" {
			t.Fatalf("%s did not log a snapshot of %s for lack of a position", joiner.Name, d.name)
		}
	}

	// The primary dies and comes back: the replicas resume from where
	// they are.
	for _, d := range dbs {
		_ = d.db.Close()
	}
	snapshots := map[string]int{}
	for _, n := range c.Nodes {
		snapshots[n.Name] = strings.Count(n.Log(), "applying a snapshot")
	}
	primary.Kill(t)
	primary.Start(t)
	openOnPrimary(t, c, dbs)
	insertRows(t, dbs[1].db, primary.Name, 20)
	if _, err := dbs[0].db.Exec(`DELETE FROM b WHERE rowid % 7 = 0`); err != nil {
		t.Fatal(err)
	}
	checkpointAll(t, dbs)
	pos = c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	checkReplicas(t, c, dbs, pos)
	for _, n := range c.Nodes {
		if got := strings.Count(n.Log(), "applying a snapshot"); got != snapshots[n.Name] {
			t.Fatalf("%s applied %d snapshots after the primary restarted, want its stream resumed", n.Name, got-snapshots[n.Name])
		}
	}
}

// joinWritingMB is the size of the WAL-mode database TestCluster_JoinWhileWriting
// sends to a joining node while the app writes it; a DELETE-mode one of a
// fifth of it goes along.
const joinWritingMB = 100

// TestCluster_JoinWhileWriting starts a replica with no database while the
// app on the primary updates random rows of a 100 MB WAL database and a
// 20 MB DELETE one as fast as it can. The replica receives both as
// snapshots and ends byte-identical to the primary; the primary never
// takes the database for changed outside regiond (a snapshot that read a
// half-written transaction did), and the app's commits go on during the
// join. The commit latencies before and during the join are logged: the
// snapshot holds writers off only while it reads a batch of pages.
func TestCluster_JoinWhileWriting(t *testing.T) {
	t.Parallel()
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, syd)
	primary, joiner := c.Node(iad.Name), c.Node(syd.Name)
	primary.Start(t)
	dbs := []*clusterDB{{name: "big.db", mode: "wal"}, {name: "mid.db", mode: "delete"}}
	openOnPrimary(t, c, dbs)
	fillMB(t, dbs[0].db, joinWritingMB)
	fillMB(t, dbs[1].db, joinWritingMB/5)

	var (
		mu      sync.Mutex
		commits = map[string][]commitSpan{}
	)
	ctx, stop := context.WithCancel(context.Background())
	var g errgroup.Group
	for i, d := range dbs {
		rows := joinWritingMB * 16 / (1 + 4*i)
		g.Go(func() error {
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			for ctx.Err() == nil {
				began := time.Now()
				if _, err := d.db.Exec(`UPDATE b SET v = randomblob(65536) WHERE rowid = ?`, 1+rng.IntN(rows)); err != nil {
					return fmt.Errorf("%s: %w", d.name, err)
				}
				mu.Lock()
				commits[d.name] = append(commits[d.name], commitSpan{began, time.Now()})
				mu.Unlock()
			}
			return nil
		})
	}
	stopWriters := stopper(t, stop, &g)
	time.Sleep(500 * time.Millisecond) // commits before the join, to compare with

	start := time.Now()
	want := map[string]ltx.Pos{}
	for _, d := range dbs {
		want[d.name], _ = primary.Pos(t, d.name)
	}
	joiner.Start(t)
	for _, d := range dbs {
		joiner.WaitPos(t, d.name, catchUpTimeout, fmt.Sprintf("txid %d or more", want[d.name].TXID),
			func(p ltx.Pos) bool { return p.TXID >= want[d.name].TXID })
	}
	joined := time.Now()
	if err := stopWriters(); err != nil {
		t.Fatal(err)
	}
	checkpointAll(t, dbs)
	pos := c.WaitCaughtUp(t, catchUpTimeout, names(dbs)...)
	checkReplicas(t, c, dbs, pos)
	for _, d := range dbs {
		if l := logLine(joiner.Log(), "applying a snapshot", "db="+d.name, "SNAPSHOT_REASON_NO_POSITION"); l == "" {
			t.Fatalf("%s did not log a snapshot of %s for lack of a position", joiner.Name, d.name)
		}
		var before, during []time.Duration
		for _, c := range commits[d.name] {
			switch {
			case c.end.Before(start):
				before = append(before, c.end.Sub(c.began))
			case c.began.Before(joined):
				during = append(during, c.end.Sub(c.began))
			}
		}
		if len(during) == 0 {
			t.Fatalf("%s: no commit in the %v of the join, want the app's writes to go on", d.name, joined.Sub(start))
		}
		slices.Sort(before)
		slices.Sort(during)
		read := logLine(primary.Log(), "snapshot read", "db="+d.name)
		if read == "" {
			t.Fatalf("%s did not log reading a snapshot of %s", primary.Name, d.name)
		}
		t.Logf("%s: %s", primary.Name, read)
		t.Logf("%s (%s): joined in %v; commits before: %d, p50 %v, max %v; during the join: %d, p50 %v, max %v",
			d.name, d.mode, joined.Sub(start).Round(time.Millisecond), len(before), before[len(before)/2].Round(time.Microsecond),
			before[len(before)-1].Round(time.Microsecond), len(during), during[len(during)/2].Round(time.Microsecond), during[len(during)-1].Round(time.Microsecond))
	}
	if l := logLine(primary.Log(), "does not match its LTX log"); l != "" {
		t.Fatalf("%s took a database for changed outside regiond while it was written: %s", primary.Name, l)
	}
}

// commitSpan is when one commit began and ended.
type commitSpan struct{ began, end time.Time }

// TestCluster_OfflinePastRetention stops a replica, has the primary
// commit until the files the replica would need are past
// replication.max_retention and pruned, restarts it, and checks that it
// gets a snapshot for that reason and ends equal to the primary.
func TestCluster_OfflinePastRetention(t *testing.T) {
	t.Parallel()
	primarySpec := iad
	primarySpec.Replication = []string{"retention: 1s", "max_retention: 2s"}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, primarySpec, fra)
	c.Start(t)
	primary, offline := c.Node(iad.Name), c.Node(fra.Name)
	dbs := []*clusterDB{{name: "d.db", mode: "delete"}}
	openOnPrimary(t, c, dbs)
	if _, err := dbs[0].db.Exec(`CREATE TABLE rows (node TEXT, i INTEGER, pad BLOB)`); err != nil {
		t.Fatal(err)
	}
	insertRows(t, dbs[0].db, primary.Name, 10)
	before := c.WaitCaughtUp(t, catchUpTimeout, "d.db")["d.db"]
	if err := offline.Stop(); err != nil {
		t.Fatal(err)
	}
	// Commit, a second apart, until the log no longer holds the file
	// after the replica's position.
	logDir := filepath.Join(primary.DataDir, "dbs", "d.db", "ltx")
	deadline := time.Now().Add(time.Minute)
	for oldestTXID(t, logDir) <= before.TXID+1 {
		if time.Now().After(deadline) {
			t.Fatalf("the primary's log still starts at txid %v a minute later; the replica is at %v", oldestTXID(t, logDir), before)
		}
		insertRows(t, dbs[0].db, primary.Name, 1)
		time.Sleep(time.Second)
	}
	t.Logf("the primary's log starts at txid %v; the replica stopped at %v", oldestTXID(t, logDir), before)
	offline.Start(t)
	pos := c.WaitCaughtUp(t, catchUpTimeout, "d.db")
	checkReplicas(t, c, dbs, pos)
	if l := logLine(offline.Log(), "applying a snapshot", "SNAPSHOT_REASON_RETENTION"); l == "" {
		t.Fatalf("%s did not log a snapshot for retention", offline.Name)
	}
	// Past retention the primary cannot tell whether the replica's history
	// diverged: the transactions the snapshot replaced are kept, up to the
	// replica's position when it stopped.
	dir := filepath.Join(offline.DataDir, "lost", "d.db")
	sets, err := filepath.Glob(filepath.Join(dir, "*"))
	if err != nil || len(sets) != 1 {
		t.Fatalf("%s: %v (%v), want one set of replaced transactions", dir, sets, err)
	}
	files := lostFiles(t, sets[0])
	if last := files[len(files)-1]; last.Header.MaxTXID != before.TXID || last.PostApplyChecksum != before.PostApplyChecksum {
		t.Fatalf("%s: replaced files end at %v, want the replica's position when it stopped, %v", sets[0], last.Pos(), before)
	}
	if l := logLine(offline.Log(), "kept the transactions a snapshot replaces", "d.db"); l == "" {
		t.Fatalf("%s did not log where the replaced transactions went", offline.Name)
	}
}

// fillMB commits about mb megabytes of random blobs to db, in
// transactions of 1 MB.
func fillMB(t *testing.T, db *sql.DB, mb int) {
	t.Helper()
	if _, err := db.Exec(`CREATE TABLE b (v BLOB)`); err != nil {
		t.Fatal(err)
	}
	for range mb {
		if _, err := db.Exec(`WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 16) INSERT INTO b SELECT randomblob(65536) FROM s`); err != nil {
			t.Fatal(err)
		}
	}
}

// oldestTXID returns the first TXID of the oldest LTX file in dir.
func oldestTXID(t *testing.T, dir string) ltx.TXID {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	oldest := ltx.TXID(0)
	for _, e := range entries {
		lo, _, err := ltx.ParseName(e.Name())
		if err != nil {
			lo, err = ltx.ParseSegmentName(e.Name())
		}
		if err == nil && (oldest == 0 || lo < oldest) {
			oldest = lo
		}
	}
	return oldest
}

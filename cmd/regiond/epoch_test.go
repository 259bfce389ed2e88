package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/regiond"
)

// TestCluster_EpochFile starts a replica whose data_dir/epoch says it has
// accepted frames of lease epoch 7 beside a static primary, whose epoch is
// 1, as a replica restarted after a newer primary appeared would meet the
// deposed one: the primary refuses its stream, both log why, naming both
// epochs, the primary steps down (it refuses writes, and says why in its
// status), and the replica never gets the primary's database. A damaged
// epoch file stops the replica at start with an error naming the file.
func TestCluster_EpochFile(t *testing.T) {
	t.Parallel()
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, fra)
	primary, replica := c.Node(iad.Name), c.Node(fra.Name)
	epochPath := filepath.Join(replica.DataDir, "epoch")
	if err := os.MkdirAll(replica.DataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(epochPath, []byte("7\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The primary first, with a database; then the replica.
	primary.Start(t)
	db := testingutil.MustOpenSQLite(t, filepath.Join(primary.MountDir, "app.db"), "delete")
	if _, err := db.Exec(`CREATE TABLE t (x); INSERT INTO t VALUES (42)`); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	replica.Start(t)

	const why = "replica fra-1 has seen lease epoch 7, newer than this node's 1"
	waitLog(t, primary, why)
	waitLog(t, replica, why)
	t.Logf("%s logged: %s", replica.Name, logLine(replica.Log(), why))
	// The primary stepped down, and refuses the replica's next streams as
	// a node that holds no lease.
	waitLog(t, primary, "stepped down: a replica has seen a newer lease epoch")
	st := waitStatus(t, primary, func(st regiond.Status) bool { return st.Role == regiond.RoleReplica && !st.Ready },
		"deposed")
	if want := "deposed: replica fra-1 has seen lease epoch 7, newer than this node's 1; another node holds the lease"; st.NotReady != want || st.Epoch != 0 {
		t.Errorf("%s /status: not ready %q, epoch %d; want %q, 0", primary.Name, st.NotReady, st.Epoch, want)
	}
	waitLog(t, replica, "node iad-1 does not hold the write lease")
	checkCreateRefused(t, primary)
	if p, ok := replica.Pos(t, "app.db"); ok {
		t.Fatalf("%s got app.db at %v from a primary of an older epoch, want no database", replica.Name, p)
	}
	if got := string(testingutil.MustReadFile(t, epochPath)); got != "7\n" {
		t.Fatalf("%s holds %q after the refused streams, want %q", epochPath, got, "7\n")
	}

	// A damaged epoch file: the replica does not start.
	if err := replica.Stop(); err != nil {
		t.Fatalf("stop %s: %v", replica.Name, err)
	}
	if err := os.WriteFile(epochPath, []byte("7x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stderr := exitStatus(t, "run", "-config", replica.Config)
	if want := "lease epoch file " + epochPath + " holds \"7x\\n\", not a lease epoch (it is damaged)"; code != 1 || !strings.Contains(stderr, want) {
		t.Fatalf("%s with a damaged epoch file: exit %d, %q; want 1 and an error saying %q", replica.Name, code, stderr, want)
	}
}

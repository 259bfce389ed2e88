package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/meridian-db/meridian/internal/testingutil"
)

// TestCluster_InFlightBounds runs a replica with
// replication.max_in_flight_files and max_in_flight_bytes far below their
// defaults while the primary gets ten new databases at once: the replica
// announces its bounds, the primary keeps within them (the replica would
// end the stream otherwise), and the replica converges without a
// reconnect.
func TestCluster_InFlightBounds(t *testing.T) {
	t.Parallel()
	small := fra
	small.Replication = []string{"max_in_flight_files: 2", "max_in_flight_bytes: 1048576"}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad, small)
	c.Start(t)
	primary, replica := c.Node(iad.Name), c.Node(fra.Name)
	logged := waitStreaming(t, c)
	dbs := createDBs(t, primary, 10, func(i int) (string, string) { return fmt.Sprintf("d%d.db", i), "delete" },
		`CREATE TABLE t (v BLOB)`, `INSERT INTO t VALUES (randomblob(200000))`, `INSERT INTO t VALUES (randomblob(100000))`)
	pos := c.WaitCaughtUp(t, catchUpTimeout, dbs...)
	for _, name := range dbs {
		if got, want := testingutil.DatabaseSHA256(t, replica.BackingFile(name)), testingutil.DatabaseSHA256(t, primary.BackingFile(name)); got != want {
			t.Fatalf("%s at %v: %s has sha256 %s, want %s, the primary's", name, pos[name], replica.Name, got, want)
		}
	}
	if line := logLine(primary.Log(), "replica connected", "replica=fra-1", "max_in_flight_files=2", "max_in_flight_bytes=1048576"); line == "" {
		t.Fatalf("%s did not log fra-1's bounds as it connected:\n%s", primary.Name, logLine(primary.Log(), "replica connected"))
	}
	for _, words := range [][]string{{"reconnecting"}, {"in flight"}} {
		if line := logLine(replica.Log()[logged[replica.Name]:], words...); line != "" {
			t.Fatalf("%s logged %q, want no reconnect:\n%s", replica.Name, strings.Join(words, " "), line)
		}
	}
}

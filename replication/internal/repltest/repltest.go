// Package repltest holds the fixtures that the tests of package
// replication and of its gRPC transport, replication/rpc, share: a
// Primary (a replication.Source over real SQLite databases and LTX logs),
// a Target (a replication.Target that applies to plain files and records
// what it applied), WaitSynced, which compares the two, and the bounded
// waits every such test uses. It is imported by tests only.
package repltest

import (
	"bytes"
	"database/sql"
	"sync"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
)

// WaitTimeout bounds every wait of these tests that has no deadline of its
// own, so that one that is not met fails its test instead of hanging it. It
// is a deadline against hangs, never a measure of speed.
const WaitTimeout = 30 * time.Second

// WaitClosed returns once done is closed, or fails the test after
// WaitTimeout saying what it waited for.
func WaitClosed(tb testing.TB, done <-chan struct{}, what string) {
	tb.Helper()
	testingutil.Within(tb, WaitTimeout, what, func() { <-done })
}

// WaitGroup is wg.Wait with WaitClosed's deadline.
func WaitGroup(tb testing.TB, wg *sync.WaitGroup, what string) {
	tb.Helper()
	testingutil.Within(tb, WaitTimeout, what, wg.Wait)
}

// WaitSynced waits until t has every database of p at p's position, then
// checks the files are byte-identical and sound.
func WaitSynced(tb testing.TB, p *Primary, t *Target) {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for _, name := range p.DBs() {
		want := p.Log(name).Pos()
		for t.Pos(name) != want {
			if time.Now().After(deadline) {
				tb.Fatalf("replica's %s at %s, primary's at %s after 30s", name, t.Pos(name), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
		got := testingutil.MustReadFile(tb, t.Path(name))
		if !bytes.Equal(got, testingutil.MustReadFile(tb, p.DB(name).Path)) {
			tb.Fatalf("%s: replica's database differs from the primary's at %s", name, want)
		}
		db, err := sql.Open("sqlite3", "file:"+t.Path(name)+"?mode=ro")
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

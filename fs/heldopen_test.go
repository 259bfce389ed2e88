package fs_test

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// Rounds of TestCrash_AppWALHeldOpen.
const (
	heldOpenRandomRounds = 70 // kills at a random moment
	heldOpenWALRounds    = 40 // kills at the nth write of the WAL
)

// killAtWALWrite kills the app at a write of the WAL: its transaction's
// frames are partly written, or all of them with the wal-index not yet
// updated.
var killAtWALWrite = killPoint{name: "wal-write", mask: syscall.IN_MODIFY, suffix: "wal"}

// TestCrash_AppWALHeldOpen kills an app committing large WAL transactions
// (synchronous=FULL) with SIGKILL, at random moments and at writes of the
// WAL, while a second process keeps the database open, reading it every
// few milliseconds: the wal-index stays alive across every kill, so
// frames the killed app wrote past the wal-index's last frame are not
// committed, even when they hold a valid commit frame, and the next
// writer (a fresh process each round) writes over them. After each kill,
// the log must hold exactly one LTX file per transaction SQLite committed;
// at the end, checkpointed, the log must rebuild the database byte for
// byte.
func TestCrash_AppWALHeldOpen(t *testing.T) {
	t.Parallel()
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 2))
	dir := t.TempDir()
	fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	fsys.Logger = infoLogger(t)
	testingutil.MustOpenFS(t, fsys)
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, "wal")
	if _, err := db.Exec(crashSchema + `CREATE TABLE fresh (round INTEGER PRIMARY KEY);`); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	captured := fsys.DB("app.db")
	schemaTXID := captured.Pos().TXID

	holder := startChild(t, "reader", path)
	holder.mustReadLine(t, "ready")

	plan := randomKills(heldOpenRandomRounds, heldOpenRandomRounds/2)
	for range heldOpenWALRounds {
		k := killAtWALWrite
		k.nth = 1 + rng.IntN(400)
		plan = append(plan, k)
	}
	rng.Shuffle(len(plan), func(i, j int) { plan[i], plan[j] = plan[j], plan[i] })

	dbDir := filepath.Join(fsys.DataDir, "dbs", "app.db")
	var rows rowState
	var st crashStats
	for round, k := range plan {
		w := startChild(t, "writer", path, "wal", strconv.Itoa(largeBlob/4))
		ready := w.mustReadLine(t, "ready")
		if k.mask == 0 {
			time.Sleep(time.Duration(5000+rng.IntN(195000)) * time.Microsecond)
		} else {
			tr := killOnEvent(t, dbDir, k, w.cmd.Process.Pid)
			select {
			case <-w.done:
			case <-time.After(10 * time.Second):
			}
			tr.stop(t)
			if !tr.fired {
				t.Fatalf("round %d: no %s event: the writer wrote nothing?\n%s", round, k.name, w.stderr.String())
			}
		}
		w.mustKill(t)
		run := w.writerRun(t, ready)

		// A fresh process commits, over whatever the killed one left.
		db := testingutil.MustOpenSQLite(t, path, "wal")
		rows.check(t, db, run, largeBlob/4, &st)
		if _, err := db.Exec(`INSERT INTO fresh VALUES (?)`, round); err != nil {
			t.Fatalf("round %d: commit after the kill: %v", round, err)
		}
		_ = db.Close()
		if got, want := captured.Pos().TXID-schemaTXID, ltx.TXID(rows.max)+ltx.TXID(round+1); got != want {
			t.Fatalf("round %d (%s): got %d LTX files after the schema, want %d: %d rows committed by writers and %d by the fresh processes (seed %d)",
				round, k.name, got, want, rows.max, round+1, seed)
		}
	}
	if err := holder.kill(); err != nil {
		t.Fatal(err)
	}
	if out := holder.stderr.String(); out != "" {
		t.Fatalf("reader: %s", out)
	}
	db = testingutil.MustOpenSQLite(t, path, "wal")
	checkLog(t, fsys, "app.db", db, true)
	t.Logf("%d kills (%d at WAL writes), %d with a transaction in flight (%d of those committed), %d rows (seed %d)",
		len(plan), heldOpenWALRounds, st.inFlight, st.inFlightCommitted, rows.max, seed)
}

// readerChild opens the SQLite database at path (WAL mode) and counts its
// rows every 2 ms until killed, keeping its wal-index alive. It prints
// "ready 0" once it has read once, and exits at the first error.
func readerChild(path string) error {
	db, err := sql.Open("sqlite3", fmt.Sprintf("file:%s?_busy_timeout=5000", path))
	if err != nil {
		return err
	}
	defer func() { _ = db.Close() }()
	conn, err := db.Conn(context.Background())
	if err != nil {
		return err
	}
	for first := true; ; first = false {
		var n int
		if err := conn.QueryRowContext(context.Background(), `SELECT count(*) FROM t`).Scan(&n); err != nil {
			return fmt.Errorf("read: %w", err)
		}
		if first {
			if _, err := fmt.Println("ready 0"); err != nil {
				return err
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
}

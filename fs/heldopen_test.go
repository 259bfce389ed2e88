package fs_test

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
	sltx "github.com/superfly/ltx"
)

// Rounds of TestCrash_AppWALHeldOpen.
const (
	heldOpenRandomRounds = 70 // kills at a random moment
	heldOpenWALRounds    = 40 // kills at the nth write of the WAL
)

// logSkippedUncommitted is what the daemon logs for a transaction whose
// frames were in the WAL but which SQLite never committed (fs/passthrough.go).
const logSkippedUncommitted = "skipped a transaction SQLite never committed"

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
	h := newHeldOpen(t, infoLogger(t))

	plan := randomKills(heldOpenRandomRounds, heldOpenRandomRounds/2)
	for range heldOpenWALRounds {
		k := killAtWALWrite
		k.nth = 1 + rng.IntN(400)
		plan = append(plan, k)
	}
	rng.Shuffle(len(plan), func(i, j int) { plan[i], plan[j] = plan[j], plan[i] })

	dbDir := filepath.Join(h.fsys.DataDir, "dbs", "app.db")
	var rows rowState
	var st crashStats
	for round, k := range plan {
		w := startChild(t, "writer", h.path, "wal", strconv.Itoa(largeBlob/4))
		ready := w.mustReadLine(t, "ready")
		run := killWriter(t, w, ready, k, dbDir, rng, round)

		db := testingutil.MustOpenSQLite(t, h.path, "wal")
		rows.check(t, db, run, largeBlob/4, &st)
		h.commitFresh(t, db, round, rows.max, fmt.Sprintf("%s, seed %d", k.name, seed))
	}
	h.finish(t)
	t.Logf("%d kills (%d at WAL writes), %d with a transaction in flight (%d of those committed), %d rows (seed %d)",
		len(plan), heldOpenWALRounds, st.inFlight, st.inFlightCommitted, rows.max, seed)
}

// TestCrash_KilledInWALSync kills a writer (synchronous=FULL) inside the
// WAL fsync of its commit, while another process keeps the wal-index
// alive: its frames, commit frame included, are all in the WAL, and the
// wal-index does not count them. SQLite never committed the transaction:
// the next writer, a fresh process, writes over it. The log must hold
// exactly the transactions SQLite committed, the daemon must say once
// what it skipped, and the log must rebuild the database.
func TestCrash_KilledInWALSync(t *testing.T) {
	t.Parallel()
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 3))
	var logged testingutil.LockedBuffer
	h := newHeldOpen(t, slog.New(slog.NewTextHandler(io.MultiWriter(&logged, testingutil.LogWriter(t)), nil)))

	const rounds = 10
	var rows rowState
	var st crashStats
	for round := range rounds {
		// Block the fsync of the writer's skip+1st commit, once its
		// frames are all in the WAL: the wal-index does not count them
		// before the fsync returns.
		skip := rng.IntN(4)
		inSync, release := make(chan struct{}), make(chan struct{})
		var fired atomic.Bool
		h.fsys.SetFailpoint(func(name string) error {
			if name != "wal-sync" || fired.Load() {
				return nil
			}
			if found, err := h.captured.ScanUncommitted(); err != nil || !found {
				return err // a checkpoint's or a new WAL header's fsync
			}
			if skip > 0 {
				skip--
				return nil
			}
			fired.Store(true)
			close(inSync)
			select {
			case <-release:
			case <-t.Context().Done(): // the test failed before the kill
			}
			return nil
		})
		w := startChild(t, "writer", h.path, "wal", strconv.Itoa(largeBlob/4))
		ready := w.mustReadLine(t, "ready")
		select {
		case <-inSync:
		case <-w.done:
			t.Fatalf("round %d: the writer ended before its commit's WAL fsync: %v\n%s", round, w.err, w.stderr.String())
		case <-time.After(30 * time.Second):
			t.Fatalf("round %d: no WAL fsync of a commit in 30s", round)
		}
		// SIGKILL lands when the fsync returns: the process never sees it.
		if err := w.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		close(release)
		w.mustKill(t)
		h.fsys.SetFailpoint(nil)
		run := w.writerRun(t, ready)
		before := strings.Count(logged.String(), logSkippedUncommitted)

		db := testingutil.MustOpenSQLite(t, h.path, "wal")
		if got := rows.check(t, db, run, largeBlob/4, &st); got != run.lastAck {
			t.Fatalf("round %d: rows up to %d after a kill inside the fsync of %d, want %d: SQLite never committed it", round, got, run.lastBegin, run.lastAck)
		}
		h.commitFresh(t, db, round, rows.max, fmt.Sprintf("seed %d", seed))
		if got := strings.Count(logged.String(), logSkippedUncommitted) - before; got != 1 {
			t.Fatalf("round %d: the daemon logged %d skipped transactions after the fresh commit, want 1", round, got)
		}
	}
	h.finish(t)
	t.Logf("%d kills inside a commit's WAL fsync, %d rows (seed %d)", rounds, rows.max, seed)
}

// heldOpen is the WAL database app.db of a mount, with crashSchema and a
// table fresh, that a reader process keeps open, reading it every few
// milliseconds: its wal-index stays alive whatever happens to writers.
type heldOpen struct {
	fsys       *fs.FileSystem
	path       string // app.db on the mount
	captured   *fs.DB
	schemaTXID ltx.TXID
	holder     *child
}

func newHeldOpen(t *testing.T, logger *slog.Logger) *heldOpen {
	t.Helper()
	dir := t.TempDir()
	h := &heldOpen{fsys: fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))}
	h.fsys.Logger = logger
	testingutil.MustOpenFS(t, h.fsys)
	h.path = filepath.Join(h.fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, h.path, "wal")
	if _, err := db.Exec(crashSchema + `CREATE TABLE fresh (round INTEGER PRIMARY KEY);`); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	h.captured = h.fsys.DB("app.db")
	h.schemaTXID = h.captured.Pos().TXID
	h.holder = startChild(t, "reader", h.path)
	h.holder.mustReadLine(t, "ready")
	return h
}

// commitFresh commits round into table fresh through db, a fresh process's
// connection, over whatever a killed writer left, and closes db. The log
// must then hold one LTX file per transaction SQLite committed: rows by
// writers, and one by a fresh process each round so far.
func (h *heldOpen) commitFresh(t *testing.T, db *sql.DB, round int, rows int64, what string) {
	t.Helper()
	if _, err := db.Exec(`INSERT INTO fresh VALUES (?)`, round); err != nil {
		t.Fatalf("round %d: commit after the kill: %v", round, err)
	}
	_ = db.Close()
	if got, want := h.captured.Pos().TXID-h.schemaTXID, ltx.TXID(rows)+ltx.TXID(round+1); got != want {
		t.Fatalf("round %d (%s): got %d LTX files after the schema, want %d: %d rows committed by writers and %d by the fresh processes",
			round, what, got, want, rows, round+1)
	}
}

// finish stops the reader, which must never have failed, and checks that
// the log, checkpointed, rebuilds the database.
func (h *heldOpen) finish(t *testing.T) {
	t.Helper()
	if err := h.holder.kill(); err != nil {
		t.Fatal(err)
	}
	if out := h.holder.stderr.String(); out != "" {
		t.Fatalf("reader: %s", out)
	}
	checkLog(t, h.fsys, "app.db", testingutil.MustOpenSQLite(t, h.path, "wal"), true)
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

// TestCapture_WALSyncFails fails the WAL fsync of some commits of a live
// writer (synchronous=FULL) while another connection keeps the wal-index
// alive: SQLite rolls those transactions back, though their frames, commit
// frame included, are in the WAL, and goes on committing over them. The
// log must hold exactly the transactions whose COMMIT succeeded, and
// rebuild the database.
func TestCapture_WALSyncFails(t *testing.T) {
	dir := t.TempDir()
	fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	var logged testingutil.LockedBuffer
	fsys.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logged, testingutil.LogWriter(t)), nil))
	// No checkpoint, so no WAL restart: every failed fsync is the one
	// that would have made a transaction durable.
	db, reader, d, start := openWALIndexApp(t, fsys)

	var syncs, failed atomic.Int64
	fsys.SetFailpoint(func(name string) error {
		if name == "wal-sync" && syncs.Add(1)%3 == 0 {
			failed.Add(1)
			return syscall.EIO
		}
		return nil
	})
	const n = 150
	var acked []int
	for i := range n {
		if _, err := db.Exec(`INSERT INTO t VALUES (?, randomblob(?))`, i, 500+i*97%9000); err == nil {
			acked = append(acked, i)
		} else if !strings.Contains(err.Error(), "disk I/O error") {
			t.Fatalf("insert %d: %v, want success or a disk I/O error", i, err)
		}
		var rows int
		if err := reader.QueryRow(`SELECT count(*) FROM t`).Scan(&rows); err != nil || rows != len(acked) {
			t.Fatalf("after insert %d: the other connection sees %d rows, %v; want %d", i, rows, err, len(acked))
		}
	}
	fsys.SetFailpoint(nil)
	if failed.Load() == 0 || len(acked) == n {
		t.Fatalf("%d WAL fsyncs failed, %d of %d commits succeeded: the failure was not exercised", failed.Load(), len(acked), n)
	}
	// One more commit writes over the last failed transaction, if the
	// last insert failed.
	if _, err := db.Exec(`INSERT INTO t VALUES (?, randomblob(100))`, n); err != nil {
		t.Fatal(err)
	}
	acked = append(acked, n)
	// Each failed transaction's frames were in the WAL, commit frame
	// included, until the next one wrote over them: the daemon says so
	// once for each.
	if got := strings.Count(logged.String(), logSkippedUncommitted); got != int(failed.Load()) {
		t.Fatalf("the daemon logged %d skipped transactions, want %d (one per failed WAL fsync)", got, failed.Load())
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got, want := d.Pos().TXID-start, ltx.TXID(len(acked)); got != want {
		t.Fatalf("%d LTX files for %d successful commits (%d WAL fsyncs failed)", got, want, failed.Load())
	}
	checkLog(t, fsys, "app.db", db, true)
	t.Logf("%d commits: %d succeeded, %d failed in the WAL fsync", n, len(acked), failed.Load())
}

// openWALIndexApp mounts fsys and opens its app.db in WAL mode, with no
// automatic checkpoint and a table t, through a writer's connection and
// another one, which keeps the wal-index alive. It returns them, the
// database, and the log's TXID after the table.
func openWALIndexApp(t *testing.T, fsys *fs.FileSystem) (db, reader *sql.DB, d *fs.DB, start ltx.TXID) {
	t.Helper()
	testingutil.MustOpenFS(t, fsys)
	path := filepath.Join(fsys.MountDir, "app.db")
	db = testingutil.MustOpenSQLite(t, path, "wal")
	if _, err := db.Exec(`PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (i INTEGER PRIMARY KEY, b BLOB)`); err != nil {
		t.Fatal(err)
	}
	reader = testingutil.MustOpenSQLite(t, path, "wal")
	d = fsys.DB("app.db")
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	return db, reader, d, d.Pos().TXID
}

// TestCapture_ShmHeaderCopiesDiffer damages the second copy of the
// wal-index header, through the mount, while connections hold the
// wal-index: SQLite finds the copies differ and rebuilds the wal-index
// from the WAL; capture waits for a header it can trust and goes on. The
// log holds exactly the transactions committed, before and after.
func TestCapture_ShmHeaderCopiesDiffer(t *testing.T) {
	dir := t.TempDir()
	fsys := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	fsys.Logger = infoLogger(t)
	db, reader, d, start := openWALIndexApp(t, fsys)
	path := filepath.Join(fsys.MountDir, "app.db")
	insert := func(i int) {
		t.Helper()
		if _, err := db.Exec(`INSERT INTO t VALUES (?, randomblob(?))`, i, 300+i*500); err != nil {
			t.Fatalf("insert %d: %v", i, err)
		}
		var n int
		if err := reader.QueryRow(`SELECT count(*) FROM t`).Scan(&n); err != nil || n != i+1 {
			t.Fatalf("after insert %d the other connection sees %d rows, %v", i, n, err)
		}
	}
	for i := range 5 {
		insert(i)
	}
	shm, err := os.OpenFile(path+"-shm", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = shm.Close() }()
	b := make([]byte, 1)
	if _, err := shm.ReadAt(b, 48+16); err != nil {
		t.Fatal(err)
	}
	if _, err := shm.WriteAt([]byte{b[0] + 1}, 48+16); err != nil { // copy 2's mxFrame
		t.Fatal(err)
	}
	for i := 5; i < 10; i++ {
		insert(i)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := d.Pos().TXID - start; got != 10 {
		t.Fatalf("%d LTX files for 10 commits", got)
	}
	checkLog(t, fsys, "app.db", db, true)
}

// TestCapture_WALIndexInPageCache runs the daemon in a child process as on
// a kernel without FUSE passthrough: it serves the WAL and the -shm, which
// SQLite maps, so SQLite's wal-index lives in the kernel's page cache of
// the mount's -shm and reaches the backing file only when the kernel
// writes it back; capture must read it there (FUSE_NOTIFY_RETRIEVE). A
// reader process keeps the wal-index alive while writers committing large
// transactions are killed at writes of the WAL, some between their commit
// frame and the wal-index's update; after each kill a fresh commit must
// leave exactly one LTX file per transaction SQLite committed, by the
// position file, and the log must rebuild the database. (The daemon is
// another process: a page fault of this one on a -shm it served itself
// could wait for a thread of its own.)
func TestCapture_WALIndexInPageCache(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 4))
	d, path, dbDir, schemaTXID := newCrashDaemon(t, "wal", false)
	d.noKernelPassthrough = true
	d.start(t)
	db := testingutil.MustOpenSQLite(t, path, "wal")
	if _, err := db.Exec(`CREATE TABLE fresh (round INTEGER PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	holder := startChild(t, "reader", path)
	holder.mustReadLine(t, "ready")
	txid := func() ltx.TXID {
		t.Helper()
		b := testingutil.MustReadFile(t, path+"-pos")
		pos, err := sltx.ParsePos(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatalf("app.db-pos: %q: %v", b, err)
		}
		return pos.TXID
	}
	const rounds = 20
	var rows rowState
	var st crashStats
	for round := range rounds {
		k := killAtWALWrite
		k.nth = 1 + rng.IntN(400)
		w := startChild(t, "writer", path, "wal", strconv.Itoa(largeBlob/4))
		ready := w.mustReadLine(t, "ready")
		run := killWriter(t, w, ready, k, dbDir, rng, round)
		db := testingutil.MustOpenSQLite(t, path, "wal")
		rows.check(t, db, run, largeBlob/4, &st)
		if _, err := db.Exec(`INSERT INTO fresh VALUES (?)`, round); err != nil {
			t.Fatalf("round %d: commit after the kill: %v", round, err)
		}
		_ = db.Close()
		// The schema, the table fresh, a row per writer commit, one fresh
		// commit a round.
		if got, want := txid()-schemaTXID, 1+ltx.TXID(rows.max)+ltx.TXID(round+1); got != want {
			t.Fatalf("round %d (kill at WAL write %d, seed %d): %d LTX files after the schema, want %d: %d rows by writers, %d fresh commits",
				round, k.nth, seed, got, want, rows.max, round+1)
		}
	}
	if err := holder.kill(); err != nil {
		t.Fatal(err)
	}
	if out := holder.stderr.String(); out != "" {
		t.Fatalf("reader: %s", out)
	}
	db = testingutil.MustOpenSQLite(t, path, "wal")
	if _, err := db.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	d.stop(t)
	verifyStopped(t, dbDir)
	t.Logf("%d kills at WAL writes, %d with a transaction in flight (%d of those committed), %d rows (seed %d)",
		rounds, st.inFlight, st.inFlightCommitted, rows.max, seed)
}

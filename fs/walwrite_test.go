package fs

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/ltx"
)

// walWriterFixture is a database directory laid out as a replica's
// (database, wal, shm), with the names SQLite looks for linked to them,
// and a primary database made by SQLite whose states the replica's
// applier writes as WAL transactions.
type walWriterFixture struct {
	t       *testing.T
	d       *DB
	primary *sql.DB
	pPath   string
	rPath   string // the replica's database, for SQLite
	prev    [][]byte
	ps      uint32
}

func newWALWriterFixture(t *testing.T) *walWriterFixture {
	t.Helper()
	dir := t.TempDir()
	x := &walWriterFixture{t: t, pPath: filepath.Join(dir, "primary.db"), ps: 4096}
	p, err := sql.Open("sqlite3", "file:"+x.pPath+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	p.SetMaxOpenConns(1)
	t.Cleanup(func() { _ = p.Close() })
	x.primary = p
	x.exec(`CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)`)
	rdir := filepath.Join(dir, "replica")
	if err := os.Mkdir(rdir, 0o755); err != nil {
		t.Fatal(err)
	}
	x.rPath = filepath.Join(rdir, databaseFile)
	if err := os.WriteFile(x.rPath, x.concat(x.primaryPages()), 0o644); err != nil {
		t.Fatal(err)
	}
	// SQLite opens its -wal and -shm with O_NOFOLLOW: hard links.
	for _, n := range []string{walFile, shmFile} {
		if err := os.WriteFile(filepath.Join(rdir, n), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(filepath.Join(rdir, n), x.rPath+"-"+n); err != nil {
			t.Fatal(err)
		}
	}
	// A log with nothing in it: the checkpoints wait for it (AwaitLogged).
	d := &DB{Name: "replica", dir: rdir, logger: slog.New(slog.DiscardHandler), log: ltx.NewLog("replica", filepath.Join(rdir, logDir), "")}
	if d.file, err = os.OpenFile(x.rPath, os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	d.resetWAL()
	t.Cleanup(d.closeFiles)
	x.d = d
	x.prev = x.primaryPages()
	return x
}

func (x *walWriterFixture) exec(q string, args ...any) {
	x.t.Helper()
	if _, err := x.primary.Exec(q, args...); err != nil {
		x.t.Fatalf("%s: %v", q, err)
	}
}

// insert adds n rows of size random bytes on the primary.
func (x *walWriterFixture) insert(n, size int) {
	x.t.Helper()
	x.exec(`WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < ?) INSERT INTO t(v) SELECT randomblob(?) FROM s`, n, size)
}

// primaryPages checkpoints the primary and returns its pages.
func (x *walWriterFixture) primaryPages() [][]byte {
	x.t.Helper()
	x.exec(`PRAGMA wal_checkpoint(TRUNCATE)`)
	b, err := os.ReadFile(x.pPath)
	if err != nil {
		x.t.Fatal(err)
	}
	var pages [][]byte
	for off := 0; off < len(b); off += int(x.ps) {
		pages = append(pages, b[off:off+int(x.ps)])
	}
	return pages
}

func (x *walWriterFixture) concat(pages [][]byte) []byte { return bytes.Join(pages, nil) }

// ship appends the primary's changes since the last ship as one WAL
// transaction of the replica, and returns the frames it wrote.
func (x *walWriterFixture) ship() int {
	x.t.Helper()
	cur := x.primaryPages()
	var pgnos []uint32
	var pages [][]byte
	for i, p := range cur {
		if i >= len(x.prev) || !bytes.Equal(p, x.prev[i]) {
			pgnos = append(pgnos, uint32(i+1))
			pages = append(pages, p)
		}
	}
	x.d.mu.Lock()
	err := x.d.appendWALTx(pgnos, pages, uint32(len(cur)), x.ps, true)
	x.d.mu.Unlock()
	if err != nil {
		x.t.Fatal(err)
	}
	x.prev = cur
	return len(pgnos)
}

// rows returns what SQLite reads of table t through q.
func rows(t *testing.T, q interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}) string {
	t.Helper()
	r, err := q.QueryContext(context.Background(), `SELECT count(*), coalesce(sum(id), 0), coalesce(sum(length(v)), 0), coalesce(max(hex(substr(v, 1, 8))), '') FROM t`)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	var n, ids, size int64
	var h string
	if !r.Next() {
		t.Fatal("no row")
	}
	if err := r.Scan(&n, &ids, &size, &h); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%d rows, ids %d, %d bytes, %s", n, ids, size, h)
}

// openReplica opens the replica's database read-only, as apps on a
// replica's mount do (a read-only connection never checkpoints).
func (x *walWriterFixture) openReplica() *sql.DB {
	x.t.Helper()
	db, err := sql.Open("sqlite3", "file:"+x.rPath+"?mode=ro")
	if err != nil {
		x.t.Fatal(err)
	}
	x.t.Cleanup(func() { _ = db.Close() })
	return db
}

func (x *walWriterFixture) check(db *sql.DB) {
	x.t.Helper()
	if got, want := rows(x.t, db), rows(x.t, x.primary); got != want {
		x.t.Fatalf("the replica reads %s, the primary %s", got, want)
	}
	var ok string
	if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
		x.t.Fatalf("integrity_check of the replica: %q, %v", ok, err)
	}
}

// TestWALWriter_SQLiteReadsFrames: transactions the applier appends to a
// WAL are read by SQLite exactly as the primary committed them, a read
// transaction keeps its snapshot across appends, and the database grows,
// shrinks and crosses wal-index blocks.
func TestWALWriter_SQLiteReadsFrames(t *testing.T) {
	x := newWALWriterFixture(t)
	r := x.openReplica()
	x.check(r)
	frames := 0
	for i := 1; i <= 40; i++ {
		x.insert(i*3, 100+i*37)
		if i%7 == 0 {
			x.exec(`DELETE FROM t WHERE id % 3 = 0`)
		}
		if i%13 == 0 {
			x.exec(`VACUUM`) // shrinks the file
		}
		frames += x.ship()
		x.check(r)
	}

	// A read transaction keeps its snapshot while frames are appended.
	conn, err := r.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	if _, err := conn.ExecContext(context.Background(), `BEGIN`); err != nil {
		t.Fatal(err)
	}
	before := rows(t, conn)
	for i := 0; i < 6; i++ {
		x.insert(500, 3000)
		frames += x.ship()
	}
	if got := rows(t, conn); got != before {
		t.Fatalf("a read transaction saw %s, then %s, while frames were appended", before, got)
	}
	if _, err := conn.ExecContext(context.Background(), `COMMIT`); err != nil {
		t.Fatal(err)
	}
	if got, want := rows(t, conn), rows(t, x.primary); got != want {
		t.Fatalf("after its transaction the reader reads %s, the primary %s", got, want)
	}
	if frames <= hashNPageOne {
		t.Fatalf("%d frames: the test must cross the first wal-index block (%d frames)", frames, hashNPageOne)
	}
	if int64(frames) != x.d.wal.mxFrame {
		t.Fatalf("the WAL has %d frames, %d were appended", x.d.wal.mxFrame, frames)
	}
	_ = conn.Close()
	_ = r.Close()

	// SQLite's own recovery finds the same transactions in the frames, and
	// builds the same hash tables from them.
	shm, err := os.ReadFile(filepath.Join(filepath.Dir(x.rPath), shmFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(filepath.Dir(x.rPath), shmFile), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	x.check(x.openReplica())
	rebuilt, err := os.ReadFile(filepath.Join(filepath.Dir(x.rPath), shmFile))
	if err != nil {
		t.Fatal(err)
	}
	if len(rebuilt) < len(shm) {
		t.Fatalf("SQLite's wal-index is %d bytes, the applier's %d", len(rebuilt), len(shm))
	}
	if !bytes.Equal(shm[walIndexHdrBytes:], rebuilt[walIndexHdrBytes:len(shm)]) {
		t.Fatal("the hash tables SQLite builds from the WAL differ from those the applier wrote")
	}
	if !bytes.Equal(shm[16:40], rebuilt[16:40]) { // iChange and so the checksum differ
		t.Fatalf("wal-index header: the applier wrote mxFrame, nPage, checksums and salts % x, SQLite's recovery % x", shm[16:40], rebuilt[16:40])
	}
}

// TestWALWriter_FoldAndRestart: the applier's WAL copied into the database
// file leaves it equal to the primary's, byte for byte, and a new WAL
// generation after it is read as well.
func TestWALWriter_FoldAndRestart(t *testing.T) {
	x := newWALWriterFixture(t)
	for i := 1; i <= 5; i++ {
		x.insert(i*20, 700)
		x.ship()
	}
	salt := x.d.wal.hdr.salt1
	x.d.mu.Lock()
	pgnos, err := x.d.foldWAL(false)
	x.d.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if len(pgnos) == 0 {
		t.Fatal("the fold wrote no page")
	}
	got, err := os.ReadFile(x.rPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, x.concat(x.prev)) {
		t.Fatalf("after the fold the database file (%d bytes) differs from the primary's (%d bytes)", len(got), len(x.concat(x.prev)))
	}
	if fi, err := os.Stat(filepath.Join(filepath.Dir(x.rPath), walFile)); err != nil || fi.Size() != 0 {
		t.Fatalf("the WAL after the fold: %v, %v", fi, err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(x.rPath), walAppliedFile)); !os.IsNotExist(err) {
		t.Fatalf("the applier's mark is left after the fold: %v", err)
	}
	r := x.openReplica()
	x.check(r)
	x.exec(`UPDATE t SET v = randomblob(50) WHERE id % 2 = 0`)
	x.ship()
	if x.d.wal.hdr.salt1 != salt+1 {
		t.Fatalf("the new generation's salt1 is %d, want %d", x.d.wal.hdr.salt1, salt+1)
	}
	x.check(r)
}

// TestWALWriter_Mark: the WAL generation the applier writes is marked as
// its own, durably, so that a daemon that starts with it knows it by the
// mark alone (TestFileSystem_ApplyWALRestart restarts one), and SQLite's
// recovery finds the transaction in its frames.
func TestWALWriter_Mark(t *testing.T) {
	x := newWALWriterFixture(t)
	x.insert(50, 900)
	x.ship()
	x.d.mu.Lock()
	if !x.d.walApplied() {
		t.Fatal("the applier's WAL is not marked as its own")
	}
	x.d.applied = appliedWAL{} // a new daemon knows only the mark
	if x.d.walApplied() {
		t.Fatal("the applier's WAL is its own before the mark is read")
	}
	if err := x.d.readWALAppliedMark(); err != nil {
		t.Fatal(err)
	}
	if !x.d.walApplied() {
		x.d.mu.Unlock()
		t.Fatal("the mark alone does not tell the applier's WAL")
	}
	x.d.wal.hdr.salt1++ // a generation the applier did not start
	x.d.applied = appliedWAL{}
	err := x.d.readWALAppliedMark()
	x.d.wal.hdr.salt1--
	mine := x.d.walApplied()
	x.d.mu.Unlock()
	if err != nil || mine {
		t.Fatalf("a mark with other salts makes the WAL the applier's (%v)", err)
	}
	f, err := os.Open(filepath.Join(filepath.Dir(x.rPath), walFile))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	if _, txs, err := readWAL(bytes.NewReader(b), int64(len(b))); err != nil || len(txs) != 1 {
		t.Fatalf("SQLite's recovery would find %d transactions (%v), want 1", len(txs), err)
	}
}

// ofdWALLocks takes the applier's -shm locks as open file description
// locks, which conflict with the POSIX locks SQLite's connections in this
// process take, as the locks of other processes do.
type ofdWALLocks struct{ f *os.File }

func (l ofdWALLocks) set(cmd int, typ int16, start, end uint64) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: int64(start), Len: int64(end - start + 1)}
	return unix.FcntlFlock(l.f.Fd(), cmd, &lk)
}

func (l ofdWALLocks) lock(_ context.Context, start, end uint64) error {
	return l.set(unix.F_OFD_SETLKW, unix.F_WRLCK, start, end)
}

func (l ofdWALLocks) try(_ context.Context, start, end uint64) (bool, error) {
	err := l.set(unix.F_OFD_SETLK, unix.F_WRLCK, start, end)
	if err == unix.EAGAIN || err == unix.EACCES {
		return false, nil
	}
	return err == nil, err
}

func (l ofdWALLocks) unlock(start, end uint64) error {
	return l.set(unix.F_OFD_SETLK, unix.F_UNLCK, start, end)
}

func (l ofdWALLocks) shareDMS(context.Context) error {
	return l.set(unix.F_OFD_SETLK, unix.F_RDLCK, walDMSLock, walDMSLock)
}

// TestWALWriter_Checkpoint: the passive checkpoint copies only frames every
// reader's snapshot includes, waits for no reader, and once all frames
// are in the database file and no reader uses the WAL, the next
// transaction starts a new generation; the database file then equals the
// primary's.
func TestWALWriter_Checkpoint(t *testing.T) {
	ctx := context.Background()
	x := newWALWriterFixture(t)
	shm, err := os.OpenFile(filepath.Join(filepath.Dir(x.rPath), shmFile), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = shm.Close() }()
	locks := ofdWALLocks{shm}
	if err := locks.shareDMS(ctx); err != nil {
		t.Fatal(err)
	}
	f := &FileSystem{Logger: slog.New(slog.DiscardHandler)}
	apply := func(n int) {
		t.Helper()
		if err := locks.lock(ctx, walWriteLock, walWriteLock); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = locks.unlock(walWriteLock, walWriteLock) }()
		if err := f.restartWAL(ctx, x.d, locks); err != nil {
			t.Fatal(err)
		}
		x.insert(n, 3000)
		x.ship()
		if err := f.checkpointWAL(ctx, x.d, locks); err != nil {
			t.Fatal(err)
		}
	}
	r := x.openReplica()
	apply(10)
	x.check(r)

	// A reader's snapshot, taken at mxFrame = snap.
	conn, err := r.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	if _, err := conn.ExecContext(ctx, `BEGIN`); err != nil {
		t.Fatal(err)
	}
	before := rows(t, conn)
	snap := uint32(x.d.wal.mxFrame)
	for i := 0; x.d.wal.mxFrame < 3*walFoldFrames; i++ {
		if i > 100 {
			t.Fatalf("the WAL does not grow: %d frames, %d checkpointed", x.d.wal.mxFrame, x.d.applied.backfill)
		}
		apply(200)
	}
	if got := x.d.applied.backfill; got != snap {
		t.Fatalf("with a reader at frame %d of %d, the checkpoint copied %d frames", snap, x.d.wal.mxFrame, got)
	}
	if got := rows(t, conn); got != before {
		t.Fatalf("the reader saw %s, then %s after checkpoints", before, got)
	}
	if _, err := conn.ExecContext(ctx, `COMMIT`); err != nil {
		t.Fatal(err)
	}
	_ = conn.Close()
	gen := x.d.wal.hdr.salt1
	apply(1) // copies every frame: no reader
	if got, mx := x.d.applied.backfill, uint32(x.d.wal.mxFrame); got != mx {
		t.Fatalf("with no reader, the checkpoint copied %d of %d frames", got, mx)
	}
	db, err := os.ReadFile(x.rPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(db, x.concat(x.prev)) {
		t.Fatalf("the database file after the checkpoint (%d bytes) differs from the primary's (%d bytes)", len(db), len(x.concat(x.prev)))
	}
	x.check(r)

	// A reader that began with every frame in the database file reads it
	// alone (READ0): the WAL starts over under it, and no checkpoint
	// writes the database file until it ends.
	conn, err = r.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	if _, err := conn.ExecContext(ctx, `BEGIN`); err != nil {
		t.Fatal(err)
	}
	before = rows(t, conn)
	apply(1) // starts a new generation
	if x.d.wal.hdr.salt1 != gen+1 || x.d.wal.mxFrame > 10 {
		t.Fatalf("after a full checkpoint the next apply continues the WAL (salt1 %d, was %d; %d frames)", x.d.wal.hdr.salt1, gen, x.d.wal.mxFrame)
	}
	for i := 0; x.d.wal.mxFrame < 2*walFoldFrames; i++ {
		if i > 100 {
			t.Fatalf("the WAL does not grow: %d frames", x.d.wal.mxFrame)
		}
		apply(200)
	}
	if got := x.d.applied.backfill; got != 0 {
		t.Fatalf("with a reader of the database file alone, the checkpoint copied %d frames into it", got)
	}
	if got := rows(t, conn); got != before {
		t.Fatalf("the reader of the database file saw %s, then %s", before, got)
	}
	if _, err := conn.ExecContext(ctx, `COMMIT`); err != nil {
		t.Fatal(err)
	}
	_ = conn.Close()
	apply(1)
	if got, mx := x.d.applied.backfill, uint32(x.d.wal.mxFrame); got != mx {
		t.Fatalf("once the reader ended, the checkpoint copied %d of %d frames", got, mx)
	}
	x.check(r)
	x.check(x.openReplica())
}

// TestWALWriter_FoldOthers: a WAL whose frames the applier did not write
// (an app's, from when the node was the primary) is folded only when the
// caller asks for any WAL, as a replica's apply into the database file
// does.
func TestWALWriter_FoldOthers(t *testing.T) {
	x := newWALWriterFixture(t)
	x.insert(40, 800)
	x.ship()
	x.d.mu.Lock()
	defer x.d.mu.Unlock()
	if err := os.Remove(filepath.Join(filepath.Dir(x.rPath), walAppliedFile)); err != nil {
		t.Fatal(err)
	}
	x.d.applied.mine = false
	if pgnos, err := x.d.foldWAL(false); err != nil || pgnos != nil || x.d.wal.mxFrame == 0 {
		t.Fatalf("foldWAL(false) of a WAL not the applier's: pages %v, %v, %d frames left; want nothing done", pgnos, err, x.d.wal.mxFrame)
	}
	if pgnos, err := x.d.foldWAL(true); err != nil || len(pgnos) == 0 || x.d.wal.mxFrame != 0 {
		t.Fatalf("foldWAL(true): pages %v, %v, %d frames left; want them all in the database file", pgnos, err, x.d.wal.mxFrame)
	}
	if got, err := os.ReadFile(x.rPath); err != nil || !bytes.Equal(got, x.concat(x.prev)) {
		t.Fatalf("after the fold the database file (%d bytes, %v) differs from the primary's (%d bytes)", len(got), err, len(x.concat(x.prev)))
	}
}

package fs_test

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
)

// bankReaderTxChild keeps one read transaction of bank.db at path open as
// its stdin says: "begin" begins one, "read" reads in it, "end" ends it and
// reads after it. After each it prints "saw N", N the rows of table blob
// it read, having checked the accounts' total. It exits at EOF or at the
// first error.
func bankReaderTxChild(path string) error {
	db, err := sql.Open("sqlite3", fmt.Sprintf("file:%s?_busy_timeout=5000", path))
	if err != nil {
		return err
	}
	defer func() { _ = db.Close() }()
	db.SetMaxOpenConns(1)
	type querier interface {
		QueryRow(string, ...any) *sql.Row
	}
	read := func(q querier) (int, error) {
		var sum, n, blobs int
		if err := q.QueryRow(`SELECT sum(balance), count(*) FROM accounts`).Scan(&sum, &n); err != nil {
			return 0, err
		}
		if sum != accountsSum || n != accounts {
			return 0, fmt.Errorf("sum %d of %d accounts, want %d of %d", sum, n, accountsSum, accounts)
		}
		err := q.QueryRow(`SELECT count(*) FROM blob`).Scan(&blobs)
		return blobs, err
	}
	var tx *sql.Tx
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var q querier = db
		switch in.Text() {
		case "begin":
			if tx, err = db.Begin(); err != nil {
				return err
			}
			q = tx
		case "read":
			q = tx
		case "end":
			if err := tx.Rollback(); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown command %q", in.Text())
		}
		blobs, err := read(q)
		if err != nil {
			return err
		}
		if _, err := fmt.Println("saw", blobs); err != nil {
			return err
		}
	}
	return in.Err()
}

// follower applies a source's new LTX files to a replica, in order.
type follower struct {
	f       *fs.FileSystem
	src     *bank
	applied int
}

// applyNew applies the files the source's log gained since the last call.
// An apply that waited for a reader would end with ctx.
func (w *follower) applyNew(t *testing.T, ctx context.Context) {
	t.Helper()
	files := w.src.log.Files()
	for _, file := range files[w.applied:] {
		if _, err := w.f.Apply(ctx, "bank.db", filepath.Join(w.src.log.Dir, file.Name), false); err != nil {
			t.Fatal(err)
		}
	}
	w.applied = len(files)
}

// blobs returns the rows of table blob in the source.
func (b *bank) blobs(t *testing.T) int64 {
	t.Helper()
	var n int64
	if err := b.db.QueryRow(`SELECT count(*) FROM blob`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// mustExit ends a reader child's input and waits for it to exit cleanly.
func (c *child) mustExit(t *testing.T) {
	t.Helper()
	if err := c.stdin.Close(); err != nil {
		t.Fatal(err)
	}
	testingutil.Within(t, 10*time.Second, "the reader to exit", func() { <-c.done })
	if c.err != nil {
		t.Fatalf("reader: %v\n%s", c.err, c.stderr.String())
	}
}

// mustMatchSource makes replica f writable, which copies the WAL it wrote
// into its database file, and checks that file is the source's, byte for
// byte.
func mustMatchSource(t *testing.T, f *fs.FileSystem, src *bank) {
	t.Helper()
	f.SetReadOnly(false)
	backing := filepath.Join(f.DataDir, "dbs", "bank.db", "database")
	if !bytes.Equal(testingutil.MustReadFile(t, backing), testingutil.MustReadFile(t, src.path)) {
		t.Fatal("the replica's database differs from the source's")
	}
}

// TestFileSystem_ApplyWALLongReader: on a replica, a WAL-mode database is
// applied as WAL frames. A read transaction in another process that stays
// open never holds an apply off, and keeps reading the snapshot it began
// with; checkpoints copy only the frames it does not need, and the log
// says the WAL grows because of it, past the first block of the
// wal-index; once it ends, its next reads see everything, the checkpoint
// catches up, and the database equals the source's.
func TestFileSystem_ApplyWALLongReader(t *testing.T) {
	for _, kernel := range []bool{false, true} {
		name := "mount-locks"
		if kernel {
			name = "kernel-locks"
		}
		t.Run(name, func(t *testing.T) { testApplyWALLongReader(t, kernel) })
	}
}

func testApplyWALLongReader(t *testing.T, kernel bool) {
	src := newBank(t, "wal")
	addBlob := func() {
		src.tx(func(tx *sql.Tx) error {
			_, err := tx.Exec(`INSERT INTO blob VALUES (randomblob(5000))`)
			return err
		})
	}
	addBlob()
	var logged testingutil.LockedBuffer
	dir := t.TempDir()
	f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
	f.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logged, testingutil.LogWriter(t)), nil))
	if kernel {
		f.KernelLocks, f.LockHolder = true, lockHolderCommand
	}
	f.SetCheckpointFrames(10)
	f.SetReadOnly(true)
	testingutil.MustOpenFS(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w := &follower{f: f, src: src}
	applyNew := func() { w.applyNew(t, ctx) }
	applyNew()

	r := startChild(t, "bank-reader-tx", filepath.Join(f.MountDir, "bank.db"))
	say := func(cmd string) int64 {
		t.Helper()
		if _, err := io.WriteString(r.stdin, cmd+"\n"); err != nil {
			t.Fatal(err)
		}
		return r.mustReadLine(t, "saw")
	}
	if n := say("begin"); n != 1 {
		t.Fatalf("the reader's transaction began with %d rows in blob, want 1", n)
	}
	snapshot, _, _ := f.WALFrames("bank.db")
	for i := range 40 {
		addBlob()
		src.step()
		applyNew()
		if i%10 == 0 {
			if n := say("read"); n != 1 {
				t.Fatalf("after %d more rows were applied the reader's transaction reads %d rows in blob, want 1", i+1, n)
			}
		}
	}
	// Rows of 100 KB grow the WAL past the first block of the wal-index
	// (4,062 frames), which the readers that come must map too.
	for i := 0; ; i++ {
		if frames, _, _ := f.WALFrames("bank.db"); frames > 4500 {
			break
		} else if i == 200 {
			t.Fatalf("the WAL holds %d frames after 200 rows of 100 KB", frames)
		}
		src.tx(func(tx *sql.Tx) error {
			_, err := tx.Exec(`INSERT INTO blob VALUES (randomblob(100000))`)
			return err
		})
		applyNew()
	}
	frames, done, _ := f.WALFrames("bank.db")
	if done > snapshot || frames < 10*10 {
		t.Fatalf("the WAL has %d frames, %d checkpointed; the reader's snapshot ends at frame %d", frames, done, snapshot)
	}
	if !strings.Contains(logged.String(), "keep the WAL from being checkpointed") {
		t.Fatalf("no warning that readers keep the WAL from being checkpointed in the log:\n%s", logged.String())
	}
	if n := say("read"); n != 1 {
		t.Fatalf("the reader's transaction reads %d rows in blob at its end, want 1", n)
	}
	if n, want := say("end"), src.blobs(t); n != want {
		t.Fatalf("after its transaction the reader reads %d rows in blob, want %d", n, want)
	}
	addBlob()
	applyNew()
	if frames, done, _ := f.WALFrames("bank.db"); done != frames {
		t.Fatalf("with the reader's transaction over, %d of %d frames are checkpointed", done, frames)
	}
	if n, want := say("begin"), src.blobs(t); n != want {
		t.Fatalf("a new transaction reads %d rows in blob, want %d", n, want)
	}
	if n, want := say("end"), src.blobs(t); n != want {
		t.Fatalf("after its transaction the reader reads %d rows in blob, want %d", n, want)
	}
	r.mustExit(t)
	mustMatchSource(t, f, src)
}

// TestFileSystem_ApplyWALLeavesWAL: a transaction that takes a replicated
// database out of WAL mode is applied into the database file, after the
// frames of the WAL, while a reader in another process reads before and
// after it; later transactions in rollback-journal mode follow.
func TestFileSystem_ApplyWALLeavesWAL(t *testing.T) {
	src := newBank(t, "wal")
	for range 30 {
		src.step()
	}
	f := newReplicaFS(t, false)
	w := &follower{f: f, src: src}
	applyNew := func() { w.applyNew(t, context.Background()) }
	applyNew()
	if frames, _, _ := f.WALFrames("bank.db"); frames == 0 {
		t.Fatal("no WAL frames on the replica after 30 transactions in WAL mode")
	}
	r := startStepReader(t, f)
	r.step(t)
	r.mustReadLine(t, "saw")

	before := testingutil.MustReadFile(t, src.path)
	if _, err := src.db.Exec(`PRAGMA journal_mode=DELETE`); err != nil {
		t.Fatal(err)
	}
	if _, err := testingutil.CommitChanged(src.log, before, testingutil.MustReadFile(t, src.path)); err != nil {
		t.Fatal(err)
	}
	applyNew()
	r.step(t)
	if n, want := r.mustReadLine(t, "saw"), src.blobs(t); n != want {
		t.Fatalf("after the switch the reader sees %d rows in blob, want %d", n, want)
	}
	if frames, _, _ := f.WALFrames("bank.db"); frames != 0 {
		t.Fatalf("the WAL still has %d frames in rollback-journal mode", frames)
	}
	// A connection that opened the database in WAL mode keeps its SHARED
	// lock of the database file while it lives, in any mode: the
	// rollback-journal applies that follow would wait for it (as they
	// would on the primary, where the switch itself waits for it).
	r.mustExit(t)
	src.wal = false
	for range 20 {
		src.step()
	}
	applyNew()
	r = startStepReader(t, f)
	r.step(t)
	if n, want := r.mustReadLine(t, "saw"), src.blobs(t); n != want {
		t.Fatalf("the reader sees %d rows in blob, want %d", n, want)
	}
	r.mustExit(t)
	mustMatchSource(t, f, src)
}

// TestFileSystem_ApplyWALRestart: a daemon that starts with a WAL its
// replica applier wrote copies it into the database file before anything
// reads it, whether it starts as a replica again, which then applies on,
// or as the primary, which must not take the frames for transactions of
// its own.
func TestFileSystem_ApplyWALRestart(t *testing.T) {
	for _, primary := range []bool{false, true} {
		name := "replica"
		if primary {
			name = "primary"
		}
		t.Run(name, func(t *testing.T) {
			src, f, w := newFollowingReplica(t, false)
			frames, done, _ := f.WALFrames("bank.db")
			if frames == 0 || done != 0 {
				t.Fatalf("the replica's WAL has %d frames, %d checkpointed; want frames, none checkpointed", frames, done)
			}
			files := len(f.DB("bank.db").Log().Files())
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := f.Close(ctx); err != nil {
				t.Fatal(err)
			}

			again, logged := restartFS(t, f, !primary)
			if !strings.Contains(logged.String(), "copied the WAL the replica wrote into the database file") {
				t.Fatalf("no word of the replica's WAL in the log:\n%s", logged.String())
			}
			d := again.DB("bank.db")
			if got := d.Pos(); got != src.log.Pos() {
				t.Fatalf("after the restart the database is at %s, want %s", got, src.log.Pos())
			}
			if got := len(d.Log().Files()); got != files {
				t.Fatalf("after the restart the log has %d files, before it %d", got, files)
			}
			backing := filepath.Join(again.DataDir, "dbs", "bank.db", "database")
			if !bytes.Equal(testingutil.MustReadFile(t, backing), testingutil.MustReadFile(t, src.path)) {
				t.Fatal("after the restart the replica's database file differs from the source's")
			}
			if b := testingutil.MustReadFile(t, filepath.Join(again.DataDir, "dbs", "bank.db", "wal")); len(b) != 0 {
				t.Fatalf("after the restart the WAL holds %d bytes", len(b))
			}
			if primary {
				return
			}
			for range 10 {
				src.step()
			}
			w.f = again
			w.applyNew(t, context.Background())
			r := startStepReader(t, again)
			r.step(t)
			if got, want := r.mustReadLine(t, "saw"), src.blobs(t); got != want {
				t.Fatalf("after the restart a reader sees %d rows in blob, want %d", got, want)
			}
			r.mustExit(t)
		})
	}
}

// TestFileSystem_ApplyWALSnapshot: a snapshot applied to a replica whose
// WAL holds frames replaces the database, WAL included, under a hold of
// the readers; a reader in another process then reads the snapshot, and
// frames follow it again.
func TestFileSystem_ApplyWALSnapshot(t *testing.T) {
	src, f, w := newFollowingReplica(t, true)
	if frames, _, _ := f.WALFrames("bank.db"); frames == 0 {
		t.Fatal("no WAL frames on the replica")
	}
	r := startStepReader(t, f)
	r.step(t)
	r.mustReadLine(t, "saw")

	// The source moves on; the replica gets a snapshot of it.
	for range 30 {
		src.step()
	}
	snap := filepath.Join(t.TempDir(), "snapshot.ltx")
	out, err := os.Create(snap)
	if err != nil {
		t.Fatal(err)
	}
	db, err := os.Open(src.path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := src.log.Snapshot(context.Background(), out, db); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Apply(context.Background(), "bank.db", snap, false); err != nil {
		t.Fatal(err)
	}
	if frames, _, _ := f.WALFrames("bank.db"); frames != 0 {
		t.Fatalf("the WAL holds %d frames after the snapshot", frames)
	}
	r.step(t)
	if n, want := r.mustReadLine(t, "saw"), src.blobs(t); n != want {
		t.Fatalf("after the snapshot the reader sees %d rows in blob, want %d", n, want)
	}
	w.applied = len(src.log.Files()) // the snapshot holds them
	for range 10 {
		src.step()
	}
	w.applyNew(t, context.Background())
	if frames, _, _ := f.WALFrames("bank.db"); frames == 0 {
		t.Fatal("no WAL frames after the snapshot and 10 transactions")
	}
	r.step(t)
	if n, want := r.mustReadLine(t, "saw"), src.blobs(t); n != want {
		t.Fatalf("the reader sees %d rows in blob, want %d", n, want)
	}
	r.mustExit(t)
	mustMatchSource(t, f, src)
}

// TestFileSystem_ApplyWALFramesLost: a replica appends a group's frames to
// the WAL without an fsync, once the group is durable in its log. A power
// cut that loses them leaves the database behind the log, by one group or
// by several (the WAL is fsynced only before the log prunes, so the frames
// of every group since may be lost, and its checksums keep only a prefix
// of them); the restart applies the groups again from the log, and the
// replica is where the primary was.
func TestFileSystem_ApplyWALFramesLost(t *testing.T) {
	for _, groups := range []int{1, 3} {
		t.Run(fmt.Sprintf("Groups%d", groups), func(t *testing.T) {
			src, f, w := newFollowingReplica(t, false)
			walPath := filepath.Join(f.DataDir, "dbs", "bank.db", "wal")
			before := len(testingutil.MustReadFile(t, walPath))
			for range groups {
				for range 3 {
					src.step()
				}
				var paths []string
				for _, file := range src.log.Files()[w.applied:] {
					paths = append(paths, filepath.Join(src.log.Dir, file.Name))
				}
				if _, err := f.ApplyFiles(context.Background(), "bank.db", paths, fs.ApplyOptions{}); err != nil {
					t.Fatal(err)
				}
				w.applied = len(src.log.Files())
			}
			if after := len(testingutil.MustReadFile(t, walPath)); after <= before {
				t.Fatalf("the WAL holds %d bytes after the groups, %d before them; want the groups' frames", after, before)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := f.Close(ctx); err != nil {
				t.Fatal(err)
			}
			// The power cut: the groups' frames never reached the disk.
			if err := os.Truncate(walPath, int64(before)); err != nil {
				t.Fatal(err)
			}

			again, logged := restartFS(t, f, true)
			if !strings.Contains(logged.String(), "finished applying the log's last files to the database") {
				t.Fatalf("no word of the groups applied again in the log:\n%s", logged.String())
			}
			if got := again.DB("bank.db").Pos(); got != src.log.Pos() {
				t.Fatalf("after the restart the database is at %s, want %s", got, src.log.Pos())
			}
			backing := filepath.Join(again.DataDir, "dbs", "bank.db", "database")
			if !bytes.Equal(testingutil.MustReadFile(t, backing), testingutil.MustReadFile(t, src.path)) {
				t.Fatal("after the restart the replica's database file differs from the source's")
			}
			r := startStepReader(t, again)
			r.step(t)
			if got, want := r.mustReadLine(t, "saw"), src.blobs(t); got != want {
				t.Fatalf("after the restart a reader sees %d rows in blob, want %d", got, want)
			}
			r.mustExit(t)
		})
	}
}

// TestFileSystem_ApplyWALLogLost: a replica writes a group's frames into
// the WAL while its log fsyncs the group's records (ltx.ApplyOptions.Overlap),
// so a power cut may keep the frames and lose the records, all of the
// group's or the last of them: the database ahead of its log. The restart
// (the machine booted again: a daemon that merely crashed loses nothing
// the page cache held) drops the frames the log does not hold, says so,
// and is where the log is; the primary's files apply again from there,
// and the replica ends where the primary is, byte for byte.
func TestFileSystem_ApplyWALLogLost(t *testing.T) {
	for _, lost := range []int{3, 1} { // of the group's 3 records
		t.Run(fmt.Sprintf("Lost%dOf3", lost), func(t *testing.T) {
			src, f, w := newFollowingReplica(t, false)
			for range 3 {
				src.step()
			}
			files := src.log.Files()
			var paths []string
			for _, file := range files[w.applied:] {
				paths = append(paths, filepath.Join(src.log.Dir, file.Name))
			}
			if len(paths) != 3 {
				t.Fatalf("%d new files on the primary, want 3", len(paths))
			}
			before := files[len(files)-1-lost].Pos()
			if _, err := f.ApplyFiles(context.Background(), "bank.db", paths, fs.ApplyOptions{}); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := f.Close(ctx); err != nil {
				t.Fatal(err)
			}
			// The power cut: the WAL keeps the group's frames, the index
			// of the log's segment loses the last records.
			indexes, err := filepath.Glob(filepath.Join(f.DataDir, "dbs", "bank.db", "ltx", "*.index"))
			if err != nil || len(indexes) == 0 {
				t.Fatalf("no segment index in the replica's log: %v", err)
			}
			index := slices.Max(indexes)
			size := int64(len(testingutil.MustReadFile(t, index)))
			if err := os.Truncate(index, size-int64(lost)*segmentIndexRecord); err != nil {
				t.Fatal(err)
			}
			fs.SetBootID(t, "the boot after the power cut")

			again, logged := restartFS(t, f, true)
			if !strings.Contains(logged.String(), "holds transactions its log lost in a crash") {
				t.Fatalf("no word of the frames dropped in the log:\n%s", logged.String())
			}
			if got := again.DB("bank.db").Pos(); got != before {
				t.Fatalf("after the restart the database is at %s, want %s, where its log is", got, before)
			}
			// The primary sends the files after that position again.
			if _, err := again.ApplyFiles(context.Background(), "bank.db", paths[3-lost:], fs.ApplyOptions{}); err != nil {
				t.Fatal(err)
			}
			if got := again.DB("bank.db").Pos(); got != src.log.Pos() {
				t.Fatalf("after applying again the database is at %s, want %s", got, src.log.Pos())
			}
			r := startStepReader(t, again)
			r.step(t)
			if got, want := r.mustReadLine(t, "saw"), src.blobs(t); got != want {
				t.Fatalf("after the restart a reader sees %d rows in blob, want %d", got, want)
			}
			r.mustExit(t)
			mustMatchSource(t, again, src)
		})
	}
}

// segmentIndexRecord is the size of a record of a segment's index.
const segmentIndexRecord = 56

// newFollowingReplica returns a bank of 30 transactions in WAL mode and a
// replica (kernel locks if kernel) that applied them one at a time as WAL
// frames, with no checkpoint.
func newFollowingReplica(t *testing.T, kernel bool) (*bank, *fs.FileSystem, *follower) {
	t.Helper()
	src := newBank(t, "wal")
	for range 30 {
		src.step()
	}
	f := newReplicaFS(t, kernel)
	f.SetCheckpointFrames(1 << 30)
	w := &follower{f: f, src: src}
	w.applyNew(t, context.Background())
	return src, f, w
}

// restartFS opens the files of the closed filesystem f again, read-only
// if readOnly, and returns it and what it logs.
func restartFS(t *testing.T, f *fs.FileSystem, readOnly bool) (*fs.FileSystem, *testingutil.LockedBuffer) {
	t.Helper()
	logged := &testingutil.LockedBuffer{}
	again := fs.New(f.DataDir, f.MountDir)
	again.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(logged, testingutil.LogWriter(t)), nil))
	again.SetReadOnly(readOnly)
	testingutil.MustOpenFS(t, again)
	return again, logged
}

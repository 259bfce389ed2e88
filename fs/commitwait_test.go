package fs_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// commitWaitTimeout bounds each wait of TestFileSystem_CommitWait.
const commitWaitTimeout = 10 * time.Second

// commitCall is one call of a commit wait.
type commitCall struct {
	db      string
	txid    ltx.TXID
	canFail bool
	release chan error // what the wait returns
}

// TestFileSystem_CommitWait checks that an app's COMMIT returns only once
// the commit wait lets it, with the TXID the log gives the transaction,
// in every journal mode, with and without WAL passthrough (a WAL commit
// is held at its writer's fsync, before SQLite's commit point); and that
// a failed wait fails the COMMIT, with the transaction committed in the
// database and the log as the error says: at the end of a rollback
// journal, and at a WAL fsync, where SQLite leaves the wal-index as it
// was and the daemon has the next connection recover it from the WAL.
func TestFileSystem_CommitWait(t *testing.T) {
	for _, name := range []string{"delete", "truncate", "persist", "wal", "wal-without-passthrough"} {
		t.Run(name, func(t *testing.T) {
			mode := strings.TrimSuffix(name, "-without-passthrough")
			dir := t.TempDir()
			f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
			f.Logger = testingutil.Logger(t)
			f.Passthrough = mode == name
			testingutil.MustOpenFS(t, f)
			db := testingutil.MustOpenSQLite(t, filepath.Join(f.MountDir, "w.db"), mode)
			if _, err := db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)`); err != nil {
				t.Fatal(err)
			}
			// The wait answers the app's FUSE request: it must end, or
			// the request never would. It gives up when the test ends
			// (this cleanup runs before the database and mount close) or
			// after commitWaitTimeout.
			calls := make(chan commitCall)
			ended := make(chan struct{})
			f.SetCommitWait(func(ctx context.Context, name string, txid ltx.TXID, canFail bool) error {
				c := commitCall{name, txid, canFail, make(chan error, 1)}
				timeout := time.NewTimer(commitWaitTimeout)
				defer timeout.Stop()
				select {
				case calls <- c:
				case <-ended:
					return errors.New("the test ended")
				case <-timeout.C:
					return fmt.Errorf("the test took no commit wait for txid %v in %v", txid, commitWaitTimeout)
				}
				select {
				case err := <-c.release:
					return err
				case <-ended:
					return errors.New("the test ended")
				case <-timeout.C:
					return fmt.Errorf("the test did not release the commit wait for txid %v in %v", txid, commitWaitTimeout)
				}
			})
			t.Cleanup(func() { f.SetCommitWait(nil); close(ended) })
			d := f.DB("w.db")
			rollback := mode != "wal"

			commit := func(id int) (commitCall, chan error) {
				t.Helper()
				done := make(chan error, 1)
				go func() {
					_, err := db.Exec(`INSERT INTO t VALUES (?, 'x')`, id)
					done <- err
				}()
				var c commitCall
				select {
				case c = <-calls:
				case err := <-done:
					t.Fatalf("insert %d returned (%v) without waiting", id, err)
				case <-time.After(10 * time.Second):
					t.Fatalf("insert %d: no commit wait in 10s", id)
				}
				if err := d.Flush(); err != nil {
					t.Fatal(err)
				}
				if c.db != "w.db" || c.canFail != rollback {
					t.Fatalf("commit wait called for %q, canFail %v; want w.db, %v", c.db, c.canFail, rollback)
				}
				if pos := d.Log().Pos(); c.txid != pos.TXID {
					t.Fatalf("commit wait for txid %v; the log is at %v", c.txid, pos)
				}
				// The app's commit is held while the wait is.
				select {
				case err := <-done:
					t.Fatalf("insert %d returned (%v) while its commit wait had not", id, err)
				case <-time.After(50 * time.Millisecond):
				}
				return c, done
			}

			var last ltx.TXID
			for id := range 5 {
				c, done := commit(id)
				if last != 0 && c.txid != last+1 {
					t.Fatalf("commit wait for txid %v after %v", c.txid, last)
				}
				last = c.txid
				c.release <- nil
				if err := testingutil.Recv(t, done, commitWaitTimeout, fmt.Sprintf("insert %d to return", id)); err != nil {
					t.Fatalf("insert %d: %v", id, err)
				}
			}
			c, done := commit(100)
			c.release <- errors.New("replicas did not acknowledge")
			err := testingutil.Recv(t, done, commitWaitTimeout, "insert 100 to return")
			if err == nil || !strings.Contains(err.Error(), "disk I/O error") {
				t.Fatalf("insert whose commit wait failed: %v, want a disk I/O error", err)
			}
			if mode == "delete" {
				// The unlink failed, so the journal is still there, for the
				// kernel as for the daemon, with its header zeroed as
				// PERSIST mode commits: not hot.
				hdr, err := os.ReadFile(filepath.Join(f.MountDir, "w.db-journal"))
				if err != nil || len(hdr) < 28 || !bytes.Equal(hdr[:28], make([]byte, 28)) {
					t.Fatalf("journal after its unlink failed: %d bytes, %v; want it there with a zeroed header", len(hdr), err)
				}
			}
			// The next transaction right away, on the same connection: it
			// opens the journal again (in WAL mode it recovers the
			// wal-index first), and fails the same way.
			c2, done := commit(102)
			if c2.txid != c.txid+1 {
				t.Fatalf("commit wait for txid %v after the failed %v", c2.txid, c.txid)
			}
			c2.release <- errors.New("replicas did not acknowledge")
			if err := testingutil.Recv(t, done, commitWaitTimeout, "insert 102 to return"); err == nil || !strings.Contains(err.Error(), "disk I/O error") {
				t.Fatalf("second insert whose commit wait failed: %v, want a disk I/O error", err)
			}
			// The transactions are committed here, as the error says: a
			// new connection, which would roll back a hot journal or
			// recover the WAL, sees them too.
			f.SetCommitWait(nil)
			other := testingutil.MustOpenSQLite(t, filepath.Join(f.MountDir, "w.db"), mode)
			for _, conn := range []*sql.DB{other, db} {
				var n int
				if err := conn.QueryRow(`SELECT count(*) FROM t WHERE id IN (100, 102)`).Scan(&n); err != nil || n != 2 {
					t.Fatalf("rows of the failed commits: count %d, %v; want 2", n, err)
				}
			}
			c.txid = c2.txid
			if _, err := db.Exec(`INSERT INTO t VALUES (101, 'y')`); err != nil {
				t.Fatalf("insert after a failed commit: %v", err)
			}
			if err := d.Flush(); err != nil { // WAL transactions are written to the log by a worker
				t.Fatal(err)
			}
			if pos := d.Log().Pos(); pos.TXID != c.txid+1 {
				t.Fatalf("log at %v after the failed commit %v and one more, want txid %v", pos, c.txid, c.txid+1)
			}
			if !rollback {
				// Everything into the database file, to compare it with
				// the log.
				var busy, frames, done int
				if err := db.QueryRow(`PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &frames, &done); err != nil || busy != 0 {
					t.Fatalf("checkpoint: busy %d, %v", busy, err)
				}
			}
			table, err := ltx.ReadChecksumTable(filepath.Join(f.DataDir, "dbs", "w.db", "database"))
			if err != nil {
				t.Fatal(err)
			}
			if got, want := table.Checksum(), d.Log().Pos().PostApplyChecksum; got != want {
				t.Fatalf("database checksum %v, log position checksum %v", got, want)
			}
		})
	}
}

// TestFileSystem_CommitWaitInterrupted interrupts a writer process whose
// COMMIT waits in the commit wait, with SIGKILL or with a signal it
// handles (SIGUSR1), in DELETE and WAL mode. A killed writer dies at
// once, its wait canceled, where it used to wait until the wait ended.
// A handled signal fails a rollback-journal COMMIT with an I/O error (the
// transaction committed here, as after a timeout), and never lets a WAL
// COMMIT return before the wait does: there SQLite would take any error
// for success.
func TestFileSystem_CommitWaitInterrupted(t *testing.T) {
	for _, tc := range []struct {
		mode string
		sig  syscall.Signal
	}{{"delete", syscall.SIGKILL}, {"delete", syscall.SIGUSR1}, {"wal", syscall.SIGKILL}, {"wal", syscall.SIGUSR1}} {
		t.Run(tc.mode+"-"+unix.SignalName(tc.sig), func(t *testing.T) {
			dir := t.TempDir()
			f := fs.New(filepath.Join(dir, "data"), filepath.Join(dir, "mnt"))
			f.Logger = testingutil.Logger(t)
			testingutil.MustOpenFS(t, f)
			path := filepath.Join(f.MountDir, "w.db")
			db := testingutil.MustOpenSQLite(t, path, tc.mode)
			if _, err := db.Exec(crashSchema); err != nil {
				t.Fatal(err)
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			waits := make(chan context.Context, 1) // the first wait's
			release := make(chan struct{})         // closed: every wait returns nil
			f.SetCommitWait(func(ctx context.Context, _ string, txid ltx.TXID, _ bool) error {
				select {
				case waits <- ctx:
				default:
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-release:
					return nil
				case <-time.After(commitWaitTimeout):
					return fmt.Errorf("the test did not release the commit wait for txid %v in %v", txid, commitWaitTimeout)
				}
			})
			var once sync.Once
			releaseAll := func() { once.Do(func() { close(release) }) }
			t.Cleanup(func() { f.SetCommitWait(nil); releaseAll() })

			c := startChild(t, "writer", path, tc.mode, "100")
			c.mustReadLine(t, "ready")
			seq := c.mustReadLine(t, "begin")
			ctx := testingutil.Recv(t, waits, commitWaitTimeout, "the writer's COMMIT to reach the commit wait")
			pid := c.cmd.Process.Pid
			tid := committingThread(t, pid)
			if err := unix.Tgkill(pid, tid, tc.sig); err != nil {
				t.Fatal(err)
			}

			exited := func(within time.Duration) bool {
				select {
				case <-c.done:
					return true
				case <-time.After(within):
					return false
				}
			}
			canceled := func(within time.Duration) bool {
				if ctx.Err() != nil {
					return true
				}
				select {
				case <-ctx.Done():
					return true
				case <-time.After(within):
					return false
				}
			}
			switch {
			case tc.sig == syscall.SIGKILL:
				if !exited(10 * time.Second) {
					t.Fatalf("the writer, killed while its COMMIT waited, still runs 10s later")
				}
				if !canceled(5 * time.Second) {
					t.Fatal("the commit wait of a killed writer goes on")
				}
			case tc.mode == "delete":
				if !exited(10 * time.Second) {
					t.Fatalf("the writer, interrupted while its COMMIT waited, still runs 10s later")
				}
				if !strings.Contains(c.stderr.String(), fmt.Sprintf("commit %d: disk I/O error", seq)) {
					t.Fatalf("the interrupted writer said %q, want its commit %d failed with a disk I/O error", c.stderr.String(), seq)
				}
				if !canceled(0) {
					t.Fatal("the writer's COMMIT failed, but its commit wait was not canceled")
				}
				// Committed here, as the error says: a new connection,
				// which would roll back a hot journal, sees the row.
				r := testingutil.MustOpenSQLite(t, path, tc.mode)
				var n int
				if err := r.QueryRow(`SELECT count(*) FROM t WHERE seq = ?`, seq).Scan(&n); err != nil || n != 1 {
					t.Fatalf("row %d of the interrupted commit: count %d, %v; want 1", seq, n, err)
				}
			default:
				// A WAL commit cannot fail where it waits: a signal that
				// does not kill changes nothing.
				if exited(500*time.Millisecond) || canceled(0) {
					t.Fatalf("the writer's WAL COMMIT ended (exited: %v) at a signal it handles, want it to wait on\n%s", c.err, c.stderr.String())
				}
				releaseAll()
				if got := c.mustReadLine(t, "ack"); got != seq {
					t.Fatalf("the writer acknowledged %d, want %d", got, seq)
				}
				return
			}
			for line := range c.lines {
				if strings.HasPrefix(line, "ack ") {
					t.Fatalf("the interrupted writer said %q, want no COMMIT acknowledged", line)
				}
			}
		})
	}
}

// committingThread returns the thread of process pid that is in the system
// call that commits (a rollback journal's unlink, the unlock or sync of a
// WAL), waiting for the mount.
func committingThread(t *testing.T, pid int) int {
	t.Helper()
	committing := map[string]bool{"87": true, "263": true, "72": true, "74": true, "75": true} // x86-64: unlink, unlinkat, fcntl, fsync, fdatasync
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/syscall", pid, task.Name()))
		if err != nil {
			continue
		}
		nr, _, _ := strings.Cut(strings.TrimSpace(string(b)), " ")
		if committing[nr] {
			tid, err := strconv.Atoi(task.Name())
			if err != nil {
				t.Fatal(err)
			}
			return tid
		}
		seen = append(seen, task.Name()+": "+nr)
	}
	t.Fatalf("no thread of process %d is in a system call that commits; threads and their system calls: %v", pid, seen)
	return 0
}

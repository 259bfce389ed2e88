package fs_test

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// journalModes are the journal modes SQLite uses in production.
var journalModes = []string{"delete", "truncate", "persist", "wal"}

// passthroughKernel reports whether the kernel has FUSE passthrough
// (Linux 6.9 and later; the tests run as root).
func passthroughKernel(tb testing.TB) bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		tb.Fatal(err)
	}
	var major, minor int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor); err != nil {
		tb.Fatalf("kernel release %q: %v", unix.ByteSliceToString(u.Release[:]), err)
	}
	return major > 6 || major == 6 && minor >= 9
}

// dataVersion returns PRAGMA data_version on conn, which changes exactly
// when another connection has committed a transaction since it was last
// read.
func dataVersion(tb testing.TB, conn *sql.Conn) int64 {
	tb.Helper()
	var v int64
	if err := conn.QueryRowContext(context.Background(), `PRAGMA data_version`).Scan(&v); err != nil {
		tb.Fatal(err)
	}
	return v
}

// checkLog asserts that the log of db verifies, that a database rebuilt
// from the log alone is byte-identical to the backing file, and that
// SQLite finds the database intact.
func checkLog(tb testing.TB, fsys *fs.FileSystem, name string, sqldb *sql.DB, wal bool) {
	tb.Helper()
	if err := fsys.DB(name).Flush(); err != nil {
		tb.Fatal(err)
	}
	if wal {
		var busy, logFrames, ckpt int
		if err := sqldb.QueryRow(`PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &logFrames, &ckpt); err != nil {
			tb.Fatal(err)
		} else if busy != 0 {
			tb.Fatalf("checkpoint busy")
		}
	}
	var ok string
	if err := sqldb.QueryRow(`PRAGMA integrity_check`).Scan(&ok); err != nil {
		tb.Fatal(err)
	} else if ok != "ok" {
		tb.Fatalf("integrity_check: %s", ok)
	}
	d := fsys.DB(name)
	logDir := d.Log().Dir
	if r, err := ltx.VerifyDir(logDir); err != nil {
		tb.Fatal(err)
	} else if len(r.Problems) > 0 {
		tb.Fatalf("log verify: %v", r.Problems)
	}
	restored := filepath.Join(tb.TempDir(), "restored.db")
	pos, err := d.Log().Restore(context.Background(), restored)
	if err != nil {
		tb.Fatal(err)
	}
	if got, want := pos, d.Log().Pos(); got != want {
		tb.Fatalf("restored to %s, want %s", got, want)
	}
	backing := filepath.Join(fsys.DataDir, "dbs", name, "database")
	if got, want := testingutil.FileSHA256(tb, restored), testingutil.FileSHA256(tb, backing); got != want {
		a, b := testingutil.MustReadFile(tb, restored), testingutil.MustReadFile(tb, backing)
		var diff []int
		for i := 0; i < min(len(a), len(b))/4096; i++ {
			if string(a[i*4096:(i+1)*4096]) != string(b[i*4096:(i+1)*4096]) {
				diff = append(diff, i+1)
			}
		}
		tb.Fatalf("database rebuilt from the log differs from the backing file at %s: sizes %d, %d; pages %v", pos, len(a), len(b), diff)
	}
}

func TestCapture_Workload(t *testing.T) {
	// The variants keep the -shm passed through: this process opens the
	// database through the mount it serves, and SQLite maps the -shm; a
	// page fault on a -shm served by this process could wait on a FUSE
	// request that no thread of it is free to serve (see
	// TestCapture_WALIndexInPageCache for a -shm served by the daemon).
	type variant struct {
		name, mode  string
		passthrough bool // fs.passthrough: the WAL written by the kernel
		kernelLocks bool // the daemon sees no lock: the WAL's commits are found by scans
	}
	var variants []variant
	for _, mode := range journalModes {
		variants = append(variants, variant{mode, mode, true, false})
	}
	variants = append(variants,
		variant{"wal-without-passthrough", "wal", false, false},
		variant{"wal-kernel-locks", "wal", true, true},
		variant{"wal-without-passthrough-kernel-locks", "wal", false, true})
	for _, v := range variants {
		mode, kernelLocks := v.mode, v.kernelLocks
		t.Run(v.name, func(t *testing.T) {
			fsys := fs.New(filepath.Join(t.TempDir(), "data"), filepath.Join(t.TempDir(), "mnt"))
			fsys.Logger = testingutil.Logger(t)
			fsys.Passthrough = v.passthrough
			fsys.KernelLocks = v.kernelLocks
			testingutil.MustOpenFS(t, fsys)
			path := filepath.Join(fsys.MountDir, "app.db")
			db := testingutil.MustOpenSQLite(t, path, mode)

			watcher := testingutil.MustOpenSQLite(t, path, mode)
			conn, err := watcher.Conn(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = conn.Close() }()

			w := testingutil.NewWorkload(db, 1)
			if err := w.Init(); err != nil {
				t.Fatal(err)
			}
			log := fsys.DB("app.db")
			const batches, steps = 4, 250
			for b := 0; b < batches; b++ {
				for i := 0; i < steps; i++ {
					before, v := log.Pos().TXID, dataVersion(t, conn)
					start := time.Now().Truncate(time.Millisecond)
					what, err := w.Step()
					if err != nil {
						t.Fatalf("step %d (%s): %v", i, what, err)
					}
					end := time.Now()
					committed := dataVersion(t, conn) != v
					got := log.Pos().TXID - before
					if committed && got != 1 || !committed && got != 0 {
						t.Fatalf("step %d (%s): committed=%v, got %d LTX files", b*steps+i, what, committed, got)
					}
					if kernelLocks {
						// Found by a scan, at the latest when the
						// position was read.
						end = time.Now()
					}
					if committed {
						files := log.Log().Files()
						if ts := files[len(files)-1].Header.Timestamp; ts < start.UnixMilli() || ts > end.UnixMilli() {
							t.Fatalf("step %d (%s): LTX timestamp %d outside the transaction [%d, %d]", b*steps+i, what, ts, start.UnixMilli(), end.UnixMilli())
						}
					}
				}
				checkLog(t, fsys, "app.db", db, mode == "wal")
			}
			if mode == "wal" {
				if got, want := log.WALPassthrough(), v.passthrough && passthroughKernel(t); got != want {
					t.Fatalf("WAL written by passthrough: %v, want %v", got, want)
				}
			}
			t.Logf("%s: %d transactions in the log", v.name, log.Pos().TXID)
		})
	}
}

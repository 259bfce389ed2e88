package main

import (
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/fusectl"
	"github.com/meridian-db/meridian/internal/testingutil"
)

// TestRun_MountEndedFromOutside ends a node's mount from outside while an
// app has a database open on it, by aborting its FUSE connection or by
// unmounting it lazily: the node says so, and on SIGTERM it exits cleanly
// (status 0, no mount left) instead of waiting for an unmount that can
// never happen.
func TestRun_MountEndedFromOutside(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"abort", "unmount"} {
		t.Run(how, func(t *testing.T) {
			c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad)
			n := c.Node(iad.Name)
			n.Start(t)
			db := testingutil.MustOpenSQLite(t, filepath.Join(n.MountDir, "app.db"), "wal")
			if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
				t.Fatal(err)
			}
			m, ok, err := fusectl.At(n.MountDir)
			if err != nil || !ok {
				t.Fatalf("the node's mount: %v, %v", ok, err)
			}
			switch how {
			case "abort":
				if err := fusectl.Abort(m.Conn); err != nil {
					t.Fatal(err)
				}
				waitLog(t, n, "the mount ended: unmounted or its FUSE connection aborted from outside")
				if err := statfs(n.MountDir); !fusectl.IsDead(err) {
					t.Fatalf("statfs on the aborted mount: %v, want ENOTCONN", err)
				}
			case "unmount":
				if err := syscall.Unmount(n.MountDir, syscall.MNT_DETACH); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			if err := n.Stop(); err != nil {
				t.Fatalf("stop the node: %v\n%s", err, n.LogTail(8<<10))
			}
			t.Logf("exited %v after SIGTERM", time.Since(start).Round(time.Millisecond))
			want := map[string]string{
				"abort":   "the mount had ended already",
				"unmount": "the mount was unmounted from outside: ending its FUSE connection",
			}[how]
			if !strings.Contains(n.Log(), want) {
				t.Fatalf("the node did not log %q:\n%s", want, n.LogTail(8<<10))
			}
		})
	}
}

// TestRun_DeadMountAtStart starts a node on the mount point of one killed
// with SIGKILL, whose dead mount is still there: the new node unmounts it,
// saying so, and serves the databases as before. A live mount at the
// mount point is refused.
func TestRun_DeadMountAtStart(t *testing.T) {
	t.Parallel()
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, iad)
	n := c.Node(iad.Name)
	n.Start(t)
	db := testingutil.MustOpenSQLite(t, filepath.Join(n.MountDir, "app.db"), "delete")
	if _, err := db.Exec(`CREATE TABLE t (x); INSERT INTO t VALUES (42)`); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	n.Crash(t)
	if err := statfs(n.MountDir); !fusectl.IsDead(err) {
		t.Fatalf("statfs on the killed node's mount: %v, want ENOTCONN", err)
	}
	n.Start(t)
	if !strings.Contains(n.Log(), "mount_dir is a dead FUSE mount, left by a daemon that is gone: unmounting it") {
		t.Fatalf("the node did not say it unmounted the dead mount:\n%s", n.LogTail(8<<10))
	}
	db = testingutil.MustOpenSQLite(t, filepath.Join(n.MountDir, "app.db"), "delete")
	var x int
	if err := db.QueryRow(`SELECT x FROM t`).Scan(&x); err != nil || x != 42 {
		t.Fatalf("row after the restart: %d, %v; want 42", x, err)
	}
	_ = db.Close()

	// A second node on the same, live, mount point is refused.
	code, stderr := exitStatus(t, "run", "-config", n.Config)
	if code != 1 || !strings.Contains(stderr, "already a FUSE mount") || !strings.Contains(stderr, "that answers") {
		t.Fatalf("a second regiond on a live mount: exit %d, %q; want 1 and an error naming the mount", code, stderr)
	}
}

// statfs returns the error of statfs(2) on dir: unlike stat, which the
// kernel may answer from its cache, it always asks the FUSE server.
func statfs(dir string) error {
	var st syscall.Statfs_t
	return syscall.Statfs(dir, &st)
}

// waitLog waits until the node has logged want, for 10 s at most.
func waitLog(t *testing.T, n *testingutil.ClusterNode, want string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(n.Log(), want); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not log %q in 10s:\n%s", n.Name, want, n.LogTail(8<<10))
		}
	}
}

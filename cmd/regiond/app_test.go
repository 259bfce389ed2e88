package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
)

// appNode returns a one-node cluster whose regiond runs script (sh -c) as
// its app.
func appNode(t *testing.T, script string) *testingutil.ClusterNode {
	t.Helper()
	spec := iad
	spec.App = []string{"sh", "-c", script}
	c := testingutil.NewCluster(t, regiondCommand, iad.Name, spec)
	return c.Node(iad.Name)
}

// waitFile waits until path holds a line containing want.
func waitFile(t *testing.T, path, want string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: got %q within 20s, want a line with %q", path, b, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRun_App runs an app as regiond's child: it starts once the mount
// is writable, with the MERIDIAN_* variables; regiond exits with its
// status; signals reach it; and it dies with regiond.
func TestRun_App(t *testing.T) {
	t.Run("EnvAndExitStatus", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "env")
		n := appNode(t, `sqlite3 "$MERIDIAN_DB" "CREATE TABLE t (x); INSERT INTO t VALUES (42)" && env | grep -E '^MERIDIAN_(ADMIN_URL|DB|LISTEN|MOUNT_DIR|NODE|PRIMARY|REGION|ROLE|ROUTER_URL)=' | sort > `+out+`; exit 7`)
		n.Start(t)
		err := n.Wait(t, 30*time.Second)
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 7 {
			t.Fatalf("regiond ended with %v, want exit status 7, the app's\n%s", err, n.LogTail(4<<10))
		}
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatalf("the app did not run to its end (the sqlite3 write failed?): %v\n%s", err, n.LogTail(4<<10))
		}
		want := strings.Join([]string{
			"MERIDIAN_ADMIN_URL=http://" + n.Admin,
			"MERIDIAN_DB=" + filepath.Join(n.MountDir, "app.db"),
			"MERIDIAN_LISTEN=" + n.AppAddr,
			"MERIDIAN_MOUNT_DIR=" + n.MountDir,
			"MERIDIAN_NODE=iad-1",
			"MERIDIAN_PRIMARY=iad-1",
			"MERIDIAN_REGION=iad",
			"MERIDIAN_ROLE=primary",
			"MERIDIAN_ROUTER_URL=http://" + n.Router,
		}, "\n") + "\n"
		if string(b) != want {
			t.Fatalf("the app's environment:\n%s\nwant:\n%s", b, want)
		}
		if !strings.Contains(n.Log(), "unmounted") {
			t.Fatalf("regiond did not unmount after the app exited:\n%s", n.LogTail(4<<10))
		}
		// The app's write is in the database, and in its log.
		var x int
		if err := testingutil.MustOpenSQLite(t, n.BackingFile("app.db"), "delete").QueryRow(`SELECT x FROM t`).Scan(&x); err != nil || x != 42 {
			t.Fatalf("the app's row: %d, %v; want 42", x, err)
		}
		stdout, _, err := run(t, "ltx", "ls", filepath.Join(n.DataDir, "dbs", "app.db", "ltx"))
		if err != nil || !strings.Contains(stdout, "0000000000000002") {
			t.Fatalf("regiond ltx ls: %v\n%s; want the app's two transactions", err, stdout)
		}
	})
	t.Run("Signals", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "signals")
		n := appNode(t, `trap 'echo usr1 >> `+out+`' USR1; trap 'echo term >> `+out+`; exit 0' TERM; echo started >> `+out+`; while :; do sleep 0.02; done`)
		n.Start(t)
		waitFile(t, out, "started")
		n.Signal(t, syscall.SIGUSR1)
		waitFile(t, out, "usr1")
		if err := n.Stop(); err != nil {
			t.Fatalf("stop: %v\n%s", err, n.LogTail(4<<10))
		}
		if got := waitFile(t, out, "term"); got != "started\nusr1\nterm\n" {
			t.Fatalf("the app saw %q, want started, usr1, term, each once", got)
		}
	})
	t.Run("DiesWithRegiond", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "pid")
		n := appNode(t, `echo $$ > `+out+`.tmp && mv `+out+`.tmp `+out+`; while :; do sleep 0.02; done`)
		n.Start(t)
		pid, err := strconv.Atoi(strings.TrimSpace(waitFile(t, out, "")))
		for err != nil || pid == 0 {
			time.Sleep(20 * time.Millisecond)
			pid, err = strconv.Atoi(strings.TrimSpace(waitFile(t, out, "")))
		}
		n.Kill(t)
		deadline := time.Now().Add(10 * time.Second)
		for syscall.Kill(pid, 0) == nil {
			if time.Now().After(deadline) {
				syscall.Kill(pid, syscall.SIGKILL)
				t.Fatalf("the app (pid %d) still runs 10s after regiond was killed", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

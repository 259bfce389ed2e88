//go:build hangcheck

package fs_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// TestHang wedges on purpose, as a broken test would: an app's COMMIT on
// the test's own mount waits in a FUSE request that the filesystem never
// answers, and nothing gives up. A process that ends like this cannot
// exit by itself: the request was read by a server thread that dies with
// it. scripts/hang-check runs it (`make test-hang-check`; `make test`
// never builds it) and asserts that the run still fails within its bound
// and leaves no mount and no process behind, whether the test binary's
// own -timeout, the bounded run, or a SIGKILL from outside ends it.
//
// It also starts two children: one as every test should (it dies with the
// test binary), and one that escapes that (a session of its own, no death
// signal), which the harness's guard must kill.
func TestHang(t *testing.T) {
	f := testingutil.MustMount(t)
	sleeper := testingutil.Command(t, time.Hour, "sleep", "3600")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	escaper := exec.Command("setsid", "sleep", "3601")
	if err := escaper.Start(); err != nil {
		t.Fatal(err)
	}
	db := testingutil.MustOpenSQLite(t, filepath.Join(f.MountDir, "hang.db"), "delete")
	if _, err := db.Exec(`CREATE TABLE t (x)`); err != nil {
		t.Fatal(err)
	}
	f.SetCommitWait(func(ctx context.Context, name string, txid ltx.TXID, canFail bool) error {
		fmt.Fprintf(os.Stderr, "hangcheck: holding the FUSE request that commits txid %v of %s, forever\n", txid, name)
		select {} // never answered
	})
	_, err := db.Exec(`INSERT INTO t VALUES (1)`)
	t.Fatalf("the commit returned (%v): it was meant to hang", err)
}

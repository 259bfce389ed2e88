package ltx_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/ltx"
)

// TestLog_Commit_DiskFull fills the volume under a log (a 256 KiB tmpfs)
// and checks that the commit that does not fit fails saying the volume is
// full, leaves the log as it was (position, files, no temporary file), and
// that commits go on once there is room again.
func TestLog_Commit_DiskFull(t *testing.T) {
	mnt := mountTmpfs(t, "256k")

	d := newFakeDBAt(t, t.TempDir(), filepath.Join(mnt, "ltx"), 31)

	var full error
	for i := 0; i < 1000 && full == nil; i++ {
		pgnos := d.step()
		state := dirState(t, mnt)
		pos := d.log.Pos()
		_, full = d.log.Commit(context.Background(), ltx.Tx{
			DB: bytes.NewReader(d.data), PageSize: d.pageSize, Commit: uint32(len(d.data)) / d.pageSize, Pgnos: pgnos, Timestamp: t0,
		})
		if full != nil {
			if !errors.Is(full, syscall.ENOSPC) || !strings.Contains(full.Error(), "the volume is full") || !strings.Contains(full.Error(), "nothing was added to the log") {
				t.Fatalf("commit on a full volume: err = %v", full)
			}
			if d.log.Pos() != pos {
				t.Fatalf("failed commit moved the log from %s to %s", pos, d.log.Pos())
			}
			assertDirState(t, mnt, state) // no temporary file, nothing changed
		}
	}
	if full == nil {
		t.Fatal("the volume never filled")
	}

	// Make room: prune what is not needed, then commit again.
	if n, err := d.log.Prune(context.Background(), d.log.Pos().TXID, t0.Add(time.Hour)); err != nil || n == 0 {
		t.Fatalf("prune: %d files, %v", n, err)
	}
	if _, err := d.log.Commit(context.Background(), ltx.Tx{
		DB: bytes.NewReader(d.data), PageSize: d.pageSize, Commit: uint32(len(d.data)) / d.pageSize, Pgnos: []uint32{2}, Timestamp: t0,
	}); err != nil {
		t.Fatalf("commit after making room: %v", err)
	}
}

// mountTmpfs mounts a tmpfs of size on a new directory, unmounted when tb
// ends, and returns the directory.
func mountTmpfs(tb testing.TB, size string) string {
	tb.Helper()
	mnt := tb.TempDir()
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size="+size); err != nil {
		tb.Fatalf("mount a tmpfs for the log (the tests run as root): %v", err)
	}
	tb.Cleanup(func() {
		if err := syscall.Unmount(mnt, 0); err != nil {
			tb.Errorf("unmount %s: %v", mnt, err)
		}
	})
	return mnt
}

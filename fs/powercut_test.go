package fs_test

import (
	"math/rand/v2"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// powerCutRounds is how many power failures TestCrash_PowerCut makes in
// each journal mode.
const powerCutRounds = 12

// powerCutBlob is the size of the rows of TestCrash_PowerCut: small, so
// that several transactions commit between checkpoints and several LTX
// files are unsynced at a time.
const powerCutBlob = 256

// TestCrash_PowerCut cuts the power under an app committing with
// synchronous=FULL (checkpointing often, in WAL mode): the daemon empties
// every LTX file it has not fsynced, as a power failure may, and dies at
// once; in every other round the newest of them keeps its content, so
// that an empty file is followed by a whole one. The daemon must come back up on what is left, with no transaction
// SQLite committed missing from the log (in WAL mode it rebuilds the lost
// files from the WAL, which a checkpoint never gets ahead of), and the log
// must hold one LTX file per committed transaction and rebuild the
// database byte for byte.
func TestCrash_PowerCut(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"wal", "delete"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			seed := uint64(time.Now().UnixNano())
			rng := rand.New(rand.NewPCG(seed, 4))
			d, path, dbDir, schemaTXID := newCrashDaemon(t, mode, true)

			var rows rowState
			var st crashStats
			emptied, cutRounds, keptRounds := 0, 0, 0
			for round := range powerCutRounds {
				d.start(t)
				w := startChild(t, "writer", path, mode, strconv.Itoa(powerCutBlob))
				ready := w.mustReadLine(t, "ready")
				time.Sleep(time.Duration(20+rng.IntN(180)) * time.Millisecond)
				n, kept := d.powerCut(t, round%2 == 1)
				emptied += n
				if n > 0 {
					cutRounds++
				}
				if kept > 0 {
					keptRounds++
				}
				if err := w.kill(); err != nil {
					t.Fatal(err)
				}
				run := w.writerRun(t, ready)

				d.start(t)
				db := testingutil.MustOpenSQLite(t, path, mode)
				last := rows.check(t, db, run, powerCutBlob, &st)
				if mode == "wal" {
					checkpoint(t, db)
				}
				_ = db.Close()
				stderr := d.stop(t)
				if got, want := verifyStopped(t, dbDir).TXID-schemaTXID, ltx.TXID(last); got != want {
					t.Fatalf("round %d (%d LTX files emptied, seed %d): got %d LTX files after the schema, want %d, one per committed transaction\ndaemon log after restart:\n%s",
						round, n, seed, got, want, stderr)
				}
			}
			t.Logf("%s: %d power cuts, %d of them emptied %d LTX files in all, %d kept a later file whole; %d with a transaction in flight (%d of those committed); %d rows (seed %d)",
				mode, powerCutRounds, cutRounds, emptied, keptRounds, st.inFlight, st.inFlightCommitted, rows.max, seed)
			if mode == "wal" && (emptied == 0 || keptRounds == 0) {
				t.Fatalf("%d power cuts emptied an LTX file, %d kept a later one whole: the WAL rebuild was not exercised in both ways (seed %d)", cutRounds, keptRounds, seed)
			}
		})
	}
}

// powerCut has the daemon cut the power (see powerCut in main_test.go),
// keeping the newest unsynced LTX file whole if keepNewest, removes its
// dead mount, and returns how many LTX files it emptied and kept.
func (d *daemon) powerCut(t *testing.T, keepNewest bool) (emptied, kept int) {
	t.Helper()
	p := d.proc
	sig := syscall.SIGUSR1
	if keepNewest {
		sig = syscall.SIGUSR2
	}
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	emptied = int(p.mustReadLine(t, "cut"))
	kept = int(p.mustReadLine(t, "kept"))
	p.mustKill(t)
	d.proc = nil
	if err := syscall.Unmount(d.mnt, syscall.MNT_DETACH); err != nil {
		t.Fatalf("unmount the dead mount %s: %v", d.mnt, err)
	}
	return emptied, kept
}

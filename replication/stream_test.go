package replication_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
	"github.com/meridian-db/meridian/replication/internal/repltest"
)

// cluster is a primary's Streamer and one replica's Client joined by
// in-memory pipes, one per stream.
type cluster struct {
	tb       testing.TB
	primary  *repltest.Primary
	streamer *replication.Streamer
	epoch    atomic.Uint64
	target   *repltest.Target

	mu      sync.Mutex
	filter  func(*meridianv1.StreamResponse) // applied to the next stream only
	serveWG sync.WaitGroup
}

func newCluster(tb testing.TB) *cluster {
	c := &cluster{tb: tb, primary: repltest.NewPrimary(tb), target: repltest.NewTarget(tb)}
	c.epoch.Store(1)
	c.streamer = replication.NewStreamer(c.primary, "iad-1", c.epoch.Load, tb.TempDir())
	c.streamer.HeartbeatInterval = 20 * time.Millisecond
	c.streamer.SnapshotInterval = 0 // TestStream_SnapshotRateLimited tests it
	c.streamer.Logger = testingutil.Logger(tb)
	tb.Cleanup(func() {
		repltest.WaitGroup(tb, &c.serveWG, "the streams' Serve calls to return once their replicas stopped")
	})
	return c
}

// client returns a replica client on the cluster's target.
func (c *cluster) client() *replication.Client {
	cl := replication.NewClient("fra-1", "fra", c.target, c.tb.TempDir())
	cl.MinBackoff, cl.MaxBackoff = time.Millisecond, 10*time.Millisecond
	cl.Logger = testingutil.Logger(c.tb)
	return cl
}

// dial opens a stream to the Streamer.
func (c *cluster) dial(ctx context.Context) (replication.ClientConn, error) {
	p := newPipe()
	c.mu.Lock()
	filter := c.filter
	c.filter = nil
	c.mu.Unlock()
	served := make(chan error, 1)
	c.serveWG.Add(1)
	go func() {
		defer c.serveWG.Done()
		err := c.streamer.Serve(ctx, primaryEnd{p, ctx}, "fra-1")
		p.close()
		served <- err
	}()
	return replicaEnd{pipe: p, ctx: ctx, filter: filter, served: served}, nil
}

// run runs a client until the test ends or stop is called.
func (c *cluster) run(cl *replication.Client) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = cl.Run(ctx, c.dial)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			repltest.WaitClosed(c.tb, done, "the replica's Run to return once its context was canceled")
		})
	}
	c.tb.Cleanup(stop)
	return stop
}

// waitSynced waits until the replica has every database of the primary at
// the primary's position, then checks the files are byte-identical and
// sound.
func (c *cluster) waitSynced() {
	c.tb.Helper()
	repltest.WaitSynced(c.tb, c.primary, c.target)
}

func (c *cluster) snapshots() []replication.SnapshotReason { return c.target.SnapshotReasons() }

func TestStream_Converges(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.primary.Create("b.db", 2)
	c.primary.Steps("a.db", 100)
	c.primary.Steps("b.db", 50)
	c.run(c.client())
	var wg sync.WaitGroup
	wg.Go(func() { c.primary.Steps("a.db", 200) })
	wg.Go(func() { c.primary.Steps("b.db", 200) })
	repltest.WaitGroup(t, &wg, "the transactions committed while streaming")
	c.primary.Create("c.db", 3) // created while streaming
	// Its first transaction reaches the replica before the next: had
	// the log grown past the database's size first, a snapshot would
	// have been cheaper.
	for deadline := time.Now().Add(repltest.WaitTimeout); c.target.Pos("c.db").TXID == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("c.db did not reach the replica in %v", repltest.WaitTimeout)
		}
	}
	c.primary.Steps("c.db", 20)
	c.waitSynced()

	// The databases the replica lacked at the start, whose logs hold
	// more than they do, came whole, as a snapshot; the one created
	// while streaming came as its log, from its first transaction (a
	// file of TXID 1, which holds every page). Then every file after
	// that once, in order.
	if got, want := c.target.Count(), c.target.WantApplied(c.primary); got != want {
		t.Fatalf("replica applied %d files, want %d: a snapshot or the first file of each database and the files after it", got, want)
	}
	noPos, none := replication.SnapshotNoPosition, replication.NoSnapshot
	if got := c.snapshots(); !slices.Equal(slices.Sorted(slices.Values(got)), []replication.SnapshotReason{none, noPos, noPos}) {
		t.Fatalf("files of TXID 1 applied, by snapshot reason: %v, want a snapshot of a.db and b.db for lack of a position, then c.db's first transaction", got)
	}
	if got, want := c.target.CountOf("c.db"), len(c.primary.Log("c.db").Files()); got != want {
		t.Fatalf("replica applied %d files of c.db, want its log's %d", got, want)
	}
	// The primary knows where the replica is.
	reps := c.streamer.Replicas()
	if len(reps) != 1 || reps[0].Node != "fra-1" || reps[0].Region != "fra" || !reps[0].Connected {
		t.Fatalf("primary's replicas: %+v", reps)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, name := range c.primary.DBs() {
		for c.streamer.Replicas()[0].Acked[name] != c.primary.Log(name).Pos() {
			if time.Now().After(deadline) {
				t.Fatalf("primary has %s acked at %s, want %s", name, c.streamer.Replicas()[0].Acked[name], c.primary.Log(name).Pos())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestStream_NewDatabases creates databases while a replica streams, each
// first with an empty log for a moment, as the mount has one between a
// database's creation and its first commit: each reaches the replica
// through the stream it has open, from its first transaction, with no
// snapshot and no reconnect.
func TestStream_NewDatabases(t *testing.T) {
	c := newCluster(t)
	cl := c.client()
	c.run(cl)
	const n = 50
	for i := range n {
		name := fmt.Sprintf("new-%02d.db", i)
		d := c.primary.Register(name, uint64(i))
		time.Sleep(2 * time.Millisecond) // the stream finds the log empty
		c.primary.Write(name, d.Work.Init)
		c.primary.Steps(name, 1+i%3)
	}
	c.waitSynced()
	if got := len(c.primary.DBs()); got != n {
		t.Fatalf("primary has %d databases, want %d", got, n)
	}
	for _, name := range c.primary.DBs() {
		if got, want := c.target.CountOf(name), len(c.primary.Log(name).Files()); got != want {
			t.Fatalf("replica applied %d files of %s, want its log's %d", got, name, want)
		}
	}
	none := replication.NoSnapshot
	if got := c.snapshots(); len(got) != n || slices.ContainsFunc(got, func(r replication.SnapshotReason) bool { return r != none }) {
		t.Fatalf("files of TXID 1 applied, by snapshot reason: %v, want %d first transactions and no snapshot", got, n)
	}
	if r := cl.Status().Reconnects; r != 0 {
		t.Fatalf("the replica reconnected %d times, want 0", r)
	}
}

func TestStream_Resume(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.primary.Steps("a.db", 50)
	stop := c.run(c.client())
	c.waitSynced()
	stop()
	applied, files := c.target.Count(), len(c.primary.Log("a.db").Files())
	c.primary.Steps("a.db", 70)
	newFiles := len(c.primary.Log("a.db").Files()) - files
	if newFiles < 60 {
		t.Fatalf("70 random transactions made %d LTX files", newFiles)
	}

	// A new client (a restarted replica) resumes from the target's
	// position: the new files, no snapshot, no duplicate.
	cl := c.client()
	c.run(cl)
	c.waitSynced()
	if got := c.target.Count() - applied; got != newFiles {
		t.Fatalf("after restart the replica applied %d files, want the %d new ones", got, newFiles)
	}
	if got := c.snapshots(); len(got) != 1 {
		t.Fatalf("snapshots applied: %v, want only the first, for lack of a position", got)
	}
	// The client records a group as applied once the target's apply
	// returns, a moment after the target's position moved.
	want := c.primary.Log("a.db").Pos()
	for deadline := time.Now().Add(repltest.WaitTimeout); ; time.Sleep(time.Millisecond) {
		st := cl.Status()
		if st.Epoch == 1 && st.Connected && st.Applied["a.db"].Pos == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("client status %+v after %v, want epoch 1, connected, a.db applied at %s", st, repltest.WaitTimeout, want)
		}
	}
}

func TestStream_SnapshotWhenRetentionPassed(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.primary.Steps("a.db", 20)
	stop := c.run(c.client())
	c.waitSynced()
	stop()
	c.primary.Steps("a.db", 30)
	l := c.primary.Log("a.db")
	l.Retention, l.MaxRetention = time.Minute, time.Minute
	if n, err := l.Prune(context.Background(), l.Pos().TXID, time.Now().Add(time.Hour)); err != nil || n == 0 {
		t.Fatalf("prune: %d files, %v", n, err)
	}
	c.run(c.client())
	c.waitSynced()
	if got := c.snapshots(); len(got) != 2 || got[1] != replication.SnapshotRetention {
		t.Fatalf("snapshots applied: %v, want a RETENTION snapshot after the first file", got)
	}
}

func TestStream_SnapshotWhenDiverged(t *testing.T) {
	for _, tt := range []struct {
		name      string
		ownSteps  int // transactions the replica got from another primary
		mainSteps int
		want      replication.SnapshotReason
	}{
		{"Ahead", 40, 10, replication.SnapshotAhead},
		{"ChecksumMismatch", 10, 40, replication.SnapshotChecksumMismatch},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// The replica first follows another primary with its own history.
			other := newCluster(t)
			other.primary.Create("a.db", 99)
			other.primary.Steps("a.db", tt.ownSteps)
			stop := other.run(other.client())
			other.waitSynced()
			stop()

			c := newCluster(t)
			c.target = other.target
			c.primary.Create("a.db", 1)
			c.primary.Steps("a.db", tt.mainSteps)
			c.run(c.client())
			c.waitSynced()
			if got := c.snapshots(); len(got) != 2 || got[1] != tt.want {
				t.Fatalf("snapshots applied: %v, want %v after the first", got, tt.want)
			}
		})
	}
}

// TestStream_Groups holds a replica's first Apply while the primary
// commits: the files that arrive meanwhile queue up to MaxGroup, are
// applied as groups of at most that many, each once, with one ack per
// group, and received into spare files when there are some.
func TestStream_Groups(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	cl := c.client()
	cl.MaxGroup = 8
	cl.ReceiveInMemory = -1 // into files, which the test counts, and which reuse spares
	spares, err := ltx.OpenSpares(filepath.Join(t.TempDir(), "spare"), 100)
	if err != nil {
		t.Fatal(err)
	}
	cl.Spares = spares
	var once sync.Once
	held := make(chan struct{})
	c.target.SetBefore(func(db string, files []*replication.File) {
		once.Do(func() {
			defer close(held)
			// Queue full: MaxGroup files waiting, one more received and
			// waiting to be queued.
			c.primary.Steps("a.db", 60)
			deadline := time.Now().Add(10 * time.Second)
			for {
				entries, _ := os.ReadDir(cl.TempDir)
				if len(entries) >= cl.MaxGroup+1 {
					return
				}
				if time.Now().After(deadline) {
					t.Errorf("%d files received while the first Apply waits, want %d", len(entries), cl.MaxGroup+1)
					return
				}
				time.Sleep(time.Millisecond)
			}
		})
	})
	c.run(cl)
	repltest.WaitClosed(t, held, "the replica's first Apply and the files queued while it waited")
	c.waitSynced()

	applied, offered, _ := c.target.Counts()
	if want := c.target.WantApplied(c.primary); applied != want || offered != want {
		t.Fatalf("replica applied %d of %d files it was offered, want %d of %d", applied, offered, want, want)
	}
	groups := c.target.Groups()
	if len(groups) < 2 || groups[0] != 1 || groups[1] != cl.MaxGroup || slices.Max(groups) > cl.MaxGroup {
		t.Fatalf("groups applied: %v; want the snapshot alone, then %d files queued meanwhile, none larger", groups, cl.MaxGroup)
	}
	t.Logf("groups applied: %v", groups)
	// Each group's ack carries its last position.
	want := c.primary.Log("a.db").Pos()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		reps := c.streamer.Replicas()
		if len(reps) == 1 && reps[0].Acked["a.db"] == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("primary's view of the replica: %+v, want a.db acked at %s", reps, want)
		}
	}
	// The files given back are spares now, and later files were received
	// into them rather than into new files.
	entries, _ := os.ReadDir(cl.TempDir)
	if spares.Len() == 0 || len(entries)+spares.Len() >= applied {
		t.Fatalf("%d files created in %s and %d spares for %d files received: spares were not reused", len(entries), cl.TempDir, spares.Len(), applied)
	}
}

// TestStream_GroupBytes bounds groups by size: with MaxGroupBytes smaller
// than any file, files queued while the first Apply waits still go one
// at a time.
func TestStream_GroupBytes(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	cl := c.client()
	cl.MaxGroup, cl.MaxGroupBytes = 8, 1
	cl.ReceiveInMemory = -1 // into files, which the test counts
	var once sync.Once
	held := make(chan struct{})
	c.target.SetBefore(func(db string, files []*replication.File) {
		once.Do(func() {
			defer close(held)
			c.primary.Steps("a.db", 20)
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
				if entries, _ := os.ReadDir(cl.TempDir); len(entries) >= cl.MaxGroup+1 {
					return
				}
			}
			t.Errorf("the queue did not fill while the first Apply waited")
		})
	})
	c.run(cl)
	repltest.WaitClosed(t, held, "the replica's first Apply and the files queued while it waited")
	c.waitSynced()
	groups := c.target.Groups()
	if slices.Max(groups) != 1 || len(groups) != c.target.WantApplied(c.primary) {
		t.Fatalf("groups applied: %v; want every file alone", groups)
	}
}

func TestStream_StaleEpoch(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.epoch.Store(7)
	cl := c.client()
	stop := c.run(cl)
	c.waitSynced()
	stop()

	// The primary is deposed and comes back with an older epoch: the
	// replica's Hello tells it so, and it refuses to stream.
	c.epoch.Store(3)
	c.primary.Steps("a.db", 5)
	before := c.target.Pos("a.db")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _ := c.dial(ctx)
	_, err := cl.Session(ctx, conn)
	if served := awaitErr(t, conn.(replicaEnd).served, "Serve with a stale epoch to return"); !errors.Is(served, replication.ErrNotPrimary) {
		t.Fatalf("Serve with epoch 3 to a replica at epoch 7: %v, want ErrNotPrimary", served)
	}
	if err == nil {
		t.Fatal("session with a deposed primary ended without error")
	}

	// A frame from an old epoch that reaches the replica anyway is refused.
	c.epoch.Store(9)
	c.mu.Lock()
	c.filter = func(f *meridianv1.StreamResponse) { f.Epoch = 5 }
	c.mu.Unlock()
	conn, _ = c.dial(ctx)
	_, err = cl.Session(ctx, conn)
	if !errors.Is(err, replication.ErrStaleEpoch) {
		t.Fatalf("session with frames from epoch 5 after 7: %v, want ErrStaleEpoch", err)
	}
	if got := c.target.Pos("a.db"); got != before {
		t.Fatalf("replica moved from %s to %s on stale frames", before, got)
	}
}

// TestStream_EpochSurvivesRestart restarts a replica that accepted epoch 7
// as a new Client on the same EpochFile: it still refuses a primary of an
// older epoch, through its Hello and frame by frame, and follows one of
// epoch 7 or newer, each newer epoch stored before a frame of it is
// accepted.
func TestStream_EpochSurvivesRestart(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.primary.Steps("a.db", 5)
	epochs := &replication.EpochFile{Path: filepath.Join(t.TempDir(), "epoch")}
	restart := func() *replication.Client {
		cl := c.client()
		cl.Epochs = epochs
		return cl
	}
	c.epoch.Store(7)
	stop := c.run(restart())
	c.waitSynced()
	stop()
	mustEpochFile(t, epochs.Path, "7\n")

	// Restarted, it starts from epoch 7.
	cl := restart()
	if err := cl.LoadEpoch(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := cl.Status().Epoch; got != 7 {
		t.Fatalf("restarted replica at epoch %d, want 7", got)
	}
	// The deposed primary, at epoch 3, learns from the Hello that it was
	// deposed and refuses to stream.
	c.epoch.Store(3)
	c.primary.Steps("a.db", 5)
	before := c.target.Pos("a.db")
	var told []string
	c.streamer.NewerEpoch = func(epoch uint64, replica string) { told = append(told, fmt.Sprint(replica, " ", epoch)) }
	err, served := c.session(cl)
	if want := "replica fra-1 has seen lease epoch 7, newer than this node's 3"; !errors.Is(served, replication.ErrNotPrimary) || !strings.Contains(served.Error(), want) {
		t.Fatalf("Serve at epoch 3 to a restarted replica that accepted 7: %v, want ErrNotPrimary saying %q", served, want)
	}
	if fmt.Sprint(told) != "[fra-1 7]" {
		t.Fatalf("NewerEpoch calls: %v, want one, of fra-1 at epoch 7", told)
	}
	if !errors.Is(err, io.EOF) { // the in-memory stream's end; gRPC's says FAILED_PRECONDITION
		t.Fatalf("session with a deposed primary: %v, want the stream ended (EOF)", err)
	}
	// Frames of epoch 5 that reach a restarted replica anyway are refused.
	c.epoch.Store(9)
	c.mu.Lock()
	c.filter = func(f *meridianv1.StreamResponse) { f.Epoch = 5 }
	c.mu.Unlock()
	if err, _ := c.session(restart()); !errors.Is(err, replication.ErrStaleEpoch) ||
		!strings.Contains(err.Error(), "frame from epoch 5, but this replica has seen epoch 7") {
		t.Fatalf("restarted replica that accepted 7, sent frames of epoch 5: %v, want ErrStaleEpoch", err)
	}
	if got := c.target.Pos("a.db"); got != before {
		t.Fatalf("replica moved from %s to %s on a stale primary's frames", before, got)
	}

	// A primary of epoch 7 itself is followed.
	c.epoch.Store(7)
	stop = c.run(restart())
	c.waitSynced()
	stop()
	mustEpochFile(t, epochs.Path, "7\n")

	// A newer epoch is stored before any frame of it is accepted: while
	// it cannot be, nothing of it applies.
	c.epoch.Store(9)
	c.primary.Steps("a.db", 5)
	before = c.target.Pos("a.db")
	storeErr := errors.New("disk on fire")
	cl = restart()
	cl.Epochs = failingStore{EpochStore: epochs, err: storeErr}
	if err, _ := c.session(cl); !errors.Is(err, storeErr) {
		t.Fatalf("session of epoch 9 with a store that fails: %v, want the store's error", err)
	}
	if got, epoch := c.target.Pos("a.db"), cl.Status().Epoch; got != before || epoch != 7 {
		t.Fatalf("replica whose store failed moved from %s to %s and is at epoch %d; want it unmoved at epoch 7", before, got, epoch)
	}
	mustEpochFile(t, epochs.Path, "7\n")
	stop = c.run(restart())
	c.waitSynced()
	stop()
	mustEpochFile(t, epochs.Path, "9\n")
}

// session runs one stream of cl to the cluster's Streamer and returns what
// the client's Session and the Streamer's Serve returned.
func (c *cluster) session(cl *replication.Client) (err, served error) {
	c.tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), repltest.WaitTimeout)
	defer cancel()
	conn, _ := c.dial(ctx)
	_, err = cl.Session(ctx, conn)
	cancel()
	return err, awaitErr(c.tb, conn.(replicaEnd).served, "the stream's Serve to return")
}

// failingStore is an EpochStore whose Store fails with err.
type failingStore struct {
	replication.EpochStore
	err error
}

func (s failingStore) Store(context.Context, uint64) error { return s.err }

// mustEpochFile fails tb unless the file at path holds want.
func mustEpochFile(tb testing.TB, path, want string) {
	tb.Helper()
	if got := string(testingutil.MustReadFile(tb, path)); got != want {
		tb.Fatalf("%s holds %q, want %q", path, got, want)
	}
}

func TestStream_BadFrames(t *testing.T) {
	for _, tt := range []struct {
		name   string
		filter func(f *meridianv1.StreamResponse) bool // true once it changed a frame
	}{
		{"BitFlip", func(f *meridianv1.StreamResponse) bool {
			if ch := f.GetLtxChunk(); ch != nil && len(ch.Data) > 200 {
				ch.Data[len(ch.Data)/2] ^= 0x10
				return true
			}
			return false
		}},
		{"Truncated", func(f *meridianv1.StreamResponse) bool {
			if ch := f.GetLtxChunk(); ch != nil && len(ch.Data) > 10 {
				ch.Data = ch.Data[:len(ch.Data)-7]
				return true
			}
			return false
		}},
		{"WrongOffset", func(f *meridianv1.StreamResponse) bool {
			if ch := f.GetLtxChunk(); ch != nil {
				ch.Offset++
				return true
			}
			return false
		}},
		{"UnknownDatabase", func(f *meridianv1.StreamResponse) bool {
			if ch := f.GetLtxChunk(); ch != nil {
				ch.Db = "nope.db"
				return true
			}
			return false
		}},
		{"WrongChecksum", func(f *meridianv1.StreamResponse) bool {
			if e := f.GetLtxEnd(); e != nil {
				e.PostApplyChecksum ^= 1
				return true
			}
			return false
		}},
		{"WrongSize", func(f *meridianv1.StreamResponse) bool {
			if b := f.GetLtxBegin(); b != nil {
				b.Size += 100
				return true
			}
			return false
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t)
			c.primary.Create("a.db", 1)
			c.primary.Steps("a.db", 10)
			cl := c.client()
			stop := c.run(cl)
			c.waitSynced()
			stop()
			c.primary.Steps("a.db", 10)
			before := c.target.Pos("a.db")

			var changed atomic.Bool
			c.mu.Lock()
			c.filter = func(f *meridianv1.StreamResponse) {
				if !changed.Load() && tt.filter(f) {
					changed.Store(true)
				}
			}
			c.mu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			conn, _ := c.dial(ctx)
			_, err := cl.Session(ctx, conn)
			if !changed.Load() || !errors.Is(err, replication.ErrProtocol) {
				t.Fatalf("damaged stream (changed %v): %v, want ErrProtocol", changed.Load(), err)
			}
			if got := c.target.Pos("a.db"); got != before {
				t.Fatalf("replica moved from %s to %s on a damaged file", before, got)
			}
			// The next stream recovers.
			c.run(cl)
			c.waitSynced()
		})
	}
}

func TestStream_ApplyFailureResumes(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.primary.Steps("a.db", 10)
	c.target.FailNext(errors.New("disk on fire"))
	cl := c.client()
	c.run(cl)
	c.waitSynced()
	if st := cl.Status(); st.Reconnects == 0 {
		t.Fatalf("a failed apply did not end the stream: %+v", st)
	}
}

// TestStream_SnapshotRateLimited has a replica reconnect without a
// position, three times, as a node that loses its databases in a loop
// would: each stream gets its snapshot, but no sooner than
// SnapshotInterval after the last one began, and the primary says why it
// waits.
func TestStream_SnapshotRateLimited(t *testing.T) {
	c := newCluster(t)
	var logged testingutil.LockedBuffer
	c.streamer.Logger = slog.New(slog.NewTextHandler(&logged, nil))
	const interval = 300 * time.Millisecond
	c.streamer.SnapshotInterval = interval
	c.primary.Create("a.db", 1)
	c.primary.Steps("a.db", 100)

	var prevBegin time.Time
	var prevBuilt time.Duration // from dial to LTXBegin: the most its build took
	for round := range 3 {
		ctx, cancel := context.WithCancel(context.Background())
		dialed := time.Now()
		conn, err := c.dial(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := conn.Send(hello("fra-1", 0)); err != nil {
			t.Fatal(err)
		}
		var begin *meridianv1.LTXBegin
		for deadline := time.Now().Add(repltest.WaitTimeout); begin == nil; {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: no snapshot in %v", round, repltest.WaitTimeout)
			}
			f, err := conn.Recv()
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			begin = f.GetLtxBegin()
		}
		began := time.Now()
		cancel()
		if !begin.GetIsSnapshot() || begin.GetSnapshotReason() != meridianv1.SnapshotReason_SNAPSHOT_REASON_NO_POSITION {
			t.Fatalf("round %d: first file %d-%d, reason %v; want a snapshot for lack of a position", round, begin.GetMinTxid(), begin.GetMaxTxid(), begin.GetSnapshotReason())
		}
		// The last snapshot began building at prevBegin-prevBuilt at the
		// earliest; this one no sooner than interval after that.
		if round > 0 {
			if gap, least := began.Sub(prevBegin), interval-prevBuilt; gap < least {
				t.Fatalf("round %d: snapshot %v after the last, want at least %v (interval %v less the last build's %v)", round, gap, least, interval, prevBuilt)
			}
		}
		prevBegin, prevBuilt = began, began.Sub(dialed)
	}
	repltest.WaitGroup(t, &c.serveWG, "the streams to end")
	if got := strings.Count(logged.String(), "faster than the primary sends them"); got != 2 || !strings.Contains(logged.String(), "replica=fra-1") {
		t.Fatalf("the primary logged %d waits for fra-1's snapshots, want 2:\n%s", got, logged.String())
	}
}

func TestServe_RefusesBadHello(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	for _, tt := range []struct {
		name  string
		req   *meridianv1.StreamRequest
		epoch uint64
		want  error
	}{
		{"NotHello", &meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Ack{Ack: &meridianv1.Ack{Db: "a.db"}}}, 1, replication.ErrProtocol},
		{"OtherNode", hello("syd-1", 0), 1, replication.ErrPermission},
		{"DuplicateDatabase", &meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Hello{Hello: &meridianv1.Hello{Node: "fra-1",
			Positions: []*meridianv1.DatabasePosition{{Db: "a.db"}, {Db: "a.db"}}}}}, 1, replication.ErrProtocol},
		{"NotPrimary", hello("fra-1", 0), 0, replication.ErrNotPrimary},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c.epoch.Store(tt.epoch)
			p := newPipe()
			errc := make(chan error, 1)
			go func() { errc <- c.streamer.Serve(context.Background(), primaryEnd{p, context.Background()}, "fra-1") }()
			if tt.epoch != 0 {
				select {
				case p.toPrimary <- tt.req:
				case err := <-errc:
					t.Fatalf("Serve returned %v before it read the first frame", err)
				case <-time.After(repltest.WaitTimeout):
					t.Fatalf("waited %v for Serve to read the first frame", repltest.WaitTimeout)
				}
			}
			err := awaitErr(t, errc, "Serve to return after the first frame")
			p.close()
			if !errors.Is(err, tt.want) {
				t.Fatalf("Serve: %v, want %v", err, tt.want)
			}
		})
	}
}

func hello(node string, epoch uint64) *meridianv1.StreamRequest {
	return &meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Hello{Hello: &meridianv1.Hello{Node: node, Epoch: epoch}}}
}

// TestStream_SnapshotStreamed asks for a snapshot as a replica that takes
// files of a size known only at their end, and as one that does not: the
// first gets an LTXBegin without a size but with a bound the file stays
// within, and the size in LTXEnd; the second the size up front. Both get
// the same verified bytes, a snapshot at the primary's position, and the
// primary leaves no temporary file behind.
func TestStream_SnapshotStreamed(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.primary.Steps("a.db", 100)
	pos := c.primary.Log("a.db").Pos()
	var sizes []int
	for _, streamed := range []bool{true, false} {
		ctx, cancel := context.WithTimeout(context.Background(), repltest.WaitTimeout)
		conn, err := c.dial(ctx)
		if err != nil {
			t.Fatal(err)
		}
		req := hello("fra-1", 0)
		req.GetHello().StreamedFiles = streamed
		if err := conn.Send(req); err != nil {
			t.Fatal(err)
		}
		var (
			begin *meridianv1.LTXBegin
			data  []byte
			end   *meridianv1.LTXEnd
		)
		for end == nil {
			f, err := conn.Recv()
			if err != nil {
				t.Fatalf("streamed %v: %v", streamed, err)
			}
			switch {
			case f.GetLtxBegin() != nil:
				begin = f.GetLtxBegin()
			case f.GetLtxChunk() != nil:
				if int(f.GetLtxChunk().GetOffset()) != len(data) {
					t.Fatalf("streamed %v: chunk at %d after %d bytes", streamed, f.GetLtxChunk().GetOffset(), len(data))
				}
				data = append(data, f.GetLtxChunk().GetData()...)
			case f.GetLtxEnd() != nil:
				end = f.GetLtxEnd()
			}
		}
		cancel()
		if !begin.GetIsSnapshot() || begin.GetMaxTxid() != uint64(pos.TXID) {
			t.Fatalf("streamed %v: file %d-%d, want a snapshot at %s", streamed, begin.GetMinTxid(), begin.GetMaxTxid(), pos)
		}
		if streamed {
			if begin.GetSize() != 0 || begin.GetSizeBound() < uint64(len(data)) || end.GetSize() != uint64(len(data)) {
				t.Fatalf("streamed: LTXBegin size %d, bound %d; LTXEnd size %d; %d bytes sent", begin.GetSize(), begin.GetSizeBound(), end.GetSize(), len(data))
			}
		} else if begin.GetSize() != uint64(len(data)) || begin.GetSizeBound() != 0 || end.GetSize() != 0 {
			t.Fatalf("sized: LTXBegin size %d, bound %d; LTXEnd size %d; %d bytes sent", begin.GetSize(), begin.GetSizeBound(), end.GetSize(), len(data))
		}
		vr := ltx.NewVerifyReader(bytes.NewReader(data), 0)
		if _, err := io.Copy(io.Discard, vr); err != nil {
			t.Fatalf("streamed %v: the snapshot does not verify: %v", streamed, err)
		}
		if got := vr.Trailer().PostApplyChecksum; got != pos.PostApplyChecksum || end.GetPostApplyChecksum() != uint64(got) {
			t.Fatalf("streamed %v: snapshot leaves %s (LTXEnd %016x), want %s", streamed, got, end.GetPostApplyChecksum(), pos)
		}
		sizes = append(sizes, len(data))
	}
	if sizes[0] != sizes[1] {
		t.Fatalf("streamed snapshot of %d bytes, sized one %d", sizes[0], sizes[1])
	}
	repltest.WaitGroup(t, &c.serveWG, "the streams to end")
	if entries, _ := os.ReadDir(c.streamer.TempDir); len(entries) != 0 {
		t.Fatalf("the primary left %d files in its TempDir", len(entries))
	}
}

// TestClient_StopFinishesApply stops a client while the target applies a
// group: the apply is not interrupted (its context stays live), Run
// returns once it is done, and the target is at the end of that group.
// A Stop before Run makes Run return at once.
func TestClient_StopFinishesApply(t *testing.T) {
	c := newCluster(t)
	c.primary.Create("a.db", 1)
	c.primary.Steps("a.db", 5)
	cl := c.client()
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	var applyErr atomic.Value
	c.target.SetBefore(func(db string, files []*replication.File) {
		once.Do(func() {
			close(entered)
			<-release
		})
	})
	ctxCheck := &ctxTarget{Target: c.target, err: &applyErr}
	cl.Target = ctxCheck
	done := make(chan error, 1)
	go func() { done <- cl.Run(context.Background(), c.dial) }()
	repltest.WaitClosed(t, entered, "the first apply to begin")
	cl.Stop()
	select {
	case err := <-done:
		t.Fatalf("Run returned %v while an apply was in progress", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Run after Stop: %v, want context.Canceled", err)
		}
	case <-time.After(repltest.WaitTimeout):
		t.Fatalf("Run did not return %v after Stop and the apply's end", repltest.WaitTimeout)
	}
	if err, _ := applyErr.Load().(error); err != nil {
		t.Fatalf("the apply's context ended while it applied: %v", err)
	}
	if got := c.target.Count(); got != 1 {
		t.Fatalf("the target applied %d files, want the 1 of the group Stop let finish", got)
	}

	again := c.client()
	again.Stop()
	if err := again.Run(context.Background(), c.dial); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run after Stop: %v, want context.Canceled at once", err)
	}
}

// ctxTarget records whether an Apply's context had ended when it returned.
type ctxTarget struct {
	*repltest.Target
	err *atomic.Value
}

func (t *ctxTarget) Apply(ctx context.Context, db string, files []*replication.File) (ltx.Pos, error) {
	pos, err := t.Target.Apply(ctx, db, files)
	if cerr := ctx.Err(); cerr != nil {
		t.err.Store(cerr)
	}
	return pos, err
}

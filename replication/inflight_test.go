package replication_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
	"github.com/meridian-db/meridian/replication/internal/repltest"
)

// TestStream_InFlightBounds runs a replica's stream against a primary
// that begins files of more databases at once than the replica's Hello
// allows: the stream ends with an error that names the primary, the
// database and the bound, nothing is applied, and no received file is
// left in TempDir.
func TestStream_InFlightBounds(t *testing.T) {
	src := repltest.NewPrimary(t)
	src.Create("a.db", 1)
	src.Steps("a.db", 10)
	l := src.Log("a.db")
	files := l.Files()
	info := files[len(files)-1]
	if info.Header.IsSnapshot() {
		t.Fatalf("a.db's log holds %d files, want a transaction after its first", len(files))
	}
	data := testingutil.MustReadFile(t, filepath.Join(l.Dir, info.Name))
	size := info.Size
	for _, tt := range []struct {
		name     string
		maxFiles int
		maxBytes int64
		begins   int    // files begun, the last one refused
		want     string // of the error
	}{
		{"Files", 4, 64 << 20, 5, "replication protocol violation: primary iad-1 began a file of d4.db while 4 files were in flight, " +
			"the most this replica receives at once, as its Hello announced (raise replication.max_in_flight_files to receive more)"},
		{"Bytes", 32, 3*size + size/2, 4, fmt.Sprintf("replication protocol violation: primary iad-1 began a file of d3.db of %d bytes "+
			"while 3 files of %d bytes were in flight, more than the %d bytes this replica receives at once, as its Hello announced "+
			"(raise replication.max_in_flight_bytes to receive more)", size, 3*size, 3*size+size/2)},
		{"FileTooLarge", 32, size - 1, 1, fmt.Sprintf("replication protocol violation: primary iad-1 began a file of d0.db of %d bytes, "+
			"more than the %d this replica receives at once (raise replication.max_in_flight_bytes to receive it)", size, size-1)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			target := repltest.NewTarget(t)
			cl := replication.NewClient("fra-1", "fra", target, t.TempDir())
			cl.Logger = testingutil.Logger(t)
			cl.PrimaryNode = "iad-1"
			cl.MaxInFlightFiles, cl.MaxInFlightBytes = tt.maxFiles, tt.maxBytes
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			p := newPipe()
			defer p.close()
			var err error
			done := make(chan struct{})
			go func() {
				defer close(done)
				_, err = cl.Session(ctx, replicaEnd{pipe: p, ctx: ctx})
			}()
			req := testingutil.Recv(t, p.toPrimary, repltest.WaitTimeout, "the replica's Hello")
			if h := req.GetHello(); h.GetMaxInFlightFiles() != uint32(tt.maxFiles) || h.GetMaxInFlightBytes() != uint64(tt.maxBytes) {
				t.Fatalf("Hello announces %d files and %d bytes in flight, want %d and %d", h.GetMaxInFlightFiles(), h.GetMaxInFlightBytes(), tt.maxFiles, tt.maxBytes)
			}
			send := func(f *meridianv1.StreamResponse) {
				f.Epoch = 1
				select {
				case p.toReplica <- f:
				case <-done:
					t.Fatalf("the replica's session ended before the frames broke a bound: %v", err)
				case <-time.After(repltest.WaitTimeout):
					t.Fatalf("the replica took no frame for %v", repltest.WaitTimeout)
				}
			}
			for i := range tt.begins {
				db := fmt.Sprintf("d%d.db", i)
				send(&meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxBegin{LtxBegin: &meridianv1.LTXBegin{Db: db,
					MinTxid: uint64(info.Header.MinTXID), MaxTxid: uint64(info.Header.MaxTXID), PreApplyChecksum: uint64(info.Header.PreApplyChecksum),
					Size: uint64(size), CommittedAtUnixNano: 1}}})
				if i < tt.begins-1 {
					send(&meridianv1.StreamResponse{Frame: &meridianv1.StreamResponse_LtxChunk{LtxChunk: &meridianv1.LTXChunk{Db: db, Data: data[:size/2]}}})
				}
			}
			repltest.WaitClosed(t, done, "the replica's session to end")
			if !errors.Is(err, replication.ErrProtocol) || err.Error() != tt.want {
				t.Fatalf("session: %v\nwant ErrProtocol: %s", err, tt.want)
			}
			if calls := target.Calls(); calls != 0 {
				t.Fatalf("%d Apply calls, want none", calls)
			}
			if entries, _ := os.ReadDir(cl.TempDir); len(entries) != 0 {
				t.Fatalf("%s holds %d files after the session, want none", cl.TempDir, len(entries))
			}
		})
	}
}

// TestStream_InFlightBoundsKept streams twelve databases, as snapshots
// and as their logs, to a replica that receives at most three files and a
// little more than the largest at once: the primary keeps within both,
// and the replica converges without a reconnect. A primary asked for less
// room than a file needs ends the stream saying so.
func TestStream_InFlightBoundsKept(t *testing.T) {
	c := newCluster(t)
	const dbs = 12
	for i := range dbs {
		name := fmt.Sprintf("d%02d.db", i)
		c.primary.Create(name, uint64(i))
		c.primary.Steps(name, 20)
	}
	var largest int64
	for _, name := range c.primary.DBs() {
		fi, err := os.Stat(c.primary.DB(name).Path)
		if err != nil {
			t.Fatal(err)
		}
		largest = max(largest, fi.Size()+64<<10) // a snapshot: the pages, a header, a page index
		for _, f := range c.primary.Log(name).Files() {
			largest = max(largest, f.Size)
		}
	}
	// Files of several chunks, so that those of different databases
	// interleave.
	c.streamer.ChunkSize = 4 << 10
	cl := c.client()
	cl.MaxInFlightFiles, cl.MaxInFlightBytes = 3, largest+largest/2
	var mu sync.Mutex
	inFlight := make(map[string]uint64)
	var maxFiles, begun int
	var maxBytes, bytes uint64
	c.mu.Lock()
	c.filter = func(f *meridianv1.StreamResponse) {
		if f.GetLtxChunk() != nil {
			// A replica that reads chunks slowly keeps the primary's
			// files in flight long enough for others to begin: the
			// bound is reached however fast the machine is.
			time.Sleep(200 * time.Microsecond)
		}
		mu.Lock()
		defer mu.Unlock()
		if b := f.GetLtxBegin(); b != nil {
			inFlight[b.Db] = b.Size
			bytes += b.Size
			begun++
			maxFiles, maxBytes = max(maxFiles, len(inFlight)), max(maxBytes, bytes)
		}
		if e := f.GetLtxEnd(); e != nil {
			bytes -= inFlight[e.Db]
			delete(inFlight, e.Db)
		}
	}
	c.mu.Unlock()
	c.run(cl)
	var wg sync.WaitGroup
	for _, name := range c.primary.DBs()[:4] {
		wg.Go(func() { c.primary.Steps(name, 30) })
	}
	repltest.WaitGroup(t, &wg, "the transactions committed while streaming")
	c.waitSynced()
	if r := cl.Status().Reconnects; r != 0 {
		t.Fatalf("the replica reconnected %d times, want 0", r)
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d files sent, at most %d and %d bytes at once (bounds %d and %d)", begun, maxFiles, maxBytes, cl.MaxInFlightFiles, cl.MaxInFlightBytes)
	// Twelve databases to send at once: the bound of files is reached.
	if begun != c.target.Count() || maxFiles != cl.MaxInFlightFiles || maxBytes > uint64(cl.MaxInFlightBytes) {
		t.Fatalf("%d files sent, %d applied, at most %d and %d bytes in flight; want every file applied, %d files and at most %d bytes in flight",
			begun, c.target.Count(), maxFiles, maxBytes, cl.MaxInFlightFiles, cl.MaxInFlightBytes)
	}

	// Less room than a snapshot needs: the primary cannot send it.
	ctx, cancel := context.WithTimeout(context.Background(), repltest.WaitTimeout)
	defer cancel()
	p := newPipe()
	defer p.close()
	served := make(chan error, 1)
	go func() { served <- c.streamer.Serve(ctx, primaryEnd{p, ctx}, "fra-1") }()
	hello := &meridianv1.Hello{Node: "fra-1", MaxInFlightFiles: 4, MaxInFlightBytes: 100}
	select {
	case p.toPrimary <- &meridianv1.StreamRequest{Frame: &meridianv1.StreamRequest_Hello{Hello: hello}}:
	case err := <-served:
		t.Fatalf("Serve returned %v before it read the Hello", err)
	case <-time.After(repltest.WaitTimeout):
		t.Fatalf("waited %v for Serve to read the Hello", repltest.WaitTimeout)
	}
	go func() {
		for {
			select {
			case <-p.toReplica:
			case <-p.done:
				return
			}
		}
	}()
	err := awaitErr(t, served, "Serve to a replica with room for 100 bytes")
	if want := "bytes, more than the 100 replica fra-1 receives at once (its replication.max_in_flight_bytes)"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Serve to a replica with room for 100 bytes: %v, want an error saying %q", err, want)
	}
}

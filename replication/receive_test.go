package replication

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// TestReceiver_HeldRoom bounds the bytes of the files in flight and of
// those received and not yet applied together: a file does not begin
// while files held take the room it needs, and begins once one of them
// is applied.
func TestReceiver_HeldRoom(t *testing.T) {
	next := seedLTX(t)[1]
	size := int64(len(next))
	dir := t.TempDir()
	rv := newReceiver(dir, 1<<20, nil)
	rv.inMemory = 0 // into files, which the test counts
	rv.maxBytes = 2*size + size/2
	defer rv.close()
	var held []*File
	for _, db := range []string{"a.db", "b.db"} {
		f := mustReceive(t, rv, db, next)
		held = append(held, f)
	}
	if got := rv.held.bytes.Load(); got != 2*size {
		t.Fatalf("files held: %d bytes, want the two received, %d", got, 2*size)
	}
	// A third would take 3*size of the 2.5*size: it waits, here until
	// its context ends, and creates no file.
	begin := fileFrames("c.db", next, 0)[0].GetLtxBegin()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := rv.begin(ctx, begin); !errors.Is(err, context.Canceled) {
		t.Fatalf("LTXBegin of c.db with two files held and room for 2.5: %v, want it to wait (context.Canceled)", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Fatalf("%s holds %d files, want the 2 received", dir, len(entries))
	}
	// Once one is applied, it begins.
	rv.held.done(held[0])
	if err := rv.begin(ctx, begin); err != nil {
		t.Fatalf("LTXBegin of c.db once a file held was applied: %v", err)
	}
	if got := rv.inFlight; got != size {
		t.Fatalf("files in flight: %d bytes, want c.db's %d", got, size)
	}
}

// TestReceiver_Bounds sends a receiver more files at once than it
// announced: the file that breaks a bound is refused with an error that
// names the sender, the database and the bound, before it creates a file.
func TestReceiver_Bounds(t *testing.T) {
	next := seedLTX(t)[1]
	size := len(next)
	for _, tt := range []struct {
		name     string
		maxFiles int
		maxBytes int64
		want     string // of the error for the last file
	}{
		{"Files", 3, 0, "primary iad-1 began a file of d3.db while 3 files were in flight, the most this replica receives at once, " +
			"as its Hello announced (raise replication.max_in_flight_files to receive more)"},
		{"Bytes", 0, int64(3*size + size/2), "primary iad-1 began a file of d3.db of " + itoa(size) + " bytes while 3 files of " + itoa(3*size) +
			" bytes were in flight, more than the " + itoa(3*size+size/2) + " bytes this replica receives at once, as its Hello announced " +
			"(raise replication.max_in_flight_bytes to receive more)"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			rv := newReceiver(dir, 1<<20, nil)
			rv.inMemory = 0 // into files, which the test counts
			rv.maxFiles, rv.maxBytes, rv.peer = tt.maxFiles, tt.maxBytes, "primary iad-1"
			for i := range 4 {
				frames := fileFrames("d"+itoa(i)+".db", next, size/2)
				err := rv.begin(context.Background(), frames[0].GetLtxBegin())
				if i < 3 {
					if err != nil {
						t.Fatalf("file %d: %v", i, err)
					}
					if err := rv.chunk(frames[1].GetLtxChunk()); err != nil {
						t.Fatalf("file %d: %v", i, err)
					}
					continue
				}
				if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("file %d: %v, want ErrProtocol saying %q", i, err, tt.want)
				}
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 3 {
				t.Fatalf("%s holds %d files, want the 3 in flight", dir, len(entries))
			}
			rv.close()
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Fatalf("%s holds %d files after close, want none", dir, len(entries))
			}
		})
	}
}

// mustReceive sends data whole as a file of db through rv and returns it.
func mustReceive(tb testing.TB, rv *receiver, db string, data []byte) *File {
	tb.Helper()
	file, err := receiveFrames(rv, fileFrames(db, data, 0))
	if err != nil {
		tb.Fatalf("receive %s: %v", db, err)
	}
	return file
}

// receiveFrames hands rv the frames of one file until one fails, and
// returns the file their LTXEnd completed.
func receiveFrames(rv *receiver, frames []*meridianv1.StreamResponse) (*File, error) {
	var file *File
	for _, fr := range frames {
		var err error
		switch fr := fr.GetFrame().(type) {
		case *meridianv1.StreamResponse_LtxBegin:
			err = rv.begin(context.Background(), fr.LtxBegin)
		case *meridianv1.StreamResponse_LtxChunk:
			err = rv.chunk(fr.LtxChunk)
		case *meridianv1.StreamResponse_LtxEnd:
			file, err = rv.end(fr.LtxEnd)
		}
		if err != nil {
			return nil, err
		}
	}
	return file, nil
}

func itoa(i int) string { return strconv.Itoa(i) }

// TestReceiver_Streamed receives files announced without a size, as a
// snapshot sent while it is encoded is: one within its bound and whose
// LTXEnd gives its size is received; one that runs past its bound, whose
// LTXEnd gives another size, that announces both a size and a bound or
// neither, or a bound past replication.max_file_size, is refused.
func TestReceiver_Streamed(t *testing.T) {
	next := seedLTX(t)[1]
	size := uint64(len(next))
	streamed := func(bound, endSize uint64) []*meridianv1.StreamResponse {
		frames := fileFrames("a.db", next, 0)
		b := frames[0].GetLtxBegin()
		b.Size, b.SizeBound = 0, bound
		frames[len(frames)-1].GetLtxEnd().Size = endSize
		return frames
	}
	for _, tt := range []struct {
		name   string
		frames []*meridianv1.StreamResponse
		want   string // of the error; "" for none
	}{
		{"OK", streamed(size+100, size), ""},
		{"ExactBound", streamed(size, size), ""},
		{"PastBound", streamed(size-1, size), "runs past the " + itoa(int(size-1)) + " bytes its LTXBegin announced"},
		{"EndSize", streamed(size+100, size+1), "ended after " + itoa(int(size)) + " bytes, its LTXEnd says " + itoa(int(size+1))},
		{"NoEndSize", streamed(size+100, 0), "its LTXEnd says 0"},
		{"Both", func() []*meridianv1.StreamResponse {
			f := fileFrames("a.db", next, 0)
			f[0].GetLtxBegin().SizeBound = size
			return f
		}(), "announces size " + itoa(int(size)) + " and size_bound " + itoa(int(size)) + "; want one of them"},
		{"Neither", streamed(0, size), "announces size 0 and size_bound 0"},
		{"BoundTooLarge", streamed(1<<20+1, size), "announces 1048577 bytes; the bound is 1048576 (replication.max_file_size)"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rv := newReceiver(t.TempDir(), 1<<20, nil)
			defer rv.close()
			file, err := receiveFrames(rv, tt.frames)
			if tt.want == "" {
				if err != nil || file == nil || file.Info.Size != int64(size) || rv.inFlight != 0 {
					t.Fatalf("receive: %v; file %v; %d bytes still in flight", err, file, rv.inFlight)
				}
				return
			}
			if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("receive: %v, want ErrProtocol saying %q", err, tt.want)
			}
		})
	}
}

// TestReceiver_InMemory: a file of at most inMemory bytes arrives in
// memory, with no file created; a larger one in a file of the receiver's
// directory; both hold the bytes sent. Files in memory take at most the
// receiver's memory bound. A file in memory that does not verify is
// refused as one in a file is.
func TestReceiver_InMemory(t *testing.T) {
	next := seedLTX(t)[1]
	size := int64(len(next))
	dir := t.TempDir()
	rv := newReceiver(dir, 1<<20, nil)
	defer rv.close()
	rv.inMemory = size
	small := mustReceive(t, rv, "a.db", next)
	if small.Path != "" || !bytes.Equal(small.Data, next) {
		t.Fatalf("file of %d bytes, the bound: Path %q, %d bytes in memory, want the %d sent in memory", size, small.Path, len(small.Data), size)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("%s holds %d files after a file received in memory, want none", dir, len(entries))
	}
	rv.inMemory = size - 1
	large := mustReceive(t, rv, "b.db", next)
	if large.Data != nil || filepath.Dir(large.Path) != dir {
		t.Fatalf("file of %d bytes, over the bound: Path %q, %d bytes in memory, want a file in %s", size, large.Path, len(large.Data), dir)
	}
	if got, err := os.ReadFile(large.Path); err != nil || !bytes.Equal(got, next) {
		t.Fatalf("%s: %d bytes, %v; want the %d sent", large.Path, len(got), err, size)
	}
	// The files held in memory take at most rv.memory: past it, in a
	// file; once they are applied, in memory again.
	rv.inMemory, rv.memory = size, 2*size // a.db holds one of the two
	held := mustReceive(t, rv, "d.db", next)
	if held.Data == nil {
		t.Fatal("second file in memory, within the bound of two: received into a file")
	}
	over := mustReceive(t, rv, "e.db", next)
	if over.Data != nil || over.Path == "" {
		t.Fatalf("third file in memory, past the bound of two: %d bytes in memory, Path %q; want a file", len(over.Data), over.Path)
	}
	rv.held.done(held)
	if again := mustReceive(t, rv, "f.db", next); again.Data == nil {
		t.Fatal("a file once one in memory was applied: received into a file, want it in memory")
	}
	rv.inMemory, rv.memory = size, maxMemory
	bad := bytes.Clone(next)
	bad[len(bad)-20] ^= 0xff // in the trailer's checksums
	if _, err := receiveFrames(rv, fileFrames("c.db", bad, 0)); !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "c.db") {
		t.Fatalf("damaged file received in memory: %v, want ErrProtocol naming c.db", err)
	}
}

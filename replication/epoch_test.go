package replication_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication"
	"github.com/meridian-db/meridian/replication/internal/repltest"
)

func TestEpochFile(t *testing.T) {
	ctx := context.Background()
	t.Run("Missing", func(t *testing.T) {
		f := &replication.EpochFile{Path: filepath.Join(t.TempDir(), "epoch")}
		if e, err := f.Load(ctx); e != 0 || err != nil {
			t.Fatalf("Load of a file that does not exist: %d, %v; want 0, nil", e, err)
		}
	})
	t.Run("OK", func(t *testing.T) {
		dir := t.TempDir()
		f := &replication.EpochFile{Path: filepath.Join(dir, "epoch")}
		for _, want := range []uint64{7, 1 << 40, 1<<64 - 1} {
			if err := f.Store(ctx, want); err != nil {
				t.Fatal(err)
			}
			if got, err := f.Load(ctx); got != want || err != nil {
				t.Fatalf("Load after Store(%d): %d, %v", want, got, err)
			}
		}
		mustEpochFile(t, f.Path, "18446744073709551615\n")
		// The temporary file was renamed: the directory holds the file alone.
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(entries) != 1 || entries[0].Name() != "epoch" {
			t.Fatalf("directory holds %v, want the epoch file alone", entries)
		}
	})
	t.Run("StoreFails", func(t *testing.T) {
		f := &replication.EpochFile{Path: filepath.Join(t.TempDir(), "no-such-dir", "epoch")}
		if err := f.Store(ctx, 3); err == nil || !strings.Contains(err.Error(), "store lease epoch 3 in "+f.Path) {
			t.Fatalf("Store into a directory that does not exist: %v, want an error naming the epoch and the file", err)
		}
	})
	t.Run("Damaged", func(t *testing.T) {
		for _, content := range []string{"", "\n", "7", "07 \n", "x\n", "0\n", "-1\n", "18446744073709551616\n", "7\n8\n", strings.Repeat("9", 100) + "\n"} {
			path := filepath.Join(t.TempDir(), "epoch")
			if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			f := &replication.EpochFile{Path: path}
			e, err := f.Load(ctx)
			if err == nil || e != 0 {
				t.Fatalf("Load of %q: %d, %v; want an error", content, e, err)
			}
			for _, want := range []string{"lease epoch file " + path + " holds ", "(it is damaged)", "write the newest lease epoch of the cluster"} {
				if !strings.Contains(err.Error(), want) {
					t.Fatalf("Load of %q: %v; want it to say %q", content, err, want)
				}
			}
			// A client with the file refuses to stream: it sends no Hello.
			cl := replication.NewClient("fra-1", "fra", repltest.NewTarget(t), t.TempDir())
			cl.Epochs = f
			if err := cl.LoadEpoch(ctx); err == nil || !strings.Contains(err.Error(), path) {
				t.Fatalf("LoadEpoch with %q in the file: %v, want an error naming it", content, err)
			}
			conn := &refusingConn{}
			if _, err := cl.Session(ctx, conn); err == nil || !strings.Contains(err.Error(), path) || conn.sent != 0 {
				t.Fatalf("Session with %q in the epoch file: %v after %d frames sent; want an error naming the file and none sent", content, err, conn.sent)
			}
		}
	})
}

// refusingConn is a ClientConn that counts what is sent to it and ends
// every Recv.
type refusingConn struct{ sent int }

func (c *refusingConn) Send(*meridianv1.StreamRequest) error { c.sent++; return nil }

func (c *refusingConn) Recv() (*meridianv1.StreamResponse, error) {
	return nil, errors.New("stream closed")
}

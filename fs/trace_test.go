package fs_test

import (
	"path/filepath"
	"sync"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// TestFileSystem_CommitSpans: each transaction the mount captures gets a
// "commit" span, a child of the span CommitParent names for the time it
// committed, with its TXID, pages and bytes as the log has them; a rolled
// back transaction gets none; with no parent, a commit is traced only as
// sample says; CommitTrace finds each traced commit's span by TXID.
func TestFileSystem_CommitSpans(t *testing.T) {
	for _, mode := range journalModes {
		t.Run(mode, func(t *testing.T) {
			rec := tracetest.NewSpanRecorder()
			tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
			parent := trace.NewSpanContext(trace.SpanContextConfig{
				TraceID: trace.TraceID{1, 2, 3}, SpanID: trace.SpanID{4, 5, 6}, TraceFlags: trace.FlagsSampled, Remote: true})
			var (
				mu       sync.Mutex
				inFlight bool
				asked    []time.Time
			)
			fsys := fs.New(filepath.Join(t.TempDir(), "data"), filepath.Join(t.TempDir(), "mnt"))
			fsys.Logger = testingutil.Logger(t)
			fsys.SetTracing(tp, func(db string, at time.Time) (trace.SpanContext, []trace.Link) {
				mu.Lock()
				defer mu.Unlock()
				if db != "app.db" {
					t.Errorf("CommitParent asked about %q", db)
				}
				asked = append(asked, at)
				if inFlight {
					return parent, nil
				}
				return trace.SpanContext{}, nil
			}, 0)
			testingutil.MustOpenFS(t, fsys)
			db := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, "app.db"), mode)
			if _, err := db.Exec("CREATE TABLE t (x TEXT)"); err != nil {
				t.Fatal(err)
			}
			log := func() *ltx.Log { return fsys.DB("app.db").Log() }
			if err := fsys.DB("app.db").Flush(); err != nil {
				t.Fatal(err)
			}
			untraced := log().Pos().TXID
			if n := len(rec.Ended()); n != 0 {
				t.Fatalf("%d spans of commits with no parent and sample 0, want none", n)
			}

			mu.Lock()
			inFlight = true
			mu.Unlock()
			began := time.Now()
			for i := range 3 {
				if _, err := db.Exec("INSERT INTO t VALUES (?)", string(make([]byte, 3000+i))); err != nil {
					t.Fatal(err)
				}
			}
			tx, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec("INSERT INTO t VALUES ('rolled back')"); err != nil {
				t.Fatal(err)
			}
			if err := tx.Rollback(); err != nil {
				t.Fatal(err)
			}
			if err := fsys.DB("app.db").Flush(); err != nil {
				t.Fatal(err)
			}
			files := map[ltx.TXID]ltx.FileInfo{}
			for _, f := range log().Files() {
				files[f.Header.MaxTXID] = f
			}
			spans := rec.Ended()
			if len(spans) != 3 || log().Pos().TXID != untraced+3 {
				t.Fatalf("%d commit spans, log from txid %d to %d; want 3 spans of 3 transactions (none of the rolled back one)", len(spans), untraced, log().Pos().TXID)
			}
			for i, s := range spans {
				want := untraced + ltx.TXID(i) + 1
				attrs := map[string]int64{}
				for _, kv := range s.Attributes() {
					attrs[string(kv.Key)] = kv.Value.AsInt64()
				}
				f, ok := files[want]
				if s.Name() != "commit" || !s.Parent().Equal(parent) || s.SpanContext().TraceID() != parent.TraceID() {
					t.Errorf("span %d: %q, parent %v, want commit, parent %v", i, s.Name(), s.Parent(), parent)
				}
				if !ok || attrs["meridian.txid"] != int64(want) || attrs["meridian.bytes"] != f.Size || attrs["meridian.pages"] < 1 {
					t.Errorf("span %d: attributes %v, want txid %d, bytes %d (the log's), pages", i, attrs, want, f.Size)
				}
				if s.StartTime().Before(began) || s.EndTime().Before(s.StartTime()) {
					t.Errorf("span %d: from %v to %v, want within the transaction, after %v", i, s.StartTime(), s.EndTime(), began)
				}
				if got := fsys.CommitTrace("app.db", want); !got.Equal(s.SpanContext()) {
					t.Errorf("CommitTrace(app.db, %d) = %v, want the span's %v", want, got, s.SpanContext())
				}
			}
			if got := fsys.CommitTrace("app.db", untraced); got.IsValid() {
				t.Errorf("CommitTrace of the untraced txid %d = %v, want none", untraced, got)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(asked) < 4 {
				t.Errorf("CommitParent asked %d times, want once per commit (4 at least)", len(asked))
			}
		})
	}
}

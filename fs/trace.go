package fs

import (
	"context"
	"math/rand/v2"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/meridian-db/meridian/ltx"
)

// CommitParent tells the capture layer whose trace a commit of database db
// belongs to: the span the commit's span is a child of, given the time
// SQLite committed it (at), or an invalid SpanContext if it belongs to no
// traced request; links, if any, are spans the commit is related to (the
// requests in flight when it could not tell which one made it).
type CommitParent func(db string, at time.Time) (parent trace.SpanContext, links []trace.Link)

// tracing is how a FileSystem traces commits; nil when it does not.
type tracing struct {
	tracer trace.Tracer
	parent CommitParent
	sample float64 // of commits with no parent, the share traced
}

// traceKeep is how many commits' span contexts a database keeps for the
// replication streams to continue (CommitTrace): a stream that falls
// further behind ships untraced.
const traceKeep = 4096

// traceRing holds the span contexts of a database's recent traced commits
// by TXID.
type traceRing struct {
	mu    sync.Mutex
	byTX  map[ltx.TXID]trace.SpanContext
	order []ltx.TXID // oldest first, at most traceKeep
}

func (r *traceRing) put(txid ltx.TXID, sc trace.SpanContext) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.byTX == nil {
		r.byTX = make(map[ltx.TXID]trace.SpanContext)
	}
	if len(r.order) == traceKeep {
		delete(r.byTX, r.order[0])
		r.order = r.order[1:]
	}
	r.byTX[txid] = sc
	r.order = append(r.order, txid)
}

// remove takes back txid, the newest put: its transaction did not commit.
func (r *traceRing) remove(txid ltx.TXID) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.byTX, txid)
	if n := len(r.order); n > 0 && r.order[n-1] == txid {
		r.order = r.order[:n-1]
	}
}

func (r *traceRing) get(txid ltx.TXID) trace.SpanContext {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byTX[txid]
}

// SetTracing makes the filesystem record a "commit" span for each
// transaction it captures, from SQLite's commit point to the transaction
// being in the log, with tp's tracer: a child of the span parent names, or,
// for a commit that belongs to no traced request, the root of a trace of
// its own for a share sample (0 to 1) of them. Call it before Open.
func (f *FileSystem) SetTracing(tp trace.TracerProvider, parent CommitParent, sample float64) {
	if tp == nil {
		f.tracing = nil
		return
	}
	f.tracing = &tracing{tracer: tp.Tracer("github.com/meridian-db/meridian/fs"), parent: parent, sample: sample}
}

// CommitTrace returns the span context of the commit span of transaction
// txid of database db, if it was traced recently; an invalid one if not.
func (f *FileSystem) CommitTrace(db string, txid ltx.TXID) trace.SpanContext {
	d := f.DB(db)
	if d == nil {
		return trace.SpanContext{}
	}
	return d.traces.get(txid)
}

// commitSpan is the span of a commit under way.
type commitSpan struct {
	span trace.Span
	txid ltx.TXID
}

// beginCommit starts the commit span of the transaction SQLite committed
// at at, the next one of the log, if it is traced: before the
// transaction is in the log, so that a stream that ships it finds its
// span (CommitTrace). Either the caller holds d.mu or it is the capture
// worker: no other transaction commits meanwhile.
func (d *DB) beginCommit(at time.Time) *commitSpan {
	t := d.tracing
	if t == nil {
		return nil
	}
	var (
		parent trace.SpanContext
		links  []trace.Link
	)
	if t.parent != nil {
		parent, links = t.parent(d.Name, at)
	}
	ctx := context.Background()
	if parent.IsValid() {
		ctx = trace.ContextWithSpanContext(ctx, parent)
	} else if len(links) == 0 && t.sample < 1 && rand.Float64() >= t.sample {
		return nil
	}
	txid := d.log.Pos().TXID + 1
	_, span := t.tracer.Start(ctx, "commit", trace.WithTimestamp(at), trace.WithLinks(links...),
		trace.WithAttributes(attribute.String("meridian.db", d.Name), attribute.Int64("meridian.txid", int64(txid))))
	if !span.SpanContext().IsSampled() {
		return nil
	}
	d.traces.put(txid, span.SpanContext())
	return &commitSpan{span: span, txid: txid}
}

// endCommit ends the commit span cs once info, of pages pages, is in the
// log. A transaction that did not commit (info nil: an error, or one
// that changed nothing) leaves its span unended, so it is never exported.
func (d *DB) endCommit(cs *commitSpan, pages int, info *ltx.FileInfo) {
	if cs == nil {
		return
	}
	if info == nil || info.Header.MaxTXID != cs.txid {
		d.traces.remove(cs.txid)
		return
	}
	cs.span.SetAttributes(attribute.Int("meridian.pages", pages), attribute.Int64("meridian.bytes", info.Size))
	cs.span.End()
}

// dirtyPages counts the distinct pages in d.dirty, of the page size of
// info, the transaction they make; 0 when not tracing. Caller holds d.mu.
func (d *DB) dirtyPages(info *ltx.FileInfo) int {
	if d.tracing == nil || info == nil || info.Header.PageSize == 0 {
		return 0
	}
	pageSize := int64(info.Header.PageSize)
	seen := make(map[int64]struct{})
	for _, s := range d.dirty {
		for p := s.off / pageSize; p*pageSize < s.end; p++ {
			seen[p] = struct{}{}
		}
	}
	return len(seen)
}

package replication_test

import (
	"context"
	"io"
	"sync"
	"testing"

	"github.com/meridian-db/meridian/internal/testingutil"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
	"github.com/meridian-db/meridian/replication/internal/repltest"
)

// pipe connects a Streamer and a Client in memory.
type pipe struct {
	toPrimary chan *meridianv1.StreamRequest
	toReplica chan *meridianv1.StreamResponse
	done      chan struct{}
	once      sync.Once
}

func newPipe() *pipe {
	return &pipe{toPrimary: make(chan *meridianv1.StreamRequest), toReplica: make(chan *meridianv1.StreamResponse), done: make(chan struct{})}
}

func (p *pipe) close() { p.once.Do(func() { close(p.done) }) }

// primaryEnd and replicaEnd are the two ends of a pipe. Like a gRPC
// server stream, the primary's end fails once the context of its call is
// done.
type primaryEnd struct {
	*pipe
	ctx context.Context
}
type replicaEnd struct {
	*pipe
	ctx context.Context
	// served gets what Serve returned for this stream.
	served chan error
	// filter, if set, sees every frame to the replica and may change it.
	filter func(*meridianv1.StreamResponse)
}

func (e primaryEnd) Send(f *meridianv1.StreamResponse) error {
	select {
	case e.toReplica <- f:
		return nil
	case <-e.done:
		return io.EOF
	case <-e.ctx.Done():
		return e.ctx.Err()
	}
}

func (e primaryEnd) Recv() (*meridianv1.StreamRequest, error) {
	select {
	case f := <-e.toPrimary:
		return f, nil
	case <-e.done:
		return nil, io.EOF
	case <-e.ctx.Done():
		return nil, e.ctx.Err()
	}
}

func (e replicaEnd) Send(f *meridianv1.StreamRequest) error {
	select {
	case e.toPrimary <- f:
		return nil
	case <-e.done:
		return io.EOF
	case <-e.ctx.Done():
		return e.ctx.Err()
	}
}

func (e replicaEnd) Recv() (*meridianv1.StreamResponse, error) {
	select {
	case f := <-e.toReplica:
		if e.filter != nil {
			e.filter(f)
		}
		return f, nil
	case <-e.done:
		return nil, io.EOF
	case <-e.ctx.Done():
		return nil, e.ctx.Err()
	}
}

// awaitErr returns the error from errc, or fails the test after
// repltest.WaitTimeout saying what it waited for.
func awaitErr(tb testing.TB, errc <-chan error, what string) error {
	tb.Helper()
	return testingutil.Recv(tb, errc, repltest.WaitTimeout, what)
}

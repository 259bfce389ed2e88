package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/meridian-db/meridian/ltx"
	meridianv1 "github.com/meridian-db/meridian/proto/meridian/v1"
)

// ErrSyncTimeout is a commit that the replicas of a sync Gate did not
// acknowledge in time. The transaction is committed on the primary and
// reaches the replicas when they return; the app is told it failed.
var ErrSyncTimeout = errors.New("replicas did not acknowledge the commit in time")

// acked records a replica's ack and wakes whoever waits for acks.
func (s *Streamer) acked(r *replica, ack *meridianv1.Ack) {
	s.mu.Lock()
	defer s.mu.Unlock()
	db, txid := ack.GetDb(), ltx.TXID(ack.GetTxid())
	r.acked[db] = ltx.Pos{TXID: txid, PostApplyChecksum: ltx.Checksum(ack.GetPostApplyChecksum())}
	r.ackedAt[db] = time.Now()
	r.confirmed[db] = r.acked[db]
	if s.acks != nil {
		close(s.acks)
		s.acks = nil
	}
}

// Confirmed returns the replicas, by node name with their regions, that
// have acknowledged applying db at txid or later from this Streamer, and a
// channel closed at the next ack. An acknowledged position counts only if
// it is one of db's log as it is now: a database deleted and created
// again under the same name starts a new history, which acks of the old
// one do not confirm, however high their TXIDs.
func (s *Streamer) Confirmed(db string, txid ltx.TXID) (map[string]string, <-chan struct{}) {
	l := s.Source.Log(db)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.acks == nil {
		s.acks = make(chan struct{})
	}
	out := make(map[string]string)
	for _, r := range s.replicas {
		if p, ok := r.confirmed[db]; ok && p.TXID >= txid && l != nil && l.Contains(p) {
			out[r.node] = r.region
		}
	}
	return out, s.acks
}

// Quorum is the set of replicas that must acknowledge a transaction before
// its commit returns, in sync durability.
type Quorum struct {
	// Acks is how many replicas, at least.
	Acks int
	// Regions, if any, must each have a replica among them.
	Regions []string
}

// Met reports whether replicas (node → region) satisfy q.
func (q Quorum) Met(replicas map[string]string) bool {
	if len(replicas) < q.Acks {
		return false
	}
	for _, want := range q.Regions {
		found := false
		for _, region := range replicas {
			if region == want {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func (q Quorum) String() string {
	var parts []string
	if q.Acks > 0 {
		parts = append(parts, fmt.Sprintf("%d replica(s)", q.Acks))
	}
	if len(q.Regions) > 0 {
		parts = append(parts, "one in each of "+strings.Join(q.Regions, ", "))
	}
	if len(parts) == 0 {
		return "no replica"
	}
	return strings.Join(parts, " and ")
}

// Gate holds a commit until its transaction is on a Quorum of replicas:
// sync durability. It is the primary's, used by the capture layer once a
// transaction is in the log and before the app's commit returns.
type Gate struct {
	Streamer *Streamer
	Quorum   Quorum
	// Timeout bounds the wait. What happens then depends on Degrade.
	Timeout time.Duration
	// Degrade makes a commit that timed out return as if acknowledged, and
	// later commits return without waiting, until the quorum has caught up
	// with the last of them: async durability meanwhile, said in the log
	// and in Status. Without it a timed-out commit fails where the caller
	// can fail it, and keeps waiting where it cannot.
	Degrade bool
	Logger  *slog.Logger

	mu       sync.Mutex
	degraded map[string]ltx.TXID // by database: the last TXID let through unacknowledged
	since    time.Time           // when the gate last degraded
	timeouts uint64
	waiting  int
}

// GateStatus is what a Gate reports for status and metrics.
type GateStatus struct {
	Quorum   string
	Degraded bool
	// DegradedSince is when the gate last degraded, zero if never.
	DegradedSince time.Time
	// Timeouts counts the commits that waited past Timeout.
	Timeouts uint64
	// Waiting is how many commits wait now.
	Waiting int
}

// Status reports the gate's state.
func (g *Gate) Status() GateStatus {
	g.mu.Lock()
	defer g.mu.Unlock()
	return GateStatus{Quorum: g.Quorum.String(), Degraded: len(g.degraded) > 0, DegradedSince: g.since,
		Timeouts: g.timeouts, Waiting: g.waiting}
}

// Wait returns once the quorum has acknowledged txid of db. After Timeout
// it degrades (with Degrade), or returns ErrSyncTimeout if canFail, or
// keeps waiting with a log line every Timeout: a caller that cannot fail
// the commit (SQLite ignores the error, or would take a committed
// transaction for a failed one) must not be let through unacknowledged.
// It returns ctx's error if ctx is done first.
func (g *Gate) Wait(ctx context.Context, db string, txid ltx.TXID, canFail bool) error {
	if g.passDegraded(db, txid) {
		return nil
	}
	g.mu.Lock()
	g.waiting++
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.waiting--
		g.mu.Unlock()
	}()
	start := time.Now()
	timer := time.NewTimer(g.Timeout)
	defer timer.Stop()
	for {
		replicas, acks := g.Streamer.Confirmed(db, txid)
		if g.Quorum.Met(replicas) {
			return nil
		}
		select {
		case <-acks:
			continue
		case <-ctx.Done():
			return fmt.Errorf("commit of %s txid %d waiting for %s: %w", db, txid, g.Quorum, ctx.Err())
		case <-timer.C:
		}
		g.mu.Lock()
		g.timeouts++
		g.mu.Unlock()
		waited := time.Since(start).Round(time.Millisecond)
		have := slices.Sorted(maps.Keys(replicas))
		switch {
		case g.Degrade:
			g.degrade(db, txid, waited, have)
			return nil
		case canFail:
			g.Logger.Error("sync commit failed: replicas did not acknowledge in time; the transaction is committed here and reaches them when they return",
				"db", db, "txid", txid.String(), "waited", waited, "need", g.Quorum.String(), "acked_by", have)
			return fmt.Errorf("%w: %s txid %s, %s needed, acknowledged by %v after %v", ErrSyncTimeout, db, txid, g.Quorum, have, waited)
		default:
			g.Logger.Error("sync commit still waiting for replicas; writes to this database are held until they acknowledge",
				"db", db, "txid", txid.String(), "waited", waited, "need", g.Quorum.String(), "acked_by", have)
			timer.Reset(g.Timeout)
		}
	}
}

// Drain returns once no commit waits at the gate, or when ctx is done,
// reporting how many still wait then.
func (g *Gate) Drain(ctx context.Context) int {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if n := g.Status().Waiting; n == 0 || ctx.Err() != nil {
			return n
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
}

// passDegraded reports whether db's commit of txid goes through without
// waiting because the gate is degraded, and leaves the degraded state once
// the quorum has acknowledged the last transaction let through.
func (g *Gate) passDegraded(db string, txid ltx.TXID) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	last, ok := g.degraded[db]
	if !ok {
		return false
	}
	if replicas, _ := g.Streamer.Confirmed(db, last); g.Quorum.Met(replicas) {
		delete(g.degraded, db)
		g.Logger.Warn("sync durability restored: the replicas caught up", "db", db, "txid", last.String(),
			"degraded_for", time.Since(g.since).Round(time.Millisecond))
		return false
	}
	g.degraded[db] = max(last, txid)
	return true
}

// degrade lets db's commits through unacknowledged from txid on.
func (g *Gate) degrade(db string, txid ltx.TXID, waited time.Duration, have []string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.degraded == nil {
		g.degraded = make(map[string]ltx.TXID)
	}
	if len(g.degraded) == 0 {
		g.since = time.Now()
	}
	g.degraded[db] = max(g.degraded[db], txid)
	g.Logger.Error("sync durability degraded to async: replicas did not acknowledge in time; commits of this database no longer wait until they catch up",
		"db", db, "txid", txid.String(), "waited", waited, "need", g.Quorum.String(), "acked_by", have)
}

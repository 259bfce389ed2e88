package regiond

import (
	"encoding/json"
	"net/http"
	"sync"
	"time"
)

// Event is one line of the admin API's /events stream.
type Event struct {
	Time time.Time `json:"time"`
	// Type is what happened:
	//   - "commit": the primary recorded a transaction of DB in its log,
	//     leaving it at Pos, in Size bytes of LTX;
	//   - "role": the node became primary (Role, Epoch) or a replica of
	//     Primary;
	//   - "apply": a replica applied Files transactions of DB, up to Pos;
	//   - "snapshot": a replica applied a snapshot of DB at Pos, for
	//     Reason;
	//   - "lost": a snapshot replaced transactions of DB the primary did
	//     not have, kept in Dir;
	//   - "handoff": the primary hands the lease to Primary (Reason
	//     "started"), gave up ("abandoned: " and why), or is done (at the
	//     target's Epoch). It stepped down in between (a "role" event).
	Type    string `json:"type"`
	Node    string `json:"node"`
	DB      string `json:"db,omitempty"`
	Pos     string `json:"pos,omitempty"`
	Files   int    `json:"files,omitempty"`
	Size    int64  `json:"size,omitempty"`
	Role    string `json:"role,omitempty"`
	Primary string `json:"primary,omitempty"`
	Epoch   uint64 `json:"epoch,omitempty"`
	Reason  string `json:"reason,omitempty"`
	Dir     string `json:"dir,omitempty"`
	// Dropped counts the events before this one that the subscriber read
	// too slowly to get.
	Dropped int `json:"dropped,omitempty"`
}

// The types of Event.
const (
	EventCommit   = "commit"
	EventRole     = "role"
	EventApply    = "apply"
	EventSnapshot = "snapshot"
	EventLost     = "lost"
	EventHandoff  = "handoff"
)

// eventBuffer is how many events a subscriber may fall behind before it
// misses some.
const eventBuffer = 1024

// events fans events out to the subscribers of /events. Publishing never
// waits: a subscriber that falls eventBuffer events behind misses the
// next ones, and is told how many.
type events struct {
	node string
	mu   sync.Mutex
	subs map[*subscriber]struct{}
	done chan struct{} // closed when the admin API stops: streams end
}

type subscriber struct {
	ch      chan Event
	dropped int // guarded by events.mu
}

// listening reports whether anyone subscribes now. Publishers on a hot
// path (a commit, an apply) ask first, so that nobody listening costs
// them no event built.
func (e *events) listening() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.subs) > 0
}

// publish sends ev to every subscriber.
func (e *events) publish(ev Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.subs) == 0 {
		return
	}
	ev.Time, ev.Node = time.Now(), e.node
	for s := range e.subs {
		ev := ev
		ev.Dropped = s.dropped
		select {
		case s.ch <- ev:
			s.dropped = 0
		default:
			s.dropped++
		}
	}
}

// subscribe returns a new subscriber and the function that ends it.
func (e *events) subscribe() (*subscriber, func()) {
	s := &subscriber{ch: make(chan Event, eventBuffer)}
	e.mu.Lock()
	if e.subs == nil {
		e.subs = make(map[*subscriber]struct{})
	}
	e.subs[s] = struct{}{}
	e.mu.Unlock()
	return s, func() {
		e.mu.Lock()
		delete(e.subs, s)
		e.mu.Unlock()
	}
}

// serveEvents streams events as NDJSON until the client goes away.
func (e *events) serveEvents(w http.ResponseWriter, r *http.Request) {
	s, stop := e.subscribe()
	defer stop()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	enc := json.NewEncoder(w)
	for {
		select {
		case <-r.Context().Done():
			return
		case <-e.done:
			return
		case ev := <-s.ch:
			if err := enc.Encode(ev); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}
}

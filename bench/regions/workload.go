package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meridian-db/meridian/router"
)

// The kinds of request a client makes.
const (
	kindRead  = "read"  // GET /api/entries/{id} of a random entry
	kindWrite = "write" // POST /entries
	kindRYW   = "ryw"   // the read of the client's own entry right after its write
)

// op is one request a client made.
type op struct {
	region string
	kind   string
	at     time.Duration // from the start of the workload to the request
	took   time.Duration
	// local: the client's own region answered (the router's
	// Meridian-Served-By; for the central database, the client is in the
	// primary's region).
	local bool
	// rywWait is, for a read with a token through a router, how long the
	// router waited for the region to catch up (Meridian-RYW); rywPrimary
	// that it gave up and sent the read to the primary.
	rywWait    time.Duration
	rywPrimary bool
	// notYet: a read of a random entry that the region's database did not
	// have yet (404): written through another region and not replicated
	// here yet. Not an error: a replica is behind by its lag.
	notYet bool
	err    string
}

// target is where a client in one region sends its requests.
type target struct {
	base  string // http://host:port of the router (or the central app)
	local string // the Meridian-Served-By value of its own region's node
	// central: every request goes to one database; reads after writes
	// need no token.
	central bool
}

// workload runs the clients of every region against targets until ctx
// ends or cfg.Duration has passed, and returns what they did. maxID is
// the highest entry ID known to exist (reads pick one at random up to it),
// raised by every write.
func workload(ctx context.Context, cfg *Config, targets map[string]target, maxID *atomic.Int64) []op {
	ctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	start := time.Now()
	var (
		mu  sync.Mutex
		all []op
		wg  sync.WaitGroup
	)
	for ri, region := range cfg.Regions {
		for ci := range cfg.Clients[region] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(cfg.Seed), uint64(ri*1000+ci)))
				ops := client(ctx, cfg, region, targets[region], rng, start, maxID)
				mu.Lock()
				all = append(all, ops...)
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	return all
}

// client is one client in region: a closed loop of reads and writes with
// cfg.Think between them, each write followed by a read of its entry.
func client(ctx context.Context, cfg *Config, region string, t target, rng *rand.Rand, start time.Time, maxID *atomic.Int64) []op {
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	defer hc.CloseIdleConnections()
	var ops []op
	for ctx.Err() == nil {
		kind, id := pick(cfg, rng, maxID)
		o, w := request(ctx, hc, cfg, region, t, kind, id, "", start, maxID)
		if ctx.Err() != nil {
			break // cut off by the end of the run: not a figure
		}
		ops = append(ops, o)
		if w.id > 0 {
			o, _ := request(ctx, hc, cfg, region, t, kindRYW, w.id, w.token, start, maxID)
			if ctx.Err() != nil {
				break
			}
			ops = append(ops, o)
		}
		select {
		case <-ctx.Done():
		case <-time.After(cfg.Think):
		}
	}
	return ops
}

// pick chooses a client's next request: a write (cfg.WriteFraction of
// them) or a read of a random entry.
func pick(cfg *Config, rng *rand.Rand, maxID *atomic.Int64) (kind string, id int64) {
	if rng.Float64() < cfg.WriteFraction {
		return kindWrite, 0
	}
	return kindRead, 1 + rng.Int64N(max(1, maxID.Load()))
}

// written is the entry a write made and its read-your-writes token.
type written struct {
	id    int64
	token string
}

// request makes one request of kind from region to t: a write, a read of
// entry id, or (kindRYW) a read of entry id with token.
func request(ctx context.Context, hc *http.Client, cfg *Config, region string, t target, kind string, id int64, token string, start time.Time, maxID *atomic.Int64) (op, written) {
	o := op{region: region, kind: kind, at: time.Since(start)}
	var w written
	var req *http.Request
	switch kind {
	case kindWrite:
		body := fmt.Sprintf(`{"name":"bench-%s","message":"from %s"}`, region, region)
		req, _ = http.NewRequestWithContext(ctx, "POST", t.base+"/entries", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
	default:
		req, _ = http.NewRequestWithContext(ctx, "GET", t.base+"/api/entries/"+strconv.FormatInt(id, 10), nil)
		if token != "" && !t.central {
			req.Header.Set(router.TXIDHeader, token)
		}
	}
	began := time.Now()
	resp, err := hc.Do(req)
	var body []byte
	if err == nil {
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	o.took = time.Since(began)
	want := http.StatusOK
	if kind == kindWrite {
		want = http.StatusCreated
	}
	switch {
	case err != nil:
		o.err = err.Error()
	case kind == kindRead && resp.StatusCode == http.StatusNotFound:
		o.notYet = true
	case resp.StatusCode != want:
		o.err = fmt.Sprintf("%s %s: %s %s", req.Method, req.URL.Path, resp.Status, bytes.TrimSpace(body))
	default:
		if t.central {
			o.local = region == cfg.Primary
		} else {
			o.local = resp.Header.Get(router.ServedByHeader) == t.local
		}
		if kind == kindWrite {
			var e struct {
				ID int64 `json:"id"`
			}
			if json.Unmarshal(body, &e) == nil && e.ID > 0 {
				w = written{e.ID, resp.Header.Get(router.TXIDHeader)}
				raise(maxID, e.ID)
			}
		}
		if kind == kindRYW && !t.central {
			how, ms, _ := strings.Cut(resp.Header.Get(router.RYWHeader), " ")
			if f, err := strconv.ParseFloat(ms, 64); err == nil {
				o.rywWait = time.Duration(f * float64(time.Millisecond))
				o.rywPrimary = how == "primary"
			}
		}
	}
	return o, w
}

// maxInFlight bounds the requests of one region in flight in an open-loop
// step; an arrival beyond it is counted as an error, not sent.
const maxInFlight = 512

// openLoop offers rate requests a second from every region to targets
// for d, evenly spaced, each sent when its time comes whatever the ones
// before it are doing (a write's read of its entry follows it), waits for
// the answers of all of them, and returns what they did.
func openLoop(ctx context.Context, cfg *Config, targets map[string]target, maxID *atomic.Int64, rate int, d time.Duration) []op {
	sending, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	start := time.Now()
	var (
		mu  sync.Mutex
		all []op
		wg  sync.WaitGroup
	)
	add := func(o ...op) {
		mu.Lock()
		all = append(all, o...)
		mu.Unlock()
	}
	for ri, region := range cfg.Regions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := targets[region]
			hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: maxInFlight}}
			defer hc.CloseIdleConnections()
			rng := rand.New(rand.NewPCG(uint64(cfg.Seed), uint64(1_000_000+ri)))
			var inFlight atomic.Int64
			var reqs sync.WaitGroup
			defer reqs.Wait()
			interval := time.Second / time.Duration(rate)
			for next := start; ; next = next.Add(interval) {
				select {
				case <-sending.Done():
					return
				case <-time.After(time.Until(next)):
				}
				kind, id := pick(cfg, rng, maxID)
				if inFlight.Load() >= maxInFlight {
					add(op{region: region, kind: kind, at: next.Sub(start), err: fmt.Sprintf("overloaded: %d requests from %s in flight", maxInFlight, region)})
					continue
				}
				inFlight.Add(1)
				reqs.Add(1)
				go func() {
					defer reqs.Done()
					defer inFlight.Add(-1)
					o, w := request(ctx, hc, cfg, region, t, kind, id, "", start, maxID)
					if ctx.Err() != nil {
						return // the run was stopped
					}
					add(o)
					if w.id > 0 {
						o, _ := request(ctx, hc, cfg, region, t, kindRYW, w.id, w.token, start, maxID)
						if ctx.Err() == nil {
							add(o)
						}
					}
				}()
			}
		}()
	}
	wg.Wait()
	return all
}

// raise sets v to id if id is higher.
func raise(v *atomic.Int64, id int64) {
	for {
		old := v.Load()
		if id <= old || v.CompareAndSwap(old, id) {
			return
		}
	}
}

// post writes one entry at base and returns its ID.
func post(ctx context.Context, hc *http.Client, base, name string) (int64, error) {
	req, _ := http.NewRequestWithContext(ctx, "POST", base+"/entries", strings.NewReader(`{"name":"`+name+`","message":"bench"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusCreated {
		return 0, fmt.Errorf("POST %s/entries: %s %s", base, resp.Status, bytes.TrimSpace(body))
	}
	var e struct {
		ID int64 `json:"id"`
	}
	if err := json.Unmarshal(body, &e); err != nil || e.ID == 0 {
		return 0, fmt.Errorf("POST %s/entries: no entry ID in %q", base, body)
	}
	return e.ID, nil
}

// found reports whether base has entry id.
func found(ctx context.Context, hc *http.Client, base string, id int64) bool {
	req, _ := http.NewRequestWithContext(ctx, "GET", base+"/api/entries/"+strconv.FormatInt(id, 10), nil)
	resp, err := hc.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

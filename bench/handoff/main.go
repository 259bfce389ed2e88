// Command handoff measures how long writes stop while the primary is handed
// to another node (regiond handoff): a real Consul agent and three real
// regiond processes on loopback, all candidates; four clients write one
// row per transaction to whichever node is primary (the one whose mount
// has no .primary), as fast as they can, while the primary is handed from
// node to node. Per handoff it reports: how long the old primary held new
// writes (the handoff's own figure), the longest any write waited while
// the handoff ran (whether it then succeeded or failed), and the gap from
// the last write acknowledged by the old primary to the first by the new
// one. With -latency, every replication link between two nodes goes
// through a toxiproxy proxy that delays each direction by that much (one
// way), as between regions; the admin API and Consul stay on loopback.
//
//	make build && go run ./bench/handoff -handoffs 20 -latency 0,20ms
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	_ "github.com/mattn/go-sqlite3"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/internal/testingutil/roles"
	"github.com/meridian-db/meridian/regiond"
)

func main() {
	bin := flag.String("regiond", "bin/regiond", "regiond binary (make build)")
	handoffs := flag.Int("handoffs", 20, "handoffs per latency")
	latencies := flag.String("latency", "0,20ms", "one-way latencies between the nodes' replication links, comma-separated")
	durability := flag.String("durability", "async", "replication.durability: async or sync (sync_acks 1)")
	flag.Parse()
	exe, err := testingutil.Executable(*bin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "handoff: -regiond %v\n", err)
		os.Exit(2)
	}
	if *durability != "async" && *durability != "sync" {
		fmt.Fprintf(os.Stderr, "handoff: -durability %q: want async or sync\n", *durability)
		os.Exit(2)
	}
	lats, err := testingutil.Latencies(*latencies)
	if err != nil {
		fmt.Fprintf(os.Stderr, "handoff: -latency: %v\n", err)
		os.Exit(2)
	}
	fmt.Printf("handoff: 3 regiond nodes (all candidates, durability %s, WAL) and a Consul agent on loopback, 4 clients writing flat out, %d handoffs per latency\n\n", *durability, *handoffs)
	fmt.Printf("%8s %9s %28s %28s %28s %7s\n", "latency", "handoffs", "writes held p50/p99/max ms", "longest wait p50/p99/max ms", "write gap p50/p99/max ms", "failed")
	for _, lat := range lats {
		h := &testingutil.Harness{Prefix: "handoff"}
		var res result
		if err := h.Run(func() error { return measure(h, exe, lat, *durability, *handoffs, &res) }); err != nil {
			fmt.Fprintf(os.Stderr, "handoff: latency %v: %v\n", lat, err)
			os.Exit(1)
		}
		fmt.Printf("%8v %9d %28s %28s %28s %7d\n", lat, len(res.held), stats(res.held), stats(res.wait), stats(res.gap), res.failed)
	}
	fmt.Println("\nwrites held: from the old primary holding new writes to it handing the lease off (its own figure);")
	fmt.Println("longest wait: the longest write that was under way during the handoff, from its start to its end, acknowledged or failed;")
	fmt.Println("write gap: from the last write the old primary acknowledged to the first the new one did; failed: writes that failed, all handoffs.")
}

// result is what the handoffs of one latency measured.
type result struct {
	held, wait, gap []time.Duration
	failed          int
}

// stats returns "p50 / p99 / max" of d in milliseconds.
func stats(d []time.Duration) string {
	slices.Sort(d)
	p := func(q int) string {
		return fmt.Sprintf("%.1f", float64(d[max(0, (len(d)*q+99)/100-1)].Microseconds())/1000)
	}
	return p(50) + " / " + p(99) + " / " + p(100)
}

// write is one write of a client: where, when, and whether it was
// acknowledged.
type write struct {
	node       string
	start, end time.Time
	ok         bool
}

func measure(h *testingutil.Harness, exe string, lat time.Duration, durability string, handoffs int, res *result) error {
	agent := testingutil.StartConsul(h)
	command := func(args ...string) *exec.Cmd { return exec.Command(exe, args...) }
	specs := []testingutil.ClusterNodeSpec{{Name: "iad-1", Region: "iad"}, {Name: "fra-1", Region: "fra"}, {Name: "syd-1", Region: "syd"}}
	for i := range specs {
		specs[i].Replication = []string{"durability: " + durability, "sync_acks: 1"}
	}
	c := testingutil.NewCluster(h, command, "", specs...)
	if lat > 0 {
		if err := c.DelayLinks(h, func(_, _ *testingutil.ClusterNode) time.Duration { return lat }); err != nil {
			return err
		}
	}
	c.UseConsul(agent.URL, "check_ttl: 1s", "lock_delay: 500ms", "handoff_timeout: 5s")
	c.Start(h)
	primary, _ := roles.WaitOnePrimary(h, c, 0, time.Minute)
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(primary.MountDir, "bench.db")+"?_journal_mode=wal")
	if err != nil {
		return err
	}
	if _, err := db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY, at TEXT)`); err != nil {
		return err
	}
	_ = db.Close()
	c.Primary = primary.Name
	c.WaitCaughtUp(h, time.Minute, "bench.db")

	ctx, stop := context.WithCancel(context.Background())
	var (
		mu     sync.Mutex
		writes []write
		wg     sync.WaitGroup
	)
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				n := primaryOf(c)
				if n == nil {
					time.Sleep(time.Millisecond)
					continue
				}
				w := write{node: n.Name, start: time.Now()}
				w.ok = insert(n) == nil
				w.end = time.Now()
				mu.Lock()
				writes = append(writes, w)
				mu.Unlock()
				if !w.ok {
					time.Sleep(5 * time.Millisecond)
				}
			}
		})
	}
	defer func() { stop(); wg.Wait() }()

	type window struct {
		from, to   string
		began, end time.Time
	}
	var windows []window
	for i := range handoffs {
		time.Sleep(300 * time.Millisecond)
		var target *testingutil.ClusterNode
		for j := 1; j <= len(c.Nodes); j++ {
			if n := c.Nodes[(i+j)%len(c.Nodes)]; n != primary {
				target = n
				break
			}
		}
		began := time.Now()
		r, err := handoff(primary, target.Name)
		if err != nil {
			return fmt.Errorf("handoff %d, %s to %s: %w", i+1, primary.Name, target.Name, err)
		}
		windows = append(windows, window{primary.Name, target.Name, began, time.Now()})
		res.held = append(res.held, time.Duration(r.HeldMS*float64(time.Millisecond)))
		fmt.Fprintf(os.Stderr, "handoff %d: %s to %s, writes held %.1f ms, epoch %d\n", i+1, primary.Name, target.Name, r.HeldMS, r.Epoch)
		primary = target
	}
	time.Sleep(300 * time.Millisecond)
	stop()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	for _, w := range writes {
		if !w.ok {
			res.failed++
		}
	}
	for _, win := range windows {
		var longest time.Duration
		var lastOld, firstNew time.Time
		for _, w := range writes {
			if w.start.Before(win.end) && w.end.After(win.began) {
				longest = max(longest, w.end.Sub(w.start))
			}
			switch {
			case !w.ok:
			case w.node == win.from && w.end.Before(win.end) && w.end.After(lastOld):
				lastOld = w.end
			case w.node == win.to && w.end.After(win.began) && (firstNew.IsZero() || w.end.Before(firstNew)):
				firstNew = w.end
			}
		}
		if lastOld.IsZero() || firstNew.IsZero() {
			return fmt.Errorf("handoff %s to %s: no write acknowledged on the old primary before it or on the new one after it", win.from, win.to)
		}
		res.wait = append(res.wait, longest)
		res.gap = append(res.gap, firstNew.Sub(lastOld))
	}
	return nil
}

// primaryOf returns the node whose mount has no .primary file (the
// primary), nil if none has.
func primaryOf(c *testingutil.Cluster) *testingutil.ClusterNode {
	for _, n := range c.Nodes {
		if _, err := os.Stat(filepath.Join(n.MountDir, ".primary")); errors.Is(err, os.ErrNotExist) {
			return n
		}
	}
	return nil
}

// insert writes one row into bench.db on n's mount, on a connection of
// its own.
func insert(n *testingutil.ClusterNode) error {
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(n.MountDir, "bench.db")+"?mode=rw&_busy_timeout=5000")
	if err != nil {
		return err
	}
	defer db.Close()
	_, err = db.Exec(`INSERT INTO t (at) VALUES (?)`, time.Now().Format(time.RFC3339Nano))
	return err
}

// handoff asks node n's admin API to hand the lease to node to.
func handoff(n *testingutil.ClusterNode, to string) (regiond.HandoffResult, error) {
	var r regiond.HandoffResult
	resp, err := (&http.Client{Timeout: time.Minute}).Post("http://"+n.Admin+"/handoff?to="+to, "", nil)
	if err != nil {
		return r, err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return r, err
	}
	if resp.StatusCode != http.StatusOK {
		return r, errors.New(strings.TrimSpace(string(body)))
	}
	return r, json.Unmarshal(body, &r)
}

// Command failover measures how long a cluster on the Consul lease takes
// to take writes again after its primary is killed: a real Consul agent
// (consul agent -dev) and three real regiond processes on loopback; each
// trial kills the primary with SIGKILL and times, from the kill, the first
// write a client gets acknowledged on a surviving node, trying each every
// 10 ms; it then restarts the killed node and waits until it is a replica
// of the new primary. With -fault pause the primary is paused (SIGSTOP)
// instead, as a stalled process or a frozen VM is, and continued once
// another node took a write; it must then follow that node. Throughout,
// every running node's /status is sampled every 10 ms (a paused node's is
// not), and any sample in which two nodes say they are a ready primary is
// counted (a primary past its lease's write deadline is not ready: it
// refuses writes). Figures are medians and percentiles over the trials,
// per lease.check_ttl.
//
//	make build && go run ./bench/failover -trials 20 -check-ttls 1s,2s
package main

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	_ "github.com/mattn/go-sqlite3"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/internal/testingutil/roles"
	"github.com/meridian-db/meridian/regiond"
)

func main() {
	bin := flag.String("regiond", "bin/regiond", "regiond binary (make build)")
	trials := flag.Int("trials", 20, "primaries killed per check TTL")
	ttls := flag.String("check-ttls", "1s,2s", "lease.check_ttl values to measure, comma-separated")
	lockDelay := flag.Duration("lock-delay", 500*time.Millisecond, "lease.lock_delay")
	fault := flag.String("fault", "kill", "what happens to the primary: kill (SIGKILL, then a restart) or pause (SIGSTOP, then SIGCONT)")
	flag.Parse()
	if *fault != "kill" && *fault != "pause" {
		fmt.Fprintf(os.Stderr, "failover: -fault: %q is neither kill nor pause\n", *fault)
		os.Exit(2)
	}
	var checkTTLs []time.Duration
	for _, s := range strings.Split(*ttls, ",") {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			fmt.Fprintf(os.Stderr, "failover: -check-ttls: %q is not a duration above 0\n", s)
			os.Exit(2)
		}
		checkTTLs = append(checkTTLs, d)
	}
	exe, err := testingutil.Executable(*bin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "failover: -regiond %v\n", err)
		os.Exit(2)
	}
	fmt.Printf("failover: 3 regiond nodes (all candidates) and a Consul agent on loopback, %d trials per check TTL, lock_delay %v, primary %s\n\n", *trials, *lockDelay, map[string]string{"kill": "killed", "pause": "paused"}[*fault])
	fmt.Printf("%10s %7s %10s %10s %10s %26s\n", "check_ttl", "trials", "p50", "p99", "max", "samples with 2 primaries")
	for _, ttl := range checkTTLs {
		h := &testingutil.Harness{Prefix: "failover"}
		var res result
		err := h.Run(func() error { return measure(h, exe, ttl, *lockDelay, *trials, *fault == "pause", &res) })
		if err != nil {
			fmt.Fprintf(os.Stderr, "failover: check_ttl %v: %v\n", ttl, err)
			os.Exit(1)
		}
		slices.Sort(res.times)
		fmt.Printf("%10v %7d %10v %10v %10v %15d of %-10d\n", ttl, len(res.times), pct(res.times, 50), pct(res.times, 99), res.times[len(res.times)-1].Round(time.Millisecond), res.both, res.samples)
	}
	if *fault == "pause" {
		fmt.Println("\nfrom SIGSTOP of the primary to the first write acknowledged on another node.")
	} else {
		fmt.Println("\nfrom SIGKILL of the primary to the first write acknowledged on another node; LiteFS (Consul lease) waits out its 10 s session TTL plus its lock delay.")
	}
}

// result is what the trials of one check TTL measured.
type result struct {
	times         []time.Duration
	both, samples int
}

// pct returns the p-th percentile of sorted d, nearest rank.
func pct(d []time.Duration, p int) time.Duration {
	i := max(0, (len(d)*p+99)/100-1)
	return d[i].Round(time.Millisecond)
}

func measure(h *testingutil.Harness, exe string, ttl, lockDelay time.Duration, trials int, pause bool, res *result) error {
	agent := testingutil.StartConsul(h)
	command := func(args ...string) *exec.Cmd { return exec.Command(exe, args...) }
	specs := []testingutil.ClusterNodeSpec{{Name: "iad-1", Region: "iad"}, {Name: "fra-1", Region: "fra"}, {Name: "syd-1", Region: "syd"}}
	c := testingutil.NewCluster(h, command, "", specs...)
	c.UseConsul(agent.URL, "check_ttl: "+ttl.String(), "lock_delay: "+lockDelay.String())
	c.Start(h)
	primary, epoch := roles.WaitOnePrimary(h, c, 0, time.Minute)
	if err := write(primary, 0); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	defer func() { cancel(); <-sampled }()
	var mu sync.Mutex
	var paused *testingutil.ClusterNode // a paused node answers nothing
	// Samples roles.
	go func() {
		defer close(sampled)
		for ctx.Err() == nil {
			n := 0
			for _, node := range c.Nodes {
				mu.Lock()
				skip := node == paused
				mu.Unlock()
				if skip {
					continue
				}
				// A primary past its lease's write deadline says it is
				// not ready: it refuses writes.
				if st, err := roles.Status(node); err == nil && st.Role == regiond.RolePrimary && st.Ready {
					n++
				}
			}
			mu.Lock()
			res.samples++
			if n > 1 {
				res.both++
			}
			mu.Unlock()
			time.Sleep(10 * time.Millisecond)
		}
	}()
	for trial := range trials {
		killed := time.Now()
		if pause {
			pid := primary.Pid()
			mu.Lock()
			paused = primary
			mu.Unlock()
			if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
				return err
			}
			took, next, err := firstWrite(c, primary, trial+1, killed, time.Minute)
			if cerr := syscall.Kill(pid, syscall.SIGCONT); cerr != nil && err == nil {
				err = cerr
			}
			mu.Lock()
			paused = nil
			mu.Unlock()
			if err != nil {
				return err
			}
			res.times = append(res.times, took)
			fmt.Fprintf(os.Stderr, "trial %d: %s paused, %s took a write %v later\n", trial+1, primary.Name, next.Name, took.Round(time.Millisecond))
			if primary, epoch = roles.WaitOnePrimary(h, c, epoch, time.Minute); primary != next {
				return fmt.Errorf("%s took writes, then %s was primary", next.Name, primary.Name)
			}
			continue
		}
		primary.Kill(h)
		took, next, err := firstWrite(c, primary, trial+1, killed, time.Minute)
		if err != nil {
			return err
		}
		res.times = append(res.times, took)
		fmt.Fprintf(os.Stderr, "trial %d: %s killed, %s took a write %v later\n", trial+1, primary.Name, next.Name, took.Round(time.Millisecond))
		primary.Start(h)
		primary, epoch = roles.WaitOnePrimary(h, c, epoch, time.Minute)
		if primary != next {
			return fmt.Errorf("%s took writes, then %s was primary", next.Name, primary.Name)
		}
	}
	return nil
}

// firstWrite tries a write on every running node but dead every 10 ms and
// returns how long after start the first succeeded, and where.
func firstWrite(c *testingutil.Cluster, dead *testingutil.ClusterNode, id int, start time.Time, timeout time.Duration) (time.Duration, *testingutil.ClusterNode, error) {
	for time.Since(start) < timeout {
		for _, n := range c.Nodes {
			if n == dead || !n.Running() {
				continue
			}
			if write(n, id) == nil {
				return time.Since(start), n, nil
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	return 0, nil, fmt.Errorf("no node took a write in %v after the primary was killed", timeout)
}

// write inserts row id into bench.db on n's mount, through a connection of
// its own (one opened while the mount was read-only stays read-only).
func write(n *testingutil.ClusterNode, id int) error {
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(n.MountDir, "bench.db")+"?_journal_mode=wal&_busy_timeout=1000")
	if err != nil {
		return err
	}
	defer db.Close()
	_, err = db.Exec(`CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, at TEXT); INSERT INTO t VALUES (?, ?)`, id, time.Now().Format(time.RFC3339Nano))
	return err
}

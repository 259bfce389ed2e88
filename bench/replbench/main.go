// Command replbench measures replication across real regiond processes on
// loopback, with mutual TLS and FUSE mounts as in production: the lag from
// a COMMIT returning on the primary to the transaction being applied on
// each replica, at paced and at maximum commit rates, with one and with
// three replicas; how fast replicas apply compared with how fast the
// primary commits; warm point queries on a replica's mount, with nothing
// being applied, against the same queries on a bare copy of its database;
// and how fast a node joining from scratch receives a snapshot, compared
// with copying the database file on the same disk.
//
// A transaction counts as applied on a replica when its LTX file is in the
// replica's log and its pages are in the database file: when the log's
// .applying marker naming it (or the first file of its group) is emptied,
// seen through inotify. Every
// process runs on this machine, so one clock serves both ends.
//
//	go run ./bench/replbench -regiond bin/regiond
//
// It needs root and fuse3, like regiond.
package main

import (
	"bufio"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
	"unsafe"

	_ "github.com/mattn/go-sqlite3"
	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

type options struct {
	regiond    string
	duration   time.Duration
	rates      []int // transactions a second; 0 is as fast as possible
	maxTx      int
	replicas   []int
	snapshotMB int
	poll       bool
	// pollEvery is the time from one of the reader's queries to the
	// next; 0: back to back.
	pollEvery  time.Duration
	litefs     string // LiteFS binary to measure beside regiond ("": none)
	sync       string // the writer's synchronous setting: NORMAL or FULL
	journal    string // the writer's journal mode: WAL or DELETE
	cpuProfile string // directory for the regiond processes' CPU profiles ("": none)
	// replicaLocks is the fs.locks of the replicas and of the joining
	// node: mount or kernel.
	replicaLocks string
	warmReads    bool
	// joinTmpfs puts the joining node's data_dir on /dev/shm.
	joinTmpfs bool
	// joinApp is what the app writes to big.db during the join: "64k"
	// (one 64 KiB row rewritten per transaction, flat out) or "small" (one
	// small row inserted per transaction, 500 a second).
	joinApp string
	// pin runs the primary and the replicas on CPUs of their own.
	pin bool
	// trace is a file to write each transaction's times to ("": none).
	trace string
}

func main() {
	var o options
	var rates, replicas string
	flag.StringVar(&o.regiond, "regiond", "bin/regiond", "regiond binary (make build)")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "how long each paced rate runs")
	flag.StringVar(&rates, "rates", "100,1000,max", "commit rates to measure, transactions a second, or max")
	flag.IntVar(&o.maxTx, "max-tx", 5000, "transactions committed at the maximum rate")
	flag.StringVar(&replicas, "replicas", "1,3", "replica counts to measure")
	flag.IntVar(&o.snapshotMB, "snapshot-mb", 100, "size of the database a joining node receives as a snapshot, MB (0: skip)")
	flag.StringVar(&o.joinApp, "join-app", "64k", "what the app writes to the joining database meanwhile: 64k (one 64 KiB row rewritten per transaction, flat out) or small (one small row inserted per transaction, 500 a second)")
	flag.BoolVar(&o.joinTmpfs, "join-tmpfs", false, "put the joining node's data_dir on /dev/shm, so that the join's writes do not share the primary's disk, as on separate machines")
	flag.StringVar(&o.litefs, "litefs", "", "also measure LiteFS, the litefs binary at this path, with one replica (scripts/install-litefs.sh builds v0.5.14)")
	flag.StringVar(&o.sync, "synchronous", "NORMAL", "the writer's PRAGMA synchronous on the primary: NORMAL or FULL")
	flag.StringVar(&o.journal, "journal", "WAL", "the writer's PRAGMA journal_mode on the primary: WAL or DELETE")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write each regiond's CPU profile to this `dir`ectory, as NODE-REPLICAS.pprof")
	flag.BoolVar(&o.poll, "poll", true, "poll the first replica with a reader during each rate (false: lag alone, no reader on the replica)")
	flag.DurationVar(&o.pollEvery, "poll-every", 0, "start the replica reader's queries this often (0: back to back, a CPU's worth)")
	flag.StringVar(&o.replicaLocks, "replica-locks", "mount", "fs.locks of the replicas and of the joining node: mount or kernel (the primary's is kernel)")
	flag.BoolVar(&o.pin, "pin", false, "run as if on separate machines of one CPU each: the primary, the writer and the watchers on CPU 0; the replicas, the joining node and the replica's reader on CPU 1 (with several replicas they share it)")
	flag.StringVar(&o.trace, "trace", "", "write each transaction's times (commit, in the primary's log, in the first replica's log, applied there) to this `file`, CSV, one set of rows per rate")
	flag.BoolVar(&o.warmReads, "warm-reads", true, "after the rates with one replica, time warm point queries on its mount against a bare copy of the database")
	flag.Parse()
	for _, r := range strings.Split(rates, ",") {
		if r == "max" {
			o.rates = append(o.rates, 0)
		} else if n, err := strconv.Atoi(r); err == nil && n > 0 {
			o.rates = append(o.rates, n)
		} else {
			fmt.Fprintf(os.Stderr, "replbench: -rates: %q is not a rate (a number of transactions a second, or max)\n", r)
			os.Exit(2)
		}
	}
	for _, r := range strings.Split(replicas, ",") {
		n, err := strconv.Atoi(r)
		if err != nil || n < 1 || n > len(replicaSpecs) {
			fmt.Fprintf(os.Stderr, "replbench: -replicas: %q is not a count from 1 to %d\n", r, len(replicaSpecs))
			os.Exit(2)
		}
		o.replicas = append(o.replicas, n)
	}
	if o.journal != "WAL" && o.journal != "DELETE" {
		fmt.Fprintf(os.Stderr, "replbench: -journal: %q is not WAL or DELETE\n", o.journal)
		os.Exit(2)
	}
	if o.sync != "NORMAL" && o.sync != "FULL" {
		fmt.Fprintf(os.Stderr, "replbench: -synchronous: %q is not NORMAL or FULL\n", o.sync)
		os.Exit(2)
	}
	if o.replicaLocks != "mount" && o.replicaLocks != "kernel" {
		fmt.Fprintf(os.Stderr, "replbench: -replica-locks: %q is not mount or kernel\n", o.replicaLocks)
		os.Exit(2)
	}
	if _, err := os.Stat(o.regiond); err != nil {
		fmt.Fprintf(os.Stderr, "replbench: regiond binary: %v; build it with `make build` or pass -regiond PATH\n", err)
		os.Exit(2)
	}
	if o.pin {
		err := checkPin()
		if err == nil {
			err = pinProcess(primaryCPU)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "replbench: %v\n", err)
			os.Exit(2)
		}
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "replbench: %v\n", err)
		os.Exit(1)
	}
}

var (
	primarySpec  = testingutil.ClusterNodeSpec{Name: "iad-1", Region: "iad", Locks: "kernel"}
	replicaSpecs = []testingutil.ClusterNodeSpec{{Name: "fra-1", Region: "fra"}, {Name: "syd-1", Region: "syd"}, {Name: "gru-1", Region: "gru"}}
	joinerSpec   = testingutil.ClusterNodeSpec{Name: "lhr-1", Region: "lhr"}
)

// row is one measurement: a rate on a cluster.
type row struct {
	replicas      int
	target        int // 0: max
	n             int
	commitRate    float64
	p50, p99, max time.Duration
	// logged: from COMMIT returning on the primary to the transaction's
	// LTX file in the primary's log.
	logP50, logP99 time.Duration
	applyRate      float64 // of the slowest replica
	// visible: from COMMIT returning on the primary to a reader polling
	// the first replica through its mount seeing the row; reads: that
	// reader's queries meanwhile.
	visP50, visP99, visMax    time.Duration
	reads, readErrs           int
	readP50, readP99, readMax time.Duration
	litefs                    bool // measured on LiteFS: no lag
}

// results is what a run measured.
type results struct {
	rows []row
	snap *snapshotResult // nil: not measured
	warm *warmResult     // nil: not measured
}

func run(o options) error {
	h := &testingutil.Harness{Prefix: "replbench"}
	return h.Run(func() error { return runAll(h, o) })
}

func runAll(h *testingutil.Harness, o options) error {
	fmt.Printf("replbench: %d CPUs, regiond %s, %s with synchronous=%s on the primary (fs.locks: kernel), replicas with fs.locks: %s\n\n", runtime.NumCPU(), o.regiond, o.journal, o.sync, o.replicaLocks)
	var res results
	for _, n := range o.replicas {
		if err := measureCluster(h, o, n, &res); err != nil {
			return err
		}
		h.Close()
	}
	if o.litefs != "" {
		rs, err := measureLiteFS(h, o, o.litefs)
		if err != nil {
			return err
		}
		res.rows = append(res.rows, rs...)
	}
	printRows(os.Stdout, res.rows)
	if res.warm != nil {
		res.warm.print(os.Stdout)
	}
	if res.snap != nil {
		res.snap.print(os.Stdout)
	}
	return nil
}

// measureCluster runs the rates on a cluster of a primary and n replicas,
// and, with one replica, the warm reads and the snapshot of a joining node,
// adding what it measured to res.
func measureCluster(h *testingutil.Harness, o options, n int, res *results) error {
	specs := append([]testingutil.ClusterNodeSpec{primarySpec}, replicaSpecs[:n]...)
	join := n == 1 && o.snapshotMB > 0
	if join {
		specs = append(specs, joinerSpec)
	}
	for i := 1; i < len(specs); i++ {
		specs[i].Locks = o.replicaLocks
	}
	command := func(args ...string) *exec.Cmd {
		// The node's directory, which holds its config, the last
		// argument, is named after the node.
		node := filepath.Base(filepath.Dir(args[len(args)-1]))
		if o.cpuProfile != "" && len(args) > 0 && args[0] == "run" {
			args = append(args, "-cpuprofile", filepath.Join(o.cpuProfile, fmt.Sprintf("%s-%d.pprof", node, n)))
		}
		cpu := replicaCPU
		if node == primarySpec.Name {
			cpu = primaryCPU
		}
		return pinnedCommand(o.pin, cpu, o.regiond, args...)
	}
	c := testingutil.NewCluster(h, command, primarySpec.Name, specs...)
	for _, node := range c.Nodes {
		if node.Name != joinerSpec.Name {
			node.Start(h)
		}
	}
	primary := c.Node(primarySpec.Name)
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(primary.MountDir, "bench.db")+o.writerParams())
	if err != nil {
		return err
	}
	db.SetMaxOpenConns(1)
	h.Cleanup(func() { _ = db.Close() })
	if _, err := db.Exec(`CREATE TABLE tx (id INTEGER PRIMARY KEY, v BLOB)`); err != nil {
		return err
	}
	replicas := c.Nodes[1 : n+1]
	c.WaitCaughtUp(h, time.Minute, "bench.db")
	if err := waitSpares(c, time.Minute); err != nil {
		return err
	}
	logged, err := watchApplies(filepath.Join(primary.DataDir, "dbs", "bench.db", "ltx"), true)
	if err != nil {
		return err
	}
	h.Cleanup(logged.close)
	var watchers []*applyWatcher
	for _, r := range replicas {
		w, err := watchApplies(filepath.Join(r.DataDir, "dbs", "bench.db", "ltx"), false)
		if err != nil {
			return err
		}
		h.Cleanup(w.close)
		watchers = append(watchers, w)
	}
	for _, rate := range o.rates {
		count := o.maxTx
		if rate > 0 {
			count = int(float64(rate) * o.duration.Seconds())
		}
		fmt.Fprintf(os.Stderr, "%d replica(s), %s: %d transactions\n", n, rateName(rate), count)
		r, err := measureRate(h, c, db, logged, watchers, rate, count, o.poll, o.pollEvery, o.pin, o.trace)
		if err != nil {
			return err
		}
		r.replicas = n
		res.rows = append(res.rows, r)
	}
	if n == 1 && o.warmReads {
		if res.warm, err = measureWarmReads(h, c, replicas[0]); err != nil {
			return err
		}
	}
	if join {
		if res.snap, err = measureSnapshot(h, c, o.snapshotMB, o.joinTmpfs, o.joinApp); err != nil {
			return err
		}
	}
	return nil
}

// writerParams returns the query parameters of the writer's database name.
func (o options) writerParams() string {
	return "?_journal_mode=" + o.journal + "&_synchronous=" + o.sync + "&_busy_timeout=5000"
}

// waitSpares waits until the primary has created its spare files
// (fs.DefaultSpareFill), as a node that has run for a while has them:
// measuring while they are created measures the creating. Replicas, whose
// logs are segmented, create none.
func waitSpares(c *testingutil.Cluster, timeout time.Duration) error {
	began := time.Now()
	for _, node := range c.Nodes {
		if !node.Running() || node.Name != c.Primary {
			continue
		}
		for {
			entries, err := os.ReadDir(filepath.Join(node.DataDir, "spare"))
			if err == nil && len(entries) >= fs.DefaultSpareFill {
				break
			}
			if time.Since(began) > timeout {
				return fmt.Errorf("%s: %d spare files after %v, want %d", node.Name, len(entries), timeout, fs.DefaultSpareFill)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	fmt.Fprintf(os.Stderr, "spare files ready on the primary after %v\n", time.Since(began).Round(time.Millisecond))
	return nil
}

// measureRate commits count single-row transactions at rate (0: as fast
// as possible) and measures when each is applied on every replica, and
// when a reader polling the first replica through its mount sees it.
func measureRate(h *testingutil.Harness, c *testingutil.Cluster, db *sql.DB, logged *applyWatcher, watchers []*applyWatcher, rate, count int, poll bool, pollEvery time.Duration, pin bool, trace string) (row, error) {
	primary := c.Node(c.Primary)
	base, _ := primary.Pos(h, "bench.db")
	var lastID int64
	if err := db.QueryRow(`SELECT coalesce(max(id), 0) FROM tx`).Scan(&lastID); err != nil {
		return row{}, err
	}
	var reader *pollReader
	if poll {
		var err error
		if reader, err = startPollReader(filepath.Join(c.Nodes[1].MountDir, "bench.db"), lastID, count, pollEvery, pin); err != nil {
			return row{}, err
		}
		defer reader.stopReading()
	}
	commits, err := commitRows(db, rate, count)
	if err != nil {
		return row{}, err
	}
	pos := c.WaitCaughtUp(h, 10*time.Minute, "bench.db")
	if got, want := pos["bench.db"].TXID, base.TXID+ltx.TXID(count); got != want {
		return row{}, fmt.Errorf("primary at txid %v after %d single-row commits from %v, want %v", got, count, base.TXID, want)
	}
	r := row{target: rate, n: count, commitRate: float64(count-1) / commits[count-1].Sub(commits[0]).Seconds()}
	inLog, err := logged.wait(base.TXID+1, base.TXID+ltx.TXID(count), 30*time.Second)
	if err != nil {
		return row{}, fmt.Errorf("the primary's log: %w", err)
	}
	logLags := make([]time.Duration, count)
	for i := range count {
		logLags[i] = inLog[i].Sub(commits[i])
	}
	slices.Sort(logLags)
	r.logP50, r.logP99 = logLags[count/2], logLags[count*99/100]
	lags := make([]time.Duration, count)
	r.applyRate = -1
	for i, w := range watchers {
		applied, err := w.wait(base.TXID+1, base.TXID+ltx.TXID(count), 30*time.Second)
		if err != nil {
			return row{}, err
		}
		if i == 0 && trace != "" {
			if err := writeTrace(trace, rate, base.TXID+1, commits, inLog, w, applied); err != nil {
				return row{}, err
			}
		}
		for i := range count {
			lags[i] = max(lags[i], applied[i].Sub(commits[i]))
		}
		rate := float64(count-1) / applied[count-1].Sub(applied[0]).Seconds()
		if r.applyRate < 0 || rate < r.applyRate {
			r.applyRate = rate
		}
	}
	slices.Sort(lags)
	r.p50, r.p99, r.max = lags[count/2], lags[count*99/100], lags[count-1]
	r.reads = -1
	if reader == nil {
		return r, nil
	}
	return r, reader.result(&r, commits)
}

// writeTrace appends a row a transaction to the CSV file path: the rate,
// the TXID, when its COMMIT returned (µs from the first one), and the
// µs from then to its file in the primary's log, to its record in the
// replica's log (w), and to its apply there.
func writeTrace(path string, rate int, first ltx.TXID, commits, inLog []time.Time, w *applyWatcher, applied []time.Time) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	bw := bufio.NewWriter(f)
	if st, err := f.Stat(); err == nil && st.Size() == 0 {
		fmt.Fprintln(bw, "rate,txid,commit_us,primary_log_us,replica_log_us,applied_us")
	}
	us := func(d time.Duration) int64 { return d.Microseconds() }
	w.mu.Lock()
	for i, c := range commits {
		id := first + ltx.TXID(i)
		rl := int64(-1)
		if t, ok := w.logged[id]; ok {
			rl = us(t.Sub(c))
		}
		fmt.Fprintf(bw, "%s,%d,%d,%d,%d,%d\n", rateName(rate), id, us(c.Sub(commits[0])), us(inLog[i].Sub(c)), rl, us(applied[i].Sub(c)))
	}
	w.mu.Unlock()
	return errors.Join(bw.Flush(), f.Close())
}

// commitRows commits count single-row transactions to db at rate (0: as
// fast as possible), and returns when each COMMIT returned.
func commitRows(db *sql.DB, rate, count int) ([]time.Time, error) {
	commits := make([]time.Time, count)
	start := time.Now()
	for i := range count {
		if rate > 0 {
			if d := time.Until(start.Add(time.Duration(i) * time.Second / time.Duration(rate))); d > 0 {
				time.Sleep(d)
			}
		}
		if _, err := db.Exec(`INSERT INTO tx (v) VALUES (randomblob(100))`); err != nil {
			return nil, fmt.Errorf("commit %d: %w", i, err)
		}
		commits[i] = time.Now()
	}
	return commits, nil
}

// result waits until the reader has seen every row committed at commits,
// stops it, and puts what it measured into r.
func (reader *pollReader) result(r *row, commits []time.Time) error {
	count := len(commits)
	if err := reader.waitSeen(30 * time.Second); err != nil {
		return err
	}
	reader.stopReading()
	vis := make([]time.Duration, count)
	for i := range count {
		vis[i] = reader.seen[i].Sub(commits[i])
	}
	slices.Sort(vis)
	r.visP50, r.visP99, r.visMax = vis[count/2], vis[count*99/100], vis[count-1]
	lat := reader.latencies
	slices.Sort(lat)
	r.reads, r.readErrs = len(lat), reader.errs
	if len(lat) > 0 {
		r.readP50, r.readP99, r.readMax = lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
	}
	if reader.firstErr != nil {
		fmt.Fprintf(os.Stderr, "replica reader: %d errors, the first: %v\n", reader.errs, reader.firstErr)
	}
	return nil
}

// pollReader queries a replica through its mount as fast as it can, as an
// app reading locally would (one connection, a 5 s busy timeout), and
// records when it first sees each of count rows after base, and how long
// each query took.
type pollReader struct {
	db        *sql.DB
	base      int64
	every     time.Duration // between the starts of two queries; 0: back to back
	stop      chan struct{}
	done      chan struct{}
	stopOnce  sync.Once
	mu        sync.Mutex
	seen      []time.Time // by row: id - base - 1
	nSeen     int
	latencies []time.Duration
	errs      int
	firstErr  error
}

// startPollReader starts a pollReader of the database at path, on the
// replicas' CPU if pin.
func startPollReader(path string, base int64, count int, every time.Duration, pin bool) (*pollReader, error) {
	db, err := openReader(path, "")
	if err != nil {
		return nil, err
	}
	r := &pollReader{db: db, base: base, every: every, stop: make(chan struct{}), done: make(chan struct{}), seen: make([]time.Time, count)}
	started := make(chan error, 1)
	go r.run(pin, started)
	if err := <-started; err != nil {
		<-r.done
		_ = db.Close()
		return nil, err
	}
	return r, nil
}

func (r *pollReader) run(pin bool, started chan<- error) {
	defer close(r.done)
	if pin {
		// Its queries run on this goroutine's thread (cgo).
		unpin, err := pinThread(replicaCPU)
		if err != nil {
			started <- err
			return
		}
		defer unpin()
	}
	started <- nil
	last := r.base
	next := time.Now()
	for {
		if r.every > 0 {
			next = next.Add(r.every)
			if d := time.Until(next); d > 0 {
				time.Sleep(d)
			} else {
				next = time.Now() // late: no burst to catch up
			}
		}
		select {
		case <-r.stop:
			return
		default:
		}
		start := time.Now()
		var m int64
		err := r.db.QueryRow(`SELECT coalesce(max(id), 0) FROM tx`).Scan(&m)
		now := time.Now()
		r.mu.Lock()
		r.latencies = append(r.latencies, now.Sub(start))
		if err != nil {
			r.errs++
			if r.firstErr == nil {
				r.firstErr = err
			}
		}
		for ; err == nil && last < m; last++ {
			if i := last - r.base; i < int64(len(r.seen)) {
				r.seen[i] = now
				r.nSeen++
			}
		}
		r.mu.Unlock()
	}
}

// waitSeen waits until the reader has seen every row, or fails after
// timeout.
func (r *pollReader) waitSeen(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		r.mu.Lock()
		n := r.nSeen
		r.mu.Unlock()
		if n == len(r.seen) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the replica's reader saw %d of %d rows in %v", n, len(r.seen), timeout)
		}
		time.Sleep(time.Millisecond)
	}
}

// stopReading stops the reader and closes its connection; it may be
// called again.
func (r *pollReader) stopReading() {
	r.stopOnce.Do(func() {
		close(r.stop)
		<-r.done
		_ = r.db.Close()
	})
}

// snapshotResult is what a node joining from scratch took, and what the
// app writing the primary meanwhile saw.
type snapshotResult struct {
	bytes      int64
	join, copy time.Duration
	// app is the app's writes to big.db meanwhile (-join-app); before and
	// during are their commit latencies for beforeFor before the join
	// and during it, sorted.
	app            string
	beforeFor      time.Duration
	before, during []time.Duration
	// read is the primary's log line about the snapshot it read.
	read string
}

// measureSnapshot makes a database of about mb megabytes on the primary,
// starts a node that has none of the cluster's databases, and times until
// it is at the primary's positions; then it times copying the primary's
// backing files, with an fsync, on the same disk.
func measureSnapshot(h *testingutil.Harness, c *testingutil.Cluster, mb int, tmpfs bool, app string) (*snapshotResult, error) {
	if app != "64k" && app != "small" {
		return nil, fmt.Errorf("-join-app %q: want 64k or small", app)
	}
	primary := c.Node(c.Primary)
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(primary.MountDir, "big.db")+"?_journal_mode=wal&_synchronous=NORMAL")
	if err != nil {
		return nil, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(`CREATE TABLE b (v BLOB); CREATE TABLE s (id INTEGER PRIMARY KEY, v TEXT)`); err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "snapshot: writing a %d MB database\n", mb)
	for range mb {
		if _, err := db.Exec(`WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 16) INSERT INTO b SELECT randomblob(65536) FROM s`); err != nil {
			return nil, err
		}
	}
	if _, err := db.Exec(`PRAGMA wal_checkpoint(TRUNCATE)`); err != nil {
		return nil, err
	}
	dbs := []string{"bench.db", "big.db"}
	c.WaitCaughtUp(h, 10*time.Minute, dbs...)
	res := &snapshotResult{app: app}
	for _, name := range dbs {
		fi, err := os.Stat(primary.BackingFile(name))
		if err != nil {
			return nil, err
		}
		res.bytes += fi.Size()
	}
	joiner := c.Node(joinerSpec.Name)
	if tmpfs {
		dir, err := os.MkdirTemp("/dev/shm", "replbench-join-")
		if err != nil {
			return nil, fmt.Errorf("data_dir on tmpfs: %w", err)
		}
		defer func() { _ = os.RemoveAll(dir) }()
		if err := os.RemoveAll(joiner.DataDir); err != nil {
			return nil, err
		}
		if err := os.Symlink(dir, joiner.DataDir); err != nil {
			return nil, fmt.Errorf("data_dir on tmpfs: %w", err)
		}
		fmt.Fprintf(os.Stderr, "snapshot: %s keeps its data_dir in %s\n", joiner.Name, dir)
	}

	// The app goes on writing from a while before the join to its end:
	// one 64 KiB row per transaction, anywhere in the database, flat out
	// (for a second before), or a small row, 500 a second (for 5 s
	// before, about as long as a join takes).
	var (
		mu    sync.Mutex
		spans [][2]time.Time
		werr  error
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		rows := mb * 16
		next := time.Now()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			var err error
			began := time.Now()
			if app == "small" {
				if wait := time.Until(next); wait > 0 {
					time.Sleep(wait)
				}
				next = next.Add(2 * time.Millisecond)
				began = time.Now()
				_, err = db.Exec(`INSERT INTO s (v) VALUES ('a small row of text')`)
			} else {
				_, err = db.Exec(`UPDATE b SET v = randomblob(65536) WHERE rowid = ?`, 1+(i*7919)%rows)
			}
			mu.Lock()
			spans = append(spans, [2]time.Time{began, time.Now()})
			werr = err
			mu.Unlock()
			if err != nil {
				return
			}
		}
	})
	before := time.Second
	if app == "small" {
		before = 5 * time.Second
	}
	time.Sleep(before)
	res.beforeFor = before
	fmt.Fprintf(os.Stderr, "snapshot: %s joins\n", joiner.Name)
	start := time.Now()
	want := make(map[string]ltx.Pos)
	for _, name := range dbs {
		want[name], _ = primary.Pos(h, name)
	}
	joiner.Start(h)
	for _, name := range dbs {
		joiner.WaitPos(h, name, 10*time.Minute, want[name].String(), func(p ltx.Pos) bool { return p.TXID >= want[name].TXID })
	}
	res.join = time.Since(start)
	joined := time.Now()
	close(stop)
	wg.Wait()
	if werr != nil {
		return nil, fmt.Errorf("writer during the join: %w", werr)
	}
	for _, sp := range spans {
		switch {
		case sp[0].Before(start.Add(-before)):
		case sp[1].Before(start):
			res.before = append(res.before, sp[1].Sub(sp[0]))
		case sp[0].Before(joined):
			res.during = append(res.during, sp[1].Sub(sp[0]))
		}
	}
	slices.Sort(res.before)
	slices.Sort(res.during)
	for line := range strings.SplitSeq(primary.Log(), "\n") {
		if strings.Contains(line, "snapshot read") && strings.Contains(line, "db=big.db") {
			res.read = line
		}
	}
	c.WaitCaughtUp(h, 10*time.Minute, dbs...)
	start = time.Now()
	for _, name := range dbs {
		if err := copyFile(primary.BackingFile(name), filepath.Join(h.TempDir(), name)); err != nil {
			return nil, err
		}
	}
	res.copy = time.Since(start)
	return res, nil
}

// copyFile copies src to dst and fsyncs it, as a baseline for a snapshot.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}

// indexRecordSize is the size of a record of a segment's index.
const indexRecordSize = 56

// applyWatcher records when each transaction is committed to the log of
// the primary, or applied by a replica (see watchApplies).
type applyWatcher struct {
	dir      string
	fd       int
	atRename bool // a transaction counts when its file is renamed in
	mu       sync.Mutex
	applied  map[ltx.TXID]time.Time
	logged   map[ltx.TXID]time.Time // a replica's: when its record was written
	records  map[string]int         // index records seen, by index file
	err      error
	done     chan struct{}
}

// watchApplies watches a log directory, and the database's directory
// above it. With atRename (the primary's log) a transaction counts when
// its LTX file is renamed in, or, in a segment, when its index record is
// written (the index's size, read at the event, says how many records it
// holds). Otherwise (a replica's) the files of a group count once they
// are in the log (renamed in, or their index records written) and then
// their pages in the database: at the next write of the wal-index the
// replica publishes to its readers (WAL mode; its header is written last,
// microseconds later), of the database file (rollback mode, before its
// fsync), or when the .applying marker of a group of files of their own
// is emptied.
func watchApplies(dir string, atRename bool) (*applyWatcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_MOVED_TO|unix.IN_MODIFY); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("watch %s: %w", dir, err)
	}
	if _, err := unix.InotifyAddWatch(fd, filepath.Dir(dir), unix.IN_MODIFY); err != nil {
		_ = unix.Close(fd)
		return nil, fmt.Errorf("watch %s: %w", filepath.Dir(dir), err)
	}
	w := &applyWatcher{dir: dir, fd: fd, atRename: atRename, applied: make(map[ltx.TXID]time.Time), logged: make(map[ltx.TXID]time.Time), records: make(map[string]int), done: make(chan struct{})}
	go w.run()
	return w, nil
}

func (w *applyWatcher) run() {
	defer close(w.done)
	buf := make([]byte, 64<<10)
	var pending []ltx.TXID // of the group being applied
	for {
		n, err := unix.Read(w.fd, buf)
		if err != nil {
			if !errors.Is(err, unix.EINTR) {
				w.mu.Lock()
				w.err = err
				w.mu.Unlock()
				return
			}
			continue
		}
		now := time.Now()
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			off += unix.SizeofInotifyEvent + int(ev.Len)
			switch {
			case ev.Mask&unix.IN_IGNORED != 0:
				return
			case ev.Mask&unix.IN_MOVED_TO != 0:
				if lo, hi, err := ltx.ParseName(name); err == nil {
					w.mu.Lock()
					for id := lo; id <= hi; id++ {
						if w.atRename {
							w.applied[id] = now
						} else {
							pending = append(pending, id)
						}
					}
					w.mu.Unlock()
				}
			case ev.Mask&unix.IN_MODIFY != 0 && strings.HasSuffix(name, ".index"):
				first, err := ltx.ParseSegmentName(strings.TrimSuffix(name, ".index") + ".segment")
				st, serr := os.Stat(filepath.Join(w.dir, name))
				if err != nil || serr != nil {
					continue
				}
				w.mu.Lock()
				for id := first + ltx.TXID(w.records[name]); id < first+ltx.TXID(st.Size()/indexRecordSize); id++ {
					if !w.atRename {
						pending = append(pending, id)
						w.logged[id] = now
					} else if _, ok := w.applied[id]; !ok {
						w.applied[id] = now
					}
				}
				w.records[name] = int(st.Size() / indexRecordSize)
				w.mu.Unlock()
			case ev.Mask&unix.IN_MODIFY != 0 && (name == ".applying" || name == "shm" || name == "database") && len(pending) > 0:
				// The marker is written before the files are renamed in,
				// and emptied after their pages are in the database; the
				// wal-index and the database are written after their
				// records.
				w.mu.Lock()
				for _, id := range pending {
					w.applied[id] = now
				}
				w.mu.Unlock()
				pending = pending[:0]
			}
		}
	}
}

// wait returns the times at which from through to were applied, waiting
// up to timeout for the events to arrive.
func (w *applyWatcher) wait(from, to ltx.TXID, timeout time.Duration) ([]time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		w.mu.Lock()
		var missing []ltx.TXID
		out := make([]time.Time, 0, to-from+1)
		for id := from; id <= to; id++ {
			t, ok := w.applied[id]
			if !ok {
				missing = append(missing, id)
			}
			out = append(out, t)
		}
		err := w.err
		w.mu.Unlock()
		if len(missing) == 0 {
			return out, nil
		}
		if err != nil || time.Now().After(deadline) {
			return nil, fmt.Errorf("no apply seen for %d of txids %v to %v (first %v): %v", len(missing), from, to, missing[0], err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (w *applyWatcher) close() {
	_ = unix.Close(w.fd)
}

func rateName(rate int) string {
	if rate == 0 {
		return "max"
	}
	return fmt.Sprintf("%d tx/s", rate)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/float64(time.Millisecond)) }

func printRows(w io.Writer, rows []row) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "system\treplicas\trate\ttx\tcommitted tx/s\tlogged p50 ms\tp99 ms\tlag p50 ms\tp99 ms\tmax ms\tslowest replica applies tx/s\tapply/commit\tvisible p50 ms\tp99 ms\tmax ms\treads\terrors\tread p50 ms\tp99 ms\tmax ms\t")
	for _, r := range rows {
		if r.litefs {
			fmt.Fprintf(tw, "litefs\t%d\t%s\t%d\t%.0f\t-\t-\t-\t-\t-\t-\t-\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t\n", r.replicas, rateName(r.target), r.n, r.commitRate,
				ms(r.visP50), ms(r.visP99), ms(r.visMax), r.reads, r.readErrs, ms(r.readP50), ms(r.readP99), ms(r.readMax))
			continue
		}
		fmt.Fprint(tw, "meridian\t")
		if r.reads < 0 { // no reader
			fmt.Fprintf(tw, "%d\t%s\t%d\t%.0f\t%s\t%s\t%s\t%s\t%s\t%.0f\t%.2f\t-\t-\t-\t-\t-\t-\t-\t-\t\n", r.replicas, rateName(r.target), r.n, r.commitRate,
				ms(r.logP50), ms(r.logP99), ms(r.p50), ms(r.p99), ms(r.max), r.applyRate, r.applyRate/r.commitRate)
			continue
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%.0f\t%s\t%s\t%s\t%s\t%s\t%.0f\t%.2f\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t\n", r.replicas, rateName(r.target), r.n, r.commitRate,
			ms(r.logP50), ms(r.logP99), ms(r.p50), ms(r.p99), ms(r.max), r.applyRate, r.applyRate/r.commitRate,
			ms(r.visP50), ms(r.visP99), ms(r.visMax), r.reads, r.readErrs, ms(r.readP50), ms(r.readP99), ms(r.readMax))
	}
	_ = tw.Flush()
	fmt.Fprintln(w, "\nlogged: from COMMIT returning on the primary to the transaction's LTX file in the primary's log.")
	fmt.Fprintln(w, "lag: from COMMIT returning on the primary to the transaction applied on the farthest replica.")
	fmt.Fprintln(w, "visible: from COMMIT returning on the primary to a reader polling the first replica through its mount")
	fmt.Fprintln(w, "(one connection, 5 s busy timeout, SELECT max(id) back to back, or every -poll-every) seeing the row; reads: that reader's queries.")
	fmt.Fprintln(w, "apply/commit is meaningful at max rate: below 1, the replicas fall behind a primary committing flat out.")
}

func (s *snapshotResult) print(w io.Writer) {
	mb := float64(s.bytes) / 1e6
	fmt.Fprintf(w, "\nsnapshot: a node joining from scratch got %.1f MB in %v: %.0f MB/s (start to caught up, mount included)\n",
		mb, s.join.Round(time.Millisecond), mb/s.join.Seconds())
	fmt.Fprintf(w, "copying the same files with an fsync: %v: %.0f MB/s; snapshot/copy %.2f\n",
		s.copy.Round(time.Millisecond), mb/s.copy.Seconds(), s.copy.Seconds()/s.join.Seconds())
	stats := func(d []time.Duration) string {
		if len(d) == 0 {
			return "none"
		}
		return fmt.Sprintf("%d commits, p50 %s ms, p99 %s ms, max %s ms", len(d), ms(d[len(d)/2]), ms(d[len(d)*99/100]), ms(d[len(d)-1]))
	}
	what := "updating big.db meanwhile (one 64 KiB row per transaction, flat out)"
	if s.app == "small" {
		what = "inserting into big.db meanwhile (one small row per transaction, 500 a second)"
	}
	fmt.Fprintf(w, "an app %s: the %v before the join: %s; during the join: %s\n",
		what, s.beforeFor, stats(s.before), stats(s.during))
	if s.read != "" {
		fmt.Fprintf(w, "the primary: %s\n", s.read)
	}
}

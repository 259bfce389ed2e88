package fs_test

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/superfly/ltx"
	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/fs"
	"github.com/meridian-db/meridian/internal/testingutil"
)

// The bank of TestLocks_ReadersAndWriter: 100 accounts of 1000.
const (
	accounts     = 100
	accountsSum  = accounts * 1000
	accountsLine = "100000|100" // what the CLI prints for the sum and count
	sumQuery     = `SELECT sum(balance), count(*) FROM accounts;`

	// readerTimeout is the busy timeout of the readers, which must never
	// run out.
	readerTimeout = 5 * time.Second
	// writerTimeout is the busy timeout of the two writers. SQLite's busy
	// handler polls (every 100 ms once it has backed off) and F_SETLK
	// cannot queue, so a writer that keeps committing back to back can
	// keep the other out for as long as it runs: with a transfer taking
	// about 8 ms through the mount, 500 of them take 4 s, and on a busy
	// machine the loser has been seen to give up after 5 s ("database is
	// locked" in PERSIST mode). That is SQLite's unfairness, not a lock
	// the mount failed to release, so the writers wait longer.
	writerTimeout = 60 * time.Second
)

// cliReader is a sqlite3 CLI process that runs sumQuery, with its timer on,
// for as long as the test feeds it.
type cliReader struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
}

// readerPace is how often a reader is given another query: often enough
// that a reader is always between two queries or in one, seldom enough
// that four readers leave the writers some CPU.
const readerPace = 500 * time.Microsecond

// startCLIReader starts a reader on path in journal mode mode, with a busy
// timeout of readerTimeout. It is fed queries until stop is closed.
func startCLIReader(tb testing.TB, path, mode string, stop <-chan struct{}, wg *sync.WaitGroup) *cliReader {
	tb.Helper()
	r := &cliReader{cmd: testingutil.Command(tb, cliTimeout, "sqlite3", path)}
	r.cmd.Stdout, r.cmd.Stderr = &r.stdout, &r.stderr
	stdin, err := r.cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := r.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	const chunkQueries = 20
	chunk := []byte(strings.Repeat(sumQuery+"\n", chunkQueries))
	wg.Go(func() {
		defer func() { _ = stdin.Close() }()
		if _, err := fmt.Fprintf(stdin, ".timeout %d\nPRAGMA journal_mode=%s;\n.timer on\n", readerTimeout.Milliseconds(), mode); err != nil {
			return
		}
		tick := time.NewTicker(chunkQueries * readerPace)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if _, err := stdin.Write(chunk); err != nil {
				return // the reader died: its stderr says why
			}
		}
	})
	return r
}

// readerResult is what a reader saw.
type readerResult struct {
	queries   int
	latencies []time.Duration
	torn      []string // result lines other than accountsLine
	errors    []string
}

// parseCLIOutput parses the output of a sqlite3 CLI that set the journal
// mode and turned its timer on: the journal mode, then for each statement
// its result lines and a "Run Time: real S ..." line. Result lines other
// than accountsLine go to torn.
func parseCLIOutput(mode, stdout, stderr string) readerResult {
	var res readerResult
	lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
	if lines[0] != mode {
		res.errors = append(res.errors, fmt.Sprintf("first line %q, want %q", lines[0], mode))
	}
	for _, line := range lines[1:] {
		switch {
		case strings.HasPrefix(line, "Run Time: real "):
			f := strings.Fields(line)
			sec, err := strconv.ParseFloat(f[3], 64)
			if err != nil {
				res.errors = append(res.errors, fmt.Sprintf("timer line %q", line))
			}
			res.latencies = append(res.latencies, time.Duration(sec*float64(time.Second)))
		case line == accountsLine:
			res.queries++
		default:
			res.torn = append(res.torn, line)
		}
	}
	for line := range strings.SplitSeq(strings.TrimSpace(stderr), "\n") {
		if line != "" {
			res.errors = append(res.errors, line)
		}
	}
	return res
}

// goReader runs sumQuery through mattn/go-sqlite3 on db every readerPace
// until stop is closed, timing each.
func goReader(db *sql.DB, stop <-chan struct{}) readerResult {
	var res readerResult
	tick := time.NewTicker(readerPace)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return res
		case <-tick.C:
		}
		start := time.Now()
		var sum, n int
		if err := db.QueryRow(sumQuery).Scan(&sum, &n); err != nil {
			res.errors = append(res.errors, err.Error())
			continue
		}
		res.latencies = append(res.latencies, time.Since(start))
		if sum != accountsSum || n != accounts {
			res.torn = append(res.torn, fmt.Sprintf("%d|%d", sum, n))
		} else {
			res.queries++
		}
	}
}

// transfer is one random transfer between two distinct accounts.
type transfer struct{ from, to, amount int }

func randomTransfers(rng *rand.Rand, n int) []transfer {
	ts := make([]transfer, n)
	for i := range ts {
		from := 1 + rng.IntN(accounts)
		to := 1 + (from+rng.IntN(accounts-1))%accounts // never from
		ts[i] = transfer{from, to, 1 + rng.IntN(50)}
	}
	return ts
}

func (t transfer) statements() []string {
	return []string{
		"BEGIN IMMEDIATE;",
		fmt.Sprintf("UPDATE accounts SET balance = balance - %d WHERE id = %d;", t.amount, t.from),
		fmt.Sprintf("UPDATE accounts SET balance = balance + %d WHERE id = %d;", t.amount, t.to),
		"COMMIT;",
	}
}

// cliWriter is a sqlite3 CLI process that runs transfers.
type cliWriter struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
}

// startCLIWriter starts a writer that runs ts on path in journal mode
// mode, with a busy timeout of writerTimeout, stopping at the first error.
func startCLIWriter(tb testing.TB, path, mode string, ts []transfer) *cliWriter {
	tb.Helper()
	var script strings.Builder
	fmt.Fprintf(&script, ".timeout %d\n.bail on\nPRAGMA journal_mode=%s;\nPRAGMA synchronous=FULL;\n.timer on\n", writerTimeout.Milliseconds(), mode)
	for _, t := range ts {
		script.WriteString(strings.Join(t.statements(), " ") + "\n")
	}
	script.WriteString("SELECT 'done';\n")
	w := &cliWriter{cmd: testingutil.Command(tb, cliTimeout, "sqlite3", path)}
	w.cmd.Stdin = strings.NewReader(script.String())
	w.cmd.Stdout, w.cmd.Stderr = &w.stdout, &w.stderr
	if err := w.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	return w
}

// wait waits for the writer, fails the test unless it ran every transfer,
// and returns the longest a statement took.
func (w *cliWriter) wait(tb testing.TB, mode string) time.Duration {
	tb.Helper()
	err := w.cmd.Wait()
	res := parseCLIOutput(mode, w.stdout.String(), w.stderr.String())
	if err != nil || len(res.errors) > 0 || !slices.Equal(res.torn, []string{"done"}) {
		tb.Fatalf("sqlite3 writer: %v: stderr %q, printed %q", err, w.stderr.String(), res.torn)
	}
	return percentile(res.latencies, 1)
}

// goTransfers runs the transfers through mattn/go-sqlite3 on one
// connection of db, with a busy timeout of writerTimeout, and returns the
// longest a statement took.
func goTransfers(ctx context.Context, db *sql.DB, ts []transfer) (longest time.Duration, err error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return 0, err
	}
	defer func() { _ = conn.Close() }()
	if _, err := conn.ExecContext(ctx, fmt.Sprintf(`PRAGMA busy_timeout = %d`, writerTimeout.Milliseconds())); err != nil {
		return 0, err
	}
	defer func() { _, _ = conn.ExecContext(ctx, `PRAGMA busy_timeout = 5000`) }()
	for i, t := range ts {
		for _, q := range t.statements() {
			start := time.Now()
			if _, err := conn.ExecContext(ctx, q); err != nil {
				return longest, fmt.Errorf("transfer %d: %s: %w", i, q, err)
			}
			longest = max(longest, time.Since(start))
		}
	}
	return longest, nil
}

func mustCreateAccounts(tb testing.TB, db *sql.DB) {
	tb.Helper()
	if _, err := db.Exec(`CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER)`); err != nil {
		tb.Fatal(err)
	}
	if _, err := db.Exec(`WITH RECURSIVE n(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM n WHERE id < ?)
		INSERT INTO accounts SELECT id, 1000 FROM n`, accounts); err != nil {
		tb.Fatal(err)
	}
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// TestLocks_ReadersAndWriter runs reader processes against two writers,
// one a process and one this test, in each journal mode. Readers must never
// see half a transfer nor fail with SQLITE_BUSY, and every transfer must
// commit exactly once to the log.
func TestLocks_ReadersAndWriter(t *testing.T) {
	if _, err := exec.LookPath("sqlite3"); err != nil {
		t.Fatalf("the sqlite3 CLI is needed: %v (apt-get install sqlite3)", err)
	}
	for i, mode := range journalModes {
		t.Run(mode, func(t *testing.T) { testReadersAndWriter(t, mode, uint64(i+1)) })
	}
}

func testReadersAndWriter(t *testing.T, mode string, seed uint64) {
	const cliReaders, transfers = 3, 500
	fsys := testingutil.MustMount(t)
	path := filepath.Join(fsys.MountDir, "app.db")
	db := testingutil.MustOpenSQLite(t, path, mode)
	mustCreateAccounts(t, db)
	readDB := testingutil.MustOpenSQLite(t, path, mode)
	log := fsys.DB("app.db")
	before := log.Pos().TXID
	rng := rand.New(rand.NewPCG(seed, 42))
	cliTransfers, goTransfersList := randomTransfers(rng, transfers), randomTransfers(rng, transfers)

	start := time.Now()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	stopReaders := sync.OnceFunc(func() {
		close(stop)
		testingutil.Within(t, 30*time.Second, "the readers to stop", wg.Wait)
	})
	t.Cleanup(stopReaders)
	readers := make([]*cliReader, cliReaders)
	for i := range readers {
		readers[i] = startCLIReader(t, path, mode, stop, &wg)
	}
	goRes := make(chan readerResult, 1)
	wg.Go(func() { goRes <- goReader(readDB, stop) })
	writer := startCLIWriter(t, path, mode, cliTransfers)
	goLongest, goErr := goTransfers(context.Background(), db, goTransfersList)
	cliLongest := writer.wait(t, mode)
	writeTime := time.Since(start)
	stopReaders()
	if goErr != nil {
		t.Fatal(goErr)
	}
	var results []readerResult
	for _, r := range readers {
		if err := r.cmd.Wait(); err != nil {
			t.Errorf("reader: %v: %s", err, r.stderr.String())
		}
		results = append(results, parseCLIOutput(mode, r.stdout.String(), r.stderr.String()))
	}
	checkReaders(t, mode, append(results, testingutil.Recv(t, goRes, 10*time.Second, "the Go reader's results")), writeTime)
	t.Logf("%s: the longest statement of the writers took %v (sqlite3) and %v (Go)", mode, cliLongest, goLongest.Round(time.Millisecond))

	var sum, n int
	if err := db.QueryRow(sumQuery).Scan(&sum, &n); err != nil {
		t.Fatal(err)
	} else if sum != accountsSum || n != accounts {
		t.Fatalf("sum %d of %d accounts, want %d of %d", sum, n, accountsSum, accounts)
	}
	if got, want := log.Pos().TXID-before, ltx.TXID(2*transfers); got != want {
		t.Fatalf("the log gained %d transactions, want %d", got, want)
	}
	checkLog(t, fsys, "app.db", db, mode == "wal")
}

// checkReaders asserts that the readers (the CLI processes, then the Go
// reader) saw only whole transfers and no errors, and logs their figures.
func checkReaders(tb testing.TB, mode string, results []readerResult, writeTime time.Duration) {
	tb.Helper()
	var cliLat []time.Duration
	cliQueries := 0
	for i, res := range results {
		if len(res.torn) > 0 {
			tb.Errorf("reader %d saw %d torn reads, first %q", i, len(res.torn), res.torn[0])
		}
		if len(res.errors) > 0 {
			tb.Errorf("reader %d: %d errors, first %q", i, len(res.errors), res.errors[0])
		}
		if res.queries < 20 {
			tb.Errorf("reader %d ran %d queries, want at least 20", i, res.queries)
		}
		if i < len(results)-1 {
			if len(res.latencies) != res.queries+len(res.torn) {
				tb.Errorf("reader %d: %d timer lines for %d results", i, len(res.latencies), res.queries+len(res.torn))
			}
			cliLat = append(cliLat, res.latencies...)
			cliQueries += res.queries
		}
	}
	goRes := results[len(results)-1]
	tb.Logf("%s: writers done in %v; %d CLI reader queries, p50 %v p99 %v max %v (timer resolution 1ms); %d Go reader queries, p50 %v p99 %v max %v",
		mode, writeTime.Round(time.Millisecond), cliQueries,
		percentile(cliLat, 0.5), percentile(cliLat, 0.99), percentile(cliLat, 1),
		goRes.queries, percentile(goRes.latencies, 0.5).Round(time.Microsecond),
		percentile(goRes.latencies, 0.99).Round(time.Microsecond), percentile(goRes.latencies, 1).Round(time.Microsecond))
}

// lockChildScript is a child process for TestLocks_Fcntl: it opens the file
// argv[1] and runs fcntl lock commands read from stdin, one a line:
// "getlk|setlk|setlkw r|w|u START LEN" and "close". It answers each with
// one line: "ok", "errno N", or for getlk "r|w|u PID START LEN".
const lockChildScript = `
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
T = {'r': fcntl.F_RDLCK, 'w': fcntl.F_WRLCK, 'u': fcntl.F_UNLCK}
N = {v: k for k, v in T.items()}
FLOCK = 'hhqqi4x'  # struct flock on 64-bit Linux
print('ready', os.getpid(), flush=True)
for line in sys.stdin:
    f = line.split()
    try:
        if f[0] == 'close':
            os.close(fd)
            print('ok', flush=True)
            continue
        lk = struct.pack(FLOCK, T[f[1]], os.SEEK_SET, int(f[2]), int(f[3]), 0)
        if f[0] == 'getlk':
            typ, _, start, length, pid = struct.unpack(FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, lk))
            print(N[typ], pid, start, length, flush=True)
        else:
            fcntl.fcntl(fd, fcntl.F_SETLK if f[0] == 'setlk' else fcntl.F_SETLKW, lk)
            print('ok', flush=True)
    except OSError as e:
        print('errno', e.errno, flush=True)
`

// SQLite's lock bytes in the database file.
const (
	pendingByte  = 0x40000000
	reservedByte = pendingByte + 1
	sharedFirst  = pendingByte + 2
	sharedSize   = 510
)

// lockChild is a process that takes fcntl locks on a file of the mount.
type lockChild struct {
	tb     testing.TB
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr bytes.Buffer
	lines  chan string
	pid    int
	killed bool
}

func startLockChild(tb testing.TB, path string) *lockChild {
	tb.Helper()
	c := &lockChild{tb: tb, cmd: testingutil.Command(tb, cliTimeout, "python3", "-c", lockChildScript, path), lines: make(chan string, 16)}
	c.cmd.Stderr = &c.stderr
	stdin, err := c.cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	c.stdin = stdin
	if err := c.cmd.Start(); err != nil {
		tb.Fatalf("start python3: %v", err)
	}
	tb.Cleanup(func() { c.kill() })
	go func() { // ends when the child exits
		defer close(c.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
	}()
	var ready string
	if _, err := fmt.Sscanf(c.reply(), "%s %d", &ready, &c.pid); err != nil || ready != "ready" {
		tb.Fatalf("lock child did not start: %v", err)
	}
	return c
}

// reply returns the child's next line, failing the test after 10 s.
func (c *lockChild) reply() string {
	c.tb.Helper()
	select {
	case line, ok := <-c.lines:
		if !ok {
			c.tb.Fatalf("lock child %d exited", c.pid)
		}
		return line
	case <-time.After(10 * time.Second):
		c.tb.Fatalf("lock child %d: no answer in 10 s", c.pid)
	}
	return ""
}

// send sends a command without waiting for the answer.
func (c *lockChild) send(format string, args ...any) {
	c.tb.Helper()
	if _, err := fmt.Fprintf(c.stdin, format+"\n", args...); err != nil {
		c.tb.Fatal(err)
	}
}

// do sends a command and returns the answer.
func (c *lockChild) do(format string, args ...any) string {
	c.tb.Helper()
	c.send(format, args...)
	return c.reply()
}

// want runs a command and asserts its answer.
func (c *lockChild) want(want, format string, args ...any) {
	c.tb.Helper()
	if got := c.do(format, args...); got != want {
		c.tb.Fatalf("child %d: %s: got %q, want %q", c.pid, fmt.Sprintf(format, args...), got, want)
	}
}

// silent asserts that the child has not answered within d: it is blocked.
func (c *lockChild) silent(d time.Duration) {
	c.tb.Helper()
	select {
	case line := <-c.lines:
		c.tb.Fatalf("child %d answered %q, want it blocked", c.pid, line)
	case <-time.After(d):
	}
}

// kill sends SIGKILL and waits for the child to exit, failing the test
// if it is still there after 10 s.
func (c *lockChild) kill() {
	c.tb.Helper()
	if c.killed {
		return
	}
	c.killed = true
	_ = c.cmd.Process.Kill()
	exited := make(chan struct{})
	go func() { _ = c.cmd.Wait(); close(exited) }()
	select {
	case <-exited:
		if c.stderr.Len() > 0 {
			c.tb.Logf("lock child %d: %s", c.pid, c.stderr.String())
		}
	case <-time.After(10 * time.Second):
		c.tb.Errorf("lock child %d still alive 10 s after SIGKILL", c.pid)
	}
}

// setlk runs F_SETLK on fd, returning the errno.
func setlk(fd uintptr, typ int16, start, n int64) error {
	return unix.FcntlFlock(fd, unix.F_SETLK, &unix.Flock_t{Type: typ, Whence: io.SeekStart, Start: start, Len: n})
}

// getlk runs F_GETLK on fd.
func getlk(tb testing.TB, fd uintptr, typ int16, start, n int64) unix.Flock_t {
	tb.Helper()
	lk := unix.Flock_t{Type: typ, Whence: io.SeekStart, Start: start, Len: n}
	if err := unix.FcntlFlock(fd, unix.F_GETLK, &lk); err != nil {
		tb.Fatal(err)
	}
	return lk
}

// TestLocks_Fcntl checks the POSIX lock semantics SQLite relies on, between
// processes, through the mount: the test process and python3 children
// lock SQLite's lock bytes with fcntl.
func TestLocks_Fcntl(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		t.Fatalf("python3 is needed: %v", err)
	}
	fsys := testingutil.MustMount(t)
	path := filepath.Join(fsys.MountDir, "app.db")
	runCLI(t, path, "CREATE TABLE t (x);\n")
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	fd, me := f.Fd(), os.Getpid()
	eagain := fmt.Sprintf("errno %d", unix.EAGAIN)

	t.Run("Conflicts", func(t *testing.T) {
		mustSetlk(t, fd, unix.F_WRLCK, reservedByte, 1)
		if lk := getlk(t, fd, unix.F_WRLCK, reservedByte, 1); lk.Type != unix.F_UNLCK {
			t.Fatalf("F_GETLK reports the process's own lock: %+v", lk)
		}
		a := startLockChild(t, path)
		held := fmt.Sprintf("w %d %d 1", me, reservedByte)
		a.want(held, "getlk w %d 1", reservedByte)
		a.want(held, "getlk r %d 1", reservedByte)
		a.want(eagain, "setlk w %d 1", reservedByte)
		a.want(eagain, "setlk r %d 1", reservedByte)
		a.want(eagain, "setlk r %d %d", pendingByte, 2) // overlaps
		a.want("ok", "setlk r %d %d", sharedFirst, sharedSize)
		lk := getlk(t, fd, unix.F_WRLCK, sharedFirst, sharedSize)
		if lk.Type != unix.F_RDLCK || int(lk.Pid) != a.pid || lk.Start != sharedFirst || lk.Len != sharedSize {
			t.Fatalf("F_GETLK over SHARED: got %+v, want the read lock of pid %d", lk, a.pid)
		}
		if lk := getlk(t, fd, unix.F_RDLCK, sharedFirst, sharedSize); lk.Type != unix.F_UNLCK {
			t.Fatalf("read locks conflict: %+v", lk)
		}
		assertLocks(t, fsys, fmt.Sprintf("w pid %d [%d,%d]", me, reservedByte, reservedByte),
			fmt.Sprintf("r pid %d [%d,%d]", a.pid, sharedFirst, sharedFirst+sharedSize-1))

		// F_UNLCK releases.
		mustSetlk(t, fd, unix.F_UNLCK, reservedByte, 1)
		a.want("ok", "setlk w %d 1", reservedByte)
		if err := setlk(fd, unix.F_WRLCK, reservedByte, 1); err != unix.EAGAIN {
			t.Fatalf("F_SETLK of a lock another process holds: got %v, want EAGAIN", err)
		}
		a.want("ok", "setlk u %d %d", pendingByte, sharedFirst+sharedSize-pendingByte)
		assertLocks(t, fsys)
	})

	t.Run("CloseReleases", func(t *testing.T) {
		// A waiter in F_SETLKW wakes when the holder closes any of its
		// descriptors of the file: POSIX drops the process's locks then.
		mustSetlk(t, fd, unix.F_WRLCK, reservedByte, 1)
		a := startLockChild(t, path)
		a.send("setlkw w %d 1", reservedByte)
		a.silent(300 * time.Millisecond)
		other, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		_ = other.Close()
		if got := a.reply(); got != "ok" {
			t.Fatalf("F_SETLKW after the holder closed a descriptor: got %q, want ok", got)
		}
		if lk := getlk(t, fd, unix.F_WRLCK, reservedByte, 1); lk.Type != unix.F_WRLCK || int(lk.Pid) != a.pid {
			t.Fatalf("F_GETLK: got %+v, want the write lock of pid %d", lk, a.pid)
		}
		a.want("ok", "close")
		mustSetlk(t, fd, unix.F_WRLCK, reservedByte, 1)
		mustSetlk(t, fd, unix.F_UNLCK, reservedByte, 1)
		assertLocks(t, fsys)
	})

	t.Run("KillReleases", func(t *testing.T) {
		b := startLockChild(t, path)
		b.want("ok", "setlk w %d 1", reservedByte)
		b.want("ok", "setlk r %d %d", sharedFirst, sharedSize)
		if err := setlk(fd, unix.F_WRLCK, reservedByte, 1); err != unix.EAGAIN {
			t.Fatalf("F_SETLK of a lock another process holds: got %v, want EAGAIN", err)
		}
		b.kill()
		c := startLockChild(t, path)
		c.want("ok", "setlk w %d 1", reservedByte)

		// A process killed while it waits in F_SETLKW exits and is not
		// given the lock afterwards.
		d := startLockChild(t, path)
		d.send("setlkw w %d 1", reservedByte)
		d.silent(300 * time.Millisecond)
		d.kill()
		c.want("ok", "close")
		e := startLockChild(t, path)
		e.want("ok", "setlk w %d 1", reservedByte)
		assertLocks(t, fsys, fmt.Sprintf("w pid %d [%d,%d]", e.pid, reservedByte, reservedByte))
		e.kill()
		assertLocks(t, fsys)
	})
}

func mustSetlk(tb testing.TB, fd uintptr, typ int16, start, n int64) {
	tb.Helper()
	if err := setlk(fd, typ, start, n); err != nil {
		tb.Fatalf("F_SETLK type %d [%d,+%d]: %v", typ, start, n, err)
	}
}

// assertLocks asserts the locks the mount holds on app.db, each as
// "r|w pid PID [START,END]", sorted by start.
func assertLocks(tb testing.TB, fsys *fs.FileSystem, want ...string) {
	tb.Helper()
	var got []string
	for _, l := range fsys.DB("app.db").Locks.Locks() {
		typ := "r"
		if l.Typ == unix.F_WRLCK {
			typ = "w"
		}
		got = append(got, fmt.Sprintf("%s pid %d [%d,%d]", typ, l.Pid, l.Start, l.End))
	}
	if !slices.Equal(got, want) {
		tb.Fatalf("locks held: got %q, want %q", got, want)
	}
}

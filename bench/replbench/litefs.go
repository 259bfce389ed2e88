package main

import (
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
)

// liteFSConfig is the configuration of one LiteFS node with a static
// lease: the primary (candidate) serves its HTTP API on port, and every
// node follows the one at primaryURL.
const liteFSConfig = `fuse:
  dir: %q
data:
  dir: %q
exit-on-error: false
http:
  addr: "127.0.0.1:%d"
lease:
  type: "static"
  advertise-url: %q
  candidate: %t
`

// measureLiteFS runs the rates on LiteFS (the binary at bin): a primary
// and one replica with a static lease on loopback, the same writer on the
// primary's mount and the same polling reader on the replica's. LiteFS
// has no apply marker to watch, so lag is not measured: the row has the
// commit rate and what the reader saw.
func measureLiteFS(h *testingutil.Harness, o options, bin string) ([]row, error) {
	dir := h.TempDir()
	const primaryPort, replicaPort = 20302, 20303
	primaryURL := fmt.Sprintf("http://127.0.0.1:%d", primaryPort)
	start := func(name string, port int, candidate bool) string {
		mnt, data := filepath.Join(dir, name, "mnt"), filepath.Join(dir, name, "data")
		for _, d := range []string{mnt, data} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				h.Fatal(err)
			}
		}
		config := filepath.Join(dir, name+".yml")
		if err := os.WriteFile(config, fmt.Appendf(nil, liteFSConfig, mnt, data, port, primaryURL, candidate), 0o644); err != nil {
			h.Fatal(err)
		}
		logf, err := os.Create(filepath.Join(dir, name+".log"))
		if err != nil {
			h.Fatal(err)
		}
		cpu := replicaCPU
		if candidate {
			cpu = primaryCPU
		}
		cmd := pinnedCommand(o.pin, cpu, bin, "mount", "-config", config)
		cmd.Stdout, cmd.Stderr = logf, logf
		testingutil.DieWithParent(cmd)
		if err := cmd.Start(); err != nil {
			h.Fatal(err)
		}
		h.Cleanup(func() {
			// LiteFS unmounts on SIGTERM; the kill and the lazy unmount
			// are for one that does not.
			_ = cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
			_ = syscall.Unmount(mnt, syscall.MNT_DETACH)
			_ = logf.Close()
		})
		return mnt
	}
	primaryMnt := start("primary", primaryPort, true)
	replicaMnt := start("replica", replicaPort, false)
	// The replica's mount shows .primary once it follows the primary.
	if err := waitFor(30*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(replicaMnt, ".primary"))
		return err == nil
	}); err != nil {
		return nil, fmt.Errorf("litefs replica: no .primary on its mount: %w (logs in %s)", err, dir)
	}
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(primaryMnt, "bench.db")+o.writerParams())
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	h.Cleanup(func() { _ = db.Close() })
	if _, err := db.Exec(`CREATE TABLE tx (id INTEGER PRIMARY KEY, v BLOB)`); err != nil {
		return nil, fmt.Errorf("litefs primary: %w", err)
	}
	replicaDB := filepath.Join(replicaMnt, "bench.db")
	if err := waitFor(30*time.Second, func() bool {
		r, err := sql.Open("sqlite3", "file:"+replicaDB+"?mode=ro")
		if err != nil {
			return false
		}
		defer func() { _ = r.Close() }()
		var n int
		return r.QueryRow(`SELECT count(*) FROM tx`).Scan(&n) == nil
	}); err != nil {
		return nil, fmt.Errorf("litefs replica: the table did not arrive: %w", err)
	}
	var rows []row
	for _, rate := range o.rates {
		count := o.maxTx
		if rate > 0 {
			count = int(float64(rate) * o.duration.Seconds())
		}
		fmt.Fprintf(os.Stderr, "litefs, 1 replica, %s: %d transactions\n", rateName(rate), count)
		var lastID int64
		if err := db.QueryRow(`SELECT coalesce(max(id), 0) FROM tx`).Scan(&lastID); err != nil {
			return nil, err
		}
		reader, err := startPollReader(replicaDB, lastID, count, o.pollEvery, o.pin)
		if err != nil {
			return nil, err
		}
		commits, err := commitRows(db, rate, count)
		if err != nil {
			reader.stopReading()
			return nil, err
		}
		r := row{replicas: 1, target: rate, n: count, commitRate: float64(count-1) / commits[count-1].Sub(commits[0]).Seconds(), litefs: true}
		if err := reader.result(&r, commits); err != nil {
			return nil, err
		}
		rows = append(rows, r)
	}
	return rows, nil
}

// waitFor polls ok every 10 ms until it is true or timeout passes.
func waitFor(timeout time.Duration, ok func() bool) error {
	for deadline := time.Now().Add(timeout); !ok(); {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %v", timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

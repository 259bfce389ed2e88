// Command floor measures what this machine allows the replication lag to
// be: the same shape of work as a primary and a replica, with nothing of
// Meridian in it. A SQLite writer commits to a bare WAL database at a
// paced rate; after each COMMIT it sends a 4 KiB payload (about one small
// LTX file) over TLS on loopback to a second process, which appends it to
// a file, fdatasyncs that (with -fsync), writes it into a second file
// and records the time since the COMMIT returned. The figures it prints
// are the floor under replbench's lag column on the same machine.
package main

import (
	"crypto/tls"
	"database/sql"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	_ "github.com/mattn/go-sqlite3"
	"golang.org/x/sys/unix"

	"github.com/meridian-db/meridian/internal/pki"
)

const payload = 4096

func main() {
	role := flag.String("role", "", "internal: receiver")
	dir := flag.String("dir", "", "internal: the run's directory")
	rate := flag.Int("rate", 1000, "commits a second")
	n := flag.Int("tx", 5000, "commits")
	sync := flag.Bool("fsync", true, "the receiver fdatasyncs each payload it appends before it counts it")
	flag.Parse()
	log.SetFlags(0)
	if *role == "receiver" {
		receive(*dir, *sync)
		return
	}
	d, err := os.MkdirTemp("", "floor-")
	if err != nil {
		log.Fatal(err)
	}
	defer func() { _ = os.RemoveAll(d) }()
	send(d, *rate, *n, *sync)
}

func certs(dir string) (ca, cert, key string) {
	caDir := filepath.Join(dir, "ca")
	if _, err := pki.InitCA(caDir, "floor", 2*time.Hour); err != nil {
		log.Fatal(err)
	}
	for _, node := range []string{"a", "b"} {
		if _, err := pki.Issue(caDir, dir, node, pki.IssueOptions{Validity: time.Hour}); err != nil {
			log.Fatal(err)
		}
	}
	return filepath.Join(caDir, pki.CertFile("ca")), dir, dir
}

func send(dir string, rate, n int, sync bool) {
	certs(dir)
	exe, err := os.Executable()
	if err != nil {
		log.Fatal(err)
	}
	cmd := exec.Command(exe, "-role", "receiver", "-dir", dir, fmt.Sprintf("-fsync=%v", sync))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		log.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		log.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var addr string
	if _, err := fmt.Fscanln(out, &addr); err != nil {
		log.Fatal(err)
	}
	ca := caFile(dir)
	cfg, err := pki.ClientConfig(ca, filepath.Join(dir, pki.CertFile("a")), filepath.Join(dir, pki.KeyFile("a")), "b")
	if err != nil {
		log.Fatal(err)
	}
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		log.Fatal(err)
	}
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "bench.db")+"?_journal_mode=WAL&_synchronous=NORMAL")
	if err != nil {
		log.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	if _, err := db.Exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"); err != nil {
		log.Fatal(err)
	}
	msg := make([]byte, 16+payload)
	start := time.Now()
	for i := range n {
		time.Sleep(time.Until(start.Add(time.Duration(i) * time.Second / time.Duration(rate))))
		if _, err := db.Exec("INSERT INTO t (v) VALUES (randomblob(100))"); err != nil {
			log.Fatal(err)
		}
		binary.BigEndian.PutUint64(msg, uint64(i))
		binary.BigEndian.PutUint64(msg[8:], uint64(time.Now().UnixNano()))
		if _, err := conn.Write(msg); err != nil {
			log.Fatal(err)
		}
	}
	_ = conn.Close()
	rest, _ := io.ReadAll(out)
	fmt.Printf("floor: %d commits at %d/s, fsync=%v: %s", n, rate, sync, rest)
}

func caFile(dir string) string { return filepath.Join(dir, "ca", pki.CertFile("ca")) }

func receive(dir string, sync bool) {
	cfg, err := pki.ServerConfig(caFile(dir), filepath.Join(dir, pki.CertFile("b")), filepath.Join(dir, pki.KeyFile("b")), func() []string { return []string{"a"} })
	if err != nil {
		log.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ln.Addr())
	conn, err := ln.Accept()
	if err != nil {
		log.Fatal(err)
	}
	seg, err := os.Create(filepath.Join(dir, "segment"))
	if err != nil {
		log.Fatal(err)
	}
	wal, err := os.Create(filepath.Join(dir, "wal"))
	if err != nil {
		log.Fatal(err)
	}
	msg := make([]byte, 16+payload)
	var lags []time.Duration
	for off := int64(0); ; off += payload {
		if _, err := io.ReadFull(conn, msg); err != nil {
			break
		}
		committed := time.Unix(0, int64(binary.BigEndian.Uint64(msg[8:])))
		if _, err := seg.Write(msg[16:]); err != nil {
			log.Fatal(err)
		}
		if sync {
			if err := unix.Fdatasync(int(seg.Fd())); err != nil {
				log.Fatal(err)
			}
		}
		if _, err := wal.WriteAt(msg[16:], off); err != nil {
			log.Fatal(err)
		}
		lags = append(lags, time.Since(committed))
	}
	slices.Sort(lags)
	ms := func(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/1e6) }
	q := func(p float64) time.Duration { return lags[min(len(lags)-1, int(float64(len(lags))*p))] }
	fmt.Println(strings.Join([]string{"lag p50", ms(q(.5)), "p99", ms(q(.99)), "max", ms(lags[len(lags)-1]), "ms"}, " "))
}

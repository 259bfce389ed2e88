package fs

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

func TestParseLockRequest(t *testing.T) {
	for _, q := range []lockRequest{
		{id: 1, op: "lock", create: true, start: 120, end: 127, path: "/mnt/my db.db-shm"},
		{id: 1 << 40, op: "unlock", path: "/mnt/a"},
		{id: 7, op: "lock", start: 1073741824, end: 1073741824, path: "/x"},
	} {
		got, err := parseLockRequest(q.String())
		if err != nil || got != q {
			t.Errorf("parse %q: got %+v, %v; want %+v", q.String(), got, err, q)
		}
	}
	for _, line := range []string{
		"", "1 lock 0 1 2", "1 lock 0 1 2 ", "x lock 0 1 2 /a", "1 read 0 1 2 /a",
		"1 lock 0 5 4 /a", "1 lock 0 -1 4 /a", "1 lock 0 1 9223372036854775808 /a",
	} {
		if q, err := parseLockRequest(line); err == nil {
			t.Errorf("parse %q: got %+v, want an error", line, q)
		}
	}
}

func FuzzParseLockRequest(f *testing.F) {
	f.Add("1 lock 1 120 127 /mnt/a.db-shm")
	f.Add("2 unlock 0 0 0 /mnt/a b")
	f.Fuzz(func(t *testing.T, line string) {
		q, err := parseLockRequest(line)
		if err != nil {
			return
		}
		if q.end < q.start || (q.op != "lock" && q.op != "unlock") || q.path == "" {
			t.Fatalf("%q parsed to %+v", line, q)
		}
		if strings.Contains(q.path, "\n") {
			return // a request is one line; such a path cannot be sent
		}
		if again, err := parseLockRequest(q.String()); err != nil || again != q {
			t.Fatalf("%q: %+v does not survive its own String: %+v, %v", line, q, again, err)
		}
	})
}

// TestRunLockHolder serves the protocol in this process on a file outside
// any mount and checks its replies and the locks /proc/locks shows.
func TestRunLockHolder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() { done <- RunLockHolder(inR, outW); outW.Close() }()
	replies := bufio.NewScanner(outR)
	ask := func(q lockRequest) string {
		t.Helper()
		if _, err := io.WriteString(inW, q.String()+"\n"); err != nil {
			t.Fatal(err)
		}
		if !replies.Scan() {
			t.Fatalf("no reply to %q: %v", q, replies.Err())
		}
		return replies.Text()
	}
	// /proc/locks names a lock's file as MAJOR:MINOR:INODE.
	locks := func() []string {
		var out []string
		b, _ := os.ReadFile("/proc/locks")
		for line := range strings.Lines(string(b)) {
			f := strings.Fields(line)
			if len(f) >= 8 && f[4] == strconv.Itoa(os.Getpid()) && strings.HasSuffix(f[5], fmt.Sprintf(":%d", st.Ino)) {
				out = append(out, f[3]+" "+f[6]+"-"+f[7])
			}
		}
		return out
	}
	if got := ask(lockRequest{id: 1, op: "lock", start: 10, end: 20, path: path}); got != "1 ok" {
		t.Fatalf("lock: got %q, want %q", got, "1 ok")
	}
	if got := locks(); len(got) != 1 || got[0] != "WRITE 10-20" {
		t.Fatalf("locks after lock: %q, want [WRITE 10-20]", got)
	}
	if got := ask(lockRequest{id: 2, op: "unlock", path: path}); got != "2 ok" {
		t.Fatalf("unlock: got %q, want %q", got, "2 ok")
	}
	if got := locks(); len(got) != 0 {
		t.Fatalf("locks after unlock: %q, want none", got)
	}
	missing := filepath.Join(t.TempDir(), "none")
	if got := ask(lockRequest{id: 3, op: "lock", start: 1, end: 1, path: missing}); !strings.HasPrefix(got, "3 error ") || !strings.Contains(got, "no such file") {
		t.Fatalf("lock of a missing file: got %q, want an error naming it", got)
	}
	if got := ask(lockRequest{id: 4, op: "lock", create: true, start: 1, end: 1, path: missing}); got != "4 ok" {
		t.Fatalf("lock with create: got %q, want %q", got, "4 ok")
	}
	if _, err := os.Stat(missing); err != nil {
		t.Fatalf("lock with create did not create the file: %v", err)
	}
	inW.Close()
	if err := <-done; err != nil {
		t.Fatalf("RunLockHolder at the end of its input: %v", err)
	}
	// A request it cannot parse ends it with an error.
	if err := RunLockHolder(strings.NewReader("1 lock 0 9 1 /a\n"), io.Discard); err == nil || !strings.Contains(err.Error(), "END") {
		t.Fatalf("bad request: got %v, want an error about END", err)
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/ltx"
)

// runAsMainEnv makes the test binary run main, so tests can check exit
// statuses without building regiond.
const runAsMainEnv = "MERIDIAN_REGIOND_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runAsMainEnv) != "" {
		os.Args = append([]string{"regiond"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	if spec := os.Getenv(writersEnv); spec != "" {
		runWriters(spec)
	}
	testingutil.Main(m)
}

const (
	sampleLog = "../../ltx/testdata/log"
	sampleDB  = "../../ltx/testdata/sample.db"
)

var sampleFiles = []string{
	"0000000000000001-0000000000000001.ltx",
	"0000000000000002-0000000000000004.ltx",
	"0000000000000005-0000000000000005.ltx",
}

// run runs regiond in process and returns its output.
func run(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err = Run(context.Background(), args, &out, &errOut)
	return out.String(), errOut.String(), err
}

// exitStatus runs regiond as a process and returns its exit status and
// standard error.
func exitStatus(t *testing.T, args ...string) (int, string) {
	t.Helper()
	cmd := testingutil.Command(t, time.Minute, os.Args[0], args...)
	cmd.Env = append(os.Environ(), runAsMainEnv+"=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitCode(), stderr.String()
	} else if err != nil {
		t.Fatal(err)
	}
	return 0, stderr.String()
}

// sealedLog returns a copy of the sample log, sealed by opening it.
func sealedLog(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range append(sampleFiles, "0000000000000002-0000000000000004.pos") {
		if err := os.WriteFile(filepath.Join(dir, name), testingutil.MustReadFile(t, filepath.Join(sampleLog, name)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	l := testingutil.MustOpenLog(t, "sample", dir, "")
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestLtxLs(t *testing.T) {
	out, _, err := run(t, "ltx", "ls", sampleLog)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "FILE") {
		t.Fatalf("ls printed %d lines:\n%s", len(lines), out)
	}
	for i, name := range sampleFiles {
		if !strings.HasPrefix(lines[i+1], name) {
			t.Fatalf("line %d = %q, want %s first", i+1, lines[i+1], name)
		}
	}
	if !strings.Contains(lines[3], "0000000000000004/") || !strings.Contains(lines[3], "0000000000000005/") {
		t.Fatalf("last line lacks its pre- and post-apply positions: %q", lines[3])
	}

	out, _, err = run(t, "ltx", "ls", "-json", sampleLog)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(strings.NewReader(out))
	for i := 0; dec.More(); i++ {
		var f struct {
			Name     string `json:"name"`
			MinTXID  string `json:"min_txid"`
			MaxTXID  string `json:"max_txid"`
			PageSize int    `json:"page_size"`
		}
		if err := dec.Decode(&f); err != nil {
			t.Fatal(err)
		}
		if f.Name != sampleFiles[i] || f.PageSize != 4096 || f.Name[:16] != f.MinTXID || f.Name[17:33] != f.MaxTXID {
			t.Fatalf("json file %d = %+v", i, f)
		}
	}
}

func TestLtxDump(t *testing.T) {
	path := filepath.Join(sampleLog, sampleFiles[2])
	out, _, err := run(t, "ltx", "dump", path)
	if err != nil {
		t.Fatal(err)
	}
	info, err := ltx.VerifyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"page size:   4096",
		"txid:        0000000000000005-0000000000000005",
		"pre-apply:   " + info.PreApplyPos().String(),
		"post-apply:  " + info.Pos().String(),
		"file crc:    " + info.FileChecksum.String() + " (matches)",
		"pages:       2",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dump lacks %q:\n%s", want, out)
		}
	}

	// A snapshot's dump recomputes the database checksum from its pages.
	out, _, err = run(t, "ltx", "dump", "-hex", filepath.Join(sampleLog, sampleFiles[0]))
	if err != nil {
		t.Fatal(err)
	}
	snap, _ := ltx.VerifyFile(filepath.Join(sampleLog, sampleFiles[0]))
	if !strings.Contains(out, "db checksum: "+snap.PostApplyChecksum.String()) || !strings.Contains(out, "00000000  53 51 4c 69 74 65") {
		t.Errorf("snapshot dump lacks its checksum or the hex of page 1:\n%s", out)
	}

	// Damage is an error, after what could be printed.
	bad := filepath.Join(t.TempDir(), sampleFiles[2])
	b := testingutil.MustReadFile(t, path)
	b[len(b)-1] ^= 1
	if err := os.WriteFile(bad, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := run(t, "ltx", "dump", bad); !errors.Is(err, ltx.ErrCorrupt) {
		t.Fatalf("dump of a damaged file: err = %v, want ErrCorrupt", err)
	}
}

func TestLtxVerify(t *testing.T) {
	dir := sealedLog(t)
	out, _, err := run(t, "ltx", "verify", dir)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "ok, 3 files, txid 0000000000000001-0000000000000005") || strings.Contains(out, "not sealed") {
		t.Fatalf("verify of the sealed sample log:\n%s", out)
	}
	out, _, err = run(t, "ltx", "verify", sampleLog)
	if err != nil || !strings.Contains(out, "3 of 3 files are not sealed") {
		t.Fatalf("verify of the unsealed sample log: %v\n%s", err, out)
	}

	// Every single-bit flip and every truncation of each sealed sample
	// file fails `verify`.
	for _, name := range sampleFiles {
		path := filepath.Join(dir, name)
		good := testingutil.MustReadFile(t, path)
		var n int
		check := func(what string, bad []byte) {
			n++
			if err := os.WriteFile(path, bad, 0o644); err != nil {
				t.Fatal(err)
			}
			if _, stderr, err := run(t, "ltx", "verify", path); err == nil || !strings.Contains(stderr, "corrupt LTX file") {
				t.Fatalf("%s: %s to %d bytes: verify err = %v, stderr %q", name, what, len(bad), err, stderr)
			}
		}
		for i := range good {
			for bit := 0; bit < 8; bit++ {
				b := bytes.Clone(good)
				b[i] ^= 1 << bit
				check("flip", b)
			}
		}
		for i := range good {
			check("truncate", good[:i])
		}
		if err := os.WriteFile(path, good, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: verify rejected %d damaged versions", name, n)
	}

	// A directory with a gap names both sides of it.
	gap := sealedLog(t)
	if err := os.Remove(filepath.Join(gap, sampleFiles[1])); err != nil {
		t.Fatal(err)
	}
	_, stderr, err := run(t, "ltx", "verify", gap)
	if err == nil || !strings.Contains(stderr, "gap in TXIDs") || !strings.Contains(stderr, sampleFiles[0]) || !strings.Contains(stderr, sampleFiles[2]) {
		t.Fatalf("verify of a log with a gap: err = %v, stderr %q", err, stderr)
	}
}

func TestLtxChecksum(t *testing.T) {
	out, _, err := run(t, "ltx", "checksum", sampleDB)
	if err != nil {
		t.Fatal(err)
	}
	info, err := ltx.VerifyFile(filepath.Join(sampleLog, sampleFiles[2]))
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("checksum %s, %d pages of 4096 bytes", info.PostApplyChecksum, info.Header.Commit); !strings.Contains(out, want) {
		t.Fatalf("checksum output %q lacks %q", out, want)
	}
	if _, _, err := run(t, "ltx", "checksum", filepath.Join(sampleLog, sampleFiles[0])); err == nil || !strings.Contains(err.Error(), "not a SQLite database") {
		t.Fatalf("checksum of an LTX file: err = %v", err)
	}
}

func TestLtxRestore(t *testing.T) {
	want := testingutil.FileSHA256(t, sampleDB)
	dst := filepath.Join(t.TempDir(), "restored.db")
	out, _, err := run(t, "ltx", "restore", "-o", dst, sampleLog)
	if err != nil {
		t.Fatal(err)
	}
	if got := testingutil.FileSHA256(t, dst); got != want || !strings.Contains(out, "from 3 files") {
		t.Fatalf("restored sha256 %s, want %s; output %q", got, want, out)
	}
	if _, _, err := run(t, "ltx", "restore", "-o", dst, sampleLog); err == nil || !strings.Contains(err.Error(), "pass -f") {
		t.Fatalf("restore over an existing file: err = %v", err)
	}

	// From files, replacing the output.
	var args []string
	for _, name := range sampleFiles {
		args = append(args, filepath.Join(sampleLog, name))
	}
	if _, _, err := run(t, append([]string{"ltx", "restore", "-f", "-o", dst}, args...)...); err != nil {
		t.Fatal(err)
	}
	if got := testingutil.FileSHA256(t, dst); got != want {
		t.Fatalf("restored from files: sha256 %s, want %s", got, want)
	}

	// A damaged log restores nothing.
	dir := sealedLog(t)
	path := filepath.Join(dir, sampleFiles[1])
	b := testingutil.MustReadFile(t, path)
	b[200] ^= 4
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad.db")
	if _, _, err := run(t, "ltx", "restore", "-o", bad, dir); err == nil || !strings.Contains(err.Error(), sampleFiles[1]) {
		t.Fatalf("restore from a damaged log: err = %v", err)
	}
	if _, err := os.Stat(bad); !os.IsNotExist(err) {
		t.Fatalf("restore from a damaged log left %s behind", bad)
	}
}

func TestExitStatus(t *testing.T) {
	dir := sealedLog(t)
	if code, stderr := exitStatus(t, "ltx", "verify", dir); code != 0 {
		t.Fatalf("verify of a good log: exit %d, %s", code, stderr)
	}
	path := filepath.Join(dir, sampleFiles[2])
	b := testingutil.MustReadFile(t, path)
	if err := os.WriteFile(path, b[:len(b)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	if code, stderr := exitStatus(t, "ltx", "verify", dir); code != 1 || !strings.Contains(stderr, sampleFiles[2]) || !strings.Contains(stderr, "truncated") {
		t.Fatalf("verify of a truncated file: exit %d, stderr %q", code, stderr)
	}
	if code, stderr := exitStatus(t, "ltx", "frobnicate"); code != 2 || !strings.Contains(stderr, `unknown ltx command "frobnicate"`) {
		t.Fatalf("unknown command: exit %d, stderr %q", code, stderr)
	}
	if code, _ := exitStatus(t); code != 2 {
		t.Fatalf("no command: exit %d, want 2", code)
	}
}

// TestLtxSegments runs ls, verify, export and restore on a log whose files
// are in a segment, as a node's own commits are, and verify on one whose
// segment was damaged.
func TestLtxSegments(t *testing.T) {
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "db")
	data := testingutil.MustReadFile(t, sampleDB)
	if err := os.WriteFile(dbPath, data, 0o644); err != nil {
		t.Fatal(err)
	}
	logDir := filepath.Join(dir, "ltx")
	l := testingutil.NewSegmentLog(t, "sample", logDir, dbPath)
	if err := l.Open(context.Background()); err != nil { // the database as it is becomes txid 1
		t.Fatal(err)
	}
	for i := range 2 {
		data[4096+100+i] ^= 0xff
		if err := os.WriteFile(dbPath, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := l.Commit(context.Background(), ltx.Tx{DB: bytes.NewReader(data), PageSize: 4096, Commit: uint32(len(data) / 4096), Pgnos: []uint32{2}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	names := []string{"0000000000000001-0000000000000001.ltx", "0000000000000002-0000000000000002.ltx", "0000000000000003-0000000000000003.ltx"}

	out, _, err := run(t, "ltx", "ls", logDir)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 {
		t.Fatalf("ls printed %d lines:\n%s", len(lines), out)
	}
	for i, name := range names {
		if !strings.HasPrefix(lines[i+1], name) {
			t.Fatalf("ls line %d = %q, want %s first", i+1, lines[i+1], name)
		}
	}
	if _, _, err := run(t, "ltx", "verify", logDir); err != nil {
		t.Fatalf("verify: %v", err)
	}

	exported := filepath.Join(t.TempDir(), "out")
	if out, _, err := run(t, "ltx", "export", logDir, exported); err != nil || !strings.Contains(out, "exported 3 files") {
		t.Fatalf("export: %q, %v", out, err)
	}
	for _, name := range names {
		if _, _, err := run(t, "ltx", "verify", filepath.Join(exported, name)); err != nil {
			t.Fatalf("verify exported %s: %v", name, err)
		}
	}
	if out, _, err := run(t, "ltx", "export", "-from", "2", "-to", "2", logDir, t.TempDir()); err != nil || !strings.Contains(out, "exported 1 files") {
		t.Fatalf("export -from 2 -to 2: %q, %v", out, err)
	}
	want := testingutil.FileSHA256(t, dbPath)
	for _, src := range []string{logDir, exported} {
		dst := filepath.Join(t.TempDir(), "restored.db")
		if out, _, err := run(t, "ltx", "restore", "-o", dst, src); err != nil || !strings.Contains(out, "from 3 files") {
			t.Fatalf("restore from %s: %q, %v", src, out, err)
		}
		if got := testingutil.FileSHA256(t, dst); got != want {
			t.Fatalf("restored from %s: sha256 %s, want the database's %s", src, got, want)
		}
	}

	// A bit flipped in the middle file's page data: verify names the
	// segment and the file's offset, and exits with status 1.
	seg := filepath.Join(logDir, "0000000000000001.segment")
	rep, err := ltx.ReadSegment(seg)
	if err != nil || len(rep.Entries) != 3 {
		t.Fatalf("read segment: %v", err)
	}
	mid := rep.Entries[1]
	b := testingutil.MustReadFile(t, seg)
	b[mid.Offset+mid.Size/2] ^= 4
	if err := os.WriteFile(seg, b, 0o644); err != nil {
		t.Fatal(err)
	}
	code, stderr := exitStatus(t, "ltx", "verify", logDir)
	if code != 1 || !strings.Contains(stderr, seg) || !strings.Contains(stderr, "offset "+strconv.FormatInt(mid.Offset, 10)) {
		t.Fatalf("verify of a damaged segment: exit %d, stderr %q", code, stderr)
	}
}

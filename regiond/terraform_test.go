//go:build terraform

package regiond_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meridian-db/meridian/regiond"
)

// TestTerraform_TopologyConfigsLoad applies terraform/modules/topology to
// three regions with terraform (MERIDIAN_TERRAFORM, which make
// test-terraform sets from scripts/install-terraform.sh) and loads every
// regiond.yml it renders as regiond would: each parses and validates, and
// says what the module was given.
func TestTerraform_TopologyConfigsLoad(t *testing.T) {
	tf := os.Getenv("MERIDIAN_TERRAFORM")
	if tf == "" {
		t.Fatal("MERIDIAN_TERRAFORM is not set: make test-terraform sets it from scripts/install-terraform.sh")
	}
	module, err := filepath.Abs("../terraform/modules/topology")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	root := `module "topology" {
  source = "` + module + `"
  regions = [
    { name = "iad", nodes = [{ name = "iad-1", host = "10.0.1.10" }, { name = "iad-2", host = "10.0.1.11", candidate = false }] },
    { name = "fra", nodes = [{ name = "fra-1", host = "10.0.2.10" }] },
    { name = "syd", nodes = [{ name = "syd-1", host = "10.0.3.10" }] },
  ]
  durability    = "sync"
  sync_acks     = 2
  otlp_endpoint = "http://10.0.0.5:4317"
}
output "configs" { value = module.topology.configs }
`
	if err := os.WriteFile(filepath.Join(dir, "main.tf"), []byte(root), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) []byte {
		t.Helper()
		cmd := exec.Command(tf, append([]string{"-chdir=" + dir}, args...)...)
		cmd.Env = append(os.Environ(), "TF_IN_AUTOMATION=1", "CHECKPOINT_DISABLE=1")
		out, err := cmd.Output()
		if err != nil {
			var stderr string
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = string(ee.Stderr)
			}
			t.Fatalf("%s %s: %v\n%s%s", tf, strings.Join(args, " "), err, out, stderr)
		}
		return out
	}
	run("init", "-input=false", "-no-color")
	run("apply", "-auto-approve", "-input=false", "-no-color")
	var configs map[string]string
	if err := json.Unmarshal(run("output", "-json", "configs"), &configs); err != nil {
		t.Fatal(err)
	}
	if len(configs) != 4 {
		t.Fatalf("%d configs, want 4: %v", len(configs), configs)
	}
	for node, text := range configs {
		c, err := regiond.ParseConfig(strings.NewReader(text), "/etc/meridian")
		if err != nil {
			t.Errorf("%s's regiond.yml does not load: %v\n%s", node, err, text)
			continue
		}
		if c.Node != node || len(c.Replication.Peers) != 3 || c.Replication.Durability != "sync" || c.Replication.SyncAcks != 2 ||
			c.Lease.Type != "consul" || c.Lease.Candidate != (node != "iad-2") || c.Telemetry.OTLPEndpoint != "http://10.0.0.5:4317" ||
			c.Router.PeerListen == "" || c.TLS.Key != "/etc/meridian/"+node+"-key.pem" {
			t.Errorf("%s's regiond.yml loads as %+v", node, c)
		}
	}
}

// TestTerraform_LocalExample takes terraform/examples/local through its
// life as an operator would: apply brings up Consul and three regions
// over SSH (sshd on 127.0.0.2-4); a write through syd's router is read
// through iad's and fra's; regiond status shows three nodes and one
// primary; an apply that changes durability rolls the nodes one at a time
// while a client writes, and every write acknowledged is in every region
// after; destroy leaves no process, mount or listening port of it.
func TestTerraform_LocalExample(t *testing.T) {
	tf, consul := os.Getenv("MERIDIAN_TERRAFORM"), os.Getenv("MERIDIAN_CONSUL")
	if tf == "" || consul == "" {
		t.Fatal("MERIDIAN_TERRAFORM and MERIDIAN_CONSUL are not set: make test-terraform sets them from scripts/install-terraform.sh and scripts/install-consul.sh")
	}
	example, err := filepath.Abs("../terraform/examples/local")
	if err != nil {
		t.Fatal(err)
	}
	bin, _ := filepath.Abs("../bin")
	work := t.TempDir()
	state := filepath.Join(work, "state")
	vars := []string{"-var", "consul_binary=" + consul, "-var", "state_dir=" + state,
		"-var", "regiond_binary=" + filepath.Join(bin, "regiond"), "-var", "app_binary=" + filepath.Join(bin, "guestbook")}
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(tf, append([]string{"-chdir=" + example}, args...)...)
		cmd.Env = append(os.Environ(), "TF_IN_AUTOMATION=1", "CHECKPOINT_DISABLE=1", "TF_DATA_DIR="+filepath.Join(work, ".terraform"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("terraform %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	tfState := "-state=" + filepath.Join(work, "terraform.tfstate")
	run("init", "-input=false", "-no-color")
	destroyed := false
	t.Cleanup(func() {
		if !destroyed {
			cmd := exec.Command(tf, append([]string{"-chdir=" + example, "destroy", "-auto-approve", "-no-color", tfState}, vars...)...)
			cmd.Env = append(os.Environ(), "TF_DATA_DIR="+filepath.Join(work, ".terraform"))
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("terraform destroy: %v\n%s", err, out)
			}
		}
		if left := localLeftovers(state); left != "" {
			t.Errorf("left after destroy: %s", left)
		}
	})
	began := time.Now()
	run(append([]string{"apply", "-auto-approve", "-input=false", "-no-color", tfState}, vars...)...)
	t.Logf("apply: three regions up in %v", time.Since(began).Round(time.Millisecond))

	routers := map[string]string{"iad": "http://127.0.0.2:8080", "fra": "http://127.0.0.3:8080", "syd": "http://127.0.0.4:8080"}
	id, err := postEntry(routers["syd"], "terraform", "through syd", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"iad", "fra"} {
		if err := waitEntry(routers[r], id); err != nil {
			t.Fatalf("entry %d written through syd, read through %s: %v", id, r, err)
		}
	}
	out, err := exec.Command(filepath.Join(bin, "regiond"), "status", "-config", filepath.Join(state, "hosts", "fra-1", "etc", "regiond.yml")).CombinedOutput()
	if err != nil {
		t.Fatalf("regiond status: %v\n%s", err, out)
	}
	nodeLines := regexp.MustCompile(`(?m)^(iad|fra|syd)-1 +(iad|fra|syd) +(primary|replica) +\d+ +yes `).FindAllStringSubmatch(string(out), -1)
	primaries := 0
	for _, l := range nodeLines {
		if l[3] == "primary" {
			primaries++
		}
	}
	if len(nodeLines) != 3 || primaries != 1 {
		t.Fatalf("regiond status shows %d ready nodes, %d primaries; want 3 and 1:\n%s", len(nodeLines), primaries, out)
	}

	// A node whose regiond dies is started again by its supervisor, and
	// takes writes again.
	pidFile := filepath.Join(state, "hosts", "syd-1", "regiond.pid")
	pid := readPid(t, pidFile)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	for {
		if p, err := os.ReadFile(pidFile); err == nil && strings.TrimSpace(string(p)) != fmt.Sprint(pid) {
			if resp, err := http.Get("http://127.0.0.4:20211/readyz"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
		}
		if time.Since(killed) > time.Minute {
			t.Fatalf("syd-1's regiond, killed (pid %d), was not running and ready again within a minute", pid)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("syd-1's regiond killed with SIGKILL: running and ready again after %v (pid %d)", time.Since(killed).Round(time.Millisecond), readPid(t, pidFile))
	id, err = postEntry(routers["syd"], "terraform", "after the crash", "")
	if err != nil {
		t.Fatalf("a write through syd after its regiond was started again: %v", err)
	}
	if err := waitEntry(routers["iad"], id); err != nil {
		t.Fatalf("entry %d written through syd after the crash, read through iad: %v", id, err)
	}

	// A client writes through fra while durability changes and the nodes
	// roll.
	var (
		stop             atomic.Bool
		mu               sync.Mutex
		acked            []int64
		failed, attempts int
		errs             []string // the first few
		wg               sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			id, err := postEntry(routers["fra"], "roll", fmt.Sprintf("write %d", i), fmt.Sprintf("roll-%d", i))
			mu.Lock()
			attempts++
			if err == nil {
				acked = append(acked, id)
			} else {
				failed++
				if len(errs) < 3 {
					errs = append(errs, err.Error())
				}
			}
			mu.Unlock()
			if err != nil {
				time.Sleep(50 * time.Millisecond)
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	began = time.Now()
	rolled := run(append([]string{"apply", "-auto-approve", "-input=false", "-no-color", tfState, "-var", "durability=sync"}, vars...)...)
	t.Logf("apply durability=sync: rolled in %v", time.Since(began).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	for _, n := range []string{"fra-1", "syd-1", "iad-1"} {
		if !strings.Contains(rolled, "roll.sh: "+n) {
			t.Errorf("the apply did not roll %s:\n%s", n, rolled)
		}
		b, err := os.ReadFile(filepath.Join(state, "hosts", n, "etc", "regiond.yml"))
		if err != nil || !strings.Contains(string(b), `"durability": "sync"`) {
			t.Errorf("%s's installed regiond.yml: %v\n%s", n, err, b)
		}
	}
	t.Logf("during the roll: %d writes, %d acknowledged, %d failed (and were not acknowledged), e.g. %q", attempts, len(acked), failed, errs)
	if len(acked) == 0 {
		t.Fatal("no write was acknowledged during the roll")
	}
	for r, u := range routers {
		// Caught up once the last write is there; then every one is.
		if err := waitEntry(u, acked[len(acked)-1]); err != nil {
			t.Fatalf("the last write acknowledged, entry %d, through %s: %v", acked[len(acked)-1], r, err)
		}
		var missing []int64
		for _, id := range acked {
			resp, err := http.Get(fmt.Sprintf("%s/api/entries/%d", u, id))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			t.Errorf("%s lacks %d of the %d writes acknowledged during the roll, e.g. %v", r, len(missing), len(acked), missing[:min(len(missing), 10)])
		}
	}

	run(append([]string{"destroy", "-auto-approve", "-no-color", tfState}, vars...)...)
	destroyed = true
}

// readPid reads a pid file.
func readPid(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil || pid <= 0 {
		t.Fatalf("%s: %q", path, b)
	}
	return pid
}

// postEntry writes an entry through router, with an Idempotency-Key if
// key is not "", and returns its ID.
func postEntry(router, name, msg, key string) (int64, error) {
	b, _ := json.Marshal(map[string]string{"name": name, "message": msg})
	req, _ := http.NewRequest("POST", router+"/entries", bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		return 0, fmt.Errorf("%s: %s", resp.Status, body)
	}
	var e struct{ ID int64 }
	if err := json.Unmarshal(body, &e); err != nil {
		return 0, err
	}
	return e.ID, nil
}

// waitEntry waits up to 10 s for entry id to be readable through router.
func waitEntry(router string, id int64) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("%s/api/entries/%d", router, id))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("%s", resp.Status)
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// localLeftovers says what of the local example under state still runs,
// is mounted or listens.
func localLeftovers(state string) string {
	var left []string
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for line := range strings.SplitSeq(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], state+"/") {
			left = append(left, "mounted: "+f[4])
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		cmdline, _ := os.ReadFile(p + "/cmdline")
		environ, _ := os.ReadFile(p + "/environ")
		if bytes.Contains(cmdline, []byte(state+"/")) || bytes.Contains(environ, []byte("MERIDIAN_MOUNT_DIR="+state+"/")) {
			left = append(left, "process "+filepath.Base(p)+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	for _, host := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"} {
		for _, port := range []string{"2222", "8080", "8443", "20210", "20211", "3000", "8500"} {
			if l, err := net.Listen("tcp", net.JoinHostPort(host, port)); err != nil {
				left = append(left, "port "+host+":"+port+" in use")
			} else {
				l.Close()
			}
		}
	}
	return strings.Join(left, "; ")
}

// TestTerraform_SystemdUnit checks the unit the hosts module's
// bin/meridian-node installs where systemd runs the host: the command line
// it gives systemd (app arguments with spaces, quotes, % and $ in them
// reach the app as given), the stop and restart settings, and that
// systemd-analyze verify accepts it (and refuses it once regiond is
// missing, so the check is real). This machine has no systemd running, so
// the unit is verified, not started; the test also checks that a node told
// to use systemd where it does not run refuses to start, naming the
// setting.
func TestTerraform_SystemdUnit(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze is not installed (Debian: apt-get install systemd; .ci/run installs it)")
	}
	root := t.TempDir()
	for _, d := range []string{"bin", "etc", "log"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	script, err := os.ReadFile("../terraform/modules/hosts/meridian-node.sh")
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, content string, mode os.FileMode) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("bin/meridian-node", string(script), 0o755)
	write("bin/regiond", "#!/bin/sh\n", 0o755)
	write("bin/app", "#!/bin/sh\n", 0o755)
	write("etc/regiond.yml", "node: iad-1\nregion: iad\nmount_dir: "+root+"/mnt\n", 0o644)

	out, err := exec.Command(filepath.Join(root, "bin/meridian-node"), "unit", "-listen", "127.0.0.1:8080", "two words", `50%$HOME"q`).CombinedOutput()
	if err != nil {
		t.Fatalf("meridian-node unit: %v\n%s", err, out)
	}
	unit := string(out)
	for _, want := range []string{
		"\nWorkingDirectory=" + root + "\n",
		"\nExecStart=\"" + root + "/bin/regiond\" run -config \"" + root + "/etc/regiond.yml\" -- \"" + root + "/bin/app\" \"-listen\" \"127.0.0.1:8080\" \"two words\" \"50%%$$HOME\\\"q\"\n",
		"\nExecStopPost=-/bin/sh -c 'if mountpoint -q \"$$1\"; then fusermount3 -u -z \"$$1\" || umount -l \"$$1\"; fi' unmount \"" + root + "/mnt\"\n",
		"\nKillMode=mixed\n", "\nKillSignal=SIGTERM\n", "\nTimeoutStopSec=30\n",
		"\nRestart=always\n", "\nRestartSec=1\n",
		"\nStandardOutput=append:" + root + "/log/regiond.log\n",
		"\n[Install]\nWantedBy=multi-user.target\n",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("the unit has no line %q:\n%s", strings.TrimSpace(want), unit)
		}
	}
	unitFile := filepath.Join(t.TempDir(), "meridian-iad-1.service")
	if err := os.WriteFile(unitFile, out, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(analyze, "verify", unitFile).CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Fatalf("systemd-analyze verify %s: %v\n%s\nthe unit:\n%s", unitFile, err, out, unit)
	}
	if err := os.Remove(filepath.Join(root, "bin/regiond")); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(analyze, "verify", unitFile).CombinedOutput(); err == nil {
		t.Fatalf("systemd-analyze verify accepted the unit with %s/bin/regiond missing:\n%s", root, out)
	}

	if _, err := os.Stat("/run/systemd/system"); err == nil {
		return // systemd runs this host: a start would install the unit for real
	}
	for _, c := range []struct{ manager, want string }{
		{"systemd", `etc/service-manager says systemd, but systemd does not run this host (no /run/systemd/system)`},
		{"runit", `etc/service-manager: unknown service manager "runit" (want systemd, supervisor or auto)`},
	} {
		write("etc/service-manager", c.manager+"\n", 0o644)
		out, err := exec.Command(filepath.Join(root, "bin/meridian-node"), "start", "127.0.0.1:1", "1").CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("meridian-node start with service manager %q: %v, output %q; want a failure saying %q", c.manager, err, out, c.want)
		}
	}
}

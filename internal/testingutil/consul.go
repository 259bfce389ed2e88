package testingutil

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ConsulVersion is the Consul agent scripts/install-consul.sh builds.
const ConsulVersion = "v1.20.6"

// consulStartTimeout bounds how long a dev agent may take to elect itself
// and register its node.
const consulStartTimeout = 30 * time.Second

// Consul is a Consul agent in dev mode (one server, in memory) on an
// address of its own in 127.0.0.0/8, started by a test and stopped at its
// cleanup.
type Consul struct {
	// URL is the agent's HTTP API, e.g. http://127.4.5.6:41234.
	URL string
	// Node is the agent's node name.
	Node string
	// Token is the ACL management token of an agent started with ACLs on
	// (StartConsulACL), "" otherwise.
	Token string

	bin  string
	args []string
	cmd  *exec.Cmd
	done chan struct{}
	log  *LockedBuffer
}

// ConsulBinary returns the Consul agent to run: $MERIDIAN_CONSUL, else a
// consul on PATH, else the binary scripts/install-consul.sh builds into
// $MERIDIAN_CACHE (default ~/.cache/meridian). `make test` runs the
// script first.
func ConsulBinary() (string, error) {
	if p := os.Getenv("MERIDIAN_CONSUL"); p != "" {
		return p, nil
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p, nil
	}
	cache := os.Getenv("MERIDIAN_CACHE")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", err
		}
		cache = filepath.Join(home, ".cache", "meridian")
	}
	p := filepath.Join(cache, "consul-"+ConsulVersion, "consul")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("no Consul agent: not in $MERIDIAN_CONSUL, not on PATH, not at %s; run scripts/install-consul.sh (make test does)", p)
	}
	return p, nil
}

// StartConsul starts a dev agent and waits until it has elected itself and
// its node is healthy, so that sessions can be created at once.
func StartConsul(tb TB) *Consul {
	tb.Helper()
	return startConsul(tb, "")
}

// StartConsulACL is StartConsul with ACLs on and denied by default: only
// requests with a token get anything; Token is the management token.
func StartConsulACL(tb TB) *Consul {
	tb.Helper()
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	token := fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
	return startConsul(tb, token)
}

func startConsul(tb TB, token string) *Consul {
	tb.Helper()
	bin, err := ConsulBinary()
	if err != nil {
		tb.Fatal(err)
	}
	host, _, _ := net.SplitHostPort(FreeAddr(tb))
	// Each port is held until all are picked: a port closed at once may
	// be handed out again to the next (the agent then refuses to start
	// with, e.g., its serf LAN and WAN on one port).
	var held []net.Listener
	port := func() string {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			tb.Fatal(err)
		}
		held = append(held, l)
		return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	}
	httpPort := port()
	c := &Consul{URL: "http://" + net.JoinHostPort(host, httpPort), Node: "consul-" + strings.ReplaceAll(host, ".", "-"),
		Token: token, bin: bin, log: &LockedBuffer{}}
	c.args = []string{"agent", "-dev", "-node", c.Node, "-bind", host, "-client", host, "-advertise", host,
		"-http-port", httpPort, "-server-port", port(), "-serf-lan-port", port(), "-serf-wan-port", port(),
		"-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1", "-log-level", "warn"}
	for _, l := range held {
		_ = l.Close()
	}
	if token != "" {
		c.args = append(c.args, "-hcl", fmt.Sprintf(`acl { enabled = true
default_policy = "deny"
tokens { initial_management = %q
agent = %q } }`, token, token))
	}
	tb.Cleanup(func() {
		if err := c.stop(); err != nil {
			tb.Error(err)
		}
		if tb.Failed() {
			tb.Logf("consul agent %s log:\n%s", c.URL, c.log.String())
		}
	})
	c.start(tb)
	return c
}

// ACLToken creates, on an agent started by StartConsulACL, a policy
// called name with rules and a token of it, and returns the token's
// secret ID.
func (c *Consul) ACLToken(tb TB, name, rules string) string {
	tb.Helper()
	var policy struct{ ID string }
	if err := c.put("/v1/acl/policy", map[string]string{"Name": name, "Rules": rules}, &policy); err != nil {
		tb.Fatalf("create ACL policy %s: %v", name, err)
	}
	var token struct{ SecretID string }
	if err := c.put("/v1/acl/token", map[string]any{"Policies": []map[string]string{{"ID": policy.ID}}}, &token); err != nil {
		tb.Fatalf("create a token of ACL policy %s: %v", name, err)
	}
	return token.SecretID
}

// put sends body as JSON in a PUT to path, with the management token,
// and decodes the JSON answer into v.
func (c *Consul) put(path string, body, v any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodPut, c.URL+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("X-Consul-Token", c.Token)
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("PUT %s: %s: %s", path, resp.Status, msg)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// Restart starts the agent again, on the same address and ports, after
// Stop. A dev agent keeps nothing: its KV store, sessions and checks start
// empty, as a Consul cluster that lost its data would.
func (c *Consul) Restart(tb TB) {
	tb.Helper()
	if err := c.stop(); err != nil {
		tb.Fatal(err)
	}
	c.start(tb)
}

// start runs the agent and waits until it is ready.
func (c *Consul) start(tb TB) {
	tb.Helper()
	c.cmd = exec.Command(c.bin, c.args...)
	c.cmd.Stdout, c.cmd.Stderr = c.log, c.log
	DieWithParent(c.cmd)
	if err := c.cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", c.bin, err)
	}
	done := make(chan struct{})
	c.done = done
	cmd := c.cmd
	go func() { _ = cmd.Wait(); close(done) }()
	deadline := time.Now().Add(consulStartTimeout)
	for {
		err := c.ready()
		if err == nil {
			return
		}
		select {
		case <-c.done:
			tb.Fatalf("consul agent %s exited at start: %v\n%s", c.URL, c.cmd.ProcessState, c.log.String())
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("consul agent %s not ready after %v: %v\n%s", c.URL, consulStartTimeout, err, c.log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ready reports why the agent cannot take sessions yet: no leader, or its
// node's serfHealth check not passing.
func (c *Consul) ready() error {
	var leader string
	if err := c.get("/v1/status/leader", &leader); err != nil {
		return err
	}
	if leader == "" {
		return errors.New("no leader yet")
	}
	var checks []struct{ CheckID, Status string }
	if err := c.get("/v1/health/node/"+c.Node, &checks); err != nil {
		return err
	}
	for _, ch := range checks {
		if ch.CheckID == "serfHealth" && ch.Status == "passing" {
			return nil
		}
	}
	return fmt.Errorf("node %s: serfHealth not passing yet (%v)", c.Node, checks)
}

// get decodes the JSON answer to a GET of path.
func (c *Consul) get(path string, v any) error {
	client := http.Client{Timeout: 2 * time.Second}
	req, err := http.NewRequest(http.MethodGet, c.URL+path, nil)
	if err != nil {
		return err
	}
	if c.Token != "" {
		req.Header.Set("X-Consul-Token", c.Token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// Stop kills the agent, as a crash of Consul would, and waits for it.
func (c *Consul) Stop(tb TB) {
	tb.Helper()
	if err := c.stop(); err != nil {
		tb.Fatal(err)
	}
}

func (c *Consul) stop() error {
	if c.cmd == nil {
		return nil
	}
	select {
	case <-c.done:
		return nil
	default:
	}
	_ = c.cmd.Process.Kill()
	select {
	case <-c.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("consul agent %s (pid %d) still runs 10s after SIGKILL", c.URL, c.cmd.Process.Pid)
	}
}

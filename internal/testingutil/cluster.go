package testingutil

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meridian-db/meridian/internal/fusectl"
	"github.com/meridian-db/meridian/ltx"
)

// TB is the part of testing.TB a Cluster uses, so that a program (a
// benchmark under bench/) can run one too.
type TB interface {
	Helper()
	Cleanup(func())
	TempDir() string
	Failed() bool
	Logf(format string, args ...any)
	Error(args ...any)
	Errorf(format string, args ...any)
	Fatal(args ...any)
	Fatalf(format string, args ...any)
}

// Bounds of the cluster harness's waits.
const (
	// ClusterMountTimeout bounds how long a started node may take to mount.
	ClusterMountTimeout = 20 * time.Second
	// ClusterStopTimeout bounds how long a node may take to exit after
	// SIGTERM before it is killed.
	ClusterStopTimeout = 15 * time.Second
)

// ClusterNodeSpec describes a node of a test cluster.
type ClusterNodeSpec struct {
	Name   string // node name, e.g. iad-1; also its certificate's name
	Region string // e.g. iad
	Locks  string // fs.locks: "mount" or "kernel"; "" for mount
	// OtherCA gives the node a certificate from a CA of its own instead of
	// the cluster's. Its tls.ca holds both CAs, so it loads its own
	// certificate and trusts the cluster's nodes, but they do not trust it.
	OtherCA bool
	// Replication holds more keys of its replication section, one per
	// line, e.g. "durability: sync".
	Replication []string
	// Extra holds more top-level lines of its regiond.yml, e.g.
	// "router: {max_lag: 1s}".
	Extra []string
	// Lease, if not "", is its lease section, as one flow mapping,
	// instead of the cluster's.
	Lease string
	// App, if set, is the app regiond runs as its child (after "--"),
	// and the node runs its router (router.listen) in front of it: the
	// app listens on MERIDIAN_LISTEN. RouterKeys holds more keys of the
	// router section, e.g. "ryw_timeout: 1s, primary_wait: 2s".
	App        []string
	RouterKeys string
	// Env holds more environment variables of its process (and its
	// app's), "KEY=value".
	Env []string
}

// Cluster is a cluster of real `regiond run` processes on loopback, with
// a static lease, mutual TLS from `regiond ca`, and each node's files in a
// directory of its own. NewCluster writes the configuration; Start starts
// the nodes.
type Cluster struct {
	Dir     string // holds ca/ and a directory per node
	Primary string // lease.static_primary
	// Lease, if not "", is every node's lease section instead of the
	// static lease of Primary, as one flow mapping, e.g.
	// "{type: consul, consul_url: http://127.0.0.1:8500}" (UseConsul).
	Lease string
	Nodes []*ClusterNode
	// Command returns the command that runs regiond with args.
	Command func(args ...string) *exec.Cmd
	// PeerAddr, if set, is the address node from dials to reach peer's
	// replication.listen (a proxy between them, for WAN latency); nil:
	// the address itself. RewriteConfigs writes it into the nodes'
	// regiond.yml.
	PeerAddr func(from, peer *ClusterNode) string
	// PeerRouter is PeerAddr for the peers' routers.
	PeerRouter func(from, peer *ClusterNode) string
	// RouterTLS has the nodes with an App serve their routers to each
	// other with mutual TLS on router.peer_listen (RouterPeer), and name
	// it as https:// in their peers' entries.
	RouterTLS bool

	tb TB
}

// ClusterNode is one node of a Cluster: its configuration and, while it
// runs, its process.
type ClusterNode struct {
	ClusterNodeSpec
	Addr    string // replication.listen, 127.0.0.1:PORT
	Admin   string // admin.listen, 127.0.0.1:PORT
	Router  string // router.listen with an App, else ""
	AppAddr string // where the router expects the App (router.target)
	// RouterPeer is router.peer_listen with an App and Cluster.RouterTLS.
	RouterPeer string
	Dir        string // holds regiond.yml, its certificate and key, and its log
	DataDir    string
	MountDir   string
	Config     string // path of regiond.yml
	LogPath    string // the process's stderr, every run appended

	c      *Cluster
	caFile string       // its tls.ca
	proc   *clusterProc // nil when not running
}

// clusterProc is a running regiond process.
type clusterProc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the process is waited for
	err  error         // what Wait returned; set before done is closed
}

// NewCluster makes the cluster's CA and a certificate per node with
// `regiond ca`, picks a free loopback port per node and writes each node's
// regiond.yml: primary holds the static lease, and every node lists every
// other as a peer. At cleanup it stops every node still running (SIGTERM,
// then SIGKILL after ClusterStopTimeout), lazily unmounts any mount left,
// fails the test if a mount is still there, and, if the test failed, logs
// the tail of every node's log.
func NewCluster(tb TB, command func(args ...string) *exec.Cmd, primary string, specs ...ClusterNodeSpec) *Cluster {
	tb.Helper()
	c := &Cluster{Dir: tb.TempDir(), Primary: primary, Command: command, tb: tb}
	tb.Cleanup(c.cleanup)
	caDir := filepath.Join(c.Dir, "ca")
	c.regiondCA("init", "-dir", caDir)
	for _, s := range specs {
		if s.Locks == "" {
			s.Locks = "mount"
		}
		dir := filepath.Join(c.Dir, s.Name)
		n := &ClusterNode{
			ClusterNodeSpec: s,
			Addr:            FreeAddr(tb),
			Admin:           FreeAddr(tb),
			Dir:             dir,
			DataDir:         filepath.Join(dir, "data"),
			MountDir:        filepath.Join(dir, "mnt"),
			Config:          filepath.Join(dir, "regiond.yml"),
			LogPath:         filepath.Join(dir, "regiond.log"),
			c:               c,
		}
		if len(s.App) > 0 {
			n.Router, n.AppAddr, n.RouterPeer = FreeAddr(tb), FreeAddr(tb), FreeAddr(tb)
		}
		c.Nodes = append(c.Nodes, n)
	}
	for _, n := range c.Nodes {
		c.issue(n, caDir)
		c.writeConfig(n)
	}
	return c
}

// SetPrimary makes node the static primary in every node's regiond.yml,
// for the nodes' next start.
func (c *Cluster) SetPrimary(node string) {
	c.tb.Helper()
	c.Primary = node
	for _, n := range c.Nodes {
		c.writeConfig(n)
	}
}

// UseConsul gives every node the lease in the Consul agent at url, with
// more keys of the lease section in extra (e.g. "check_ttl: 1s"), for the
// nodes' next start.
func (c *Cluster) UseConsul(url string, extra ...string) {
	c.tb.Helper()
	c.Lease = ConsulLease(url, extra...)
	for _, n := range c.Nodes {
		c.writeConfig(n)
	}
}

// RewriteConfigs writes every node's regiond.yml again, after a change to
// the cluster's settings (PeerAddr); running nodes read it at their next
// start.
func (c *Cluster) RewriteConfigs() {
	c.tb.Helper()
	for _, n := range c.Nodes {
		c.writeConfig(n)
	}
}

// ConsulLease returns the lease section of the Consul agent at url, with
// more keys in extra, as ClusterNodeSpec.Lease and Cluster.Lease take it.
func ConsulLease(url string, extra ...string) string {
	return "{" + strings.Join(append([]string{"type: consul", "consul_url: " + url}, extra...), ", ") + "}"
}

// regiondCA runs `regiond ca ARGS...` and fails the test if it fails.
func (c *Cluster) regiondCA(args ...string) {
	c.tb.Helper()
	cmd := c.Command(append([]string{"ca"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		c.tb.Fatalf("regiond ca %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// issue issues n's certificate, from the cluster's CA in caDir or, with
// OtherCA, from a CA of its own.
func (c *Cluster) issue(n *ClusterNode, caDir string) {
	c.tb.Helper()
	ca := filepath.Join(caDir, "ca.pem")
	if n.OtherCA {
		own := filepath.Join(n.Dir, "other-ca")
		c.regiondCA("init", "-dir", own, "-name", "Other CA of "+n.Name)
		c.regiondCA("issue", "-dir", own, "-node", n.Name, "-out", n.Dir)
		ca = filepath.Join(n.Dir, "ca-bundle.pem")
		bundle := slices.Concat(MustReadFile(c.tb, filepath.Join(own, "ca.pem")), MustReadFile(c.tb, filepath.Join(caDir, "ca.pem")))
		if err := os.WriteFile(ca, bundle, 0o644); err != nil {
			c.tb.Fatal(err)
		}
	} else {
		c.regiondCA("issue", "-dir", caDir, "-node", n.Name, "-out", n.Dir)
	}
	n.caFile = ca
}

// writeConfig writes n's regiond.yml.
func (c *Cluster) writeConfig(n *ClusterNode) {
	c.tb.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "node: %s\nregion: %s\n", n.Name, n.Region)
	fmt.Fprintf(&b, "data_dir: %q\nmount_dir: %q\n", n.DataDir, n.MountDir)
	fmt.Fprintf(&b, "fs: {locks: %s}\n", n.Locks)
	switch {
	case n.Lease != "":
		fmt.Fprintf(&b, "lease: %s\n", n.Lease)
	case c.Lease != "":
		fmt.Fprintf(&b, "lease: %s\n", c.Lease)
	default:
		fmt.Fprintf(&b, "lease: {type: static, static_primary: %s}\n", c.Primary)
	}
	fmt.Fprintf(&b, "replication:\n  listen: %s\n  peers:\n", n.Addr)
	for _, p := range c.Nodes {
		if p != n {
			addr := p.Addr
			if c.PeerAddr != nil {
				addr = c.PeerAddr(n, p)
			}
			rt := p.Router
			if c.PeerRouter != nil && rt != "" {
				rt = c.PeerRouter(n, p)
			}
			if c.RouterTLS && rt != "" {
				rt = "https://" + p.RouterPeer
			}
			fmt.Fprintf(&b, "    - {node: %s, region: %s, addr: %q, admin: %q, router: %q}\n", p.Name, p.Region, addr, p.Admin, rt)
		}
	}
	for _, line := range n.Replication {
		fmt.Fprintf(&b, "  %s\n", line)
	}
	fmt.Fprintf(&b, "tls: {ca: %q, cert: %q, key: %q}\n", n.caFile,
		filepath.Join(n.Dir, n.Name+".pem"), filepath.Join(n.Dir, n.Name+"-key.pem"))
	fmt.Fprintf(&b, "admin: {listen: %q}\n", n.Admin)
	if n.Router != "" {
		keys := ""
		if n.RouterKeys != "" {
			keys = ", " + n.RouterKeys
		}
		if c.RouterTLS {
			keys += fmt.Sprintf(", peer_listen: %q", n.RouterPeer)
		}
		fmt.Fprintf(&b, "router: {listen: %q, target: \"http://%s\"%s}\n", n.Router, n.AppAddr, keys)
	}
	for _, line := range n.Extra {
		fmt.Fprintf(&b, "%s\n", line)
	}
	fmt.Fprintf(&b, "log: {level: debug}\n")
	if err := os.WriteFile(n.Config, []byte(b.String()), 0o644); err != nil {
		c.tb.Fatal(err)
	}
}

// FreeAddr returns a loopback address with a port that was free a moment
// ago: it listens on port 0 of a random address in 127.0.0.0/8 and closes
// the listener. Not 127.0.0.1: between the close and the node's bind, the
// port must not go to another socket, and on 127.0.0.1 every outgoing
// connection on loopback (another test's, another node's) takes a port
// from the same range as its source; on an address of its own nothing
// else does. Certificates name nodes, not addresses, so any will do.
func FreeAddr(tb TB) string {
	tb.Helper()
	ip := net.IPv4(127, byte(1+rand.IntN(254)), byte(rand.IntN(256)), byte(1+rand.IntN(254)))
	l, err := net.Listen("tcp", net.JoinHostPort(ip.String(), "0"))
	if err != nil {
		tb.Fatal(err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		tb.Fatal(err)
	}
	return addr
}

// Node returns the node named name.
func (c *Cluster) Node(name string) *ClusterNode {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	c.tb.Fatalf("cluster: no node %q", name)
	return nil
}

// Start starts every node and waits until each has mounted.
func (c *Cluster) Start(tb TB) {
	tb.Helper()
	for _, n := range c.Nodes {
		n.start(tb)
	}
	for _, n := range c.Nodes {
		n.waitMounted(tb)
	}
}

// Start starts the node and waits until it has mounted.
func (n *ClusterNode) Start(tb TB) {
	tb.Helper()
	n.start(tb)
	n.waitMounted(tb)
}

// start starts the node's process, its stderr appended to LogPath.
func (n *ClusterNode) start(tb TB) {
	tb.Helper()
	if n.proc != nil {
		tb.Fatalf("%s: already running", n.Name)
	}
	if err := os.MkdirAll(n.MountDir, 0o755); err != nil {
		tb.Fatal(err)
	}
	log, err := os.OpenFile(n.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		tb.Fatal(err)
	}
	defer log.Close()
	fmt.Fprintf(log, "%s%s at %s\n", startMarker, n.Name, time.Now().Format(time.RFC3339Nano))
	args := []string{"run", "-config", n.Config}
	if len(n.App) > 0 {
		args = append(append(args, "--"), n.App...)
	}
	cmd := n.c.Command(args...)
	if len(n.Env) > 0 {
		cmd.Env = append(cmd.Environ(), n.Env...)
	}
	cmd.Stdout, cmd.Stderr = log, log
	// A harness killed before its cleanups run (a test binary past its
	// timeout, a benchmark whose output pipe closed) takes its nodes with
	// it: on SIGTERM a node unmounts and exits.
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGTERM
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start %s: %v", n.Name, err)
	}
	p := &clusterProc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	n.proc = p
}

// startMarker begins the log of each run of a node.
const startMarker = "=== harness: starting "

// ready reports whether the node's admin API answers /healthz: the node
// serves, mounted, replicating, and admitting writes if it is the primary.
func (n *ClusterNode) ready() bool {
	code, _, err := n.AdminGet("/healthz")
	return err == nil && code == http.StatusOK
}

// AdminGet gets path from the node's admin API and returns the status
// code and body.
func (n *ClusterNode) AdminGet(path string) (int, []byte, error) {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + n.Admin + path)
	if err != nil {
		return 0, nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// waitMounted waits until the node's mount is in /proc/self/mountinfo and
// the node says it serves, and fails the test if the process exits first
// or ClusterMountTimeout passes.
func (n *ClusterNode) waitMounted(tb TB) {
	tb.Helper()
	deadline := time.Now().Add(ClusterMountTimeout)
	for !Mounted(tb, n.MountDir) || !n.ready() {
		select {
		case <-n.proc.done:
			tb.Fatalf("%s exited before it mounted: %v\n%s", n.Name, n.proc.err, n.LogTail(16<<10))
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: %s not mounted and serving %v after start\n%s", n.Name, n.MountDir, ClusterMountTimeout, n.LogTail(16<<10))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Running reports whether the node's process has been started and has not
// been seen to exit.
func (n *ClusterNode) Running() bool {
	if n.proc == nil {
		return false
	}
	select {
	case <-n.proc.done:
		return false
	default:
		return true
	}
}

// Kill kills the node with SIGKILL, by its PID, waits for it and lazily
// unmounts its dead mount. A node that does not exit fails the test, with
// the kernel stacks of its threads; its mount's FUSE connection is then
// aborted so that it can exit.
func (n *ClusterNode) Kill(tb TB) {
	tb.Helper()
	p := n.proc
	if p == nil {
		tb.Fatalf("%s: not running", n.Name)
	}
	n.proc = nil
	var err error
	select {
	case <-p.done:
		err = fmt.Errorf("%s exited on its own before it was killed: %v", n.Name, p.err)
	default:
		err = n.kill(p)
	}
	if uerr := Unmount(n.MountDir); uerr != nil {
		err = errors.Join(err, fmt.Errorf("%s: unmount the dead mount: %w", n.Name, uerr))
	}
	if err != nil {
		tb.Fatal(err)
	}
}

// Crash kills the node with SIGKILL, by its PID, and waits for it, like
// Kill, but leaves its dead mount in place, as a crashed daemon does.
func (n *ClusterNode) Crash(tb TB) {
	tb.Helper()
	p := n.proc
	if p == nil {
		tb.Fatalf("%s: not running", n.Name)
	}
	n.proc = nil
	if err := n.kill(p); err != nil {
		tb.Fatal(err)
	}
}

// kill kills p with SIGKILL and waits for it to exit. If it has not after
// ClusterStopTimeout, it aborts the FUSE connection of the node's mount,
// waits again, and returns an error saying where the process was stuck.
// The node's child processes (a lock holder) must die with it.
func (n *ClusterNode) kill(p *clusterProc) error {
	pid := p.cmd.Process.Pid
	own := n.ownMountFiles(pid)
	kids := childPids(pid)
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
		for _, kid := range kids {
			deadline := time.Now().Add(ClusterStopTimeout)
			for processAlive(kid) {
				if time.Now().After(deadline) {
					return fmt.Errorf("%s (pid %d) was killed, but its child process %d still runs %v later", n.Name, pid, kid, ClusterStopTimeout)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		return nil
	case <-time.After(ClusterStopTimeout):
	}
	stuck := threadStacks(pid) + "files it had open on its own mount when killed: " + own
	aerr := abortFUSE(n.MountDir)
	select {
	case <-p.done:
	case <-time.After(ClusterStopTimeout):
		return fmt.Errorf("%s (pid %d) did not exit %v after SIGKILL, nor after its FUSE connection was aborted (%v):\n%s",
			n.Name, pid, ClusterStopTimeout, aerr, stuck)
	}
	return fmt.Errorf("%s (pid %d) did not exit %v after SIGKILL, until its FUSE connection was aborted (%v); its threads were:\n%s",
		n.Name, pid, ClusterStopTimeout, aerr, stuck)
}

// Wait waits up to timeout for the node to exit on its own and returns
// what its process's Wait returned (an *exec.ExitError for a status other
// than 0). A node that does not exit is killed and fails the test, as
// does one that left its mount.
func (n *ClusterNode) Wait(tb TB, timeout time.Duration) error {
	tb.Helper()
	p := n.proc
	if p == nil {
		tb.Fatalf("%s: not running", n.Name)
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		n.proc = nil
		tb.Fatalf("%s did not exit within %v: %v", n.Name, timeout, n.kill(p))
	}
	n.proc = nil
	if err := n.unmountLeft(); err != nil {
		tb.Fatal(err)
	}
	return p.err
}

// Stop stops the node with SIGTERM and waits for it to exit; after
// ClusterStopTimeout it kills it. It returns an error if the node had to be
// killed, exited with an error or left its mount, which it then unmounts.
func (n *ClusterNode) Stop() error {
	p := n.proc
	if p == nil {
		return nil
	}
	n.proc = nil
	select {
	case <-p.done:
		return errors.Join(fmt.Errorf("%s exited on its own before it was stopped: %v", n.Name, p.err), n.unmountLeft())
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	var err error
	select {
	case <-p.done:
		if p.err != nil {
			err = fmt.Errorf("%s exited with %v after SIGTERM", n.Name, p.err)
		}
	case <-time.After(ClusterStopTimeout):
		err = fmt.Errorf("%s did not exit %v after SIGTERM; killed it", n.Name, ClusterStopTimeout)
		err = errors.Join(err, n.kill(p))
	}
	return errors.Join(err, n.unmountLeft())
}

// Pid returns the process id of the node's running process, 0 when it
// is not running.
func (n *ClusterNode) Pid() int {
	if n.proc == nil {
		return 0
	}
	return n.proc.cmd.Process.Pid
}

// Signal sends sig to the node's running process.
func (n *ClusterNode) Signal(tb TB, sig os.Signal) {
	tb.Helper()
	if n.proc == nil {
		tb.Fatalf("%s: not running", n.Name)
	}
	if err := n.proc.cmd.Process.Signal(sig); err != nil {
		tb.Fatalf("%s: signal %v: %v", n.Name, sig, err)
	}
}

// ownMountFiles lists the files process pid has open on the node's mount,
// as "fd N: PATH" lines, or says it has none.
func (n *ClusterNode) ownMountFiles(pid int) string {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join(dir, fd.Name())); err == nil && strings.HasPrefix(target, n.MountDir+"/") {
			fmt.Fprintf(&b, "\nfd %s: %s", fd.Name(), target)
		}
	}
	if b.Len() == 0 {
		return "none"
	}
	return b.String()
}

// childPids returns the PIDs of the child processes of pid: each thread
// lists the children it started.
func childPids(pid int) []int {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return nil
	}
	var kids []int
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if kid, err := strconv.Atoi(f); err == nil {
				kids = append(kids, kid)
			}
		}
	}
	return kids
}

// processAlive reports whether process pid exists and has a thread that
// is not a zombie: a process whose exit hangs (in the FLUSH of a file on a
// FUSE mount nobody serves) shows a zombie leader and a thread in D.
func processAlive(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return false
	}
	for _, task := range tasks {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		if err != nil {
			continue
		}
		if _, after, ok := bytes.Cut(stat, []byte(") ")); ok && len(after) > 0 && after[0] != 'Z' {
			return true
		}
	}
	return false
}

// threadStacks returns the state, wait channel and kernel stack of every
// thread of process pid.
func threadStacks(pid int) string {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, t := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s", pid, t.Name())
		stat, _ := os.ReadFile(dir + "/stat")
		state := "?"
		if _, after, ok := bytes.Cut(stat, []byte(") ")); ok && len(after) > 0 {
			state = string(after[:1])
		}
		wchan, _ := os.ReadFile(dir + "/wchan")
		stack, _ := os.ReadFile(dir + "/stack")
		if state == "S" && len(stack) == 0 {
			continue
		}
		fmt.Fprintf(&b, "thread %s: state %s, waiting in %s\n%s", t.Name(), state, wchan, stack)
	}
	return b.String()
}

// abortFUSE aborts the FUSE connection of the mount at dir: every request
// waiting on it fails, which frees a FUSE server stuck on its own mount.
func abortFUSE(dir string) error {
	m, ok, err := fusectl.At(dir)
	if err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("abort the FUSE connection of %s: not mounted", dir)
	}
	return fusectl.Abort(m.Conn)
}

// unmountLeft lazily unmounts the node's mount if it is still there and
// reports that it was.
func (n *ClusterNode) unmountLeft() error {
	mounted, err := isMounted(n.MountDir)
	if err != nil || !mounted {
		return err
	}
	return errors.Join(fmt.Errorf("%s left its mount %s", n.Name, n.MountDir), Unmount(n.MountDir))
}

// cleanup stops every node, removes the mounts left and checks that none
// is, and logs the nodes' logs if the test failed.
func (c *Cluster) cleanup() {
	tb := c.tb
	for _, n := range c.Nodes {
		if err := n.Stop(); err != nil {
			tb.Error(err)
		}
	}
	for _, n := range c.Nodes {
		if mounted, err := isMounted(n.MountDir); err != nil {
			tb.Error(err)
		} else if mounted {
			tb.Errorf("%s: %s is still mounted after cleanup", n.Name, n.MountDir)
			if err := Unmount(n.MountDir); err != nil {
				tb.Error(err)
			}
		}
	}
	if tb.Failed() {
		for _, n := range c.Nodes {
			tb.Logf("log of %s (%s):\n%s", n.Name, n.LogPath, n.LogTail(64<<10))
		}
	}
}

// Log returns everything the node has logged, over all its runs.
func (n *ClusterNode) Log() string {
	b, err := os.ReadFile(n.LogPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return string(b)
}

// LogTail returns the last max bytes of the node's log.
func (n *ClusterNode) LogTail(max int) string {
	s := n.Log()
	if len(s) > max {
		s = "[...]" + s[len(s)-max:]
	}
	return s
}

// Pos returns the position in the node's <db>-pos file, and false if the
// file does not exist.
func (n *ClusterNode) Pos(tb TB, db string) (ltx.Pos, bool) {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(n.MountDir, db+"-pos"))
	if errors.Is(err, os.ErrNotExist) {
		return ltx.Pos{}, false
	} else if err != nil {
		tb.Fatalf("%s: %v", n.Name, err)
	}
	p, err := ltx.ParsePos(string(bytes.TrimSpace(b)))
	if err != nil {
		tb.Fatalf("%s: %s-pos: %v", n.Name, db, err)
	}
	return p, true
}

// BackingFile returns the path of the backing database file of db.
func (n *ClusterNode) BackingFile(db string) string {
	return filepath.Join(n.DataDir, "dbs", db, "database")
}

// WaitCaughtUp waits until every running node's position of each db equals
// the primary's, which must not move meanwhile, and fails the test after
// timeout. It returns the primary's positions.
func (c *Cluster) WaitCaughtUp(tb TB, timeout time.Duration, dbs ...string) map[string]ltx.Pos {
	tb.Helper()
	primary := c.Node(c.Primary)
	want := make(map[string]ltx.Pos)
	for _, db := range dbs {
		p, ok := primary.Pos(tb, db)
		if !ok {
			tb.Fatalf("primary %s has no %s-pos", primary.Name, db)
		}
		want[db] = p
	}
	deadline := time.Now().Add(timeout)
	for {
		var behind []string
		for _, n := range c.Nodes {
			if !n.Running() {
				continue
			}
			for _, db := range dbs {
				if got, ok := n.Pos(tb, db); !ok || got != want[db] {
					behind = append(behind, fmt.Sprintf("%s %s at %v (have it: %v), want %v", n.Name, db, got, ok, want[db]))
				}
			}
		}
		if len(behind) == 0 {
			return want
		}
		if time.Now().After(deadline) {
			tb.Fatalf("replicas not caught up with the primary in %v:\n%s", timeout, strings.Join(behind, "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Mounted reports whether dir is a mount point of a Meridian filesystem
// (type fuse.meridian in /proc/self/mountinfo).
func Mounted(tb TB, dir string) bool {
	tb.Helper()
	ok, err := isMounted(dir)
	if err != nil {
		tb.Fatal(err)
	}
	return ok
}

func isMounted(dir string) (bool, error) {
	m, ok, err := fusectl.At(dir)
	return ok && m.FSType == "fuse.meridian", err
}

// Unmount lazily unmounts the FUSE mount at dir (see fusectl.Detach).
func Unmount(dir string) error { return fusectl.Detach(dir) }

// WaitPos waits until the node has db at a position that reached returns
// true for, and returns it; after timeout it fails the test, saying the node
// did not reach want.
func (n *ClusterNode) WaitPos(tb TB, db string, timeout time.Duration, want string, reached func(ltx.Pos) bool) ltx.Pos {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		p, ok := n.Pos(tb, db)
		if ok && reached(p) {
			return p
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: %s at %v (have it: %v) after %v, want %s", n.Name, db, p, ok, timeout, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// RouterURL returns the URL of the node's router.
func (n *ClusterNode) RouterURL() string { return "http://" + n.Router }

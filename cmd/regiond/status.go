package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/meridian-db/meridian/regiond"
)

const statusUsage = `Usage: regiond status [-config FILE | -admin HOST:PORT] [-json] [-timeout D]

Prints the cluster as its nodes see it: each node's role, epoch, readiness
and lag, and each database's position on each node. It asks the node's
admin API (admin.listen of the config, or -admin) for /status, then every
node that node lists in replication.peers with an admin address.

`

// nodeStatus is what one node answered, or why it did not.
type nodeStatus struct {
	Admin  string          `json:"admin"`
	Status *regiond.Status `json:"status,omitempty"`
	Error  string          `json:"error,omitempty"`
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("regiond status", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, statusUsage); fl.PrintDefaults() }
	configPath := fl.String("config", "regiond.yml", "configuration `file` whose admin.listen to ask")
	admin := fl.String("admin", "", "admin API `address` (host:port) to ask instead of the config's admin.listen")
	asJSON := fl.Bool("json", false, "print every node's /status as a JSON array")
	timeout := fl.Duration("timeout", 5*time.Second, "how long to wait for each node")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		return usagef("status: unexpected arguments %q", fl.Args())
	}
	addr := *admin
	if addr == "" {
		c, err := regiond.LoadConfig(*configPath)
		if err != nil {
			return fmt.Errorf("status: %w (or give -admin HOST:PORT)", err)
		}
		if c.Admin.Listen == "" {
			return usagef("status: %s sets no admin.listen; set it (and restart the node), or give -admin HOST:PORT", *configPath)
		}
		addr = c.Admin.Listen
	}
	client := &http.Client{Timeout: *timeout}
	first := fetchStatus(ctx, client, addr)
	if first.Error != "" {
		return fmt.Errorf("status: %s", first.Error)
	}
	nodes := []nodeStatus{first}
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	for _, p := range first.Status.Peers {
		if p.Admin == "" {
			nodes = append(nodes, nodeStatus{Status: &regiond.Status{Node: p.Node, Region: p.Region},
				Error: "no admin address in replication.peers of " + first.Status.Node})
			continue
		}
		wg.Go(func() {
			ns := fetchStatus(ctx, client, p.Admin)
			if ns.Status == nil {
				ns.Status = &regiond.Status{Node: p.Node, Region: p.Region}
			}
			mu.Lock()
			nodes = append(nodes, ns)
			mu.Unlock()
		})
	}
	wg.Wait()
	slices.SortFunc(nodes[1:], func(a, b nodeStatus) int { return cmp.Compare(a.Status.Node, b.Status.Node) })
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(nodes)
	}
	printStatus(stdout, nodes)
	return nil
}

// fetchStatus asks the admin API at addr for /status.
func fetchStatus(ctx context.Context, client *http.Client, addr string) nodeStatus {
	ns := nodeStatus{Admin: addr}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/status", nil)
	if err != nil {
		ns.Error = err.Error()
		return ns
	}
	resp, err := client.Do(req)
	if err != nil {
		ns.Error = fmt.Sprintf("ask %s: %v", addr, unwrapURLError(err))
		return ns
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		ns.Error = fmt.Sprintf("ask %s: %s: %s", addr, resp.Status, strings.TrimSpace(string(b)))
		return ns
	}
	var st regiond.Status
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&st); err != nil {
		ns.Error = fmt.Sprintf("ask %s: the answer is not a node's status: %v", addr, err)
		return ns
	}
	ns.Status = &st
	return ns
}

// unwrapURLError drops the method and URL net/http wraps around an error.
func unwrapURLError(err error) error {
	var u *url.Error
	if errors.As(err, &u) {
		return u.Err
	}
	return err
}

// printStatus prints a table of nodes, then one of databases.
func printStatus(w io.Writer, nodes []nodeStatus) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tREGION\tROLE\tEPOCH\tREADY\tLAG\tADMIN")
	for _, n := range nodes {
		st := n.Status
		if n.Error != "" {
			fmt.Fprintf(tw, "%s\t%s\t?\t\t\t\t%s\n", st.Node, st.Region, n.Error)
			continue
		}
		ready := "yes"
		if !st.Ready {
			ready = "no: " + st.NotReady
		}
		lag := "-"
		if st.Role == regiond.RoleReplica {
			lag = fmt.Sprintf("%d ms", st.LagMS)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", st.Node, st.Region, st.Role, st.Epoch, ready, lag, n.Admin)
	}
	for _, n := range nodes {
		if l := n.Status.Lease; n.Error == "" && l != nil {
			holder := "nobody"
			if l.Holder != "" {
				holder = l.Holder
			}
			seen := "has not read it yet"
			if !l.Since.IsZero() {
				seen = "has seen it for " + time.Since(l.Since).Round(time.Millisecond).String()
			}
			fmt.Fprintf(tw, "\nlease in Consul (%s, key %s): %s at epoch %d, as %s %s\n", l.Consul, l.Key, holder, l.Epoch, n.Status.Node, seen)
			break
		}
	}
	// The latest handoff any node began.
	var last *nodeStatus
	for i, n := range nodes {
		if h := n.Status.Handoff; n.Error == "" && h != nil && (last == nil || h.Since.After(last.Status.Handoff.Since)) {
			last = &nodes[i]
		}
	}
	if last != nil {
		h := last.Status.Handoff
		epoch := ""
		if h.Epoch != 0 {
			epoch = fmt.Sprintf(" at epoch %d", h.Epoch)
		}
		fmt.Fprintf(tw, "\nlast handoff: %s to %s, %s%s, %s ago\n", last.Status.Node, h.To, h.State, epoch, time.Since(h.Since).Round(time.Millisecond))
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "DATABASE\tNODE\tPOSITION\tLAG")
	var dbs []string
	seen := map[string]bool{}
	for _, n := range nodes {
		if n.Status == nil {
			continue
		}
		for _, db := range n.Status.Databases {
			if !seen[db.Name] {
				seen[db.Name] = true
				dbs = append(dbs, db.Name)
			}
		}
	}
	slices.Sort(dbs)
	for _, name := range dbs {
		for _, n := range nodes {
			if n.Error != "" {
				continue
			}
			pos, lag := "(none)", "-"
			for _, db := range n.Status.Databases {
				if db.Name == name {
					pos = db.Pos
					if n.Status.Role == regiond.RoleReplica {
						lag = fmt.Sprintf("%d ms", db.LagMS)
					}
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", name, n.Status.Node, pos, lag)
		}
	}
	_ = tw.Flush()
}

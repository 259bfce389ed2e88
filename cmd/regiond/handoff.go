package main

import (
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
	"time"

	"github.com/meridian-db/meridian/regiond"
)

const handoffUsage = `Usage: regiond handoff -to NODE [-config FILE | -admin HOST:PORT] [-json]

Moves the primary to NODE, a candidate replica, without losing or failing
an acknowledged write: the primary holds new writes, waits until NODE has
applied every transaction, and hands it the lease (lease.type: consul).
Writes held meanwhile fail on the old primary once NODE holds the lease.
If NODE does not catch up within lease.handoff_timeout, the handoff is
abandoned and writes go on on the old primary. Any node takes the request
(admin.listen of the config, or -admin) and sends it on to the primary.

`

const promoteUsage = `Usage: regiond promote [-config FILE] [-json]

Asks the primary to hand the lease to this node (the config's node), as
"regiond handoff -to" this node does.

`

func runHandoff(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("regiond handoff", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, handoffUsage); fl.PrintDefaults() }
	to := fl.String("to", "", "the `node` to hand the lease to")
	configPath := fl.String("config", "regiond.yml", "configuration `file` whose admin.listen to ask")
	admin := fl.String("admin", "", "admin API `address` (host:port) to ask instead of the config's admin.listen")
	asJSON := fl.Bool("json", false, "print the result as JSON")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		return usagef("handoff: unexpected arguments %q", fl.Args())
	}
	if *to == "" {
		return usagef("handoff: name the node to hand the lease to with -to NODE")
	}
	addr := *admin
	if addr == "" {
		c, err := adminConfig("handoff", *configPath)
		if err != nil {
			return err
		}
		addr = c.Admin.Listen
	}
	return postHandoff(ctx, "handoff", addr, *to, *asJSON, stdout)
}

func runPromote(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("regiond promote", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() { fmt.Fprint(stderr, promoteUsage); fl.PrintDefaults() }
	configPath := fl.String("config", "regiond.yml", "configuration `file` of the node to promote")
	asJSON := fl.Bool("json", false, "print the result as JSON")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		return usagef("promote: unexpected arguments %q", fl.Args())
	}
	c, err := adminConfig("promote", *configPath)
	if err != nil {
		return err
	}
	return postHandoff(ctx, "promote", c.Admin.Listen, c.Node, *asJSON, stdout)
}

// adminConfig loads the configuration at path, which must set
// admin.listen.
func adminConfig(cmd, path string) (regiond.Config, error) {
	c, err := regiond.LoadConfig(path)
	if err != nil {
		return c, fmt.Errorf("%s: %w", cmd, err)
	}
	if c.Admin.Listen == "" {
		return c, usagef("%s: %s sets no admin.listen; set it (and restart the node)", cmd, path)
	}
	return c, nil
}

// postHandoff asks the admin API at addr for a handoff to node and prints
// what happened.
func postHandoff(ctx context.Context, cmd, addr, node string, asJSON bool, stdout io.Writer) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/handoff?to="+url.QueryEscape(node), nil)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	// The node bounds the handoff by lease.handoff_timeout; this bounds
	// the wait for a node that does not answer at all.
	resp, err := (&http.Client{Timeout: time.Minute}).Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w (is the node's admin API at %s?)", cmd, err, addr)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if resp.StatusCode != http.StatusOK {
		msg := strings.TrimSpace(string(body))
		if cmd == "handoff" && strings.HasPrefix(msg, "handoff") {
			return errors.New(msg) // "handoff to NODE: why"
		}
		return fmt.Errorf("%s: %s", cmd, msg)
	}
	if asJSON {
		_, err := stdout.Write(body)
		return err
	}
	var res regiond.HandoffResult
	if err := json.Unmarshal(body, &res); err != nil {
		return fmt.Errorf("%s: the node's answer: %w", cmd, err)
	}
	fmt.Fprintf(stdout, "%s is primary at epoch %d, handed off by %s: writes held %.1f ms (%.1f ms for transactions under way, %.1f ms until %s had them all), lease taken %.1f ms after the hold began\n",
		res.To, res.Epoch, res.From, res.HeldMS, res.IdleMS, res.CaughtUpMS, res.To, res.TookMS)
	dbs := make([]string, 0, len(res.Positions))
	for db := range res.Positions {
		dbs = append(dbs, db)
	}
	slices.Sort(dbs)
	for _, db := range dbs {
		fmt.Fprintf(stdout, "  %s at %s\n", db, res.Positions[db])
	}
	return nil
}

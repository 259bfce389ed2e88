// Package roles asks the nodes of a testingutil.Cluster for their roles,
// through the admin API: apart from testingutil, which package regiond's
// own dependencies use in their tests, so that those do not import
// regiond.
package roles

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/meridian-db/meridian/internal/testingutil"
	"github.com/meridian-db/meridian/regiond"
)

// Status gets node n's /status, or says why it could not.
func Status(n *testingutil.ClusterNode) (regiond.Status, error) {
	code, b, err := n.AdminGet("/status")
	if err != nil || code != http.StatusOK {
		return regiond.Status{}, fmt.Errorf("%s /status: %d, %v", n.Name, code, err)
	}
	var st regiond.Status
	if err := json.Unmarshal(b, &st); err != nil {
		return regiond.Status{}, fmt.Errorf("%s /status: %v\n%s", n.Name, err, b)
	}
	return st, nil
}

// WaitOnePrimary waits until one running node of c says it is primary at an
// epoch above after and every other running node is a ready replica of
// it at that epoch, and returns it and its epoch; after timeout it fails
// the test with every node's state.
func WaitOnePrimary(tb testingutil.TB, c *testingutil.Cluster, after uint64, timeout time.Duration) (*testingutil.ClusterNode, uint64) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var (
			primary *testingutil.ClusterNode
			epoch   uint64
			states  []string
			others  []regiond.Status
		)
		for _, n := range c.Nodes {
			if !n.Running() {
				continue
			}
			st, err := Status(n)
			if err != nil {
				states = append(states, err.Error())
				others = append(others, regiond.Status{})
				continue
			}
			states = append(states, fmt.Sprintf("%s: %s of %q at epoch %d, ready %v", n.Name, st.Role, st.Primary, st.Epoch, st.Ready))
			if st.Role == regiond.RolePrimary && st.Epoch > after {
				primary, epoch = n, st.Epoch
			} else {
				others = append(others, st)
			}
		}
		if primary != nil && !slices.ContainsFunc(others, func(st regiond.Status) bool {
			return st.Role != regiond.RoleReplica || st.Primary != primary.Name || st.Epoch != epoch || !st.Ready
		}) {
			return primary, epoch
		}
		if time.Now().After(deadline) {
			tb.Fatalf("no single primary above epoch %d with every other node its ready replica in %v:\n%s", after, timeout, strings.Join(states, "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

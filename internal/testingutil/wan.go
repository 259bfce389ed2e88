package testingutil

import (
	"fmt"
	"strings"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
)

// LatencyProxies puts a toxiproxy proxy between every ordered pair of
// nodes that delays each direction by the one-way latency between them,
// as between regions, to the address addr gives of the destination (its
// replication.listen, its router, ...). It returns the proxies' listen
// addresses by [from, to] node name; tb's cleanup stops them. oneWay
// gives the latency between two nodes.
func LatencyProxies(tb TB, nodes []*ClusterNode, oneWay func(from, to *ClusterNode) time.Duration, addr func(*ClusterNode) string) (map[[2]string]string, error) {
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	proxies := map[[2]string]string{}
	for _, from := range nodes {
		for _, to := range nodes {
			if from == to {
				continue
			}
			listen, err := LatencyProxy(tb, server, from.Name+"-"+to.Name+"-"+addr(to), addr(to), oneWay(from, to))
			if err != nil {
				return nil, fmt.Errorf("proxy %s to %s: %w", from.Name, to.Name, err)
			}
			proxies[[2]string{from.Name, to.Name}] = listen
		}
	}
	return proxies, nil
}

// LatencyProxy starts a toxiproxy proxy of server (nil: a server of its
// own) on a free loopback port to upstream that delays each direction by
// oneWay, and returns its listen address; tb's cleanup stops it.
func LatencyProxy(tb TB, server *toxiproxy.ApiServer, name, upstream string, oneWay time.Duration) (string, error) {
	if server == nil {
		server = toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	}
	p := toxiproxy.NewProxy(server, name, FreeAddr(tb), upstream)
	if err := p.Start(); err != nil {
		return "", err
	}
	tb.Cleanup(p.Stop)
	if oneWay > 0 {
		for _, stream := range []string{"upstream", "downstream"} {
			toxic := fmt.Sprintf(`{"name": "wan-%s", "type": "latency", "stream": %q, "attributes": {"latency": %d}}`, stream, stream, oneWay.Milliseconds())
			if _, err := p.Toxics.AddToxicJson(strings.NewReader(toxic)); err != nil {
				return "", err
			}
		}
	}
	return p.Listen, nil
}

// DelayLinks puts LatencyProxies on every link between two nodes, as
// between regions: replication, and router to router where the nodes run
// routers. The nodes dial them from their next start (their regiond.yml
// is written again).
func (c *Cluster) DelayLinks(tb TB, oneWay func(from, to *ClusterNode) time.Duration) error {
	repl, err := LatencyProxies(tb, c.Nodes, oneWay, func(n *ClusterNode) string { return n.Addr })
	if err != nil {
		return err
	}
	c.PeerAddr = func(from, peer *ClusterNode) string { return repl[[2]string{from.Name, peer.Name}] }
	var routed []*ClusterNode
	for _, n := range c.Nodes {
		if n.Router != "" {
			routed = append(routed, n)
		}
	}
	if len(routed) > 1 {
		routers, err := LatencyProxies(tb, routed, oneWay, func(n *ClusterNode) string { return n.Router })
		if err != nil {
			return err
		}
		c.PeerRouter = func(from, peer *ClusterNode) string { return routers[[2]string{from.Name, peer.Name}] }
	}
	c.RewriteConfigs()
	return nil
}

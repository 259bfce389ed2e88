//go:build terraform

package regiond_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

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

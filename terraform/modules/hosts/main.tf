# Module hosts deploys a Meridian cluster to existing Linux hosts over SSH
# with Terraform's built-in terraform_data resource and its file and
# remote-exec provisioners: no provider. For each node it uploads regiond,
# the app, the cluster's certificates (keys mode 0600) and its
# regiond.yml, and bin/meridian-node, which runs `regiond run -- app` as a
# systemd unit (enabled: started at boot) where systemd runs the host, or
# under a small supervisor loop elsewhere (service_manager), waits for
# /readyz, and on destroy stops it (SIGTERM: regiond unmounts) and makes
# sure nothing stays mounted.
# Files stay in install_root on destroy: the data is not thrown away.

locals {
  tls = { for name, n in var.nodes : name => {
    ca   = "${n.install_root}/etc/ca.pem"
    cert = "${n.install_root}/etc/${name}.pem"
    key  = "${n.install_root}/etc/${name}-key.pem"
  } }
  config = { for name, n in var.nodes : name => yamlencode(merge(yamldecode(n.config), { tls = local.tls[name] })) }

  supervisor  = file("${path.module}/meridian-node.sh")
  consul_node = var.consul.deploy_on == "" ? null : var.nodes[var.consul.deploy_on]
}

# The cluster's CA and one certificate per node, made where terraform
# runs; ca-key.pem never leaves it.
resource "terraform_data" "ca" {
  triggers_replace = sort(keys(var.nodes))
  input            = { dir = var.ca_dir }

  provisioner "local-exec" {
    interpreter = ["bash", "-c"]
    command     = <<-EOT
      set -euo pipefail
      mkdir -p '${var.ca_dir}'
      [ -f '${var.ca_dir}/ca.pem' ] || '${var.regiond_binary}' ca init -dir '${var.ca_dir}'
      for n in ${join(" ", sort(keys(var.nodes)))}; do
        [ -f "${var.ca_dir}/$n.pem" ] || '${var.regiond_binary}' ca issue -node "$n" -dir '${var.ca_dir}' -out '${var.ca_dir}'
      done
    EOT
  }
}

resource "terraform_data" "consul" {
  count = local.consul_node == null ? 0 : 1
  input = {
    host     = local.consul_node.ssh_host
    port     = local.consul_node.ssh_port
    user     = local.consul_node.ssh_user
    key_file = var.ssh_private_key_file
    dir      = "${local.consul_node.install_root}/consul"
  }

  connection {
    type        = "ssh"
    host        = self.input.host
    port        = self.input.port
    user        = self.input.user
    private_key = file(self.input.key_file)
  }

  provisioner "remote-exec" {
    inline = ["mkdir -p '${self.input.dir}/bin'"]
  }
  provisioner "file" {
    source      = var.consul.binary
    destination = "${self.input.dir}/bin/consul"
  }
  provisioner "remote-exec" {
    inline = [
      "set -e",
      "cd '${self.input.dir}' && chmod 755 bin/consul",
      "setsid nohup bin/consul agent -dev -node consul -bind ${var.consul.consul_host} -client ${var.consul.consul_host} -advertise ${var.consul.consul_host} -dns-port -1 -grpc-port -1 -grpc-tls-port -1 -log-level warn >consul.log 2>&1 </dev/null & echo $! >consul.pid",
      "for i in $(seq 300); do curl -sf http://${var.consul.consul_host}:8500/v1/status/leader | grep -q : && exit 0; sleep 0.2; done; echo 'consul did not elect itself leader within a minute; its log:' >&2; cat consul.log >&2; exit 1",
    ]
  }
  provisioner "remote-exec" {
    when = destroy
    inline = [
      "cd '${self.input.dir}' 2>/dev/null || exit 0",
      "pid=$(cat consul.pid 2>/dev/null) || exit 0",
      "kill -TERM $pid 2>/dev/null || exit 0",
      "for i in $(seq 100); do kill -0 $pid 2>/dev/null || exit 0; sleep 0.1; done; kill -KILL $pid",
    ]
  }
}

resource "terraform_data" "node" {
  for_each   = var.nodes
  depends_on = [terraform_data.ca, terraform_data.consul]

  # A new binary reinstalls the node (stopped, then started again, all
  # nodes at once); a new config rolls out one node at a time
  # (terraform_data.roll).
  triggers_replace = {
    regiond = filesha256(var.regiond_binary)
    app     = filesha256(var.app_binary)
    args    = var.app_args
    manager = var.service_manager
  }
  input = {
    host     = each.value.ssh_host
    port     = each.value.ssh_port
    user     = each.value.ssh_user
    key_file = var.ssh_private_key_file
    root     = each.value.install_root
  }

  connection {
    type        = "ssh"
    host        = self.input.host
    port        = self.input.port
    user        = self.input.user
    private_key = file(self.input.key_file)
  }

  provisioner "remote-exec" {
    inline = ["mkdir -p '${self.input.root}/bin' '${self.input.root}/etc' '${self.input.root}/log'"]
  }
  provisioner "file" {
    source      = var.regiond_binary
    destination = "${self.input.root}/bin/regiond"
  }
  provisioner "file" {
    source      = var.app_binary
    destination = "${self.input.root}/bin/app"
  }
  provisioner "file" {
    content     = local.supervisor
    destination = "${self.input.root}/bin/meridian-node"
  }
  provisioner "file" {
    content     = local.config[each.key]
    destination = "${self.input.root}/etc/regiond.yml"
  }
  provisioner "file" {
    content     = join(" ", var.app_args)
    destination = "${self.input.root}/etc/app-args"
  }
  provisioner "file" {
    content     = var.service_manager
    destination = "${self.input.root}/etc/service-manager"
  }
  provisioner "file" {
    source      = "${var.ca_dir}/ca.pem"
    destination = local.tls[each.key].ca
  }
  provisioner "file" {
    source      = "${var.ca_dir}/${each.key}.pem"
    destination = local.tls[each.key].cert
  }
  provisioner "file" {
    source      = "${var.ca_dir}/${each.key}-key.pem"
    destination = local.tls[each.key].key
  }
  provisioner "remote-exec" {
    inline = [
      "set -e",
      "chmod 600 '${local.tls[each.key].key}'",
      "chmod 755 '${self.input.root}/bin/regiond' '${self.input.root}/bin/app' '${self.input.root}/bin/meridian-node'",
      "'${self.input.root}/bin/meridian-node' start ${each.value.admin} ${var.ready_timeout_seconds} $(cat '${self.input.root}/etc/app-args')",
    ]
  }
  provisioner "remote-exec" {
    when   = destroy
    inline = ["'${self.input.root}/bin/meridian-node' stop"]
  }
}

# A changed regiond.yml goes out one node at a time, the primary last,
# each node stopped, given its new config and started again once the one
# before is ready: the cluster keeps taking writes (the primary hands its
# lease over as it stops) and loses none. Unchanged nodes are left alone,
# as are all of them on the first apply.
resource "terraform_data" "roll" {
  depends_on       = [terraform_data.node]
  triggers_replace = local.config

  provisioner "local-exec" {
    command = "'${path.module}/roll.sh' '${var.ssh_private_key_file}' ${var.ready_timeout_seconds}"
    environment = {
      # Each node as "name,ssh_host,ssh_port,ssh_user,install_root,admin,config" (base64).
      MERIDIAN_ROLL_NODES = join(" ", [for name, n in var.nodes : join(",", [name, n.ssh_host, n.ssh_port, n.ssh_user, n.install_root, n.admin, base64encode(local.config[name])])])
    }
  }

}

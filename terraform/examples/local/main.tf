# A three-region Meridian cluster on this machine, deployed the way a real
# one is: the topology module renders the configuration, and the hosts
# module installs each node over SSH, here into sshd servers on the
# loopback addresses 127.0.0.2 (iad, and Consul), 127.0.0.3 (fra) and
# 127.0.0.4 (syd), each node in a directory of its own under state_dir.
# Needs root (FUSE, sshd), openssh-server, and bin/regiond, bin/guestbook
# (make build) and a consul binary (scripts/install-consul.sh).
#
#   terraform init
#   terraform apply -var consul_binary=$(../../../scripts/install-consul.sh)
#   terraform destroy -var consul_binary=...

terraform {
  required_version = ">= 1.4"
}

variable "state_dir" {
  description = "Everything of the example: SSH keys and servers, the CA, each node's install root. Relative to this directory."
  type        = string
  default     = "state"
}

variable "regiond_binary" {
  type    = string
  default = "../../../bin/regiond"
}

variable "app_binary" {
  type    = string
  default = "../../../bin/guestbook"
}

variable "consul_binary" {
  description = "The consul binary (scripts/install-consul.sh prints its path)."
  type        = string
}

variable "durability" {
  type    = string
  default = "async"
}

variable "ssh_port" {
  type    = number
  default = 2222
}

locals {
  state = abspath(var.state_dir)
  hosts = { iad = "127.0.0.2", fra = "127.0.0.3", syd = "127.0.0.4" }
  place = { iad = [38.9, -77.4], fra = [50.1, 8.7], syd = [-33.9, 151.2] }
}

resource "terraform_data" "sshd" {
  input = { state = local.state, script = abspath("${path.module}/sshd.sh") }

  provisioner "local-exec" {
    command = "'${self.input.script}' start '${self.input.state}' ${var.ssh_port} ${join(" ", values(local.hosts))}"
  }
  provisioner "local-exec" {
    when    = destroy
    command = "'${self.input.script}' stop '${self.input.state}'"
  }
}

module "topology" {
  source = "../../modules/topology"
  regions = [for r in ["iad", "fra", "syd"] : {
    name = r, lat = local.place[r][0], lon = local.place[r][1]
    nodes = [{
      name      = "${r}-1"
      host      = local.hosts[r]
      app_host  = local.hosts[r]
      data_dir  = "${local.state}/hosts/${r}-1/data"
      mount_dir = "${local.state}/hosts/${r}-1/mnt"
    }]
  }]
  lease          = { consul_url = "http://${local.hosts.iad}:8500", check_ttl = "1s", lock_delay = "500ms", prefer_regions = ["iad", "fra", "syd"] }
  durability     = var.durability
  round_trips_ms = { "iad-fra" = 90, "iad-syd" = 198, "fra-syd" = 252 }
  geo_listen     = "127.0.0.1:8000"
}

module "hosts" {
  source     = "../../modules/hosts"
  depends_on = [terraform_data.sshd]
  nodes = { for name, n in module.topology.nodes : name => {
    ssh_host     = n.host
    ssh_port     = var.ssh_port
    install_root = "${local.state}/hosts/${name}"
    config       = module.topology.configs[name]
    admin        = n.admin
  } }
  ssh_private_key_file = "${local.state}/ssh/id_ed25519"
  regiond_binary       = abspath(var.regiond_binary)
  app_binary           = abspath(var.app_binary)
  ca_dir               = "${local.state}/ca"
  consul               = { deploy_on = "iad-1", consul_host = local.hosts.iad, binary = var.consul_binary }
}

output "routers" {
  description = "Each region's router: the app, through it."
  value       = module.topology.routers
}

output "nodes" {
  value = module.topology.nodes
}

output "install_roots" {
  value = module.hosts.install_roots
}

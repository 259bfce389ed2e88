variable "nodes" {
  description = <<-EOT
    The nodes to deploy, by node name: the Linux host to reach over SSH
    (ssh_host, ssh_port, ssh_user: root, as regiond mounts FUSE), the
    directory everything of the node goes in on it (install_root: bin/,
    etc/, log/, and the data_dir and mount_dir its config names), its
    regiond.yml (from the topology module's configs; its tls section is
    set to the certificates this module uploads) and its admin address,
    polled for /readyz.
  EOT
  type = map(object({
    ssh_host     = string
    ssh_port     = optional(number, 22)
    ssh_user     = optional(string, "root")
    install_root = optional(string, "/opt/meridian")
    config       = string
    admin        = string
  }))
}

variable "ssh_private_key_file" {
  description = "The private key (a file on the machine running terraform) that logs in to every host."
  type        = string
}

variable "regiond_binary" {
  description = "The regiond binary to upload (a Linux build: make build's bin/regiond)."
  type        = string
}

variable "app_binary" {
  description = "The app regiond runs as its child (regiond run -- APP): uploaded as bin/app."
  type        = string
}

variable "app_args" {
  description = "Arguments of the app."
  type        = list(string)
  default     = []
}

variable "ca_dir" {
  description = "Where, on the machine running terraform, the cluster's CA and node certificates are made (regiond ca init / issue), once; ca-key.pem stays there."
  type        = string
}

variable "consul" {
  description = <<-EOT
    Consul for the lease. deploy_on names a node whose host runs a
    single-server Consul agent (consul agent -dev: for tests and demos, it
    keeps nothing across restarts) on consul_host:8500, with the binary
    uploaded from binary; leave it "" when the nodes' lease.consul_url
    points at a Consul you run.
  EOT
  type = object({
    deploy_on   = optional(string, "")
    consul_host = optional(string, "")
    binary      = optional(string, "")
  })
  default = {}

  validation {
    condition     = var.consul.deploy_on == "" || (var.consul.consul_host != "" && var.consul.binary != "")
    error_message = "consul: deploying Consul on ${var.consul.deploy_on} needs consul_host (the address it listens on) and binary (the consul binary to upload)."
  }
}

variable "ready_timeout_seconds" {
  description = "How long a node may take to answer /readyz after it starts."
  type        = number
  default     = 120
}

variable "service_manager" {
  description = <<-EOT
    What keeps regiond running on a host: "systemd" (a unit
    meridian-NODE.service in /etc/systemd/system, enabled, so the node
    starts at boot; Restart=always), "supervisor" (a detached shell loop,
    bin/meridian-node's, that starts regiond again when it exits; nothing
    starts it at boot) or "auto": systemd where it is the host's init
    system, the supervisor elsewhere.
  EOT
  type        = string
  default     = "auto"

  validation {
    condition     = contains(["auto", "systemd", "supervisor"], var.service_manager)
    error_message = "service_manager: \"${var.service_manager}\" is not one of auto, systemd, supervisor."
  }
}

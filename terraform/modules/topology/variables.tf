variable "regions" {
  description = <<-EOT
    The cluster's regions, each with its nodes. A node's host is the address
    the other nodes and the geo entry reach it at (an IP or a DNS name); its
    servers listen there on the ports given (defaults below). candidate: the
    node may hold the write lease (lease.candidate). lat and lon place the
    region for the geo entry (nearest region by great-circle distance).
  EOT
  type = list(object({
    name      = string
    lat       = optional(number, 0)
    lon       = optional(number, 0)
    countries = optional(list(string), [])
    nodes = list(object({
      name             = string
      host             = string
      candidate        = optional(bool, true)
      replication_port = optional(number, 20210)
      admin_port       = optional(number, 20211)
      router_port      = optional(number, 8080)
      router_peer_port = optional(number, 8443)
      app_host         = optional(string, "127.0.0.1")
      app_port         = optional(number, 3000)
      data_dir         = optional(string, "/var/lib/meridian")
      mount_dir        = optional(string, "/data")
    }))
  }))

  validation {
    condition     = length(var.regions) > 0 && alltrue([for r in var.regions : length(r.nodes) > 0])
    error_message = "regions: give at least one region, each with at least one node."
  }
  validation {
    condition     = length(distinct([for r in var.regions : r.name])) == length(var.regions)
    error_message = "regions: region names must be unique; a region is listed twice."
  }
  validation {
    condition     = length(distinct(flatten([for r in var.regions : [for n in r.nodes : n.name]]))) == length(flatten([for r in var.regions : r.nodes]))
    error_message = "regions: node names must be unique across the cluster (each is also the node's certificate name); these appear more than once: ${join(", ", [for name, count in { for n in flatten([for r in var.regions : [for n in r.nodes : n.name]]) : n => n... } : name if length(count) > 1])}."
  }
  validation {
    condition     = alltrue(flatten([for r in var.regions : concat([can(regex("^[a-z0-9][a-z0-9-]{0,62}$", r.name))], [for n in r.nodes : can(regex("^[a-z0-9][a-z0-9-]{0,62}$", n.name))])]))
    error_message = "regions: region and node names are 1-63 characters of a-z, 0-9 and -, starting with a letter or digit (e.g. iad, iad-1)."
  }
}

variable "lease" {
  description = <<-EOT
    The write lease. type "consul": a lease in Consul at consul_url (each
    node's local agent, usually), which moves to another candidate when the
    primary dies; prefer_regions orders the candidates' regions. type
    "static": static_primary holds it until it is moved by hand.
  EOT
  type = object({
    type           = optional(string, "consul")
    consul_url     = optional(string, "http://127.0.0.1:8500")
    consul_key     = optional(string, "meridian/primary")
    ttl            = optional(string, "10s")
    check_ttl      = optional(string, "2s")
    lock_delay     = optional(string, "1s")
    prefer_regions = optional(list(string), [])
    static_primary = optional(string, "")
  })
  default = {}

  validation {
    condition     = contains(["consul", "static"], var.lease.type)
    error_message = "lease.type: \"${var.lease.type}\" is not consul or static."
  }
}

variable "durability" {
  description = "replication.durability: async (a COMMIT returns once durable on the primary) or sync (once sync_acks replicas applied it)."
  type        = string
  default     = "async"

  validation {
    condition     = contains(["async", "sync"], var.durability)
    error_message = "durability: \"${var.durability}\" is not async or sync."
  }
}

variable "sync_acks" {
  description = "replication.sync_acks: with durability sync, how many replicas acknowledge each commit. At most the number of replicas."
  type        = number
  default     = 1

  validation {
    condition     = var.sync_acks >= 1 && floor(var.sync_acks) == var.sync_acks
    error_message = "sync_acks: ${var.sync_acks} is not a whole number of at least 1."
  }
}

variable "tls_dir" {
  description = "Where each host keeps the cluster's certificates: ca.pem, <node>.pem and <node>-key.pem (regiond ca init / issue)."
  type        = string
  default     = "/etc/meridian"
}

variable "otlp_endpoint" {
  description = "telemetry.otlp_endpoint of every node (an OTLP/gRPC collector URL); \"\" for none."
  type        = string
  default     = ""
}

variable "round_trips_ms" {
  description = <<-EOT
    Round-trip times between regions in milliseconds, keyed "a-b" by region
    names in either order, e.g. { "iad-fra" = 90 }: every pair of regions
    once, for the latency matrix the benchmarks use. Empty: no matrix.
  EOT
  type        = map(number)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.round_trips_ms : v >= 0])
    error_message = "round_trips_ms: round trips cannot be negative: ${join(", ", [for k, v in var.round_trips_ms : "${k} = ${v}" if v < 0])}."
  }
}

variable "log_level" {
  description = "log.level of every node: debug, info, warn or error."
  type        = string
  default     = "info"

  validation {
    condition     = contains(["debug", "info", "warn", "error"], var.log_level)
    error_message = "log_level: \"${var.log_level}\" is not debug, info, warn or error."
  }
}

variable "geo_listen" {
  description = "host:port the geo entry (regiond geo) serves on, in the geo output."
  type        = string
  default     = "127.0.0.1:8000"
}

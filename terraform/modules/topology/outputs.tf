output "configs" {
  description = "Each node's regiond.yml, by node name."
  value       = { for name, c in local.config : name => yamlencode(c) }

  precondition {
    condition     = var.lease.type != "consul" || length(local.candidates) > 0
    error_message = "No node is a candidate (candidate = true): with lease.type consul no node could ever take the write lease."
  }
  precondition {
    condition     = var.lease.type != "static" || contains(local.candidates, var.lease.static_primary)
    error_message = "lease.static_primary \"${var.lease.static_primary}\" is not a candidate node of regions (candidates: ${join(", ", local.candidates)}): with lease.type static, name the node that takes writes."
  }
  precondition {
    condition     = var.lease.type != "static" || length(local.regions_no_candidate) == 0
    error_message = "With lease.type static (no Consul), every region needs a candidate node, since the lease is moved by hand to a candidate and a region without one cannot take writes when the primary's region is lost; these have none: ${join(", ", local.regions_no_candidate)}."
  }
  precondition {
    condition     = var.sync_acks <= local.replicas
    error_message = "sync_acks ${var.sync_acks} is larger than the ${local.replicas} replicas of the cluster: no commit could ever be acknowledged."
  }
  precondition {
    condition     = length(var.round_trips_ms) == 0 || length(local.missing_pairs) == 0
    error_message = "round_trips_ms has no round trip for ${join(", ", local.missing_pairs)}: give every pair of regions once (\"a-b\" = ms)."
  }
  precondition {
    condition     = length(local.unknown_keys) == 0
    error_message = "round_trips_ms names pairs that are not two different regions of regions: ${join(", ", local.unknown_keys)} (keys are \"a-b\", e.g. \"iad-fra\")."
  }
}

output "nodes" {
  description = "Each node: its region, host, whether it is a candidate, and the addresses of its replication server, admin API and router."
  value = { for n in local.nodes : n.name => {
    region      = n.region
    host        = n.host
    candidate   = n.candidate
    replication = "${n.host}:${n.replication_port}"
    admin       = "${n.host}:${n.admin_port}"
    router      = "http://${n.host}:${n.router_port}"
    app         = "http://${n.app_host}:${n.app_port}"
    data_dir    = n.data_dir
    mount_dir   = n.mount_dir
  } }
}

output "peers" {
  description = "Each node's replication.peers: every other node, with its replication, admin and (mutual TLS) router addresses."
  value       = local.peers
}

output "routers" {
  description = "Each region's routers, by region name."
  value       = { for r in var.regions : r.name => [for n in r.nodes : "http://${n.host}:${n.router_port}"] }
}

output "geo_config" {
  description = "The geo entry's configuration (regiond geo -config FILE): each region's first router, its readiness and place."
  value       = yamlencode(local.geo)
}

output "latency_ms" {
  description = "One-way latency between regions in milliseconds (half each round trip), latency_ms[a][b]; null without round_trips_ms."
  value       = local.latency_ms
}

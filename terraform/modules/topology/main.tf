# Module topology renders a Meridian cluster's configuration from its
# regions: every node's regiond.yml, the peers each node lists, the
# routers and the geo entry's configuration, and the latency matrix the
# benchmarks use. It uses no provider: apply it anywhere, then hand its
# outputs to the hosts module or write them out.

locals {
  nodes   = flatten([for r in var.regions : [for n in r.nodes : merge(n, { region = r.name })]])
  by_name = { for n in local.nodes : n.name => n }

  candidates           = [for n in local.nodes : n.name if n.candidate]
  regions_no_candidate = [for r in var.regions : r.name if !anytrue([for n in r.nodes : n.candidate])]
  replicas             = length(local.nodes) - 1

  region_names  = [for r in var.regions : r.name]
  pairs         = flatten([for i, a in local.region_names : [for b in slice(local.region_names, i + 1, length(local.region_names)) : { a = a, b = b }]])
  round_trip    = { for p in local.pairs : "${p.a}-${p.b}" => try(var.round_trips_ms["${p.a}-${p.b}"], var.round_trips_ms["${p.b}-${p.a}"], null) }
  missing_pairs = [for k, v in local.round_trip : k if v == null]
  known_keys    = flatten([for p in local.pairs : ["${p.a}-${p.b}", "${p.b}-${p.a}"]])
  unknown_keys  = [for k, v in var.round_trips_ms : k if !contains(local.known_keys, k)]

  # One-way delays: half the round trip, each way.
  latency_ms = length(var.round_trips_ms) == 0 || length(local.missing_pairs) > 0 ? null : {
    for a in local.region_names : a => {
      for b in local.region_names : b => a == b ? 0 : try(local.round_trip["${a}-${b}"], local.round_trip["${b}-${a}"]) / 2
    }
  }

  lease = {
    for n in local.nodes : n.name => jsondecode(var.lease.type == "consul" ? jsonencode({
      type           = "consul"
      candidate      = n.candidate
      consul_url     = var.lease.consul_url
      consul_key     = var.lease.consul_key
      ttl            = var.lease.ttl
      check_ttl      = var.lease.check_ttl
      lock_delay     = var.lease.lock_delay
      prefer_regions = var.lease.prefer_regions
      }) : jsonencode({
      type           = "static"
      candidate      = n.candidate
      static_primary = var.lease.static_primary
    }))
  }

  peers = {
    for n in local.nodes : n.name => [
      for p in local.nodes : {
        node   = p.name
        region = p.region
        addr   = "${p.host}:${p.replication_port}"
        admin  = "${p.host}:${p.admin_port}"
        router = "https://${p.host}:${p.router_peer_port}"
      } if p.name != n.name
    ]
  }

  config = {
    for n in local.nodes : n.name => merge({
      node      = n.name
      region    = n.region
      data_dir  = n.data_dir
      mount_dir = n.mount_dir
      lease     = local.lease[n.name]
      replication = {
        listen     = "${n.host}:${n.replication_port}"
        peers      = local.peers[n.name]
        durability = var.durability
        sync_acks  = var.sync_acks
      }
      tls = {
        ca   = "${var.tls_dir}/ca.pem"
        cert = "${var.tls_dir}/${n.name}.pem"
        key  = "${var.tls_dir}/${n.name}-key.pem"
      }
      admin = { listen = "${n.host}:${n.admin_port}" }
      router = {
        listen      = "${n.host}:${n.router_port}"
        target      = "http://${n.app_host}:${n.app_port}"
        peer_listen = "${n.host}:${n.router_peer_port}"
      }
      log = { level = var.log_level }
    }, jsondecode(var.otlp_endpoint == "" ? "{}" : jsonencode({ telemetry = { otlp_endpoint = var.otlp_endpoint } })))
  }

  geo = {
    listen = var.geo_listen
    regions = [for r in var.regions : {
      name      = r.name
      router    = "http://${r.nodes[0].host}:${r.nodes[0].router_port}"
      ready     = "${r.nodes[0].host}:${r.nodes[0].admin_port}"
      lat       = r.lat
      lon       = r.lon
      countries = r.countries
    }]
  }
}

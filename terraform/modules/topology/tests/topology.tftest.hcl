# terraform test: the configurations the module renders for three regions,
# and each validation's message.

variables {
  regions = [
    { name = "iad", lat = 38.9, lon = -77.4, nodes = [{ name = "iad-1", host = "10.0.1.10" }, { name = "iad-2", host = "10.0.1.11", candidate = false }] },
    { name = "fra", lat = 50.1, lon = 8.7, nodes = [{ name = "fra-1", host = "10.0.2.10" }] },
    { name = "syd", lat = -33.9, lon = 151.2, nodes = [{ name = "syd-1", host = "10.0.3.10", router_port = 9090 }] },
  ]
  lease          = { prefer_regions = ["iad", "fra"] }
  round_trips_ms = { "iad-fra" = 90, "syd-iad" = 198, "fra-syd" = 252 }
  otlp_endpoint  = "http://10.0.0.5:4317"
}

run "three_regions" {
  command = plan

  assert {
    condition     = length(output.configs) == 4 && length(output.peers["iad-1"]) == 3
    error_message = "want four configs, and three peers of iad-1"
  }
  assert {
    condition = yamldecode(output.configs["iad-1"]) == {
      node      = "iad-1"
      region    = "iad"
      data_dir  = "/var/lib/meridian"
      mount_dir = "/data"
      lease = {
        type = "consul", candidate = true, consul_url = "http://127.0.0.1:8500", consul_key = "meridian/primary",
        ttl  = "10s", check_ttl = "2s", lock_delay = "1s", prefer_regions = ["iad", "fra"]
      }
      replication = {
        listen = "10.0.1.10:20210"
        peers = [
          { node = "iad-2", region = "iad", addr = "10.0.1.11:20210", admin = "10.0.1.11:20211", router = "https://10.0.1.11:8443" },
          { node = "fra-1", region = "fra", addr = "10.0.2.10:20210", admin = "10.0.2.10:20211", router = "https://10.0.2.10:8443" },
          { node = "syd-1", region = "syd", addr = "10.0.3.10:20210", admin = "10.0.3.10:20211", router = "https://10.0.3.10:8443" },
        ]
        durability = "async"
        sync_acks  = 1
      }
      tls       = { ca = "/etc/meridian/ca.pem", cert = "/etc/meridian/iad-1.pem", key = "/etc/meridian/iad-1-key.pem" }
      admin     = { listen = "10.0.1.10:20211" }
      router    = { listen = "10.0.1.10:8080", target = "http://127.0.0.1:3000", peer_listen = "10.0.1.10:8443" }
      log       = { level = "info" }
      telemetry = { otlp_endpoint = "http://10.0.0.5:4317" }
    }
    error_message = "iad-1's regiond.yml: ${output.configs["iad-1"]}"
  }
  assert {
    condition     = yamldecode(output.configs["iad-2"]).lease.candidate == false && yamldecode(output.configs["syd-1"]).router.listen == "10.0.3.10:9090"
    error_message = "iad-2 is no candidate; syd-1's router listens on its router_port"
  }
  assert {
    condition     = output.latency_ms["iad"]["fra"] == 45 && output.latency_ms["syd"]["iad"] == 99 && output.latency_ms["fra"]["syd"] == 126 && output.latency_ms["syd"]["syd"] == 0
    error_message = "latency matrix: ${jsonencode(output.latency_ms)}"
  }
  assert {
    condition     = output.routers["iad"] == ["http://10.0.1.10:8080", "http://10.0.1.11:8080"] && output.nodes["syd-1"].router == "http://10.0.3.10:9090"
    error_message = "routers: ${jsonencode(output.routers)}"
  }
  assert {
    condition = yamldecode(output.geo_config) == {
      listen = "127.0.0.1:8000"
      regions = [
        { name = "iad", router = "http://10.0.1.10:8080", ready = "10.0.1.10:20211", lat = 38.9, lon = -77.4, countries = [] },
        { name = "fra", router = "http://10.0.2.10:8080", ready = "10.0.2.10:20211", lat = 50.1, lon = 8.7, countries = [] },
        { name = "syd", router = "http://10.0.3.10:9090", ready = "10.0.3.10:20211", lat = -33.9, lon = 151.2, countries = [] },
      ]
    }
    error_message = "geo config: ${output.geo_config}"
  }
}

run "static_sync" {
  command = plan
  variables {
    lease      = { type = "static", static_primary = "fra-1" }
    durability = "sync"
    sync_acks  = 3
  }
  assert {
    condition     = yamldecode(output.configs["syd-1"]).lease == { type = "static", candidate = true, static_primary = "fra-1" } && yamldecode(output.configs["syd-1"]).replication.durability == "sync" && yamldecode(output.configs["syd-1"]).replication.sync_acks == 3
    error_message = "syd-1: ${output.configs["syd-1"]}"
  }
}

run "no_round_trips_no_matrix" {
  command = plan
  variables {
    round_trips_ms = {}
    otlp_endpoint  = ""
  }
  assert {
    condition     = output.latency_ms == null && !contains(keys(yamldecode(output.configs["fra-1"])), "telemetry")
    error_message = "no round trips: no matrix; no endpoint: no telemetry section"
  }
}

run "duplicate_node_names" {
  command = plan
  variables {
    regions = [
      { name = "iad", nodes = [{ name = "iad-1", host = "10.0.1.10" }] },
      { name = "fra", nodes = [{ name = "iad-1", host = "10.0.2.10" }] },
    ]
    round_trips_ms = {}
  }
  expect_failures = [var.regions]
}

run "static_region_without_candidate" {
  command = plan
  variables {
    lease = { type = "static", static_primary = "iad-1" }
    regions = [
      { name = "iad", nodes = [{ name = "iad-1", host = "10.0.1.10" }] },
      { name = "fra", nodes = [{ name = "fra-1", host = "10.0.2.10", candidate = false }] },
    ]
    round_trips_ms = {}
  }
  expect_failures = [output.configs]
}

run "static_primary_not_a_node" {
  command = plan
  variables {
    lease = { type = "static", static_primary = "lhr-1" }
  }
  expect_failures = [output.configs]
}

run "sync_acks_above_replicas" {
  command = plan
  variables {
    durability = "sync"
    sync_acks  = 4
  }
  expect_failures = [output.configs]
}

run "missing_round_trip" {
  command = plan
  variables {
    round_trips_ms = { "iad-fra" = 90, "iad-syd" = 198 }
  }
  expect_failures = [output.configs]
}

run "negative_round_trip" {
  command = plan
  variables {
    round_trips_ms = { "iad-fra" = -1, "iad-syd" = 198, "fra-syd" = 252 }
  }
  expect_failures = [var.round_trips_ms]
}

run "bad_durability" {
  command = plan
  variables {
    durability = "quorum"
  }
  expect_failures = [var.durability]
}

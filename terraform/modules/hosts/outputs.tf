output "install_roots" {
  description = "Where each node is installed on its host: bin/, etc/ (regiond.yml and certificates), log/regiond.log, regiond.pid."
  value       = { for name, n in var.nodes : name => n.install_root }
}

output "configs" {
  description = "Each node's regiond.yml as installed (its tls section pointing at the uploaded certificates)."
  value       = local.config
}

#!/usr/bin/env bash
# install-terraform.sh finds or builds a Terraform-compatible CLI for
# Meridian's terraform/ configurations, and prints the path of the binary.
#
# A `terraform` on PATH is used as it is, else a `tofu` on PATH. Otherwise
# OpenTofu is built at a pinned version from the Go module proxy, once, into
# $MERIDIAN_CACHE (default ~/.cache/meridian) and found there from then on;
# running the script again does nothing but print the path. `--build` skips
# the PATH lookup, to build the pinned version even where a terraform or tofu
# is installed.
#
# `go install github.com/opentofu/opentofu/cmd/tofu@VERSION` refuses the
# module: its go.mod has a replace directive (hashicorp/hcl/v2 by OpenTofu's
# fork, a module on the proxy, not a local directory). So the script
# downloads the module and builds in a copy of it, the way OpenTofu's release
# builds do (.goreleaser.yaml: CGO_ENABLED=0, -trimpath, version.dev=no so
# that `tofu version` prints the release, not "-dev"). The first build takes
# about seven minutes on two cores.
set -euo pipefail

# v1.12.6: its go.mod needs go 1.26.6, so GOTOOLCHAIN=local builds it with
# the installed Go 1.26.
TOFU_VERSION=v1.12.6
CACHE="${MERIDIAN_CACHE:-$HOME/.cache/meridian}"
BIN="$CACHE/opentofu-$TOFU_VERSION/tofu"
GO="${GO:-go}"
PROG=install-terraform

if [[ "${1:-}" != "--build" ]]; then
	for name in terraform tofu; do
		if path=$(command -v "$name" 2>/dev/null); then
			echo "$path"
			exit 0
		fi
	done
fi
if [[ -x "$BIN" ]]; then
	echo "$BIN"
	exit 0
fi

# The build's environment, $work, moddir and build.
source "$(dirname "$0")/lib/gomodule.sh"

# The proxy lists only some of OpenTofu's releases; say which when the
# pinned one is not among them.
versions=$(cd "$work" && "$GO" list -m -versions github.com/opentofu/opentofu 2>&1) || {
	echo "install-terraform: cannot list github.com/opentofu/opentofu on the Go module proxy:" >&2
	echo "$versions" >&2
	exit 1
}
if [[ " $versions " != *" $TOFU_VERSION "* ]]; then
	echo "install-terraform: the Go module proxy does not serve OpenTofu $TOFU_VERSION; it lists:" >&2
	echo "${versions#* }" >&2
	exit 1
fi

echo "install-terraform: downloading github.com/opentofu/opentofu@$TOFU_VERSION" >&2
src=$(moddir "github.com/opentofu/opentofu@$TOFU_VERSION")
cp -r "$src" "$work/opentofu"
chmod -R u+w "$work/opentofu"

mkdir -p "$(dirname "$BIN")"
log="$CACHE/opentofu-$TOFU_VERSION-build.log"
echo "install-terraform: building OpenTofu (about seven minutes the first time; log in $log)" >&2
ldflags="-X github.com/opentofu/opentofu/version.dev=no"
CGO_ENABLED=0 build "OpenTofu $TOFU_VERSION" "$log" "$work/opentofu" -trimpath -ldflags "$ldflags" -o "$BIN.tmp" ./cmd/tofu
mv "$BIN.tmp" "$BIN"
"$BIN" version >&2
echo "$BIN"

#!/usr/bin/env bash
# install-consul.sh builds the Consul agent that Meridian's lease tests, the
# demo and the benchmarks run, from the Go module proxy, at a pinned version,
# and prints the path of the binary.
#
# A `consul` on PATH is used as it is. Otherwise the binary is built once into
# $MERIDIAN_CACHE (default ~/.cache/meridian) and found there from then on;
# running the script again does nothing but print the path. `--build` skips
# the PATH lookup, to build the pinned version even where a consul is installed.
#
# `go install github.com/hashicorp/consul@VERSION` refuses the module: its
# go.mod replaces its nested modules (api, sdk, ...) with directories that the
# module's zip does not hold, since each is a module of its own. So the script
# downloads the module, puts each nested module it replaces beside it at the
# version its go.mod requires, and builds in that tree. The first build takes
# about five minutes on two cores.
set -euo pipefail

# v1.20.6: the newest release whose nested modules the proxy and checksum
# database both serve (v1.22.0 needs envoyextensions v0.9.0, which sum.golang.org
# does not know).
CONSUL_VERSION=v1.20.6
CACHE="${MERIDIAN_CACHE:-$HOME/.cache/meridian}"
BIN="$CACHE/consul-$CONSUL_VERSION/consul"
GO="${GO:-go}"
PROG=install-consul

if [[ "${1:-}" != "--build" ]]; then
	if path=$(command -v consul 2>/dev/null); then
		echo "$path"
		exit 0
	fi
fi
if [[ -x "$BIN" ]]; then
	echo "$BIN"
	exit 0
fi

# The build's environment, $work, moddir and build.
source "$(dirname "$0")/lib/gomodule.sh"

echo "install-consul: downloading github.com/hashicorp/consul@$CONSUL_VERSION" >&2
src=$(moddir "github.com/hashicorp/consul@$CONSUL_VERSION")
cp -r "$src" "$work/consul"
chmod -R u+w "$work/consul"

# Each `github.com/hashicorp/consul/X => ./X` replace, at its required version.
sed -n 's#^\t\(github.com/hashicorp/consul/[a-z/-]*\) => \./\([a-z/-]*\)$#\1 \2#p' "$work/consul/go.mod" |
	while read -r mod dir; do
		version=$(sed -n "s#^\t$mod \(v[^ ]*\).*#\1#p" "$work/consul/go.mod" | head -1)
		[[ -n "$version" ]] || { echo "install-consul: go.mod replaces $mod but requires no version of it" >&2; exit 1; }
		echo "install-consul: nested module $mod@$version" >&2
		nested=$(moddir "$mod@$version") || exit 1
		rm -rf "${work:?}/consul/$dir"
		cp -r "$nested" "$work/consul/$dir"
		chmod -R u+w "$work/consul/$dir"
	done

mkdir -p "$(dirname "$BIN")"
log="$CACHE/consul-$CONSUL_VERSION-build.log"
echo "install-consul: building (about five minutes the first time; log in $log)" >&2
build "Consul $CONSUL_VERSION" "$log" "$work/consul" -trimpath -o "$BIN.tmp" .
mv "$BIN.tmp" "$BIN"
"$BIN" version >&2
echo "$BIN"

#!/usr/bin/env bash
# install-jaeger.sh builds the Jaeger all-in-one binary (Jaeger v2, an
# OpenTelemetry Collector distribution) that the demo uses as its local trace
# viewer, from the Go module proxy, at a pinned version, and prints the path
# of the binary. examples/demo/jaeger.yaml is the config to run it with:
#
#   "$(scripts/install-jaeger.sh)" --config examples/demo/jaeger.yaml
#
# A `jaeger` on PATH is used as it is. Otherwise the binary is built once into
# $MERIDIAN_CACHE (default ~/.cache/meridian) and found there from then on;
# running the script again does nothing but print the path. `--build` skips
# the PATH lookup, to build the pinned version even where a jaeger is installed.
# The first build takes about ten minutes on two cores, most of it compiling
# the collector's dependencies.
#
# The web UI. Jaeger embeds the UI's files, gzipped, from
# cmd/query/app/ui/actual/ (in v1.75.0 always: there is no `ui` build tag any
# more), and serves a placeholder page when that directory holds no
# index.html.gz. In the module's zip it holds only a .gitignore: the real files
# are built by node from the jaeger-ui git submodule, which the zip does not
# hold, and they are released only as a GitHub release asset (jaeger-ui's
# assets.tar.gz), not as a package on the npm registry (the jaegertracing
# account there publishes only jaeger-client and @jaegertracing/plexus;
# `jaeger-ui` is an empty name). So by default the binary serves the
# placeholder page at / while its HTTP API (/api/services, /api/traces/ID)
# works. To embed the real UI, point JAEGER_UI_ASSETS at a built jaeger-ui,
# either its build directory (with index.html and static/) or a release's
# assets.tar.gz, at the version that matches (jaeger-ui's releases carry
# Jaeger's v1 numbers: v1.75.0 here). The script then does what Jaeger's
# `make build-ui` does: it copies the files into cmd/query/app/ui/actual/ and
# gzips each. A binary already built without the UI is not rebuilt: remove
# $MERIDIAN_CACHE/jaeger-v1.75.0 first.
set -euo pipefail

# v1.75.0: the Jaeger v1 tag of the v2 release that go-partial lists as
# approved (v1.76.0 is served by the proxy but is not an approved release).
# ./cmd/jaeger is the v2 binary; the v1 binaries (all-in-one, query, ...) are
# built from the same module.
JAEGER_VERSION=v1.75.0
CACHE="${MERIDIAN_CACHE:-$HOME/.cache/meridian}"
BIN="$CACHE/jaeger-$JAEGER_VERSION/jaeger"
GO="${GO:-go}"
PROG=install-jaeger

if [[ "${1:-}" != "--build" ]]; then
	if path=$(command -v jaeger 2>/dev/null); then
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

echo "install-jaeger: downloading github.com/jaegertracing/jaeger@$JAEGER_VERSION" >&2
src=$(moddir "github.com/jaegertracing/jaeger@$JAEGER_VERSION")
cp -r "$src" "$work/jaeger"
chmod -R u+w "$work/jaeger"

# The UI's files, if given, gzipped where the embed directive looks for them.
actual="$work/jaeger/cmd/query/app/ui/actual"
if [[ -n "${JAEGER_UI_ASSETS:-}" ]]; then
	ui="$JAEGER_UI_ASSETS"
	if [[ -f "$ui" ]]; then
		mkdir "$work/ui"
		tar -xzf "$ui" -C "$work/ui"
		index=$(find "$work/ui" -name index.html -not -path '*/static/*' | head -1)
		[[ -n "$index" ]] || { echo "install-jaeger: $ui holds no index.html" >&2; exit 1; }
		ui=$(dirname "$index")
	fi
	[[ -f "$ui/index.html" ]] || { echo "install-jaeger: $ui/index.html is missing" >&2; exit 1; }
	echo "install-jaeger: embedding the Jaeger UI from $JAEGER_UI_ASSETS" >&2
	cp -r "$ui"/. "$actual"/
	chmod -R u+w "$actual"
	find "$actual" -type f ! -name .gitignore ! -name '*.gz' -exec gzip --no-name {} +
else
	echo "install-jaeger: no JAEGER_UI_ASSETS: the binary will serve Jaeger's placeholder page instead of the UI" >&2
fi

mkdir -p "$(dirname "$BIN")"
log="$CACHE/jaeger-$JAEGER_VERSION-build.log"
echo "install-jaeger: building (about ten minutes the first time; log in $log)" >&2
ldflags="-X github.com/jaegertracing/jaeger/internal/version.latestVersion=$JAEGER_VERSION"
build "Jaeger $JAEGER_VERSION" "$log" "$work/jaeger" -trimpath -ldflags "$ldflags" -o "$BIN.tmp" ./cmd/jaeger
mv "$BIN.tmp" "$BIN"
"$BIN" version >&2
echo "$BIN"

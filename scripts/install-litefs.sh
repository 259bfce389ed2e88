#!/usr/bin/env bash
# install-litefs.sh builds LiteFS, which `replbench -litefs` measures beside
# regiond, from the Go module proxy at a pinned version, and prints the path
# of the binary.
#
# The binary is built once into $MERIDIAN_CACHE (default ~/.cache/meridian)
# and found there from then on; running the script again does nothing but
# print the path.
set -euo pipefail

LITEFS_VERSION=v0.5.14
CACHE="${MERIDIAN_CACHE:-$HOME/.cache/meridian}"
DIR="$CACHE/litefs-$LITEFS_VERSION"
GO="${GO:-go}"

if [[ -x "$DIR/litefs" ]]; then
	echo "$DIR/litefs"
	exit 0
fi
mkdir -p "$DIR"
GOFLAGS=-mod=mod GOWORK=off GOTOOLCHAIN=local GOBIN="$DIR" \
	"$GO" install "github.com/superfly/litefs/cmd/litefs@$LITEFS_VERSION" >&2
echo "$DIR/litefs"

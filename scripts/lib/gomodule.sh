# gomodule.sh is sourced by the install-*.sh scripts, which build a program
# from the Go module proxy: PROG names the script in messages, GO the go
# command. It sets up the build's environment and a work directory
# ($work, removed on exit), and defines moddir and build.

export GOFLAGS=-mod=mod GOWORK=off GOTOOLCHAIN=local
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

# moddir MODULE@VERSION prints where the module proxy's copy landed.
moddir() {
	local out dir
	out=$("$GO" mod download -json "$1" 2>&1) || true
	dir=$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' <<<"$out")
	if [[ -z "$dir" ]]; then
		echo "$PROG: cannot download $1 from the Go module proxy:" >&2
		echo "$out" >&2
		return 1
	fi
	echo "$dir"
}

# build WHAT LOG DIR GO-BUILD-ARGS... runs `go build GO-BUILD-ARGS` in DIR,
# its output in LOG; on failure it prints the log's end, naming WHAT, and
# exits.
build() {
	local what=$1 log=$2 dir=$3
	shift 3
	if ! (cd "$dir" && "$GO" build "$@") >"$log" 2>&1; then
		echo "$PROG: building $what failed; the end of its log, $log:" >&2
		tail -n 20 "$log" >&2
		exit 1
	fi
}

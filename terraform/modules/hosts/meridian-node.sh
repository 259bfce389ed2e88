#!/usr/bin/env bash
# meridian-node supervises one Meridian node in the directory it is in
# (its install root): bin/regiond, bin/app, etc/regiond.yml.
#
#   meridian-node start ADMIN_ADDR TIMEOUT_SECONDS [APP ARGS...]
#       runs `regiond run -config etc/regiond.yml -- bin/app ARGS` under a
#       detached supervisor (supervisor.pid) that starts it again a second
#       after it exits unless it is being stopped; logs in log/regiond.log,
#       regiond's pid in regiond.pid; waits for http://ADMIN_ADDR/readyz
#   meridian-node stop
#       stops the supervisor, then regiond with SIGTERM (it stops the app
#       and unmounts), SIGKILL after 30 s, then unmounts the mount_dir if it
#       is still mounted
#
# The hosts module installs it where the host has no systemd to run the
# node as a unit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
pidfile=regiond.pid

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
running() { alive supervisor.pid || alive $pidfile; }

mount_dir() { sed -n 's/^mount_dir: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' etc/regiond.yml | head -1; }

case "${1:-}" in
start)
	admin=$2 timeout=$3
	shift 3
	if running; then
		echo "meridian-node: regiond already runs (pid $(cat $pidfile))" >&2
		exit 1
	fi
	rm -f stopping
	# The supervisor: regiond in the foreground of a loop, started again
	# until meridian-node stop leaves the file "stopping".
	setsid nohup bash -c '
		echo $$ >supervisor.pid
		while [[ ! -f stopping ]]; do
			bin/regiond run -config etc/regiond.yml -- "$0/bin/app" "$@" &
			echo $! >regiond.pid
			wait $! && status=0 || status=$?
			[[ -f stopping ]] && break
			echo "meridian-node: regiond exited with status $status at $(date -u +%FT%TZ); starting it again in 1 s" >&2
			sleep 1
		done
		rm -f supervisor.pid' "$root" "$@" >>log/regiond.log 2>&1 </dev/null &
	first=""
	for ((i = 0; i < timeout * 5; i++)); do
		if curl -sf "http://$admin/readyz" >/dev/null; then
			echo "meridian-node: $(curl -s "http://$admin/readyz")"
			exit 0
		fi
		pid=$(cat $pidfile 2>/dev/null || true)
		first=${first:-$pid}
		if [[ -n $first && $pid != "$first" ]]; then
			echo "meridian-node: regiond exited at start; the end of log/regiond.log:" >&2
			tail -n 30 log/regiond.log >&2
			"$0" stop
			exit 1
		fi
		sleep 0.2
	done
	echo "meridian-node: not ready within ${timeout}s ($(curl -s "http://$admin/readyz" || true)); the end of log/regiond.log:" >&2
	tail -n 30 log/regiond.log >&2
	"$0" stop
	exit 1
	;;
stop)
	touch stopping
	for ((i = 0; i < 50; i++)); do
		# A regiond being started again has its pid written by now.
		alive supervisor.pid && ! alive $pidfile || break
		sleep 0.1
	done
	if alive $pidfile; then
		pid=$(cat $pidfile)
		kill -TERM "$pid"
		for ((i = 0; i < 300; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			echo "meridian-node: regiond did not stop within 30s; killing it" >&2
			kill -KILL "$pid"
		fi
	fi
	for ((i = 0; i < 50; i++)); do
		alive supervisor.pid || break
		sleep 0.1
	done
	if alive supervisor.pid; then
		kill -KILL "$(cat supervisor.pid)"
	fi
	rm -f $pidfile supervisor.pid stopping
	m=$(mount_dir)
	if [[ -n $m ]] && mountpoint -q "$m"; then
		fusermount3 -u -z "$m" || umount -l "$m"
	fi
	;;
*)
	echo "usage: meridian-node start ADMIN_ADDR TIMEOUT_SECONDS [APP ARGS...] | stop" >&2
	exit 2
	;;
esac

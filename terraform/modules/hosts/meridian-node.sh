#!/usr/bin/env bash
# meridian-node supervises one Meridian node in the directory it is in
# (its install root): bin/regiond, bin/app, etc/regiond.yml.
#
#   meridian-node start ADMIN_ADDR TIMEOUT_SECONDS [APP ARGS...]
#       runs `regiond run -config etc/regiond.yml -- bin/app ARGS` detached
#       (log/regiond.log, regiond.pid) and waits for http://ADMIN_ADDR/readyz
#   meridian-node stop
#       SIGTERM to regiond (it stops the app and unmounts), SIGKILL after
#       30 s, then unmounts the mount_dir if it is still mounted
#
# The hosts module installs it where the host has no systemd to run the
# node as a unit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
pidfile=regiond.pid

running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

mount_dir() { sed -n 's/^mount_dir: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' etc/regiond.yml | head -1; }

case "${1:-}" in
start)
	admin=$2 timeout=$3
	shift 3
	if running; then
		echo "meridian-node: regiond already runs (pid $(cat $pidfile))" >&2
		exit 1
	fi
	setsid nohup bin/regiond run -config etc/regiond.yml -- "$root/bin/app" "$@" >>log/regiond.log 2>&1 </dev/null &
	echo $! >$pidfile
	for ((i = 0; i < timeout * 5; i++)); do
		if curl -sf "http://$admin/readyz" >/dev/null; then
			echo "meridian-node: $(curl -s "http://$admin/readyz")"
			exit 0
		fi
		if ! running; then
			echo "meridian-node: regiond exited at start; the end of log/regiond.log:" >&2
			tail -n 30 log/regiond.log >&2
			exit 1
		fi
		sleep 0.2
	done
	echo "meridian-node: not ready within ${timeout}s ($(curl -s "http://$admin/readyz" || true)); the end of log/regiond.log:" >&2
	tail -n 30 log/regiond.log >&2
	exit 1
	;;
stop)
	if running; then
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
	rm -f $pidfile
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

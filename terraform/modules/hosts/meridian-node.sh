#!/usr/bin/env bash
# meridian-node runs one Meridian node from the directory it is in (its
# install root): bin/regiond, bin/app, etc/regiond.yml, etc/app-args.
#
#   meridian-node start ADMIN_ADDR TIMEOUT_SECONDS [APP ARGS...]
#       starts `regiond run -config etc/regiond.yml -- bin/app ARGS` and
#       waits for http://ADMIN_ADDR/readyz. Where systemd runs the host, as
#       the unit meridian-NODE.service (written to /etc/systemd/system,
#       enabled: it starts at boot, and again a second after it exits);
#       elsewhere under a detached supervisor loop (supervisor.pid) that
#       starts it again a second after it exits. etc/service-manager says
#       which: "systemd", "supervisor" or "auto" (the default: systemd if it
#       is the init system). Logs go to log/regiond.log either way.
#   meridian-node stop
#       stops regiond with SIGTERM (it stops the app and unmounts), SIGKILL
#       after 30 s, then unmounts the mount_dir if it is still mounted; a
#       unit is disabled and removed
#   meridian-node unit [APP ARGS...]
#       prints the systemd unit start would install
#
# The hosts module installs it as bin/meridian-node.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
pidfile=regiond.pid

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
running() { alive supervisor.pid || alive $pidfile; }

mount_dir() { sed -n 's/^mount_dir: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' etc/regiond.yml | head -1; }
node_name() { sed -n 's/^node: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' etc/regiond.yml | head -1; }
unit_file() { echo "/etc/systemd/system/meridian-$(node_name).service"; }

# use_systemd: whether this node runs as a systemd unit.
use_systemd() {
	local mode
	mode=$(cat etc/service-manager 2>/dev/null || echo auto)
	case $mode in
	systemd)
		if [[ ! -d /run/systemd/system ]]; then
			echo "meridian-node: etc/service-manager says systemd, but systemd does not run this host (no /run/systemd/system); set the hosts module's service_manager to \"supervisor\" or \"auto\"" >&2
			exit 1
		fi
		return 0
		;;
	supervisor) return 1 ;;
	auto | "") [[ -d /run/systemd/system ]] ;;
	*)
		echo "meridian-node: etc/service-manager: unknown service manager \"$mode\" (want systemd, supervisor or auto)" >&2
		exit 1
		;;
	esac
}

# quote ARG: ARG as one word of a systemd command line.
quote() {
	local a=${1//\\/\\\\}
	a=${a//\"/\\\"}
	a=${a//%/%%}
	a=${a//\$/\$\$}
	printf '"%s"' "$a"
}

unit() {
	local m args="" a
	if [[ $root =~ [[:space:]] ]]; then
		echo "meridian-node: the install root \"$root\" has white space in it, which a systemd unit cannot name; choose another install_root" >&2
		exit 1
	fi
	m=$(mount_dir)
	for a in "$@"; do args+=" $(quote "$a")"; done
	cat <<-EOF
		# meridian-node wrote this unit for the Meridian node $(node_name); it
		# removes it on stop.
		[Unit]
		Description=Meridian node $(node_name) (regiond and its app)
		Documentation=https://github.com/meridian-db/meridian
		After=network-online.target
		Wants=network-online.target

		[Service]
		Type=exec
		WorkingDirectory=$root
		ExecStart=$(quote "$root/bin/regiond") run -config $(quote "$root/etc/regiond.yml") -- $(quote "$root/bin/app")$args
		# SIGTERM to regiond alone: it hands the lease over, stops the app
		# and unmounts; whatever is left after 30 s is killed.
		KillMode=mixed
		KillSignal=SIGTERM
		TimeoutStopSec=30
		ExecStopPost=-/bin/sh -c 'if mountpoint -q "\$\$1"; then fusermount3 -u -z "\$\$1" || umount -l "\$\$1"; fi' unmount $(quote "$m")
		Restart=always
		RestartSec=1
		StandardOutput=append:$root/log/regiond.log
		StandardError=append:$root/log/regiond.log
		LimitNOFILE=65536

		[Install]
		WantedBy=multi-user.target
	EOF
}

# wait_ready ADMIN TIMEOUT: waits for /readyz; gives up when the node
# exits at start (failed: a unit that failed, dead: a supervised regiond
# whose pid changed).
wait_ready() {
	local admin=$1 timeout=$2 first="" pid
	for ((i = 0; i < timeout * 5; i++)); do
		if curl -sf "http://$admin/readyz" >/dev/null; then
			echo "meridian-node: $(curl -s "http://$admin/readyz")"
			return 0
		fi
		pid=$(cat $pidfile 2>/dev/null || true)
		first=${first:-$pid}
		if [[ -n $first && $pid != "$first" ]] || { [[ -f $(unit_file) ]] && systemctl -q is-failed "$(basename "$(unit_file)")"; }; then
			echo "meridian-node: regiond exited at start; the end of log/regiond.log:" >&2
			tail -n 30 log/regiond.log >&2
			return 1
		fi
		sleep 0.2
	done
	echo "meridian-node: not ready within ${timeout}s ($(curl -s "http://$admin/readyz" || true)); the end of log/regiond.log:" >&2
	tail -n 30 log/regiond.log >&2
	return 1
}

case "${1:-}" in
start)
	admin=$2 timeout=$3
	shift 3
	if running || { [[ -f $(unit_file) ]] && systemctl -q is-active "$(basename "$(unit_file)")"; }; then
		echo "meridian-node: regiond already runs; stop it first (meridian-node stop)" >&2
		exit 1
	fi
	if use_systemd; then
		unit "$@" >"$(unit_file)"
		systemctl daemon-reload
		systemctl enable --now "$(basename "$(unit_file)")"
	else
		rm -f stopping
		# The supervisor: regiond in the foreground of a loop, started
		# again until meridian-node stop leaves the file "stopping".
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
	fi
	if ! wait_ready "$admin" "$timeout"; then
		"$0" stop
		exit 1
	fi
	;;
stop)
	if [[ -f $(unit_file) ]]; then
		# systemctl stop waits for ExecStopPost: stopped and unmounted.
		systemctl disable --now "$(basename "$(unit_file)")" || true
		rm -f "$(unit_file)"
		systemctl daemon-reload || true
	fi
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
unit)
	shift
	unit "$@"
	;;
*)
	echo "usage: meridian-node start ADMIN_ADDR TIMEOUT_SECONDS [APP ARGS...] | stop | unit [APP ARGS...]" >&2
	exit 2
	;;
esac

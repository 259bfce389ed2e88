#!/usr/bin/env bash
# sshd.sh starts or stops the example's SSH servers: one sshd per address,
# each on port PORT, with its own host key, pid file and log under
# STATE/sshd/ADDR, letting in root with the key STATE/ssh/id_ed25519 only.
#
#   sshd.sh start STATE PORT ADDR...
#   sshd.sh stop STATE
set -euo pipefail
cmd=$1 state=$2
sshd_bin=$(command -v sshd || echo /usr/sbin/sshd)

case $cmd in
start)
	port=$3
	shift 3
	[[ -x $sshd_bin ]] || { echo "sshd.sh: no sshd: apt-get install -y openssh-server" >&2; exit 1; }
	mkdir -p "$state/ssh" /run/sshd
	chmod 700 "$state/ssh"
	[[ -f $state/ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C meridian-terraform-local -f "$state/ssh/id_ed25519"
	cp "$state/ssh/id_ed25519.pub" "$state/ssh/authorized_keys"
	for addr in "$@"; do
		d=$state/sshd/$addr
		mkdir -p "$d"
		[[ -f $d/host_key ]] || ssh-keygen -q -t ed25519 -N '' -f "$d/host_key"
		cat >"$d/sshd_config" <<-CONF
			ListenAddress $addr:$port
			HostKey $d/host_key
			PidFile $d/sshd.pid
			AuthorizedKeysFile $state/ssh/authorized_keys
			PermitRootLogin prohibit-password
			PasswordAuthentication no
			KbdInteractiveAuthentication no
			UsePAM no
			StrictModes no
			Subsystem sftp internal-sftp
			LogLevel ERROR
		CONF
		if [[ -f $d/sshd.pid ]] && kill -0 "$(cat "$d/sshd.pid")" 2>/dev/null; then
			continue
		fi
		"$sshd_bin" -f "$d/sshd_config" -E "$d/sshd.log"
		for i in $(seq 50); do [[ -f $d/sshd.pid ]] && break; sleep 0.1; done
		[[ -f $d/sshd.pid ]] || { echo "sshd.sh: sshd on $addr:$port did not start; its log:" >&2; cat "$d/sshd.log" >&2; exit 1; }
	done
	;;
stop)
	for pidfile in "$state"/sshd/*/sshd.pid; do
		[[ -f $pidfile ]] || continue
		pid=$(cat "$pidfile")
		kill -TERM "$pid" 2>/dev/null || true
		for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		rm -f "$pidfile"
	done
	;;
*)
	echo "usage: sshd.sh start STATE PORT ADDR... | stop STATE" >&2
	exit 2
	;;
esac

#!/usr/bin/env bash
# roll.sh rolls a new regiond.yml out to the nodes of a Meridian cluster
# over SSH, one node at a time, the primary last: each node whose
# installed config differs is stopped (a primary hands the lease to a
# caught-up node as it stops), gets the new config, and is started again;
# the next waits until it answers /readyz (a replica: caught up within
# router.max_lag). Nodes whose config is unchanged are left alone.
#
#   MERIDIAN_ROLL_NODES="NODE ..." roll.sh KEY_FILE TIMEOUT_SECONDS
#
# Each NODE is "name,ssh_host,ssh_port,ssh_user,install_root,admin,config"
# with the config base64-encoded. The hosts module runs it when a
# regiond.yml changes.
set -euo pipefail
key=$1 timeout=$2
read -r -a nodes <<<"${MERIDIAN_ROLL_NODES:?MERIDIAN_ROLL_NODES lists no node}"
set -- "${nodes[@]}"

remote() { # remote HOST PORT USER COMMAND
	ssh -i "$key" -p "$2" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "$3@$1" "$4"
}

primary=() replicas=()
for n in "$@"; do
	IFS=, read -r name host port user root admin b64 <<<"$n"
	role=$(remote "$host" "$port" "$user" "curl -sf http://$admin/status" | sed -n 's/.*"role": *"\([a-z]*\)".*/\1/p' | head -1) || role=""
	if [[ $role == primary ]]; then primary+=("$n"); else replicas+=("$n"); fi
done

for n in ${replicas[@]+"${replicas[@]}"} ${primary[@]+"${primary[@]}"}; do
	IFS=, read -r name host port user root admin b64 <<<"$n"
	echo "roll.sh: $name"
	remote "$host" "$port" "$user" "set -e
		cd '$root'
		echo '$b64' | base64 -d >etc/regiond.yml.new
		if cmp -s etc/regiond.yml.new etc/regiond.yml; then
			rm etc/regiond.yml.new
			echo 'roll.sh: $name: config unchanged'
			exit 0
		fi
		bin/meridian-node stop
		mv etc/regiond.yml.new etc/regiond.yml
		bin/meridian-node start '$admin' $timeout \$(cat etc/app-args 2>/dev/null)"
done

#!/usr/bin/env bash
# Runs libiscsi's conformance suite (iscsi-test-cu) against Debian's tgt with a
# file-backed LUN on a private loopback portal, for comparison with Cairn's
# target. Usage: tgt-conformance.sh OUT.log [PORT] [CONTROL_PORT]
# Writes the suite log to OUT.log. Needs root (tgtd) and the tgt and
# libiscsi-bin packages.
set -euo pipefail
out=${1:?usage: tgt-conformance.sh OUT.log [PORT] [CONTROL_PORT]}
port=${2:-13260}
cport=${3:-13261}
dir=$(mktemp -d)
tgtpid=
cleanup() {
	if [[ -n $tgtpid ]]; then
		kill "$tgtpid" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$tgtpid" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$tgtpid" 2>/dev/null || true
		wait "$tgtpid" 2>/dev/null || true
	fi
	rm -rf "$dir"
}
trap cleanup EXIT
truncate -s 128M "$dir/lun0.img"
tgtd -f -C "$cport" --iscsi "portal=127.0.0.1:$port" >"$dir/tgtd.log" 2>&1 &
tgtpid=$!
for _ in $(seq 100); do
	tgtadm -C "$cport" --lld iscsi --mode target --op show >/dev/null 2>&1 && break
	sleep 0.1
done
iqn=iqn.2026-11.io.cairn.test:tgt
tgtadm -C "$cport" --lld iscsi --mode target --op new --tid 1 --targetname "$iqn"
tgtadm -C "$cport" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$dir/lun0.img"
tgtadm -C "$cport" --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL
cd "$dir"
iscsi-test-cu --dataloss --test=ALL \
	-i iqn.2026-11.io.cairn.test:initiator1 -I iqn.2026-11.io.cairn.test:initiator2 \
	"iscsi://127.0.0.1:$port/$iqn/1" >"$dir/cu.log" 2>&1 || true
cp "$dir/cu.log" "$out"

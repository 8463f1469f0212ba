#!/bin/bash
# First writes after a snapshot against later writes: 4 KiB random writes at
# QD1 and QD32 through NBD to a temporary playground's vol0, each job writing
# every block of its region once, in random order (the region was written
# before). Then clones: the time to create one of vol0, first 4 KiB writes
# into it against later ones, and flatten's throughput. Usage: run.sh BINDIR
# [BASE_PORT]. Needs fio with the nbd engine. Uses ~3 GiB of disk under
# $TMPDIR, removed after.
set -u
PG=
BIN=$1; PORT=${2:-23400}
D=$(mktemp -d "${TMPDIR:-/tmp}/cairn-snapbench-XXXX")
trap 'kill -TERM $PG 2>/dev/null; wait $PG 2>/dev/null; rm -rf "$D"' EXIT
$BIN/cairn-playground --dir $D/pg --base-port $PORT > $D/pg.out 2>&1 &
PG=$!
for i in $(seq 1 90); do grep -q "Ctrl-C stops" $D/pg.out && break; sleep 1; done
NBD=$(python3 -c "import json;print(json.load(open('$D/pg/playground.json'))['volume']['nbd_url'])")
OPS="$BIN/cairn-ops --mds $(python3 -c "import json;print(json.load(open('$D/pg/playground.json'))['mds'])") $(python3 -c "
import json;t=json.load(open('$D/pg/playground.json')).get('tls')
print('--tls-cert %s --tls-key %s --tls-ca %s' % (t['operator_cert'], t['operator_key'], t['ca']) if t else '--insecure')")"
# Fill the region first (chunks exist, pools grown).
fio --name=fill --ioengine=nbd --uri=$NBD --rw=write --bs=1m --iodepth=8 --size=256m --output=/dev/null >/dev/null 2>&1
run() { # label iodepth size [uri]
  fio --name=$1 --ioengine=nbd --uri=${4:-$NBD} --rw=randwrite --bs=4k --iodepth=$2 --size=$3 --io_size=$3 --randrepeat=0 --lat_percentiles=1 --percentile_list=50:99 --output-format=json --output=$D/$1.json >/dev/null 2>$D/$1.err
  python3 - $D/$1.json $1 <<'PY'
import json,sys
d=json.load(open(sys.argv[1]))['jobs'][0]['write']
p=d['lat_ns']['percentile']
print("%-28s IOPS %6.0f  p50 %.2f ms  p99 %.2f ms  mean %.2f ms" % (sys.argv[2], d['iops'], p['50.000000']/1e6, p['99.000000']/1e6, d['lat_ns']['mean']/1e6))
PY
}
for qd in 1 32; do
  size=16m; [ $qd = 32 ] && size=128m
  [ $qd = 32 ] && run "qd32-warmup" 32 $size
  run "qd$qd-no-snapshot" $qd $size
  $OPS create snapshot vol0 s$qd | tail -1
  run "qd$qd-first-after-snapshot" $qd $size
  run "qd$qd-again-same-pages" $qd $size
  $OPS delete snapshot vol0 s$qd --yes --wait 2m >/dev/null
done

# Clones of vol0 (256 MiB written).
$OPS create snapshot vol0 base | tail -1
t0=$(date +%s%N)
$OPS create volume cl --from vol0@base >/dev/null
echo "clone of vol0@base created in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
CL=${NBD%/*}/cl
run "qd1-clone-first-writes" 1 16m $CL
run "qd1-clone-again-same-pages" 1 16m $CL
$OPS -o json flatten cl | python3 -c "
import json,sys
d=json.load(sys.stdin)
print('flatten copied %.0f MiB in %.1f s: %.1f MiB/s' % (d['copied_bytes']/2**20, d['took_seconds'], d['copied_bytes']/2**20/d['took_seconds']))"

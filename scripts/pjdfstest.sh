#!/usr/bin/env bash
# Runs pjdfstest as root inside Pickbox mounts and fails if any test failed:
#   1. in a fresh single-node mount            -> target/pjdfstest.log
#   2. in a follower's mount of a fresh 3-node cluster (QUIC on loopback, free ports picked at
#      random: scripts/cluster.sh's fixed ports 8001.. may be taken by a developer's own cluster)
#                                              -> target/pjdfstest-cluster.log
# Usage: bash scripts/pjdfstest.sh [--single|--cluster] [PATTERN...]   (default: both; patterns
#        filter test names, e.g. "rename")
# Env: PICKBOX_BIN (a prebuilt binary), PJDFSTEST_TIMEOUT_S (default 1800, per run).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

# How long each node of the cluster may take to mount, in seconds.
CLUSTER_MOUNT_WAIT_S=60
# How long a mutation may wait for a quorum in the cluster run, in ms (a failure shows quickly).
CLUSTER_PROPOSE_TIMEOUT_MS=5000
CLUSTER_NODES=3

modes=(single cluster)
case "${1:-}" in
    --single) modes=(single); shift ;;
    --cluster) modes=(cluster); shift ;;
esac

need_root "pjdfstest"
need_dev_fuse
ensure_packages fuse3
ensure_pjdfstest
ensure_test_users

if [ -z "${PICKBOX_BIN:-}" ]; then
    cargo build --quiet --bin pickbox
    PICKBOX_BIN=$repo/target/debug/pickbox
fi

work=$(mktemp -d /tmp/pickbox-pjdfstest.XXXXXX)
# mktemp makes it 0700; the users pjdfstest switches to must be able to reach the mounts.
chmod 0755 "$work"
pid=""
# The cluster's node PIDs by node number (index 0 unused).
cluster_pids=()
cleanup() {
    stop_node "$pid" "$work/mnt"
    local k
    for k in "${!cluster_pids[@]}"; do
        stop_node "${cluster_pids[$k]}" "$work/cluster/node$k/mnt"
    done
    # Any mount left under the work dir (a node that died leaves its mount behind).
    awk -v root="$work/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# run_pjdfstest NAME MNT LOG [PATTERN...]: runs the suite in MNT, prints what did not pass and
# the summary line; returns pjdfstest's exit status.
run_pjdfstest() {
    local name=$1 mnt=$2 out=$3 status
    shift 3
    log "pjdfstest $PJDFSTEST_VERSION ($name) in $mnt"
    mkdir -p "$(dirname "$out")"
    set +e
    (cd "$mnt" && NO_COLOR=1 RUST_BACKTRACE=0 timeout "${PJDFSTEST_TIMEOUT_S:-1800}" "$CARGO_BIN/pjdfstest" \
        -c "$repo/fuse-tests/pjdfstest.toml" -p "$mnt" "$@") >"$out" 2>&1
    status=$?
    set -e
    # Strip colours in case the runner ignores NO_COLOR.
    sed -i 's/\x1b\[[0-9;]*m//g' "$out"
    awk '/ (FAILED|PASSED UNEXPECTEDLY)$/ { show = 1; print; next }
         / (ok|skipped|failed as expected)$/ { show = 0; next }
         /^Summary:/ { show = 0; next }
         show { print }' "$out"
    echo "pjdfstest ($name): $(grep '^Summary:' "$out" || echo "no summary (exit status $status)")"
    echo "full pjdfstest output ($name): $out"
    [ "$status" -eq 124 ] && echo "pjdfstest ($name) timed out" >&2
    return "$status"
}

failed=0

run_single() {
    local mnt=$work/mnt data=$work/data status=0
    mkdir -p "$mnt" "$data"
    RUST_LOG=${RUST_LOG:-warn} "$PICKBOX_BIN" mount "$mnt" --data-dir "$data" >"$work/node.log" 2>&1 &
    pid=$!
    if ! wait_mounted "$pid" "$mnt" 30; then
        tail -n 50 "$work/node.log" >&2
        die "pickbox did not mount $mnt within 30 s"
    fi
    run_pjdfstest "single node" "$mnt" "$repo/target/pjdfstest.log" "$@" || status=$?
    if ! alive "$pid"; then
        echo "pickbox died during pjdfstest; its log:" >&2
        tail -n 80 "$work/node.log" >&2
        status=1
    elif [ "$status" -ne 0 ]; then
        echo "pickbox log tail:" >&2
        tail -n 30 "$work/node.log" >&2
    fi
    stop_node "$pid" "$mnt"
    pid=""
    return "$status"
}

# A UDP port that is free on loopback right now.
free_udp_port() {
    python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# The id of a running follower of the cluster (from `status --json`); node 2 if none says so.
follower_id() {
    "$PICKBOX_BIN" status --peer "$1" --certs "$work/cluster/certs" --json 2>/dev/null |
        python3 -c 'import json, sys
rows = json.load(sys.stdin)
ids = [r["node_id"] for r in rows if not r.get("error") and (r.get("role") or "").lower() == "follower"]
print(min(ids) if ids else 2)' 2>/dev/null || echo 2
}

run_cluster() {
    local cdir=$work/cluster status=0 k f mnt seed="" addr
    local certs=$cdir/certs
    mkdir -p "$certs"
    "$PICKBOX_BIN" cert create-ca --dir "$certs" >/dev/null
    "$PICKBOX_BIN" cert create-node admin --dir "$certs" >/dev/null
    # Node 1 bootstraps; each other node joins through it once the one before it has mounted.
    for k in $(seq 1 "$CLUSTER_NODES"); do
        "$PICKBOX_BIN" cert create-node "node$k" --dir "$certs" >/dev/null
        mkdir -p "$cdir/node$k/mnt" "$cdir/node$k/data"
        addr=127.0.0.1:$(free_udp_port)
        local args=(mount "$cdir/node$k/mnt" --data-dir "$cdir/node$k/data" --node-id "$k" --listen "$addr"
            --certs "$certs" --propose-timeout-ms "$CLUSTER_PROPOSE_TIMEOUT_MS")
        [ -z "$seed" ] || args+=(--join "$seed")
        RUST_LOG=${RUST_LOG:-warn} "$PICKBOX_BIN" "${args[@]}" >"$cdir/node$k/log" 2>&1 &
        cluster_pids[$k]=$!
        if ! wait_mounted "${cluster_pids[$k]}" "$cdir/node$k/mnt" "$CLUSTER_MOUNT_WAIT_S"; then
            tail -n 50 "$cdir/node$k/log" >&2
            echo "pjdfstest (3-node cluster, follower): no summary (node $k did not mount)"
            return 1
        fi
        [ -n "$seed" ] || seed=$addr
    done
    f=$(follower_id "$seed")
    mnt=$cdir/node$f/mnt
    run_pjdfstest "3-node cluster, follower node $f" "$mnt" "$repo/target/pjdfstest-cluster.log" "$@" || status=$?
    "$PICKBOX_BIN" status --peer "$seed" --certs "$certs" || status=1
    for k in "${!cluster_pids[@]}"; do
        if ! alive "${cluster_pids[$k]}"; then
            echo "node $k died during pjdfstest; its log:" >&2
            tail -n 80 "$cdir/node$k/log" >&2
            status=1
        fi
    done
    [ "$status" -eq 0 ] || { echo "follower log tail:" >&2; tail -n 30 "$cdir/node$f/log" >&2; }
    for k in "${!cluster_pids[@]}"; do
        stop_node "${cluster_pids[$k]}" "$cdir/node$k/mnt"
    done
    cluster_pids=()
    return "$status"
}

for mode in "${modes[@]}"; do
    rm -f "$repo/target/pjdfstest$([ "$mode" = single ] || echo "-$mode").log"
done
for mode in "${modes[@]}"; do
    "run_$mode" "$@" || failed=1
done
exit "$failed"

#!/usr/bin/env bash
# Runs pjdfstest as root inside Pickbox mounts and fails if any test failed:
#   1. in a fresh single-node mount            -> target/pjdfstest.log
#   2. in EVERY node's mount of a fresh 3-node cluster (QUIC on loopback, free ports picked at
#      random: scripts/cluster.sh's fixed ports 8001.. may be taken by a developer's own cluster),
#      the leader's and both followers', each run in a directory of its own, all three at once
#      (PJDFSTEST_CLUSTER_RUNS=concurrent, the default: a stress of cross-node coherence too) or
#      one after the other (=sequential)  -> target/pjdfstest-cluster-node<K>.log
#      Afterwards every node must report the same applied index and state digest.
# Usage: bash scripts/pjdfstest.sh [--single|--cluster] [PATTERN...]   (default: both; patterns
#        filter test names, e.g. "rename")
# Env: PICKBOX_BIN (a prebuilt binary), PJDFSTEST_TIMEOUT_S (default 1800, per run),
#      PJDFSTEST_CLUSTER_RUNS (concurrent|sequential).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

# How long each node of the cluster may take to mount, in seconds.
CLUSTER_MOUNT_WAIT_S=60
# How long a mutation may wait for a quorum in the cluster run, in ms (a failure shows quickly).
CLUSTER_PROPOSE_TIMEOUT_MS=5000
CLUSTER_NODES=3
# How long the nodes may take to agree on applied index and digest after the runs, in seconds.
CLUSTER_CONVERGE_WAIT_S=30

modes=(single cluster)
case "${1:-}" in
    --single) modes=(single); shift ;;
    --cluster) modes=(cluster); shift ;;
esac
cluster_runs=${PJDFSTEST_CLUSTER_RUNS:-concurrent}
case "$cluster_runs" in
    concurrent|sequential) ;;
    *) die "PJDFSTEST_CLUSTER_RUNS must be concurrent or sequential, not '$cluster_runs'" ;;
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
# PIDs of pjdfstest runs in the background (each a `timeout`, which passes SIGTERM on).
suite_pids=()
cleanup() {
    local p k
    for p in "${suite_pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    stop_node "$pid" "$work/mnt"
    for k in "${!cluster_pids[@]}"; do
        stop_node "${cluster_pids[$k]}" "$work/c/n$k/m"
    done
    # Any mount left under the work dir (a node that died leaves its mount behind).
    awk -v root="$work/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# start_pjdfstest DIR LOG [PATTERN...]: starts the suite in DIR in the background; sets SUITE_PID.
start_pjdfstest() {
    local dir=$1 out=$2
    shift 2
    mkdir -p "$(dirname "$out")"
    (cd "$dir" && NO_COLOR=1 RUST_BACKTRACE=0 exec timeout "${PJDFSTEST_TIMEOUT_S:-1800}" \
        "$CARGO_BIN/pjdfstest" -c "$repo/fuse-tests/pjdfstest.toml" -p "$dir" "$@") >"$out" 2>&1 &
    SUITE_PID=$!
    suite_pids+=("$SUITE_PID")
}

# report_pjdfstest NAME LOG STATUS: prints what did not pass and the summary line of one run.
report_pjdfstest() {
    local name=$1 out=$2 status=$3
    # Strip colours in case the runner ignores NO_COLOR.
    sed -i 's/\x1b\[[0-9;]*m//g' "$out"
    awk '/ (FAILED|PASSED UNEXPECTEDLY)$/ { show = 1; print; next }
         / (ok|skipped|failed as expected)$/ { show = 0; next }
         /^Summary:/ { show = 0; next }
         show { print }' "$out"
    echo "pjdfstest ($name): $(grep '^Summary:' "$out" || echo "no summary (exit status $status)")"
    echo "full pjdfstest output ($name): $out"
    [ "$status" -ne 124 ] || echo "pjdfstest ($name) timed out" >&2
}

# run_pjdfstest NAME DIR LOG [PATTERN...]: runs the suite in DIR in the foreground and reports;
# returns pjdfstest's exit status.
run_pjdfstest() {
    local name=$1 dir=$2 out=$3 status=0
    shift 3
    log "pjdfstest $PJDFSTEST_VERSION ($name) in $dir"
    start_pjdfstest "$dir" "$out" "$@"
    wait "$SUITE_PID" || status=$?
    suite_pids=()
    report_pjdfstest "$name" "$out" "$status"
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

# `pickbox status --json` of the cluster, asked through the node at $1.
cluster_status_json() {
    "$PICKBOX_BIN" status --peer "$1" --certs "$work/c/certs" --json 2>/dev/null
}

# Prints "ID ROLE" for each member (role lower case, "unknown" for a member that did not answer).
member_roles() {
    cluster_status_json "$1" | python3 -c 'import json, sys
for r in json.load(sys.stdin):
    role = "unknown" if r.get("error") else (r.get("role") or "unknown").lower()
    print(r["node_id"], role)' 2>/dev/null
}

# Waits until every member answers with the same applied index and state digest, and none
# reports a higher committed index (as fuse-tests/cluster_harness.rs `wait_converged`); prints the
# agreement or, after $2 seconds, the last status, and fails.
wait_converged() {
    local seed=$1 secs=$2 deadline=$((SECONDS + $2)) rows verdict
    while :; do
        rows=$(cluster_status_json "$seed" || true)
        if verdict=$(printf '%s' "$rows" | python3 -c 'import json, sys
rows = json.load(sys.stdin)
ok = rows and all(not r.get("error") for r in rows)
if ok:
    applied = {r.get("applied_index") for r in rows}
    digests = {r.get("state_digest") for r in rows}
    committed = max(r.get("committed_index") or 0 for r in rows)
    ok = len(applied) == 1 and len(digests) == 1 and None not in applied | digests and committed <= min(applied)
if not ok:
    sys.exit(1)
print("all %d nodes at applied index %d, state digest %s" % (len(rows), rows[0]["applied_index"], rows[0]["state_digest"]))
' 2>/dev/null); then
            echo "cluster after pjdfstest: $verdict"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "cluster after pjdfstest: the nodes do not agree on applied index and digest within ${secs}s:" >&2
            printf '%s\n' "$rows" >&2
            return 1
        fi
        sleep 0.2
    done
}

# Node K's mountpoint is $work/c/nK/m, its data dir $work/c/nK/d, its run's directory
# $work/c/nK/m/pK: short names, because pjdfstest binds Unix sockets two temp dirs below the run's
# directory and a socket path has at most 107 bytes (longer ones fail with ENAMETOOLONG).
run_cluster() {
    local cdir=$work/c status=0 k seed="" addr role run_status
    local certs=$cdir/certs
    local -A roles=() names=()
    mkdir -p "$certs"
    "$PICKBOX_BIN" cert create-ca --dir "$certs" >/dev/null
    "$PICKBOX_BIN" cert create-node admin --dir "$certs" >/dev/null
    # Node 1 bootstraps; each other node joins through it once the one before it has mounted.
    for k in $(seq 1 "$CLUSTER_NODES"); do
        "$PICKBOX_BIN" cert create-node "node$k" --dir "$certs" >/dev/null
        mkdir -p "$cdir/n$k/m" "$cdir/n$k/d"
        addr=127.0.0.1:$(free_udp_port)
        local args=(mount "$cdir/n$k/m" --data-dir "$cdir/n$k/d" --node-id "$k" --listen "$addr"
            --certs "$certs" --propose-timeout-ms "$CLUSTER_PROPOSE_TIMEOUT_MS")
        [ -z "$seed" ] || args+=(--join "$seed")
        RUST_LOG=${RUST_LOG:-warn} "$PICKBOX_BIN" "${args[@]}" >"$cdir/n$k/log" 2>&1 &
        cluster_pids[$k]=$!
        if ! wait_mounted "${cluster_pids[$k]}" "$cdir/n$k/m" "$CLUSTER_MOUNT_WAIT_S"; then
            tail -n 50 "$cdir/n$k/log" >&2
            echo "pjdfstest (3-node cluster): no summary (node $k did not mount)"
            return 1
        fi
        [ -n "$seed" ] || seed=$addr
    done
    while read -r k role; do roles[$k]=$role; done < <(member_roles "$seed" || true)
    for k in "${!cluster_pids[@]}"; do
        names[$k]="3-node cluster, node $k (${roles[$k]:-role unknown})"
        # Each run in a directory of its own, made through its own node's mount.
        mkdir -m 0755 "$cdir/n$k/m/p$k"
        rm -f "$repo/target/pjdfstest-cluster-node$k.log"
    done
    if [ "$cluster_runs" = concurrent ]; then
        log "pjdfstest $PJDFSTEST_VERSION in all $CLUSTER_NODES nodes' mounts at once"
        local -A run_pids=()
        for k in "${!cluster_pids[@]}"; do
            start_pjdfstest "$cdir/n$k/m/p$k" "$repo/target/pjdfstest-cluster-node$k.log" "$@"
            run_pids[$k]=$SUITE_PID
        done
        for k in "${!cluster_pids[@]}"; do
            run_status=0
            wait "${run_pids[$k]}" || run_status=$?
            report_pjdfstest "${names[$k]}" "$repo/target/pjdfstest-cluster-node$k.log" "$run_status"
            [ "$run_status" -eq 0 ] || status=$run_status
        done
        suite_pids=()
    else
        for k in "${!cluster_pids[@]}"; do
            run_pjdfstest "${names[$k]}" "$cdir/n$k/m/p$k" \
                "$repo/target/pjdfstest-cluster-node$k.log" "$@" || status=$?
        done
    fi
    for k in "${!cluster_pids[@]}"; do
        if ! alive "${cluster_pids[$k]}"; then
            echo "node $k died during pjdfstest; its log:" >&2
            tail -n 80 "$cdir/n$k/log" >&2
            status=1
        fi
    done
    wait_converged "$seed" "$CLUSTER_CONVERGE_WAIT_S" || status=1
    "$PICKBOX_BIN" status --peer "$seed" --certs "$certs" || status=1
    if [ "$status" -ne 0 ]; then
        for k in "${!cluster_pids[@]}"; do
            echo "node $k log tail:" >&2
            tail -n 30 "$cdir/n$k/log" >&2
        done
    fi
    for k in "${!cluster_pids[@]}"; do
        stop_node "${cluster_pids[$k]}" "$cdir/n$k/m"
    done
    cluster_pids=()
    return "$status"
}

rm -f "$repo/target/pjdfstest-cluster.log"
for mode in "${modes[@]}"; do
    "run_$mode" "$@" || failed=1
done
exit "$failed"

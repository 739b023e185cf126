#!/usr/bin/env bash
# Cluster benchmark by hand (not in CI): a 3-node cluster on loopback (scripts/cluster.sh, data on
# disk under BENCH_DIR, fsync honoured) against bindfs over a directory on the same disk, measured
# in the same run. Runs the single-node workloads on node BENCH_NODE's mount (default 1, the node
# that bootstrapped and is normally the leader; set 2 to measure through a follower), then the
# cross-node visibility latencies from that node to the next one, and prints idle RSS per node.
# BENCH_POLL_PAUSE_US: pause between two checks of a visibility poll (default 100; 0 = busy poll,
# which keeps one of a 2-core host's cores spinning beside the three nodes). BENCH_ROUNDS: as in
# bench.sh (the workloads, not the visibility measurement, which takes 200 samples).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

need_root "the benchmark (mounts, drop_caches)"
need_dev_fuse
ensure_packages fuse3 bindfs python3

node=${BENCH_NODE:-1}
other=$(( node % 3 + 1 ))
tarball=$(bench_tarball)

work=${BENCH_DIR:-$repo/bench-out}/cluster.$$
mkdir -p "$work/bindfs-src" "$work/bindfs-mnt"
export PICKBOX_CLUSTER_DIR=$work/cluster
cleanup() {
    bash scripts/cluster.sh down || true
    stop_node "${BINDFS_PID:-}" "$work/bindfs-mnt"
    rm -rf "$work"
}
trap cleanup EXIT

RUST_LOG=${RUST_LOG:-warn} bash scripts/cluster.sh up 3
start_bindfs "$work"

pids=$(cat "$PICKBOX_CLUSTER_DIR"/node{1,2,3}/pid | paste -sd,)
pid=$(cat "$PICKBOX_CLUSTER_DIR/node$node/pid")
log "3-node cluster (workloads on node $node, visibility node $node -> node $other) vs bindfs on $(df --output=source "$work" | tail -n 1)"
python3 scripts/bench.py --rounds "${BENCH_ROUNDS:-1}" --pickbox "$PICKBOX_CLUSTER_DIR/node$node/mnt" --bindfs "$work/bindfs-mnt" --raw-dir "$work/bindfs-src" \
    --pid "$pid" --pids "$pids" --tarball "$tarball" --other "$PICKBOX_CLUSTER_DIR/node$other/mnt" \
    --poll-pause-us "${BENCH_POLL_PAUSE_US:-100}"
bash scripts/cluster.sh status || true

#!/usr/bin/env bash
# Builds Pickbox and runs one node without peers in the foreground, its mount at
# .cluster/single/mnt and its data in .cluster/single/data (apart from the nodes of
# scripts/cluster.sh). Ctrl-C (SIGINT) unmounts and stops it; so does `umount` of the
# mountpoint from another shell. Needs root for the FUSE mount.
# Env: PICKBOX_PROFILE=release|debug (default release), RUST_LOG (default info).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

need_root "mounting Pickbox"
need_dev_fuse
ensure_packages fuse3

profile=${PICKBOX_PROFILE:-release}
case "$profile" in
    release) cargo build --release --bin pickbox; bin=$repo/target/release/pickbox ;;
    debug) cargo build --bin pickbox; bin=$repo/target/debug/pickbox ;;
    *) die "PICKBOX_PROFILE must be release or debug, not $profile" ;;
esac

node=${PICKBOX_CLUSTER_DIR:-$repo/.cluster}/single
mkdir -p "$node/mnt" "$node/data"
# The node handles SIGINT/SIGTERM itself (unmounts, exits 0); this only detaches a mount left by a crash.
trap 'stop_node "" "$node/mnt"' EXIT

log "mounting at $node/mnt (data in $node/data); Ctrl-C to stop"
"$bin" mount "$node/mnt" --data-dir "$node/data" --node-id 1

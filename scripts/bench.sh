#!/usr/bin/env bash
# Benchmark by hand (not in CI): the same workloads against a Pickbox mount and, in the same run,
# a bindfs mount (--multithreaded -o big_writes) of a directory on the same disk as Pickbox's data,
# the ceiling for a FUSE filesystem on that medium. Prints op, pickbox, bindfs, ratio and RSS.
# Env: PICKBOX_PROFILE=release|debug (default release), PICKBOX_BIN (a prebuilt binary instead, for
# A/B runs), BENCH_DIR (default bench-out/ in the repo), BENCH_ROUNDS (default 1: run the
# workloads that many times, interleaved, and print medians and the range of the ratios; this
# host's speed drifts 2-3x within minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

need_root "the benchmark (mounts, drop_caches)"
need_dev_fuse
ensure_packages fuse3 bindfs python3

profile=${PICKBOX_PROFILE:-release}
if [ -n "${PICKBOX_BIN:-}" ]; then
    profile="binary $PICKBOX_BIN"
    bin=$PICKBOX_BIN
else case "$profile" in
    release) cargo build --quiet --release --bin pickbox; bin=$repo/target/release/pickbox ;;
    debug) cargo build --quiet --bin pickbox; bin=$repo/target/debug/pickbox ;;
    *) die "PICKBOX_PROFILE must be release or debug, not $profile" ;;
esac; fi

tarball=$(bench_tarball)

# Both data directories on the same disk: under BENCH_DIR.
work=${BENCH_DIR:-$repo/bench-out}/run.$$
mkdir -p "$work/pickbox-mnt" "$work/pickbox-data" "$work/bindfs-src" "$work/bindfs-mnt"
pid=""
cleanup() {
    stop_node "$pid" "$work/pickbox-mnt"
    stop_node "${BINDFS_PID:-}" "$work/bindfs-mnt"
    rm -rf "$work"
}
trap cleanup EXIT

RUST_LOG=${RUST_LOG:-warn} "$bin" mount "$work/pickbox-mnt" --data-dir "$work/pickbox-data" \
    >"$work/pickbox.log" 2>&1 &
pid=$!
wait_mounted "$pid" "$work/pickbox-mnt" 30 || { tail -n 30 "$work/pickbox.log" >&2; die "pickbox did not mount"; }

start_bindfs "$work"

log "pickbox ($profile, pid $pid) vs bindfs (pid $BINDFS_PID) on $(df --output=source "$work" | tail -n 1); tarball $(basename "$tarball") ($(tar -tzf "$tarball" | wc -l) entries)"
python3 scripts/bench.py --rounds "${BENCH_ROUNDS:-1}" --pickbox "$work/pickbox-mnt" --bindfs "$work/bindfs-mnt" --raw-dir "$work/bindfs-src" --pid "$pid" --tarball "$tarball"
alive "$pid" || { tail -n 30 "$work/pickbox.log" >&2; die "pickbox died during the benchmark"; }
echo "pickbox data dir after the run: $(du -sh "$work/pickbox-data" | cut -f1)"

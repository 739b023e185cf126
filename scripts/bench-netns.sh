#!/usr/bin/env bash
# Replication over a real network path, by hand (not in CI): a 3-node cluster whose nodes each
# live in a network namespace of their own, joined by veth pairs into a bridge (as separate
# hosts on one switch), so the transport uses its non-loopback settings (segmentation offload,
# MTU discovery on the link's MTU) instead of the loopback ones that scripts/bench-cluster.sh
# exercises. Writes BENCH_FILES (default 2) files of 256 MiB in a row on node 1 (dd + fsync) and
# prints MB/s per file, the CPU each node spent, and, measured in the same run, a raw 256 MiB
# write + fdatasync to the same disk as the baseline.
# BENCH_MTU: the links' MTU (default 1500; 9000 for jumbo frames). BENCH_LOSS: the share (in %)
# of the UDP datagrams every node drops, at random (an nftables rule in its namespace; default 0,
# needs `nft`). PICKBOX_BIN: a prebuilt
# binary (default: the release build, built if needed). BENCH_DIR: where data goes.
# Nothing is added to the root namespace; every namespace, node and mount goes at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

need_root "the benchmark (namespaces, mounts)"
need_dev_fuse
ensure_packages fuse3 iproute2 util-linux

mtu=${BENCH_MTU:-1500}
loss=${BENCH_LOSS:-0}
[[ "$loss" =~ ^[0-9]+$ ]] && [ "$loss" -lt 100 ] || die "BENCH_LOSS=$loss is not a percentage below 100"
[ "$loss" -eq 0 ] || ensure_packages nftables
files=${BENCH_FILES:-2}
bin=${PICKBOX_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --bin pickbox >&2
    bin=$repo/target/release/pickbox
fi
[ -x "$bin" ] || die "$bin is not an executable"

work=${BENCH_DIR:-$repo/bench-out}/netns.$$
tag="pbxb$$"
subnet=10.213.11
pids=()
cleanup() {
    local k
    for k in 1 2 3; do
        stop_node "${pids[$((k - 1))]:-}" "$work/node$k/mnt"
    done
    for k in 1 2 3 br; do
        ip netns del "$tag-$k" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/certs" "$work/raw"
"$bin" cert create-ca --dir "$work/certs" >/dev/null
for name in node1 node2 node3 admin; do
    "$bin" cert create-node "$name" --dir "$work/certs" >/dev/null
done

ip netns add "$tag-br"
ip -n "$tag-br" link set lo up
ip -n "$tag-br" link add br0 type bridge
ip -n "$tag-br" link set br0 mtu "$mtu" up
for k in 1 2 3; do
    ip netns add "$tag-$k"
    ip -n "$tag-$k" link set lo up
    ip -n "$tag-br" link add "p$k" mtu "$mtu" type veth peer name eth0 mtu "$mtu" netns "$tag-$k"
    ip -n "$tag-br" link set "p$k" master br0 up
    ip -n "$tag-$k" addr add "$subnet.$k/24" dev eth0
    ip -n "$tag-$k" link set eth0 up
    if [ "$loss" -gt 0 ]; then
        ip netns exec "$tag-$k" nft "add table inet loss"
        ip netns exec "$tag-$k" nft "add chain inet loss out { type filter hook output priority 0; policy accept; }"
        ip netns exec "$tag-$k" nft "add rule inet loss out meta l4proto udp numgen random mod 100 < $loss drop"
    fi
done

for k in 1 2 3; do
    d=$work/node$k
    mkdir -p "$d/mnt" "$d/data"
    args=(mount "$d/mnt" --data-dir "$d/data" --node-id "$k" --listen "$subnet.$k:8000" --certs "$work/certs")
    [ "$k" -eq 1 ] || args+=(--join "$subnet.1:8000")
    # Only the network namespace changes (nsenter --net): the mount stays visible here.
    RUST_LOG=${RUST_LOG:-warn} nsenter --net="/run/netns/$tag-$k" setsid "$bin" "${args[@]}" </dev/null >"$d/log" 2>&1 &
    pids+=($!)
    wait_mounted "${pids[$((k - 1))]}" "$d/mnt" 60 || { tail -n 20 "$d/log" >&2; die "node $k did not mount"; }
done
log "3 nodes in network namespaces, links of MTU $mtu, $loss% of the datagrams dropped, data under $work ($(df --output=source "$work" | tail -n 1))"

src=$work/src
head -c $((256 << 20)) /dev/urandom >"$src"
# MB/s of a 256 MiB copy + fsync to $1 (from dd's byte count and seconds: its own rate has units).
# A failed copy ends the run with dd's error and the end of every node's log.
mbps() {
    local out k
    if ! out=$(dd if="$src" of="$1" bs=1M conv=fsync 2>&1); then
        printf '%s\n' "$out" >&2
        for k in 1 2 3; do
            printf '==> the end of node %s log:\n' "$k" >&2
            tail -n 5 "$work/node$k/log" >&2
        done
        die "writing $1 failed"
    fi
    tail -n 1 <<<"$out" | awk '{printf "%.0f", $1 / $(NF-3) / 1e6}'
}
cpu() { local p; for p in "${pids[@]}"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done; }

raw=$(mbps "$work/raw/file")
rm -f "$work/raw/file"
before=$(cpu)
out=""
for i in $(seq "$files"); do
    out="$out $(mbps "$work/node1/mnt/file$i")"
done
after=$(cpu)
ticks=$(getconf CLK_TCK)
printf 'seq write 256M+fsync on node 1 (MB/s per file):%s\n' "$out"
printf 'raw seq write 256M+fdatasync to the same disk:  %s MB/s (the baseline, same run)\n' "$raw"
python3 - "$before" "$after" "$ticks" "$files" <<'EOF'
import sys
a, b = [list(map(int, s.split())) for s in sys.argv[1:3]]
ticks, files = int(sys.argv[3]), int(sys.argv[4])
print("node CPU per 256 MiB written (s): " + ", ".join(f"node {k + 1} {(y - x) / ticks / files:.2f}" for k, (x, y) in enumerate(zip(a, b))))
EOF

#!/usr/bin/env bash
# THE test command: installs what the tests need, runs every cargo test target (unit and property
# tests, the openraft storage suite, fuse-tests against real mounts and 3-node clusters), then
# pjdfstest in a single-node mount and in every node's mount of a 3-node cluster.
# Needs root and /dev/fuse. Exits non-zero if anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

need_root "the test suite"
need_dev_fuse
# fuse3: the umount/fusermount3 tools; attr/acl: getfattr/setfacl; libacl1-dev: pjdfstest's build;
# iproute2: `ip netns`, veth and bridge for the network-partition tests (fuse-tests/partition.rs);
# nftables: `nft`, the random datagram loss of the lossy-link test there;
# git, make: the everyday-tools test (fuse-tests/tools.rs; it compiles with the cc Rust needs).
ensure_packages fuse3 attr acl libacl1-dev iproute2 nftables git make
ensure_pjdfstest
ensure_test_users

mkdir -p target
cargo_log=$repo/target/cargo-test.log
rm -f "$repo/target/pjdfstest.log" "$repo"/target/pjdfstest-cluster*.log
failed=0

log "cargo test --all-targets --features failpoints --no-fail-fast"
started=$SECONDS
set +e
timeout "${CARGO_TEST_TIMEOUT_S:-2700}" cargo test --all-targets --features failpoints --no-fail-fast 2>&1 | tee "$cargo_log"
cargo_status=${PIPESTATUS[0]}
set -e
[ "$cargo_status" -eq 0 ] || { echo "cargo test failed (exit status $cargo_status)"; failed=1; }
cargo_secs=$((SECONDS - started))

log "pjdfstest (single node, then every node of a 3-node cluster)"
started=$SECONDS
set +e
bash scripts/pjdfstest.sh
pjd_status=$?
set -e
pjd_secs=$((SECONDS - started))
[ "$pjd_status" -eq 0 ] || { echo "pjdfstest failed (exit status $pjd_status)"; failed=1; }

# One closing line over both runners.
read -r cargo_passed cargo_failed cargo_ignored < <(
    sed 's/\x1b\[[0-9;]*m//g' "$cargo_log" |
        awk '/^test result:/ { for (i = 1; i <= NF; i++) {
                 if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1);
                 if ($(i) ~ /^ignored/) s += $(i-1) } }
             END { print p + 0, f + 0, s + 0 }')
# pjdfstest's "Summary: F failed, S skipped, P passed" of one run's log, as "F S P".
pjd_summary() {
    awk '/^Summary:/ { print $2, $4, $6; found = 1 } END { if (!found) print 0, 0, 0 }' "$1" 2>/dev/null ||
        echo "0 0 0"
}
echo
echo "cargo test: $cargo_passed passed, $cargo_failed failed, $cargo_ignored ignored (exit status $cargo_status)"
total_passed=$cargo_passed total_failed=$cargo_failed total_skipped=$cargo_ignored
# The single-node run, then one run per cluster node (scripts/pjdfstest.sh names the logs).
for pjd_log in "$repo/target/pjdfstest.log" "$repo"/target/pjdfstest-cluster-node*.log; do
    [ -e "$pjd_log" ] || continue
    case "$pjd_log" in
        */pjdfstest.log) what="single node" ;;
        *) k=${pjd_log##*-node}; what="3-node cluster, node ${k%.log}" ;;
    esac
    read -r f s p < <(pjd_summary "$pjd_log")
    echo "pjdfstest ($what): $p passed, $f failed, $s skipped"
    total_passed=$((total_passed + p)) total_failed=$((total_failed + f)) total_skipped=$((total_skipped + s))
done
echo "pjdfstest exit status: $pjd_status"
echo "time: cargo test ${cargo_secs}s, pjdfstest ${pjd_secs}s"
echo "total: $total_passed passed, $total_failed failed, $total_skipped skipped"
exit "$failed"

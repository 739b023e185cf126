#!/usr/bin/env bash
# Runs pjdfstest as root inside a fresh single-node Pickbox mount and fails if any test failed.
# Usage: bash scripts/pjdfstest.sh [PATTERN...]   (patterns filter test names, e.g. "rename")
# Env: PICKBOX_BIN (a prebuilt binary), PJDFSTEST_TIMEOUT_S (default 1800).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

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
# mktemp makes it 0700; the users pjdfstest switches to must be able to reach the mount.
chmod 0755 "$work"
mnt=$work/mnt
data=$work/data
mkdir -p "$mnt" "$data"
pid=""
cleanup() {
    stop_node "$pid" "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT

RUST_LOG=${RUST_LOG:-warn} "$PICKBOX_BIN" mount "$mnt" --data-dir "$data" >"$work/node.log" 2>&1 &
pid=$!
if ! wait_mounted "$pid" "$mnt" 30; then
    tail -n 50 "$work/node.log" >&2
    die "pickbox did not mount $mnt within 30 s"
fi
log "pjdfstest $PJDFSTEST_VERSION in $mnt (pickbox pid $pid)"

out=$repo/target/pjdfstest.log
mkdir -p "$(dirname "$out")"
set +e
(cd "$mnt" && NO_COLOR=1 RUST_BACKTRACE=0 timeout "${PJDFSTEST_TIMEOUT_S:-1800}" "$CARGO_BIN/pjdfstest" \
    -c "$repo/fuse-tests/pjdfstest.toml" -p "$mnt" "$@") >"$out" 2>&1
status=$?
set -e
# Strip colours in case the runner ignores NO_COLOR.
sed -i 's/\x1b\[[0-9;]*m//g' "$out"

# Print what did not pass, with its reasons, and the summary line.
awk '/ (FAILED|PASSED UNEXPECTEDLY)$/ { show = 1; print; next }
     / (ok|skipped|failed as expected)$/ { show = 0; next }
     /^Summary:/ { show = 0; next }
     show { print }' "$out"
grep '^Summary:' "$out" || echo "pjdfstest printed no summary (exit status $status)"
echo "full pjdfstest output: $out"

if ! alive "$pid"; then
    echo "pickbox died during pjdfstest; its log:" >&2
    tail -n 80 "$work/node.log" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    [ "$status" -eq 124 ] && echo "pjdfstest timed out" >&2
    echo "pickbox log tail:" >&2
    tail -n 30 "$work/node.log" >&2
    exit 1
fi

#!/usr/bin/env bash
# A local Pickbox cluster on loopback, one process and one mount per node.
#
#   cluster.sh up [N]   build if needed, create certificates once, start nodes 1..N (default 3):
#                       node 1 bootstraps, the others join through it; each waits for its mount
#   cluster.sh down     stop every node (SIGTERM, then SIGKILL), detach any mount left behind
#   cluster.sh kill K   SIGKILL node K (a crash: its mount stays dead until it starts again)
#   cluster.sh start K  start node K again with the same arguments and binary (it restarts from
#                       its state; a K without state joins, so `start 4` adds a fourth node)
#   cluster.sh status   `pickbox status` against the first running node (extra args passed on,
#                       e.g. --json)
#
# Node K listens on 127.0.0.1:(8000+K). Everything lives under ${PICKBOX_CLUSTER_DIR:-.cluster}:
# certs/ (CA, node<K>, admin), nodeK/{data,mnt,log,pid}. Needs root (FUSE mounts).
# Env: PICKBOX_PROFILE=release|debug (default release); RUST_LOG (default info); any other
# PICKBOX_* option (e.g. PICKBOX_SNAPSHOT_ENTRIES, PICKBOX_PROPOSE_TIMEOUT_MS) reaches every node.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
source scripts/lib.sh

BASE_PORT=8000
# A node may take this long to mount (catch-up by snapshot, a debug build on a busy machine).
MOUNT_WAIT_SECS=${PICKBOX_MOUNT_WAIT_SECS:-60}
# `down` waits this long for all nodes to exit after SIGTERM before it SIGKILLs them.
STOP_WAIT_SECS=20
# `kill` waits this long for a SIGKILLed node to be gone.
KILL_WAIT_SECS=10

cluster=${PICKBOX_CLUSTER_DIR:-$repo/.cluster}
certs=$cluster/certs

profile=${PICKBOX_PROFILE:-release}
case "$profile" in
    release) bin=$repo/target/release/pickbox; build_cmd=(cargo build --release --bin pickbox) ;;
    debug) bin=$repo/target/debug/pickbox; build_cmd=(cargo build --bin pickbox) ;;
    *) die "PICKBOX_PROFILE must be release or debug, not $profile" ;;
esac

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

node_dir() { echo "$cluster/node$1"; }
node_addr() { echo "127.0.0.1:$((BASE_PORT + $1))"; }

# Exits unless $1 is a node number.
check_node_id() {
    [[ "$1" =~ ^[1-9][0-9]{0,2}$ ]] && [ "$1" -le 999 ] || die "not a node number (1..999): ${1:-<missing>}"
}

# PICKBOX_BIN: run this prebuilt binary instead (A/B benchmark runs); it is never built.
if [ -n "${PICKBOX_BIN:-}" ]; then
    bin=$PICKBOX_BIN
    build_cmd=(die "PICKBOX_BIN=$PICKBOX_BIN is not an executable")
fi

# Builds the binary if it is missing or older than any source.
build() {
    if [ -n "${PICKBOX_BIN:-}" ] && [ -x "$bin" ]; then
        return 0
    fi
    if [ -x "$bin" ] && [ -z "$(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit 2>/dev/null)" ]; then
        return 0
    fi
    log "building ($profile): ${build_cmd[*]}"
    "${build_cmd[@]}"
}

# Creates the CA, node<K> for K in 1..$1, and the operator certificate "admin", where missing.
ensure_certs() {
    local n=$1 k
    mkdir -p "$certs"
    [ -e "$certs/ca.pem" ] || "$bin" cert create-ca --dir "$certs" >/dev/null
    for name in admin $(seq -f 'node%g' 1 "$n"); do
        [ -e "$certs/$name.pem" ] || "$bin" cert create-node "$name" --dir "$certs" >/dev/null
    done
}

# The PID of node $1 if it runs (checked against the process's command line, so a reused PID
# of some other process is never taken for the node).
node_pid() {
    local d pid
    d=$(node_dir "$1")
    [ -f "$d/pid" ] || return 1
    pid=$(cat "$d/pid")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--data-dir $d/data " || return 1
    echo "$pid"
}

# Whether node $1 has a store already (it restarts rather than bootstraps or joins).
has_state() { [ -e "$(node_dir "$1")/data/pickbox.redb" ]; }

# Starts node $1 in the background (its own session, so a Ctrl-C in this shell does not reach it).
start_node() {
    local k=$1 d
    d=$(node_dir "$k")
    mkdir -p "$d/data"
    # A mount left by a crash cannot be stat'ed; the node detaches it itself when it starts.
    is_mounted "$d/mnt" || mkdir -p "$d/mnt"
    local args=(mount "$d/mnt" --data-dir "$d/data" --node-id "$k" --listen "$(node_addr "$k")" --certs "$certs")
    # Every node but the first joins through node 1; a node with state ignores --join (restart).
    [ "$k" -eq 1 ] || args+=(--join "$(node_addr 1)")
    printf '=== %s start: %s %s\n' "$(date -u +%FT%TZ)" "$bin" "${args[*]}" >>"$d/log"
    setsid "$bin" "${args[@]}" </dev/null >>"$d/log" 2>&1 &
    echo $! >"$d/pid"
}

# Waits for node $1 to mount; on failure shows the end of its log and returns 1.
wait_node() {
    local k=$1 d pid
    d=$(node_dir "$k")
    pid=$(cat "$d/pid")
    if wait_mounted "$pid" "$d/mnt" "$MOUNT_WAIT_SECS"; then
        log "node $k mounted at $d/mnt"
        return 0
    fi
    if alive "$pid"; then
        printf 'error: node %s (pid %s) has not mounted %s after %ss (no quorum yet?); it is left running\n' \
            "$k" "$pid" "$d/mnt" "$MOUNT_WAIT_SECS" >&2
    else
        printf 'error: node %s exited before it mounted; the end of %s:\n' "$k" "$d/log" >&2
    fi
    tail -n 20 "$d/log" >&2
    return 1
}

# The node numbers that have a directory, in order.
known_nodes() {
    local d
    for d in "$cluster"/node*; do
        [ -d "$d" ] || continue
        d=${d##*/node}
        [[ "$d" =~ ^[0-9]+$ ]] && echo "$d"
    done | sort -n
}

summary() {
    local k d pid
    log "cluster under $cluster"
    printf '%-5s %-8s %-16s %s\n' NODE PID ADDRESS MOUNT
    for k in $(known_nodes); do
        d=$(node_dir "$k")
        pid=$(node_pid "$k") || pid=stopped
        printf '%-5s %-8s %-16s %s\n' "$k" "$pid" "$(node_addr "$k")" "$d/mnt"
    done
    cat <<EOF

logs:    $cluster/node<K>/log       data: $cluster/node<K>/data
certs:   $certs (CA, node<K>, admin)
status:  bash scripts/cluster.sh status
         $bin status --peer $(node_addr 1) --certs $certs
stop:    bash scripts/cluster.sh down
EOF
}

cmd_up() {
    local n=${1:-3} k pending=()
    check_node_id "$n"
    need_root "mounting Pickbox"
    need_dev_fuse
    ensure_packages fuse3
    build
    ensure_certs "$n"
    for k in $(seq 1 "$n"); do
        if pid=$(node_pid "$k"); then
            log "node $k runs already (pid $pid)"
            continue
        fi
        if has_state "$k"; then
            # A restarting node may need its peers to find a quorum: start them all, wait later.
            log "restarting node $k"
            start_node "$k"
            pending+=("$k")
        else
            # A new node joins (or node 1 bootstraps) once every node before it is up.
            for p in "${pending[@]}"; do wait_node "$p" || exit 1; done
            pending=()
            log "starting node $k ($([ "$k" -eq 1 ] && echo bootstrap || echo "join via $(node_addr 1)"))"
            start_node "$k"
            wait_node "$k" || exit 1
        fi
    done
    for p in "${pending[@]}"; do wait_node "$p" || exit 1; done
    summary
}

# Detaches every node mount under the cluster dir (dead ones too: "Transport endpoint is not
# connected"); scripts/run.sh's single node (.cluster/single) is not ours.
unmount_leftovers() {
    local m
    awk -v root="$cluster/node" 'index($5, root) == 1 && substr($5, length(root) + 1) ~ /^[0-9]+\/mnt$/ { print $5 }' \
        /proc/self/mountinfo | while read -r m; do
        log "detaching leftover mount $m"
        # No node of ours serves it any more: a killed one may still be stuck on it.
        abort_fuse "$m"
        umount -l "$m" 2>/dev/null || true
    done
}

cmd_down() {
    local k pid pids=()
    local -A mnts=()
    for k in $(known_nodes); do
        if pid=$(node_pid "$k"); then
            log "stopping node $k (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            mnts[$pid]=$(node_dir "$k")/mnt
        fi
    done
    local deadline=$((SECONDS + STOP_WAIT_SECS))
    for pid in "${pids[@]}"; do
        while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    done
    for pid in "${pids[@]}"; do
        if alive "$pid"; then
            log "pid $pid still runs ${STOP_WAIT_SECS}s after SIGTERM: SIGKILL"
            kill_node "$pid" "${mnts[$pid]}" "$KILL_WAIT_SECS" || log "pid $pid still runs after SIGKILL"
        fi
    done
    for k in $(known_nodes); do rm -f "$(node_dir "$k")/pid"; done
    unmount_leftovers
    log "cluster stopped (state kept in $cluster; remove it for a fresh cluster)"
}

cmd_kill() {
    local k=${1:-} pid
    check_node_id "$k"
    pid=$(node_pid "$k") || die "node $k is not running"
    kill_node "$pid" "$(node_dir "$k")/mnt" "$KILL_WAIT_SECS" || die "node $k (pid $pid) still runs after SIGKILL"
    log "killed node $k (pid $pid); its mount $(node_dir "$k")/mnt is dead until: cluster.sh start $k"
}

cmd_start() {
    local k=${1:-} pid
    check_node_id "$k"
    if pid=$(node_pid "$k"); then
        die "node $k runs already (pid $pid)"
    fi
    need_root "mounting Pickbox"
    need_dev_fuse
    [ -d "$certs" ] || die "no cluster under $cluster: run cluster.sh up first"
    # No rebuild here: the node restarts with the binary the running nodes use.
    [ -x "$bin" ] || die "$bin is missing: run cluster.sh up first"
    ensure_certs "$k"
    log "starting node $k ($(has_state "$k" && echo restart || echo "join via $(node_addr 1)"))"
    start_node "$k"
    wait_node "$k"
}

cmd_status() {
    local k peer=
    for k in $(known_nodes); do
        if node_pid "$k" >/dev/null; then
            peer=$(node_addr "$k")
            break
        fi
    done
    [ -n "$peer" ] || die "no node is running under $cluster"
    [ -x "$bin" ] || die "$bin is missing: run cluster.sh up"
    "$bin" status --peer "$peer" --certs "$certs" "$@"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    kill) cmd_kill "${2:-}" ;;
    start) cmd_start "${2:-}" ;;
    status) shift; cmd_status "$@" ;;
    *) usage ;;
esac

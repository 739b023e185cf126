# Shared helpers for the scripts in this directory (sourced, not run).
# Every install a test or benchmark needs happens here, because CI starts on a fresh machine.

PJDFSTEST_VERSION=0.2.2
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "$1 needs root (FUSE mounts, device nodes, other users); run it as root"
}

need_dev_fuse() {
    [ -e /dev/fuse ] || die "/dev/fuse is missing: load the fuse module (modprobe fuse) or pass --device /dev/fuse"
}

# Installs the Debian packages not yet installed; runs apt-get update at most once.
APT_UPDATED=0
ensure_packages() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    if [ "$APT_UPDATED" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# pjdfstest (Rust rewrite on crates.io) links libacl, hence libacl1-dev.
ensure_pjdfstest() {
    ensure_packages libacl1-dev acl
    if cargo install --list 2>/dev/null | grep -q "^pjdfstest v${PJDFSTEST_VERSION}:"; then
        return 0
    fi
    log "cargo install pjdfstest ${PJDFSTEST_VERSION} (about 40 s on 2 cores)"
    cargo install --locked pjdfstest --version "$PJDFSTEST_VERSION" --quiet
}

# pjdfstest switches to these users (fuse-tests/pjdfstest.toml: nobody/nogroup and tests/tests).
ensure_test_users() {
    getent passwd nobody >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin nobody
    getent group nogroup >/dev/null || groupadd --system nogroup
    if ! getent group tests >/dev/null; then
        groupadd --system tests
    fi
    if ! getent passwd tests >/dev/null; then
        useradd --system --gid tests --no-create-home --home-dir / --shell /usr/sbin/nologin \
            --comment "Dummy user for pjdfstest" tests
    fi
}

# Whether $1 is a mountpoint right now (works for dead FUSE mounts, unlike stat).
is_mounted() {
    awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# Whether a live FUSE filesystem answers statfs at $1 (a stale mount may answer stat from cache,
# and a restarting node detaches the stale mount before it mounts, leaving the plain directory
# underneath for a moment: its statfs succeeds too, so the type is checked: FUSE_SUPER_MAGIC).
is_live_fuse() {
    [ "$(stat -f -c %t "$1" 2>/dev/null)" = 65735546 ]
}

# Waits until PID $1 has mounted $2 and it answers statfs as a FUSE filesystem; fails after $3 seconds.
wait_mounted() {
    local pid=$1 mnt=$2 secs=${3:-30}
    local deadline=$((SECONDS + secs))
    while [ "$SECONDS" -lt "$deadline" ]; do
        alive "$pid" || return 1
        if is_mounted "$mnt" && is_live_fuse "$mnt"; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# Whether PID $1 runs: any of its threads has not exited (a zombie, exited but not yet reaped,
# does not count; a killed process whose main thread is gone while another is stuck does).
alive() {
    local t state
    for t in /proc/"$1"/task/*/stat; do
        state=$(sed -E 's/.*\) (.).*/\1/' "$t" 2>/dev/null) || continue
        [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ] && return 0
    done
    return 1
}

# Aborts the FUSE connection of the mount at $1 (fusectl; mounted first if needed), read from
# mountinfo only (nothing that could wait on the mount). A killed pickbox can stay stuck in the
# kernel on its connection (a cache invalidation waiting for a lock a pending request holds);
# the abort fails the pending requests and lets it exit. Its mount guard normally does this.
abort_fuse() {
    local conn
    conn=$(awk -v m="$1" '$5 == m { split($3, d, ":"); c = d[2] } END { if (c != "") print c }' /proc/self/mountinfo)
    [ -n "$conn" ] || return 0
    [ -d "/sys/fs/fuse/connections/$conn" ] || mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null || true
    log "aborting FUSE connection $conn of $1"
    echo 1 > "/sys/fs/fuse/connections/$conn/abort" 2>/dev/null || true
}

# SIGKILLs PID $1 serving mount $2 and waits up to $3 s (default 10) for it to be gone, aborting
# its FUSE connection if it is still there after 3 s. Fails if it is still there.
kill_node() {
    local pid=$1 mnt=$2 secs=${3:-10} deadline
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 3))
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    if alive "$pid" && [ -n "$mnt" ]; then
        log "pid $pid is stuck on its FUSE connection after SIGKILL"
        abort_fuse "$mnt"
    fi
    deadline=$((SECONDS + secs))
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    ! alive "$pid"
}

# Stops PID $1 (SIGTERM, then SIGKILL after $3 s) and detaches mount $2 if it is still there.
stop_node() {
    local pid=$1 mnt=$2 secs=${3:-20}
    if [ -n "$pid" ] && alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + secs))
        while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
        if alive "$pid"; then
            log "pid $pid ignored SIGTERM for ${secs}s: SIGKILL"
            kill_node "$pid" "$mnt" || log "pid $pid still runs after SIGKILL"
        fi
        wait "$pid" 2>/dev/null || true
    fi
    if [ -n "$mnt" ] && is_mounted "$mnt"; then
        umount -l "$mnt" 2>/dev/null || true
    fi
}

# Prints a crate source tarball with a few hundred files from cargo's download cache (the untar
# workload of the benchmarks); fails if there is none.
bench_tarball() {
    local f n
    for f in $(ls -S "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/*.crate 2>/dev/null); do
        n=$(tar -tzf "$f" 2>/dev/null | wc -l)
        if [ "$n" -ge 200 ] && [ "$n" -le 1500 ]; then echo "$f"; return 0; fi
    done
    die "no .crate with 200-1500 files in ~/.cargo/registry/cache (run cargo fetch)"
}

# Mounts bindfs (the benchmarks' baseline) of $1/bindfs-src at $1/bindfs-mnt in the background;
# sets BINDFS_PID. Not a subshell call: the caller must own the process to stop it.
start_bindfs() {
    local work=$1
    bindfs -f --multithreaded -o big_writes "$work/bindfs-src" "$work/bindfs-mnt" >"$work/bindfs.log" 2>&1 &
    BINDFS_PID=$!
    wait_mounted "$BINDFS_PID" "$work/bindfs-mnt" 30 || { cat "$work/bindfs.log" >&2; die "bindfs did not mount"; }
}

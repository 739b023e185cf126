#!/usr/bin/env python3
"""Runs the same workloads against two mounted directories and prints op, pickbox, bindfs, ratio.

Called by scripts/bench.sh, which mounts both and cleans up. Times are wall-clock seconds of
the whole workload; the ratio is pickbox speed as a share of bindfs speed (bindfs time / pickbox
time), so 100% means as fast as bindfs and more is faster.
"""

import argparse
import fcntl
import mmap
import os
import random
import subprocess
import sys
import time

FILES = 2000
FILE_BYTES = 4096
SEQ_BYTES = 256 * 1024 * 1024
SEQ_CHUNK = 1024 * 1024
# The row of bytes written to the disk per byte of the sequential write (not seconds).
DISK_PER_BYTE = "disk writes per byte (seq write)"
# Durable 4 KiB writes timed for the medium's sync latency.
SYNC_SAMPLES = 1000
RANDOM_WRITES = 2000


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pids):
    """CPU time (user + system) the processes have used so far, summed."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # Fields after the command name (which may hold spaces): utime and stime are the
                # 12th and 13th of them.
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / ticks


def reset_peak_rss(pid):
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")
    except OSError:
        pass


def disk_counters():
    """(read requests completed, MiB read, MiB written) summed over the whole disks (not
    partitions, loop or ram devices) in /proc/diskstats."""
    disks = {d for d in os.listdir("/sys/block") if not d.startswith(("loop", "ram", "zram"))}
    ios = read_sectors = written_sectors = 0
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 9 and fields[2] in disks:
                ios += int(fields[3])
                read_sectors += int(fields[5])
                written_sectors += int(fields[9])
    return ios, read_sectors * 512 / 2**20, written_sectors * 512 / 2**20


def disk_write_mib_s(root):
    """Raw sequential write speed of the medium under root (a plain file, fdatasync), MiB/s."""
    path = os.path.join(root, "disk-ceiling")
    chunk = os.urandom(SEQ_CHUNK)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for _ in range(SEQ_BYTES // SEQ_CHUNK):
            os.write(fd, chunk)
        os.fdatasync(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    return SEQ_BYTES / 2**20 / (time.perf_counter() - t0)


def disk_sync_latencies(root, n=SYNC_SAMPLES):
    """Seconds each of n durable 4 KiB writes takes on the medium under root: written in place
    into a preallocated file with O_DIRECT and RWF_DSYNC, as Pickbox's log writes a small
    record (buffered and fdatasync'ed where O_DIRECT is refused). Sorted."""
    path = os.path.join(root, "disk-sync")
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(4096))
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    times = []
    try:
        os.posix_fallocate(fd, 0, 4096 * n)
        os.fsync(fd)
        for i in range(n):
            t0 = time.perf_counter()
            os.pwritev(fd, [buf], 4096 * i, os.RWF_DSYNC)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return sorted(times)


def workloads(root, tarball, pid=None, round_no=0):
    """Yields (name, seconds) for every workload, run inside root/bench<round_no>."""
    base = os.path.join(root, f"bench{round_no}")
    os.mkdir(base)
    files = [os.path.join(base, f"f{i:05}") for i in range(FILES)]
    payload = os.urandom(FILE_BYTES)

    def create():
        for p in files:
            fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            os.write(fd, payload)
            os.close(fd)

    yield "create+write 4K+close x2000", timed(create)

    def stat():
        for p in files:
            os.stat(p)

    drop_caches()
    yield "stat x2000 (cold)", timed(stat)
    yield "stat x2000 (warm)", timed(stat)

    def rename():
        for p in files:
            os.rename(p, p + ".r")

    yield "rename x2000", timed(rename)

    def unlink():
        for p in files:
            os.unlink(p + ".r")

    yield "unlink x2000", timed(unlink)

    def mkdir():
        for i in range(FILES):
            os.mkdir(os.path.join(base, f"d{i:05}"))

    yield "mkdir x2000", timed(mkdir)

    lockfile = os.path.join(base, "lockfile")

    def lock_unlock():
        # Each lock change is a Raft round in Pickbox (locks hold across nodes); bindfs leaves
        # them to the kernel.
        fd = os.open(lockfile, os.O_CREAT | os.O_RDWR, 0o644)
        for _ in range(FILES):
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    yield "flock+unlock x2000", timed(lock_unlock)

    big = os.path.join(base, "seq")
    # Distinct data in every chunk (made before timing): a repeated chunk would deduplicate to a
    # few blocks and hide the cost of storing new data.
    chunks = [os.urandom(SEQ_CHUNK) for _ in range(SEQ_BYTES // SEQ_CHUNK)]
    peak = {}

    def seq_write():
        fd = os.open(big, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        for chunk in chunks:
            os.write(fd, chunk)
        os.fsync(fd)
        os.close(fd)

    who = "pickbox" if pid else "bindfs"
    if pid:
        reset_peak_rss(pid)
    written = disk_counters()[2]
    t = timed(seq_write)
    # What reached the disk while the write ran (until its fsync returned): a cluster on one
    # disk writes each byte once per node into its log and once into its state.
    per_byte = (disk_counters()[2] - written) / (SEQ_BYTES / 2**20)
    if pid:
        peak["kib"] = status_kib(pid, "VmHWM")
        print(f"  (round {round_no}: RSS peak during seq write {peak['kib'] / 1024.0:.1f} MiB)", flush=True)
    print(f"  (round {round_no}: {who} seq write: {per_byte:.1f} bytes written to the disk per byte)", flush=True)
    yield "seq write 256M+fsync", t
    yield DISK_PER_BYTE, per_byte

    def seq_read():
        fd = os.open(big, os.O_RDONLY)
        n = 0
        while True:
            b = os.read(fd, SEQ_CHUNK)
            if not b:
                break
            n += len(b)
        os.close(fd)
        assert n == SEQ_BYTES, n

    drop_caches()
    before = disk_counters()
    t = timed(seq_read)
    after = disk_counters()
    print(f"  (round {round_no}: {who} cold seq read: {after[0] - before[0]} disk reads, "
          f"{after[1] - before[1]:.0f} MiB)", flush=True)
    yield "seq read 256M (cold)", t

    rng = random.Random(42)
    block = os.urandom(4096)
    offsets = [rng.randrange(SEQ_BYTES // 4096) * 4096 for _ in range(RANDOM_WRITES)]

    def random_writes():
        fd = os.open(big, os.O_WRONLY)
        for off in offsets:
            os.pwrite(fd, block, off)
        os.fsync(fd)
        os.close(fd)

    yield "random 4K writes x2000+fsync", timed(random_writes)

    def extract():
        dest = os.path.join(base, "untar")
        os.mkdir(dest)
        subprocess.run(["tar", "-xzf", tarball, "-C", dest], check=True)
        os.sync()

    yield f"untar {os.path.basename(tarball)}", timed(extract)

    if pid:
        yield "RSS peak during seq write (MiB)", peak.get("kib", 0) / 1024.0


VISIBILITY_REPS = 200
VISIBILITY_WAIT_S = 10.0
# Pause between two checks of a visibility poll. A busy poll keeps one of this 2-core host's cores
# spinning (a check that the kernel answers from its dentry cache never sleeps), which the three
# nodes, all on this host, then lack for the apply and the invalidation being measured; a real
# reader on another host costs the cluster nothing. 0 = busy poll (--poll-pause-us 0).
POLL_PAUSE_US = 100


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def poll(cond, pause_s=0.0):
    """Seconds until cond() holds, checked every pause_s (0: busy poll)."""
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > VISIBILITY_WAIT_S:
            raise RuntimeError(f"not visible after {VISIBILITY_WAIT_S}s")
        if pause_s:
            time.sleep(pause_s)
    return time.perf_counter() - t0


def visibility(src, dst, pause_s):
    """Cross-node visibility: a change made (and returned) on mount src, polled for on mount dst.
    Yields (name, [seconds]) for create (write+close, then open+read the content), rename, unlink."""
    base = f"vis.{os.getpid()}"
    os.mkdir(os.path.join(src, base))
    poll(lambda: os.path.isdir(os.path.join(dst, base)))
    created, renamed, unlinked = [], [], []
    for i in range(VISIBILITY_REPS):
        payload = f"content {i} ".encode() * 64
        a = os.path.join(src, base, f"f{i}")
        b = os.path.join(dst, base, f"f{i}")

        def has_content():
            try:
                with open(b, "rb") as f:
                    return f.read() == payload
            except FileNotFoundError:
                return False

        fd = os.open(a, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
        created.append(poll(has_content, pause_s))

        os.rename(a, a + ".r")
        renamed.append(poll(lambda: os.path.exists(b + ".r") and not os.path.exists(b), pause_s))

        os.unlink(a + ".r")
        unlinked.append(poll(lambda: not os.path.exists(b + ".r"), pause_s))
    yield "create+write+close -> open+read", created
    yield "rename -> seen", renamed
    yield "unlink -> gone", unlinked
    yield "flock handoff (unlock -> waiter)", lock_handoffs(src, dst, base)


def in_flock(tid):
    """Whether thread tid of this process is blocked inside flock(2) (x86_64: call 73)."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split()[0] == "73"
    except (OSError, IndexError):
        return False


def lock_handoffs(src, dst, base):
    """Seconds from an unlock on mount src until a flock(LOCK_EX) blocked on mount dst returns."""
    import threading
    name = os.path.join(base, "lock")
    open(os.path.join(src, name), "wb").close()
    poll(lambda: os.path.exists(os.path.join(dst, name)))
    holder = os.open(os.path.join(src, name), os.O_RDONLY)
    waiter = os.open(os.path.join(dst, name), os.O_RDONLY)
    out = []
    for _ in range(VISIBILITY_REPS // 2):
        fcntl.flock(holder, fcntl.LOCK_EX)
        got = {}

        def wait():
            got["tid"] = threading.get_native_id()
            fcntl.flock(waiter, fcntl.LOCK_EX)
            got["at"] = time.perf_counter()

        t = threading.Thread(target=wait)
        t.start()
        poll(lambda: "tid" in got and in_flock(got["tid"]), 0.0005)
        start = time.perf_counter()
        fcntl.flock(holder, fcntl.LOCK_UN)
        t.join()
        out.append(got["at"] - start)
        fcntl.flock(waiter, fcntl.LOCK_UN)
    os.close(holder)
    os.close(waiter)
    return out


def meminfo_gib(field):
    """A /proc/meminfo field in GiB (0 if absent)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pickbox", required=True)
    ap.add_argument("--bindfs", required=True)
    ap.add_argument("--pid", type=int, required=True, help="pickbox PID for RSS figures")
    ap.add_argument("--tarball", required=True)
    ap.add_argument("--other", help="a second node's mount of the same cluster: measure visibility")
    ap.add_argument("--poll-pause-us", type=int, default=POLL_PAUSE_US,
                    help="pause between checks of a visibility poll (0: busy poll)")
    ap.add_argument("--raw-dir", help="a plain directory on the same disk, for the disk's own speed")
    ap.add_argument("--pids", default="", help="comma-separated PIDs of every node, for idle RSS")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every workload this many times (interleaved, fresh files each round) "
                         "and print medians, with the range of the per-round ratios")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    for pid in [int(p) for p in args.pids.split(",") if p]:
        print(f"RSS idle of pid {pid}: {status_kib(pid, 'VmRSS') / 1024.0:.1f} MiB")
    if args.other:
        how = f"checked every {args.poll_pause_us} us" if args.poll_pause_us else "busy poll"
        print(f"{'visibility (node A -> node B)':36} {'p50 ms':>10} {'p99 ms':>10}   ({how})")
        for name, xs in visibility(args.pickbox, args.other, args.poll_pause_us / 1e6):
            print(f"{name:36} {1000 * percentile(xs, 0.5):10.3f} {1000 * percentile(xs, 0.99):10.3f}")

    idle_mib = status_kib(args.pid, "VmRSS") / 1024.0
    # On a VM that gives freed memory back to its host (virtio balloon free page reporting), the
    # first write into memory the guest has not touched since is several times slower (a
    # buffered write into fresh pages: ~335 MB/s against ~5 GB/s into reused ones). A run that
    # starts with little page cache and much free memory (after a drop_caches, like the cold
    # reads below) is slower for that reason alone, pickbox (which writes each byte several
    # times) more than bindfs.
    print(f"{'host memory: free / page cache':36} {meminfo_gib('MemFree'):9.1f} / "
          f"{meminfo_gib('Cached'):.1f} GiB (much free and little cache means fresh memory: a slower run)")
    disk = disk_write_mib_s(args.raw_dir or args.bindfs)
    print(f"{'disk: raw seq write 256M+fdatasync':36} {disk:9.0f} MiB/s (the medium's ceiling, same run)")
    syncs = disk_sync_latencies(args.raw_dir or args.bindfs)
    sync_p50 = percentile(syncs, 0.5)
    print(f"{'disk: durable 4K write p50 / p99 ms':36} {1000 * sync_p50:9.3f} / {1000 * percentile(syncs, 0.99):.3f}"
          " (O_DIRECT + RWF_DSYNC, as the log writes a small entry)")
    # rows[name][which] = one value per round ("cpu": the nodes' CPU seconds in pickbox's run)
    rows = {}
    order = []
    node_pids = [int(p) for p in args.pids.split(",") if p] or [args.pid]
    for round_no in range(args.rounds):
        # Interleaved: each workload runs on bindfs, then at once on pickbox, so both meet the disk
        # in the same state (its speed drifts by 2-3x over minutes on this kind of machine).
        runs = [("bindfs", workloads(args.bindfs, args.tarball, None, round_no)),
                ("pickbox", workloads(args.pickbox, args.tarball, args.pid, round_no))]
        while runs:
            for which, gen in list(runs):
                cpu_before = cpu_seconds(node_pids)
                try:
                    name, seconds = next(gen)
                except StopIteration:
                    runs.remove((which, gen))
                    continue
                rows.setdefault(name, {}).setdefault(which, []).append(seconds)
                if which == "pickbox":
                    rows[name].setdefault("cpu", []).append(cpu_seconds(node_pids) - cpu_before)
                if name not in order:
                    order.append(name)

    many = args.rounds > 1
    what = f"median of {args.rounds} rounds" if many else "one round"
    spread = f" {'ratio range':>13}" if many else ""
    print(f"{'op (' + what + ')':36} {'pickbox':>10} {'bindfs':>10} {'ratio':>8}{spread} {'node CPU':>9}")
    for name in order:
        r = rows[name]
        ps, bs = r.get("pickbox", []), r.get("bindfs", [])
        p, b = (percentile(ps, 0.5) if ps else None), (percentile(bs, 0.5) if bs else None)
        if name == DISK_PER_BYTE:
            # The medium's raw speed shared by that many writes of each byte: what it allows.
            print(f"{name:36} {p:9.1f}x {b:9.1f}x {'-':>8}")
            print(f"{'  (disk ceiling for pickbox MiB/s)':36} {disk / p if p else float('inf'):10.0f}")
            continue
        if name.startswith("RSS"):
            most = f" {'max ' + format(max(ps), '.1f'):>13}" if many else ""
            print(f"{name:36} {p:10.1f} {'-':>10} {'-':>8}{most}")
            continue
        # The ratio of each round (same disk state), and their median.
        ratios = sorted(100.0 * bi / pi for pi, bi in zip(ps, bs) if pi and bi)
        ratio = f"{percentile(ratios, 0.5):7.0f}%" if ratios else "-"
        rng = f" {ratios[0]:5.0f}-{ratios[-1]:.0f}%" if many and ratios else ""
        cpu = r.get("cpu", [])
        cpu_col = f" {percentile(cpu, 0.5):8.3f}s" if cpu else ""
        print(f"{name:36} {p:9.3f}s {b:9.3f}s {ratio:>8}{rng:>14}{cpu_col}")
        if name.startswith("create+write"):
            print(f"{'  (pickbox creates/s)':36} {FILES / p:10.0f}")
            # One create waits for two durable log writes in a row (the CREATE, and the WRITE
            # the kernel sends at close: each is answered only once durable, and the program
            # sends the second only after the first was answered), on top of the FUSE round
            # trips bindfs pays too (its time per create); what Pickbox's own code costs adds
            # to that.
            floor = 2 * sync_p50 * FILES + (b or 0)
            ceiling = FILES / floor
            share = f" = {100 * b / floor:.0f}% of bindfs" if b else ""
            print(f"{'  (ceiling: 2 durable writes + bindfs)':36} {ceiling:10.0f} creates/s{share}")
        if name.startswith("seq write") or name.startswith("seq read"):
            print(f"{'  (pickbox MiB/s)':36} {SEQ_BYTES / 2**20 / p:10.0f}")
    print(f"{'RSS idle (MiB)':36} {idle_mib:10.1f} {'-':>10} {'-':>8}")
    print("ratio = bindfs time / pickbox time (pickbox speed as a share of bindfs speed); node CPU = "
          "user + system time of the pickbox node(s) during pickbox's run (all nodes of a cluster)")


if __name__ == "__main__":
    sys.exit(main())

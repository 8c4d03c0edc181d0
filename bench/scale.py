"""4. Scale on one node: N job namespaces live at once.  The daemon's
memory and fds, the create time of job 1 against job N, and what a mount
and unmount on the host costs while they exist: every namespace is an
rslave copy of the host's mounts, so a mount under a shared host mount
point is propagated into each of them.

The host's own propagation is never changed: the benchmark makes its own
small tmpfs, marks that one shared (as systemd marks / on most nodes),
and removes it at the end."""

import os
import subprocess
import time

from privtmpd import client

from .common import BENCH_ROOT, LogReader, log, proc_status, summary, wait_removals

PROP = f"{BENCH_ROOT}/propagation"


def _mounts_total():
    with open("/proc/self/mountinfo") as f:
        return sum(1 for _ in f)


def _mount_cycle(where, reps):
    """mount(2) + umount(2) of a small tmpfs at `where`, median ms each."""
    from privtmpd import kernel
    os.makedirs(where, exist_ok=True)
    mnt, umnt = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        kernel.mount("bench", where, "tmpfs", 0, "size=1m")
        t1 = time.perf_counter()
        kernel.umount2(where)
        t2 = time.perf_counter()
        mnt.append((t1 - t0) * 1000)
        umnt.append((t2 - t1) * 1000)
    return {"mount_ms": summary(mnt), "umount_ms": summary(umnt)}


def _setup_prop():
    os.makedirs(PROP, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "privtmpd-bench", PROP], check=True)
    subprocess.run(["mount", "--make-shared", PROP], check=True)
    os.makedirs(f"{PROP}/x", exist_ok=True)


def teardown_prop():
    with open("/proc/self/mountinfo") as f:
        mps = [ln.split()[4] for ln in f]
    for mp in sorted((m for m in mps if m == PROP or m.startswith(PROP + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


def run(opts, daemon):
    n = opts.namespaces
    reps = 30
    log(f"scale: {n} live job namespaces")
    out = {"namespaces": n}
    _setup_prop()
    try:
        out["host_mount_before"] = {"shared": _mount_cycle(f"{PROP}/x", reps),
                                    "private": _mount_cycle(f"{BENCH_ROOT}/private-mnt", reps)}
        out["daemon_before"] = proc_status(daemon.proc.pid)
        out["mounts_before"] = _mounts_total()
        reader = LogReader(daemon.log_path)
        rtt = []
        job0 = 400000
        for i in range(n):
            msg = {"op": "create", "job": str(job0 + i), "restart": "0", "uid": "65534", "gid": "65534"}
            t0 = time.perf_counter()
            r = client.request(msg, daemon.socket, timeout=60, retry=5)
            rtt.append((time.perf_counter() - t0) * 1000)
            if not r["ok"]:
                raise RuntimeError(f"create {job0 + i}: {r}")
        ops = reader.ops()
        dms = [ops["create"].get(job0 + i) for i in range(n)]
        # Medians of the first and last k: the daemon logs 0.1 ms steps, and
        # single creates on a shared machine jump by a millisecond.
        k = max(1, min(50, n // 10))
        out["create_rtt_ms"] = {"job_1": rtt[0], f"job_{n}": rtt[-1],
                                f"first_{k}": summary(rtt[:k]), f"last_{k}": summary(rtt[-k:]), "all": summary(rtt)}
        out["daemon_create_ms"] = {"job_1": dms[0], f"job_{n}": dms[-1],
                                   f"first_{k}": summary(dms[:k]), f"last_{k}": summary(dms[-k:]),
                                   "all": summary(dms)}
        out["last_over_first"] = (summary(dms[-k:])["median"] / summary(dms[:k])["median"])
        out["create_curve_ms"] = [round(x, 3) for x in dms]
        out["daemon_live"] = proc_status(daemon.proc.pid)
        out["mounts_live"] = _mounts_total()
        out["host_mount_live"] = {"shared": _mount_cycle(f"{PROP}/x", reps),
                                  "private": _mount_cycle(f"{BENCH_ROOT}/private-mnt", reps)}
        rtt_d = []
        for i in range(n):
            t0 = time.perf_counter()
            r = client.request({"op": "destroy", "job": str(job0 + i)}, daemon.socket, timeout=60, retry=5)
            rtt_d.append((time.perf_counter() - t0) * 1000)
        ops = reader.ops()
        # Destroyed in creation order: the first k with all n live, the last
        # k with at most k left.
        dds = [ops["destroy"].get(job0 + i) for i in range(n)]
        out["daemon_destroy_ms"] = {f"first_{k}": summary(dds[:k]), f"last_{k}": summary(dds[-k:]),
                                    "all": summary(dds)}
        out["destroy_rtt_ms"] = {f"first_{k}": summary(rtt_d[:k]), f"last_{k}": summary(rtt_d[-k:])}
        wait_removals(daemon)
        out["daemon_after"] = proc_status(daemon.proc.pid)
    finally:
        teardown_prop()
    s, lv = out["host_mount_before"]["shared"], out["host_mount_live"]["shared"]
    log(f"scale: daemon RSS {out['daemon_live']['rss_kb'] / 1024:.1f} MB, fds {out['daemon_live']['fds']}; "
        f"create job 1 {out['daemon_create_ms']['job_1']:.2f} ms, job {n} {out['daemon_create_ms'][f'job_{n}']:.2f} ms; "
        f"host mount+umount under a shared mount {s['mount_ms']['median'] + s['umount_ms']['median']:.2f} ms -> "
        f"{lv['mount_ms']['median'] + lv['umount_ms']['median']:.2f} ms with {n} namespaces")
    return out

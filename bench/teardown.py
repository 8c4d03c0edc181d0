"""3. Teardown of big jobs: a job leaves N files in its /tmp; how long the
Epilog takes, and how long until the space is free again, next to the
filesystem's own unlink speed (`rm -rf` of an identical tree on the same
filesystem, at the workers' priority).  Each size: ours and the reference
alternate (ABAB)."""

import os
import shutil
import subprocess
import time

from .common import BENCH_ROOT, LogReader, log, run_hook, slurm_env, summary, wait_removals

PER_DIR = 1000
WORKER_NICE = 10        # what the daemon's removal workers run at
REF_DIR = f"{BENCH_ROOT}/rm-reference"


def _mktree(tool, top, n):
    os.makedirs(top, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([tool, "mktree", top, str(n), str(PER_DIR)], check=True)
    return (time.perf_counter() - t0) * 1000


def _ours(tool, hooks, daemon, job, n):
    env = slurm_env(job)
    run_hook(hooks["prolog"], env)
    make_ms = _mktree(tool, f"{daemon.job_dir(job)}/tmp", n)
    os.sync()
    # The first process started after a job wrote many files is slower
    # whatever it does (measured: an empty python3 -IS, 5.7 ms after 10
    # files, 6.7 ms after 10 000): that first start goes to an empty hook,
    # reported as its own column, so the Epilog's column is the Epilog's.
    first = run_hook(hooks["empty-py"], env)
    # A job that wrote a million files leaves the machine slower for a
    # while (writeback, journal): every process starts later then, not
    # only the Epilog.  A second empty hook, right before the Epilog, is
    # the Epilog's reference at that moment.
    empty = run_hook(hooks["empty-py"], env)
    reader = LogReader(daemon.log_path)
    t0 = time.perf_counter()
    epilog = run_hook(hooks["epilog"], dict(env, SLURM_SCRIPT_CONTEXT="epilog_slurmd"))
    wait_removals(daemon)
    free = (time.perf_counter() - t0) * 1000
    ops = reader.ops()
    removed = [r for r in ops["remove"] if f".{job}." in r[0]]
    if not removed or removed[0][3] != "ok" or removed[0][2] < n:
        raise RuntimeError(f"job {job}: removal of {n} files not reported complete: {removed}")
    return {"epilog_ms": epilog, "empty_ms": empty, "epilog_over_empty_ms": epilog - empty,
            "free_ms": free, "worker_ms": removed[0][1],
            "daemon_destroy_ms": ops["destroy"].get(job), "make_ms": make_ms, "first_process_ms": first}


def _reference(tool, n):
    if os.path.lexists(REF_DIR):
        shutil.rmtree(REF_DIR)
    _mktree(tool, REF_DIR, n)
    os.sync()
    t0 = time.perf_counter()
    # At the removal worker's own priority (nice 10), so a busy machine
    # slows both alike.
    subprocess.run(["nice", "-n", str(WORKER_NICE), "rm", "-rf", "--one-file-system", REF_DIR], check=True)
    return (time.perf_counter() - t0) * 1000


def run(opts, tool, hooks, daemon):
    out = {}
    job = 300000
    for n in opts.sizes:
        reps = 2 if n >= 1000000 else opts.teardown_reps       # 2: one in each order
        ours, ref = [], []
        for rep in range(reps):
            job += 1
            if rep % 2 == 0:
                ours.append(_ours(tool, hooks, daemon, job, n))
                ref.append(_reference(tool, n))
            else:
                ref.append(_reference(tool, n))
                ours.append(_ours(tool, hooks, daemon, job, n))
        o = {k: summary([x[k] for x in ours]) for k in ("epilog_ms", "empty_ms", "epilog_over_empty_ms", "free_ms",
                                                       "worker_ms", "daemon_destroy_ms", "first_process_ms")}
        o["rm_rf_ms"] = summary(ref)
        o["free_over_rm_rf"] = summary([a["free_ms"] / b for a, b in zip(ours, ref)])
        o["worker_over_rm_rf"] = summary([a["worker_ms"] / b for a, b in zip(ours, ref)])
        o["reps"] = reps
        out[str(n)] = o
        log(f"teardown: {n:>8d} files: epilog {o['epilog_ms']['median']:.1f} ms, freed after "
            f"{o['free_ms']['median']:.0f} ms (worker {o['worker_ms']['median']:.0f}), rm -rf "
            f"{o['rm_rf_ms']['median']:.0f} ms")
    return out

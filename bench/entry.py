"""5. The entry helper's cost per task: slurm_spank_task_init_privileged()
of the real privtmpd_spank.so, called in a loop by bench/benchtool.c with
the SPANK API stubbed, against a namespace the daemon really pinned.
(Its cost inside Slurm, plugin loading included, is the step figure of
section 1: privtmpd's step time against bare Slurm's.)"""

import subprocess

from .common import log, summary


def run(opts, tool, so, daemon):
    job = 500000
    r = daemon.create(job)
    if not r["ok"]:
        raise RuntimeError(f"create: {r}")
    try:
        p = subprocess.run([tool, "spank", so, daemon.rundir, str(job), str(opts.entry_calls)],
                           capture_output=True, text=True, check=True)
    finally:
        daemon.destroy(job)
    ns = [int(x) for x in p.stdout.split()]
    warm = ns[10:] if len(ns) > 20 else ns
    out = {"calls": len(warm), "callback_us": summary([x / 1000 for x in warm]), "first_call_us": ns[0] / 1000}
    log(f"entry helper: p50 {out['callback_us']['median']:.1f} us, p99 {out['callback_us']['p99']:.1f} us per task")
    return out

"""privtmpd benchmark suite: `python -m bench [--quick] [--only SECTION ...]`
(as root; tools/bench.sh installs what it needs first).

Sections, all in one run on the same machine and the same local Slurm:
  slurm     per-job cost of privtmpd, job_container/tmpfs, empty hooks and
            bare Slurm: srun jobs, batch jobs, steps (interleaved rounds)
  hooks     Prolog/Epilog wall time and the daemon's create/destroy time,
            sequential and 1..64 jobs at once; the client's import costs
  teardown  Epilog time and time to free the space of jobs that left
            10 .. 1 000 000 files, against rm -rf
  scale     1 000 live job namespaces: daemon memory and fds, create time,
            host mount/unmount cost
  entry     the entry helper's cost per task

Prints a table, writes bench/results/bench-<time>.json (and latest.json)
and a chart of per-job overhead, bench/results/overhead-<time>.png (and
latest.png)."""

import argparse
import json
import os
import shutil
import sys
import time

from . import common
from .common import BENCH_ROOT, RESULTS_DIR, log

# Run in this order; teardown last: after it removed millions of files the disk
# stays busy for a while (journal, discards), which slowed the creates of the
# scale section run after it (job 1000 over job 1: 2.00x, against 1.17-1.33x).
SECTIONS = ("slurm", "hooks", "scale", "entry", "teardown")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small counts, no 1M-file job, 100 instead of 1000 namespaces (< 3 minutes)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for JSON and PNG (default %(default)s)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of Slurm configurations")
    p.add_argument("--jobs", type=int, help="sequential srun jobs per configuration and round")
    p.add_argument("--namespaces", type=int, help="live namespaces in the scale section")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   help="files left by the job in the teardown section, comma-separated")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (2 if q else 6)
    a.jobs = a.jobs or (8 if q else 20)
    a.batch = 2 if q else 5
    a.steps = 6 if q else 15
    a.hook_runs = 60 if q else 300
    a.levels = [1, 4, 16, 64] if q else [1, 2, 4, 8, 16, 32, 64]
    a.burst_reps = 1 if q else 3
    a.import_runs = 10 if q else 30
    a.sizes = a.sizes or ([10, 10000] if q else [10, 10000, 1000000])
    a.teardown_reps = 2 if q else 4
    a.namespaces = a.namespaces or (100 if q else 1000)
    a.entry_calls = 500 if q else 5000
    a.sections = a.only or list(SECTIONS)
    return a


def main(argv=None):
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (tools/bench.sh): it starts Slurm and creates namespaces", file=sys.stderr)
        return 2
    from harness import DaemonProc, clean_leftovers
    t_start = time.monotonic()
    clean_leftovers()
    os.makedirs(BENCH_ROOT, mode=0o755, exist_ok=True)
    tool, so = common.build_native(f"{BENCH_ROOT}/bin")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    res = {"when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "quick": opts.quick, "machine": common.machine_info(),
           "options": {k: v for k, v in vars(opts).items() if k not in ("only", "out")}}
    log(f"bench: sections {', '.join(opts.sections)}{' (quick)' if opts.quick else ''}")
    for section in SECTIONS:
        if section not in opts.sections:
            continue
        t0 = time.monotonic()
        daemon = DaemonProc(f"bench-{section}")
        res["machine"]["daemon_rundir"] = common.rundir_on_tmpfs(daemon.rundir)
        daemon.start()
        try:
            hooks = common.make_hooks(f"{BENCH_ROOT}/hooks-{section}", daemon.socket)
            if section == "slurm":
                from . import slurm
                res["slurm"] = slurm.run(opts, hooks, so, daemon)
            elif section == "hooks":
                from . import hooks as hooks_mod
                res["hooks"] = hooks_mod.run(opts, hooks, daemon)
            elif section == "teardown":
                from . import teardown
                res["teardown"] = teardown.run(opts, tool, hooks, daemon)
            elif section == "scale":
                from . import scale
                res["scale"] = scale.run(opts, daemon)
            elif section == "entry":
                from . import entry
                res["entry"] = entry.run(opts, tool, so, daemon)
            res.setdefault("daemon_rss_kb_end", {})[section] = common.proc_status(daemon.proc.pid)["rss_kb"]
        finally:
            daemon.cleanup()
            if section == "scale":
                from . import scale
                scale.teardown_prop()
        res.setdefault("section_seconds", {})[section] = round(time.monotonic() - t0, 1)
    res["total_seconds"] = round(time.monotonic() - t_start, 1)

    from . import report
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, f"bench-{stamp}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    shutil.copyfile(path, os.path.join(opts.out, "latest.json"))
    text = report.table(res)
    print(text)
    print(f"\nresults: {path}")
    if "slurm" in res:
        png = os.path.join(opts.out, f"overhead-{stamp}.png")
        report.chart(res, png)
        shutil.copyfile(png, os.path.join(opts.out, "latest.png"))
        print(f"chart:   {png}")
    print(f"total:   {res['total_seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in res['section_seconds'].items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

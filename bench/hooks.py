"""2. The hooks themselves, run exactly as slurmd runs them (fork+exec of
the script, Slurm's environment, no PATH), against a real daemon:
Prolog and Epilog wall time, the daemon's own create and destroy time,
sequentially (interleaved with the empty hooks: the floor) and with 1..64
jobs starting and ending at once.  Also what each import of the client
costs."""

import re
import subprocess
import threading
import time

from .common import HOOK_PYTHON, REPO, LogReader, log, run_hook, slurm_env, summary


def sequential(hooks, daemon, n, job0):
    reader = LogReader(daemon.log_path)
    walls = {"prolog": [], "epilog": [], "empty-py": [], "empty-py-exit": [], "empty-sh": []}
    for i in range(n + 5):
        job = job0 + i
        env = slurm_env(job)
        # ABAB: floor, hook, floor, hook.
        t = {"empty-py": run_hook(hooks["empty-py"], env), "prolog": run_hook(hooks["prolog"], env),
             "empty-sh": run_hook(hooks["empty-sh"], env), "empty-py-exit": run_hook(hooks["empty-py-exit"], env)}
        t["epilog"] = run_hook(hooks["epilog"], dict(env, SLURM_SCRIPT_CONTEXT="epilog_slurmd"))
        if i >= 5:                       # the first few warm the caches
            for k, v in t.items():
                walls[k].append(v)
    ops = reader.ops()
    out = {k: summary(v) for k, v in walls.items()}
    out["daemon_create"] = summary([ms for j, ms in ops["create"].items() if j >= job0 + 5])
    out["daemon_destroy"] = summary([ms for j, ms in ops["destroy"].items() if j >= job0 + 5])
    out["prolog_minus_floor"] = summary([a - b for a, b in zip(walls["prolog"], walls["empty-py"])])
    out["epilog_minus_floor"] = summary([a - b for a, b in zip(walls["epilog"], walls["empty-py"])])
    return out


def _burst(path, envs):
    """Start one hook per env at the same moment; wall ms of each."""
    walls = [None] * len(envs)
    barrier = threading.Barrier(len(envs))

    def one(i):
        barrier.wait()
        walls[i] = run_hook(path, envs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(envs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return walls, (time.perf_counter() - t0) * 1000


def concurrent(hooks, daemon, levels, reps, job0):
    out = {}
    job = job0
    for k in levels:
        pro, epi, makespan_p, makespan_e, dc, dd = [], [], [], [], [], []
        for _ in range(reps):
            reader = LogReader(daemon.log_path)
            envs = [slurm_env(job + i) for i in range(k)]
            job += k
            w, m = _burst(hooks["prolog"], envs)
            pro += w
            makespan_p.append(m)
            w, m = _burst(hooks["epilog"], [dict(e, SLURM_SCRIPT_CONTEXT="epilog_slurmd") for e in envs])
            epi += w
            makespan_e.append(m)
            ops = reader.ops()
            dc += list(ops["create"].values())
            dd += list(ops["destroy"].values())
        out[str(k)] = {"prolog": summary(pro), "epilog": summary(epi), "daemon_create": summary(dc),
                       "daemon_destroy": summary(dd), "prolog_makespan": summary(makespan_p),
                       "epilog_makespan": summary(makespan_e)}
        log(f"hooks: {k:2d} at once: prolog p50 {out[str(k)]['prolog']['median']:.1f} ms, "
            f"epilog p50 {out[str(k)]['epilog']['median']:.1f} ms, daemon create p50 "
            f"{out[str(k)]['daemon_create']['median']:.2f} ms")
    return out


_IMPORT_RE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def imports(reps):
    """What the client's imports cost: `-X importtime` of privtmpd.client
    (top-level modules it pulls in beyond the interpreter's start-up), and
    wall time of the interpreter with each candidate import."""
    setup = f"import sys; sys.path.insert(0, {REPO!r}); "
    r = subprocess.run([HOOK_PYTHON, "-IS", "-X", "importtime", "-c", setup + "import privtmpd.client"],
                       capture_output=True, text=True, check=True)
    tree, children = [], []
    # Post-order: a module's own imports are listed (one level deeper)
    # just before it.  Keep privtmpd's modules and what they import.
    for _self_us, cum_us, indent, name in _IMPORT_RE.findall(r.stderr):
        entry = {"module": name, "cumulative_us": int(cum_us)}
        if len(indent) == 3:
            children.append(entry)
        elif len(indent) == 1:
            if name.startswith("privtmpd"):
                tree += [dict(c, imported_by=name) for c in children] + [entry]
            children = []
    base = subprocess.run([HOOK_PYTHON, "-IS", "-c", "import sys; print(' '.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, check=True).stdout.split()
    after = subprocess.run([HOOK_PYTHON, "-IS", "-c", setup + "import privtmpd.client; "
                            "print(' '.join(sorted(sys.modules)))"],
                           capture_output=True, text=True, check=True).stdout.split()
    cases = {"nothing": "pass", "privtmpd.client": setup + "import privtmpd.client",
             "_socket": "import _socket", "socket": "import socket", "json": "import json",
             "json+socket": "import json, socket"}
    walls = {k: [] for k in cases}
    for i in range(reps + 3):
        for name, code in cases.items():                  # interleaved
            t0 = time.perf_counter()
            subprocess.run([HOOK_PYTHON, "-IS", "-c", code], check=True)
            if i >= 3:
                walls[name].append((time.perf_counter() - t0) * 1000)
    wall = {k: summary(v) for k, v in walls.items()}
    base_ms = wall["nothing"]["median"]
    return {"importtime": tree,
            "modules_added": sorted(set(after) - set(base)),
            "interpreter_wall_ms": wall,
            "cost_over_bare_interpreter_ms": {k: v["median"] - base_ms for k, v in wall.items()}}


def run(opts, hooks, daemon):
    log(f"hooks: {opts.hook_runs} sequential Prolog/Epilog pairs, concurrency {opts.levels}")
    out = {"sequential": sequential(hooks, daemon, opts.hook_runs, 100000)}
    s = out["sequential"]
    log(f"hooks: sequential prolog p50 {s['prolog']['median']:.1f} p99 {s['prolog']['p99']:.1f}, "
        f"epilog p50 {s['epilog']['median']:.1f} p99 {s['epilog']['p99']:.1f}, empty python "
        f"{s['empty-py']['median']:.1f} ms; daemon create {s['daemon_create']['median']:.2f}, "
        f"destroy {s['daemon_destroy']['median']:.2f} ms")
    out["concurrent"] = concurrent(hooks, daemon, opts.levels, opts.burst_reps, 200000)
    out["imports"] = imports(opts.import_runs)
    return out

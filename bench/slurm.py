"""1. Per-job overhead on a real one-node Slurm cluster, configurations
interleaved: every round runs every configuration once (the order reversed
on every other round), and overheads and ratios are computed within a
round, so a burst of noise on the machine hits one round, not one
configuration."""

import os
import pwd
import random
import re
import subprocess
import time

from .common import BENCH_ROOT, JOB_USER, LogReader, log, summary

from localcluster import LocalCluster, _which  # noqa: E402

CLUSTER_DIR = f"{BENCH_ROOT}/cluster"
JC_BASE = f"{BENCH_ROOT}/jc"

# name -> description (the table and the chart keep this order)
CONFIGS = {
    "bare": "no Prolog/Epilog",
    "sh-hooks": "empty /bin/sh Prolog+Epilog",
    "py-hooks": "empty python3 -IS Prolog+Epilog (floor)",
    "py-hooks-exit": "the same, ending with posix._exit as ours do",
    "contain": "PrologFlags=Contain, no hooks",
    "jc-tmpfs": "job_container/tmpfs (PrologFlags=Contain)",
    "privtmpd": "privtmpd (Prolog+Epilog+entry helper)",
    "privtmpd-noprolog": "privtmpd without Prolog (entry helper create=yes, Epilog)",
}


def _cluster_for(name, hooks, so, daemon):
    kw = {"workdir": CLUSTER_DIR}
    if name == "sh-hooks":
        kw.update(prolog=hooks["empty-sh"], epilog=hooks["empty-sh"])
    elif name == "py-hooks":
        kw.update(prolog=hooks["empty-py"], epilog=hooks["empty-py"])
    elif name == "py-hooks-exit":
        kw.update(prolog=hooks["empty-py-exit"], epilog=hooks["empty-py-exit"])
    elif name == "contain":
        kw.update(extra_conf="PrologFlags=Contain")
    elif name == "jc-tmpfs":
        kw.update(extra_conf="JobContainerType=job_container/tmpfs\nPrologFlags=Contain",
                  job_container_conf=f"AutoBasePath=true\nBasePath={JC_BASE}")
    elif name == "privtmpd":
        kw.update(prolog=hooks["prolog"], epilog=hooks["epilog"],
                  plugstack_lines=[f"required {so} rundir={daemon.rundir} tmpdir=/tmp"])
    elif name == "privtmpd-noprolog":
        kw.update(epilog=hooks["epilog"],
                  plugstack_lines=[f"required {so} rundir={daemon.rundir} tmpdir=/tmp create=yes"])
    return LocalCluster(**kw)


class _User:
    """Run Slurm clients as the unprivileged job user: setuid in the
    forked child (runuser's PAM session would add its own noise)."""

    def __init__(self, cluster, user):
        pw = pwd.getpwnam(user)
        self.cwd = cluster.user_dir(user)
        self.kw = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], cwd=self.cwd,
                       env=cluster.env({"HOME": pw.pw_dir, "USER": user, "LOGNAME": user}),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)

    def run(self, argv, **extra):
        kw = dict(self.kw)
        kw.update(extra)
        if "input" in kw:
            kw.pop("stdin")
        r = subprocess.run(argv, **kw)
        if r.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r


def _srun_jobs(cluster, user, n):
    """n sequential one-step jobs.  Returns (per-job latencies ms, ms per
    job including the wait for the last Epilog)."""
    srun = _which("srun")
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        user.run([srun, "-N1", "-n1", "true"])
        lat.append((time.perf_counter() - t) * 1000)
    cluster.wait_idle(timeout=60)
    total = (time.perf_counter() - t0) * 1000
    return lat, total / n


_ALLOC_RE = re.compile(r"^\[(\S+?)(?:\.(\d+))?\] sched: Allocate JobId=(\d+) ", re.M)


def _alloc_times(cluster):
    """{jobid: epoch seconds} of "sched: Allocate" lines in slurmctld's log."""
    out = {}
    with open(cluster.logfile("slurmctld"), errors="replace") as f:
        for ts, frac, job in _ALLOC_RE.findall(f.read()):
            t = time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%S"))
            out[job] = t + (int(frac) / 10 ** len(frac) if frac else 0)
    return out


def _batch_first_line(cluster, user, n, rng):
    """Submit a batch job, time until its first line runs (EPOCHREALTIME
    printed by the script, read back from its output file).

    slurmctld starts batch jobs on its scheduler's one-second tick, so
    submit->first line is mostly where in that second the job was
    submitted: submissions are spread over the second at random, and the
    part the node's configuration decides is timed too, from the
    allocation (slurmctld's log, in ms) to the first line."""
    sbatch = _which("sbatch")
    submit, alloc = [], []
    script = "#!/bin/bash\necho \"FIRST $EPOCHREALTIME\"\n"
    for _ in range(n):
        time.sleep(rng.random())
        t0 = time.time()
        r = user.run([sbatch, "--parsable", "-o", os.path.join(user.cwd, "bench-%j.out")], input=script)
        jobid = r.stdout.strip().split(";")[0]
        path = os.path.join(user.cwd, f"bench-{jobid}.out")
        deadline = time.monotonic() + 60
        stamp = None
        while stamp is None:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("FIRST "):
                            stamp = float(line.split()[1].replace(",", "."))
            except FileNotFoundError:
                pass
            if stamp is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"batch job {jobid} never ran its first line\n" + cluster.logs())
                time.sleep(0.002)
        submit.append((stamp - t0) * 1000)
        cluster.wait_job(jobid)
        cluster.wait_idle(timeout=60)
        os.unlink(path)
        a = _alloc_times(cluster).get(jobid)
        if a is None:
            raise RuntimeError(f"no 'sched: Allocate JobId={jobid}' in {cluster.logfile('slurmctld')}")
        alloc.append((stamp - a) * 1000)
    return submit, alloc


def _steps(cluster, user, k):
    """One batch job running k `srun -n1 true` steps; each step timed in
    the script (bash's EPOCHREALTIME: no extra process)."""
    sbatch = _which("sbatch")
    script = ("#!/bin/bash\nsrun -n1 true\n"            # first step: warm-up, not counted
              f"for i in $(seq {k}); do a=$EPOCHREALTIME; srun -n1 true || exit 1; "
              "b=$EPOCHREALTIME; echo \"STEP $a $b\"; done\n")
    r = user.run([sbatch, "--parsable", "-o", os.path.join(user.cwd, "bench-%j.out")], input=script)
    jobid = r.stdout.strip().split(";")[0]
    info = cluster.wait_job(jobid, timeout=300)
    path = os.path.join(user.cwd, f"bench-{jobid}.out")
    with open(path) as f:
        lines = [ln.split() for ln in f if ln.startswith("STEP ")]
    os.unlink(path)
    if info["returncode"] not in (0, None) or len(lines) != k:
        raise RuntimeError(f"steps job {jobid} failed ({info}): {len(lines)} of {k} steps")
    cluster.wait_idle(timeout=60)
    return [(float(b.replace(",", ".")) - float(a.replace(",", "."))) * 1000 for _, a, b in lines]


def run(opts, hooks, so, daemon):
    rounds, n_jobs, n_batch, n_steps = opts.rounds, opts.jobs, opts.batch, opts.steps
    names = list(CONFIGS)
    per_round = []      # [{config: {...}}]
    reader = LogReader(daemon.log_path)
    daemon_ops = {"create": [], "destroy": []}
    log(f"slurm: {rounds} rounds x {len(names)} configurations; per configuration and round: "
        f"{n_jobs} srun jobs, {n_batch} batch jobs, {n_steps} steps")
    rng = random.Random(4242)
    for rnd in range(rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        res = {}
        for name in order:
            cluster = _cluster_for(name, hooks, so, daemon)
            cluster.ensure_users()
            cluster.start()
            try:
                user = _User(cluster, JOB_USER)
                _srun_jobs(cluster, user, 2)            # warm-up
                reader.ops()
                lat, perjob = _srun_jobs(cluster, user, n_jobs)
                first, alloc = _batch_first_line(cluster, user, n_batch, rng)
                steps = _steps(cluster, user, n_steps)
                cluster.assert_not_drained()
            finally:
                cluster.stop()
            if name == "privtmpd":
                ops = reader.ops()
                daemon_ops["create"] += list(ops["create"].values())
                daemon_ops["destroy"] += list(ops["destroy"].values())
            res[name] = {"per_job_ms": perjob, "srun_latency_ms": summary(lat),
                         "batch_first_line_ms": summary(first), "batch_alloc_to_first_line_ms": summary(alloc),
                         "step_ms": summary(steps)}
            log(f"slurm round {rnd + 1}/{rounds} {name:9s} per job {perjob:6.1f} ms, srun p50 "
                f"{res[name]['srun_latency_ms']['median']:6.1f}, batch alloc->1st line "
                f"{res[name]['batch_alloc_to_first_line_ms']['median']:6.1f}, "
                f"step {res[name]['step_ms']['median']:6.1f}")
        per_round.append(res)
    return _aggregate(per_round, daemon_ops)


def _aggregate(per_round, daemon_ops):
    out = {"configs": CONFIGS, "order": list(CONFIGS), "rounds": per_round, "summary": {}, "ratios": {},
           "daemon_in_slurm": {k: summary(v) for k, v in daemon_ops.items()}}
    metrics = {"per_job": lambda r: r["per_job_ms"],
               "srun_latency": lambda r: r["srun_latency_ms"]["median"],
               "batch_first_line": lambda r: r["batch_first_line_ms"]["median"],
               "batch_start": lambda r: r["batch_alloc_to_first_line_ms"]["median"],
               "step": lambda r: r["step_ms"]["median"]}
    for name in CONFIGS:
        s = {}
        for m, get in metrics.items():
            vals = [get(r[name]) for r in per_round]
            over = [get(r[name]) - get(r["bare"]) for r in per_round]
            s[m] = summary(vals)
            s[m + "_overhead"] = summary(over)
        out["summary"][name] = s
    for m, get in metrics.items():
        def ratio(num, den, base="bare", get=get):
            vals = []
            for r in per_round:
                d = get(r[den]) - get(r[base])
                if d > 0:
                    vals.append((get(r[num]) - get(r[base])) / d)
            return summary(vals)
        out["ratios"][m] = {
            "privtmpd_over_jc_overhead": ratio("privtmpd", "jc-tmpfs"),
            "privtmpd_over_floor_overhead": ratio("privtmpd", "py-hooks"),
            "privtmpd_over_floor_total": summary([get(r["privtmpd"]) / get(r["py-hooks"]) for r in per_round]),
            "privtmpd_over_exit_floor_overhead": ratio("privtmpd", "py-hooks-exit"),
        }
    return out

"""Shared pieces of the benchmark suite: paths, statistics, hook scripts,
running a command the way slurmd runs a Prolog, and the daemon's log."""

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Everything the benchmark makes on the machine lives here (never under
# /tmp, /var/tmp or /dev/shm: jobs see those privatised).
BENCH_ROOT = "/var/lib/privtmpd-bench"
RESULTS_DIR = os.path.join(REPO, "bench", "results")
HOOK_PYTHON = "/usr/bin/python3"      # the interpreter our hooks' shebang names
JOB_USER = "privtmp1"


def log(msg):
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# --- statistics -------------------------------------------------------------

def percentile(values, q):
    """q in [0, 100], linear interpolation between closest ranks."""
    v = sorted(values)
    if not v:
        return None
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summary(values):
    """Median and spread of a list of numbers (ms unless said otherwise)."""
    values = [float(x) for x in values if x is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": percentile(values, 50), "p25": percentile(values, 25),
            "p75": percentile(values, 75), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "min": min(values), "max": max(values)}


def fmt_ms(s, key="median"):
    if not s or not s.get("n"):
        return "-"
    return f"{s[key]:.1f}"


def fmt_spread(s, digits=1):
    """median [p25-p75] for a summary."""
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} [{s['p25']:.{digits}f}-{s['p75']:.{digits}f}]"


# --- hook scripts -------------------------------------------------------------

def write_file(path, text, mode=0o755):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def make_hooks(hookdir, socket_path):
    """Our Prolog and Epilog exactly as shipped (scripts/*.py, run through
    their `#!/usr/bin/python3 -IS` line), with only two edits: the package
    is found in this checkout, and the daemon's socket is the benchmark's
    (Slurm passes hooks no arguments).  Plus the empty hooks that are the
    floor of any hook-based design.  Returns {name: path}."""
    out = {}
    for kind in ("prolog", "epilog"):
        with open(os.path.join(REPO, "scripts", f"{kind}.py")) as f:
            text = f.read()
        anchor = "from privtmpd.client import exit_hook, run_hook"
        calls = [line for line in text.splitlines() if line.startswith("exit_hook(run_hook(")]
        if len(calls) != 1 or anchor not in text:
            raise RuntimeError(f"scripts/{kind}.py changed shape: update bench.common.make_hooks")
        text = text.replace(anchor, f"sys.path.insert(0, {REPO!r})\n{anchor}", 1)
        text = text.replace(calls[0], f'exit_hook(run_hook("{kind}", ["--socket", {socket_path!r}]))', 1)
        out[kind] = write_file(os.path.join(hookdir, f"{kind}.py"), text)
    out["empty-py"] = write_file(os.path.join(hookdir, "empty.py"), f"#!{HOOK_PYTHON} -IS\n")
    # The same, ending as ours do (posix._exit, no interpreter finalization):
    # the floor of a Python hook that skips it too.
    out["empty-py-exit"] = write_file(os.path.join(hookdir, "empty-exit.py"),
                                      f"#!{HOOK_PYTHON} -IS\nimport posix\nposix._exit(0)\n")
    out["empty-sh"] = write_file(os.path.join(hookdir, "empty.sh"), "#!/bin/sh\n")
    return out


def slurm_env(job, restart=0, uid=65534, gid=65534, user="nobody", context="prolog_slurmd"):
    """The environment slurmd gives a Prolog/Epilog: no PATH, no HOME."""
    return {"SLURM_JOB_ID": str(job), "SLURM_JOB_UID": str(uid), "SLURM_JOB_GID": str(gid),
            "SLURM_JOB_USER": user, "SLURM_JOB_RESTART_COUNT": str(restart),
            "SLURM_SCRIPT_CONTEXT": context, "SLURM_CLUSTER_NAME": "privtmpd-bench",
            "SLURMD_NODENAME": "bench", "SLURM_JOB_PARTITION": "debug", "SLURM_JOB_WORK_DIR": "/"}


def run_hook(path, env):
    """fork+exec the hook as slurmd does, wait, return wall ms.  Raises on
    a non-zero exit."""
    t0 = time.perf_counter()
    pid = os.posix_spawn(path, [path], env)
    _, status = os.waitpid(pid, 0)
    ms = (time.perf_counter() - t0) * 1000
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{path} failed (status {status}) with env {env}")
    return ms


# --- the daemon's own figures ------------------------------------------------

def _fields(line):
    """key=value words of a daemon log line (values without spaces)."""
    out = {}
    for word in line.split():
        k, eq, v = word.partition("=")
        if eq and k not in out:
            out[k] = v
    return out


class LogReader:
    """Reads what a daemon logged since the last call."""

    def __init__(self, path):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0

    def new_text(self):
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        return text

    def ops(self):
        """{"create": {job: ms}, "destroy": {job: ms}, "remove": [(dir, ms, files, result)]}"""
        out = {"create": {}, "destroy": {}, "remove": []}
        for line in self.new_text().splitlines():
            if " op=" not in line:
                continue
            f = _fields(line)
            op, result = f.get("op"), f.get("result")
            try:
                if op in ("create", "destroy") and result == "ok":
                    out[op][int(f["job"])] = float(f["ms"])
                elif op == "remove":
                    out["remove"].append((f.get("dir", ""), float(f["ms"]), int(f.get("files", 0)), result))
            except (KeyError, ValueError):
                continue
        return out


def proc_status(pid):
    """RSS (kB) and open fds of a process."""
    rss = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def wait_removals(daemon, timeout=3600, poll=0.002):
    """Until the daemon has no background removal queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = daemon.request(op="status")
        if not st["removals_queued"] and not st["removals_running"]:
            return
        time.sleep(poll)
    raise RuntimeError("background removals did not finish")


def build_native(bindir):
    """Compile bench/benchtool.c and the entry helper into bindir."""
    os.makedirs(bindir, exist_ok=True)
    tool = os.path.join(bindir, "benchtool")
    subprocess.run(["gcc", "-O2", "-Wall", "-rdynamic", "-o", tool,
                    os.path.join(REPO, "bench", "benchtool.c"), "-ldl"], check=True)
    subprocess.run(["make", "-B", "-s", "-C", os.path.join(REPO, "spank"), f"BUILDDIR={bindir}"], check=True)
    return tool, os.path.join(bindir, "privtmpd_spank.so")


def machine_info():
    info = {"kernel": os.uname().release, "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 1048576, 1)
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        info["slurm"] = subprocess.run(["/usr/sbin/slurmd", "-V"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    info["hook_python"] = subprocess.run([HOOK_PYTHON, "-V"], capture_output=True, text=True).stdout.strip()
    info["daemon_python"] = sys.version.split()[0]
    for path in ("/", "/run", "/var/lib"):
        info.setdefault("fs", {})[path] = _fstype(path)
    return info


def rundir_on_tmpfs(rundir):
    """Every systemd machine (a compute node included) has /run on a tmpfs;
    a VM or container may not (here: the root ext4, mounted with discard,
    where every unlink of a state file costs a discard).  The daemon's
    run directory gets a tmpfs of its own then, as a node would have it.
    Returns what it is on ("tmpfs" or "tmpfs, mounted by the bench");
    DaemonProc.cleanup() unmounts it."""
    if _fstype("/run") == "tmpfs":
        return "tmpfs"
    os.makedirs(rundir, mode=0o755, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev,size=64m", "privtmpd-bench", rundir],
                   check=True)
    return f"tmpfs, mounted by the bench (/run is {_fstype('/run')})"


def _fstype(path):
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", path], capture_output=True, text=True)
    return r.stdout.strip()

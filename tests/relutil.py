"""Helpers shared by the reliability suite (test_races, test_faults,
test_load, test_boundary, test_hostile_env): leak accounting, hooks run
the way slurmd runs them, and syscall fault injection with strace."""

import os
import subprocess
import time

import psutil

from harness import REPO
from privtmpd import proc, runstate

USER = 65534
USER_PY = "/usr/bin/python3"        # readable by nobody, unlike a pyenv under /root


def as_user(argv, user=USER, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] + list(argv), **kw)


def run_hook(d, kind, job, uid=USER, gid=USER, restart=0, env=None, timeout=120):
    """scripts/<kind>.py for job, as slurmd runs it (root, no PATH, Slurm's
    variables), talking to daemon d.  Returns the CompletedProcess."""
    e = {"SLURM_JOB_ID": str(job), "SLURM_JOB_UID": str(uid), "SLURM_JOB_GID": str(gid),
         "SLURM_JOB_RESTART_COUNT": str(restart), "SLURM_JOB_USER": "nobody"}
    e.update(env or {})
    return subprocess.run([f"{REPO}/scripts/{kind}.py", "--socket", d.socket], env=e, capture_output=True,
                          text=True, timeout=timeout)


def mounts_under(*tops):
    """Host mount points at or below one of tops."""
    return [m.mountpoint for m in proc.mounts()
            if any(m.mountpoint == t or m.mountpoint.startswith(t.rstrip("/") + "/") for t in tops)]


def mountinfo_lines():
    with open("/proc/self/mountinfo") as f:
        return sum(1 for _ in f)


def daemon_fds(d):
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def daemon_rss_kb(d):
    with open(f"/proc/{d.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def processes_of(d, include_main=False):
    """Live processes of daemon d (the daemon and its forks share its
    command line), the main process excluded unless include_main."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if d.conf_path in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                if include_main or d.proc is None or p.pid != d.proc.pid:
                    out.append(p.pid)
        except psutil.Error:
            continue
    return out


def wait_no_forks(d, timeout=10):
    deadline = time.monotonic() + timeout
    while processes_of(d):
        assert time.monotonic() < deadline, f"daemon forks still alive: {processes_of(d)}"
        time.sleep(0.02)


def job_entries(d):
    return sorted(n for n in os.listdir(d.base_parent) if n.startswith(("job.", ".job.")))


def state_files(d):
    return sorted(os.listdir(f"{d.rundir}/jobs"))


def pins(d):
    return sorted(str(p) for p in runstate.list_pins(d.cfg))


def live(d, job):
    """Job is fully there: state ready, pin holding the recorded namespace,
    its directory in place, and a process entering the pin sees it."""
    st = runstate.read_state(d.cfg, job)
    ident = runstate.pin_identity(d.cfg, job)
    if not (st and st.get("state") == "ready" and ident and list(ident) == st.get("ns")):
        return False
    inside = subprocess.run(["nsenter", f"--mount={d.pin(job)}", "--", "stat", "-c", "%d:%i", "/tmp"],
                            capture_output=True, text=True)
    host = os.stat(f"{st['dir']}/tmp")
    return inside.returncode == 0 and inside.stdout.strip() == f"{host.st_dev}:{host.st_ino}"


def gone(d, job):
    """Nothing of job is left: no pin (file or mount), no state, no directory."""
    return (not os.path.lexists(d.pin(job)) and runstate.read_state(d.cfg, job) is None
            and not [m for m in mounts_under(d.pin(job))]
            and not [n for n in job_entries(d) if n.startswith((f"job.{job}.", f".job.{job}."))])


class Inject:
    """strace attached to a running process, injecting into one syscall:
    action "signal=SIGKILL" or "error=EIO", at its Nth invocation counted
    from the attach, per process (follow: forked children are traced too,
    each with its own counters).  fired() says whether it happened."""

    def __init__(self, pid, syscall, action, when, follow=False, trace_path=None):
        self.trace = trace_path or f"/run/privtmpd-test/strace-{pid}-{syscall}-{when}.out"
        argv = ["strace", "-p", str(pid), "-o", self.trace, "-e", f"trace={syscall}",
                "-e", f"inject={syscall}:{action}:when={when}"]
        if follow:
            argv.insert(1, "-f")
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "attached" not in line:
            self.proc.kill()
            raise RuntimeError(f"strace did not attach: {line}{self.proc.stderr.read()}")
        time.sleep(0.05)

    def fired(self):
        try:
            with open(self.trace) as f:
                return "INJECTED" in f.read()
        except FileNotFoundError:
            return False

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        fired = self.fired()
        try:
            os.unlink(self.trace)
        except FileNotFoundError:
            pass
        self.was_fired = fired

"""Kill a Slurm job's cgroup as one: where Slurm's cgroups exist
(proctrack/cgroup, task/cgroup), every process of the job is in
.../job_<id>/..., and a process cannot leave it (moving needs write access
to root's cgroup.procs files).  Killing through the cgroup leaves nothing
that could fork meanwhile:

  cgroup v2   cgroup.kill (Linux 5.14): the kernel kills the whole subtree,
              including processes forked while it does;
              before 5.14, cgroup.freeze, SIGKILL each, thaw
  cgroup v1   freezer.state FROZEN, SIGKILL each, THAWED (a frozen process
              cannot fork; SIGKILL takes effect at the thaw)

Only a root-owned directory named exactly job_<id> is ever touched: a
user's delegated cgroup (systemd user@.service) is the user's, and may be
named anything.
"""

import os
import signal
import time

FREEZE_WAIT = 1.0       # seconds a freeze may take before we kill anyway


def _mounts():
    """{"v2": mount point, "freezer": mount point} of the cgroup hierarchies we use."""
    from .proc import mounts        # proc imports this module
    out: dict[str, str] = {}
    for m in mounts():
        if m.fstype == "cgroup2":
            out.setdefault("v2", m.mountpoint)
        elif m.fstype == "cgroup" and "freezer" in m.super_options:
            out.setdefault("freezer", m.mountpoint)
    return out


def job_cgroup_of(pid, job):
    """(kind, directory) of the root-owned job_<job> cgroup that pid is in,
    or None.  kind is "v2" or "freezer" (cgroup v1)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = f"job_{job}"
    mounts = None
    for line in lines:
        _hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        kind = "v2" if controllers == "" else "freezer" if "freezer" in controllers.split(",") else None
        parts = path.split("/")
        if kind is None or want not in parts:
            continue
        if mounts is None:
            mounts = _mounts()
        top = mounts.get(kind)
        if not top:
            continue
        d = top.rstrip("/") + "/".join(parts[:parts.index(want) + 1])
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if st.st_uid == 0 and os.path.isdir(d) and not os.path.islink(d):
            return (kind, d)
    return None


def _procs_under(d):
    pids = []
    for dirpath, _dirs, _files in os.walk(d):
        try:
            with open(f"{dirpath}/cgroup.procs") as f:
                pids += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return pids


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _wait_for(pred):
    deadline = time.monotonic() + FREEZE_WAIT
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.005)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def kill_cgroup(cg):
    """SIGKILL everything in the cgroup (kind, directory) and below.
    Returns how many processes it held.  Never raises: the namespace scan
    that called it goes on and proves the outcome either way."""
    kind, d = cg
    pids = _procs_under(d)
    try:
        if kind == "v2" and os.path.exists(f"{d}/cgroup.kill"):
            _write(f"{d}/cgroup.kill", "1")
            return len(pids)
        if kind == "v2":
            _write(f"{d}/cgroup.freeze", "1")
            _wait_for(lambda: "frozen 1" in _read(f"{d}/cgroup.events"))
        else:
            _write(f"{d}/freezer.state", "FROZEN")
            _wait_for(lambda: _read(f"{d}/freezer.state").strip() == "FROZEN")
        pids = _procs_under(d)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    except OSError:
        pass
    finally:
        try:
            if kind == "v2" and not os.path.exists(f"{d}/cgroup.kill"):
                _write(f"{d}/cgroup.freeze", "0")
            elif kind == "freezer":
                _write(f"{d}/freezer.state", "THAWED")
        except OSError:
            pass
    return len(pids)

"""The run directory: state files and pins, the daemon's record of which
jobs have a namespace on this node.

  <rundir>/          0700 root
  <rundir>/jobs/J.json   the job's state (creating, ready), written by rename
  <rundir>/ns/J      the pin: /proc/<pid>/ns/mnt of the job's namespace
                     bind-mounted onto a file, which keeps the namespace alive
                     with no process in it
  <rundir>/sweeps/J.R.json   a sweep of the shared mount points for the
                     leftovers of run R of job J's user, queued and not done
                     (a restart of the daemon resumes it)

The pin directory is a private mount: a bind of an nsfs file onto a file on
a shared mount fails with EINVAL, and a shared pin dir would propagate pins
into other namespaces.  (Named runstate, not rundir, so that the module does
not shadow the many variables and attributes called rundir.)
"""

import errno
import json
import math
import os
import stat
from typing import List, Union

from . import kernel, names, proc
from .kernel import KernelError

STATE_CREATING = "creating"
STATE_READY = "ready"


class RunDirError(Exception):
    """The run directory or a pin is not what it must be; message is for the admin."""


# --- run directory -------------------------------------------------------

def _secure_dir(path):
    """mkdir -m 0700 path (root's), refusing a symlink or a foreign owner."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise RunDirError(f"{path} exists but is not a root-owned directory; remove it and restart privtmpd")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def setup_rundir(cfg):
    """rundir/ (0700 root) with ns/ (private mount, holds pins) and jobs/ (state)."""
    parent = os.path.dirname(cfg.rundir)
    os.makedirs(parent, 0o755, exist_ok=True)
    _secure_dir(cfg.rundir)
    nsdir = f"{cfg.rundir}/ns"
    _secure_dir(nsdir)
    _secure_dir(f"{cfg.rundir}/jobs")
    _secure_dir(f"{cfg.rundir}/sweeps")
    if not proc.is_mountpoint(nsdir):
        kernel.mount(nsdir, nsdir, None, kernel.MS_BIND)
    make_pin_dir_private(cfg)


def make_pin_dir_private(cfg):
    # Re-asserted before every pin: any tool that runs `mount --make-rshared /`
    # turns the pin directory shared again.
    kernel.mount(None, f"{cfg.rundir}/ns", None, kernel.MS_PRIVATE)


# --- state files ---------------------------------------------------------

def write_state(cfg, job, state):
    """Replace the job's state file atomically (temporary file + rename).

    No fsync: the rename alone survives a crash of the daemon (the page
    cache does), and what survives a power loss or a kernel crash does not
    need it: pins and namespaces are gone then too, and reconcile() rolls
    back every job whose state is missing, unreadable or does not match its
    pin, and sweeps directories no live job owns.  (Two fsyncs cost every
    job ~0.9 ms on a disk-backed /run.)"""
    _write_json(names.state_path(cfg.rundir, job), state)


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    data = json.dumps(obj).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_stale_temp_states(cfg):
    """Remove the temporary files of state and sweep-record writes a crash
    interrupted (jobs/<job>.json.tmp, sweeps/<job>.<restart>.json.tmp):
    nothing ever reads them.  Returns their paths under the run directory."""
    gone = []
    for sub in ("jobs", "sweeps"):
        for name in os.listdir(f"{cfg.rundir}/{sub}"):
            if name.endswith(".json.tmp"):
                try:
                    os.unlink(f"{cfg.rundir}/{sub}/{name}")
                    gone.append(f"{sub}/{name}")
                except FileNotFoundError:
                    pass
    return gone


def read_state(cfg, job):
    try:
        with open(names.state_path(cfg.rundir, job), encoding="utf-8") as f:
            state = json.load(f)
        return state if isinstance(state, dict) else None
    except (FileNotFoundError, ValueError):
        return None


def remove_state(cfg, job):
    try:
        os.unlink(names.state_path(cfg.rundir, job))
    except FileNotFoundError:
        pass


def all_states(cfg):
    """{job: state} for every state file (unparsable ones map to None)."""
    out = {}
    for name in os.listdir(f"{cfg.rundir}/jobs"):
        if name.endswith(".json"):
            try:
                job = names.parse_job_id(name[:-5])
            except names.BadName:
                continue
            out[job] = read_state(cfg, job)
    return out


# --- pending sweeps ------------------------------------------------------
# A sweep (leftovers.py) is queued at the Epilog's request and run by a
# worker after the reply; its record on disk lets the next daemon run it
# when this one stops first.  The window (since, until) is fixed when it
# is queued, so a late sweep takes nothing the user created after their
# jobs ended.

def _sweep_path(cfg, job, restart):
    return f"{cfg.rundir}/sweeps/{job}.{restart}.json"


def write_sweep(cfg, job, restart, sweep):
    _write_json(_sweep_path(cfg, job, restart), sweep)


def remove_sweep(cfg, job, restart):
    try:
        os.unlink(_sweep_path(cfg, job, restart))
    except FileNotFoundError:
        pass


def pending_sweeps(cfg):
    """[(job, restart, sweep dict)] of every sweep record, oldest first;
    a record that is not one (unparsable, an odd name or field) is
    removed and returned as (None, file name, why)."""
    sweeps = f"{cfg.rundir}/sweeps"
    out: List[tuple] = []
    for name in os.listdir(sweeps):
        path = f"{sweeps}/{name}"
        if name.endswith(".json.tmp"):      # remove_stale_temp_states' (reconcile runs first)
            continue
        try:
            job_s, restart_s, ext = name.split(".")
            if ext != "json":
                raise ValueError("not a .json file")
            job, restart = names.parse_job_id(job_s), int(restart_s)
            if str(restart) != restart_s or restart < 0:
                raise ValueError("bad restart count")
            with open(path, encoding="utf-8") as f:
                sweep = json.load(f)
            if not (isinstance(sweep, dict) and sweep.get("job") == job
                    and isinstance(sweep.get("points"), list) and all(isinstance(p, str) for p in sweep["points"])
                    and all(type(sweep.get(k)) is int for k in ("uid", "gid"))
                    and sweep["uid"] > 0 and sweep["gid"] >= 0          # never a sweep as root
                    and all(type(sweep.get(k)) in (int, float) and math.isfinite(sweep[k]) for k in ("since", "until"))
                    and sweep["since"] <= sweep["until"]        # json reads -Infinity: a window of all time
                    and type(sweep.get("remove")) is bool):
                raise ValueError("not a sweep record")
            out.append((os.stat(path).st_mtime, job, restart, sweep))
        except (ValueError, names.BadName, OSError) as e:
            try:
                os.unlink(path)
            except OSError:
                pass
            out.append((0.0, None, name, str(e)))
    out.sort(key=lambda t: t[0])
    return [t[1:] for t in out]


# --- pins ----------------------------------------------------------------

def pin_identity(cfg, job):
    """(st_dev, st_ino) of the live mount namespace pinned for job, or None
    when there is no pin or it is a plain file (unmounted, stale)."""
    try:
        fd = os.open(names.pin_path(cfg.rundir, job), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if kernel.ns_type(fd) != kernel.CLONE_NEWNS:
            return None
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def list_pins(cfg) -> List[Union[int, str]]:
    """Pin names in the pin directory: job ids, and any other name as is
    (found by reconcile and cleanup, which remove it)."""
    out: List[Union[int, str]] = []
    for name in os.listdir(f"{cfg.rundir}/ns"):
        try:
            out.append(names.parse_job_id(name))
        except names.BadName:
            out.append(name)
    return out


def unpin(cfg, job):
    """Unmount (all stacked binds of) and remove the pin.  Idempotent."""
    pin = names.pin_path(cfg.rundir, job) if isinstance(job, int) else f"{cfg.rundir}/ns/{job}"
    for _ in range(64):
        try:
            kernel.umount2(pin, kernel.MNT_DETACH | kernel.UMOUNT_NOFOLLOW)
        except KernelError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                break
            raise
    try:
        os.unlink(pin)
    except FileNotFoundError:
        pass


def pin(cfg, job, nsfd):
    """Bind the namespace open on nsfd onto the job's pin file."""
    pin = names.pin_path(cfg.rundir, job)
    unpin(cfg, job)
    make_pin_dir_private(cfg)
    fd = os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    os.close(fd)
    kernel.mount(f"/proc/self/fd/{nsfd}", pin, None, kernel.MS_BIND)
    expect = os.fstat(nsfd)
    if pin_identity(cfg, job) != (expect.st_dev, expect.st_ino):
        unpin(cfg, job)
        raise RunDirError(f"pin {pin} does not hold the job's new namespace after mounting it")

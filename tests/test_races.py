"""Races against a live daemon, for real: a user process loops
renameat2(RENAME_EXCHANGE) between a directory and a symlink to a
root-owned canary at every level a user can reach - the job path in the
base's sticky parent while jobs are created and chowned, and each level
of the job's own /tmp while it is torn down - and plants hard links to
root's files.  The canary (contents, owner, mode, link count) must be
untouched, and no job's /tmp may be a directory another user controls."""

import os
import stat
import subprocess
import time

import pytest

from relutil import USER, USER_PY, gone, job_entries, live, mounts_under, pins, state_files

pytestmark = pytest.mark.root

CREATE_CYCLES = int(os.environ.get("PRIVTMPD_RACE_CYCLES", "2000"))
TEARDOWN_CYCLES = int(os.environ.get("PRIVTMPD_RACE_TEARDOWN_CYCLES", "150"))


def snapshot(top):
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in [""] + dirnames + filenames:
            p = os.path.join(dirpath, n) if n else dirpath
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, data)
    return out


@pytest.fixture
def canary(daemon):
    """A root-owned directory (0700) with a secret file, next to the job
    directories (same filesystem: a hard link to it can be made inside a
    job's /tmp; and inside the daemon's own tree, which a concurrent test
    session's leftover cleanup leaves alone while the daemon runs)."""
    top = f"{daemon.base_parent}/canary"
    os.makedirs(f"{top}/sub", 0o700)
    os.chmod(top, 0o700)
    with open(f"{top}/secret", "w") as f:
        f.write("root's data\n")
    os.chmod(f"{top}/secret", 0o600)
    with open(f"{top}/sub/file", "w") as f:
        f.write("more\n")
    before = snapshot(top)
    yield top, before
    subprocess.run(["rm", "-rf", top])


SWAP_JOB_PATHS = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
canary, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
swaps = 0
def done(*a):
    print(swaps, flush=True); os._exit(0)
signal.signal(signal.SIGTERM, done)
jobs = range(first, last + 1)
open("swapper.ready", "w").close()
while True:
    for j in jobs:
        d, l = f"job.{j}.0".encode(), f"link.{j}".encode()
        try:
            os.mkdir(d)
        except OSError:
            pass
        try:
            os.symlink(canary, l)
        except OSError:
            pass
        if libc.renameat2(-100, d, -100, l, 2) == 0:
            swaps += 1
"""


def _wait_file(path, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "the swapper died"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def _stop(proc):
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return int(out.strip() or 0)


def test_swap_job_path_during_create_chown_remove(daemon, canary, figures):
    """The job path of the next jobs flips between a user directory and a
    symlink to root's canary in a tight loop while jobs are created (their
    directories chowned to the job's user) and torn down."""
    top, before = canary
    first, last = 1, CREATE_CYCLES
    window = 8            # the swapper targets the next jobs, as an attacker would
    swapper = f"{daemon.base_parent}/swapper.py"
    with open(swapper, "w") as f:
        f.write(SWAP_JOB_PATHS)
    procs = []
    displaced = 0
    t0 = time.monotonic()
    try:
        for job in range(first, last + 1):
            if (job - 1) % window == 0:
                for p in procs:
                    _stop(p)
                procs = [subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                                           USER_PY, swapper, top, str(job), str(job + window - 1)],
                                          cwd=daemon.base_parent, stdout=subprocess.PIPE, text=True)]
                _wait_file(f"{daemon.base_parent}/swapper.ready", procs[0])
                os.unlink(f"{daemon.base_parent}/swapper.ready")
            r = daemon.create(job)
            assert r["ok"], r
            # The job path is ours: a root-owned 0700 directory, its tmp the
            # job user's, and it is what the namespace has on /tmp.
            path = daemon.job_dir(job)
            st = os.lstat(path)
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
            sub = os.lstat(f"{path}/tmp")
            assert stat.S_ISDIR(sub.st_mode) and sub.st_uid == USER
            if job % 25 == 0 or job == last:
                assert live(daemon, job), f"job {job}'s /tmp is not its own directory"
            d = daemon.destroy(job, restart=0)
            assert d["ok"] and d["dirs"] == [f"job.{job}.0"], d
        swaps = sum(_stop(p) for p in procs)
        procs = []
    finally:
        for p in procs:
            p.kill()
            p.wait()
    elapsed = time.monotonic() - t0
    os.unlink(swapper)
    daemon.wait_removals(timeout=120)
    assert snapshot(top) == before, "the canary changed"
    # What the attacker made is still theirs, moved aside, never used or removed by root.
    for name in os.listdir(daemon.base_parent):
        if name == "canary":
            continue
        st = os.lstat(f"{daemon.base_parent}/{name}")
        assert st.st_uid == USER, (name, st.st_uid)
        if ".squatted." in name:
            displaced += 1
    assert displaced > 0, "the swapper never got to a job path first: the race was not exercised"
    assert pins(daemon) == [] and state_files(daemon) == [] and not mounts_under(daemon.base_parent)
    assert len(mounts_under(daemon.rundir)) == 1
    figures("symlink/dir swap at the job path during create+chown+teardown", jobs=CREATE_CYCLES, swaps=swaps,
            squatters_displaced=displaced, seconds=round(elapsed, 1), canary_intact=True, failures=0, leaked=0)


SWAP_INSIDE = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
canary, depth = sys.argv[1], int(sys.argv[2])
swaps = 0
def done(*a):
    print(swaps, flush=True); os._exit(0)
signal.signal(signal.SIGTERM, done)
# One directory and one symlink to the canary at every level 1..depth.
dirs = []
path = "."
for level in range(1, depth + 1):
    d = f"{path}/d{level}"
    os.makedirs(d, exist_ok=True)
    for i in range(20):
        open(f"{d}/f{i}", "w").close()
    try:
        os.symlink(canary, f"{path}/l{level}")
    except OSError:
        pass
    dirs.append((d.encode(), f"{path}/l{level}".encode()))
    path = d
open("ready", "w").close()
while True:
    for d, l in dirs:
        if libc.renameat2(-100, d, -100, l, 2) == 0:
            swaps += 1
"""


def test_swap_every_level_of_job_tmp_during_teardown(daemon, canary, figures):
    """While the job's tree is removed, a user process (outside the job: it
    was handed the directory, so the Epilog does not kill it) flips a
    directory and a symlink to the canary at every level of the tree; a hard
    link to a root file sits in the tree too.  Removal unlinks the link
    only, never follows a swapped symlink, and still finishes."""
    top, before = canary
    script = f"{daemon.base_parent}/inside.py"
    with open(script, "w") as f:
        f.write(SWAP_INSIDE)
    swaps = 0
    t0 = time.monotonic()
    for i in range(TEARDOWN_CYCLES):
        job = 10_000 + i
        assert daemon.create(job)["ok"]
        tmp = f"{daemon.job_dir(job)}/tmp"
        os.link(f"{top}/secret", f"{tmp}/hardlink")          # as a setuid helper could
        assert os.stat(f"{top}/secret").st_nlink == 2
        p = subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                              USER_PY, script, top, str(1 + i % 6)], cwd=tmp, stdout=subprocess.PIPE, text=True)
        try:
            _wait_file(f"{tmp}/ready", p)
            assert daemon.destroy(job, restart=0)["ok"]
            daemon.wait_removals(timeout=60)
        finally:
            swaps += _stop(p)
        assert gone(daemon, job)
        assert os.stat(f"{top}/secret").st_nlink == 1
    elapsed = time.monotonic() - t0
    os.unlink(script)
    assert snapshot(top) == before, "the canary changed"
    assert job_entries(daemon) == [] and sorted(os.listdir(daemon.base_parent)) == ["canary"]
    assert "result=incomplete" not in daemon.log() or "result=retry-scheduled" in daemon.log()
    figures("symlink/dir swap at every level of the job's /tmp during teardown, plus a hard link to a root file",
            jobs=TEARDOWN_CYCLES, swaps=swaps, levels="1-6", seconds=round(elapsed, 1), canary_intact=True,
            hardlink_targets_intact=TEARDOWN_CYCLES, failures=0, leaked=0)

"""A daemon restart, a crash and a package upgrade while jobs run lose
nothing: the job's processes keep their /tmp, new tasks enter the same
namespace and see the same files, the Prolog and Epilog ride over the
restart, and the next daemon tears the job down as usual."""

import os
import subprocess
import time

import pytest

from cli import (PKG_WORK, InsideJob, build_wheel, ctl, make_venv, pip_install, site_packages, source_copy,
                 start_daemon, wait_for)
from harness import REPO, nsenter

pytestmark = pytest.mark.root

NOBODY = 65534


def slurm_env(job, restart=0, kind="prolog"):
    """The environment slurmd gives the Prolog and Epilog (no PATH)."""
    return {"SLURM_JOB_ID": str(job), "SLURM_JOB_UID": str(NOBODY), "SLURM_JOB_GID": str(NOBODY),
            "SLURM_JOB_USER": "nobody", "SLURM_JOB_RESTART_COUNT": str(restart),
            "SLURM_SCRIPT_CONTEXT": f"{kind}_slurmd"}


def hook(path, socket, job, **kw):
    kind = "epilog" if os.path.basename(path).startswith("epilog") else "prolog"
    return subprocess.Popen([path, "--socket", socket], env=slurm_env(job, kind=kind), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_hook(path, socket, job):
    p = hook(path, socket, job)
    out, err = p.communicate(timeout=60)
    return p.returncode, err


def as_job_user(pin, script):
    return nsenter(pin, "sh", "-c", script, user=str(NOBODY))


def check_job_survives(d, job, inside, restart):
    """Before the restart: a task of the job is running and has written a
    file.  restart() stops and starts the daemon; then everything must be
    as it was."""
    pin = d.pin(job)
    as_job_user(pin, "echo before > /tmp/before; echo v > /var/tmp/v")
    ns_before = os.stat(pin).st_ino
    restart()
    # The same namespace, pinned, with the same files, and the running task
    # still inside it.
    assert os.stat(pin).st_ino == ns_before
    st = d.request(op="show", job=str(job))["jobs"][0]
    assert st["state"] == "ready" and st["pinned"] and st["processes"] == [inside.pid]
    assert inside.alive()
    r = as_job_user(pin, "cat /tmp/before /var/tmp/v; echo after > /tmp/after")
    assert r.stdout == "before\nv\n"
    assert os.stat(f"/proc/{inside.pid}/ns/mnt").st_ino == ns_before
    # What a new task writes, the running task sees (one namespace).
    r = nsenter(f"/proc/{inside.pid}/ns/mnt", "cat", "/tmp/after")
    assert r.stdout == "after\n"
    # A duplicate Prolog after the restart finds the job as it is.
    assert d.create(job, uid=NOBODY, gid=NOBODY)["existing"]
    assert sorted(os.listdir(f"{d.job_dir(job)}/tmp")) == ["after", "before"]


def test_restart_while_a_job_runs(daemon):
    assert daemon.create(401, uid=NOBODY, gid=NOBODY)["ok"]
    inside = InsideJob(daemon.pin(401)).wait_inside()
    try:
        def restart():
            t0 = time.monotonic()
            assert daemon.stop() == 0
            assert time.monotonic() - t0 < 5              # systemd's stop does not wait 90 s
            # While the daemon is down the job is untouched, and new tasks
            # (the entry helper only needs the pin) still enter.
            assert as_job_user(daemon.pin(401), "cat /tmp/before").stdout == "before\n"
            daemon.start()

        check_job_survives(daemon, 401, inside, restart)
        assert "op=recover result=ok" in daemon.log() and "live_jobs=1" in daemon.log()
        # The new daemon serves the Epilog: the leftover task dies, all goes.
        info = daemon.destroy(401)
        assert info["ok"] and info["killed"] == [inside.pid]
        daemon.wait_removals()
        assert not os.path.exists(daemon.job_dir(401)) and not os.path.exists(daemon.pin(401))
    finally:
        inside.stop()


def test_crash_while_a_job_runs(daemon):
    assert daemon.create(402, uid=NOBODY, gid=NOBODY)["ok"]
    assert daemon.create(403, uid=NOBODY, gid=NOBODY)["ok"]
    assert daemon.destroy(403)["ok"]            # its removal may be cut short by the crash
    inside = InsideJob(daemon.pin(402)).wait_inside()
    try:
        def restart():
            daemon.kill()
            daemon.start()

        check_job_survives(daemon, 402, inside, restart)
        daemon.wait_removals()
        assert not os.path.exists(daemon.job_dir(403))
        assert daemon.destroy(402)["ok"]
    finally:
        inside.stop()


def test_prolog_and_epilog_ride_over_a_restart(daemon):
    prolog = os.path.join(REPO, "scripts", "prolog.py")
    epilog = os.path.join(REPO, "scripts", "epilog.py")
    daemon.stop()
    p = hook(prolog, daemon.socket, 404)          # the job starts while the daemon restarts
    time.sleep(1.0)
    assert p.poll() is None                       # waiting for the socket, not failing
    daemon.start()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert os.path.isdir(f"{daemon.job_dir(404)}/tmp")
    daemon.stop()
    e = hook(epilog, daemon.socket, 404)
    time.sleep(0.5)
    daemon.start()
    e.communicate(timeout=60)
    assert e.returncode == 0
    assert not os.path.exists(daemon.pin(404))


@pytest.fixture
def work():
    d = os.path.join(PKG_WORK, f"upgrade-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def test_package_upgrade_while_jobs_run(daemon_factory, work):
    """pip install --upgrade of a new version into the daemon's
    virtualenv, then the restart an upgrade does: the daemon, CLI and hooks
    of the installation are used throughout, as on a node."""
    old = build_wheel(source_copy(f"{work}/src-old"), f"{work}/old")
    new = build_wheel(source_copy(f"{work}/src-new", version="99.0.0"), f"{work}/new")
    venv = make_venv(f"{work}/venv")
    pip_install(venv, old)
    hooks = os.path.join(site_packages(venv), "privtmpd", "hooks")
    d = daemon_factory(start=False, name="pkg-upgrade")
    # cwd=/: nothing from the checkout may be imported by accident.
    start_daemon(d, argv=[f"{venv}/bin/privtmpd"], cwd="/")
    from privtmpd import __version__
    assert d.request(op="status")["version"] == __version__

    rc, err = run_hook(f"{hooks}/prolog.py", d.socket, 405)
    assert rc == 0, err
    inside = InsideJob(d.pin(405)).wait_inside()
    try:
        as_job_user(d.pin(405), "echo v1 > /tmp/data")
        pip_install(venv, new, upgrade=True)
        # The running daemon is not disturbed by the files changing under it.
        assert d.request(op="show", job="405")["jobs"][0]["pinned"]
        # The upgrade's restart (what the package's scriptlet does).
        assert d.stop() == 0
        start_daemon(d, argv=[f"{venv}/bin/privtmpd"], cwd="/")
        assert d.request(op="status")["version"] == "99.0.0"

        r = ctl(d.conf_path, "list", "--json", python=f"{venv}/bin/python", cwd="/")
        import json
        [job] = json.loads(r.stdout)["jobs"]
        assert job["job"] == 405 and job["user"] == "nobody" and job["processes"] == [inside.pid]
        r = ctl(d.conf_path, "enter", "405", "--", "cat", "/tmp/data", python=f"{venv}/bin/python", cwd="/")
        assert r.returncode == 0 and r.stdout == "v1\n"
        as_job_user(d.pin(405), "echo v2 >> /tmp/data")
        assert nsenter(f"/proc/{inside.pid}/ns/mnt", "cat", "/tmp/data").stdout == "v1\nv2\n"
        # A new job with the new hooks, and the old job's Epilog, both served
        # by the new daemon.
        rc, err = run_hook(f"{hooks}/prolog.py", d.socket, 406)
        assert rc == 0, err
        for job in (405, 406):
            rc, err = run_hook(f"{hooks}/epilog.py", d.socket, job)
            assert rc == 0, err
        wait_for(lambda: not inside.alive(), what="the old job's task to be ended by its Epilog")
        d.wait_removals()
        assert not os.path.exists(d.job_dir(405)) and not os.path.exists(d.job_dir(406))
    finally:
        inside.stop()

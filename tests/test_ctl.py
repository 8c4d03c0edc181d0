"""privtmpctl, run for real: the CLI as a subprocess against a real daemon
(the `daemon` fixture), and `doctor` against a real local Slurm cluster.

Every command and option is exercised, in human and --json form, with the
documented exit codes: 0 ok, 1 failure or problem, 2 usage, 3 daemon
unreachable."""

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time

import pytest

from cli import InsideJob, ctl, run_on_tty, wait_for
from harness import REPO, TEST_RUN, Stack

pytestmark = pytest.mark.root

NOBODY = pwd.getpwnam("nobody")
COMMANDS = ("status", "list", "show", "enter", "cleanup", "doctor", "config", "slurm-config")


def create(daemon, job, user="nobody", restart=0):
    pw = pwd.getpwnam(user)
    r = daemon.request(op="create", job=str(job), restart=str(restart), uid=str(pw.pw_uid), gid=str(pw.pw_gid),
                       user=user)
    assert r["ok"], r
    return r


def js(r):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def plant_orphan(daemon, job, restart=0, files=3, size=4096, name=None):
    """A job directory no live job owns, as a crash or a lost Epilog
    leaves it: root's, with the user's files inside."""
    top = os.path.join(daemon.base_parent, name or f"job.{job}.{restart}")
    for sub in ("tmp", "var_tmp"):
        os.makedirs(f"{top}/{sub}")
        os.chown(f"{top}/{sub}", NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(top, 0o700)
    for i in range(files):
        with open(f"{top}/tmp/f{i}", "wb") as f:
            f.write(b"x" * size)
    return top


# --- help, version, usage errors ------------------------------------------

def test_help_names_every_command_and_the_exit_codes():
    r = ctl(None, "--help")
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout
    assert "3 daemon unreachable" in " ".join(r.stdout.split())
    for cmd in ("status", "list", "show", "enter", "cleanup", "doctor", "slurm-config"):
        sub = ctl(None, cmd, "--help")
        assert sub.returncode == 0 and "usage: privtmpctl " + cmd in sub.stdout
    assert "check" in ctl(None, "config", "--help").stdout
    assert ctl(None, "config", "check", "--help").returncode == 0


def test_version():
    from privtmpd import __version__
    r = ctl(None, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"privtmpctl {__version__}"


@pytest.mark.parametrize("args", [
    [], ["bogus"], ["show"], ["show", "007"], ["show", "-1"], ["show", "../x"], ["enter"], ["enter", "1x"],
    ["cleanup"], ["cleanup", "5", "--orphans"], ["cleanup", "0"], ["config"], ["list", "--bogus"],
    ["status", "extra"], ["doctor", "--slurm-conf"],
])
def test_usage_errors_exit_2(daemon, args):
    r = ctl(daemon.conf_path, *args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert r.stderr.startswith(("usage: privtmpctl", "privtmpctl:")), r.stderr
    assert r.stdout == ""


def test_not_root_is_refused_with_exit_1(daemon):
    os.chmod(daemon.conf_path, 0o644)
    # The package and the system interpreter, where an unprivileged user can
    # reach them (the checkout and the test environment may be root's only).
    top = f"/var/lib/privtmpd-test/nonroot-{os.getpid()}"
    shutil.rmtree(top, ignore_errors=True)
    shutil.copytree(os.path.join(REPO, "privtmpd"), os.path.join(top, "privtmpd"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-m",
            "privtmpd.ctl", "--config", daemon.conf_path]
    try:
        for cmd in (["status"], ["list"], ["show", "1"], ["enter", "1", "--", "true"], ["cleanup", "--orphans"]):
            r = subprocess.run(argv + cmd, capture_output=True, text=True, cwd=top)
            assert r.returncode == 1, (cmd, r.stderr)
            assert "must run as root" in r.stderr
        # What needs no privilege works for anyone.
        r = subprocess.run(argv + ["config", "check"], capture_output=True, text=True, cwd=top)
        assert r.returncode == 0, r.stderr
        assert subprocess.run(argv + ["slurm-config"], capture_output=True, cwd=top).returncode == 0
    finally:
        shutil.rmtree(top)


# --- status ----------------------------------------------------------------

def test_status(daemon):
    create(daemon, 11)
    r = ctl(daemon.conf_path, "status")
    assert r.returncode == 0, r.stderr
    assert f"running, pid {daemon.proc.pid}" in r.stdout
    assert "1 active" in r.stdout and daemon.cfg.base in r.stdout and "free of" in r.stdout
    st = js(ctl(daemon.conf_path, "status", "--json"))
    assert st["pid"] == daemon.proc.pid and st["jobs"] == 1
    assert st["config"]["base"] == daemon.cfg.base and st["config"]["mounts"] == ["/tmp", "/var/tmp"]
    assert st["base_free_bytes"] > 0 and st["base_size_bytes"] >= st["base_free_bytes"]
    assert st["removals_queued"] == 0 and st["uptime"] >= 0


def test_daemon_down_exits_3(daemon):
    create(daemon, 12)
    daemon.stop()
    for args in (["status"], ["status", "--json"], ["list"], ["list", "--json"], ["show", "12"],
                 ["cleanup", "--orphans"], ["cleanup", "12", "--dry-run"]):
        r = ctl(daemon.conf_path, *args)
        assert r.returncode == 3, (args, r.returncode, r.stderr)
        assert "is privtmpd running?" in r.stderr and r.stdout == ""
    # enter needs only the pin, which outlives the daemon.
    r = ctl(daemon.conf_path, "enter", "12", "--", "true")
    assert r.returncode == 0, r.stderr


# --- list and show ---------------------------------------------------------

def test_list_shows_job_restart_user_age_size_and_processes(daemon):
    create(daemon, 21, restart=2)
    create(daemon, 22, user="root")
    with open(f"{daemon.job_dir(21, 2)}/tmp/big", "wb") as f:
        f.write(os.urandom(1 << 20))
    inside = InsideJob(daemon.pin(21)).wait_inside()
    try:
        time.sleep(1.1)
        r = ctl(daemon.conf_path, "list")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["JOB", "RESTART", "USER", "AGE", "SIZE", "FILES", "PROCS", "STATE"]
        row = {ln.split()[0]: ln.split() for ln in lines[1:] if ln.strip()}
        job, restart, user, age, size, files, procs, state = row["21"]
        assert (restart, user, procs, state) == ("2", "nobody", "1", "ready")
        assert re.fullmatch(r"0m0[1-9]s", age) and size.endswith("M") and float(size[:-1]) >= 1.0
        assert int(files) == 3             # tmp/, var_tmp/, tmp/big
        assert row["22"][2] == "root" and row["22"][6] == "0"

        data = js(ctl(daemon.conf_path, "list", "--json"))
        jobs = {j["job"]: j for j in data["jobs"]}
        j = jobs[21]
        assert j["restart"] == 2 and j["user"] == "nobody" and j["uid"] == NOBODY.pw_uid
        assert j["bytes"] >= 1 << 20 and j["entries"] == 3 and j["age_seconds"] >= 1
        assert j["processes"] == [inside.pid] and j["pinned"] and j["state"] == "ready"
        assert j["dir"] == daemon.job_dir(21, 2)
        assert data["removals"] == []

        fast = ctl(daemon.conf_path, "list", "--no-usage")
        assert fast.returncode == 0 and fast.stdout.splitlines()[1].split()[4:6] == ["-", "-"]
        fj = js(ctl(daemon.conf_path, "list", "--no-usage", "--json"))
        assert all(j["bytes"] is None and j["entries"] is None for j in fj["jobs"])
    finally:
        inside.stop()


def test_list_empty(daemon):
    r = ctl(daemon.conf_path, "list")
    assert r.returncode == 0 and "no job namespaces" in r.stdout
    assert js(ctl(daemon.conf_path, "list", "--json")) == {"jobs": [], "removals": []}


def test_show(daemon):
    create(daemon, 31)
    inside = InsideJob(daemon.pin(31)).wait_inside()
    try:
        r = ctl(daemon.conf_path, "show", "31")
        assert r.returncode == 0, r.stderr
        fields = dict(re.match(r"(\w+):\s*(.*)", ln).groups() for ln in r.stdout.splitlines())
        assert fields["job"] == "31" and fields["state"] == "ready" and fields["pinned"] == "yes"
        assert fields["user"].startswith("nobody (uid 65534")
        assert fields["pin"] == daemon.pin(31) and fields["dir"] == daemon.job_dir(31)
        assert fields["mounts"] == "/tmp, /var/tmp" and fields["procs"] == str(inside.pid)
        assert "ago" in fields["created"] and "entries" in fields["usage"]
        j = js(ctl(daemon.conf_path, "show", "31", "--json"))
        assert j["job"] == 31 and j["pin"] == daemon.pin(31) and j["processes"] == [inside.pid]
    finally:
        inside.stop()
    r = ctl(daemon.conf_path, "show", "32")
    assert r.returncode == 1 and "no job 32 on this node" in r.stderr


def test_list_and_show_flag_a_job_whose_pin_is_gone(daemon):
    create(daemon, 33)
    subprocess.run(["umount", "-l", daemon.pin(33)], check=True)
    r = ctl(daemon.conf_path, "list")
    assert "ready (no pin!)" in r.stdout
    assert "NO (stale" in ctl(daemon.conf_path, "show", "33").stdout
    # A state file that cannot be read is shown as such, not a crash.
    with open(f"{daemon.rundir}/jobs/34.json", "w") as f:
        f.write("{not json")
    assert "unreadable (no pin!)" in ctl(daemon.conf_path, "list").stdout
    r = ctl(daemon.conf_path, "show", "34")
    assert r.returncode == 0 and "state:   unreadable" in r.stdout and "usage:   -" in r.stdout


# --- enter -----------------------------------------------------------------

def test_enter_runs_a_command_in_the_jobs_namespace(daemon):
    create(daemon, 41)
    with open(f"{daemon.job_dir(41)}/tmp/marker", "w") as f:
        f.write("job-41-data\n")
    r = ctl(daemon.conf_path, "enter", "41", "--", "cat", "/tmp/marker")
    assert r.returncode == 0 and r.stdout == "job-41-data\n", r.stderr
    # The job's TMPDIR, its /var/tmp, and writes land in the job's directory.
    r = ctl(daemon.conf_path, "enter", "41", "--", "sh", "-c",
            'echo "$TMPDIR $PRIVTMPD_JOB $(pwd)"; echo from-enter > /var/tmp/written; ls -A /tmp')
    assert r.returncode == 0, r.stderr
    tmpdir, rest = r.stdout.splitlines()[0].split(" ", 1)
    assert r.stdout.splitlines()[1:] == ["marker"] and rest == "41 /"
    # As root, TMPDIR is root's own (the job's /tmp is the user's to fill
    # with symlinks), gone afterwards.
    assert tmpdir.startswith("/run/privtmpctl-enter.41.") and not os.path.exists(tmpdir)
    assert open(f"{daemon.job_dir(41)}/var_tmp/written").read() == "from-enter\n"
    assert not os.path.exists("/var/tmp/written")
    # The same mount namespace as the job's tasks.
    r = ctl(daemon.conf_path, "enter", "41", "--", "readlink", "/proc/self/ns/mnt")
    assert r.stdout.strip() == f"mnt:[{os.stat(daemon.pin(41)).st_ino}]"
    # Without "--" too, and the command's exit status comes back.
    assert ctl(daemon.conf_path, "enter", "41", "sh", "-c", "exit 7").returncode == 7
    r = ctl(daemon.conf_path, "enter", "41", "--", "no-such-command-xyz")
    assert r.returncode == 1 and "cannot run no-such-command-xyz" in r.stderr


def test_enter_warns_root_and_enters_as_the_user(daemon):
    create(daemon, 43)
    r = ctl(daemon.conf_path, "enter", "43", input="exit 0\n", env={"SHELL": "/bin/sh"})
    assert r.returncode == 0 and "the job user's own directories" in r.stderr, r.stderr
    r = ctl(daemon.conf_path, "enter", "--user", "43", "--", "sh", "-c", 'id -u; id -g; echo "$TMPDIR"; touch /tmp/f')
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["65534", "65534", "/tmp"]
    assert os.stat(f"{daemon.job_dir(43)}/tmp/f").st_uid == 65534
    assert "own directories" not in r.stderr
    r = ctl(daemon.conf_path, "enter", "--user", "43", "--", "cat", "/etc/shadow")
    assert r.returncode != 0


def test_enter_as_the_user_on_a_terminal_gets_a_terminal_of_its_own(daemon):
    """On the admin's terminal, a process of the user's could push
    keystrokes into it for the root shell that reads it next."""
    import pty
    import select
    import sys
    create(daemon, 44)
    master, slave = pty.openpty()
    outer = os.ttyname(slave)
    p = subprocess.Popen([sys.executable, "-m", "privtmpd.ctl", "--config", daemon.conf_path, "enter", "--user", "44",
                          "--", "sh", "-c", "tty; id -u; exit 5"], stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True, cwd=REPO)
    os.close(slave)
    out = b""
    while select.select([master], [], [], 30)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=30) == 5
    lines = out.decode().split()
    assert "65534" in lines, lines
    inner = next(x for x in lines if x.startswith("/dev/"))
    assert inner != outer


def test_enter_default_shell(daemon):
    create(daemon, 42)
    with open(f"{daemon.job_dir(42)}/tmp/hello", "w") as f:
        f.write("hi\n")
    r = ctl(daemon.conf_path, "enter", "42", input="cat /tmp/hello; exit 3\n", env={"SHELL": "/bin/sh"})
    assert r.returncode == 3 and r.stdout == "hi\n"


def test_enter_refuses_unknown_and_stale_jobs(daemon):
    r = ctl(daemon.conf_path, "enter", "43", "--", "true")
    assert r.returncode == 1 and "job 43 has no namespace on this node" in r.stderr
    with open(daemon.pin(44), "w"):
        pass                        # a stale pin: a plain file, nothing mounted on it
    r = ctl(daemon.conf_path, "enter", "44", "--", "true")
    assert r.returncode == 1 and "stale pin" in r.stderr and "privtmpctl cleanup 44" in r.stderr


# --- cleanup ---------------------------------------------------------------

def test_cleanup_dry_run_removes_nothing(daemon):
    create(daemon, 51)
    orphan = plant_orphan(daemon, 52)
    trash = plant_orphan(daemon, 53, name="job.53.0.deleting.abc123")
    before = sorted(os.listdir(daemon.base_parent))
    r = ctl(daemon.conf_path, "cleanup", "--orphans", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"{orphan}: would remove: no live namespace for job 52" in r.stdout
    assert f"{trash}: would remove: interrupted removal" in r.stdout
    assert "job.51" not in r.stdout
    data = js(ctl(daemon.conf_path, "cleanup", "--orphans", "--dry-run", "--json"))
    assert data["dry_run"] is True
    assert {o["path"] for o in data["orphans"]} == {orphan, trash} and data["jobs"] == []
    r = ctl(daemon.conf_path, "cleanup", "51", "--dry-run")
    assert r.returncode == 0
    assert r.stdout.startswith("job 51 (nobody): would tear down (state ready; pinned)")
    assert f"would remove {daemon.job_dir(51)}: named by the administrator" in r.stdout
    data = js(ctl(daemon.conf_path, "cleanup", "51", "--dry-run", "--json"))
    assert [j["job"] for j in data["jobs"]] == [51] and data["jobs"][0]["dirs"] == [daemon.job_dir(51)]
    time.sleep(0.5)
    assert sorted(os.listdir(daemon.base_parent)) == before
    assert os.path.exists(f"{orphan}/tmp/f0") and os.path.exists(f"{trash}/tmp/f0")
    assert js(ctl(daemon.conf_path, "show", "51", "--json"))["pinned"]


def test_cleanup_orphans_removes_what_no_live_job_owns(daemon):
    create(daemon, 61)
    orphan = plant_orphan(daemon, 62, files=20)
    leftover = plant_orphan(daemon, 63, name=".job.63.0.new.0a1b2c")
    # A user's directory at a job path is never ours to remove.
    squat = os.path.join(daemon.base_parent, "job.64.0")
    os.mkdir(squat)
    os.chown(squat, NOBODY.pw_uid, NOBODY.pw_gid)
    # State left by a create that never finished.
    with open(f"{daemon.rundir}/jobs/65.json", "w") as f:
        json.dump({"job": 65, "restart": 0, "state": "creating", "user": "nobody", "uid": NOBODY.pw_uid}, f)
    r = ctl(daemon.conf_path, "cleanup", "--orphans", "--wait")
    assert r.returncode == 0, r.stderr
    assert f"{orphan}: remove: no live namespace for job 62" in r.stdout
    assert f"{leftover}: remove: left by an interrupted job start" in r.stdout
    assert "job 65 (nobody): tear down (state creating; no pin)" in r.stdout
    assert "without its live namespace" in r.stdout
    assert not os.path.exists(orphan) and not os.path.exists(leftover)
    assert not os.path.exists(f"{daemon.rundir}/jobs/65.json")
    assert os.path.isdir(squat) and os.stat(squat).st_uid == NOBODY.pw_uid
    assert os.path.isdir(f"{daemon.job_dir(61)}/tmp") and js(ctl(daemon.conf_path, "show", "61", "--json"))["pinned"]
    assert not [n for n in os.listdir(daemon.base_parent) if "deleting" in n]
    # Nothing left: says so.
    r = ctl(daemon.conf_path, "cleanup", "--orphans")
    assert r.returncode == 0 and r.stdout == "nothing to clean up\n"
    data = js(ctl(daemon.conf_path, "cleanup", "--orphans", "--json"))
    assert data == {"dry_run": False, "jobs": [], "orphans": [], "skipped": []}
    log = daemon.log()
    assert re.search(r"job=62 user=- op=sweep result=orphan-queued ms=- dir=\S+job\.62\.0 "
                     r"reason=\"no live namespace for job 62\"", log)
    # Removed by the daemon itself (a small tree), which logs the owner's uid
    # (an orphan has no Epilog that named the user; no lookup in the daemon).
    assert re.search(rf"job=62 user={NOBODY.pw_uid} op=remove result=ok ms=[\d.]+ "
                     r"dir=\S+job\.62\.0\.deleting\.\w+ by=daemon files=20 dirs=3 bytes=\d+", log)


def test_cleanup_orphans_json_lists_paths_and_reasons(daemon):
    orphan = plant_orphan(daemon, 66)
    data = js(ctl(daemon.conf_path, "cleanup", "--orphans", "--json", "--wait"))
    assert data["orphans"] == [{"path": orphan, "job": 66, "reason": "no live namespace for job 66"}]
    assert not os.path.exists(orphan)


def test_cleanup_job_tears_down_a_live_job(daemon):
    create(daemon, 71)
    inside = InsideJob(daemon.pin(71)).wait_inside()
    try:
        r = ctl(daemon.conf_path, "cleanup", "71", "--wait")
        assert r.returncode == 0, r.stderr
        assert f"job 71 (nobody): tear down (state ready; pinned; killed 1 process(es) [{inside.pid}])" in r.stdout
        wait_for(lambda: not inside.alive(), what="the job's process to die")
    finally:
        inside.stop()
    assert not os.path.exists(daemon.pin(71)) and not os.path.exists(daemon.job_dir(71))
    assert ctl(daemon.conf_path, "show", "71").returncode == 1
    assert re.search(r"job=71 user=nobody op=teardown result=ok ms=- reason=\"named by the administrator\" "
                     rf"killed={inside.pid} dirs=\S+job\.71\.0", daemon.log())
    # A job with nothing on this node.
    r = ctl(daemon.conf_path, "cleanup", "72")
    assert r.returncode == 0 and r.stdout == "nothing to clean up for job 72\n"
    # Every directory of a job goes, whatever its restart count.
    plant_orphan(daemon, 73, restart=0)
    plant_orphan(daemon, 73, restart=1)
    data = js(ctl(daemon.conf_path, "cleanup", "73", "--json", "--wait"))
    assert data["jobs"][0]["dirs"] == [daemon.job_dir(73, 0), daemon.job_dir(73, 1)]
    assert not os.path.exists(daemon.job_dir(73, 0)) and not os.path.exists(daemon.job_dir(73, 1))


def test_cleanup_shows_progress_on_a_terminal_only(daemon):
    plant_orphan(daemon, 81, files=3000, size=0)
    argv = [sys.executable, "-m", "privtmpd.ctl", "--config", daemon.conf_path, "cleanup", "--orphans"]
    rc, out, tty = run_on_tty(argv)
    assert rc == 0 and "no live namespace for job 81" in out
    assert "removal finished" in tty          # it waited, on the terminal
    assert not os.path.exists(daemon.job_dir(81))
    # On a pipe: no progress, and no waiting unless asked.
    plant_orphan(daemon, 82, files=3000, size=0)
    r = ctl(daemon.conf_path, "cleanup", "--orphans")
    assert r.returncode == 0 and r.stderr == ""
    daemon.wait_removals()


def test_list_shows_progress_on_a_terminal_only(daemon):
    create(daemon, 83)
    os.makedirs(f"{daemon.job_dir(83)}/tmp/many")
    for i in range(2500):
        open(f"{daemon.job_dir(83)}/tmp/many/{i}", "w").close()
    argv = [sys.executable, "-m", "privtmpd.ctl", "--config", daemon.conf_path, "list"]
    rc, out, tty = run_on_tty(argv)
    assert rc == 0 and "measuring job 83:" in tty and "entries" in tty
    assert "measuring" not in out
    r = ctl(daemon.conf_path, "list")
    assert r.stderr == "" and r.stdout.splitlines()[1].split()[5] == "2503"   # tmp, var_tmp, tmp/many and its files


# --- config check and slurm-config ----------------------------------------

def write_conf(name, text):
    path = f"{TEST_RUN}/ctl-{name}.conf"
    os.makedirs(TEST_RUN, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_config_check(daemon):
    r = ctl(daemon.conf_path, "config", "check")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{daemon.conf_path}: OK: base={daemon.cfg.base} mounts=/tmp,/var/tmp")
    assert "mode=0700" in r.stdout
    data = js(ctl(daemon.conf_path, "config", "check", "--json"))
    assert data["valid"] and data["rundir"] == daemon.rundir and data["tmpdir"] == "/tmp"
    assert data["mounts"] == ["/tmp", "/var/tmp"] and data["remove_workers"] == 2

    bad = write_conf("bad", "base=/tmp/slurm\nmount=/tmp colour=blue\n")
    r = ctl(bad, "config", "check")
    assert r.returncode == 1 and f"{bad}:2: unknown setting 'colour'" in r.stderr
    r = ctl(f"{TEST_RUN}/ctl-missing.conf", "config", "check")
    assert r.returncode == 1 and "no such file" in r.stderr


def test_config_check_refuses_an_unsafe_base(daemon_factory):
    parent = "/var/lib/privtmpd-test/unsafe-base"
    os.makedirs(parent, exist_ok=True)
    try:
        os.chown(parent, NOBODY.pw_uid, NOBODY.pw_gid)
        conf = write_conf("unsafe", f"base={parent}/job\n")
        r = ctl(conf, "config", "check")
        assert r.returncode == 1
        assert f"{parent} is owned by uid {NOBODY.pw_uid}" in r.stderr
        os.chown(parent, 0, 0)
        os.chmod(parent, 0o777)
        r = ctl(conf, "config", "check")
        assert r.returncode == 1 and f"chmod go-w {parent}" in r.stderr
        os.chmod(parent, 0o755)
        assert ctl(conf, "config", "check").returncode == 0
    finally:
        shutil.rmtree(parent)


def test_slurm_config_with_the_default_socket():
    from privtmpd.ctl import hook_path
    conf = write_conf("default", "base=/tmp/slurm\n")
    r = ctl(conf, "slurm-config")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    assert lines[0] == f"Prolog={hook_path('prolog')}" and lines[1] == f"Epilog={hook_path('epilog')}"
    for line in lines[:2]:
        path = line.split("=", 1)[1]
        assert os.path.isabs(path) and os.access(path, os.X_OK)
    kind, so, *args = lines[2].split()
    assert kind == "required" and so.endswith("/privtmpd_spank.so") and os.path.exists(so)
    assert args == ["rundir=/run/privtmpd", "tmpdir=/tmp"]
    data = js(ctl(conf, "slurm-config", "--json"))
    assert data["needs_wrapper"] is False and data["prolog"] == hook_path("prolog") and data["spank"] == so
    assert data["plugstack"] == lines[2]


def test_slurm_config_with_another_socket_shows_wrappers(daemon):
    r = ctl(daemon.conf_path, "slurm-config")
    assert r.returncode == 0
    assert f"exec {REPO}/scripts/prolog.py --socket {daemon.socket}" in r.stdout
    assert "Prolog=/etc/slurm/privtmpd-prolog.sh" in r.stdout
    assert f"rundir={daemon.rundir} tmpdir=/tmp" in r.stdout
    data = js(ctl(daemon.conf_path, "slurm-config", "--json"))
    assert data["needs_wrapper"] is True and data["socket"] == daemon.socket


# --- doctor ----------------------------------------------------------------

def doctor(conf, *args, slurm_conf=None):
    extra = ["--slurm-conf", slurm_conf] if slurm_conf else []
    return ctl(conf, "doctor", *extra, *args)


def checks(conf, slurm_conf=None):
    r = doctor(conf, "--json", slurm_conf=slurm_conf)
    data = json.loads(r.stdout)
    assert r.returncode == (0 if data["ok"] else 1)
    assert data["problems"] == sum(c["status"] == "FAIL" for c in data["checks"])
    for c in data["checks"]:
        assert c["status"] in ("ok", "warn", "FAIL") and c["detail"]
        assert bool(c["fix"]) == (c["status"] != "ok"), c      # every problem comes with its fix
    return {c["name"]: c for c in data["checks"]}, data


def test_doctor_without_slurm(daemon):
    missing = "/var/lib/privtmpd-test/no-such-slurm.conf"
    r = doctor(daemon.conf_path, slurm_conf=missing)
    assert r.returncode == 1
    assert f"[FAIL] slurm.conf: cannot read {missing}" in r.stdout
    assert "fix: give its path: privtmpctl doctor --slurm-conf PATH" in r.stdout
    assert re.search(r"\n\d+ problem\(s\), \d+ warning\(s\)\n$", r.stdout)
    by, data = checks(daemon.conf_path, slurm_conf=missing)
    for name in ("config", "base directory", "mount points", "run directory", "daemon", "hook interpreter",
                 "kernel"):
        assert by[name]["status"] == "ok", by[name]
    assert by["free space"]["status"] in ("ok", "warn")       # depends on the machine's disk
    q = doctor(daemon.conf_path, "-q", slurm_conf=missing)
    assert q.returncode == 1
    assert q.stdout.splitlines() == [f"privtmpd: slurm.conf: {by['slurm.conf']['detail']} "
                                     f"(fix: {by['slurm.conf']['fix']})"]


def test_doctor_checks_link_protection(daemon, tmp_path):
    from privtmpd import doctor as doc
    by, _ = checks(daemon.conf_path, slurm_conf="/dev/null")
    on = all(open(f"/proc/sys/fs/protected_{k}").read().strip() != "0" for k in ("symlinks", "hardlinks"))
    assert by["link protection"]["status"] == ("ok" if on else "warn")
    (tmp_path / "protected_symlinks").write_text("0\n")
    (tmp_path / "protected_hardlinks").write_text("1\n")
    d = doc.Doctor(daemon.conf_path, "/dev/null")
    d.sysctl_fs = str(tmp_path)
    d.check_config()
    d.check_link_protection()
    r = d.results[-1]
    assert r.status == doc.WARN and "fs.protected_symlinks = 0" in r.detail
    assert "sysctl -w fs.protected_symlinks=1" in r.fix


def test_doctor_reports_an_invalid_configuration():
    conf = write_conf("doctor-bad", "base=relative/path\n")
    r = ctl(conf, "doctor", "-q")
    assert r.returncode == 1
    assert r.stdout.startswith(f"privtmpd: config: {conf}:1: base='relative/path' must be an absolute path")
    assert "privtmpctl config check" in r.stdout
    by, data = checks(conf)
    assert not data["ok"] and list(by) == ["config"]


def test_doctor_daemon_down_and_metrics(daemon_factory):
    mdir = "/var/lib/privtmpd-test/metrics-doctor"
    shutil.rmtree(mdir, ignore_errors=True)
    d = daemon_factory(f"metrics_dir={mdir}")
    by, _ = checks(d.conf_path, slurm_conf="/dev/null")
    assert by["metrics"]["status"] == "warn" and "does not exist" in by["metrics"]["detail"]
    os.makedirs(mdir)
    try:
        create(d, 91)
        wait_for(lambda: os.path.exists(f"{mdir}/privtmpd.prom"), what="the metrics file")
        by, _ = checks(d.conf_path, slurm_conf="/dev/null")
        assert by["metrics"]["status"] == "ok"
        d.stop()
        by, data = checks(d.conf_path, slurm_conf="/dev/null")
        assert by["daemon"]["status"] == "FAIL" and "systemctl start privtmpd" in by["daemon"]["fix"]
        q = doctor(d.conf_path, "-q", slurm_conf="/dev/null")
        assert q.returncode == 1 and any(ln.startswith("privtmpd: daemon: cannot connect")
                                         for ln in q.stdout.splitlines())
    finally:
        shutil.rmtree(mdir)


@pytest.fixture(scope="module")
def stack():
    s = Stack("ctl-doctor").start()
    yield s
    s.stop()


@pytest.mark.slurm
class TestDoctorOnACluster:
    """doctor against a real slurm.conf and plugstack.conf, written by the
    local cluster harness the way an admin wires privtmpd in: broken one
    thing at a time, then fixed."""

    @pytest.fixture(autouse=True)
    def _restore(self, stack):
        yield
        stack.cluster.write_plugstack([f"required {stack.so} rundir={stack.daemon.rundir} tmpdir=/tmp"])
        if stack.daemon.proc.poll() is not None:
            stack.daemon.start()

    def q(self, stack, slurm_conf=None):
        return doctor(stack.daemon.conf_path, "-q", slurm_conf=slurm_conf or stack.cluster.conf)

    def conf_variant(self, stack, name, edit):
        """A copy of the cluster's slurm.conf with one change (doctor only
        reads it; Slurm keeps running with the original)."""
        with open(stack.cluster.conf) as f:
            text = f.read()
        path = os.path.join(stack.cluster.workdir, f"doctor-{name}.conf")
        with open(path, "w") as f:
            f.write(edit(text))
        return path

    def test_healthy_node_and_a_real_job(self, stack):
        r = doctor(stack.daemon.conf_path, slurm_conf=stack.cluster.conf)
        assert r.returncode == 0, r.stdout
        by, data = checks(stack.daemon.conf_path, stack.cluster.conf)
        assert data["ok"]
        for name in ("slurm.conf Prolog", "slurm.conf Epilog", "entry helper", "slurm paths", "daemon"):
            assert by[name]["status"] == "ok", by[name]
        assert stack.cluster.prolog in by["slurm.conf Prolog"]["detail"]
        q = self.q(stack)
        assert q.returncode == 0 and q.stdout == ""
        # SLURM_CONF is honoured too.
        r = ctl(stack.daemon.conf_path, "doctor", "-q", env={"SLURM_CONF": stack.cluster.conf})
        assert r.returncode == 0 and r.stdout == ""

        # What doctor vouches for works: a job gets its private /tmp, and
        # privtmpctl sees it (with the user Slurm named) and can enter it.
        c = stack.cluster
        gate = os.path.join(c.user_dir("privtmp1"), "go-ctl")
        if os.path.exists(gate):
            os.unlink(gate)
        script = f"#!/bin/sh\necho batch > /tmp/from-job\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n"
        jobid, _ = c.sbatch("privtmp1", script, wait=False)
        wait_for(lambda: os.path.exists(f"{stack.job_dir(jobid)}/tmp/from-job"), 60, "the job's file")
        data = js(ctl(stack.daemon.conf_path, "list", "--json"))
        [j] = [j for j in data["jobs"] if j["job"] == int(jobid)]
        assert j["user"] == "privtmp1" and j["processes"] and j["state"] == "ready"
        r = ctl(stack.daemon.conf_path, "enter", jobid, "--", "cat", "/tmp/from-job")
        assert r.returncode == 0 and r.stdout == "batch\n"
        open(gate, "w").close()
        c.wait_job(jobid)
        wait_for(lambda: not os.path.exists(stack.job_dir(jobid)), 60, "the Epilog's removal")
        c.wait_idle(timeout=60)

    def test_entry_helper_missing_from_plugstack(self, stack):
        stack.cluster.write_plugstack([])
        q = self.q(stack)
        assert q.returncode == 1
        assert "privtmpd: entry helper: privtmpd_spank.so is not listed in" in q.stdout
        assert f"rundir={stack.daemon.rundir}" in q.stdout          # the fix has the exact line
        stack.cluster.write_plugstack([f"required {stack.so} rundir={stack.daemon.rundir} tmpdir=/tmp"])
        assert self.q(stack).returncode == 0

    def test_plugstack_with_the_wrong_rundir_or_missing_so(self, stack):
        stack.cluster.write_plugstack([f"required {stack.so} rundir=/run/elsewhere tmpdir=/tmp"])
        q = self.q(stack)
        assert q.returncode == 1 and "rundir=/run/elsewhere" in q.stdout and "no task would find" in q.stdout
        stack.cluster.write_plugstack([f"required /nonexistent/privtmpd_spank.so rundir={stack.daemon.rundir}"])
        q = self.q(stack)
        assert q.returncode == 1 and "/nonexistent/privtmpd_spank.so (listed in" in q.stdout
        # optional instead of required: a warning, not a drain.
        stack.cluster.write_plugstack([f"optional {stack.so} rundir={stack.daemon.rundir} tmpdir=/tmp"])
        by, data = checks(stack.daemon.conf_path, stack.cluster.conf)
        assert data["ok"] and by["entry helper"]["status"] == "warn" and "optional" in by["entry helper"]["detail"]

    def test_original_plugin_still_listed(self, stack):
        stack.cluster.write_plugstack(["required /usr/lib/slurm/private-tmpdir.so base=/tmp/slurm mount=/tmp",
                                       f"required {stack.so} rundir={stack.daemon.rundir} tmpdir=/tmp"])
        q = self.q(stack)
        assert q.returncode == 1 and "privtmpd: original plugin:" in q.stdout and "remove that line" in q.stdout

    def test_prolog_and_epilog_lines(self, stack):
        no_prolog = self.conf_variant(stack, "noprolog", lambda t: re.sub(r"(?m)^Prolog=.*\n", "", t))
        q = self.q(stack, no_prolog)
        assert q.returncode == 1 and f"privtmpd: slurm.conf Prolog: no Prolog= in {no_prolog}" in q.stdout
        other = self.conf_variant(stack, "otherepilog", lambda t: re.sub(r"(?m)^Epilog=.*$", "Epilog=/bin/true", t))
        q = self.q(stack, other)
        assert q.returncode == 1 and "Epilog=/bin/true does not run privtmpd's epilog hook" in q.stdout
        # A wrapper that forgets --socket talks to the default socket.
        wrapper = os.path.join(stack.cluster.workdir, "doctor-prolog.sh")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {REPO}/scripts/prolog.py\n")
        os.chmod(wrapper, 0o755)
        nosock = self.conf_variant(stack, "nosock", lambda t: re.sub(r"(?m)^Prolog=.*$", f"Prolog={wrapper}", t))
        q = self.q(stack, nosock)
        assert q.returncode == 1 and f"without --socket {stack.daemon.socket}" in q.stdout
        # Prolog as a glob over a directory holding the wrapper: fine.
        pdir = os.path.join(stack.cluster.workdir, "prolog.d")
        os.makedirs(pdir, exist_ok=True)
        shutil.copy(stack.cluster.prolog, os.path.join(pdir, "50-privtmpd"))
        globbed = self.conf_variant(stack, "glob", lambda t: re.sub(r"(?m)^Prolog=.*$", f"Prolog={pdir}/*", t))
        assert self.q(stack, globbed).returncode == 0

    def test_conflicting_or_hidden_slurm_settings(self, stack):
        jc = self.conf_variant(stack, "jc", lambda t: t + "JobContainerType=job_container/tmpfs\n")
        q = self.q(stack, jc)
        assert q.returncode == 1 and "privtmpd: job_container:" in q.stdout
        spool = self.conf_variant(stack, "spool",
                                  lambda t: re.sub(r"(?m)^SlurmdSpoolDir=.*$", "SlurmdSpoolDir=/var/tmp/spool", t))
        q = self.q(stack, spool)
        assert q.returncode == 1 and "SlurmdSpoolDir /var/tmp/spool lies under private mount /var/tmp" in q.stdout
        # An Include'd file is read too.
        inc = os.path.join(stack.cluster.workdir, "doctor-included.conf")
        with open(inc, "w") as f:
            f.write("JobContainerType=job_container/tmpfs\n")
        included = self.conf_variant(stack, "inc", lambda t: t + f"Include {inc}\n")
        assert self.q(stack, included).returncode == 1

    def test_unsafe_base_directory(self, stack):
        parent = stack.daemon.base_parent
        os.chmod(parent, 0o777)          # world-writable without the sticky bit
        try:
            q = self.q(stack)
            assert q.returncode == 1 and "privtmpd: base directory:" in q.stdout
            assert f"chmod go-w {parent}" in q.stdout
        finally:
            os.chmod(parent, 0o1777)
        assert self.q(stack).returncode == 0

    def test_shared_pin_directory(self, stack):
        nsdir = f"{stack.daemon.rundir}/ns"
        subprocess.run(["mount", "--make-shared", nsdir], check=True)
        try:
            q = self.q(stack)
            assert q.returncode == 1 and f"{nsdir} is a shared mount" in q.stdout
        finally:
            subprocess.run(["mount", "--make-private", nsdir], check=True)
        assert self.q(stack).returncode == 0

    def test_daemon_stopped_then_started(self, stack):
        stack.daemon.stop()
        q = self.q(stack)
        assert q.returncode == 1 and "privtmpd: daemon:" in q.stdout
        stack.daemon.start()
        assert self.q(stack).returncode == 0

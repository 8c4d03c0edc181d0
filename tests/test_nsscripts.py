"""Namespace scripts (ns_script=, ns_epilog=) against a real daemon: they
run as root inside the job's mount namespace with a clean environment,
their output lands in the daemon's log, a failing or hanging one is dealt
with by policy, and while one runs other jobs' requests are served."""

import os
import re
import shutil
import threading
import time

import pytest

from harness import nsenter, wait_for
from privtmpd import client, config

root = pytest.mark.root

SCRIPTS_TOP = "/var/lib/privtmpd-test/scripts"


@pytest.fixture
def scripts(request):
    """A root-only directory for the test's scripts (outside every mount=
    point, as the daemon demands)."""
    os.makedirs(SCRIPTS_TOP, mode=0o755, exist_ok=True)
    os.chmod(SCRIPTS_TOP, 0o755)
    d = os.path.join(SCRIPTS_TOP, re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60])
    shutil.rmtree(d, ignore_errors=True)
    os.mkdir(d, 0o755)

    def write(name, body, mode=0o755):
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body)
        os.chmod(path, mode)
        return path
    yield write
    shutil.rmtree(d, ignore_errors=True)


def create(d, job, uid=65534, timeout=60):
    return client.request({"op": "create", "job": str(job), "restart": "0", "uid": str(uid), "gid": "65534",
                           "user": "nobody"}, d.socket, timeout=timeout, retry=5)


def log_lines(d, pattern):
    with open(d.log_path, errors="replace") as f:
        return [ln for ln in f.read().splitlines() if re.search(pattern, ln)]


def wait_script_running(d, timeout=30):
    """Until the daemon runs a script for a create: the request was sent
    from a thread, which a busy machine may not have run yet."""
    wait_for(lambda: d.request(op="status")["scripts_running"] == 1, timeout, "a script to be running")


def dead(pid, argv=b"sleep\x001000\x00"):
    """The script's `sleep 1000` at pid has ended: gone, a zombie its new
    parent has not reaped yet (PID 1 here may reap slowly; a zombie has no
    command line), or the PID is someone else's now (pid_max is 32768 on
    this machine, and the suite forks a lot)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read() != argv
    except (FileNotFoundError, ProcessLookupError):
        return True


# --- configuration -----------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("ns_script=etc/x", "must be an absolute path"),
    ("ns_script=/tmp/x.sh", "lies under /tmp"),
    ("ns_epilog=/var/tmp/sub/x.sh", "lies under /var/tmp"),
    ("shm=1g ns_script=/dev/shm/x", "lies under /dev/shm"),
    ("ns_script=/srv/slurm.5.0/x", "privtmpd's own job or run directories"),
    ("ns_script=/etc/x ns_script_timeout=0", "between 1 and 240"),
    ("ns_script=/etc/x ns_script_timeout=600", "between 1 and 240"),
    ("ns_script=/etc/x ns_script_timeout=soon", "not a number"),
    ("ns_script=/etc/x on_script_error=ignore", "use fail"),
    ("ns_script_timeout=10", "no effect without ns_script= or ns_epilog="),
])
def test_script_keys_are_checked(text, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse(f"base=/srv/slurm mount=/tmp mount=/var/tmp\n{text}\n", "/etc/privtmpd/privtmpd.conf")
    assert str(e.value).startswith("/etc/privtmpd/privtmpd.conf:2: ")
    assert message in str(e.value)


def test_script_defaults():
    cfg = config.parse("ns_script=/etc/privtmpd/init ns_epilog=no")
    assert (cfg.ns_script, cfg.ns_epilog, cfg.ns_script_timeout, cfg.on_script_error) == \
        ("/etc/privtmpd/init", "", 30.0, "fail")


@root
def test_start_up_refuses_unsafe_scripts(scripts, tmp_path):
    good = scripts("ok.sh", "exit 0\n")
    config.check_ns_script(good, "ns_script")           # the baseline passes
    os.chmod(good, 0o775)
    with pytest.raises(config.ConfigError, match="writable by group or others"):
        config.check_ns_script(good, "ns_script")
    os.chmod(good, 0o644)
    with pytest.raises(config.ConfigError, match="not executable"):
        config.check_ns_script(good, "ns_script")
    os.chmod(good, 0o755)
    os.chown(good, 65534, 0)
    with pytest.raises(config.ConfigError, match="owned by uid 65534"):
        config.check_ns_script(good, "ns_script")
    os.chown(good, 0, 0)
    d = os.path.dirname(good)
    os.chmod(d, 0o1777)                 # sticky is no excuse for a script's directory
    try:
        with pytest.raises(config.ConfigError, match="writable by group or others"):
            config.check_ns_script(good, "ns_script")
    finally:
        os.chmod(d, 0o755)
    link = os.path.join(d, "link.sh")
    os.symlink(good, link)
    with pytest.raises(config.ConfigError, match="symbolic link"):
        config.check_ns_script(link, "ns_script")
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.check_ns_script(os.path.join(d, "missing.sh"), "ns_script")


@root
def test_daemon_does_not_start_with_a_writable_script(daemon_factory, scripts):
    path = scripts("init.sh", "exit 0\n", mode=0o757)
    d = daemon_factory(f"ns_script={path}", start=False)
    with pytest.raises(RuntimeError, match=r"ns_script=.*writable by group or others"):
        d.start()


# --- running -------------------------------------------------------------------

@root
def test_ns_script_runs_inside_the_job_namespace_with_a_clean_environment(daemon_factory, scripts):
    path = scripts("init.sh", 'echo "marker for $SLURM_JOB_ID" > /tmp/ns-script-marker\n'
                              'env | sort > /tmp/ns-script-env\n'
                              'ls -l /proc/self/fd/ > /tmp/ns-script-fds\n'
                              'echo "hello from the script"; echo "to stderr" >&2\n')
    os.environ["PRIVTMPD_TEST_LEAK"] = "should-not-reach-the-script"
    try:
        d = daemon_factory(f"ns_script={path}")
    finally:
        del os.environ["PRIVTMPD_TEST_LEAK"]
    assert create(d, 61)["ok"]
    # In the job's /tmp (its private directory), not the host's.
    assert not os.path.exists("/tmp/ns-script-marker")
    inner = os.path.join(d.job_dir(61), "tmp")
    with open(os.path.join(inner, "ns-script-marker")) as f:
        assert f.read() == "marker for 61\n"
    assert nsenter(d.pin(61), "cat", "/tmp/ns-script-marker").stdout == "marker for 61\n"
    st = os.stat(os.path.join(inner, "ns-script-marker"))
    assert st.st_uid == 0                                        # run as root
    with open(os.path.join(inner, "ns-script-env")) as f:
        env = dict(line.split("=", 1) for line in f.read().splitlines())
    assert env["SLURM_JOB_ID"] == "61" and env["SLURM_JOB_UID"] == "65534"
    assert env["SLURM_JOB_GID"] == "65534" and env["SLURM_JOB_USER"] == "nobody"
    assert env["SLURM_JOB_RESTART_COUNT"] == "0"
    assert env["SLURM_SCRIPT_CONTEXT"] == "privtmpd_ns_script"
    assert env["PRIVTMPD_JOB_DIR"] == d.job_dir(61)
    assert env["PRIVTMPD_MOUNTS"] == "/tmp:/var/tmp"
    assert "PRIVTMPD_TEST_LEAK" not in env and "NOTIFY_SOCKET" not in env and "PYTHONPATH" not in env
    # Only stdin, stdout, stderr (and ls's own directory fd): none of the daemon's.
    with open(os.path.join(inner, "ns-script-fds")) as f:
        fds = sorted(int(m) for m in re.findall(r" (\d+) -> ", f.read()))
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4, fds
    assert log_lines(d, r'job=61 user=nobody op=ns_script result=output .*line="hello from the script"')
    assert log_lines(d, r'job=61 .*op=ns_script result=output .*line="to stderr"')
    assert log_lines(d, r"job=61 .*op=ns_script result=ok ")
    assert d.request(op="show", job="61")["jobs"][0]["state"] == "ready"
    assert d.destroy(61)["ok"]


@root
def test_ns_epilog_runs_before_teardown_while_the_job_is_still_there(daemon_factory, scripts):
    path = scripts("epilog.sh", 'echo "exit=$SLURM_JOB_EXIT_CODE ctx=$SLURM_SCRIPT_CONTEXT"\n'
                                'ls /tmp\n'
                                'cp /tmp/result "$PRIVTMPD_JOB_DIR.saved" 2>&1 || echo copy failed\n')
    # base= lies outside /tmp here, so the host path is visible inside too.
    d = daemon_factory(f"ns_epilog={path}")
    assert create(d, 62)["ok"]
    nsenter(d.pin(62), "sh", "-c", "echo job output > /tmp/result")
    reply = d.request(op="destroy", job="62", exit_code="256")
    assert reply["ok"] and reply["unpinned"]
    assert log_lines(d, r'job=62 .*op=ns_epilog result=output .*line="exit=256 ctx=privtmpd_ns_epilog"')
    assert log_lines(d, r'job=62 .*op=ns_epilog result=output .*line=result')
    with open(d.job_dir(62) + ".saved") as f:
        assert f.read() == "job output\n"
    os.unlink(d.job_dir(62) + ".saved")
    assert not os.path.exists(d.pin(62))


@root
def test_failing_ns_script_fails_the_create_and_rolls_back(daemon_factory, scripts):
    path = scripts("init.sh", "echo 'cannot set up scratch' >&2\nexit 3\n")
    d = daemon_factory(f"ns_script={path}")
    reply = create(d, 63)
    assert not reply["ok"]
    assert "failed with exit status 3" in reply["error"] and "on_script_error=fail" in reply["error"]
    assert not os.path.exists(d.pin(63)) and not os.path.exists(d.job_dir(63))
    assert d.request(op="list")["jobs"] == []
    assert log_lines(d, r'job=63 .*op=ns_script result=output .*line="cannot set up scratch"')
    assert log_lines(d, r"job=63 .*op=ns_script result=failed .*status=\"failed with exit status 3\"")


@root
def test_on_script_error_log_lets_the_job_start(daemon_factory, scripts):
    path = scripts("init.sh", "exit 1\n")
    d = daemon_factory(f"ns_script={path} on_script_error=log")
    assert create(d, 64)["ok"]
    assert os.path.exists(d.pin(64))
    assert d.request(op="show", job="64")["jobs"][0]["state"] == "ready"
    assert log_lines(d, r"job=64 .*op=create result=script-error-ignored")
    assert d.destroy(64)["ok"]


@root
def test_hanging_script_is_killed_at_its_limit_and_blocks_no_other_job(daemon_factory, scripts):
    # The script hangs only for job 65; it also leaves a background child
    # in its process group, which must die with it.
    path = scripts("init.sh", '[ "$SLURM_JOB_ID" = 65 ] || exit 0\n'
                              'sleep 1000 & echo "child $!"\n'
                              'exec sleep 1000\n')
    d = daemon_factory(f"ns_script={path} ns_script_timeout=3")
    result = {}

    def slow():
        t = time.monotonic()
        result["reply"] = create(d, 65)
        result["s"] = time.monotonic() - t
    t = threading.Thread(target=slow)
    t.start()
    wait_script_running(d)          # job 65's script is running now
    assert "reply" not in result
    t0 = time.monotonic()
    assert create(d, 66)["ok"]      # served while 65 waits
    other = time.monotonic() - t0
    st = d.request(op="status")     # and queries too
    assert st["ok"] and st["scripts_running"] == 1
    t.join(30)
    # Behind the hanging script it would have waited for its time limit
    # (3 s from its start); its own ns_script (exit 0) is a fork and exec.
    assert other < 1.5, f"another job's create waited {other:.2f} s behind a hanging script"
    assert not result["reply"]["ok"] and "time limit of 3 s" in result["reply"]["error"]
    assert 2.5 < result["s"] < 7.0, result["s"]
    child = int(log_lines(d, r"job=65 .*line=\"child \d+\"")[0].rsplit("child ", 1)[1].rstrip('"'))
    deadline = time.monotonic() + 30
    while not dead(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead(child), "the script's background child outlived its time limit"
    assert log_lines(d, r"job=65 .*op=ns_script result=timeout ")
    assert not os.path.exists(d.pin(65)) and os.path.exists(d.pin(66))
    assert d.destroy(66)["ok"]


@root
def test_epilog_while_ns_script_runs_tears_down_and_the_prolog_fails(daemon_factory, scripts):
    path = scripts("init.sh", "exec sleep 1000\n")
    d = daemon_factory(f"ns_script={path} ns_script_timeout=60")
    result = {}
    t = threading.Thread(target=lambda: result.update(reply=create(d, 67)))
    t.start()
    # The Epilog must come while the script runs: after a fixed sleep it
    # could come first, and the create then made the job for good.
    wait_script_running(d)
    t0 = time.monotonic()
    assert d.destroy(67)["ok"]
    # Waiting for the script instead of killing it would take its 60 s limit.
    assert time.monotonic() - t0 < 15
    t.join(30)
    assert not result["reply"]["ok"] and "cancelled" in result["reply"]["error"]
    assert not os.path.exists(d.pin(67)) and not os.path.exists(d.job_dir(67))
    assert d.request(op="list")["jobs"] == []


@root
def test_duplicate_prolog_waits_for_the_same_script(daemon_factory, scripts):
    path = scripts("init.sh", "echo run >> /tmp/runs; sleep 1\n")
    d = daemon_factory(f"ns_script={path}")
    replies = []
    ts = [threading.Thread(target=lambda: replies.append(create(d, 68))) for _ in range(2)]
    for t in ts:
        t.start()
        time.sleep(0.2)
    for t in ts:
        t.join(20)
    assert [r["ok"] for r in replies] == [True, True]
    with open(os.path.join(d.job_dir(68), "tmp", "runs")) as f:
        assert f.read() == "run\n"
    assert d.destroy(68)["ok"]


@root
def test_script_output_is_bounded_in_the_log(daemon_factory, scripts):
    path = scripts("init.sh", "printf 'esc \\033[31m red\\n'\n"
                              "head -c 100000 /dev/zero | tr '\\0' x; echo\n"
                              'i=0; while [ $i -lt 5000 ]; do echo "line $i"; i=$((i+1)); done\n')
    d = daemon_factory(f"ns_script={path}")
    assert create(d, 69)["ok"]
    lines = log_lines(d, r"job=69 .*op=ns_script result=output ")
    assert len(lines) == 100 and all(len(ln) < 1000 for ln in lines)
    assert 'line="esc ?[31m red"' in lines[0]          # no terminal escapes in the log
    assert re.search(r'line=x{400}\.\.\.$', lines[1])       # a 100 kB line: cut
    assert log_lines(d, r"job=69 .*op=ns_script result=output-truncated .*dropped_lines=")
    assert d.destroy(69)["ok"]


@root
def test_stopping_daemon_kills_a_running_script(daemon_factory, scripts):
    path = scripts("init.sh", "echo $$ > /run/privtmpd-test/ns-script.pid; exec sleep 1000\n")
    d = daemon_factory(f"ns_script={path}")
    result = {}
    t = threading.Thread(target=lambda: result.update(reply=create(d, 70)))
    t.start()
    # The script writes its pid before it execs sleep: a whole line once
    # the file is not empty.
    wait_for(lambda: os.path.exists("/run/privtmpd-test/ns-script.pid")
             and open("/run/privtmpd-test/ns-script.pid").read().endswith("\n"), 30, "the script's pid file")
    with open("/run/privtmpd-test/ns-script.pid") as f:
        pid = int(f.read())
    wait_for(lambda: not dead(pid), 30, "the script to exec sleep")
    os.unlink("/run/privtmpd-test/ns-script.pid")
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 5
    t.join(10)
    assert not result["reply"]["ok"]
    # Killed by the stop; its death (and reaping by PID 1) may trail the
    # daemon's exit a moment.
    wait_for(lambda: dead(pid), 30, "the script to die with the daemon's stop")
    # The next start rolls the half-made job back.
    d.start()
    assert not os.path.exists(d.pin(70))
    assert d.request(op="list")["jobs"] == []



@root
def test_doctor_checks_the_scripts(daemon_factory, scripts, tmp_path):
    import json

    from cli import ctl
    path = scripts("init.sh", "exit 0\n")
    d = daemon_factory(f"ns_script={path} ns_script_timeout=30")
    slurm_conf = tmp_path / "slurm.conf"
    slurm_conf.write_text("PrologEpilogTimeout=20\n")

    def by_name():
        r = ctl(d.conf_path, "doctor", "--json", "--slurm-conf", str(slurm_conf))
        return {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    by = by_name()
    assert by["ns_script"]["status"] == "ok", by["ns_script"]
    assert by["script time limit"]["status"] == "warn"
    assert "PrologEpilogTimeout=20" in by["script time limit"]["detail"]
    assert by["base directory"]["status"] == "ok"
    os.chmod(path, 0o777)
    by = by_name()
    assert by["ns_script"]["status"] == "FAIL" and "writable by group or others" in by["ns_script"]["detail"]
    assert "chmod go-w" in by["ns_script"]["detail"] and by["ns_script"]["fix"]
    assert by["base directory"]["status"] == "ok"     # a script problem is reported once, as itself


def test_the_job_dir_is_not_exported_where_it_names_the_users_files():
    """Under a private mount point (base=/tmp/slurm, the default), the host
    path of the job directory names, inside the namespace, a path in the
    user's own /tmp: a script writing there would follow their links."""
    from privtmpd import nsscripts
    cfg = config.parse("base=/tmp/slurm\n", "test")
    st = {"job": 5, "restart": 0, "uid": 1000, "gid": 1000, "dir": "/tmp/slurm.5.0", "mounts": ["/tmp", "/var/tmp"]}
    assert "PRIVTMPD_JOB_DIR" not in nsscripts.environment(cfg, nsscripts.INIT, st)
    st["dir"] = "/var/lib/slurm-jobs/job.5.0"         # outside every private mount point
    assert nsscripts.environment(cfg, nsscripts.EPILOG, st)["PRIVTMPD_JOB_DIR"] == st["dir"]
    st["dir"], st["mounts"] = "/tmpx/job.5.0", ["/tmp"]   # a name that only starts like a mount point
    assert nsscripts.environment(cfg, nsscripts.INIT, st)["PRIVTMPD_JOB_DIR"] == st["dir"]


@root
def test_sbcast_opens_the_job_directory_only_after_ns_script(daemon_factory, scripts):
    """With sbcast=yes the job's user can reach $base.J.R/tmp from a host
    shell; while ns_script runs as root in that /tmp, they must not (a link
    planted there would be followed by root), so the top stays 0700 until
    the script is done."""
    import stat as stat_
    path = scripts("init.sh", 'sleep 1; echo prestaged > /tmp/.prestaged\n')
    d = daemon_factory(f"ns_script={path} sbcast=yes")
    modes = []
    t = threading.Thread(target=lambda: modes.append(create(d, 64)))
    t.start()
    seen = []
    while t.is_alive():
        try:
            seen.append(stat_.S_IMODE(os.lstat(d.job_dir(64)).st_mode))
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    t.join()
    assert modes and modes[0]["ok"], modes
    # Closed for the whole second the script ran, open only after it.
    assert seen == sorted(seen) and seen.count(0o700) >= 10 and set(seen) <= {0o700, 0o711}, seen
    assert stat_.S_IMODE(os.lstat(d.job_dir(64)).st_mode) == 0o711  # open once the job is ready
    with open(os.path.join(d.job_dir(64), "tmp", ".prestaged")) as f:
        assert f.read() == "prestaged\n"
    assert d.destroy(64)["ok"]

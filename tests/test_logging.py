"""The daemon's log, from a real daemon: one line per event, each starting
with job= user= op= result= ms=; errors that name the system call, the
path and a hint; the journal's priorities; syslog when detached."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from cli import start_daemon, wait_for
from harness import REPO

pytestmark = pytest.mark.root

PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} privtmpd\[\d+\]: (DEBUG|INFO|WARNING|ERROR) (.*)$")
VALUE = r'(?:"(?:[^"\\]|\\.)*"|[^\s"=]+)'
EVENT = re.compile(rf"^job=(\S+) user=(\S+) op=(\S+) result=(\S+) ms=(\S+)((?: \w+={VALUE})*)$")


def events(text):
    """[(level, {field: value})] of every log line; fails on a line that
    does not follow the format."""
    out = []
    for line in text.splitlines():
        m = PREFIX.match(line)
        assert m, f"not a log line: {line!r}"
        e = EVENT.match(m.group(2))
        assert e, f"not an event line: {m.group(2)!r}"
        fields = dict(zip(("job", "user", "op", "result", "ms"), e.groups()[:5]))
        for k, v in re.findall(rf" (\w+)=({VALUE})", e.group(6)):
            fields[k] = v[1:-1].replace('\\"', '"').replace("\\\\", "\\") if v.startswith('"') else v
        out.append((m.group(1), fields))
    return out


def find(evs, **want):
    return [f for _, f in evs if all(f.get(k) == v for k, v in want.items())]


def send_raw(path, data):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(65536)
    s.close()
    return reply


def test_one_line_per_event_with_job_user_op_result_ms(daemon):
    assert daemon.request(op="create", job="101", restart="0", uid="65534", gid="65534", user="nobody")["ok"]
    with open(f"{daemon.job_dir(101)}/tmp/data", "wb") as f:
        f.write(b"x" * 8192)
    assert daemon.request(op="create", job="101", restart="0", uid="65534", gid="65534", user="nobody")["existing"]
    assert daemon.destroy(101)["ok"]
    daemon.wait_removals()
    daemon.request(op="list")
    assert b'"bad-request"' in send_raw(daemon.socket, b'{"op": "create", "job": "007"}\n')
    daemon.stop()
    evs = events(daemon.log())

    [start] = find(evs, op="start")
    assert start["result"] == "ok" and start["socket"] == daemon.socket and start["job"] == "-"
    creates = find(evs, op="create", job="101")
    assert len(creates) == 2 and all(c["user"] == "nobody" and c["result"] == "ok" for c in creates)
    assert all(re.fullmatch(r"\d+\.\d", c["ms"]) for c in creates)
    [destroy] = find(evs, op="destroy", job="101")
    assert destroy["user"] == "nobody" and destroy["result"] == "ok" and float(destroy["ms"]) >= 0
    [remove] = find(evs, op="remove", job="101")
    assert remove["user"] == "nobody" and remove["result"] == "ok"           # the owner of the files
    assert remove["files"] == "1" and int(remove["bytes"]) >= 8192 and remove["dir"].startswith(daemon.job_dir(101))
    [bad] = [(lvl, f) for lvl, f in evs if f["result"] == "bad-request"]
    assert bad[0] == "WARNING" and "job id '007'" in bad[1]["error"]
    [stop] = find(evs, op="stop", result="ok")
    # Queries are not logged unless --debug.
    assert not find(evs, op="list") and not find(evs, op="status")
    levels = {f["op"]: lvl for lvl, f in evs if f["job"] == "101"}
    assert levels == {"create": "INFO", "destroy": "INFO", "remove": "INFO", "usage": "INFO"}
    [usage] = find(evs, op="usage", job="101")      # the job's final size, from the removal's counts
    assert usage["files"] == "1" and usage["bytes"] == remove["bytes"] and usage["source"] == "removal"


def test_debug_logs_queries_too(daemon_factory):
    d = daemon_factory(start=False)
    start_daemon(d, ["--debug"])
    d.request(op="list")
    d.stop()
    evs = events(d.log())
    assert [lvl for lvl, f in evs if f["op"] == "list"] == ["DEBUG"]
    assert find(evs, op="status")            # wait_ready's


def test_errors_name_the_syscall_the_path_and_a_hint(daemon):
    moved = daemon.base_parent + ".away"
    os.rename(daemon.base_parent, moved)
    try:
        # The real Prolog, as slurmd runs it: no PATH, Slurm's variables.
        env = {"SLURM_JOB_ID": "102", "SLURM_JOB_UID": "65534", "SLURM_JOB_GID": "65534",
               "SLURM_JOB_USER": "nobody", "SLURM_JOB_RESTART_COUNT": "0"}
        r = subprocess.run([os.path.join(REPO, "scripts", "prolog.py"), "--socket", daemon.socket], env=env,
                           capture_output=True, text=True, timeout=60)
    finally:
        os.rename(moved, daemon.base_parent)
    want = f"openat({daemon.base_parent}): No such file or directory (a directory on the path is missing"
    assert r.returncode == 1 and want in r.stderr, r.stderr
    evs = events(daemon.log())
    [err] = [(lvl, f) for lvl, f in evs if f["op"] == "create" and f["job"] == "102"]
    assert err[0] == "ERROR" and err[1]["result"] == "error" and err[1]["user"] == "nobody"
    assert err[1]["error"].startswith(want) and "privtmpctl doctor" in err[1]["error"]


def test_startup_errors_name_the_syscall_and_path(daemon_factory):
    blocker = "/run/privtmpd-test/a-file-not-a-dir"
    with open(blocker, "w"):
        pass
    try:
        d = daemon_factory(start=False)
        os.makedirs(d.base_parent, exist_ok=True)
        d.text = d.text.replace(f"rundir={d.rundir}", f"rundir={blocker}/run")
        with open(d.conf_path, "w") as f:
            f.write(d.text)
        r = subprocess.run([sys.executable, "-m", "privtmpd.daemon", "--foreground", "--config", d.conf_path],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert r.stderr.startswith(f"privtmpd: mkdirat({blocker}): File exists (something else already sits at "
                                   "that path)"), r.stderr
    finally:
        os.unlink(blocker)


def test_journal_gets_priorities(daemon_factory):
    d = daemon_factory(start=False)
    os.makedirs(os.path.dirname(d.log_path), exist_ok=True)
    open(d.log_path, "ab").close()
    st = os.stat(d.log_path)
    start_daemon(d, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "INVOCATION_ID": "0" * 32})
    send_raw(d.socket, b"not json\n")
    assert d.create(103)["ok"]
    d.stop()
    lines = open(d.log_path).read().splitlines()
    assert "<6>job=- user=- op=start result=ok ms=- " + "version=" in " ".join(lines)
    assert any(re.match(r"<4>job=- user=- op=\? result=bad-request ms=[\d.]+ error=", ln) for ln in lines)
    assert any(re.match(r"<6>job=103 user=65534 op=create result=ok ms=[\d.]+$", ln) for ln in lines)
    assert all(re.match(r"<[2-7]>job=", ln) for ln in lines), lines   # no timestamps: the journal adds them


@pytest.mark.skipif(os.path.exists("/dev/log"), reason="a syslog daemon owns /dev/log on this machine")
def test_detached_daemon_logs_to_syslog(daemon_factory):
    """Without --foreground (no systemd) the daemon detaches, writes its pid
    file and logs to syslog, facility daemon."""
    d = daemon_factory(start=False)
    os.makedirs(d.base_parent, exist_ok=True)
    os.chmod(d.base_parent, 0o1777)
    os.makedirs(os.path.dirname(d.conf_path), exist_ok=True)
    with open(d.conf_path, "w") as f:
        f.write(d.text)
    pidfile = f"{d.rundir}.daemon.pid"
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind("/dev/log")
    log.settimeout(10)
    pid = None
    try:
        r = subprocess.run([sys.executable, "-m", "privtmpd.daemon", "--config", d.conf_path, "--pidfile", pidfile],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        pid = int(wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), what="the pid file"))
        assert d.create(104)["ok"]          # the client waits for the socket
        os.kill(pid, signal.SIGTERM)
        got = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any("op=stop result=ok" in g for g in got):
            try:
                got.append(log.recv(65536).decode())
            except socket.timeout:
                break
        ours = [g for g in got if f"privtmpd[{pid}]: " in g]
        assert any(g.startswith("<30>") and "job=- user=- op=start result=ok" in g for g in ours), got
        assert any(g.startswith("<30>") and "job=104 user=65534 op=create result=ok" in g for g in ours), got
        assert any("op=stop result=ok" in g for g in ours), got
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the daemon to exit")
    finally:
        if pid and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
        log.close()
        os.unlink("/dev/log")
        if os.path.exists(pidfile):
            os.unlink(pidfile)

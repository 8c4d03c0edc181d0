"""The daemon's lifecycle and its socket, for real: requests over the
socket, restarts, crashes, a simulated reboot, hostile clients."""

import json
import logging
import os
import pathlib
import re
import selectors
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid

import psutil
import pytest

from conftest import TEST_BASE_PARENT, TEST_RUN, nsenter
from privtmpd import kernel, runstate

pytestmark = pytest.mark.root

USER = "65534"
USER_PY = "/usr/bin/python3"


@pytest.fixture
def scratch():
    """A fresh directory under TEST_BASE_PARENT, with a live pid file of its
    name so that another test session's leftover cleanup leaves it alone."""
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    claim = f"{TEST_RUN}/{name}.pid"
    os.makedirs(TEST_RUN, 0o755, exist_ok=True)
    with open(claim, "w") as f:
        f.write(str(os.getpid()))
    path = f"{TEST_BASE_PARENT}/{name}"
    os.makedirs(path)
    yield path
    subprocess.run(["rm", "-rf", path])
    os.unlink(claim)


def pinned(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path and " - nsfs " in line for line in f)


def in_namespace(pid, pin):
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat(pin).st_ino
    except FileNotFoundError:
        return False


def job_entries(d):
    return sorted(n for n in os.listdir(d.base_parent) if n.startswith(("job.", ".job.")))


def raw(d, data, shutdown=True, timeout=15):
    """Send raw bytes, return the parsed reply (or None on no reply)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(d.socket)
    try:
        try:
            s.sendall(data)
            if shutdown:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass        # the daemon stopped reading: its reply is still queued for us
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        s.close()
    data = b"".join(chunks)
    return json.loads(data) if data else None


def start_in_job(pin, *cmd, user=None, wait=True):
    argv = ["nsenter", f"--mount={pin}", "--"]
    if user:
        argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    p = subprocess.Popen(argv + list(cmd))
    deadline = time.monotonic() + 10
    while wait and not in_namespace(p.pid, pin):
        assert time.monotonic() < deadline and p.poll() is None, "process did not enter the namespace"
        time.sleep(0.01)
    return p


def processes_of(d):
    """The daemon's process and its forks (same command line)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if d.conf_path in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
            out.append(p.pid)
    return out


def fill(pin, count, user=USER):
    """count files in the job's /tmp, written from inside as the job's user."""
    code = (f"import os\nfor i in range({count}):\n"
            f"    d = '/tmp/d%d' % (i // 1000)\n"
            f"    os.makedirs(d, exist_ok=True)\n"
            f"    open('%s/f%d' % (d, i), 'w').close()\n")
    nsenter(pin, USER_PY, "-c", code, user=user)


# --- create/destroy semantics ------------------------------------------------------

def test_duplicate_create_gives_one_namespace(daemon):
    first = daemon.create(201)
    ino = os.stat(daemon.pin(201)).st_ino
    nsenter(daemon.pin(201), "sh", "-c", "echo keep > /tmp/keep", user=USER)
    second = daemon.create(201)
    assert first["existing"] is False and second["existing"] is True
    assert os.stat(daemon.pin(201)).st_ino == ino
    assert job_entries(daemon) == ["job.201.0"]
    assert nsenter(daemon.pin(201), "cat", "/tmp/keep").stdout == "keep\n"


def test_concurrent_creates_for_one_job(daemon):
    replies = []

    def go():
        replies.append(daemon.create(202))
    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["ok"] for r in replies)
    assert sorted(r["existing"] for r in replies) == [False] + [True] * 7
    assert job_entries(daemon) == ["job.202.0"]
    assert pinned(daemon.pin(202))


def test_destroy_is_idempotent(daemon):
    # Epilog without Prolog (an allocation that never ran a step).
    r = daemon.destroy(203, restart=0)
    assert r["ok"] and r["killed"] == [] and r["unpinned"] is False and r["dirs"] == []
    assert daemon.create(203)["ok"]
    r = daemon.destroy(203, restart=0)
    assert r["ok"] and r["unpinned"] is True and r["dirs"] == ["job.203.0"]
    r = daemon.destroy(203, restart=0)
    assert r["ok"] and r["unpinned"] is False and r["dirs"] == []
    assert not os.path.lexists(daemon.pin(203))
    assert not pinned(daemon.pin(203))
    daemon.wait_removals()
    assert job_entries(daemon) == []
    assert not os.path.exists(f"{daemon.rundir}/jobs/203.json")


def test_destroy_kills_processes_left_in_the_job(daemon):
    assert daemon.create(204)["ok"] and daemon.create(214)["ok"]
    pin = daemon.pin(204)
    root_proc = start_in_job(pin, "sleep", "1000")
    user_proc = start_in_job(pin, "sleep", "1000", user=USER)
    # The job's user makes a user namespace and a mount namespace of their
    # own (no privilege needed): the process carries the job's mounts but
    # is no longer in the job's namespace.
    nested = start_in_job(pin, "unshare", "-Urm", "sh", "-c", "touch /tmp/nested-ready; exec sleep 1000",
                          user=USER, wait=False)
    deadline = time.monotonic() + 10
    while not (os.path.exists(f"{daemon.job_dir(204)}/tmp/nested-ready")
               and psutil.Process(nested.pid).cmdline()[:1] == ["sleep"]):
        assert time.monotonic() < deadline and nested.poll() is None
        time.sleep(0.02)
    assert not in_namespace(nested.pid, pin)
    other_job = start_in_job(daemon.pin(214), "sleep", "1000", user=USER)
    other_nested = start_in_job(daemon.pin(214), "unshare", "-Urm", "sh", "-c",
                                "touch /tmp/nested-ready; exec sleep 1000", user=USER, wait=False)
    while not os.path.exists(f"{daemon.job_dir(214)}/tmp/nested-ready"):
        assert time.monotonic() < deadline and other_nested.poll() is None
        time.sleep(0.02)
    outside = subprocess.Popen(["sleep", "1000"])
    procs = (root_proc, user_proc, nested, other_job, other_nested, outside)
    try:
        r = daemon.destroy(204, restart=0)
        assert r["ok"]
        for p in (root_proc, user_proc, nested):
            assert p.wait(30) == -signal.SIGKILL
        assert {root_proc.pid, user_proc.pid, nested.pid} <= set(r["killed"])
        # Only this job's processes: another job's, and one outside, live on.
        time.sleep(0.2)
        for p in (other_job, other_nested, outside):
            assert p.poll() is None
        assert not pinned(pin)
        assert pinned(daemon.pin(214))
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_requeue(daemon):
    """Slurm 22.05: the Epilog of a requeued run already sees restart
    count 1 while the run's directory was made with 0."""
    assert daemon.create(205, restart=0)["ok"]
    nsenter(daemon.pin(205), "sh", "-c", "echo run0 > /tmp/old", user=USER)
    r = daemon.destroy(205, restart=1)
    assert r["ok"] and r["dirs"] == ["job.205.0"]
    daemon.wait_removals()
    assert job_entries(daemon) == []
    r = daemon.create(205, restart=1)
    assert r["ok"] and r["dir"] == daemon.job_dir(205, 1)
    assert nsenter(daemon.pin(205), "ls", "-A", "/tmp").stdout == ""
    assert job_entries(daemon) == ["job.205.1"]
    r = daemon.destroy(205, restart=1)
    assert r["dirs"] == ["job.205.1"]
    daemon.wait_removals()
    assert job_entries(daemon) == []


def test_requeue_without_epilog(daemon):
    # The rerun's Prolog arrives while run 0's namespace still exists.
    assert daemon.create(206, restart=0)["ok"]
    nsenter(daemon.pin(206), "sh", "-c", "echo run0 > /tmp/old", user=USER)
    r = daemon.create(206, restart=1)
    assert r["ok"] and r["existing"] is False
    assert nsenter(daemon.pin(206), "ls", "-A", "/tmp").stdout == ""
    daemon.wait_removals()
    assert job_entries(daemon) == ["job.206.1"]


def test_squatted_job_path(daemon, scratch):
    """A user pre-creates the next jobs' paths: a symlink to root's data and
    a directory of their own.  The jobs start anyway, in directories of
    ours, and root's data is untouched."""
    canary = f"{scratch}/canary"
    os.makedirs(f"{canary}/etc", 0o700)
    with open(f"{canary}/etc/secret", "w") as f:
        f.write("root only\n")
    subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", "sh", "-c",
                    f"ln -s {canary} job.207.0 && mkdir job.208.0 && ln -s {canary}/etc job.208.0/tmp"],
                   cwd=daemon.base_parent, check=True)
    for job in (207, 208):
        r = daemon.create(job, uid=1000, gid=1000)
        assert r["ok"], r
        st = os.lstat(daemon.job_dir(job))
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0
        assert os.stat(f"{daemon.job_dir(job)}/tmp").st_uid == 1000
        pin = daemon.pin(job)
        assert nsenter(pin, "ls", "-A", "/tmp").stdout == ""
        nsenter(pin, "sh", "-c", "echo mine > /tmp/f", user="1000")
    assert sorted(os.listdir(canary)) == ["etc"]
    assert os.listdir(f"{canary}/etc") == ["secret"]
    st = os.stat(f"{canary}/etc")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    # The squatters were moved aside, still the user's.
    squatted = [n for n in os.listdir(daemon.base_parent) if ".squatted." in n]
    assert len(squatted) == 2
    assert all(os.lstat(f"{daemon.base_parent}/{n}").st_uid == 65534 for n in squatted)
    assert "job.207.0.squatted." in daemon.log()     # the admin is told


def test_failed_create_leaves_nothing(daemon_factory, scratch):
    """A create that fails after the directory was made (here: a mount
    target removed after start-up) rolls everything back: no pin, no
    state, no directory; the Prolog gets the reason."""
    target = f"{scratch}/target"
    os.makedirs(target)
    d = daemon_factory(start=False)
    d.text += f"mount={target}\n"
    d.start()
    os.rmdir(target)
    r = d.create(209)
    assert r["ok"] is False and "No such file or directory" in r["error"], r
    assert not os.path.lexists(d.pin(209))
    assert os.listdir(f"{d.rundir}/jobs") == []
    d.wait_removals()
    assert job_entries(d) == []
    os.makedirs(target)
    assert d.create(209)["ok"]
    assert pinned(d.pin(209))


def test_refuses_to_start_on_unsafe_base(daemon_factory, scratch):
    """A user who owns a directory above the job directories can rename it
    and redirect where jobs' /tmp lands: the daemon must not start."""
    top = f"{scratch}/unsafe"
    os.makedirs(f"{top}/base")
    os.chmod(f"{top}/base", 0o1777)
    os.chown(top, 65534, 65534)
    d = daemon_factory(start=False, base_parent=f"{top}/base", name=f"unsafe-{os.path.basename(scratch)}")
    with pytest.raises(RuntimeError, match=f"{top} is owned by uid 65534"):
        d.start()
    assert d.proc.returncode == 1
    assert not os.path.exists(d.socket)
    assert os.listdir(f"{top}/base") == []


def test_list_show_status(daemon):
    assert daemon.create(210)["ok"]
    p = start_in_job(daemon.pin(210), "sleep", "1000")
    try:
        st = daemon.request(op="status")
        assert st["ok"] and st["jobs"] == 1 and st["pid"] == daemon.proc.pid
        [job] = daemon.request(op="show", job="210")["jobs"]
        assert job["pinned"] and job["state"] == "ready" and p.pid in job["processes"]
        assert job["dir"] == daemon.job_dir(210) and job["uid"] == 65534
        assert [j["job"] for j in daemon.request(op="list")["jobs"]] == [210]
        r = daemon.request(op="show", job="211")
        assert r["ok"] is False and r["kind"] == "not-found"
    finally:
        p.kill()
        p.wait()


# --- restarts, crashes, reboots ------------------------------------------------------

@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_jobs_survive_daemon_restart(daemon, how):
    assert daemon.create(220)["ok"]
    pin, jd = daemon.pin(220), daemon.job_dir(220)
    ino = os.stat(pin).st_ino
    nsenter(pin, "sh", "-c", "echo before > /tmp/f", user=USER)
    resident = start_in_job(pin, "sleep", "1000", user=USER)
    try:
        t0 = time.monotonic()
        rc = daemon.stop(getattr(signal, how))
        stop_time = time.monotonic() - t0
        if how == "SIGTERM":
            assert rc == 0
            assert stop_time < 5, f"SIGTERM stop took {stop_time:.1f} s"
            assert not os.path.exists(daemon.socket)
        # Nothing of the job went with the daemon.
        assert pinned(pin) and os.stat(pin).st_ino == ino
        assert resident.poll() is None and in_namespace(resident.pid, pin)
        with open(f"{jd}/tmp/f") as f:
            assert f.read() == "before\n"
        daemon.start()
        assert daemon.request(op="status")["jobs"] == 1
        assert pinned(pin) and os.stat(pin).st_ino == ino
        # New tasks still enter and see the job's files.
        assert nsenter(pin, "cat", "/tmp/f", user=USER).stdout == "before\n"
        r = daemon.create(220)
        assert r["existing"] is True and os.stat(pin).st_ino == ino
        assert resident.poll() is None
        assert job_entries(daemon) == ["job.220.0"]
        # And the Epilog still finds everything to tear down.
        r = daemon.destroy(220, restart=0)
        assert resident.pid in r["killed"] and r["dirs"] == ["job.220.0"]
        daemon.wait_removals()
        assert job_entries(daemon) == []
    finally:
        resident.kill()
        resident.wait()


def test_restart_recovers_half_made_job(daemon):
    """The daemon died between recording "creating" and pinning: the next
    start rolls the job back instead of trusting it."""
    cfg = daemon.cfg
    assert daemon.create(221)["ok"]
    state = runstate.read_state(cfg, 221)
    state["state"] = runstate.STATE_CREATING
    daemon.kill()
    runstate.write_state(cfg, 221, state)
    daemon.start()
    assert not pinned(daemon.pin(221))
    assert not os.path.lexists(daemon.pin(221))
    assert runstate.read_state(cfg, 221) is None
    assert "job.221.0" not in job_entries(daemon)
    daemon.wait_removals()
    assert job_entries(daemon) == []


def test_simulated_reboot(daemon):
    """After a reboot /run is empty and the job directories are still on
    disk: they must be taken out of the job paths before the first request
    is answered (a new job with the same id must not find them), then removed."""
    for job in (222, 223):
        assert daemon.create(job)["ok"]
        fill(daemon.pin(job), 50)
    daemon.stop()
    cfg = daemon.cfg
    for pin in runstate.list_pins(cfg):
        runstate.unpin(cfg, pin)
    kernel.umount2(f"{daemon.rundir}/ns", kernel.MNT_DETACH)
    subprocess.run(["rm", "-rf", daemon.rundir], check=True)
    assert sorted(job_entries(daemon)) == ["job.222.0", "job.223.0"]

    daemon.start(wait=False)
    daemon.wait_ready()
    # Right after the first answer: no job path is left.
    assert not [n for n in job_entries(daemon) if n.startswith("job.") and ".deleting." not in n]
    r = daemon.create(222)
    assert r["ok"] and r["existing"] is False
    assert nsenter(daemon.pin(222), "ls", "-A", "/tmp").stdout == ""
    daemon.wait_removals()
    assert job_entries(daemon) == ["job.222.0"]


@pytest.mark.parametrize("when", ["before-worker", "during-worker"])
def test_background_removal_survives_daemon_crash(daemon_factory, when):
    """The Epilog only renames the job's directory away; a worker removes
    it.  Kill the daemon right after the reply (before its worker starts,
    or while it runs): the next start resumes the removal.  A worker never
    outlives its daemon (it would race the next daemon's worker)."""
    daemon = daemon_factory(name=f"bgremove-{when}")
    n = 20_000
    for job in (230, 231):
        assert daemon.create(job)["ok"]
        fill(daemon.pin(job), n)
        assert sum(len(fs) for _, _, fs in os.walk(f"{daemon.job_dir(job)}/tmp")) == n

    # Job 230: the Epilog's reply does not wait for the removal.  Proved by
    # order, not by timing (a stall of the daemon during the reply made a
    # ratio of durations fail on a busy machine): when the reply arrives the
    # tree, renamed away, still holds files.
    t0 = time.monotonic()
    r = daemon.destroy(230, restart=0)
    at_reply = [e for e in job_entries(daemon) if e.startswith("job.230.0.deleting.")]
    destroy_s = time.monotonic() - t0
    assert r["ok"]
    assert at_reply, "the Epilog's reply came after the removal of its 20 000 files"
    daemon.wait_removals(timeout=120)
    removal_s = time.monotonic() - t0
    assert job_entries(daemon) == ["job.231.0"]
    print(f"destroy reply {destroy_s * 1000:.0f} ms, removal of {n} files {removal_s * 1000:.0f} ms")

    # Job 231: crash right after the reply.
    r = daemon.destroy(231, restart=0)
    assert r["ok"]
    if when == "during-worker":
        # Wait until the worker has removed one of the 20 subdirectories.
        [tname] = [e for e in job_entries(daemon) if e.startswith("job.231.0.deleting.")]
        deadline = time.monotonic() + 30
        while len(os.listdir(f"{daemon.base_parent}/{tname}/tmp")) == 20:
            assert time.monotonic() < deadline, "the removal did not start"
    daemon.kill()
    # Its worker (a fork, same command line) dies with it.
    deadline = time.monotonic() + 30
    while processes_of(daemon):
        assert time.monotonic() < deadline, f"removal worker outlived its daemon: {processes_of(daemon)}"
        time.sleep(0.02)
    left = job_entries(daemon)
    assert len(left) == 1 and left[0].startswith("job.231.0.deleting."), left
    trash = f"{daemon.base_parent}/{left[0]}"
    remaining = sum(len(fs) for _, _, fs in os.walk(trash))
    print(f"{when}: {remaining} of {n} files left when the daemon was killed")
    assert remaining > 0
    if when == "during-worker":
        assert remaining < n
    time.sleep(0.3)
    assert os.path.exists(trash), "something went on removing after the daemon was killed"
    assert sum(len(fs) for _, _, fs in os.walk(trash)) == remaining
    daemon.start()
    daemon.wait_removals(timeout=120)
    assert job_entries(daemon) == []
    assert not os.path.exists(trash)
    assert not re.search(r"op=remove .*result=(error|incomplete)", daemon.log()), daemon.log()


@pytest.mark.parametrize("count_bytes", ["no", "yes"])
def test_small_trees_removed_by_the_daemon_big_ones_by_a_worker(daemon_factory, count_bytes):
    """Most jobs leave a few files: the daemon removes them itself after
    the Epilog's reply, without forking.  A tree over the inline budget in
    entries, or holding a file over its bytes, is finished by a worker, and
    the log counts every file either way.  Bytes are logged when every
    file was measured: always inline, by a worker only with count_bytes=yes
    (a partial sum would read as the job's usage)."""
    from privtmpd import removal
    daemon = daemon_factory(f"count_bytes={count_bytes}")
    many = removal.INLINE_ENTRIES + 500
    for job in (240, 241, 242):
        assert daemon.create(job)["ok"]
    fill(daemon.pin(240), 10)
    fill(daemon.pin(241), many)
    nsenter(daemon.pin(242), "fallocate", "-l", str(removal.INLINE_BYTES + (1 << 20)), "/tmp/big", user=USER)
    for job in (240, 241, 242):
        assert daemon.destroy(job, restart=0)["ok"]
    daemon.wait_removals(timeout=120)
    assert job_entries(daemon) == []
    log = daemon.log()
    assert re.search(r"job=240 .*op=remove result=ok .* by=daemon files=10 dirs=4 bytes=[0-9]+$", log, re.M), log
    if count_bytes == "yes":
        assert re.search(rf"job=241 .*op=remove result=ok .* by=worker files={many} dirs=6 bytes=[0-9]+$", log,
                         re.M), log
        assert re.search(r"job=242 .*op=remove result=ok .* by=worker files=1 dirs=3 bytes=6[0-9]{7}$", log,
                         re.M), log
    else:
        assert re.search(rf"job=241 .*op=remove result=ok .* by=worker files={many} dirs=6$", log, re.M), log
        assert re.search(r"job=242 .*op=remove result=ok .* by=worker files=1 dirs=3$", log, re.M), log


# --- clients ---------------------------------------------------------------------

def test_removals_give_way_to_waiting_requests(scratch, caplog, monkeypatch):
    """A Prolog or Epilog already waiting on the socket is served before a
    queued removal starts (REMOVAL_MAX_WAIT at most), and an inline
    removal pauses when one arrives, then goes on where it stopped: the
    request never waits behind INLINE_SECONDS of unlinking.  The removal
    queue's own step, on a real selector and a real socket."""
    from privtmpd import config, removal, safefs
    from privtmpd.metrics import Metrics
    # The step's time budgets are wall clock: a stall of the test between
    # two steps (over REMOVAL_MAX_WAIT) or inside one (over INLINE_SECONDS)
    # would start the removal early or hand it to a worker.  What is tested
    # is the order of things, so the budgets are made long here and the
    # hold is ended by setting held_since back.
    monkeypatch.setattr(removal, "INLINE_SECONDS", 600.0)
    monkeypatch.setattr(removal, "REMOVAL_MAX_WAIT", 600.0)
    tmp_path = pathlib.Path(scratch)
    cfg = config.parse(f"base={tmp_path}/job\nrundir={tmp_path}/run\n", "test")
    sel = selectors.DefaultSelector()
    rq = removal.RemovalQueue(cfg, Metrics(cfg, logging.getLogger("privtmpd")), lambda: bool(sel.select(0)))
    trash = tmp_path / "job.7.0.deleting.x"
    (trash / "tmp").mkdir(parents=True)
    n = 300
    for i in range(n):
        (trash / "tmp" / f"f{i}").write_bytes(b"x")
    a, b = socket.socketpair()
    caplog.set_level("INFO", logger="privtmpd")
    try:
        sel.register(b, selectors.EVENT_READ, "client")
        a.sendall(b'{"op": "create"}\n')           # a request waiting
        rq.queue(str(tmp_path), trash.name)
        rq.replied = True
        rq.step()
        rq.step()
        assert len(os.listdir(trash / "tmp")) == n and rq.held_since is not None
        # Held for REMOVAL_MAX_WAIT at most; then it starts, and pauses at
        # the first interrupt check, the request still waiting.
        rq.held_since = time.monotonic() - removal.REMOVAL_MAX_WAIT - 0.1
        rq.step()
        left = len(os.listdir(trash / "tmp"))
        assert n - safefs.Budget.INTERRUPT_EVERY <= left < n, left
        assert rq.paused() == [(str(tmp_path), trash.name)] and rq.busy() and not rq.replied
        assert rq.held_since is None
        b.recv(100)                                 # served: nothing waiting any more
        rq.step()
        assert not trash.exists() and not rq.busy() and not rq.paused() and not rq.count()
        [line] = [r.getMessage() for r in caplog.records if "op=remove" in r.getMessage()]
        assert f"by=daemon files={n} dirs=2 " in line, line
    finally:
        a.close()
        b.close()
        sel.close()


def test_non_root_client_refused(daemon):
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "except OSError as e:\n"
            "    print('connect-failed', e.errno); sys.exit(0)\n"
            # The daemon refuses at accept(), without reading: on a busy
            # machine its reply and close may come before this send (EPIPE);
            # the reply is still there to read.
            "try:\n"
            "    s.sendall(b'{\"op\":\"create\",\"job\":\"240\",\"restart\":\"0\",\"uid\":\"65534\",\"gid\":\"65534\"}\\n')\n"
            "    s.shutdown(socket.SHUT_WR)\n"
            "except OSError:\n"
            "    pass\n"
            "print(s.recv(4096).decode().strip())\n")
    base = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]
    # The socket's mode and the run directory's keep users out...
    r = subprocess.run(base + [USER_PY, "-c", code, daemon.socket], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "connect-failed 13", r
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    # ...and a process that gets past file permissions (CAP_DAC_OVERRIDE,
    # a socket mode loosened by hand) is still refused by its credentials.
    caps = ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    r = subprocess.run(base + caps + [USER_PY, "-c", code, daemon.socket], capture_output=True, text=True,
                       check=True)
    reply = json.loads(r.stdout)
    assert reply == {"ok": False, "error": "only root may talk to privtmpd", "kind": "denied"}
    assert not os.path.lexists(daemon.pin(240))
    assert job_entries(daemon) == []
    assert daemon.request(op="status")["ok"]
    assert daemon.proc.poll() is None


def test_silent_and_slow_clients_do_not_block_others(daemon):
    t0 = time.monotonic()
    silent = [socket.socket(socket.AF_UNIX) for _ in range(20)]
    for s in silent:
        s.connect(daemon.socket)
        s.settimeout(15)
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(daemon.socket)
    slow.settimeout(15)
    try:
        # Meanwhile, real work is served at once: a daemon waiting on one of
        # them would answer only when it gives up on it, 5 s after connect.
        served = 0
        while time.monotonic() - t0 < 3:
            slow.sendall(b"{")          # a byte at a time, never a whole line
            t1 = time.monotonic()
            job = 250 + served
            assert daemon.create(job)["ok"] and daemon.destroy(job, restart=0)["ok"]
            took = time.monotonic() - t1
            assert took < 2.0, f"a create and destroy took {took:.1f} s beside the silent clients"
            served += 1
        assert served >= 2
        for s in silent + [slow]:
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            waited = time.monotonic() - t0
            reply = json.loads(data)
            assert reply["ok"] is False and reply["kind"] == "bad-request"
            assert "no complete request within 5 s" in reply["error"]
            assert 4.5 < waited < 10, waited
    finally:
        for s in silent + [slow]:
            s.close()
    assert daemon.request(op="status")["ok"]


MALFORMED = [
    (b"", "empty request"),
    (b'{"op":"status"}', "truncated request"),
    (b"x" * (1 << 20), "larger than 4096 bytes"),
    (b'{"op":"status"}' + b" " * 5000 + b"\n", "larger than 4096 bytes"),
    (b'{"op":"status"}\n{"op":"list"}\n', "unexpected data after the request line"),
    (b'{"op":"create","job":"../1","restart":"0","uid":"0","gid":"0"}\n', "not a plain decimal number"),
    (b'{"op":"create","job":12,"restart":"0","uid":"0","gid":"0"}\n', "got int"),
    (b"\xff\xfe\n", "not valid UTF-8"),
    (b"[" * 3000 + b"\n", "request"),
    (b'{"op":"rm -rf /"}\n', "unknown operation"),
]


@pytest.mark.parametrize("data,fragment", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_requests(daemon, data, fragment):
    reply = raw(daemon, data)
    assert reply is not None and reply["ok"] is False and reply["kind"] == "bad-request", reply
    assert fragment in reply["error"], reply
    assert daemon.proc.poll() is None
    assert daemon.request(op="status")["ok"]
    assert job_entries(daemon) == []


def test_client_that_vanishes_mid_request(daemon):
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.socket)
        s.sendall(b'{"op":"crea')
        s.close()
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.socket)
        s.close()
    # A client that sends a full create and leaves without reading the reply.
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket)
    s.sendall(b'{"op":"create","job":"260","restart":"0","uid":"65534","gid":"65534"}\n')
    s.close()
    assert daemon.request(op="status")["ok"]
    assert daemon.proc.poll() is None
    # The create itself was done (the Epilog will undo it), and done once.
    assert daemon.create(260)["existing"] is True


def test_a_step_with_every_worker_busy_costs_little_however_long_the_queue():
    """Every turn of the event loop runs step(): with the workers full and
    thousands of trees waiting for one, it must not cost the main thread
    per queued removal per queued removal."""
    from privtmpd import config, removal
    from privtmpd.metrics import Metrics
    cfg = config.parse("remove_workers=2\n", "test")
    q = removal.RemovalQueue(cfg, Metrics(cfg), lambda: False)
    for i in range(2):
        q._all[("/p", f"run{i}")] = removal._Removal("/p", f"run{i}", where=removal.RUNNING, handed_over=True)
    for i in range(4000):
        q.queue("/p", f"t{i}")
        q._all[("/p", f"t{i}")].handed_over = True
    # CPU time of this thread: a preemption of the test (a busy machine)
    # is not the step's cost; a cost per queued removal per queued removal
    # would be seconds of CPU here.
    t0 = time.thread_time()
    q.step()
    took = time.thread_time() - t0
    assert took < 0.05, f"one step() with 4000 removals waiting took {took:.2f} s of CPU"
    assert q.count(removal.QUEUED) == 4000

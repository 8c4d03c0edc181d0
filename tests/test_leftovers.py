"""Files a job's user left in the node's shared mount points during the job
(sbcast to /tmp writes there, from the host's namespace): what counts, and
their removal at teardown with the user's rights, against a real daemon.
The two-node Slurm lab shows it with real sbcast (test_e2e_sbcast.py)."""

import os
import shutil
import subprocess
import time

import pytest

from harness import wait_for
from privtmpd import kernel, leftovers

# A uid no account and no other test uses: the daemons here share this
# machine's own /tmp, and the sweep removes what this uid created there.
U = 64000 + os.getpid() % 1000
OTHER = U + 1
root = pytest.mark.root


# --- what counts (no root) ---------------------------------------------------

def test_the_window_starts_with_the_users_first_job_and_waits_for_their_last():
    st = {"uid": 1000, "created": 500.0}
    assert leftovers.window_start(st) == pytest.approx(500.0 - leftovers.CLOCK_SLACK)
    # Another job of the same user on the node: it carries the start along.
    assert leftovers.same_user_jobs(7, st, {7: st, 8: {"uid": 1000, "created": 600.0}, 9: {"uid": 1001},
                                            10: None}) == [8]
    assert leftovers.same_user_jobs(7, st, {9: {"uid": 1001}}) == []
    # A job that carried an earlier start sweeps from there.
    assert leftovers.window_start({"uid": 1000, "created": 600.0, "leftovers_since": 500.0}) == \
        pytest.approx(500.0 - leftovers.CLOCK_SLACK)
    # root's jobs and unusable states: nothing.
    assert leftovers.window_start({"uid": 0, "created": 1.0}) is None
    assert leftovers.window_start({"uid": "1000", "created": 1.0}) is None
    assert leftovers.window_start({}) is None


def test_carry_keeps_the_earliest_start():
    st = {"uid": 1000, "created": 600.0}
    assert leftovers.carry_since(st, 500.0) and st["leftovers_since"] == 500.0
    assert not leftovers.carry_since(st, 550.0) and st["leftovers_since"] == 500.0


def test_only_regular_files_of_the_user_created_in_the_window(tmp_path):
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = time.time()
        (tmp_path / "f").write_text("x")
        (tmp_path / "d").mkdir()
        (tmp_path / "l").symlink_to("f")
        after = time.time() + 1
        st = {n: kernel.statx_nofollow(d, n) for n in ("f", "d", "l")}
    finally:
        os.close(d)
    uid = os.getuid()
    assert st["f"].btime is not None, "this filesystem keeps no creation time"
    assert leftovers.is_leftover(st["f"], uid, before - 0.1, after)
    assert not leftovers.is_leftover(st["f"], uid + 1, before - 0.1, after)      # another user's
    assert not leftovers.is_leftover(st["f"], uid, after, after + 10)            # created before the job
    assert not leftovers.is_leftover(st["f"], uid, 0, before - 5)                # after the teardown
    assert not leftovers.is_leftover(st["d"], uid, before - 0.1, after)          # a directory
    assert not leftovers.is_leftover(st["l"], uid, before - 0.1, after)          # a symlink


# --- at teardown, against a real daemon --------------------------------------

@pytest.fixture
def shared(request):
    """A shared mount point of the test's own, sticky and world-writable
    like /tmp, so that what the sweep does is seen in isolation."""
    path = f"/var/lib/privtmpd-test/shared-{os.getpid()}-{request.node.name[:30]}"
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as(uid, path, text="x"):
    """Create path as uid (a file the job's user wrote from the host)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            with open(path, "w") as f:
                f.write(text)
            os._exit(0)
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, f"cannot create {path} as {uid}"


def _line(d, job, timeout=30):
    return d.log_lines(job, "leftovers", timeout)[-1]


@root
def test_the_users_files_from_during_the_job_are_removed_with_the_job(daemon_factory, shared):
    d = daemon_factory(f"mount={shared} host_leftovers=remove")
    _as(U, f"{shared}/old")                        # before the job: stays
    time.sleep(0.2)
    d.create(401, uid=U, gid=U)
    _as(U, f"{shared}/sbcast.out")                 # as sbcast writes it
    _as(U, f"{shared}/bad\nname\x1b[31m")          # the log must not carry it raw
    _as(OTHER, f"{shared}/theirs")                 # another user's: stays
    os.mkdir(f"{shared}/dir")
    os.chown(f"{shared}/dir", U, U)                # a directory: stays
    os.symlink("/etc/passwd", f"{shared}/link")
    os.lchown(f"{shared}/link", U, U)              # a symlink: stays
    _as(U, f"{shared}/dir/inner")                  # not at the top: stays
    d.destroy(401)
    line = _line(d, 401)
    d.wait_removals()
    assert sorted(os.listdir(shared)) == ["dir", "link", "old", "theirs"], line
    assert os.listdir(f"{shared}/dir") == ["inner"]
    assert "result=removed" in line and "found=2" in line and "removed=2" in line, line
    assert "sbcast.out" in line and "\x1b" not in line and "\\x1b" in line, line


@root
def test_report_only_logs_them(daemon_factory, shared):
    d = daemon_factory(f"mount={shared} host_leftovers=report")
    d.create(402, uid=U, gid=U)
    _as(U, f"{shared}/sbcast.out")
    d.destroy(402)
    line = _line(d, 402)
    assert "result=found" in line and "found=1" in line and "removed=" not in line, line
    d.wait_removals()
    assert os.listdir(shared) == ["sbcast.out"]


@root
def test_the_sweep_has_the_users_rights_only(daemon_factory, shared):
    """A file of the user's in a directory only root may change: root could
    unlink it, the user cannot, and so the sweep does not."""
    os.chmod(shared, 0o755)
    d = daemon_factory(f"mount={shared} host_leftovers=remove")
    d.create(403, uid=U, gid=U)
    with open(f"{shared}/planted", "w") as f:
        f.write("x")
    os.chown(f"{shared}/planted", U, U)
    d.destroy(403)
    line = _line(d, 403)
    d.wait_removals()
    assert os.path.exists(f"{shared}/planted")
    assert "result=incomplete" in line and "Permission denied" in line, line


@root
def test_waits_for_the_users_last_job_on_the_node(daemon_factory, shared):
    """Two jobs of one user: what sbcast wrote for the first may belong to
    the second, still running; the second's end removes both jobs' files."""
    d = daemon_factory(f"mount={shared} host_leftovers=remove")
    d.create(404, uid=U, gid=U)
    _as(U, f"{shared}/for-404")
    d.create(405, uid=U, gid=U)
    _as(U, f"{shared}/for-405")
    d.destroy(404)
    d.wait_removals()
    assert sorted(os.listdir(shared)) == ["for-404", "for-405"]
    d.destroy(405)
    line = _line(d, 405)
    d.wait_removals()
    assert os.listdir(shared) == [] and "found=2" in line, line


@root
def test_doctor_warns_where_the_filesystem_keeps_no_creation_time(tmp_path):
    """ext4 with 128-byte inodes has no room for a creation time: nothing
    would ever be swept there, and doctor says so."""
    from privtmpd import doctor as doc
    top = f"/var/lib/privtmpd-test/nobtime-{os.getpid()}"
    img = f"{top}.img"
    os.makedirs(top)
    subprocess.run(["truncate", "-s", "8M", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, top], check=True)
    try:
        os.chmod(top, 0o1777)
        conf = tmp_path / "p.conf"
        conf.write_text(f"base=/tmp/slurm\nmount=/tmp\nmount={top}\n")
        d = doc.Doctor(str(conf), "/dev/null")
        assert d.check_config(), d.results
        d.check_host_leftovers()
        r = d.results[-1]
        assert r.status == doc.WARN and top in r.detail and "/tmp," not in r.detail, r
        conf.write_text(f"base=/tmp/slurm\nmount=/tmp\nmount={top}\nhost_leftovers=report\n")
        d = doc.Doctor(str(conf), "/dev/null")
        assert d.check_config(), d.results
        d.check_host_leftovers()
        assert d.results[-1].status == doc.OK
    finally:
        subprocess.run(["umount", top], check=True)
        os.rmdir(top)
        os.unlink(img)


def _stop_every_process_of(uid):
    """A process of the user's (an ssh session on the node) that stops every
    other process running as uid: the sweep's child is one (same real uid,
    so kill(2) is allowed; not being dumpable does not prevent signals)."""
    test = os.getpid()          # its own helpers (_as) are spared
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            me = os.getpid()
            while True:
                for p in os.listdir("/proc"):
                    if not p.isdigit() or int(p) == me:
                        continue
                    try:
                        with open(f"/proc/{p}/status") as f:
                            fields = dict(ln.split(":", 1) for ln in f if ":" in ln)
                        if int(fields["Uid"].split()[0]) == uid and int(fields["PPid"]) != test:
                            os.kill(int(p), 19)         # SIGSTOP
                    except (OSError, KeyError, ValueError):
                        pass
        finally:
            os._exit(0)
    return pid


def _make_as(uid, names):
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for name in names:
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@root
def test_a_user_who_stops_their_sweeps_holds_up_no_other_removal(daemon_factory, shared):
    """A sweep's child has the user's uid, so the user may SIGSTOP it; its
    worker then waits out leftovers.SECONDS.  Sweeps run beside the
    removal workers, one at a time per user, and a removal that can go on
    never waits behind one that cannot: another user's small tree, and
    their sweep, are done at once, however many of the user's short jobs
    end meanwhile."""
    d = daemon_factory(f"mount={shared} host_leftovers=remove")
    # Files from before the jobs (never swept) make every sweep look at
    # more entries: time for the user to see its child and stop it.
    _make_as(U, [f"{shared}/old{i}" for i in range(50000)])
    time.sleep(0.2)
    attacker = _stop_every_process_of(U)
    try:
        for job in (420, 421, 422):              # the user's short jobs, one after the other
            d.create(job, uid=U, gid=U)
            _as(U, f"{shared}/f{job}")           # sbcast f /tmp/f: the mount point's mtime moves
            d.destroy(job)
        d.create(423, uid=OTHER, gid=OTHER)      # another user's ordinary job
        with open(f"{d.job_dir(423)}/tmp/data", "w") as f:
            f.write("x")
        _as(OTHER, f"{shared}/theirs423")       # their own sbcast to the shared /tmp
        t0 = time.monotonic()
        d.destroy(423)
        wait_for(lambda: not any(n.startswith("job.423.") for n in os.listdir(d.base_parent)), 100,
                 "job 423's tree removed")
        took = time.monotonic() - t0
        # Behind a stopped sweep it would wait leftovers.SECONDS (30 s) or
        # more; half of that leaves a busy machine its margin.
        assert took < leftovers.SECONDS / 2, \
            f"another user's 1-file tree waited {took:.1f} s behind the user's stopped sweeps"
        line = _line(d, 423, timeout=100)
        took = time.monotonic() - t0
        assert "removed=1" in line and not os.path.exists(f"{shared}/theirs423"), line
        # Behind the stopped ones, it would wait 30 s for each.
        assert took < leftovers.SECONDS * 2 / 3, \
            f"another user's sweep waited {took:.1f} s behind the user's stopped sweeps"
    finally:
        os.kill(attacker, 9)
        os.waitpid(attacker, 0)


@root
def test_a_sweep_cut_short_by_scan_max_says_so(daemon_factory, shared):
    """Anyone can put more names than SCAN_MAX in the shared /tmp: the
    sweep then misses some of the user's files, and its line says it is
    incomplete rather than reading as done."""
    d = daemon_factory(f"mount={shared} host_leftovers=remove")
    _make_as(OTHER, [f"{shared}/o{i}" for i in range(leftovers.SCAN_MAX + leftovers.SCAN_MAX // 2)])
    d.create(430, uid=U, gid=U)
    for i in range(20):
        _as(U, f"{shared}/sbcast{i}")
    d.destroy(430)
    line = _line(d, 430, timeout=120)
    d.wait_removals(timeout=120)
    left = [x for x in os.listdir(shared) if x.startswith("sbcast")]
    assert not left or ("result=incomplete" in line and "scanned=" in line), (len(left), line)


@root
@pytest.mark.parametrize("outcome", ["ready", "rolled-back"])
def test_the_window_carried_into_a_job_whose_ns_script_runs_is_kept(daemon_factory, shared, outcome):
    """Job 502's ns_script runs while the user's job 501 ends: 501's window
    is carried into 502's state file meanwhile, and 502's create must not
    write over it (nor drop it when on_script_error=fail rolls 502 back):
    the file from 501's time is swept."""
    import threading
    top = f"/var/lib/privtmpd-test/scripts-{os.getpid()}"
    shutil.rmtree(top, ignore_errors=True)
    os.makedirs(top)
    os.chmod(top, 0o755)
    script = f"{top}/init"
    running = f"{top}/502-running"
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\n[ \"$SLURM_JOB_ID\" = 502 ] || exit 0\ntouch {running}\nsleep 2\n"
                + ("exit 1\n" if outcome == "rolled-back" else ""))
    os.chmod(script, 0o755)
    try:
        d = daemon_factory(f"mount={shared} host_leftovers=remove ns_script={script}")
        assert d.create(501, uid=U, gid=U)["ok"]
        _as(U, f"{shared}/for-501")
        time.sleep(0.3)                 # beyond CLOCK_SLACK: older than job 502
        out = {}
        t = threading.Thread(target=lambda: out.update(r=d.create(502, uid=U, gid=U)))
        t.start()
        # 502's ns_script runs (a fixed sleep here could end before it
        # started on a busy machine: 501 then ended alone).
        wait_for(lambda: os.path.exists(running), 30, "job 502's ns_script to run")
        assert d.destroy(501)["ok"]     # carries 501's window into 502's state
        t.join(60)
        assert out["r"]["ok"] is (outcome == "ready"), out
        if outcome == "ready":
            assert d.destroy(502)["ok"]
        d.wait_removals()
        assert os.listdir(shared) == [], "the file of job 501's window escaped the sweep"
    finally:
        shutil.rmtree(top, ignore_errors=True)


# --- a sweep outlives the daemon that queued it -------------------------------

def _sweep_record(points, since, until, remove=True):
    return {"points": points, "uid": U, "gid": U, "since": since, "until": until, "remove": remove}


@root
def test_a_sweep_the_last_daemon_did_not_finish_is_done_by_the_next(daemon_factory, shared):
    """The Epilog's reply goes out before the sweep runs: a daemon stopped
    (a restart, an upgrade) between the two leaves a record, and the next
    daemon sweeps the same window.  A record that is not one is removed and
    logged."""
    from privtmpd import runstate

    d = daemon_factory(f"mount={shared} host_leftovers=remove", start=False)
    # As window_start: a file's btime comes from the kernel's coarse clock,
    # up to a tick behind time.time() (a file made right after this line
    # is dated before it).
    since = time.time() - leftovers.CLOCK_SLACK
    _as(U, f"{shared}/sbcast.out")                 # during the job
    until = time.time() + 0.01
    time.sleep(0.2)
    _as(U, f"{shared}/later")                      # after the job's teardown: stays
    os.makedirs(f"{d.rundir}/sweeps", mode=0o700, exist_ok=True)
    runstate.write_sweep(d.cfg, 440, 2, dict(_sweep_record([shared], since, until), job=440, user="alice"))
    with open(f"{d.rundir}/sweeps/441.0.json", "w") as f:
        f.write('{"job": 441, "points": "/etc", "uid": 0}')       # not a sweep record
    with open(f"{d.rundir}/sweeps/442.0.json.tmp", "w") as f:
        f.write('{"job": 442')                                      # a write a crash cut short
    d.start()
    line = _line(d, 440)
    assert "result=removed" in line and "user=alice" in line and "removed=1" in line, line
    d.wait_removals()
    assert os.listdir(shared) == ["later"]
    assert os.listdir(f"{d.rundir}/sweeps") == []
    assert "op=leftovers result=bad-record" in d.log() and "441.0.json" in d.log()
    assert "op=recover result=stale-state-removed" in d.log() and "sweeps/442.0.json.tmp" in d.log()


@root
def test_a_queued_sweep_is_recorded_until_done(tmp_path, shared):
    """The queue writes the record as it queues the sweep (before the
    Epilog's reply), a new queue on the same run directory picks it up, and
    the record goes when the sweep is done."""
    from privtmpd import config, metrics, removal, runstate

    cfg = config.parse(f"base={tmp_path}/job\nmount={shared}\nrundir={tmp_path}/run\n", str(tmp_path / "c.conf"))
    runstate.setup_rundir(cfg)
    try:
        since = time.time() - leftovers.CLOCK_SLACK     # btime: the coarse clock
        _as(U, f"{shared}/sbcast.out")
        first = removal.RemovalQueue(cfg, metrics.Metrics(cfg), lambda: False)
        first.queue_sweep(450, 1, "bob", _sweep_record([shared], since, time.time() + 0.01))
        assert os.listdir(f"{cfg.rundir}/sweeps") == ["450.1.json"]      # before any step
        q = removal.RemovalQueue(cfg, metrics.Metrics(cfg), lambda: False)    # the next daemon's
        q.resume_sweeps()
        assert q.count() == 1
        wait_for(lambda: (q.step(), q.reap(), q.count() == 0)[-1], 30, "the resumed sweep done")
        assert os.listdir(shared) == []
        assert os.listdir(f"{cfg.rundir}/sweeps") == []
    finally:
        kernel.umount2(f"{cfg.rundir}/ns", kernel.MNT_DETACH)


@root
def test_a_resumed_sweep_is_bounded_by_todays_configuration(daemon_factory, shared):
    """A record is the last daemon's: the next one sweeps only the shared
    mount points it has now (one dropped from mount= may be anything by
    then), removes only while host_leftovers=remove, and refuses a window
    json reads as unbounded (-Infinity: every file the user ever made)."""
    from privtmpd import runstate

    elsewhere = f"{shared}-dropped"
    shutil.rmtree(elsewhere, ignore_errors=True)
    os.makedirs(elsewhere)
    os.chmod(elsewhere, 0o1777)
    try:
        d = daemon_factory(f"mount={shared} host_leftovers=report", start=False)
        _as(U, f"{shared}/long-ago")                   # before any window
        time.sleep(0.3)
        since = time.time() - leftovers.CLOCK_SLACK
        _as(U, f"{shared}/sbcast.out")
        _as(U, f"{elsewhere}/mine")
        until = time.time() + 0.01
        os.makedirs(f"{d.rundir}/sweeps", mode=0o700, exist_ok=True)
        # Queued by a daemon whose mount= had both, with host_leftovers=remove.
        runstate.write_sweep(d.cfg, 460, 0, dict(_sweep_record([shared, elsewhere], since, until), job=460,
                                                  user="alice"))
        with open(f"{d.rundir}/sweeps/461.0.json", "w") as f:
            f.write('{"job": 461, "points": ["%s"], "uid": %d, "gid": %d, "since": -Infinity, '
                    '"until": Infinity, "remove": true, "user": "alice"}' % (shared, U, U))
        d.start()
        found = []
        wait_for(lambda: found.extend(ln for ln in d.log_lines(460, "leftovers") if "result=not-resumed" not in ln)
                 or found, 30, "job 460's sweep line")
        line = found[-1]
        assert "result=found" in line and "found=1" in line and "removed=" not in line, line
        assert elsewhere not in line, line
        d.wait_removals()
        assert sorted(os.listdir(shared)) == ["long-ago", "sbcast.out"]
        assert os.listdir(elsewhere) == ["mine"]
        with open(d.log_path, errors="replace") as f:
            log = f.read()
        assert "op=leftovers result=not-resumed" in log and elsewhere in log, log
        assert "op=leftovers result=bad-record" in log and "461.0.json" in log, log
        assert not [ln for ln in log.splitlines() if "job=461 " in ln and "result=found" in ln], log
        assert os.listdir(f"{d.rundir}/sweeps") == []
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


@root
def test_a_record_that_cannot_be_removed_costs_the_sweep_only_a_line(tmp_path, shared, caplog):
    """The sweep's line is written, and the queue goes on, when its record
    cannot be removed (an immutable file here; a read-only or failing /run
    on a node): the next start sweeps the same window again."""
    from privtmpd import config, metrics, removal, runstate

    cfg = config.parse(f"base={tmp_path}/job\nmount={shared}\nrundir={tmp_path}/run\n", str(tmp_path / "c.conf"))
    runstate.setup_rundir(cfg)
    record = f"{cfg.rundir}/sweeps/452.0.json"
    try:
        since = time.time() - leftovers.CLOCK_SLACK
        _as(U, f"{shared}/sbcast.out")
        q = removal.RemovalQueue(cfg, metrics.Metrics(cfg), lambda: False)
        q.queue_sweep(452, 0, "carol", _sweep_record([shared], since, time.time() + 0.01))
        subprocess.run(["chattr", "+i", record], check=True)
        caplog.set_level("INFO", logger="privtmpd")
        wait_for(lambda: (q.step(), q.reap(), q.count() == 0)[-1], 30, "the sweep done")
        assert os.listdir(shared) == []
        assert "op=leftovers result=removed" in caplog.text and "removed=1" in caplog.text, caplog.text
        assert "op=leftovers result=record-not-removed" in caplog.text, caplog.text
        assert os.listdir(f"{cfg.rundir}/sweeps") == ["452.0.json"]
    finally:
        subprocess.run(["chattr", "-i", record], check=False)
        kernel.umount2(f"{cfg.rundir}/ns", kernel.MNT_DETACH)


@root
def test_a_daemon_stopped_right_after_the_epilogs_reply_leaves_the_sweep_to_the_next(daemon_factory, shared):
    """The path the records are for, end to end: the Epilog's reply, then
    a stop (SIGTERM: kill_workers) before the sweep's worker is done; the
    next daemon sweeps the window.  A stop a moment after the reply
    usually beats the sweep (a fork and a child as the user); an attempt
    whose sweep finished first proves nothing, and is made again."""
    d = daemon_factory(f"mount={shared} host_leftovers=remove", start=False)
    for attempt in range(5):
        job = 480 + attempt
        d.start()
        d.create(job, uid=U, gid=U)
        _as(U, f"{shared}/sbcast.{job}")
        assert d.destroy(job)["ok"]
        d.stop()
        recorded = f"{job}.0.json" in os.listdir(f"{d.rundir}/sweeps")
        if recorded and os.path.exists(f"{shared}/sbcast.{job}"):
            break
        # Swept, or its child unlinked before it was killed: the record, if
        # any, is the next daemon's (resumed, it finds nothing).
        assert recorded or not os.path.exists(f"{shared}/sbcast.{job}"), "neither swept nor recorded"
    else:
        pytest.fail("every sweep was done before the daemon's stop")
    d.start()
    line = _line(d, job)
    assert "result=removed" in line and "removed=1" in line, line
    d.wait_removals()
    assert os.listdir(shared) == []
    assert os.listdir(f"{d.rundir}/sweeps") == []

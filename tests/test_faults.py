"""Faults, for real: the daemon killed (SIGKILL) at every step of create
and of teardown (including inside the thread that builds a job's
namespace), system calls failing (EIO) at every step, a job process that survives into the Epilog, a pin taken
away by someone else, and the base filesystem full.

Kill and failure points are found without any hook in the daemon: strace
is attached to the running daemon and injects a signal or an error at the
Nth invocation of one system call (counted per process from the attach).
N runs 1, 2, 3... until a request completes without the injection firing,
so every invocation of that call on the request's path is hit once,
whatever the code does in between."""

import os
import subprocess
import time

import pytest

from conftest import TEST_BASE_PARENT, TEST_RUN, nsenter
from privtmpd import runstate
from relutil import (USER, USER_PY, Inject, gone, job_entries, live, mounts_under, pins, run_hook, state_files,
                     wait_no_forks)

pytestmark = pytest.mark.root

KEEP = 1            # a ready job that must survive every fault


def consistent(d, *live_jobs):
    """After the faults: exactly live_jobs exist, each fully working, and
    nothing else is left: no pin, mount, state file, directory or fork."""
    d.wait_removals(timeout=60)
    assert d.proc.poll() is None
    for job in live_jobs:
        assert live(d, job), f"job {job} lost its namespace"
    assert pins(d) == sorted(str(j) for j in live_jobs)
    assert state_files(d) == sorted(f"{j}.json" for j in live_jobs), state_files(d)
    assert job_entries(d) == sorted(f"job.{j}.0" for j in live_jobs), job_entries(d)
    # One mount for the private pin directory, one per pin.
    assert len(mounts_under(d.rundir)) == 1 + len(live_jobs), mounts_under(d.rundir)
    assert not mounts_under(d.base_parent)


def restart(d):
    """The daemon died: its removal workers die with it (PDEATHSIG); start
    it again."""
    wait_no_forks(d)
    d.start()


def _kill_loop(d, syscall, request, figures, case, max_steps=60, follow=False):
    """Run request(job) once per invocation N of syscall, killing the daemon
    at the Nth (follow: in any of its threads and forks too, each counted
    on its own).  Returns the number of kill points."""
    killed = 0
    for n in range(1, max_steps + 1):
        job = 1000 + n
        prepared = request.prepare(job)
        with Inject(d.proc.pid, syscall, "signal=SIGKILL", n, follow=follow) as inj:
            r = request.run(job)
            try:
                d.proc.wait(2 if r.returncode else 0.2)
            except subprocess.TimeoutExpired:
                pass
        if inj.was_fired:
            # Fired after the short wait above, before strace let go (a call
            # after the reply, on a slow turn of the loop): the daemon is
            # dying, and must not be taken for one that finished.  (With
            # follow, the kill may have hit a fork of its instead: then the
            # daemon lives on, as before.)
            try:
                d.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if d.proc.poll() is None:
            # The request completed without reaching an Nth call: every step was hit.
            assert r.returncode == 0, r.stderr
            request.finish(job, prepared)
            consistent(d, KEEP)
            break
        killed += 1
        if r.returncode == 0:
            # Killed after its reply (the gauges are updated after it): the
            # request was complete and stays complete across the restart.
            restart(d)
            request.finish(job, prepared)
            consistent(d, KEEP)
            continue
        # The hook that was waiting fails cleanly, with one line saying why.
        assert r.returncode == 1, (n, r)
        assert "closed the connection without a complete reply" in r.stderr, r.stderr
        restart(d)
        d.wait_removals()
        # No half-written state file is left (only whole ones, of whole jobs).
        assert set(state_files(d)) <= {f"{KEEP}.json", f"{job}.json"}, state_files(d)
        request.after_restart(job)
        consistent(d, KEEP)
    else:
        pytest.fail(f"{syscall}: still hitting an invocation after {max_steps} steps")
    assert killed >= 1, f"the request never calls {syscall}: the case proved nothing"
    figures(case, syscall=syscall, kill_points=killed, restarts=killed, failures=0, leaked=0)
    return killed


class CreateRequest:
    def __init__(self, d):
        self.d = d

    def prepare(self, job):
        return None

    def run(self, job):
        return run_hook(self.d, "prolog", job)

    def finish(self, job, prepared):
        assert live(self.d, job)
        assert run_hook(self.d, "epilog", job).returncode == 0

    def after_restart(self, job):
        # Half-created: rolled back by the restart; or killed after the job
        # was complete (before the reply): it is then whole.  Never in between.
        self.d.wait_removals()
        assert gone(self.d, job) or live(self.d, job), (pins(self.d), state_files(self.d), job_entries(self.d))
        # And the job can still start now (a requeued Prolog).
        assert run_hook(self.d, "prolog", job).returncode == 0
        assert live(self.d, job)
        assert run_hook(self.d, "epilog", job).returncode == 0


class DestroyRequest(CreateRequest):
    def prepare(self, job):
        assert run_hook(self.d, "prolog", job).returncode == 0
        nsenter(self.d.pin(job), "sh", "-c", "echo data > /tmp/f; mkdir -p /tmp/a/b; touch /tmp/a/b/c")

    def run(self, job):
        return run_hook(self.d, "epilog", job)

    def finish(self, job, prepared):
        self.d.wait_removals()
        assert gone(self.d, job)

    def after_restart(self, job):
        # Either not started yet (the job is intact) or finished by the
        # restart; never in between.  Slurm's retried Epilog completes it.
        if os.path.lexists(self.d.pin(job)):
            assert live(self.d, job)
        assert run_hook(self.d, "epilog", job).returncode == 0
        self.d.wait_removals()
        assert gone(self.d, job)


@pytest.mark.parametrize("syscall", ["openat", "mkdirat", "renameat2", "rename", "mount"])
def test_daemon_killed_at_each_step_of_create(daemon, syscall, figures):
    assert daemon.create(KEEP)["ok"]
    _kill_loop(daemon, syscall, CreateRequest(daemon), figures, "daemon SIGKILLed at each step of create")


@pytest.mark.parametrize("syscall", ["openat", "umount2", "unlink", "renameat2"])
def test_daemon_killed_at_each_step_of_teardown(daemon, syscall, figures):
    assert daemon.create(KEEP)["ok"]
    _kill_loop(daemon, syscall, DestroyRequest(daemon), figures, "daemon SIGKILLed at each step of teardown")


@pytest.mark.parametrize("syscall", ["unshare", "mount", "openat"])
def test_daemon_killed_while_building_the_namespace(daemon, syscall, figures):
    """SIGKILL at each step of the thread that builds the job's namespace
    (a signal to any thread kills the whole daemon): the Prolog gets a
    clean error, the restarted daemon rolls the half-made job back."""
    assert daemon.create(KEEP)["ok"]
    _kill_loop(daemon, syscall, CreateRequest(daemon), figures,
               "daemon SIGKILLed at each step of building a namespace", follow=True)


# syscall, follow threads and forks, which request
EIO_CASES = [
    ("openat", False, "create"), ("mkdirat", False, "create"), ("renameat2", False, "create"),
    ("rename", False, "create"), ("mount", False, "create"), ("mount", True, "create"),
    ("unshare", True, "create"),
    ("openat", False, "destroy"), ("umount2", False, "destroy"), ("unlink", False, "destroy"),
    ("renameat2", False, "destroy"), ("unlinkat", True, "destroy"), ("openat2", True, "destroy"),
]


@pytest.mark.parametrize("syscall,follow,op", EIO_CASES,
                         ids=[f"{op}-{s}{'-forks' if f else ''}" for s, f, op in EIO_CASES])
def test_syscall_failure_at_each_step(daemon, syscall, follow, op, figures):
    """EIO from one system call at each of its invocations: the request
    fails with a message naming the error (or, where the failure is in a
    background removal, is retried), and no partial state remains."""
    assert daemon.create(KEEP)["ok"]
    failed = retried = 0
    for n in range(1, 60):
        job = 3000 + n
        if op == "destroy":
            assert run_hook(daemon, "prolog", job).returncode == 0
            nsenter(daemon.pin(job), "sh", "-c", "mkdir -p /tmp/a/b && touch /tmp/a/b/c /tmp/f")
        removals = daemon.log().count("op=remove ")
        with Inject(daemon.proc.pid, syscall, "error=EIO", n, follow=follow) as inj:
            r = run_hook(daemon, "prolog" if op == "create" else "epilog", job)
            if op == "destroy" and follow:
                # The removal worker's first attempt runs traced.
                deadline = time.monotonic() + 30
                while daemon.log().count("op=remove ") == removals:
                    assert time.monotonic() < deadline, "no removal attempt"
                    time.sleep(0.05)
        # The reply naming the injected error is proof too: strace, stopped
        # right after, has once lost the line that says INJECTED.
        fired = inj.was_fired or "Input/output error" in r.stderr
        if fired and follow and op == "destroy":
            # A failed removal is retried (by the worker's next pass, or by
            # a later worker), not left until a restart.
            retried += "result=retry-scheduled" in daemon.log()[-3000:]
        assert daemon.proc.poll() is None
        if not fired:
            assert r.returncode == 0, r.stderr
            if op == "create":
                assert live(daemon, job)
                assert run_hook(daemon, "epilog", job).returncode == 0
            daemon.wait_removals()
            assert gone(daemon, job)
            consistent(daemon, KEEP)
            break
        failed += 1
        if r.returncode:
            assert "Input/output error" in r.stderr, r.stderr
        if op == "create":
            if r.returncode == 0:
                # A failure the daemon could absorb (a lookup that is retried)
                assert live(daemon, job)
            assert run_hook(daemon, "epilog", job).returncode == 0
        else:
            if r.returncode:
                # The Epilog failed: Slurm retries it (or the admin runs cleanup).
                assert run_hook(daemon, "epilog", job).returncode == 0
        daemon.wait_removals()
        assert gone(daemon, job), (n, job_entries(daemon), state_files(daemon), pins(daemon))
        consistent(daemon, KEEP)
    else:
        pytest.fail("never completed")
    assert failed >= 1, f"{op} never calls {syscall}"
    figures(f"EIO injected at each {syscall} of {op}" + (" (threads and forks included)" if follow else ""),
            syscall=syscall, failure_points=failed, removals_retried=retried, failures=0, leaked=0)


def test_job_process_survives_into_epilog(daemon, figures):
    """A job process that escaped Slurm's process tracking is still in the
    namespace at the Epilog: it is killed and reported, then teardown ends."""
    assert daemon.create(7)["ok"]
    p = subprocess.Popen(["nsenter", f"--mount={daemon.pin(7)}", "--", "setpriv", f"--reuid={USER}",
                          f"--regid={USER}", "--clear-groups", "sh", "-c",
                          "trap '' TERM HUP; cd /tmp; while :; do sleep 1; done"])
    deadline = time.monotonic() + 10
    while not os.path.exists(f"{daemon.job_dir(7)}/tmp") or \
            os.stat(f"/proc/{p.pid}/ns/mnt").st_ino != os.stat(daemon.pin(7)).st_ino:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = daemon.destroy(7, restart=0)
    assert r["ok"] and p.pid in r["killed"], r
    assert p.wait(10) == -9
    daemon.wait_removals()
    assert gone(daemon, 7)
    assert "op=destroy result=killed" in daemon.log() or "killed" in daemon.log()
    figures("job process survives into the Epilog", killed=len(r["killed"]), failures=0, leaked=0)


@pytest.mark.parametrize("how", ["unmounted", "replaced-by-file", "replaced-by-other-ns"])
def test_pin_taken_away_teardown_still_succeeds(daemon, how, figures):
    """Someone unmounts the pin, or replaces it (with a plain file, or with
    another namespace): the Epilog still kills what is left of the job (found
    by its directories, the pin no longer leads to it), never a process of
    the foreign namespace, and removes everything."""
    assert daemon.create(8)["ok"]
    pin = daemon.pin(8)
    job_proc = subprocess.Popen(["nsenter", f"--mount={pin}", "--", "setpriv", f"--reuid={USER}",
                                 f"--regid={USER}", "--clear-groups", "sleep", "300"])
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{job_proc.pid}/ns/mnt").st_ino != os.stat(pin).st_ino:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    other = None
    subprocess.run(["umount", "-l", pin], check=True)
    if how == "replaced-by-file":
        os.unlink(pin)
        with open(pin, "w") as f:
            f.write("x")
    elif how == "replaced-by-other-ns":
        # Made on each CPU in turn until the bind is allowed: outside the
        # initial mount namespace (the Debian 13 leg) the kernel refuses
        # to bind a namespace with a smaller (per-CPU) id than the caller's,
        # as namespace.build_and_pin explains.
        for cpu in sorted(os.sched_getaffinity(0)):
            other = subprocess.Popen(["taskset", "-c", str(cpu), "unshare", "-m", "--propagation", "private",
                                      "sleep", "300"])
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{other.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt") \
                    or not os.readlink(f"/proc/{other.pid}/exe").endswith("sleep"):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            if subprocess.run(["mount", "--bind", f"/proc/{other.pid}/ns/mnt", pin]).returncode == 0:
                break
            other.kill()
            other.wait()
        else:
            raise AssertionError("no CPU gave a namespace that may be bound here")
    try:
        assert runstate.pin_identity(daemon.cfg, 8) != tuple(runstate.read_state(daemon.cfg, 8)["ns"])
        r = daemon.destroy(8, restart=0)
        assert r["ok"], r
        assert job_proc.pid in r["killed"], r
        assert job_proc.wait(10) == -9
        if other:
            assert other.pid not in r["killed"] and other.poll() is None, "killed into a foreign namespace"
    finally:
        for p in (job_proc, other):
            if p and p.poll() is None:
                p.kill()
                p.wait()
    daemon.wait_removals()
    assert gone(daemon, 8)
    consistent(daemon)
    figures(f"pin {how} by someone else, then Epilog", killed=len(r["killed"]), failures=0, leaked=0)


@pytest.mark.parametrize("where", ["job-namespace-pin-gone", "users-own-namespace"])
def test_tmpfs_only_job_processes_are_found_by_their_tmpfs(daemon_factory, where):
    """Every mount point a tmpfs=: the job has no directory under base for
    teardown to look for.  Its processes are found by the source of its
    tmpfs mounts instead, whether the pin was taken away or a process sits
    in a user+mount namespace of the user's own (which holds copies)."""
    d = daemon_factory("tmpfs=/tmp:8m tmpfs=/var/tmp:8m")
    assert d.create(12)["ok"]
    pin = d.pin(12)
    argv = ["nsenter", f"--mount={pin}", "--", "setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]
    if where == "users-own-namespace":
        argv += ["unshare", "-Urm"]
    job_proc = subprocess.Popen(argv + ["sleep", "300"])
    try:
        deadline = time.monotonic() + 10
        while not os.readlink(f"/proc/{job_proc.pid}/exe").endswith("sleep"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if where == "job-namespace-pin-gone":
            subprocess.run(["umount", "-l", pin], check=True)
        r = d.destroy(12, restart=0)
        assert r["ok"] and job_proc.pid in r["killed"], r
        assert job_proc.wait(10) == -9
    finally:
        if job_proc.poll() is None:
            job_proc.kill()
            job_proc.wait()


def test_a_tmpfs_held_open_from_outside_the_job_is_emptied_at_teardown(daemon_factory):
    """A process of the job user's outside the job (an ssh session, a task
    of their other job) holds the job's /tmp through /proc/<task>/root:
    the unpin does not free that tmpfs.  Teardown empties it from inside
    the namespace and shrinks it to what is in use, so neither the job's
    files nor new ones live on in memory no job accounts for."""
    d = daemon_factory("tmpfs=/tmp:64m tmpfs=/var/tmp:8m")
    assert d.create(14)["ok"]
    task = subprocess.Popen(["nsenter", f"--mount={d.pin(14)}", "--", "setpriv", f"--reuid={USER}",
                             f"--regid={USER}", "--clear-groups", "sh", "-c",
                             "mkdir /tmp/sub && head -c 16000000 /dev/zero > /tmp/sub/big && echo ready && "
                             "exec sleep 300"], stdout=subprocess.PIPE)
    holder = None
    try:
        assert b"ready" in task.stdout.readline()
        holder = subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", "sh", "-c",
                                   f"cd /proc/{task.pid}/root/tmp && echo ready && exec sleep 300"],
                                  stdout=subprocess.PIPE)
        assert b"ready" in holder.stdout.readline()
        r = d.destroy(14, restart=0)
        assert r["ok"] and task.pid in r["killed"], r
        assert task.wait(10) == -9
        d.wait_removals()
        held = f"/proc/{holder.pid}/cwd"
        assert os.listdir(held) == [], os.listdir(held)
        # Nothing new fits either.
        w = subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", "sh", "-c",
                            f"echo x > {held}/again"], capture_output=True, text=True)
        assert w.returncode != 0 and "No space left" in w.stderr, w
    finally:
        for p in (task, holder):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_restart_with_replaced_pin_rolls_back(daemon):
    assert daemon.create(9)["ok"]
    subprocess.run(["umount", "-l", daemon.pin(9)], check=True)
    daemon.kill()
    daemon.start()
    daemon.wait_removals()
    assert gone(daemon, 9)
    consistent(daemon)


# --- the base filesystem full -----------------------------------------------------

@pytest.fixture
def small_fs():
    """A 16 MiB ext4 with few inodes, loop-mounted, as the base's parent."""
    top = f"{TEST_BASE_PARENT}/smallfs-{os.getpid()}"
    img = f"{TEST_BASE_PARENT}/smallfs-{os.getpid()}.img"
    os.makedirs(top, 0o755)
    claim = f"{TEST_RUN}/smallfs-{os.getpid()}.pid"
    with open(claim, "w") as f:
        f.write(str(os.getpid()))
    subprocess.run(["truncate", "-s", "16M", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "256", "-m", "0", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, top], check=True)
    os.chmod(top, 0o755)
    base = f"{top}/base"
    os.mkdir(base)
    os.chmod(base, 0o1777)
    try:
        yield base
    finally:
        dev = None
        for line in open("/proc/self/mountinfo"):
            f = line.split()
            if f[4] == top:
                dev = line.split(" - ")[1].split()[1]
        subprocess.run(["umount", "-l", top])
        if dev and dev.startswith("/dev/loop"):
            subprocess.run(["losetup", "-d", dev], stderr=subprocess.DEVNULL)
        os.unlink(img)
        os.rmdir(top)
        os.unlink(claim)


@pytest.mark.parametrize("what", ["blocks", "inodes"])
def test_base_filesystem_full(daemon_factory, small_fs, what, figures):
    d = daemon_factory(base_parent=small_fs, name=f"fullfs-{what}")
    assert d.create(11)["ok"]
    # The job's user fills the filesystem from inside the job.
    if what == "blocks":
        nsenter(d.pin(11), "sh", "-c", "dd if=/dev/zero of=/tmp/big bs=1M count=64 2>/dev/null; true",
                user=str(USER))
        # Root may use blocks reserved for it: take those too.
        nsenter(d.pin(11), "sh", "-c", "dd if=/dev/zero of=/tmp/big2 bs=4k count=10000 2>/dev/null; "
                "for i in $(seq 200); do mkdir /tmp/d$i 2>/dev/null || break; done; true")
    else:
        nsenter(d.pin(11), USER_PY, "-c",
                "import os\nfor i in range(100000):\n"
                "    try:\n        open('/tmp/i%d' % i, 'w').close()\n"
                "    except OSError:\n        break\n", user=str(USER))
    r = d.create(12)
    assert r["ok"] is False, r
    assert "No space left on device" in r["error"], r
    assert gone(d, 12)
    # The job that filled it still works, and its teardown frees the space.
    assert live(d, 11)
    hook = run_hook(d, "epilog", 11)
    assert hook.returncode == 0, hook.stderr
    d.wait_removals()
    assert gone(d, 11)
    assert d.create(12)["ok"], "space freed by the teardown is usable again"
    assert d.destroy(12, restart=0)["ok"]
    d.wait_removals()
    assert job_entries(d) == []
    figures(f"base filesystem full ({what})", error=r["error"][:120], failures=0, leaked=0)

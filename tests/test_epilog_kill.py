"""The Epilog says ok only with evidence that no process is left in the
job's namespace, even against a fork chain (each process forks and exits,
so one process is alive at any instant and a /proc scan always lags one
step behind).  With Slurm's cgroups, the job's cgroup is killed as one."""

import os
import secrets
import subprocess
import time

import pytest

from privtmpd import proc
from relutil import run_hook

pytestmark = pytest.mark.root

CHAIN_DIR = "/var/lib/privtmpd-test/forkchain"
CHAIN_SRC = r"""
#include <unistd.h>
/* A fork chain: the parent exits as soon as its child exists; the child
   does the same.  No process lives for more than one fork. */
int main(void) {
    for (;;) {
        pid_t p = fork();
        if (p > 0)
            _exit(0);
    }
}
"""


# A process whose main thread ends with the raw exit system call while a
# second thread lives on: /proc/PID/ns/mnt of the (zombie) leader cannot
# be read, and the living thread is not listed in /proc.
HIDDEN_SRC = r"""
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
static void *run(void *arg) { for (;;) pause(); return arg; }
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, run, 0);
    syscall(SYS_exit, 0);
}
"""
# Many short-lived processes outside the job: the PID cursor of the node
# never stands still.
CHURN_SRC = r"""
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    for (;;) {
        pid_t p = fork();
        if (p == 0) _exit(0);
        if (p > 0) waitpid(p, 0, 0);
    }
}
"""


def _build(name, src, *flags):
    os.makedirs(CHAIN_DIR, exist_ok=True)
    os.chmod(CHAIN_DIR, 0o755)
    path, exe = f"{CHAIN_DIR}/{name}.c", f"{CHAIN_DIR}/privtmpd-{name}"
    with open(path, "w") as f:
        f.write(src)
    subprocess.run(["gcc", "-O2", "-o", exe, path, *flags], check=True)
    os.chmod(exe, 0o755)
    return exe


@pytest.fixture(scope="module")
def chain_exe():
    return _build("forkchain", CHAIN_SRC)


# The chain runs as a uid of its own that nothing else on the machine uses
# (no passwd entry), so that the test can always end it: kill(-1) by a
# process of that uid reaches every process of the uid at once, which no
# fork can outrun (never by name, never anyone else's).
CHAIN_UID = 4085123

# Each link of the chain is an orphan when its parent exits.  Orphans go
# to the nearest subreaper: this one, not PID 1 (which on some machines
# reaps slowly: tens of thousands of zombies exhaust the PID space).  The
# reaper exits once it has no child left, orphans included: that, not a
# sample of /proc, is the evidence that the chain is dead.
REAPER = """
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)     # PR_SET_CHILD_SUBREAPER
if os.fork() == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def _proc_state(pid):
    """State letter of pid (R, S, Z...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split(" ", 1)[0]


def _proc_comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _wait_started(reaper, started, what, timeout=60):
    """Until started(pid) holds for the reaper's child (the sh that execs
    nsenter, setpriv and then the job's program, all in one pid): the
    program runs in the job's namespace.  A fixed sleep here let a slow
    machine run the Epilog before anything was in the namespace."""
    deadline = time.monotonic() + timeout
    child = None
    while True:
        assert reaper.poll() is None, f"{what} did not start"
        if child is None:
            try:
                with open(f"/proc/{reaper.pid}/task/{reaper.pid}/children") as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            child = int(kids[0]) if kids else None
        if child is not None and started(child):
            return
        assert time.monotonic() < deadline, f"{what} did not start within {timeout} s"
        time.sleep(0.01)


def _forked_on(pid):
    # The chain's first link has forked and exited (reaped, or a zombie
    # not yet reaped): the chain runs, one link at a time.
    return _proc_state(pid) in (None, "Z")


def _start_chain(daemon, job, exe, cgroup_procs=None, started=_forked_on):
    """exe in the job's namespace as CHAIN_UID, under a subreaper; returns
    once started(pid of exe) says it runs."""
    enter = f"echo $$ > {cgroup_procs}; " if cgroup_procs else ""
    reaper = subprocess.Popen(["/usr/bin/python3", "-c", REAPER, "sh", "-c",
                               f"{enter}exec nsenter --mount={daemon.pin(job)} -- setpriv --reuid={CHAIN_UID} "
                               f"--regid={CHAIN_UID} --clear-groups {exe}"])
    _wait_started(reaper, started, "the fork chain")
    return reaper


# How long the reaper may take to see its last child go once the Epilog
# said ok: a fork chain that survived would keep it alive for good, so a
# generous bound costs nothing when the code is right.
GONE_WITHIN = 30


def _chain_lives(reaper, seconds=GONE_WITHIN):
    try:
        reaper.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        return True


def _stop_chain(reaper):
    if reaper is None:
        return
    subprocess.run(["setpriv", f"--reuid={CHAIN_UID}", f"--regid={CHAIN_UID}", "--clear-groups",
                    "/usr/bin/python3", "-c", "import os; os.kill(-1, 9)"], check=False)
    reaper.wait(timeout=30)


def test_epilog_outlasts_a_fork_chain(daemon, chain_exe, figures):
    job = 4101
    assert daemon.create(job, uid=CHAIN_UID, gid=CHAIN_UID)["ok"]
    reaper = None
    try:
        reaper = _start_chain(daemon, job, chain_exe)
        t0 = time.monotonic()
        r = run_hook(daemon, "epilog", job, uid=CHAIN_UID, gid=CHAIN_UID)
        ms = (time.monotonic() - t0) * 1000
        assert r.returncode == 0, r.stderr
        lives = _chain_lives(reaper)
        figures("epilog against a fork chain", epilog_ms=round(ms, 1), chain_survived=lives)
        assert not lives, "the fork chain lived on after the Epilog said ok"
        assert "op=destroy result=killed" in daemon.log()
    finally:
        _stop_chain(reaper)


def test_epilog_finds_a_process_hidden_behind_its_exited_leader(daemon, figures):
    exe = _build("hidden", HIDDEN_SRC, "-pthread")
    job = 4103
    assert daemon.create(job, uid=CHAIN_UID, gid=CHAIN_UID)["ok"]
    reaper = None
    try:
        # Started once the leader has exited behind its living thread: a
        # zombie the reaper cannot reap yet.
        reaper = _start_chain(daemon, job, exe, started=lambda pid: _proc_state(pid) == "Z")
        r = run_hook(daemon, "epilog", job, uid=CHAIN_UID, gid=CHAIN_UID)
        assert r.returncode == 0, r.stderr
        lives = _chain_lives(reaper)
        figures("a thread living on behind its exited thread-group leader", chain_survived=lives)
        assert not lives, "the thread lived on after the Epilog said ok"
    finally:
        _stop_chain(reaper)


def test_epilog_kills_a_chrooted_process_in_the_users_own_namespace(daemon, figures):
    """A job process makes a user+mount namespace of its own, keeps the
    job's /tmp as its working directory and chroots elsewhere: its own
    mountinfo no longer shows the job's mounts.  The namespace is judged
    from its root instead."""
    job = 4108
    assert daemon.create(job, uid=CHAIN_UID, gid=CHAIN_UID)["ok"]
    reaper = None
    try:
        reaper = subprocess.Popen(["/usr/bin/python3", "-c", REAPER, "nsenter", f"--mount={daemon.pin(job)}", "--",
                                   "setpriv", f"--reuid={CHAIN_UID}", f"--regid={CHAIN_UID}", "--clear-groups",
                                   "unshare", "-Urm", "sh", "-c", "cd /tmp && exec chroot /usr /bin/sleep 300"])
        # sleep is exec'd after the unshare and the chroot.
        _wait_started(reaper, lambda pid: _proc_comm(pid) == "sleep", "the chrooted process")
        r = run_hook(daemon, "epilog", job, uid=CHAIN_UID, gid=CHAIN_UID)
        assert r.returncode == 0, r.stderr
        lives = _chain_lives(reaper)
        figures("a process chrooted in a user+mount namespace of the job user's, cwd in the job's /tmp",
                chain_survived=lives)
        assert not lives, "the chrooted process outlived the Epilog"
    finally:
        _stop_chain(reaper)


def test_epilog_succeeds_while_the_node_forks_all_the_time(daemon_factory, figures):
    """Other processes fork without pause (the PID cursor never stands
    still), and kill_timeout=0: the Epilog still says ok, and soon."""
    exe = _build("churn", CHURN_SRC)
    d = daemon_factory("kill_timeout=0")
    churn = [subprocess.Popen(["setpriv", "--reuid=4085124", "--regid=4085124", "--clear-groups", exe])
             for _ in range(2)]
    try:
        for job in (4104, 4105, 4106):
            assert d.create(job)["ok"]
            t0 = time.monotonic()
            r = run_hook(d, "epilog", job)
            assert r.returncode == 0, r.stderr
            figures("Epilog while two processes outside the job fork without pause, kill_timeout=0",
                    epilog_ms=round((time.monotonic() - t0) * 1000, 1), failures=0)
    finally:
        for p in churn:
            p.kill()
            p.wait()


def _mk_cgroup(top, job):
    name = f"privtmpd-test-{secrets.token_hex(4)}"
    d = f"{top}/{name}/slurm/uid_{CHAIN_UID}/job_{job}/step_0"
    os.makedirs(d)
    return f"{top}/{name}", d


def _rm_cgroup(root):
    for dirpath, _dirs, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


@pytest.mark.parametrize("kind, top", [("v1 freezer", "/sys/fs/cgroup/freezer"),
                                       ("v2", "/sys/fs/cgroup/unified"),
                                       ("v2", "/sys/fs/cgroup")])
def test_epilog_kills_the_jobs_cgroup(daemon, chain_exe, kind, top):
    if not os.path.exists(f"{top}/cgroup.procs") or (kind == "v2") != os.path.exists(f"{top}/cgroup.controllers"):
        pytest.skip(f"no cgroup {kind} hierarchy at {top} on this machine (the other layouts are tested)")
    job = 4102
    assert daemon.create(job, uid=CHAIN_UID, gid=CHAIN_UID)["ok"]
    root, step = _mk_cgroup(top, job)
    reaper = None
    try:
        reaper = _start_chain(daemon, job, chain_exe, f"{step}/cgroup.procs")
        r = run_hook(daemon, "epilog", job, uid=CHAIN_UID, gid=CHAIN_UID)
        assert r.returncode == 0, r.stderr
        assert not _chain_lives(reaper)
        assert f"{root}/slurm/uid_{CHAIN_UID}/job_{job} (" in daemon.log(), daemon.log()
    finally:
        _stop_chain(reaper)
        _rm_cgroup(root)


def test_a_cgroup_of_another_job_or_owner_is_never_killed(daemon):
    """Only a root-owned directory named job_<this job> is a job's cgroup."""
    top = "/sys/fs/cgroup/freezer"
    if not os.path.exists(f"{top}/cgroup.procs"):
        pytest.skip("no cgroup v1 freezer hierarchy on this machine")
    root, step = _mk_cgroup(top, 4200)
    sleeper = subprocess.Popen(["sh", "-c", f"echo $$ > {step}/cgroup.procs; exec sleep 30"])
    try:
        # In the cgroup once sh has written itself there (it execs sleep after).
        deadline = time.monotonic() + 30
        while _proc_comm(sleeper.pid) != "sleep":
            assert time.monotonic() < deadline and sleeper.poll() is None, "the sleeper did not start"
            time.sleep(0.01)
        assert proc.cgroup.job_cgroup_of(sleeper.pid, 4201) is None
        assert proc.cgroup.job_cgroup_of(sleeper.pid, 420) is None
        assert proc.cgroup.job_cgroup_of(sleeper.pid, 4200) == ("freezer", f"{root}/slurm/uid_{CHAIN_UID}/job_4200")
        os.chown(f"{root}/slurm/uid_{CHAIN_UID}/job_4200", CHAIN_UID, CHAIN_UID)     # a user's (delegated) cgroup
        assert proc.cgroup.job_cgroup_of(sleeper.pid, 4200) is None
    finally:
        sleeper.kill()
        sleeper.wait()
        _rm_cgroup(root)


def test_new_pids_wrap_at_pid_max():
    assert list(proc._new_pids(10, 13, 32768)) == [11, 12, 13]
    assert list(proc._new_pids(32766, 301, 32768)) == [32767, 300, 301]
    assert list(proc._new_pids(5, 5, 32768)) == []


def _in_own_namespace(d, job, script):
    """As the job's user, inside the job, in a user+mount namespace of
    their own: sh -c script, which prints "ready" (stdout piped)."""
    return subprocess.Popen(["nsenter", f"--mount={d.pin(job)}", "--", "setpriv", f"--reuid={CHAIN_UID}",
                             f"--regid={CHAIN_UID}", "--clear-groups", "unshare", "-Urm", "sh", "-c", script],
                            stdout=subprocess.PIPE)


def _wait_ready(p, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if b"ready" in line:
            return
        assert line, "the user's process ended before it was ready"
    raise AssertionError("the user's process did not get ready")


# In a user+mount namespace of the job user's own (a copy of the job's):
# /proc covered by a tmpfs with an empty self/mountinfo, and a chroot into a
# fresh tmpfs, so that /proc/PID/mountinfo, seen from the daemon, shows no
# mount of the job's either.
HIDE_FROM_PROBE = r"""
set -e
mkdir -p /tmp/fakeproc /tmp/jail
mount -t tmpfs x /tmp/fakeproc
mkdir /tmp/fakeproc/self
: > /tmp/fakeproc/self/mountinfo
mount -t tmpfs y /tmp/jail
mount --bind /tmp/fakeproc /proc
exec /usr/bin/python3 -c 'import os, time; os.chroot("/tmp/jail"); os.chdir("/"); print("ready", flush=True); time.sleep(300)'
"""


@pytest.mark.parametrize("conf", ["", "tmpfs=/tmp:8m tmpfs=/var/tmp:8m"])
def test_the_namespace_probe_reads_the_daemons_proc_not_the_users(daemon_factory, conf):
    """The probe joins the user's namespace to see its mounts from its
    root; it must read its mountinfo through the daemon's /proc, not the
    "/proc" the namespace's owner mounted."""
    d = daemon_factory(conf)
    job = 4120
    assert d.create(job, uid=CHAIN_UID, gid=CHAIN_UID)["ok"]
    p = _in_own_namespace(d, job, HIDE_FROM_PROBE)
    try:
        _wait_ready(p)
        r = d.destroy(job, restart=0)
        assert r["ok"] and p.pid in r["killed"], r
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# Many tmpfs mounts stacked on one long path full of spaces (each escaped
# to four bytes in mountinfo): a mount table of tens of megabytes.
MANY_MOUNTS = r"""
set -e
cd /tmp
seg=$(printf ' %.0s' $(seq 1 200))
d="a$seg/b$seg/c$seg/d$seg/e$seg/f$seg/g$seg/h$seg/i$seg/j$seg/k$seg/l$seg/m$seg/n$seg/o$seg/p$seg/q$seg/r$seg"
mkdir -p "$d"
i=0
while [ $i -lt 3000 ]; do mount -t tmpfs x "/tmp/$d"; i=$((i+1)); done
echo ready
exec sleep 300
"""


def test_a_users_mount_table_holds_other_requests_for_the_probe_budget_at_most(daemon_factory):
    """The job's user decides how big the mount tables of their own
    namespaces are.  The daemon never parses one in its main thread; the
    probes of one teardown share proc.PROBE_SECONDS, after which a
    namespace of the user's not yet judged counts as the job's."""
    import threading
    d = daemon_factory("tmpfs=/tmp:8m tmpfs=/var/tmp:8m")
    job = 4121
    assert d.create(job, uid=CHAIN_UID, gid=CHAIN_UID)["ok"]
    p = _in_own_namespace(d, job, MANY_MOUNTS)
    try:
        _wait_ready(p)
        out = {}
        t = threading.Thread(target=lambda: out.update(r=d.destroy(job, restart=0)))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert d.create(job + 1)["ok"]          # another job's Prolog
        waited = time.monotonic() - t0
        t.join(120)
        assert out["r"]["ok"] and p.pid in out["r"]["killed"], out
        # Parsing this table in the main thread held it 4 s here; the rest
        # of a teardown is milliseconds, and a busy machine gets its margin.
        assert waited < proc.PROBE_SECONDS + 1.5, f"another job's create waited {waited:.1f} s"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        d.destroy(job + 1)

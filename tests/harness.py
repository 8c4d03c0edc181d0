"""Test harness shared by the pytest suite and the demo: a real privtmpd
daemon on its own run directory and base, and cleanup of what an
interrupted run left behind.  No pytest imports here."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from privtmpd import client, config, proc, runstate  # noqa: E402

# Everything the tests create lives under these, so leftovers of an
# interrupted run are found and removed by the next one.
TEST_RUN = "/run/privtmpd-test"
TEST_BASE_PARENT = "/var/lib/privtmpd-test/base"


def _mountpoints():
    return [m.mountpoint for m in proc.mounts()]


def _umount_under(prefix):
    mps = _mountpoints()
    inside = [m for m in mps if m == prefix or m.startswith(prefix.rstrip("/") + "/")]
    for mp in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


def _alive(pidfile):
    """The pid file's process runs and is the daemon of that config (a pid
    from an earlier boot or run may have been reused by anything)."""
    conf = pidfile[:-4] + ".conf"
    try:
        pid = int(open(pidfile).read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (ValueError, OSError):
        return False
    # A pid file without a config is a test's claim on a scratch directory,
    # held by that test session's own process.
    return conf.encode() in argv if os.path.exists(conf) else True


def safe_name(text):
    """A daemon name usable in paths and mountinfo: [A-Za-z0-9_.-], unique
    even when long test ids share a prefix."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    if len(clean) > 48 or clean != text:
        clean = f"{clean[:40]}-{hashlib.sha1(text.encode()).hexdigest()[:7]}"
    return clean


def clean_leftovers():
    """Remove what an interrupted earlier run left: pins, mounts and
    directories of test daemons that are no longer running.  State of a
    daemon that is still alive (another test session) is left alone."""
    live = set()
    if os.path.isdir(TEST_RUN):
        for f in os.listdir(TEST_RUN):
            if f.endswith(".pid") and _alive(os.path.join(TEST_RUN, f)):
                live.add(f[:-4])
    for top in (TEST_RUN, TEST_BASE_PARENT):
        if not os.path.isdir(top):
            continue
        for name in os.listdir(top):
            stem = name.rsplit(".", 1)[0] if name.endswith((".pid", ".conf", ".log")) else name
            if stem in live:
                continue
            path = os.path.join(top, name)
            _umount_under(path)
            if os.path.isdir(path) and not os.path.islink(path):
                _remove(path)
            else:
                os.unlink(path)


def _remove(path):
    # Our own removal: iterative (shutil.rmtree recurses and fails on the
    # 100 000-level trees some tests make), never follows symlinks.
    from privtmpd import safefs
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        safefs.remove_tree(fd, os.path.basename(path))
    finally:
        os.close(fd)


class DaemonProc:
    """A real privtmpd started in the foreground on its own rundir and base."""

    def __init__(self, name, extra="", base_parent=None, prefix=()):
        name = safe_name(name)
        self.name = name
        self.prefix = list(prefix)      # e.g. unshare -m: the daemon in a mount namespace of its own
        self.rundir = f"{TEST_RUN}/{name}"
        self.base_parent = base_parent or f"{TEST_BASE_PARENT}/{name}"
        self.conf_path = f"{TEST_RUN}/{name}.conf"
        self.log_path = f"{TEST_RUN}/{name}.log"
        self.pidfile = f"{TEST_RUN}/{name}.pid"
        # mount=/tmp here is this machine's own /tmp: the daemon under test
        # only reports what the jobs' users (nobody, by default) created
        # there during a job, unless a test asks for host_leftovers=remove
        # with a uid of its own (test_leftovers.py).
        if "host_leftovers=" not in extra:
            extra = f"host_leftovers=report\n{extra}"
        self.text = f"base={self.base_parent}/job\nmount=/tmp mount=/var/tmp\nrundir={self.rundir}\n{extra}\n"
        self.proc = None

    @property
    def cfg(self):
        return config.parse(self.text, self.conf_path)

    @property
    def socket(self):
        return self.cfg.socket_path

    def start(self, wait=True):
        os.makedirs(TEST_RUN, mode=0o755, exist_ok=True)
        if not os.path.isdir(self.base_parent):
            os.makedirs(self.base_parent, mode=0o755)
            os.chmod(self.base_parent, 0o1777)   # like /tmp: world-writable, sticky
        with open(self.conf_path, "w") as f:
            f.write(self.text)
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.prefix + [sys.executable, "-m", "privtmpd.daemon", "--foreground",
                                      "--config", self.conf_path], cwd=REPO,
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        with open(self.pidfile, "w") as f:
            f.write(str(self.proc.pid))
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"privtmpd exited {self.proc.returncode}:\n{self.log()}")
            try:
                if client.request({"op": "status"}, self.socket, timeout=5, retry=0)["ok"]:
                    return
            except client.ClientError:
                time.sleep(0.05)
        raise RuntimeError(f"privtmpd not ready after {timeout}s:\n{self.log()}")

    def request(self, **msg):
        return client.request(msg, self.socket, timeout=60, retry=5)

    def create(self, job, uid=65534, gid=65534, restart=0):
        return self.request(op="create", job=str(job), restart=str(restart), uid=str(uid), gid=str(gid))

    def destroy(self, job, restart=None):
        msg = {"op": "destroy", "job": str(job)}
        if restart is not None:
            msg["restart"] = str(restart)
        return self.request(**msg)

    def pin(self, job):
        return f"{self.rundir}/ns/{job}"

    def job_dir(self, job, restart=0):
        return f"{self.base_parent}/job.{job}.{restart}"

    def log_lines(self, job, op, timeout=30):
        """The daemon's log lines about job with op=<op>, once there is one."""
        pat = re.compile(rf"job={job} .*op={op} .*")
        found = []

        def look():
            with open(self.log_path, errors="replace") as f:
                found[:] = [m.group(0) for m in pat.finditer(f.read())]
            return found
        wait_for(look, timeout, f"an op={op} line for job {job}")
        return found

    def wait_removals(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.request(op="status")
            if not st["removals_queued"] and not st["removals_running"]:
                return
            time.sleep(0.05)
        raise AssertionError("background removals did not finish")

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        return self.proc.returncode if self.proc else None

    def kill(self):
        return self.stop(signal.SIGKILL)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-5000:]
        except FileNotFoundError:
            return ""

    def cleanup(self):
        self.kill()
        cfg = self.cfg
        if os.path.isdir(f"{self.rundir}/ns"):
            for job in runstate.list_pins(cfg):
                runstate.unpin(cfg, job)
        for top in (self.rundir, self.base_parent):
            if os.path.isdir(top):
                _umount_under(top)
                _remove(top)
        for path in (self.pidfile, self.conf_path, self.log_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def wait_for(pred, timeout=60, what="condition"):
    """Poll pred() until it is true; AssertionError naming what after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def nsenter(pin, *cmd, user=None, check=True):
    """Run cmd inside a pinned namespace (as nsenter(1) would), optionally as user."""
    argv = ["nsenter", f"--mount={pin}", "--"]
    if user:
        argv += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.run(argv + list(cmd), capture_output=True, text=True, check=check)


class Stack:
    """privtmpd wired into a real local Slurm cluster, as an admin would:
    Prolog/Epilog hooks, the entry helper in plugstack.conf.

    The hooks take the daemon's socket from a one-line wrapper, because this
    stack uses its own run directory (Slurm passes hooks no arguments)."""

    def __init__(self, name="e2e", extra_conf="", daemon_extra=""):
        from localcluster import LocalCluster
        self.daemon = DaemonProc(name, daemon_extra)
        # The helper is built outside the checkout: a checkout under /tmp
        # would be hidden inside jobs, and srun in a batch job loads it there.
        libdir = f"/var/lib/privtmpd-test/lib-{name}"
        os.makedirs(libdir, exist_ok=True)
        subprocess.run(["make", "-B", "-s", "-C", os.path.join(REPO, "spank"), f"BUILDDIR={libdir}"], check=True)
        self.so = os.path.join(libdir, "privtmpd_spank.so")
        hookdir = f"/var/lib/privtmpd-test/hooks-{name}"
        os.makedirs(hookdir, exist_ok=True)
        hooks = {}
        for kind in ("prolog", "epilog"):
            path = f"{hookdir}/{kind}.sh"
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\nexec {REPO}/scripts/{kind}.py --socket {self.daemon.socket}\n")
            os.chmod(path, 0o755)
            hooks[kind] = path
        self.cluster = LocalCluster(prolog=hooks["prolog"], epilog=hooks["epilog"], extra_conf=extra_conf,
                                    plugstack_lines=[f"required {self.so} rundir={self.daemon.rundir} tmpdir=/tmp"])

    def start(self):
        self.daemon.start()
        try:
            self.cluster.ensure_users()
            self.cluster.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        try:
            self.cluster.stop()
        finally:
            self.daemon.cleanup()

    def job_dir(self, job, restart=0):
        return self.daemon.job_dir(job, restart)

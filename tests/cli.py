"""Helpers for the admin-tool tests: run the real privtmpctl, on a pipe or
on a terminal; processes living inside a job's namespace; wheels and
virtualenvs built from this checkout.  No pytest imports here."""

import errno
import glob
import os
import pty
import shutil
import signal
import subprocess
import sys
import threading
import time

from harness import REPO

# Where packaging tests put source copies, wheels and virtualenvs: not
# under /tmp, which jobs see privately.
PKG_WORK = "/var/lib/privtmpd-test/pkg"


def ctl(conf, *args, input=None, env=None, timeout=120, python=None, cwd=REPO):
    """privtmpctl --config conf ARGS, as a subprocess.  With python, the
    CLI of another installation (a virtualenv's interpreter)."""
    argv = [python or sys.executable, "-m", "privtmpd.ctl"]
    if conf:
        argv += ["--config", conf]
    full_env = dict(os.environ)
    full_env.pop("SLURM_CONF", None)
    if env:
        full_env.update(env)
    return subprocess.run(argv + [str(a) for a in args], input=input, capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def run_on_tty(argv, timeout=120, env=None):
    """Run argv with stderr on a pseudo-terminal (stdout on a pipe, as in
    `privtmpctl ... | less`).  Returns (returncode, stdout, terminal text)."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=REPO,
                         env=env)
    os.close(slave)
    chunks = []

    def pump():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError as e:         # EIO: the other side is closed
                if e.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            chunks.append(data)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        t.join(10)
        os.close(master)
    return p.returncode, out.decode(errors="replace"), b"".join(chunks).decode(errors="replace")


class InsideJob:
    """A process that lives inside a job's namespace as an unprivileged
    user, as a job's task would."""

    def __init__(self, pin, cmd="exec sleep 600", user="nobody"):
        import pwd
        pw = pwd.getpwnam(user)
        self.pin = pin
        self.proc = subprocess.Popen(["nsenter", f"--mount={pin}", "--", "setpriv", f"--reuid={pw.pw_uid}",
                                      f"--regid={pw.pw_gid}", "--clear-groups", "sh", "-c", cmd],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid

    def wait_inside(self, timeout=10):
        """Until the process is in the job's namespace and runs as the user."""
        want = os.stat(self.pin)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = os.stat(f"/proc/{self.pid}/ns/mnt")
                if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino) and \
                        os.stat(f"/proc/{self.pid}").st_uid != 0:
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError("process did not start inside the job")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def wait_for(pred, timeout=30, what="condition", interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


# --- packaging -------------------------------------------------------------

_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                                 ".pytest_cache", ".benchmarks", "results", "*.so", "*.pyc")


def source_copy(dest, version=None):
    """A clean copy of the checkout (what an sdist holds), optionally with
    another version number, to build from without touching the checkout."""
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(REPO, dest, ignore=_IGNORE, symlinks=True)
    if version:
        init = os.path.join(dest, "privtmpd", "__init__.py")
        with open(init) as f:
            text = f.read()
        import re
        text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', text)
        with open(init, "w") as f:
            f.write(text)
    return dest


def build_wheel(src, outdir):
    """pip wheel of a source tree, offline (no build isolation: setuptools
    and wheel come from the test environment)."""
    os.makedirs(outdir, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", outdir, src], check=True, capture_output=True, text=True, timeout=600)
    [whl] = glob.glob(os.path.join(outdir, "privtmpd-*.whl"))
    return whl


def make_venv(path):
    """A virtualenv whose dependencies (psutil, python-daemon) come from the
    test environment's site-packages: installs need no network."""
    if os.path.exists(path):
        shutil.rmtree(path)
    subprocess.run([sys.executable, "-m", "venv", path], check=True, timeout=300)
    import sysconfig
    ours = sysconfig.get_paths()["purelib"]
    [site] = glob.glob(os.path.join(path, "lib", "python3*", "site-packages"))
    # Appended after the venv's own site-packages, so the installed
    # privtmpd wins over anything in ours (.pth lines are not processed
    # recursively, so the checkout's editable install does not leak in).
    with open(os.path.join(site, "zz-test-deps.pth"), "w") as f:
        f.write(ours + "\n")
    return path


def pip_install(venv, wheel, upgrade=False):
    argv = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
    if upgrade:
        argv.append("--upgrade")
    return subprocess.run(argv + [wheel], check=True, capture_output=True, text=True, timeout=300)


def site_packages(venv):
    [site] = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    return site


def start_daemon(d, args=(), env=None, argv=None, cwd=REPO):
    """Start a harness.DaemonProc's daemon with extra arguments, another
    environment or another executable (argv replaces `python -m
    privtmpd.daemon`); waits until it serves."""
    import subprocess as sp
    os.makedirs(os.path.dirname(d.conf_path), mode=0o755, exist_ok=True)
    if not os.path.isdir(d.base_parent):
        os.makedirs(d.base_parent, mode=0o755)
        os.chmod(d.base_parent, 0o1777)
    with open(d.conf_path, "w") as f:
        f.write(d.text)
    d.logf = open(d.log_path, "ab")
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    cmd = list(argv or [sys.executable, "-m", "privtmpd.daemon"]) + ["--foreground", "--config", d.conf_path]
    d.proc = sp.Popen(cmd + list(args), cwd=cwd, stdout=d.logf, stderr=sp.STDOUT, env=full_env)
    with open(d.pidfile, "w") as f:
        f.write(str(d.proc.pid))
    d.wait_ready()
    return d

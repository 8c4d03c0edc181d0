"""A Debian 12 system booted with a real systemd as PID 1, to run privtmpd
under its unit (systemd/privtmpd.service) as a node would.

The root filesystem is made once with debootstrap (minbase plus systemd and
what privtmpd needs, from the machine's configured Debian mirror) and kept
in $PRIVTMPD_SYSTEMD_ROOT (default /var/cache/privtmpd/bookworm-systemd).
It is booted with systemd-nspawn --boot --volatile=overlay: every boot
starts from the cached tree, and what the run installs or writes lives in a
tmpfs that goes with the container, so the cache is never changed.

What works on this kind of host (no systemd as PID 1, cgroup v1 with the
v2 hierarchy at /sys/fs/cgroup/unified, i.e. "hybrid"), measured with
systemd 252 on both sides:
- Plain `systemd-nspawn --boot` fails with "Failed to open system bus":
  without --register=no it asks systemd-machined, and without --keep-unit
  it asks the host's systemd for a transient scope; neither exists.  With
  --register=no --keep-unit it boots (multi-user.target reached) in 0.3 s:
  the container's systemd sets up the hybrid hierarchy under the caller's
  cgroups itself.
- nspawn puts no device cgroup on a container it cannot register, and keeps
  CAP_SYS_ADMIN and CAP_MKNOD: loop devices (limit= images) work once their
  nodes exist in the container's own /dev (see make_loop_nodes).
- --private-network: the container gets only a loopback of its own, so the
  host's interfaces are untouched and abstract Unix sockets do not meet.
- The host's bounding set may lack CAP_SYS_RESOURCE (it does here): nspawn
  warns "Some capabilities will not be set", and the unit's LimitNOFILE=
  above the host's hard limit and OOMScoreAdjust=-500 cannot be applied in
  the container (systemd logs it and goes on).
- On SIGTERM nspawn asks the container to power off (SIGRTMIN+3 to its
  init); the shutdown takes 0.2 s here.

Stopping is by PID and reaches only what this lab started: the state file
records nspawn's and the container init's PIDs with their start times
(field 22 of /proc/<pid>/stat), so a PID reused by anything else is never
signalled; a start first stops such leftovers of an interrupted run.
SIGKILL to the container's init (its PID namespace's PID 1) ends every
process in it, privtmpd and the job namespaces' holders included; the
pins, mounts and tmpfs go with its mount namespace.

Commands run inside with nsenter into the init's namespaces (mount, UTS,
IPC, network, PID, cgroup where they differ from ours) and its root.
"""

import fcntl
import json
import os
import shlex
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.environ.get("PRIVTMPD_SYSTEMD_ROOT", "/var/cache/privtmpd/bookworm-systemd")
LABDIR = "/var/lib/privtmpd-test/systemdlab"
MACHINE = "privtmpd-sdlab"
# Changing the recipe below changes this stamp, and the cache is rebuilt.
RECIPE = "2"
PACKAGES = ("systemd,systemd-sysv,dbus,ca-certificates,python3,python3-venv,python3-pip,"
            "python3-setuptools,python3-wheel,python3-psutil,python3-daemon,e2fsprogs,util-linux,"
            "procps,iproute2")
# Units of a full machine that a lab needs not and that only slow the boot
# or write to the console.
MASKED = ("console-getty.service", "getty@.service", "apt-daily.timer", "apt-daily-upgrade.timer",
          "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer", "systemd-tmpfiles-clean.timer")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabUnavailable(Exception):
    """The container cannot be made or booted here; the message says why."""


def _run(argv, **kw):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)


def ensure_rootfs(log=print):
    """The cached root filesystem, made now if missing or of an older recipe
    (about a minute).  Raises LabUnavailable."""
    stamp = os.path.join(ROOT, ".privtmpd-systemdlab")
    try:
        with open(stamp) as f:
            if f.read().strip() == RECIPE:
                return ROOT
    except FileNotFoundError:
        pass
    for tool in ("debootstrap", "systemd-nspawn"):
        if _run(["sh", "-c", f"command -v {tool}"]).returncode:
            raise LabUnavailable(f"{tool} not installed (apt-get install debootstrap systemd-container)")
    os.makedirs(os.path.dirname(ROOT), exist_ok=True)
    with open(ROOT + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # one builder; the others wait and reuse its tree
        if os.path.exists(stamp) and open(stamp).read().strip() == RECIPE:
            return ROOT
        new = ROOT + ".new"
        _run(["rm", "-rf", "--one-file-system", new])
        log(f"systemdlab: debootstrap bookworm into {ROOT} (once)")
        r = _run([os.path.join(REPO, "tools", "debootstrap-root.sh"), "bookworm", new, PACKAGES], timeout=900)
        if r.returncode:
            raise LabUnavailable(f"debootstrap failed: {(r.stdout + r.stderr)[-1500:]}")
        with open(f"{new}/etc/hostname", "w") as f:
            f.write(MACHINE + "\n")
        # An empty machine-id: nspawn hands the container a fresh one per boot.
        open(f"{new}/etc/machine-id", "w").close()
        _run(["chroot", new, "systemctl", "set-default", "multi-user.target"], check=True)
        _run(["chroot", new, "systemctl", "mask", *MASKED], check=True)
        with open(f"{new}/.privtmpd-systemdlab", "w") as f:
            f.write(RECIPE + "\n")
        _run(["rm", "-rf", "--one-file-system", ROOT])
        os.rename(new, ROOT)
    return ROOT


# ------------------------------------------------------------ processes
def _start_time(pid):
    """Start time of pid in clock ticks since boot (never reused with the
    PID while the machine runs), or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive_as(pid, start):
    return bool(pid) and start is not None and _start_time(pid) == start


def _kill_checked(pid, start, sig):
    if _alive_as(pid, start):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _ns(pid, kind):
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


class SystemdLab:
    """One booted container.  start(), run(...), stop(); a context manager."""

    def __init__(self, root=None, labdir=LABDIR):
        self.root = root or ROOT
        self.labdir = labdir
        self.state_path = os.path.join(labdir, "machine.json")
        self.log_path = os.path.join(labdir, "console.log")
        self.proc = None
        self.init_pid = None
        self.state = {}

    # --- lifecycle ------------------------------------------------------
    def _save(self):
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.state_path)

    def stop_leftovers(self):
        """Stop a container of an interrupted run, if the state file names
        processes that are still the ones it recorded."""
        try:
            with open(self.state_path) as f:
                old = json.load(f)
        except (FileNotFoundError, ValueError):
            return False
        found = (_alive_as(old.get("nspawn"), old.get("nspawn_start"))
                 or _alive_as(old.get("init"), old.get("init_start")))
        if found:
            self._halt(old, timeout=15)
        os.unlink(self.state_path)
        return found

    def start(self, timeout=90):
        os.makedirs(self.labdir, exist_ok=True)
        self.stop_leftovers()
        argv = ["systemd-nspawn", "-D", self.root, "-M", MACHINE, "--boot",
                "--register=no", "--keep-unit", "--volatile=overlay", "--private-network",
                "--console=pipe", "--tmpfs=/tmp:mode=1777"]
        env = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_LOG_COLOR": "0"}
        with open(self.log_path, "wb") as log:
            # A session of its own: a Ctrl-C at the test's terminal does not
            # reach nspawn, whose SIGINT handling differs from the SIGTERM
            # (clean poweroff) that stop() sends.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.state = {"nspawn": self.proc.pid, "nspawn_start": _start_time(self.proc.pid), "root": self.root}
        self._save()
        deadline = time.monotonic() + timeout
        while self.init_pid is None:
            if self.proc.poll() is not None:
                raise LabUnavailable(f"systemd-nspawn exited {self.proc.returncode}: {self.console_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise LabUnavailable(f"no container init after {timeout} s: {self.console_tail()}")
            for child in _children(self.proc.pid):
                # nspawn's child that is PID 1 of a new PID namespace: the container's systemd.
                if _ns(child, "pid") != _ns(self.proc.pid, "pid"):
                    try:
                        with open(f"/proc/{child}/status") as f:
                            nspid = next(ln.split()[1:] for ln in f if ln.startswith("NSpid:"))
                    except (OSError, StopIteration):
                        continue
                    if nspid[-1:] == ["1"]:
                        self.init_pid = child
            time.sleep(0.05)
        self.state.update(init=self.init_pid, init_start=_start_time(self.init_pid))
        self._save()
        # nspawn's child sets up the container's mounts before it execs
        # systemd: "Failed to connect to bus" (state "") or "offline" until
        # systemd has its private socket; then --wait blocks until the boot
        # is over.
        while True:
            left = max(5, deadline - time.monotonic())
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
            state = r.stdout.strip()
            self.boot_output = r.stdout + r.stderr
            if state not in ("offline", "") or time.monotonic() > deadline or self.proc.poll() is not None:
                break
            time.sleep(0.1)
        if state not in ("running", "degraded"):
            out = self.console_tail()
            self.stop()
            raise LabUnavailable(f"the container's systemd did not finish booting ({state!r}: {self.boot_output.strip()}): {out}")
        self.boot_state = state
        return self

    def _halt(self, st, timeout):
        """Poweroff through nspawn (SIGTERM), then SIGKILL to the container's
        init (its PID namespace dies with it) and to nspawn."""
        nspawn, nstart = st.get("nspawn"), st.get("nspawn_start")
        init, istart = st.get("init"), st.get("init_start")
        _kill_checked(nspawn, nstart, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (_alive_as(nspawn, nstart) or _alive_as(init, istart)):
            if self.proc is not None and self.proc.pid == nspawn:
                self.proc.poll()
            time.sleep(0.1)
        _kill_checked(init, istart, signal.SIGKILL)
        _kill_checked(nspawn, nstart, signal.SIGKILL)
        if self.proc is not None and self.proc.pid == nspawn:
            self.proc.wait(10)
        else:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive_as(nspawn, nstart):
                time.sleep(0.1)
        # nspawn may leave its per-machine propagation directory behind
        # ("we can't allow that": /run is not a tmpfs here).
        _run(["rm", "-rf", "--one-file-system", f"/run/systemd/nspawn/propagate/{MACHINE}"])

    def stop(self, timeout=30):
        if self.state:
            self._halt(self.state, timeout)
            try:
                os.unlink(self.state_path)
            except FileNotFoundError:
                pass
            self.state = {}
        self.init_pid = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def console_tail(self, lines=30):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- inside ---------------------------------------------------------
    def _nsenter(self):
        argv = ["nsenter", f"--target={self.init_pid}"]
        for kind, opt in (("mnt", "--mount"), ("uts", "--uts"), ("ipc", "--ipc"), ("net", "--net"),
                          ("pid", "--pid"), ("cgroup", "--cgroup")):
            if _ns(self.init_pid, kind) != _ns(os.getpid(), kind):
                argv.append(opt)
        return argv + ["--root", "--wd"]

    def run(self, argv, check=True, timeout=60, input=None, env=None):
        """argv inside the container, as root, with a clean environment.
        Returns the CompletedProcess (text); check raises with its output."""
        if self.init_pid is None:
            raise LabUnavailable("the container is not running")
        full = self._nsenter() + ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "SYSTEMD_COLORS=0",
                                  "SYSTEMD_PAGER=", *(f"{k}={v}" for k, v in (env or {}).items()), *argv]
        r = subprocess.run(full, input=input, capture_output=True, text=isinstance(input, str) or input is None,
                           timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode:
            raise AssertionError(f"in the container: {shlex.join(argv)} exited {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def sh(self, script, **kw):
        return self.run(["sh", "-c", script], **kw)

    def write(self, path, text, mode="0644"):
        self.run(["sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode} "$1"', "sh", path],
                 input=text)

    def copy_checkout(self, dest):
        """The checkout's files (tracked and untracked, not ignored) to dest
        inside; a copy that is not a git work tree (tools/trixie-leg.sh
        makes one) goes whole but for its venv and build products."""
        files = _run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        if files.returncode == 0:
            argv = ["tar", "--null", "-C", REPO, "-T", "-", "-cf", "-"]
        else:
            argv = ["tar", "-C", REPO, "--exclude=./.venv", "--exclude=./.git", "--exclude=./build",
                    "--exclude=__pycache__", "--exclude=*.egg-info", "-cf", "-", "."]
        tar = subprocess.run(argv, input=files.stdout.encode() if files.returncode == 0 else None,
                             stdin=None if files.returncode == 0 else subprocess.DEVNULL,
                             capture_output=True, check=True).stdout
        self.run(["sh", "-c", 'rm -rf "$1" && mkdir -p "$1" && tar -xf - -C "$1"', "sh", dest], input=tar)

    def make_loop_nodes(self, count=64):
        """Loop device nodes in the container's /dev (a tmpfs nspawn fills
        with a few basic nodes only): mount -o loop asks /dev/loop-control
        for a free device and opens /dev/loop<N>, which must exist."""
        self.sh(f"[ -e /dev/loop-control ] || mknod -m 600 /dev/loop-control c 10 237; "
                f"i=0; while [ $i -lt {count} ]; do [ -e /dev/loop$i ] || mknod -m 660 /dev/loop$i b 7 $i; "
                f"i=$((i+1)); done")

    def unit_property(self, unit, *names):
        r = self.run(["systemctl", "show", unit, *(f"--property={n}" for n in names)])
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

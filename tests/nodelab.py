#!/usr/bin/env python3
"""A multi-node Slurm cluster in namespaces of its own, for tests and demos.

One controller and N compute nodes, each a "machine" made of new PID,
mount, network and UTS namespaces:

- its own hostname (ctl, n1, n2, ...) and IP address (10.77.0.1, .11, .12,
  ...) on a bridge that exists only inside the controller's network
  namespace: the host's interfaces, routes and ports are never touched,
  and Slurm's default ports are free in every namespace;
- its own /tmp, /var/tmp, /dev/shm (tmpfs, as on Debian 13) and /run, and
  the lab's /etc/hosts bound over the host's (the host's file is not
  edited);
- its own munged on the default socket /run/munge/munge.socket.2, with a
  key shared by the lab;
- its own /proc: the PID namespace's init is the lab's holder process, a
  reaper that stays until the machine is stopped.

The host's file systems (the repository, /var/lib/privtmpd-test with the
users' work directories and slurm.conf) are shared, like NFS homes on a
real cluster.  A repository under /tmp, /var/tmp or /dev/shm stays at its
path inside the machines: the holder moves a bind of it back in place.

Stopping is by PID and can only reach what the lab started: the kernel
kills every process of a PID namespace when its init (our holder) dies,
and with the last process the namespaces, their mounts (privtmpd's pins
included) and their tmpfs contents go.  A holder is ours when the pid file
of this lab directory names it and its command line names the lab
directory; a start first stops such leftovers of an interrupted run.

Used by tests/test_e2e_multinode.py and tools/demo.py::

    with LabStack(nodes=3) as lab:
        r = lab.cluster.srun("privtmp1", ["-N3", "hostname"])
        lab.node_path("n2", "/tmp/slurm.1.0")   # the host's view of n2's file
"""

import argparse
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from localcluster import (SBIN_PATH, TEST_USERS, ClusterError,  # noqa: E402
                          LocalCluster, _cmdline, _kill_and_wait, _proc_name, _tail,
                          _which)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LABDIR = "/var/lib/privtmpd-test/lab"
SUBNET = "10.77.0"
PRIVATE_MOUNTS = (("/tmp", "1777"), ("/var/tmp", "1777"), ("/dev/shm", "1777"), ("/run", "0755"))


def node_ip(index):
    """10.77.0.1 for the controller (index 0), 10.77.0.1N for node N."""
    return f"{SUBNET}.1" if index == 0 else f"{SUBNET}.{10 + index}"


def _ns_id(pid, kind):
    st = os.stat(f"/proc/{pid}/ns/{kind}")
    return (st.st_dev, st.st_ino)


def _under_private(path):
    return any(path == top or path.startswith(top + "/") for top, _ in PRIVATE_MOUNTS)


# ------------------------------------------------------------ the holder
def hold(name, hosts, stage, keep):
    """Body of a machine: runs as PID 1 of its new PID namespace, in new
    mount, network and UTS namespaces (see Machine.start).  Sets the
    machine up, says "ready" on stdout, then reaps orphans until SIGTERM."""
    def run(*argv):
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)

    socket.sethostname(name)
    # A kept path (the repository under /tmp) is bound aside before the
    # tmpfs hides it, and moved back on top of the new tmpfs afterwards.
    staged = []
    for i, path in enumerate(keep):
        aside = os.path.join(stage, str(i))
        os.makedirs(aside, exist_ok=True)
        run("mount", "--bind", path, aside)
        staged.append((aside, path))
    for top, mode in PRIVATE_MOUNTS:
        run("mount", "-t", "tmpfs", "-o", f"mode={mode},nosuid,nodev", f"lab-{name}", top)
    os.makedirs("/run/lock", mode=0o1777)
    os.chmod("/run/lock", 0o1777)
    for aside, path in staged:
        os.makedirs(path, exist_ok=True)
        run("mount", "--move", aside, path)
    run("mount", "--bind", hosts, "/etc/hosts")
    run("ip", "link", "set", "lo", "up")

    class _Stop(Exception):
        pass

    def on_term(signum, frame):
        raise _Stop
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.close(1)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        while True:
            try:
                os.wait()
            except ChildProcessError:
                time.sleep(0.2)
    except _Stop:
        pass
    # Ask everything in the machine to stop, give it a moment, then exit:
    # the kernel kills whatever is left when PID 1 of a namespace exits.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.kill(-1, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)


class Machine:
    """One lab machine (controller or node), seen from the host."""

    def __init__(self, lab, name, index):
        self.lab = lab
        self.name = name
        self.index = index
        self.ip = node_ip(index)
        self.pidfile = os.path.join(lab.labdir, "run", f"{name}.holder.pid")
        self.pid = None
        self._unshare = None

    # The holder's command line names the lab directory: the proof that a
    # pid from the pid file is still our holder and not a reused PID.
    def _is_ours(self, pid):
        return bool(pid) and _proc_name(pid) is not None and \
            any(self.lab.labdir.encode() == arg for arg in _cmdline(pid)) and \
            b"hold" in _cmdline(pid)

    def _stale_pid(self):
        try:
            with open(self.pidfile) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if self._is_ours(pid) else None

    def start(self, timeout=20):
        keep = [REPO] if _under_private(os.path.realpath(REPO)) else []
        stage = os.path.join(self.lab.labdir, "stage", self.name)
        os.makedirs(stage, exist_ok=True)
        argv = [_which("unshare"), "--pid", "--fork", "--mount-proc", "--mount", "--net", "--uts",
                "--propagation", "private", "--", sys.executable, os.path.abspath(__file__), "hold",
                "--labdir", self.lab.labdir, "--name", self.name, "--hosts", self.lab.hosts_file,
                "--stage", stage] + [arg for path in keep for arg in ("--keep", os.path.realpath(path))]
        err = open(os.path.join(self.lab.logdir, f"{self.name}.holder.log"), "wb")
        try:
            self._unshare = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=err, cwd="/", start_new_session=True)
        finally:
            err.close()
        # unshare --fork: the holder is unshare's only child.
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children") as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if kids:
                self.pid = int(kids[0])
                break
            if self._unshare.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"lab machine {self.name} did not start:\n"
                                   + _tail(os.path.join(self.lab.logdir, f"{self.name}.holder.log")))
            time.sleep(0.01)
        with open(self.pidfile, "w") as f:
            f.write(f"{self.pid}\n")
        line = self._unshare.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise ClusterError(f"lab machine {self.name} failed to set up:\n"
                               + _tail(os.path.join(self.lab.logdir, f"{self.name}.holder.log")))
        return self

    def stop(self, timeout=10):
        """SIGTERM to our holder (it passes it on inside), SIGKILL after
        timeout; either way the kernel ends the whole PID namespace."""
        pid = self.pid if self._is_ours(self.pid) else self._stale_pid()
        self.pid = None
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _proc_name(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _proc_name(pid):
                os.kill(pid, signal.SIGKILL)
                while _proc_name(pid):
                    time.sleep(0.05)
        if self._unshare is not None:
            try:
                self._unshare.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._unshare.stdout.close()
            self._unshare = None
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass

    @property
    def alive(self):
        return self._is_ours(self.pid)

    def enter(self, argv, user=None, cwd=None):
        """argv run inside this machine (all its namespaces), as user."""
        if not self.alive:
            raise ClusterError(f"lab machine {self.name} is not running")
        cmd = [_which("nsenter"), "-t", str(self.pid), "--pid", "--mount", "--net", "--uts"]
        if cwd:
            cmd.append(f"--wd={cwd}")
        cmd.append("--")
        if user:
            cmd += [_which("runuser"), "-u", user, "--"]
        return cmd + list(argv)

    def ip_cmd(self, *args):
        subprocess.run([_which("nsenter"), "-t", str(self.pid), "--net", "--", _which("ip")] + list(args),
                       check=True, capture_output=True, text=True)

    def path(self, path):
        """The host's view of path as this machine sees it."""
        return f"/proc/{self.pid}/root{path}"

    def pids(self, marker=None):
        """Host PIDs of the processes in this machine, optionally only those
        whose command line contains marker."""
        try:
            mine = _ns_id(self.pid, "pid")
        except OSError:
            return []
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            try:
                if _ns_id(entry, "pid") != mine:
                    continue
            except OSError:
                continue
            if marker is None or any(marker.encode() in arg for arg in _cmdline(entry)):
                out.append(int(entry))
        return out


class LabCluster(LocalCluster):
    """slurmctld on the lab's controller, one slurmd per lab node.

    Same job helpers as LocalCluster (srun, sbatch, wait_job, ...): the
    clients run on the controller, as on a login node."""

    def __init__(self, labdir=DEFAULT_LABDIR, nodes=3, prolog=None, epilog=None, plugstack_lines=(),
                 extra_conf="", users=TEST_USERS):
        super().__init__(workdir=os.path.join(labdir, "slurm"), prolog=prolog, epilog=epilog,
                         plugstack_lines=plugstack_lines, extra_conf=extra_conf, users=users)
        self.labdir = os.path.abspath(labdir)
        self.logdir = os.path.join(self.labdir, "log")
        self.rundir = os.path.join(self.labdir, "run")
        self.hosts_file = os.path.join(self.labdir, "hosts")
        self.userwork = os.path.join(os.path.dirname(self.labdir), "work")
        self.ctl = Machine(self, "ctl", 0)
        self.nodes = {f"n{i}": Machine(self, f"n{i}", i) for i in range(1, nodes + 1)}
        self.host = "ctl"
        self.node_names = list(self.nodes)
        self._lockfd = None

    @property
    def machines(self):
        return [self.ctl] + list(self.nodes.values())

    def node(self, name):
        return self.nodes[name]

    # --------------------------------------------------------- configuration
    def write_config(self):
        super().write_config()
        ncpus = os.cpu_count() or 1
        lines = []
        with open(self.conf) as f:
            for line in f:
                if line.startswith(("SlurmctldHost=", "AuthInfo=", "SlurmctldPort=", "SlurmdPort=",
                                    "NodeName=", "ClusterName=")):
                    continue
                line = line.replace("slurmd.pid", "slurmd-%n.pid").replace("slurmd.log", "slurmd-%n.log")
                if line.startswith("SlurmdSpoolDir="):
                    line = line.rstrip("\n") + "/%n\n"
                lines.append(line)
        head = ["ClusterName=privtmpd-lab\n", f"SlurmctldHost=ctl({self.ctl.ip})\n"]
        tail = [f"NodeName={m.name} NodeAddr={m.ip} CPUs={ncpus} RealMemory=1024 TmpDisk=10000 "
                "State=UNKNOWN\n" for m in self.nodes.values()]
        part = [x for x in lines if x.startswith("PartitionName=")]
        rest = [x for x in lines if not x.startswith("PartitionName=")]
        self._write(self.conf, "".join(head + rest + tail + part))
        for m in self.nodes.values():
            os.makedirs(os.path.join(self.spooldir, m.name), exist_ok=True)
        hosts = ["127.0.0.1 localhost\n"] + [f"{m.ip} {m.name}\n" for m in self.machines]
        self._write(self.hosts_file, "".join(hosts))

    def env(self, extra=None):
        env = super().env(extra)
        env["PATH"] = SBIN_PATH
        return env

    # ------------------------------------------------------------ lifecycle
    def _lock(self):
        os.makedirs(self.rundir, exist_ok=True)
        self._lockfd = os.open(os.path.join(self.rundir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"nodelab: another lab on {self.labdir} is running; waiting for it", file=sys.stderr)
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)

    def kill_leftovers(self):
        for m in self.machines:
            m.stop()

    def start(self, timeout=60, lock_timeout=None, before_slurm=None):
        """Start the machines, munged on each, then (after before_slurm(),
        if given) slurmctld and every slurmd; wait until all nodes are idle."""
        if any(m.alive for m in self.machines):
            raise ClusterError("lab already started")
        for d in (self.labdir, self.logdir, self.rundir):
            os.makedirs(d, mode=0o755, exist_ok=True)
        self._lock()
        self.kill_leftovers()
        self.write_config()
        for path in os.listdir(self.logdir):
            if path.endswith((".log", ".stderr")):
                os.replace(os.path.join(self.logdir, path), os.path.join(self.logdir, path + ".1"))
        self.remove_old_outputs()
        try:
            for m in self.machines:
                m.start()
            self._wire_network()
            self._make_munge_key()
            for m in self.machines:
                self._start_munged(m)
            if before_slurm:
                before_slurm()
            self.spawn(self.ctl, "slurmctld", [_which("slurmctld"), "-D", "-c", "-f", self.conf])
            for m in self.nodes.values():
                self.spawn(m, "slurmd", [_which("slurmd"), "-D", "-N", m.name, "-f", self.conf])
            self.wait_idle(timeout=timeout, jobs=False)
        except BaseException:
            self.stop(drain_jobs=False)
            raise
        return self

    def _wire_network(self):
        """A bridge inside the controller's network namespace, one veth pair
        per node: created in the namespaces themselves, so the host's
        network namespace never holds one of these devices."""
        self.ctl.ip_cmd("link", "add", "labbr0", "type", "bridge")
        self.ctl.ip_cmd("addr", "add", f"{self.ctl.ip}/24", "dev", "labbr0")
        self.ctl.ip_cmd("link", "set", "labbr0", "up")
        for m in self.nodes.values():
            self.ctl.ip_cmd("link", "add", f"v-{m.name}", "type", "veth", "peer", "name", "eth0",
                            "netns", str(m.pid))
            self.ctl.ip_cmd("link", "set", f"v-{m.name}", "master", "labbr0", "up")
            m.ip_cmd("addr", "add", f"{m.ip}/24", "dev", "eth0")
            m.ip_cmd("link", "set", "eth0", "up")

    @property
    def munge_dir(self):
        return os.path.join(self.labdir, "munge")

    def _make_munge_key(self):
        import pwd
        pw = pwd.getpwnam("munge")
        os.makedirs(self.munge_dir, mode=0o700, exist_ok=True)
        os.chown(self.munge_dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.munge_dir, 0o700)
        key = os.path.join(self.munge_dir, "munge.key")
        if not os.path.exists(key):
            subprocess.run([_which("mungekey"), "--create", "--keyfile", key], check=True, capture_output=True)
        os.chown(key, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o600)

    def _start_munged(self, m):
        """munged on the machine's default socket, in the machine's /run."""
        setup = ("install -d -o munge -g munge -m 0755 /run/munge && "
                 "exec runuser -u munge -- munged --force --key-file=$0 --pid-file=/run/munge/munged.pid "
                 "--seed-file=/run/munge/munged.seed --log-file=/run/munge/munged.log")
        r = subprocess.run(m.enter(["sh", "-c", setup, os.path.join(self.munge_dir, "munge.key")]),
                           capture_output=True, text=True, timeout=30, env=self.env())
        if r.returncode:
            raise ClusterError(f"munged on {m.name} failed to start: {r.stderr.strip()}")
        deadline = time.monotonic() + 10
        while subprocess.run(m.enter(["sh", "-c", "munge -n | unmunge"]), capture_output=True,
                             env=self.env()).returncode:
            if time.monotonic() > deadline:
                raise ClusterError(f"munged on {m.name} does not answer")
            time.sleep(0.05)

    def spawn(self, m, name, argv, log=None):
        """Start a daemon inside machine m; its output goes to log."""
        log = log or os.path.join(self.logdir, f"{name}-{m.name}.stderr")
        with open(log, "ab") as err:
            proc = subprocess.Popen(m.enter(argv), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    env=self.env(), cwd="/", start_new_session=True)
        self._procs[f"{name}@{m.name}"] = proc
        return proc

    def stop_process(self, m, marker, timeout=10, sig=signal.SIGTERM):
        """Stop the processes of machine m whose command line holds marker."""
        pids = m.pids(marker)
        _kill_and_wait(pids, timeout=timeout, sig=sig)
        for key, proc in list(self._procs.items()):
            if key.endswith("@" + m.name) and proc.poll() is None:
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        return pids

    def stop(self, drain_jobs=True):
        if drain_jobs and self.ctl.alive:
            try:
                ids = self.squeue()
                if ids:
                    self._client([_which("scancel")] + ids, check=False)
                    self.wait_idle(timeout=30)
            except (ClusterError, OSError, subprocess.SubprocessError):
                pass
        self.stop_daemons()

    def stop_daemons(self):
        # Nodes first (their Epilogs talk to the controller), then the
        # controller; each machine's end takes everything in it.
        for m in list(self.nodes.values()) + [self.ctl]:
            m.stop()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs = {}
        if self._lockfd is not None:
            os.close(self._lockfd)
            self._lockfd = None

    def _daemon_pid(self, name):
        m = self.ctl if name == "slurmctld" else None
        return bool(m and m.alive and m.pids(self.conf))

    # --------------------------------------------------------------- clients
    def _client(self, argv, timeout=30, check=True):
        r = subprocess.run(self.ctl.enter(argv), env=self.env(), capture_output=True, stdin=subprocess.DEVNULL,
                           text=True, timeout=timeout)
        if check and r.returncode:
            raise ClusterError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}\n" + self.logs())
        return r

    def _as_user(self, user, argv):
        return self.ctl.enter(argv, user=user, cwd=self.user_dir(user))

    def node_states(self):
        return {n: self.node_state(n) for n in self.nodes}

    def wait_idle(self, timeout=30, jobs=True):
        """Every node idle (no allocation, no Epilog running), and no job
        left in the queue if jobs.  Drained nodes count as idle."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                out = self._client([_which("sinfo"), "-h", "-N", "-o", "%N %T"]).stdout.split()
                last = dict(zip(out[::2], out[1::2]))
                idle = len(last) == len(self.nodes) and all(
                    s.split("+")[0] in ("idle", "drained") for s in last.values())
                if idle and not (jobs and self.squeue()):
                    return
            except ClusterError as e:
                last = str(e).splitlines()[0]
            if time.monotonic() > deadline:
                raise ClusterError(f"lab not idle after {timeout}s (last: {last})\n" + self.logs())
            for name, proc in self._procs.items():
                if name.startswith("slurm") and proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode}\n" + self.logs())
            time.sleep(0.05)

    def logs(self, lines=20):
        parts = []
        names = ["slurmctld.log"] + [f"slurmd-{n}.log" for n in self.nodes]
        names += sorted(f for f in os.listdir(self.logdir) if f.endswith(".stderr"))
        for name in names:
            path = os.path.join(self.logdir, name)
            if os.path.exists(path) and os.path.getsize(path):
                parts.append(f"--- {path} (tail) ---\n" + _tail(path, lines))
        return "\n".join(parts)

    def squeue(self):
        return self._client([_which("squeue"), "-h", "-o", "%i"]).stdout.split()


class LabStack:
    """privtmpd wired into every node of a LabCluster as an admin would set
    it up: the daemon with the production defaults (rundir /run/privtmpd,
    base=/tmp/slurm, mount=/tmp and /var/tmp), the hooks of the checkout as
    Prolog= and Epilog= without arguments, the entry helper in
    plugstack.conf with its default rundir."""

    def __init__(self, nodes=3, labdir=DEFAULT_LABDIR, daemon_conf="base=/tmp/slurm\nmount=/tmp\nmount=/var/tmp\n",
                 extra_conf="", plugstack_args="tmpdir=/tmp"):
        self.labdir = os.path.abspath(labdir)
        libdir = os.path.join(self.labdir, "lib")
        os.makedirs(libdir, exist_ok=True)
        subprocess.run(["make", "-B", "-s", "-C", os.path.join(REPO, "spank"), f"BUILDDIR={libdir}"], check=True)
        self.so = os.path.join(libdir, "privtmpd_spank.so")
        self.conf_path = os.path.join(self.labdir, "privtmpd.conf")
        self.daemon_conf = daemon_conf
        self.cluster = LabCluster(labdir, nodes=nodes, prolog=os.path.join(REPO, "scripts", "prolog.py"),
                                  epilog=os.path.join(REPO, "scripts", "epilog.py"), extra_conf=extra_conf,
                                  plugstack_lines=[f"required {self.so} {plugstack_args}"])

    def daemon_log_path(self, node):
        return os.path.join(self.cluster.logdir, f"privtmpd-{node}.log")

    def start_daemon(self, node, wait=True):
        m = self.cluster.node(node)
        self.cluster.spawn(m, "privtmpd", [sys.executable, "-m", "privtmpd.daemon", "--foreground", "--config",
                                           self.conf_path], log=self.daemon_log_path(node))
        if wait:
            self.wait_daemon(node)

    def wait_daemon(self, node, timeout=20):
        m = self.cluster.node(node)
        deadline = time.monotonic() + timeout
        probe = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from privtmpd import client; "
                 "client.request({'op': 'status'}, timeout=5, retry=0)", REPO]
        while subprocess.run(m.enter(probe), capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise ClusterError(f"privtmpd on {node} not ready after {timeout}s:\n"
                                   + _tail(self.daemon_log_path(node)))
            time.sleep(0.1)

    def stop_daemon(self, node, sig=signal.SIGTERM):
        return self.cluster.stop_process(self.cluster.node(node), self.conf_path, sig=sig)

    def daemon_log(self, node):
        try:
            with open(self.daemon_log_path(node), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def node_path(self, node, path):
        return self.cluster.node(node).path(path)

    def job_dir(self, node, job, restart=0):
        return self.node_path(node, f"/tmp/slurm.{job}.{restart}")

    def start(self):
        with open(self.conf_path, "w") as f:
            f.write(self.daemon_conf)
        c = self.cluster
        c.ensure_users()
        # privtmpd runs on every node before slurmd takes jobs there.
        c.start(before_slurm=lambda: [self.start_daemon(n) for n in c.nodes])
        return self

    def stop(self):
        self.cluster.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold", help="(internal) PID 1 of a lab machine")
    h.add_argument("--labdir", required=True)
    h.add_argument("--name", required=True)
    h.add_argument("--hosts", required=True)
    h.add_argument("--stage", required=True)
    h.add_argument("--keep", action="append", default=[])
    args = ap.parse_args(argv)
    if args.cmd == "hold":
        hold(args.name, args.hosts, args.stage, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

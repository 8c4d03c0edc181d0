#!/usr/bin/env python3
"""A real one-node Slurm cluster on localhost, for tests and demos.

Runs munged, slurmctld and slurmd on 127.0.0.1 with a private configuration
under ``workdir``.  Needs root, the Debian Slurm packages (slurmctld, slurmd,
slurm-client, munge) and nothing else: no cgroups, no systemd.

Used by the pytest suite::

    with LocalCluster(prolog="/path/prolog", epilog="/path/epilog",
                      plugstack_lines=["required /x.so rundir=/run/x"]) as c:
        c.ensure_users()
        r = c.srun("privtmp1", ["hostname"])

and from the shell::

    python3 tests/localcluster.py up --prolog P --epilog E --plugstack-line L
    export SLURM_CONF=/var/lib/privtmpd-test/cluster/slurm.conf
    python3 tests/localcluster.py down

The machine may run a Slurm of its own: this harness never touches it.  Its
munged has its own socket and key under ``workdir``, its daemons listen on
ports of their own (PORTS), and a process is only ever stopped by PID when
it is shown to be ours: a daemon from our pid file whose command line names
our configuration, or a process that holds a file of ``workdir`` open
(slurmstepd keeps our slurmd log open) and what runs under it.  Never by
name.  A start first stops what an interrupted run of this same workdir
left, and wipes the controller's saved state, so old jobs never come back.
A cluster that is still in use by another live process (a second test run
on the same machine) is not a leftover: start() waits for its flock on
LOCK_PATH.  The `up` command does not hold that lock once it returns.

Nothing here may live under /tmp, /var/tmp or /dev/shm: those are the
directories privtmpd replaces inside jobs, and the job's working directory,
its output file, slurm.conf and any SPANK plugin must stay visible in there.
"""

import argparse
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

DEFAULT_WORKDIR = "/var/lib/privtmpd-test/cluster"
TEST_USERS = ("privtmp1", "privtmp2")
PRIVATIZED = ("/tmp", "/var/tmp", "/dev/shm")
# SlurmctldPort, SlurmdPort: not Slurm's 6817/6818, so a Slurm of the
# machine's own keeps its ports and never hears from this cluster.
PORTS = (16817, 16818)
# One cluster per machine (fixed ports, one node name): whoever holds this
# lock owns the Slurm daemons.  A crashed holder releases it with its last
# fd, so its daemons become leftovers that the next start() kills.
LOCK_PATH = "/run/lock/privtmpd-localcluster.lock"
_lock = {"fd": None, "owner": None}
# Where the binaries live; PATH under sudo/pytest does not always have sbin.
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ClusterError(RuntimeError):
    pass


def short_hostname():
    return socket.gethostname().split(".")[0]


def _which(name):
    path = shutil.which(name,
                        path=os.environ.get("PATH", "") + ":" + SBIN_PATH)
    if not path:
        raise ClusterError(f"{name} not found (install slurmctld, slurmd, "
                           "slurm-client and munge)")
    return path


def _proc_name(pid):
    """Name of a live (non-zombie) process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # comm is in parentheses and may itself contain ") ".
    state = data[data.rindex(")") + 2:].split(" ", 1)[0]
    if state in ("Z", "X"):
        return None
    return data[data.index("(") + 1:data.rindex(")")]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _pids_using(prefix):
    """PIDs of live processes with their cwd or an open file under prefix."""
    top = prefix.rstrip("/") + "/"
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or not _proc_name(entry):
            continue
        try:
            links = [os.readlink(f"/proc/{entry}/cwd")]
            links += [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        if any(link.startswith(top) for link in links):
            out.append(int(entry))
    return out


def _process_table():
    """{pid: (name, ppid)} of live processes."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        rest = data[data.rindex(")") + 2:].split()
        if rest[0] not in ("Z", "X"):
            table[int(entry)] = (data[data.index("(") + 1:data.rindex(")")],
                                 int(rest[1]))
    return table


def _descendants(pids):
    table = _process_table()
    children = {}
    for pid, (_, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(pids)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def _kill_and_wait(pids, timeout=10.0, sig=signal.SIGTERM):
    """Signal pids, wait until they are gone, SIGKILL the stubborn ones.

    A process counts as gone once it is a zombie: the daemons are started in
    their own session and, after the starter exits, are reaped by init (or
    never, if init does not reap), which must not make us wait forever.
    """
    pids = [p for p in pids if _proc_name(p)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in pids if _proc_name(p)]
        if not pids:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(_proc_name(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _acquire_machine_lock(owner, timeout):
    """Wait for the machine-wide cluster lock; within one process a new
    cluster simply takes over from the previous one."""
    if _lock["fd"] is not None:
        prev, _lock["owner"] = _lock["owner"], owner
        if prev is not None and prev is not owner:
            prev.stop_daemons()
        return
    os.makedirs(os.path.dirname(LOCK_PATH), exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                print(f"localcluster: {LOCK_PATH} still held after "
                      f"{timeout}s; taking the machine over", file=sys.stderr)
                break
            if not said:
                with open(LOCK_PATH) as f:
                    holder = f.read().strip() or "?"
                print(f"localcluster: another test cluster (pid {holder}) "
                      "is running; waiting for it", file=sys.stderr)
                said = True
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _lock.update(fd=fd, owner=owner)


def _release_machine_lock(owner):
    if _lock["owner"] is owner and _lock["fd"] is not None:
        os.close(_lock["fd"])  # drops the flock
        _lock.update(fd=None, owner=None)


def _tail(path, lines=30):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<{path}: {e.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


def _check_not_privatized(path):
    real = os.path.realpath(path)
    for top in PRIVATIZED:
        if real == top or real.startswith(top + "/"):
            raise ClusterError(
                f"{path} is under {top}, which jobs see privatized: Slurm "
                "could not find its files there from inside a job")


def ensure_hosts_entry(host=None):
    """Make sure /etc/hosts maps the short hostname (slurmd needs it)."""
    host = host or short_hostname()
    try:
        with open("/etc/hosts") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) > 1 and host in fields[1:]:
                    return
    except FileNotFoundError:
        pass
    with open("/etc/hosts", "a") as f:
        f.write(f"127.0.0.1 {host}\n")


class BatchResult(tuple):
    """(jobid, output) with the sbatch details as attributes."""

    def __new__(cls, jobid, output, returncode=0, stderr="", state=None):
        self = super().__new__(cls, (jobid, output))
        self.jobid = jobid
        self.output = output
        self.returncode = returncode
        self.stderr = stderr
        self.state = state
        return self


class LocalCluster:
    """munged + slurmctld + slurmd on 127.0.0.1, configured under workdir."""

    def __init__(self, workdir=DEFAULT_WORKDIR, prolog=None, epilog=None,
                 plugstack_lines=(), extra_conf="", job_container_conf=None,
                 users=TEST_USERS):
        _check_not_privatized(workdir)
        self.workdir = os.path.abspath(workdir)
        self.prolog = prolog
        self.epilog = epilog
        self.plugstack_lines = list(plugstack_lines)
        self.extra_conf = extra_conf
        self.job_container_conf = job_container_conf
        self.users = tuple(users)
        self.host = short_hostname()
        self.node_names = [self.host]
        self.conf = os.path.join(self.workdir, "slurm.conf")
        self.plugstack = os.path.join(self.workdir, "plugstack.conf")
        self.statedir = os.path.join(self.workdir, "state")
        self.spooldir = os.path.join(self.workdir, "spool")
        self.logdir = os.path.join(self.workdir, "log")
        self.rundir = os.path.join(self.workdir, "run")
        self.userwork = os.path.join(os.path.dirname(self.workdir), "work")
        self._procs = {}

    # ---------------------------------------------------------------- paths
    def pidfile(self, name):
        return os.path.join(self.rundir, f"{name}.pid")

    def logfile(self, name):
        return os.path.join(self.logdir, f"{name}.log")

    def user_dir(self, user):
        return os.path.join(self.userwork, user)

    # --------------------------------------------------------- configuration
    def write_config(self):
        for d in (self.workdir, self.logdir, self.rundir):
            os.makedirs(d, mode=0o755, exist_ok=True)
        # Every ancestor must be searchable by the job users: srun reads
        # slurm.conf and plugstack.conf as the user.
        d = self.workdir
        while d != "/":
            st = os.stat(d)
            if not st.st_mode & 0o001:
                os.chmod(d, st.st_mode | 0o055)
            d = os.path.dirname(d)
        # Saved state and the slurmd spool (credential cache, batch scripts)
        # of an earlier run would resurrect old jobs: start from scratch.
        for d in (self.statedir, self.spooldir):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d, mode=0o755)
        ncpus = os.cpu_count() or 1
        lines = [
            "# Generated by tests/localcluster.py; rewritten on every start.",
            "ClusterName=privtmpd-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={PORTS[0]}",
            f"SlurmdPort={PORTS[1]}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            # Otherwise batch jobs start ~3 s after submission.
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmdTimeout=30",
            "MessageTimeout=10",
            "KillWait=2",
            "InactiveLimit=0",
            "MinJobAge=30",
            f"StateSaveLocation={self.statedir}",
            f"SlurmdSpoolDir={self.spooldir}",
            f"SlurmctldPidFile={self.pidfile('slurmctld')}",
            f"SlurmdPidFile={self.pidfile('slurmd')}",
            f"SlurmctldLogFile={self.logfile('slurmctld')}",
            f"SlurmdLogFile={self.logfile('slurmd')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={self.plugstack}",
        ]
        if self.prolog:
            lines.append(f"Prolog={self.prolog}")
        if self.epilog:
            lines.append(f"Epilog={self.epilog}")
        if self.extra_conf:
            lines.append(self.extra_conf.strip())
        lines += [
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={ncpus} "
            "RealMemory=1024 TmpDisk=10000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE "
            "State=UP",
        ]
        self._write(self.conf, "\n".join(lines) + "\n")
        self.write_plugstack()
        jc = os.path.join(self.workdir, "job_container.conf")
        if self.job_container_conf is not None:
            self._write(jc, self.job_container_conf.strip() + "\n")
        elif os.path.exists(jc):
            os.unlink(jc)

    def write_plugstack(self, lines=None):
        """(Re)write plugstack.conf.

        slurmstepd and srun read it for every step, so a test can change
        the plugin arguments between jobs without restarting anything.
        """
        if lines is not None:
            self.plugstack_lines = list(lines)
        text = "".join(line.strip() + "\n" for line in self.plugstack_lines)
        self._write(self.plugstack, text)

    @staticmethod
    def _unlink(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    @staticmethod
    def _write(path, text):
        tmp = path + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def env(self, extra=None):
        """Environment for Slurm clients: no inherited SLURM_* variables."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["PATH"] = env.get("PATH", "") + ":" + SBIN_PATH
        env["SLURM_CONF"] = self.conf
        if extra:
            env.update(extra)
        return env

    # ----------------------------------------------------------------- users
    def ensure_users(self):
        """Create the test users and a private work directory for each."""
        os.makedirs(self.userwork, mode=0o755, exist_ok=True)
        os.chmod(self.userwork, 0o755)
        for user in self.users:
            try:
                pwd.getpwnam(user)
            except KeyError:
                subprocess.run([_which("useradd"), "-m", "-s", "/bin/sh",
                                user], check=True, capture_output=True)
            pw = pwd.getpwnam(user)
            d = self.user_dir(user)
            if os.path.islink(d):
                os.unlink(d)
            os.makedirs(d, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
            os.chmod(d, 0o700)

    # ----------------------------------------------------------------- munge
    @property
    def munge_dir(self):
        return os.path.join(self.rundir, "munge")

    @property
    def munge_socket(self):
        return os.path.join(self.munge_dir, "munge.socket")

    def _munge_works(self):
        try:
            cred = subprocess.run([_which("munge"), "-n", "-S", self.munge_socket], capture_output=True,
                                  timeout=5)
            if cred.returncode:
                return False
            r = subprocess.run([_which("unmunge"), "-S", self.munge_socket], input=cred.stdout,
                               capture_output=True, timeout=5)
            return r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munged(self):
        """A munged of our own: its socket, key, seed, pid and log files
        are under workdir; the machine's munged (if any) is never used."""
        if self._daemon_pid("munged") and self._munge_works():
            return
        self._stop_pidfile_daemon("munged")
        pw = pwd.getpwnam("munge")
        d = self.munge_dir
        os.makedirs(d, mode=0o755, exist_ok=True)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chmod(d, 0o755)          # job users' srun talks to the socket
        key = os.path.join(d, "munge.key")
        if not os.path.exists(key):
            subprocess.run([_which("mungekey"), "--create", "--keyfile", key], check=True, capture_output=True)
        os.chown(key, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o600)
        pidfile = os.path.join(d, "munged.pid")
        self._unlink(pidfile)
        # --force: take over a socket left by a munged that was killed.
        r = subprocess.run([_which("runuser"), "-u", "munge", "--", _which("munged"), "--force",
                            f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={pidfile}",
                            f"--seed-file={os.path.join(d, 'munged.seed')}",
                            f"--log-file={os.path.join(d, 'munged.log')}"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode:
            raise ClusterError(f"munged failed to start: {r.stderr.strip()}")
        deadline = time.monotonic() + 10
        while not self._munge_works():
            if time.monotonic() > deadline:
                raise ClusterError(f"munged started but does not answer on {self.munge_socket}")
            time.sleep(0.05)
        try:
            with open(pidfile) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            raise ClusterError(f"munged wrote no pid file {pidfile}") from None
        with open(self.pidfile("munged"), "w") as f:
            f.write(f"{pid}\n")

    # ------------------------------------------------------------- lifecycle
    def _marker(self, name):
        """What the command line of our daemon `name` must contain."""
        return (self.munge_socket if name == "munged" else self.conf).encode()

    def _stop_pidfile_daemon(self, name, timeout=10):
        pid = self._daemon_pid(name)
        if pid:
            _kill_and_wait([pid], timeout=timeout)

    def _stop_steps(self):
        """Step daemons of this cluster (they hold our slurmd log open) and
        the job processes under them: proctrack/linuxproc finds tasks
        through their parent, so once a step daemon is gone its tasks
        would be orphans nobody tracks."""
        stepds = [p for p in _pids_using(self.workdir) if _proc_name(p) == "slurmstepd"]
        _kill_and_wait(stepds + _descendants(stepds), timeout=2, sig=signal.SIGKILL)

    def kill_leftovers(self):
        """Stop what an interrupted run of this workdir left running: only
        processes shown to be ours (see the module docstring)."""
        self._stop_steps()
        for name in ("slurmd", "slurmctld"):
            self._stop_pidfile_daemon(name)

    def start(self, timeout=30, lock_timeout=600):
        """Start the cluster (after stopping what an interrupted run left).

        Waits up to lock_timeout seconds while another process on this
        machine runs a test cluster, instead of killing it."""
        if self._procs:
            raise ClusterError("cluster already started")
        _acquire_machine_lock(self, lock_timeout)
        ensure_hosts_entry(self.host)
        self.kill_leftovers()
        self.write_config()
        for name in ("slurmctld", "slurmd"):
            self._unlink(self.pidfile(name))
            # Keep the previous run's logs (an interrupted run's are the
            # interesting ones) but start each run with fresh files.
            for path in (self.logfile(name),
                         os.path.join(self.logdir, f"{name}.stderr")):
                if os.path.exists(path):
                    os.replace(path, path + ".1")
        self.remove_old_outputs()
        self._start_munged()
        try:
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c",
                                      "-f", self.conf])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf])
            self.wait_idle(timeout=timeout, jobs=False)
        except BaseException:
            self.stop()
            raise
        return self

    def remove_old_outputs(self):
        """Job ids start again at 1: an output file of an earlier run must
        not pass for the output of a new job that never wrote one."""
        for user in self.users:
            d = self.user_dir(user)
            if os.path.isdir(d) and not os.path.islink(d):
                for name in os.listdir(d):
                    if name.startswith(("slurm-", "array-")) and name.endswith(".out"):
                        self._unlink(os.path.join(d, name))

    def _spawn(self, name, argv):
        err = open(os.path.join(self.logdir, f"{name}.stderr"), "wb")
        try:
            # Own session: a Ctrl-C aimed at pytest must not take the
            # cluster down halfway through a test's cleanup.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err,
                                    env=self.env(), cwd="/",
                                    start_new_session=True)
        finally:
            err.close()
        self._procs[name] = proc
        # Slurm writes the pid file itself, a bit later; write it now so
        # that `down` works even if the daemon dies early.
        with open(self.pidfile(name), "w") as f:
            f.write(f"{proc.pid}\n")

    def stop(self, drain_jobs=True):
        """Cancel jobs (so Epilogs run), then stop the daemons we started."""
        if drain_jobs and self._daemon_pid("slurmctld") and \
                self._daemon_pid("slurmd"):
            try:
                ids = self.squeue()
                if ids:
                    subprocess.run([_which("scancel")] + ids, env=self.env(),
                                   capture_output=True, timeout=10)
                    self.wait_idle(timeout=15)
            except (ClusterError, OSError, subprocess.SubprocessError):
                pass
        self.stop_daemons()

    def stop_daemons(self):
        procs = self._procs
        self._procs = {}
        # slurmd first, so it does not try to re-register.
        for name in ("slurmd", "slurmctld"):
            if name in procs and procs[name].poll() is None and _proc_name(procs[name].pid) == name:
                _kill_and_wait([procs[name].pid], timeout=10)
            self._stop_pidfile_daemon(name)
            if name in procs:
                try:
                    procs[name].wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        # Steps of jobs still running (and their tasks) were ours too.
        self._stop_steps()
        self._stop_pidfile_daemon("munged")
        for name in ("slurmctld", "slurmd", "munged"):
            self._unlink(self.pidfile(name))
        _release_machine_lock(self)

    def _daemon_pid(self, name):
        """PID of our running daemon `name`, from Popen or the pid file, if
        that process is `name` and its command line names our config (or
        munge socket): a pid file outlives its process, and PIDs are reused."""
        proc = self._procs.get(name)
        pid = proc.pid if proc else self._read_pidfile(name)
        if pid and _proc_name(pid) == name and any(self._marker(name) in arg for arg in _cmdline(pid)):
            return pid
        return None

    def _read_pidfile(self, name):
        try:
            with open(self.pidfile(name)) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --------------------------------------------------------------- queries
    def _client(self, argv, timeout=30, check=True):
        r = subprocess.run(argv, env=self.env(), capture_output=True,
                           stdin=subprocess.DEVNULL, text=True,
                           timeout=timeout)
        if check and r.returncode:
            raise ClusterError(f"{' '.join(argv)} failed "
                               f"({r.returncode}): {r.stderr.strip()}\n"
                               + self.logs())
        return r

    def scontrol(self, *args, timeout=30):
        return self._client([_which("scontrol")] + list(args),
                            timeout=timeout).stdout

    def squeue(self):
        """Ids of jobs slurmctld still considers pending/running/completing."""
        out = self._client([_which("squeue"), "-h", "-o", "%i"]).stdout
        return out.split()

    def node_info(self, node=None):
        out = self.scontrol("-o", "show", "node", node or self.node_names[0])
        info = {}
        for field in out.split():
            k, _, v = field.partition("=")
            info[k] = v
        # Reason may contain spaces: take everything after "Reason=".
        if "Reason=" in out:
            info["Reason"] = out.split("Reason=", 1)[1].strip()
        return info

    def node_state(self, node=None):
        """Node state as scontrol prints it, e.g. IDLE, MIXED, IDLE+DRAIN."""
        return self.node_info(node).get("State", "UNKNOWN")

    def assert_not_drained(self, nodes=None):
        bad = {"DRAIN", "DOWN", "FAIL", "NOT_RESPONDING"}
        for node in nodes or self.node_names:
            info = self.node_info(node)
            state = info.get("State", "")
            if bad & set(state.replace("*", "").split("+")) or state.endswith("*"):
                raise AssertionError(f"node {node} is {state} (Reason={info.get('Reason')})\n" + self.logs())

    @staticmethod
    def _idle(state):
        """IDLE, also when drained: only allocations and COMPLETING (an
        Epilog still running) count as busy."""
        flags = state.split("+")
        return flags[0] == "IDLE" and "COMPLETING" not in flags

    def wait_idle(self, timeout=30, jobs=True):
        """Wait until the node is idle (no allocation, not COMPLETING: every
        Epilog has finished) and, if jobs, no job is left in the queue.
        A drained node counts as idle; check assert_not_drained()."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.node_state()
                if self._idle(last) and not (jobs and self.squeue()):
                    return
            except ClusterError as e:
                last = str(e).splitlines()[0]
            if time.monotonic() > deadline:
                raise ClusterError(f"node not idle after {timeout}s "
                                   f"(last state: {last})\n" + self.logs())
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with {proc.returncode}"
                                       "\n" + self.logs())
            time.sleep(0.05)

    def logs(self, lines=30):
        parts = []
        for name in ("slurmctld", "slurmd"):
            parts.append(f"--- {self.logfile(name)} (tail) ---\n"
                         + _tail(self.logfile(name), lines))
            err = os.path.join(self.logdir, f"{name}.stderr")
            if os.path.exists(err) and os.path.getsize(err):
                parts.append(f"--- {err} (tail) ---\n" + _tail(err, 10))
        return "\n".join(parts)

    # ------------------------------------------------------------------ jobs
    def _as_user(self, user, argv):
        return [_which("runuser"), "-u", user, "--"] + list(argv)

    def srun(self, user, args, timeout=60, env=None):
        """runuser -u USER -- srun ARGS, from the user's work directory.

        stdin is /dev/null: srun forwards its stdin to task 0, and a test
        runner's stdin (a terminal, or nothing at all in CI) must not leak
        into jobs or block them.
        """
        argv = self._as_user(user, [_which("srun")] + list(args))
        return subprocess.run(argv, cwd=self.user_dir(user), env=self.env(env),
                              stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def output_path(self, user, jobid):
        return os.path.join(self.user_dir(user), f"slurm-{jobid}.out")

    def sbatch(self, user, script_text, args=(), wait=True, timeout=120,
               env=None):
        """Submit script_text as USER from the user's work directory.

        Returns (jobid, output).  With wait, blocks until the job has ended
        and its Epilog has run, and output is the job's stdout+stderr file;
        otherwise output is None.  The result also carries .returncode (the
        job's exit code, 128+N for signal N, like `sbatch --wait`; None if
        the job was held after a failed Prolog/launch), .stderr (sbatch's)
        and .state (e.g. COMPLETED, FAILED, or PENDING when held).

        `sbatch --wait` itself polls every 2 s or so; polling scontrol is
        ~40 times faster for the short jobs of a test suite.
        """
        argv = [_which("sbatch"), "--parsable",
                "-o", os.path.join(self.user_dir(user), "slurm-%j.out")]
        argv += list(args)
        r = subprocess.run(self._as_user(user, argv), input=script_text,
                           cwd=self.user_dir(user), env=self.env(env),
                           capture_output=True, text=True, timeout=timeout)
        first = r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
        jobid = first.split(";")[0]
        if r.returncode or not jobid.isdigit():
            raise ClusterError(f"sbatch failed ({r.returncode}): "
                               f"{r.stderr.strip()}\n" + self.logs())
        if not wait:
            return BatchResult(jobid, None, None, r.stderr)
        info = self.wait_job(jobid, timeout=timeout)
        return BatchResult(jobid, self.read_output(user, jobid),
                           info["returncode"], r.stderr, info["state"])

    def read_output(self, user, jobid):
        try:
            with open(self.output_path(user, jobid), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def job_info(self, jobid, timeout=60):
        """scontrol's fields for a job, or {} once slurmctld forgot it.

        Only "Invalid job id" means forgotten: any other failure (a
        slurmctld too busy to answer within MessageTimeout on a loaded
        machine) says nothing about the job and is asked again, or wait_job
        would take a running job for a finished one."""
        deadline = time.monotonic() + timeout
        while True:
            r = self._client([_which("scontrol"), "-o", "show", "job",
                              str(jobid)], check=False)
            if not r.returncode:
                return dict(f.partition("=")[::2] for f in r.stdout.split())
            if "Invalid job id" in r.stderr:
                return {}
            if time.monotonic() > deadline:
                raise ClusterError(f"scontrol show job {jobid} failed for {timeout}s "
                                   f"({r.returncode}): {r.stderr.strip()}\n" + self.logs())
            time.sleep(0.2)

    def job_state(self, jobid):
        return self.job_info(jobid).get("JobState")

    TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
                "SPECIAL_EXIT", "REVOKED"}
    # A failed Prolog or launch requeues the job held (and drains the
    # node): it would stay PENDING forever.
    HELD = {"launch_failed_requeued_held", "JobHeldAdmin", "JobHeldUser"}

    def wait_job(self, jobid, timeout=120):
        """Wait until the job is finished, Epilog included (a job stays
        COMPLETING while its Epilog runs), or held after a failed launch.

        Returns {"state", "returncode", "reason"}; state is None and
        returncode None if slurmctld has already forgotten the job
        (MinJobAge)."""
        deadline = time.monotonic() + timeout
        info = {}
        while True:
            info = self.job_info(jobid)
            state = info.get("JobState")
            if state is None:
                return {"state": None, "returncode": None, "reason": None}
            if state in self.TERMINAL or info.get("Reason") in self.HELD:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"job {jobid} still {state} after "
                                   f"{timeout}s\n" + self.logs())
            time.sleep(0.05)
        code, _, sig = info.get("ExitCode", "0:0").partition(":")
        rc = 128 + int(sig) if sig and int(sig) else int(code or 0)
        if state not in self.TERMINAL:
            rc = None  # held: it never ran to an exit code
        return {"state": state, "returncode": rc,
                "reason": info.get("Reason")}


# -------------------------------------------------------------------- script
def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Run a one-node Slurm cluster on localhost.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start (restart) the cluster and return")
    up.add_argument("--workdir", default=DEFAULT_WORKDIR)
    up.add_argument("--prolog")
    up.add_argument("--epilog")
    up.add_argument("--plugstack-line", action="append", default=[],
                    dest="plugstack_lines", metavar="LINE")
    up.add_argument("--extra-conf", default="",
                    help="lines appended to slurm.conf (use \\n to separate)")
    up.add_argument("--job-container-conf")
    down = sub.add_parser("down", help="stop the daemons started by `up`")
    down.add_argument("--workdir", default=DEFAULT_WORKDIR)
    st = sub.add_parser("status", help="print the node state")
    st.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        ap.error("must run as root")
    if args.cmd == "up":
        c = LocalCluster(args.workdir, prolog=args.prolog, epilog=args.epilog,
                         plugstack_lines=args.plugstack_lines,
                         extra_conf=args.extra_conf.replace("\\n", "\n"),
                         job_container_conf=args.job_container_conf)
        c.ensure_users()
        c.start()
        # Leave the daemons running; `down` finds them by pid file.
        c._procs = {}
        print(f"export SLURM_CONF={c.conf}")
        print(f"# node {c.host}: {c.node_state()}; users: "
              + ", ".join(f"{u} (cwd {c.user_dir(u)})" for u in c.users),
              file=sys.stderr)
    elif args.cmd == "down":
        LocalCluster(args.workdir).stop()
    else:
        c = LocalCluster(args.workdir)
        if not (c._daemon_pid("slurmctld") and c._daemon_pid("slurmd")):
            print("down")
            return 1
        print(c.node_state())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClusterError as e:
        print(f"localcluster: {e}", file=sys.stderr)
        sys.exit(1)

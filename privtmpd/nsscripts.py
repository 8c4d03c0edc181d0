"""An administrator's scripts inside a job's mount namespace.

ns_script= runs after the job's namespace is built and pinned and before
the Prolog gets its reply (so before any task enters); ns_epilog= runs at
teardown, before the job's processes are killed and the pin is dropped.

A script runs in a forked child of the daemon's main thread, which is the
daemon's only thread at that moment (setns(CLONE_NEWNS) fails in a
multi-threaded process, and the daemon itself must stay in the host's
namespace).  The child:
- starts a session of its own, so the time limit kills the script and
  everything it started (its process group) with one killpg;
- dies with the daemon (PR_SET_PDEATHSIG): a crashed daemon's next start
  rolls the half-made job back, and a script left running would race that;
- gets stdin from /dev/null and stdout and stderr on one pipe whose lines
  the daemon logs (bounded: MAX_LINES lines of MAX_LINE characters each);
- enters the job's namespace through the pin, chdir("/"), closes every
  other descriptor it inherited (sockets of other clients, the listener,
  pipes of other scripts) and executes the script with an environment made
  here from nothing (environment()): none of the daemon's variables.

The daemon never waits for a script: a handler returns the ScriptRun, the
server keeps the client's connection, watches the pipe, and replies when
poll() reports the script over (exit, or killed at its time limit).
"""

import logging
import os
import signal
import time

from . import forked, kernel, names
from .logfmt import describe, event

log = logging.getLogger("privtmpd")

MAX_LINE = 400          # characters of one output line in the log
MAX_LINES = 100         # lines logged per run; the rest is counted, not logged
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

INIT, EPILOG = "ns_script", "ns_epilog"


CANCEL_WAIT = 0.5       # seconds a cancelled script may take to die before it is reaped later
_CANCELLED: set = set()  # pids of killed scripts not reaped yet (stuck in uninterruptible sleep)


def _reap_cancelled():
    for pid in list(_CANCELLED):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                continue
        except ChildProcessError:
            pass
        _CANCELLED.discard(pid)


def environment(cfg, kind, state, exit_code=None):
    """The script's whole environment: the job's variables as the Prolog
    sent them (SLURM_*), and what privtmpd made for the job (PRIVTMPD_*)."""
    env = {
        "PATH": PATH,
        "LANG": "C",
        "SLURM_SCRIPT_CONTEXT": f"privtmpd_{kind}",
        "SLURM_JOB_ID": str(state["job"]),
        "SLURM_JOB_UID": str(state["uid"]),
        "SLURM_JOB_GID": str(state["gid"]),
        "SLURM_JOB_RESTART_COUNT": str(state["restart"]),
        "PRIVTMPD_MOUNTS": ":".join(state.get("mounts", [])),
        "PRIVTMPD_SCRIPT_TIMEOUT": f"{cfg.ns_script_timeout:g}",
    }
    # The job directory's host path, only where it means the same inside
    # the namespace: under a private mount point (base=/tmp/slurm, the
    # default) that path names the user's own files there, and a script
    # writing to it would follow the user's links as root.
    mounts = [m for m in state.get("mounts", []) if isinstance(m, str)]
    if isinstance(state.get("dir"), str) and not any(
            state["dir"] == m or state["dir"].startswith(m.rstrip("/") + "/") for m in mounts):
        env["PRIVTMPD_JOB_DIR"] = state["dir"]
    if state.get("user"):
        env["SLURM_JOB_USER"] = state["user"]
    if state.get("limit"):
        env["PRIVTMPD_LIMIT_BYTES"] = str(state["limit"])
    if exit_code is not None:
        env["SLURM_JOB_EXIT_CODE"] = str(exit_code)
    return env


def _printable(raw):
    text = raw.decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= MAX_LINE else text[:MAX_LINE] + "..."


class ScriptRun:
    """One run of a script for one job: the child, its output pipe, its
    time limit, and what the waiting request gets when it is over
    (on_done(run) -> (reply, user), called once)."""

    def __init__(self, cfg, kind, job, user, env, on_done):
        self.cfg, self.kind, self.job, self.user = cfg, kind, job, user
        self.path = getattr(cfg, kind)
        self.env = env
        self.on_done = on_done
        self.started = time.monotonic()
        self.deadline = self.started + cfg.ns_script_timeout
        self.status = None          # wait status once reaped
        self.timed_out = False
        self.cancelled = None       # why the run was cut short by another request
        self.done = False
        self.outcome = None         # (reply, user) from on_done
        self.error = None           # or what on_done raised
        self.unwatch = lambda fd: None   # the server's: stop watching fd before it is closed
        self._buf = bytearray()
        self._logged = 0
        self._dropped = 0
        self.pid, self.fd = self._spawn(names.pin_path(cfg.rundir, job))

    # --- the child ---------------------------------------------------------

    def _spawn(self, pin):
        pid, r = forked.spawn(lambda w: self._child(pin, w))
        os.set_blocking(r, False)
        return pid, r

    def _child(self, pin, w):
        """In the forked child (forked.spawn): a session of its own, so that
        a time limit or a cancel kills the script's whole process group."""
        try:
            os.setsid()
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(w, 1)
            os.dup2(w, 2)
            fd = os.open(pin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            kernel.setns(fd, kernel.CLONE_NEWNS, pin)
            os.chdir("/")
            os.umask(0o022)
            # Everything above fd 2: the daemon's listener, other clients'
            # sockets, the pin, other scripts' pipes.
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            os.execve(self.path, [self.path], self.env)
        except BaseException as e:      # noqa: BLE001 - the child must only ever exit
            try:
                os.write(2, f"privtmpd: cannot run {self.path}: {describe(e)}\n".encode())
            except OSError:
                pass
            os._exit(127)

    # --- the server's side -------------------------------------------------

    def read_output(self, final=False):
        """Read what the script wrote (one chunk; all of it when final) and
        log whole lines."""
        while self.fd >= 0:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                break
            self._take(chunk)
            if not final:
                break
        if final and self._buf:
            self._line(bytes(self._buf))
            self._buf.clear()

    def _take(self, chunk):
        if self._logged >= MAX_LINES:
            self._dropped += chunk.count(b"\n")
            return
        self._buf += chunk
        while self._buf:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) <= MAX_LINE * 4:
                    return
                nl = MAX_LINE * 4       # a line that never ends: cut it
                line, rest = self._buf[:nl], self._buf[nl:]
            else:
                line, rest = self._buf[:nl], self._buf[nl + 1:]
            self._buf = bytearray(rest)
            self._line(bytes(line))
            if self._logged >= MAX_LINES:
                self._dropped += self._buf.count(b"\n")
                self._buf.clear()
                return

    def _line(self, raw):
        if self._logged >= MAX_LINES:
            self._dropped += 1
            return
        self._logged += 1
        log.info(event(self.kind, "output", self.job, self.user, line=_printable(raw)))

    def close(self):
        if self.fd >= 0:
            self.unwatch(self.fd)
            os.close(self.fd)
            self.fd = -1

    def _kill_group(self):
        """SIGKILL the script's process group, and the script itself (it may
        have left its group).  Only while the script is not reaped: until
        then its PID, which is also its group's id, cannot be reused."""
        for kill in (os.killpg, os.kill):
            try:
                kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def poll(self):
        """True once the run is over and on_done has given its outcome.
        Reaps only its own child (never waitpid(-1): removal workers and
        other scripts are children of the daemon too)."""
        if self.done:
            return True
        _reap_cancelled()
        if self.status is None:
            try:
                res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                res = None
                self.status = -1
            if self.status is None:
                if res is None:
                    if time.monotonic() >= self.deadline and not self.timed_out:
                        self.timed_out = True
                        self._kill_group()
                    return False
                # Exited, still a zombie: what it left running in its group
                # is killed while the group id is still its own.
                self._kill_group()
                _, self.status = os.waitpid(self.pid, 0)
        self.read_output(final=True)
        self._finish()
        return True

    def cancel(self, reason):
        """Another request needs the job now (its Epilog while ns_script
        runs, a new create, privtmpctl cleanup, the daemon stopping): kill
        the script and finish the run at once."""
        if self.done:
            return
        self.cancelled = reason
        if self.status is None:
            self._kill_group()
            # Not a blocking waitpid(): a script in uninterruptible sleep
            # (a hung NFS mount) dies only when its syscall ends, and the
            # daemon's one thread must not wait for that.  Unreaped, it is
            # left to _reap_cancelled() at the next run's polls.
            deadline = time.monotonic() + CANCEL_WAIT
            while self.status is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    self.status = -1
                    break
                if pid:
                    self.status = status
                elif time.monotonic() >= deadline:
                    _CANCELLED.add(self.pid)
                    self.status = -1
                else:
                    time.sleep(0.01)
        self.read_output(final=True)
        self._finish()

    @property
    def succeeded(self):
        return self.status == 0 and not self.timed_out and not self.cancelled

    def describe(self):
        if self.cancelled:
            return f"cancelled: {self.cancelled}"
        if self.timed_out:
            return f"killed at its time limit of {self.cfg.ns_script_timeout:g} s"
        if self.status is None or self.status < 0:
            return "lost"
        if os.WIFSIGNALED(self.status):
            return f"killed by {signal.Signals(os.WTERMSIG(self.status)).name}"
        code = os.waitstatus_to_exitcode(self.status)
        return "exit 0" if code == 0 else f"failed with exit status {code}"

    def _finish(self):
        self.done = True
        self.close()
        ms = (time.monotonic() - self.started) * 1000
        if self._dropped:
            log.warning(event(self.kind, "output-truncated", self.job, self.user, dropped_lines=self._dropped,
                              note=f"only the first {MAX_LINES} lines are logged"))
        result = "ok" if self.succeeded else "cancelled" if self.cancelled else \
            "timeout" if self.timed_out else "failed"
        log.log(logging.INFO if result == "ok" else logging.WARNING,
                event(self.kind, result, self.job, self.user, ms, script=self.path, status=self.describe()))
        try:
            self.outcome = self.on_done(self)
        except Exception as e:      # noqa: BLE001 - the waiting request gets it as its error
            self.error = e

    def result(self):
        """(reply, user) for the waiting request; raises what on_done raised."""
        if self.error is not None:
            raise self.error
        return self.outcome

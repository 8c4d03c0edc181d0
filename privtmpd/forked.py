"""Work in forked children, each with one pipe back to its parent.

- run(): a short piece of work the caller waits for, with a time limit:
  a setns() into a user's namespace (setns needs a single-threaded caller,
  and the daemon must stay in its own namespace), or a removal with only
  the job user's rights.  The parent waits at most `seconds` for the pipe
  to reach EOF, then kills the child (SIGKILL) and reaps it either way, so
  a child the user stopped or fed forever costs at most that long.
- spawn(): a child the daemon's event loop watches and reaps by its PID
  (removal workers, namespace scripts), started the same way for all.
- become_user(): in a child, a job user's rights and nothing more."""

import os
import select
import signal
import time
from typing import Callable, Iterable, Optional, Tuple

from . import kernel


def run(body: Callable[[int], None], seconds: float, partial: bool = False) -> Optional[bytes]:
    """Fork; the child runs body(w) with w the write end of the pipe and
    exits (0 if body returned, 1 if it raised: nothing of the parent's
    Python state, such as finally blocks or atexit, runs in the child).
    Returns what the child wrote, or None if it did not finish in time
    (with partial: what it wrote until then, for a body that reports each
    piece of its work as it goes)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            body(w)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    data, deadline, in_time = b"", time.monotonic() + seconds, True
    try:
        poller = select.poll()
        poller.register(r, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                in_time = False
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)    # not reaped yet: the PID is still its own
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    return data if in_time or partial else None


PR_SET_DUMPABLE = 4


def become_user(uid: int, gid: int, keep: Iterable[int]) -> None:
    """In a forked child that is to act with a job user's rights only: the
    fds in keep stay open (0-2 go to /dev/null, not the daemon's log), every
    other one is closed (the daemon's sockets and the directories of other
    users it works on are not for a process the user may signal or
    ptrace), then uid and gid with no supplementary groups (never more than
    the user), not dumpable, and killed with its parent (set after the uid
    change, which clears the parent-death signal)."""
    null = os.open("/dev/null", os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.close(null)
    low = 3
    for fd in sorted(set(keep)):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    kernel.prctl(PR_SET_DUMPABLE, 0)
    kernel.set_pdeathsig(signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)         # the parent died before prctl


def spawn(child: Callable[[int], None]) -> Tuple[int, int]:
    """Fork a child of the daemon's event loop; returns (pid, the read end
    of its pipe).  In the child, before child(w) runs with the write end:
    it dies with the daemon (a worker left behind would race the next
    daemon's), the signals the daemon handles get their default action
    back (and SIGPIPE, which Python ignores and an exec would keep
    ignoring), and the daemon's wakeup fd is let go.  The child exits 127
    if child() returns or raises without exiting itself: nothing of the
    daemon's Python state (finally blocks, atexit) runs in it."""
    r, w = os.pipe2(os.O_CLOEXEC)
    daemon_pid = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        try:
            os.close(r)
            kernel.set_pdeathsig(signal.SIGKILL)
            if os.getppid() != daemon_pid:      # the daemon died before prctl
                os._exit(127)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            child(w)
        finally:
            os._exit(127)
    os.close(w)
    return pid, r

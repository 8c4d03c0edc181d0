"""One way to run work in a forked child with a time limit.

Used where the work must not run in the daemon itself: a setns() into a
user's namespace (setns needs a single-threaded caller, and the daemon must
stay in its own namespace), or a removal with only the job user's rights.
The child's one channel back is a pipe; the parent waits at most `seconds`
for it to reach EOF, then kills the child (SIGKILL) and reaps it either way,
so a child the user stopped or fed forever costs at most that long."""

import os
import select
import signal
import time
from typing import Callable, Optional


def run(body: Callable[[int], None], seconds: float) -> Optional[bytes]:
    """Fork; the child runs body(w) with w the write end of the pipe and
    exits (0 if body returned, 1 if it raised: nothing of the parent's
    Python state, such as finally blocks or atexit, runs in the child).
    Returns what the child wrote, or None if it did not finish in time."""
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
    return data if in_time else None

"""Log lines an admin can grep, and errors an admin can act on.

Every event is one line that starts with the same five fields, in the same
order, so `grep 'job=42 '` finds everything about a job and a log shipper's
key=value parser needs no per-event rules:

    job=42 user=alice op=create result=ok ms=7.2 dir=/tmp/slurm.42.0

A field that does not apply is "-"; a value with a space, a quote or an
equals sign is double-quoted.

describe() turns an exception into "syscall(path): what went wrong (hint)":
KernelError carries its syscall; for the os module's errors, which do not,
the call is read from the line of code that raised it.
"""

import errno
import logging
import logging.handlers
import os
import re
import sys
from typing import Optional

_PLAIN = re.compile(r"[^\s\"=\\]+\Z")


def value(v):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        v = f"{v:.1f}"
    s = str(v)
    if _PLAIN.match(s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def event(op, result, job=None, user=None, ms=None, **extra):
    """The text of one event line (without level or timestamp)."""
    head = f"job={value(job)} user={value(user)} op={value(op)} result={value(result)} ms={value(ms)}"
    tail = " ".join(f"{k}={value(v)}" for k, v in extra.items())
    return f"{head} {tail}" if tail else head


HINTS = {
    errno.ENOSPC: "the filesystem is full: privtmpctl list shows which jobs use it, "
                  "privtmpctl cleanup --orphans removes leftovers",
    errno.EDQUOT: "root's disk quota is exhausted on this filesystem",
    errno.EROFS: "the filesystem is mounted read-only",
    errno.EACCES: "permission denied: privtmpd must run as root, outside any sandbox",
    errno.EPERM: "operation not permitted: privtmpd needs CAP_SYS_ADMIN in the host mount namespace "
                 "(no container, no systemd sandboxing options)",
    errno.ENOENT: "a directory on the path is missing: privtmpctl doctor checks base= and mount=",
    errno.ELOOP: "a symbolic link where a real directory is expected: part of the path was replaced; "
                 "privtmpctl doctor",
    errno.ENOTDIR: "a file where a directory is expected: part of the path was replaced",
    errno.EMFILE: "too many open files: raise LimitNOFILE= in the unit",
    errno.ENFILE: "the system-wide open file limit is reached",
    errno.EXDEV: "the path crosses a mount point, which privtmpd never does",
    errno.EBUSY: "still in use (a mount point or a process inside): privtmpctl show JOB lists them",
    errno.ENOMEM: "out of memory (or too many namespaces: user.max_mnt_namespaces)",
    errno.ENOSYS: "the kernel lacks this system call (privtmpd needs Linux >= 5.6)",
    errno.EEXIST: "something else already sits at that path",
}
DEFAULT_HINT = "privtmpctl doctor checks the node's setup"

# os module function -> the system call behind it, for messages.
_SYSCALLS = {
    "open": "openat", "mkdir": "mkdirat", "rmdir": "unlinkat", "unlink": "unlinkat", "remove": "unlinkat",
    "rename": "renameat", "replace": "renameat", "stat": "fstatat", "lstat": "lstat", "scandir": "openat",
    "listdir": "openat", "chown": "fchownat", "fchown": "fchown", "chmod": "fchmodat", "fchmod": "fchmod",
    "read": "read", "write": "write", "fork": "fork", "pipe2": "pipe2", "kill": "kill",
    "statvfs": "statvfs", "fstat": "fstat", "makedirs": "mkdirat", "link": "linkat", "symlink": "symlinkat",
}


def _syscall_from_traceback(exc):
    """The os function on the line that raised exc (the deepest frame), or,
    when that line re-raises, on the line that raised the original error."""
    import linecache
    for _ in range(4):
        tb, line = exc.__traceback__, ""
        while tb is not None:
            # Frozen modules (os) have no source: keep their caller's line.
            code = tb.tb_frame.f_code
            line = linecache.getline(code.co_filename, tb.tb_lineno, tb.tb_frame.f_globals).strip() or line
            tb = tb.tb_next
        m = re.search(r"\bos\.(\w+)\(", line)
        if m:
            return _SYSCALLS.get(m.group(1), m.group(1))
        # A bare call (inside the os module, or an imported name).
        m = re.search(r"(?:^|[^.\w])(" + "|".join(_SYSCALLS) + r"|bind|connect|listen|accept|sendall|sendto|recv)\(",
                      line)
        if m:
            return _SYSCALLS.get(m.group(1), m.group(1))
        exc = exc.__cause__ or exc.__context__
        if exc is None:
            break
    return ""


def describe(exc, hint=None):
    """One line for the log and the client: syscall, path, error, hint
    (hint overrides the usual one for the error number)."""
    from .kernel import KernelError
    if isinstance(exc, KernelError):
        text = f"{exc.syscall}({exc.path}): {os.strerror(exc.errno)}"
        hint = hint or exc.hint or HINTS.get(exc.errno, DEFAULT_HINT)
        return f"{text} ({hint})" if hint else text
    if isinstance(exc, OSError) and exc.errno:
        syscall = _syscall_from_traceback(exc) or "system call"
        path = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            path = f"{path}, {exc.filename2}"
        reason = exc.strerror or os.strerror(exc.errno)
        if path:
            # "open /x: No such file" from a wrapper that already named the path
            reason = re.sub(r"^\w+ " + re.escape(str(path)) + r": ", "", reason)
        std = os.strerror(exc.errno)
        if reason != std and std not in reason:
            reason = f"{reason}: {std}"
        text = f"{syscall}({os.fsdecode(path) if isinstance(path, bytes) else path}): {reason}"
        hint = hint or HINTS.get(exc.errno, DEFAULT_HINT)
        return f"{text} ({hint})" if hint else text
    return str(exc) or type(exc).__name__


# --- where the daemon's lines go ------------------------------------------

def setup_logging(foreground, debug):
    """Where the daemon's lines go: syslog when detached, else stderr;
    under systemd stderr is the journal, which reads a "<N>" prefix as the
    line's priority."""
    handler: Optional[logging.Handler] = None
    if not foreground and os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler("/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter("privtmpd[%(process)d]: %(message)s"))
        except OSError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        if _stderr_is_journal():
            # The journal adds time and unit, and reads a "<N>" prefix as the
            # line's priority: journalctl -u privtmpd -p warning works.
            handler.setFormatter(_JournalFormatter("%(message)s"))
        else:
            handler.setFormatter(logging.Formatter("%(asctime)s privtmpd[%(process)d]: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _stderr_is_journal():
    """systemd sets JOURNAL_STREAM=dev:ino when stderr goes to the journal."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _JournalFormatter(logging.Formatter):
    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record):
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"

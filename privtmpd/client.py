"""Client of the privtmpd socket, and the Prolog/Epilog logic.

Standard library only, and as little of it as possible: the Prolog and
Epilog start a fresh interpreter for every job (``python3 -IS``), so every
import here costs every job on the cluster.  On a 2-core VM the interpreter
alone takes 6 ms; ``socket`` adds 6 ms (enum, selectors), ``json`` 6.5 ms
(re, enum), both together 9 ms, and even ``os`` 1 ms, since without site
nothing has imported it yet (``python3 -IS -X importtime``; see
docs/performance.md).  So the hooks use the C modules ``_socket`` and
``posix`` (already loaded) and write their flat request by hand; ``json``
is imported only to read a reply that is not a plain success, and by
request() for privtmpctl, where start-up time does not matter.
"""

import _socket
import posix
import sys
import time

DEFAULT_SOCKET = "/run/privtmpd/privtmpd.sock"
CONNECT_RETRY = 15.0      # seconds: rides over a daemon restart (upgrade)
REPLY_TIMEOUT = 300.0     # a create waits behind other jobs' requests

# Every reply starts with its verdict (protocol.ok): a success needs no parsing.
_OK_PREFIX = b'{"ok":true'


class ClientError(Exception):
    pass


_SHORT_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json_str(text):
    """text as a JSON string literal in ASCII (as json.dumps writes it with
    ensure_ascii), without importing json."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    out = ['"']
    for ch in text:
        c = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0x20 <= c < 0x7F:
            out.append(ch)
        elif c > 0xFFFF:
            c -= 0x10000
            out.append("\\u%04x\\u%04x" % (0xD800 | (c >> 10), 0xDC00 | (c & 0x3FF)))
        else:
            out.append("\\u%04x" % c)
    out.append('"')
    return "".join(out)


def encode_request(msg):
    """The request line (bytes) for a dict.  Flat objects of strings,
    booleans, integers and None - every request the hooks send - are
    written here; anything else goes through json."""
    parts = []
    for key, value in msg.items():
        if isinstance(value, str):
            text = _json_str(value)
        elif value is True or value is False or value is None:
            text = {True: "true", False: "false", None: "null"}[value]
        elif type(value) is int:
            text = str(value)
        else:
            text = None
        if text is None or not isinstance(key, str):
            import json
            return (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        parts.append(f"{_json_str(key)}:{text}")
    return ("{" + ",".join(parts) + "}\n").encode("ascii")


def _exchange(data, path, timeout, retry):
    """Send one request line, return the raw reply.  Raises ClientError."""
    deadline = time.monotonic() + retry
    while True:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout)
            s.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as e:
            # BlockingIOError (EAGAIN): the listen backlog is full (hundreds
            # of Prologs at once); like a daemon restart, worth a retry.
            s.close()
            if time.monotonic() >= deadline:
                raise ClientError(f"cannot connect to {path}: {e.strerror}: is privtmpd running?") from None
            time.sleep(0.1)
        except OSError as e:
            s.close()
            raise ClientError(f"cannot connect to {path}: {e.strerror}") from None
    try:
        s.sendall(data)
        s.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except _socket.timeout:
        raise ClientError(f"no reply from privtmpd within {timeout:.0f} s") from None
    except OSError as e:
        raise ClientError(f"talking to privtmpd: {e.strerror}") from None
    finally:
        s.close()
    raw = b"".join(chunks)
    if not raw.endswith(b"\n"):
        raise ClientError("privtmpd closed the connection without a complete reply "
                          "(daemon stopped or crashed? see its log)")
    return raw


def _parse_reply(raw):
    import json
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ClientError("privtmpd sent a reply that is not JSON") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ClientError("privtmpd sent a malformed reply")
    return reply


def request(msg, path=DEFAULT_SOCKET, timeout=REPLY_TIMEOUT, retry=CONNECT_RETRY):
    """Send one request dict, return the reply dict.  Raises ClientError."""
    return _parse_reply(_exchange(encode_request(msg), path, timeout, retry))


def _report(tag, line):
    sys.stderr.write(f"{tag}: {line}\n")
    try:
        import syslog
        syslog.openlog(tag, 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR, line)
    except OSError:
        pass


SCONTROL_PATHS = ("/usr/bin/scontrol", "/usr/local/bin/scontrol", "/opt/slurm/bin/scontrol")
# Run detached by a failing hook: wait (30 s at most) until slurmctld has
# drained the node with its generic reason ($3), then replace it with the
# hook's own ($4).  Setting it before would not do: the drain comes after
# the hook's exit and overwrites any reason set until then.
_REASON_SCRIPT = (
    'i=0; while [ $i -lt 60 ]; do '
    'case "$("$1" -o show node "$2" 2>/dev/null)" in *"Reason=$3"*) exec "$1" update nodename="$2" reason="$4";; esac; '
    'sleep 0.5; i=$((i+1)); done')


def _name_the_drain(kind, env, text):
    """A failed Prolog or Epilog drains the node with the reason "Prolog
    error" or "Epilog error", and the hook's message is only in slurmd's
    log.  A detached helper (see _REASON_SCRIPT) puts it where the admin
    looks: sinfo -R.  Best effort, and only on this failure path: a
    successful hook never forks."""
    node, conf = env.get("SLURMD_NODENAME", ""), env.get("SLURM_CONF", "")
    scontrol = next((p for p in SCONTROL_PATHS if posix.access(p, posix.X_OK)), None)
    if not (node and conf.startswith("/") and scontrol):
        return
    reason = "".join(c if c.isprintable() else " " for c in f"privtmpd: {text}")[:200]
    generic = "Prolog error" if kind == "prolog" else "Epilog error"
    try:
        pid = posix.fork()
    except OSError:
        return
    if pid:
        try:
            posix.waitpid(pid, 0)
        except OSError:
            pass
        return
    try:
        # Detached: a session of its own, and the hook's parent (slurmd) is
        # not kept waiting: the middle process exits at once.
        posix.setsid()
        if posix.fork():
            posix._exit(0)
        null = posix.open("/dev/null", posix.O_RDWR)
        for fd in (0, 1, 2):
            posix.dup2(null, fd)
        posix.execve("/bin/sh", ["sh", "-c", _REASON_SCRIPT, "sh", scontrol, node, generic, reason],
                     {"PATH": "/usr/bin:/bin", "SLURM_CONF": conf})
    finally:
        posix._exit(1)


def _hook_request(kind, env):
    job = env.get("SLURM_JOB_ID", "")
    if kind == "prolog":
        msg = {"op": "create", "job": job, "restart": env.get("SLURM_JOB_RESTART_COUNT", "0"),
               "uid": env.get("SLURM_JOB_UID", ""), "gid": env.get("SLURM_JOB_GID", "")}
        if "SLURM_JOB_USER" in env:
            msg["user"] = env["SLURM_JOB_USER"][:64]
        conf = env.get("SLURM_CONF", "")
        if conf.startswith("/") and len(conf) <= 1024 and conf.isprintable():
            msg["slurm_conf"] = conf      # for limit_from=tmp: where slurmctld is
        return msg
    msg = {"op": "destroy", "job": job}
    if "SLURM_JOB_RESTART_COUNT" in env:
        msg["restart"] = env["SLURM_JOB_RESTART_COUNT"]
    # For keep_failed=: the batch script's status, else the worst step's.
    # Only a plain number is passed on: a strange value must not fail the Epilog.
    for var in ("SLURM_JOB_EXIT_CODE", "SLURM_JOB_DERIVED_EC"):
        code = env.get(var, "")
        if code.isascii() and code.isdigit() and len(code) <= 9 and code.lstrip("0"):
            msg["exit_code"] = code.lstrip("0")
            break
    return msg


def _environ():
    """os.environ as a plain dict, without importing os."""
    return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in posix.environ.items()}


def run_hook(kind, argv=None, env=None):
    """Prolog (kind="prolog") or Epilog ("epilog").  Exit status: 0 when the
    job's namespace is ready / gone, 1 with one line on stderr and syslog
    otherwise (Slurm then drains the node, so only real failures fail)."""
    argv = sys.argv[1:] if argv is None else argv
    env = _environ() if env is None else env
    tag = f"privtmpd-{kind}"
    path = DEFAULT_SOCKET
    if len(argv) == 2 and argv[0] == "--socket":
        path = argv[1]
    elif argv:
        _report(tag, f"usage: {kind} [--socket PATH] (Slurm runs it with no arguments)")
        return 2
    if "SLURM_JOB_ID" not in env:
        _report(tag, "SLURM_JOB_ID is not set: run me as Slurm's Prolog/Epilog")
        return 1
    msg = _hook_request(kind, env)
    try:
        raw = _exchange(encode_request(msg), path, REPLY_TIMEOUT, CONNECT_RETRY)
        if raw.startswith(_OK_PREFIX) and raw[len(_OK_PREFIX):len(_OK_PREFIX) + 1] in (b",", b"}"):
            return 0
        reply = _parse_reply(raw)
    except ClientError as e:
        error = str(e)
    else:
        if reply.get("ok"):
            return 0
        error = reply.get("error", "unknown error")
    _report(tag, f"job={msg['job']}: {error}")
    _name_the_drain(kind, env, f"job {msg['job']}: {error}")
    return 1


def exit_hook(code):
    """End a hook with code.  On success, posix._exit after flushing:
    interpreter finalization (freeing every module and object) costs each
    hook ~1 ms and does nothing a hook needs; nothing is buffered but the
    standard streams, and the socket is closed by the kernel.  A failure
    exits normally, its message already written."""
    if code == 0:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        posix._exit(0)
    sys.exit(code)

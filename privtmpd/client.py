"""Client of the privtmpd socket, and the Prolog/Epilog logic.

Standard library only, and few modules of it: the Prolog and Epilog start a
fresh interpreter for every job (``python3 -IS``), so every import here
costs every job on the cluster.
"""

import json
import os
import socket
import sys
import time

DEFAULT_SOCKET = "/run/privtmpd/privtmpd.sock"
CONNECT_RETRY = 15.0      # seconds: rides over a daemon restart (upgrade)
REPLY_TIMEOUT = 300.0     # a create waits behind other jobs' requests


class ClientError(Exception):
    pass


def request(msg, path=DEFAULT_SOCKET, timeout=REPLY_TIMEOUT, retry=CONNECT_RETRY):
    """Send one request dict, return the reply dict.  Raises ClientError."""
    data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
    deadline = time.monotonic() + retry
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout)
            s.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            if time.monotonic() >= deadline:
                raise ClientError(f"cannot connect to {path}: {e.strerror}: is privtmpd running?") from None
            time.sleep(0.1)
        except OSError as e:
            s.close()
            raise ClientError(f"cannot connect to {path}: {e.strerror}") from None
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except socket.timeout:
        raise ClientError(f"no reply from privtmpd within {timeout:.0f} s") from None
    except OSError as e:
        raise ClientError(f"talking to privtmpd: {e.strerror}") from None
    finally:
        s.close()
    raw = b"".join(chunks)
    if not raw.endswith(b"\n"):
        raise ClientError("privtmpd closed the connection without a complete reply "
                          "(daemon stopped or crashed? see its log)")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ClientError("privtmpd sent a reply that is not JSON") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ClientError("privtmpd sent a malformed reply")
    return reply


def _report(tag, line):
    sys.stderr.write(f"{tag}: {line}\n")
    try:
        import syslog
        syslog.openlog(tag, 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR, line)
    except OSError:
        pass


def _hook_request(kind, env):
    job = env.get("SLURM_JOB_ID", "")
    if kind == "prolog":
        msg = {"op": "create", "job": job, "restart": env.get("SLURM_JOB_RESTART_COUNT", "0"),
               "uid": env.get("SLURM_JOB_UID", ""), "gid": env.get("SLURM_JOB_GID", "")}
        if "SLURM_JOB_USER" in env:
            msg["user"] = env["SLURM_JOB_USER"][:64]
        return msg
    msg = {"op": "destroy", "job": job}
    if "SLURM_JOB_RESTART_COUNT" in env:
        msg["restart"] = env["SLURM_JOB_RESTART_COUNT"]
    return msg


def run_hook(kind, argv=None, env=None):
    """Prolog (kind="prolog") or Epilog ("epilog").  Exit status: 0 when the
    job's namespace is ready / gone, 1 with one line on stderr and syslog
    otherwise (Slurm then drains the node, so only real failures fail)."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
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
        reply = request(msg, path)
    except ClientError as e:
        _report(tag, f"job={msg['job']}: {e}")
        return 1
    if not reply.get("ok"):
        _report(tag, f"job={msg['job']}: {reply.get('error', 'unknown error')}")
        return 1
    return 0

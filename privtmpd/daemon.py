"""privtmpd: the per-node root daemon's server.

One process, one request at a time.  The main thread never leaves the
host's mount namespace: each new job namespace is built by a short-lived
thread of its own (namespace.build_namespace), which the main thread waits
for; no other thread ever runs, so forking removal workers stays safe.
Requests are read by a selector loop with a deadline per connection, so a
slow or silent client cannot hold the others up; each complete request is
then handled to the end before the next one, which serialises all work on
a job (duplicate Prologs give one namespace, an Epilog never races its
Prolog).  Between requests the loop gives bounded turns to removals
(removal.py) and to measuring kept directories (kept.py): nothing that
grows with user data runs while a request waits.

A handler may also return a ScriptRun (nsscripts.py) instead of its
reply: an administrator's script runs in the job's namespace and the reply
waits for it.  The server then keeps the client's connection, watches the
script's output pipe in the same selector, and finishes the request (log
line, reply, metrics) when the run is over; other requests are served
meanwhile.  Several connections may wait for one run (a duplicate Prolog).
Each run reaps its own child by PID, as the removal queue does its
workers: nobody calls waitpid(-1), so neither steals the other's children.

This module is the server: socket, loop, signals, readiness, one handler
per protocol operation.  What a request does to a job is jobs.py.
"""

import argparse
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from typing import Any, Dict

from . import __version__, config, jobs, kept, mountopts, namespace, nsscripts, protocol, removal, runstate
from .logfmt import describe, event, setup_logging
from .metrics import Metrics

log = logging.getLogger("privtmpd")

READ_DEADLINE = 5.0          # seconds a client has to send its request
MAX_CLIENTS = 256            # open connections at once; more wait in the backlog


def _peer_uid(conn):
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def sd_notify(message):
    """systemd's notify protocol (Type=notify), without libsystemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), path)
    except OSError as e:
        log.warning(event("sd-notify", "error", error=describe(e)))


class _Conn:
    __slots__ = ("sock", "buf", "deadline")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.deadline = time.monotonic() + READ_DEADLINE


class Daemon:
    def __init__(self, cfg):
        self.cfg = cfg
        # Made in serve_forever(): detaching (python-daemon) closes every
        # fd opened before it.
        self.sel: selectors.BaseSelector
        # Bound in startup(), after everything that can fail for a reason
        # of configuration or system.
        self.listener: socket.socket
        self.conns = {}
        self.stopping = False
        self.accepting = False     # the listener is in the selector
        self.started = time.time()
        self.metrics = Metrics(cfg, log)
        self.proc = None           # psutil handle, made after detaching (the pid changes)
        self._sig_r = -1           # the signal pipe, made in serve_forever()
        self.waiting: Dict[nsscripts.ScriptRun, list] = {}   # requests whose reply waits for a script
        self.removals = removal.RemovalQueue(cfg, self.metrics, self._request_waiting, self._close_in_worker)
        self.kept = kept.KeptDirs(cfg, self.removals, self._request_waiting)
        self.jobs = jobs.Jobs(cfg, self.removals, self.kept, self.metrics)
        # One handler per operation of the protocol, each returning (reply,
        # the job's user for the request's log line).
        self.handlers = {
            "create": self.jobs.create,
            "destroy": self.jobs.destroy,
            "status": self._status,
            "list": self.jobs.listing,
            "show": lambda f: self.jobs.listing(f, show=True),
            "cleanup": self.jobs.cleanup,
        }
        assert set(self.handlers) == set(protocol.OPS), "a protocol operation without a handler"

    # --- start-up ------------------------------------------------------

    def startup(self):
        """Everything that can fail for a configuration or system reason,
        done before the daemon detaches or reports ready."""
        config.check_filesystem(self.cfg)
        runstate.setup_rundir(self.cfg)
        self.jobs.reconcile()
        self.removals.resume_sweeps()
        self.listener = self._bind()

    def _bind(self):
        path = self.cfg.socket_path
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
            raise RuntimeError(f"another privtmpd is already listening on {path}")
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        finally:
            probe.close()
        try:
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise RuntimeError(f"{path} exists and is not a socket; remove it")
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)      # socket 0600 root: the first of two checks
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(MAX_CLIENTS * 4)   # hundreds of Prologs may connect at once
        s.setblocking(False)
        return s

    def _request_waiting(self):
        # Nothing can wait before the loop runs (start-up's reconcile).
        sel = getattr(self, "sel", None)
        return bool(sel and sel.select(0))

    def _close_in_worker(self):
        """In a forked removal worker: the daemon's sockets are not its own."""
        self.listener.close()
        for c in self.conns.values():
            c.sock.close()
        for run, waiters in self.waiting.items():
            if run.fd >= 0:
                os.close(run.fd)
            for sock, *_ in waiters:
                sock.close()

    def _status(self, f):
        rss, fds = self.footprint()
        return protocol.ok(version=__version__, pid=os.getpid(), uptime=time.time() - self.started,
                           rss_bytes=rss, open_fds=fds,
                           config=_config_dict(self.cfg), jobs=len(runstate.list_pins(self.cfg)),
                           removals_queued=self.removals.count(removal.QUEUED) + self.removals.count(removal.DEFERRED),
                           removals_running=self.removals.count(removal.RUNNING),
                           scripts_running=len(self.waiting)), None

    # --- the loop --------------------------------------------------------

    def _on_signal(self, signum, frame):
        pass    # the wakeup fd carries the signal number to the loop

    def serve_forever(self):
        self.sel = selectors.DefaultSelector()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sig_r = r
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.accepting = True
        self.sel.register(r, selectors.EVENT_READ, "signal")
        sd_notify(f"READY=1\nSTATUS=serving {self.cfg.socket_path}\nMAINPID={os.getpid()}")
        log.info(event("start", "ok", version=__version__, socket=self.cfg.socket_path, base=self.cfg.base,
                       mounts=",".join(self.cfg.mounts)))
        # An admin who asked for exec and gets noexec hears it here (and
        # from doctor), not from the first user whose program will not run.
        lost = mountopts.exec_lost_to_noexec_base(self.cfg)
        if lost and lost[0]:
            log.warning(event("start", "warning", note=mountopts.noexec_base_warning(self.cfg, *lost),
                              fix=f"remount {lost[1]} exec, or move base= to a filesystem mounted exec; "
                                  f"privtmpctl doctor checks it"))
        if self.metrics.path:
            self._guarded("metrics", self._sample_gauges)
            self.metrics.write()
        while not self.stopping:
            self._guarded("retry", self.removals.retry_due)
            self._guarded("remove", self.removals.step)
            for key, _ in self.sel.select(0 if self.kept.measuring() else self._select_timeout()):
                if key.data == "listen":
                    self._guarded("accept", self._accept)
                elif key.data == "signal":
                    self._signals()
                elif isinstance(key.data, nsscripts.ScriptRun):
                    self._guarded("script-output", key.data.read_output)
                else:
                    self._guarded("read", self._read, key.data)
            self._guarded("scripts", self._scripts_step)
            self._guarded("expire", self._expire)
            if self.kept.due():
                self._guarded("kept", self.kept.check)
            if self.kept.measuring():
                self._guarded("kept", self.kept.measure_step)
            self._guarded("reap", self.removals.reap)
            self._guarded("metrics", self.metrics.maybe_write, self._sample_gauges)
        self.shutdown()

    def _select_timeout(self):
        """At most a second; less when a script's time limit comes sooner
        (a hanging script is killed on time, not up to a second late)."""
        if not self.waiting:
            return 1.0
        soonest = min(run.deadline for run in self.waiting)
        return min(1.0, max(0.0, soonest - time.monotonic()) + 0.001)

    def _guarded(self, what, step, *args):
        """One step of the loop.  The daemon is the only server of every job
        on the node: an unexpected error (EMFILE, ENOMEM, EIO from a sick
        disk) is logged and the loop goes on, instead of taking the daemon
        and every Prolog after it down.  _process already turns request
        errors into replies; this is for everything around it."""
        try:
            step(*args)
        except Exception as e:      # noqa: BLE001 - see above
            log.error(event(what, "error", error=describe(e)))

    def _signals(self):
        try:
            data = os.read(self._sig_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info(event("stop", "requested", signal=signal.Signals(signum).name,
                               note="every job namespace and directory stays in place"))
                self.stopping = self.removals.stopping = True
            elif signum == signal.SIGHUP:
                log.info(event("reload", "ignored", note="configuration changes take effect at restart "
                               "(systemctl restart privtmpd); running jobs keep their namespaces"))

    def _accept(self):
        while True:
            if len(self.conns) >= MAX_CLIENTS:
                # Full: stop accepting instead of refusing.  Further clients
                # wait in the listen backlog (then retry on EAGAIN) until a
                # connection is done; a Prolog is never failed for load.
                self.sel.unregister(self.listener)
                self.accepting = False
                return
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                log.error(event("accept", "error", error=describe(e)))
                return
            # Second check, independent of the socket file's mode: the peer
            # process's credentials as the kernel saw them at connect().
            try:
                uid = _peer_uid(sock)
            except OSError:
                sock.close()
                continue
            if uid != 0:
                log.warning(event("connect", "refused", peer_uid=uid))
                self._reply(sock, protocol.error("only root may talk to privtmpd", "denied"))
                continue
            sock.setblocking(False)
            c = _Conn(sock)
            self.conns[sock.fileno()] = c
            self.sel.register(sock, selectors.EVENT_READ, c)
            # A hook sends its request right after connect(): it is usually
            # there already, which saves a turn of the loop.
            self._read(c)

    def _drop(self, c):
        self.sel.unregister(c.sock)
        del self.conns[c.sock.fileno()]
        if not self.accepting and not self.stopping:
            self.sel.register(self.listener, selectors.EVENT_READ, "listen")
            self.accepting = True

    def _read(self, c):
        try:
            chunk = c.sock.recv(protocol.MAX_REQUEST + 1)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
            c.buf = bytearray()
        c.buf += chunk
        if chunk and b"\n" not in c.buf and len(c.buf) <= protocol.MAX_REQUEST:
            return
        if chunk and len(c.buf) <= protocol.MAX_REQUEST:
            # Read whatever else is already there: data after the request
            # line is an error, not a second request.
            try:
                c.buf += c.sock.recv(protocol.MAX_REQUEST)
            except (BlockingIOError, OSError):
                pass
        self._drop(c)
        self._process(c.sock, bytes(c.buf))

    def _expire(self):
        now = time.monotonic()
        for c in [c for c in self.conns.values() if c.deadline < now]:
            self._drop(c)
            self._reply(c.sock, protocol.error(f"no complete request within {READ_DEADLINE:.0f} s", "bad-request"))

    def _process(self, sock, data):
        t0 = time.monotonic()
        op = "?"
        fields: Dict[str, Any] = {}
        try:
            op, fields = protocol.parse_request(data)
        except protocol.ProtocolError as e:
            error = str(e)
            self._finish(sock, op, fields, t0, protocol.error(error, "bad-request"), None, "bad-request", error)
            return
        self._finish(sock, op, fields, t0, *self._outcome(op, fields, lambda: self.handlers[op](fields)))

    def _outcome(self, op, fields, call):
        """(reply, user, result, error) of a handler, or of a finished
        ScriptRun; (run,) when the handler returned a run to wait for."""
        try:
            out = call()
            if isinstance(out, nsscripts.ScriptRun):
                return (out,)
            reply, user = out
            return reply, user, "ok" if reply.startswith(b'{"ok":true') else "refused", None
        except Exception as e:      # noqa: BLE001 - one place where errors become replies
            error = describe(e)
            try:
                user = jobs.request_user(self.cfg, op, fields)
            except Exception:       # noqa: BLE001 - only for the log line
                user = None
            return protocol.error(error), user, "error", error

    def _wait_for(self, run, sock, op, fields, t0):
        """The reply waits for run: keep the connection, watch the output."""
        if run not in self.waiting:
            self.waiting[run] = []
            if run.fd >= 0:
                self.sel.register(run.fd, selectors.EVENT_READ, run)
                run.unwatch = self.sel.unregister
        self.waiting[run].append((sock, op, fields, t0))

    def _scripts_step(self):
        for run in [r for r in self.waiting if r.poll()]:
            for sock, op, fields, t0 in self.waiting.pop(run):
                self._finish(sock, op, fields, t0, *self._outcome(op, fields, run.result))

    def _finish(self, sock, op, fields, t0, reply, user=None, result=None, error=None):
        """Log, answer and count one request."""
        if isinstance(reply, nsscripts.ScriptRun):
            self._wait_for(reply, sock, op, fields, t0)
            return
        job, dry = fields.get("job"), fields.get("dry_run", False)
        ms = (time.monotonic() - t0) * 1000
        # One line per request: changes at info, queries at debug, trouble above.
        if result == "error":
            level = logging.ERROR
        elif result == "bad-request":
            level = logging.WARNING
        elif op in ("create", "destroy") or (op == "cleanup" and not dry):
            level = logging.INFO if result == "ok" else logging.WARNING
        else:
            level = logging.DEBUG
        log.log(level, event(op, result, job, user, ms, **({"error": error} if error else {})))
        self._reply(sock, reply)
        if op in ("create", "destroy"):
            self.metrics.inc(f"privtmpd_{op}s_total", result=result)
            self.metrics.observe(f"privtmpd_{op}_seconds", ms / 1000)

    def _sample_gauges(self):
        """Gauges read from the system, set just before the metrics file is
        written (at most once a second), not per request: listing the pins
        and /proc/self/fd cost each job ~0.3 ms of CPU."""
        self.metrics.set_active(len(runstate.list_pins(self.cfg)))
        self.metrics.set("privtmpd_removals_pending", self.removals.count())
        rss, fds = self.footprint()
        if rss is not None:
            self.metrics.set("privtmpd_daemon_resident_bytes", rss)
            self.metrics.set("privtmpd_daemon_open_fds", fds)

    def footprint(self):
        """(RSS bytes, open fds) of the daemon itself: flat over thousands
        of jobs, or something leaks.  Workers and namespace children are
        short-lived and not counted."""
        import psutil
        try:
            if self.proc is None or self.proc.pid != os.getpid():
                self.proc = psutil.Process()
            with self.proc.oneshot():
                return self.proc.memory_info().rss, self.proc.num_fds()
        except (OSError, psutil.Error):
            return None, None       # a gauge must never cost a job its reply

    def _reply(self, sock, data):
        try:
            sock.setblocking(True)
            sock.settimeout(READ_DEADLINE)
            sock.sendall(data)
            # Bytes left unread at close() make the kernel reset the peer
            # (ECONNRESET on its next read): a client refused at accept()
            # or cut off mid-request never had its request read.  What is
            # already there is read and dropped, a bounded few reads: a
            # client cannot hold the loop here by sending more.
            sock.setblocking(False)     # a timeout socket would wait in recv()
            for _ in range(4):
                if not sock.recv(protocol.MAX_REQUEST + 1):
                    break
        except OSError:
            pass
        finally:
            sock.close()
        self.removals.replied = True

    def shutdown(self):
        """Fast stop (SIGTERM): jobs keep their namespaces; interrupted
        removals are found again by the next start (trash names on disk)."""
        sd_notify("STOPPING=1")
        for c in list(self.conns.values()):
            self._drop(c)
            self._reply(c.sock, protocol.error("privtmpd is stopping; retry", "busy"))
        # Scripts die with the daemon's stop (a create's state stays
        # "creating", so the next start rolls that job back).
        for run in list(self.waiting):
            self._guarded("scripts", run.cancel, "privtmpd is stopping")
        self._guarded("scripts", self._scripts_step)
        self.removals.kill_workers()
        try:
            os.unlink(self.cfg.socket_path)
        except FileNotFoundError:
            pass
        self.listener.close()
        if self.metrics.path:
            self._guarded("metrics", self._sample_gauges)
            self.metrics.write()
        log.info(event("stop", "ok"))


def _config_dict(cfg):
    return {"base": cfg.base, "mounts": list(cfg.mounts), "rundir": cfg.rundir, "socket": cfg.socket_path,
            "mode": oct(cfg.mode), "shm": cfg.shm or "no", "tmpdir": cfg.tmpdir_value, "source": cfg.source,
            "metrics_dir": cfg.metrics_dir or None, "keep_failed": cfg.keep_failed or None,
            "keep_max": cfg.keep_max if cfg.keep_failed else None, "limit": cfg.limit or None,
            "limit_from": cfg.limit_from or None, "limit_max": cfg.limit_max or None, "limit_reserve": cfg.limit_reserve,
            "count_bytes": cfg.count_bytes, **mountopts.config_json(cfg), "ns_script": cfg.ns_script or None,
            "ns_epilog": cfg.ns_epilog or None,
            "ns_script_timeout": cfg.ns_script_timeout if cfg.ns_script or cfg.ns_epilog else None,
            "on_script_error": cfg.on_script_error if cfg.ns_script else None}



def _pidfile_stale(path):
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return True
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def main(argv=None):
    p = argparse.ArgumentParser(prog="privtmpd", description="Per-job private /tmp for Slurm: the node daemon.")
    p.add_argument("--config", default=config.DEFAULT_PATH, help="configuration file (default %(default)s)")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground and log to stderr (systemd Type=notify)")
    p.add_argument("--pidfile", default="/run/privtmpd.pid", help="pid file in detached mode (default %(default)s)")
    p.add_argument("--debug", action="store_true", help="also log queries (status, list, show), not only changes")
    p.add_argument("--version", action="version", version=f"privtmpd {__version__}")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("privtmpd: must run as root (it creates mount namespaces)", file=sys.stderr)
        return 1
    setup_logging(True, args.debug)
    try:
        cfg = config.load(args.config)
        d = Daemon(cfg)
        if not args.foreground and not _pidfile_stale(args.pidfile):
            raise RuntimeError(f"already running (pid file {args.pidfile})")
        d.startup()
    except (config.ConfigError, RuntimeError, namespace.NamespaceError, runstate.RunDirError, OSError) as e:
        print(f"privtmpd: {describe(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 1
    if args.foreground:
        d.serve_forever()
        return 0
    import daemon as pydaemon
    import daemon.pidfile
    try:
        os.unlink(args.pidfile)     # stale (checked above); lockfile would wait on it
    except FileNotFoundError:
        pass
    ctx = pydaemon.DaemonContext(
        files_preserve=[d.listener.fileno()],
        pidfile=daemon.pidfile.TimeoutPIDLockFile(args.pidfile, acquire_timeout=0),
        umask=0o022, working_directory="/", signal_map={})
    with ctx:
        setup_logging(False, args.debug)
        d.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""privtmpd: the per-node root daemon.

One process, one request at a time.  The main thread never leaves the
host's mount namespace: each new job namespace is built by a short-lived
thread of its own (namespace.build_namespace), which the main thread waits
for; no other thread ever runs, so forking removal workers stays safe.
Requests are read by a selector loop with a deadline per
connection, so a slow or silent client cannot hold the others up; each
complete request is then handled to the end before the next one, which
serialises all work on a job (duplicate Prologs give one namespace, an
Epilog never races its Prolog).

Removal of a job's directories happens after the Epilog's reply (the
Epilog only renames them away): in the daemon itself while a tree is
small (bounded in entries, bytes and milliseconds: most jobs leave a few
files), in forked workers beyond that.  Nothing lives only in memory: the
run directory (pins + state files) and the base directory are the state,
and startup() reconciles them after a restart, a crash or a reboot.
"""

import argparse
import json
import logging
import logging.handlers
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time

from . import __version__, config, kernel, limitfs, mountopts, names, namespace, proc, protocol, runstate, safefs
from .logfmt import describe, event
from .metrics import Metrics

log = logging.getLogger("privtmpd")

READ_DEADLINE = 5.0          # seconds a client has to send its request
KEPT_MEASURE_MAX = 200_000   # entries a kept directory may have (keep_failed=)
KEPT_STEP_SECONDS = 0.005    # measuring kept directories, per turn of the loop at most
MAX_CLIENTS = 256            # open connections at once; more wait in the backlog
REMOVE_RETRIES = 5           # a failed background removal is retried this often,
REMOVE_RETRY_DELAY = 2.0     # after 2, 4, 8... seconds (then at the next start)
# A job's trash is first removed in the daemon itself, after the Epilog's
# reply, within these bounds; what does not fit goes to a forked worker.
# Most jobs leave a few files, and a fork plus a Python worker cost ~3.5 ms
# of CPU per job, on the CPUs the next job starts on.
INLINE_ENTRIES = 2000
INLINE_BYTES = 64 << 20      # unlinking a big file cannot be interrupted
INLINE_SECONDS = 0.02        # per turn of the loop, all inline removals together
REMOVAL_MAX_WAIT = 1.0       # seconds removals give way to waiting requests, at most


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
        self.sel = None            # made in serve_forever (after detaching)
        self.listener = None
        self.conns = {}
        self.removals = []         # queued (parent, name)
        self.workers = {}          # pid -> (parent, name, stats read fd, started)
        self.deferred = []         # (due, parent, name): failed removals waiting for a retry
        self.partial = {}          # (parent, name) -> RemoveStats of an inline attempt a worker finishes
        self.paused = {}           # (parent, name) -> (RemoveStats, Budget, start) of an inline removal
        self.removal_user = {}     # (parent, name) -> the job's user, known from the Epilog's request
        self.removals_held = None  # since when removals gave way to waiting requests (monotonic)
        self.replied = False       # a reply went out since the last removal step
        self.attempts = {}         # (parent, name) -> failed attempts so far
        self.stopping = False
        self.accepting = False     # the listener is in the selector
        self.started = time.time()
        self.metrics = Metrics(cfg, log)
        self.proc = None           # psutil handle, made after detaching (the pid changes)
        self.req_user = None       # the job's user, for the request's log line
        self.kept_sizes = {}       # kept dir name -> (bytes, measured at): a cache, the names are the state
        self.kept_queue = []       # kept dirs (namespace.kept_dirs entries) waiting to be measured
        self.kept_walk = None      # (kept dir, safefs.UsageWalk) being measured, a step per turn
        self.next_kept_check = 0.0
        self._sig_r = None

    # --- start-up ------------------------------------------------------

    def startup(self):
        """Everything that can fail for a configuration or system reason,
        done before the daemon detaches or reports ready."""
        config.check_filesystem(self.cfg)
        runstate.setup_rundir(self.cfg)
        self.reconcile()
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

    def reconcile(self):
        """Make the run directory and the base directory agree.

        A job survives only if its state is "ready" and its pin still holds
        the very namespace recorded at creation.  Anything else - a
        half-created job, a pin without state, state without pin - is torn
        down.  Job directories with no live job (all of them after a reboot,
        when /run is empty) and interrupted removals are queued for removal
        before the first request is served."""
        cfg = self.cfg
        t0 = time.monotonic()
        live = {}
        for name in runstate.remove_stale_temp_states(cfg):
            log.warning(event("recover", "stale-state-removed", file=name))
        for job, st in runstate.all_states(cfg).items():
            ident = runstate.pin_identity(cfg, job)
            if st and st.get("state") == runstate.STATE_READY and ident and list(ident) == st.get("ns"):
                live[job] = st
                continue
            log.warning(event("recover", "rollback", job, _user(st), state=(st or {}).get("state", "unreadable"),
                              pin="live" if ident else "none"))
            namespace.destroy(cfg, job, on_trash=self.queue_removal)
        for pin in runstate.list_pins(cfg):
            if pin not in live:
                log.warning(event("recover", "unpin-orphan", pin))
                runstate.unpin(cfg, pin)
        self._sweep_base(live)
        self.check_kept()
        self.metrics.set_active(len(live))
        log.info(event("recover", "ok", ms=(time.monotonic() - t0) * 1000, live_jobs=len(live),
                       queued_removals=len(self.removals)))
        return live

    def _sweep_base(self, live, dry_run=False):
        """Queue for removal every entry of ours next to the job directories
        that no live job owns.  Returns [{"path", "job", "reason"}]; with
        dry_run only says what it would do."""
        cfg = self.cfg
        match = names.NameMatcher(cfg.base_name)
        busy = ({n for _, n in self.removals} | {n for _, n, _, _ in self.workers.values()}
                | {n for _, _, n in self.deferred})
        found = []
        pfd = safefs.open_dir(cfg.base_parent)
        try:
            with os.scandir(pfd) as it:
                entries = [e.name for e in it if e.name.startswith((cfg.base_name + ".", "." + cfg.base_name + "."))]
            for name in entries:
                if not safefs.is_ours(pfd, name):
                    continue
                jr = match.job_dir(name)
                path = f"{cfg.base_parent}/{name}"
                if jr:
                    job, restart = jr
                    if job in live and (live[job] is None or live[job].get("restart") == restart):
                        continue
                    why = (f"job {job} is running as restart {live[job].get('restart')}, this is run {restart}"
                           if job in live else f"no live namespace for job {job}")
                    if dry_run:
                        found.append({"path": path, "job": job, "reason": why})
                        continue
                    tname = namespace.trash_if_ours(pfd, cfg, name, job, restart)
                    if tname:
                        log.info(event("sweep", "orphan-queued", job, dir=path, reason=why))
                        self.metrics.inc("privtmpd_orphans_swept_total")
                        self.queue_removal(cfg.base_parent, tname)
                        found.append({"path": path, "job": job, "reason": why})
                elif (match.trash(name) or match.temporary(name)) and name not in busy:
                    why = "interrupted removal" if match.trash(name) else "left by an interrupted job start"
                    found.append({"path": path, "job": _job_of(cfg, name), "reason": why})
                    if not dry_run:
                        self.queue_removal(cfg.base_parent, name)
        finally:
            os.close(pfd)
        return found

    # --- removal workers ----------------------------------------------

    def queue_removal(self, parent, name):
        if self.req_user is not None:
            self.removal_user.setdefault((parent, name), self.req_user)     # for its log line, without a lookup
        if (parent, name) not in self.removals and all(
                (p, n) != (parent, name) for p, n, _, _ in self.workers.values()) and all(
                (p, n) != (parent, name) for _, p, n in self.deferred):
            self.removals.append((parent, name))

    def _retry_due(self):
        now = time.monotonic()
        due = [d for d in self.deferred if d[0] <= now]
        for d in due:
            self.deferred.remove(d)
            self.queue_removal(d[1], d[2])

    def _defer(self, parent, name, job):
        """A removal failed (an I/O error, a busy or immutable entry): try
        again later rather than leave the tree until the next restart."""
        n = self.attempts.get((parent, name), 0) + 1
        if n > REMOVE_RETRIES or not os.path.lexists(f"{parent}/{name}"):
            self.attempts.pop((parent, name), None)
            self.removal_user.pop((parent, name), None)
            if n > REMOVE_RETRIES:
                log.error(event("remove", "given-up", job, dir=f"{parent}/{name}", attempts=n,
                                note="retried at the next start, or: privtmpctl cleanup --orphans"))
            return
        self.attempts[(parent, name)] = n
        delay = REMOVE_RETRY_DELAY * 2 ** (n - 1)
        self.deferred.append((time.monotonic() + delay, parent, name))
        log.warning(event("remove", "retry-scheduled", job, dir=f"{parent}/{name}", attempt=n, in_s=delay))

    def _request_waiting(self):
        return bool(self.sel.select(0))

    def _start_removals(self):
        if not self.removals:
            self.replied = False
            return
        # Requests first: a Prolog or Epilog waiting in the socket would
        # otherwise wait behind up to INLINE_SECONDS of unlinking (or a
        # fork).  Bounded, so that a stream of requests cannot hold
        # removals back for long; an inline removal also pauses when one
        # arrives (Budget.interrupt) and goes on at the next turn.
        now = time.monotonic()
        if self._request_waiting():
            if self.removals_held is None:
                self.removals_held = now
            if now - self.removals_held < REMOVAL_MAX_WAIT:
                return
        self.removals_held = None
        if self.replied:
            # The reply just sent woke a hook, and the scheduler tends to
            # queue a woken task on the waker's CPU (wake-affine): without
            # this, the hook, and with it the Epilog, waits for the
            # unlinking below.
            self.replied = False
            os.sched_yield()
        deadline = time.monotonic() + INLINE_SECONDS
        while self.removals and not self.stopping:
            parent, name = self.removals[0]
            if (parent, name) in self.paused and time.monotonic() >= deadline:
                return              # goes on inline at the next turn
            if (parent, name) not in self.partial and time.monotonic() < deadline:
                self.removals.pop(0)
                if self._remove_inline(parent, name, deadline):
                    continue
                self.removals.insert(0, (parent, name))
                if (parent, name) in self.paused:
                    return
            if len(self.workers) >= self.cfg.remove_workers:
                return
            r, w = os.pipe2(os.O_CLOEXEC)
            daemon_pid = os.getpid()
            try:
                pid = os.fork()
            except OSError:
                os.close(r)
                os.close(w)
                raise               # the removal stays queued; tried again next turn
            self.removals.pop(0)
            if pid == 0:
                code = 1
                try:
                    self._worker_init(daemon_pid)
                    os.close(r)
                    pfd = safefs.open_dir(parent)
                    owner = _owner_of(pfd, name)
                    # A limit= image still mounted (a sweep or retry after a
                    # crash): removal never crosses it, so detach it first.
                    try:
                        limitfs.umount_limited_fs(parent, name)
                    except OSError:
                        pass
                    if names.NameMatcher(self.cfg.base_name).kept_trash(name):
                        stats = safefs.remove_as_owner(pfd, name)
                    else:
                        stats = safefs.remove_tree(pfd, name, sizes=self.cfg.count_bytes)
                    os.write(w, json.dumps(dict(stats.__dict__, user=owner)).encode()[:60000])
                    code = 0
                except BaseException as e:
                    try:
                        os.write(w, json.dumps({"error": describe(e)}).encode()[:60000])
                    except OSError:
                        pass
                finally:
                    os._exit(code)
            os.close(w)
            self.workers[pid] = (parent, name, r, time.monotonic())

    def _remove_inline(self, parent, name, deadline):
        """Remove a trash tree here, within the inline budget.  True when
        the attempt is over (removed, or failed and deferred); False when
        it paused for a waiting request (in self.paused: it goes on at the
        next turn) or the tree is too big (in self.partial: a worker
        finishes it)."""
        stats, budget, t0 = self.paused.pop((parent, name), None) or (safefs.RemoveStats(), None, time.monotonic())
        try:
            pfd = safefs.open_dir(parent)
        except OSError as e:
            self._removal_done(parent, name, {"error": describe(e)}, 0.0, by="daemon")
            return True
        try:
            owner = self.removal_user.get((parent, name)) or _owner_of(pfd, name, lookup=False)
            if (_lexists_at(pfd, f"{name}/{limitfs.LIMITED_FS}.img")
                    or names.NameMatcher(self.cfg.base_name).kept_trash(name)):
                # limit=: one file as big as the job's data; a kept
                # directory: removed with its owner's credentials, by a
                # forked process.  Never inline.
                self.partial[(parent, name)] = stats
                return False
            budget = budget or safefs.Budget(INLINE_ENTRIES, INLINE_BYTES, deadline, self._request_waiting)
            budget.deadline = deadline
            safefs.remove_tree(pfd, name, stats, budget)
            info = dict(stats.__dict__, user=owner)
        except safefs.Paused:
            self.paused[(parent, name)] = (stats, budget, t0)
            return False
        except safefs.OverBudget:
            self.partial[(parent, name)] = stats
            return False
        except Exception as e:      # noqa: BLE001 - as a worker reports it: logged, retried later
            info = {"error": describe(e)}
        finally:
            os.close(pfd)
        self._removal_done(parent, name, info, (time.monotonic() - t0) * 1000, by="daemon")
        return True

    def _worker_init(self, daemon_pid):
        # A worker dies with its daemon, as it does on a SIGTERM stop: the
        # next daemon finds the trash name and resumes the removal, and an
        # orphaned worker would race that new worker on the same tree.
        kernel.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != daemon_pid:     # the daemon died before prctl
            os._exit(1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        self.listener.close()
        for c in self.conns.values():
            c.sock.close()
        # Lowest I/O and CPU priority: a big removal must not slow the jobs
        # that run meanwhile.
        try:
            os.nice(10)
        except OSError:
            pass

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.workers:
                continue
            parent, name, r, t0 = self.workers.pop(pid)
            try:
                raw = os.read(r, 65536)
            finally:
                os.close(r)
            try:
                info = json.loads(raw) if raw else {"error": f"worker died (status {status})"}
            except ValueError:
                info = {"error": "worker sent a bad report"}
            done = self.partial.pop((parent, name), None)
            if done is not None and "files" in info:
                # What the inline attempt removed before handing over.
                for k in ("files", "dirs", "bytes"):
                    info[k] += getattr(done, k)
                info["sized"] = info["sized"] and done.sized
            self._removal_done(parent, name, info, (time.monotonic() - t0) * 1000)

    def _removal_done(self, parent, name, info, ms, by="worker"):
        """Log, count and (on failure) schedule a retry of one removal,
        done by a worker or by the daemon itself (inline)."""
        job, user, where = _job_of(self.cfg, name), info.get("user"), f"{parent}/{name}"
        # Bytes only when every removed file was measured (count_bytes=, or
        # removed inline, which measures them for its budget): a partial
        # sum in a log line or the counter would read as the job's usage.
        sized = {"bytes": info["bytes"]} if info.get("sized") else {}
        if "error" in info:
            log.error(event("remove", "error", job, user, ms, dir=where, by=by, error=info["error"]))
            self.metrics.inc("privtmpd_removals_total", result="error")
        elif info.get("failures") or info.get("mounts_skipped"):
            log.error(event("remove", "incomplete", job, user, ms, dir=where, by=by, files=info["files"],
                            **sized, left=info["failures"], mounts_skipped=info["mounts_skipped"],
                            errors="; ".join(info["errors"][:5])))
            self.metrics.inc("privtmpd_removals_total", result="incomplete")
        else:
            log.info(event("remove", "ok", job, user, ms, dir=where, by=by, files=info["files"],
                           dirs=info["dirs"], **sized))
            self.metrics.inc("privtmpd_removals_total", result="ok")
        if "error" in info or info.get("failures") or info.get("mounts_skipped"):
            self._defer(parent, name, job)
        else:
            self.attempts.pop((parent, name), None)
            self.removal_user.pop((parent, name), None)
        if "files" in info:
            self.metrics.inc("privtmpd_removed_files_total", info["files"])
            self.metrics.inc("privtmpd_removed_dirs_total", info["dirs"])
            if sized:
                self.metrics.inc("privtmpd_removed_bytes_total", info["bytes"])
            self.metrics.observe("privtmpd_remove_seconds", ms / 1000)

    # --- requests --------------------------------------------------------

    def handle(self, op, f):
        """Dispatch one validated request; returns the reply bytes."""
        cfg = self.cfg
        if op == "create":
            job, restart = f["job"], f["restart"]
            self.req_user = f.get("user") or f["uid"]
            st = runstate.read_state(cfg, job)
            ident = runstate.pin_identity(cfg, job)
            # Same job, run, owner and pinned namespace: a duplicate Prolog.
            # A namespace left by an earlier job with this id (missed
            # Epilog, then job ids wrapped) must never go to another user.
            if (st and st.get("state") == runstate.STATE_READY and st.get("restart") == restart
                    and st.get("uid") == f["uid"] and st.get("gid") == f["gid"]
                    and ident and list(ident) == st.get("ns")):
                return protocol.ok(job=job, dir=st["dir"], existing=True)
            if st or ident or os.path.lexists(names.pin_path(cfg.rundir, job)):
                # A previous run of this job (requeue without Epilog here,
                # or a half-made attempt): start from nothing.
                namespace.destroy(cfg, job, restart_hint=restart, on_trash=self.queue_removal)
            try:
                st = namespace.create(cfg, job, restart, f["uid"], f["gid"], f.get("user", ""),
                                      on_trash=self.queue_removal,
                                      limit=self._job_limit(job, f.get("slurm_conf")))
            except BaseException:
                # No partial state: roll back pin, state and directories.
                try:
                    namespace.destroy(cfg, job, restart_hint=restart, on_trash=self.queue_removal)
                except Exception as e2:   # noqa: BLE001 - report the first error, log this one
                    log.error(event("create-rollback", "error", job, self.req_user, error=describe(e2)))
                raise
            if st.get("displaced"):
                log.warning(event("create", "displaced", job, self.req_user, found=st["displaced"]))
            if cfg.limit_reserve and st.get("limit") and not st.get("reserved"):
                log.warning(event("create", "not-reserved", job, self.req_user, limit=st["limit"],
                                  dir=st["dir"], note="the disk could not hold the whole image: it is "
                                  "sparse, and the job may get EIO before its limit if the disk fills up"))
            return protocol.ok(job=job, dir=st["dir"], existing=False)
        if op == "destroy":
            self.req_user = _user(runstate.read_state(cfg, f["job"]))
            code = f.get("exit_code", 0)
            keep = time.time() + cfg.keep_failed if cfg.keep_failed and code else None
            info = namespace.destroy(cfg, f["job"], restart_hint=f.get("restart"), on_trash=self.queue_removal,
                                     keep_until=keep, exit_code=code)
            if keep and cfg.tmpfs:
                # A tmpfs= point lives only in the job's namespace, gone with it.
                log.info(event("destroy", "not-kept-tmpfs", f["job"], self.req_user, exit_code=code,
                               mounts=",".join(m for m, _ in cfg.tmpfs),
                               note="tmpfs= mount points are freed with the namespace and cannot be kept"))
            for why in info["keep_errors"]:
                log.warning(event("destroy", "not-kept", f["job"], self.req_user, exit_code=code, error=why,
                                  note="removed instead"))
            if info["kept"]:
                log.info(event("destroy", "kept", f["job"], self.req_user, exit_code=code,
                               dirs=",".join(info["kept"]), until=time.ctime(keep)))
                self.next_kept_check = 0.0     # keep_max: measured after this reply, not before
            if info["killed"] or info["cgroups"]:
                log.warning(event("destroy", "killed", f["job"], self.req_user, count=len(info["killed"]),
                                  pids=",".join(map(str, info["killed"][:50])),
                                  **({"cgroups": ",".join(info["cgroups"])} if info["cgroups"] else {})))
            return protocol.ok(**info)
        if op == "status":
            rss, fds = self.footprint()
            return protocol.ok(version=__version__, pid=os.getpid(), uptime=time.time() - self.started,
                               rss_bytes=rss, open_fds=fds,
                               config=_config_dict(cfg), jobs=len(runstate.list_pins(cfg)),
                               removals_queued=len(self.removals) + len(self.deferred),
                               removals_running=len(self.workers))
        if op in ("list", "show"):
            jobs = []
            for job, st in sorted(runstate.all_states(cfg).items()):
                if op == "show" and job != f["job"]:
                    continue
                st = dict(st or {"job": job, "state": "unreadable"})
                ident = runstate.pin_identity(cfg, job)
                st["pinned"] = bool(ident)
                st["processes"] = proc.processes_in(ident) if ident else []
                if st.get("limit") and isinstance(st.get("dir"), str):
                    st["used"] = (limitfs.limited_fs_usage(st["dir"]) or (None,))[0]
                if isinstance(st.get("tmpfs"), dict) and ident:
                    st["tmpfs_used"] = mountopts.tmpfs_usage(names.pin_path(cfg.rundir, job), list(st["tmpfs"]))
                jobs.append(st)
            if op == "show" and not jobs:
                return protocol.error(f"no job {f['job']} on this node", "not-found")
            kept = [dict(k, bytes=self.kept_sizes.get(k["name"], (None,))[0]) for k in namespace.kept_dirs(cfg)]
            extra = {"kept": kept, "keep_max": cfg.keep_max} if kept or cfg.keep_failed else {}
            return protocol.ok(jobs=jobs, **extra, removals=[f"{p}/{n}" for p, n in self.removals]
                               + [f"{p}/{n}" for _, p, n in self.deferred]
                               + [f"{p}/{n}" for p, n, _, _ in self.workers.values()])
        if op == "cleanup":
            return self._cleanup(f.get("job"), f.get("dry_run", False))
        raise AssertionError(op)

    def _job_limit(self, job, slurm_conf):
        """limit_from=tmp: the job's --tmp request (tmprequest), else limit=.
        Asking slurmctld costs the Prolog one squeue call; when it cannot
        answer, or answers nonsense, the job gets limit= and the reason is
        logged: a size is never worth failing a Prolog (and draining the
        node) for."""
        cfg = self.cfg
        if not cfg.limit_from:
            return cfg.limit
        from . import tmprequest
        try:
            size, result, note = tmprequest.job_limit(cfg, job, slurm_conf)
        except Exception as e:      # noqa: BLE001 - see above
            size, result, note = cfg.limit, "fallback", describe(e)
        if result:
            log.warning(event("limit", result, job, self.req_user, limit=size, error=note))
        return size

    def _cleanup(self, job, dry_run):
        """`privtmpctl cleanup`.  Whether a Slurm job is over cannot be known
        here, so a live job is only torn down when named (the admin knows).
        Without a job: what no live job owns - state or pins without a live
        namespace, job directories without a live job, interrupted removals -
        by the rules of start-up.  The reply says what and why; with dry_run
        nothing changes."""
        cfg = self.cfg
        jobs, skipped = [], []
        if job is not None:
            st = runstate.read_state(cfg, job)
            ident = runstate.pin_identity(cfg, job)
            dirs = self._job_dirs(job)
            self.req_user = _user(st)
            if st or ident or os.path.lexists(names.pin_path(cfg.rundir, job)) or dirs:
                jobs.append({"job": job, "user": self.req_user, "state": (st or {}).get("state"),
                             "pinned": bool(ident), "processes": proc.processes_in(ident) if ident else [],
                             "dirs": [f"{cfg.base_parent}/{d}" for d in dirs],
                             "reason": "named by the administrator"})
            orphans = []
        else:
            live = {}
            states = runstate.all_states(cfg)
            for j, st in states.items():
                ident = runstate.pin_identity(cfg, j)
                if st and st.get("state") == runstate.STATE_READY and ident and list(ident) == st.get("ns"):
                    live[j] = st
                    continue
                item = {"job": j, "user": _user(st), "state": (st or {}).get("state", "unreadable"),
                        "pinned": bool(ident), "processes": proc.processes_in(ident) if ident else [],
                        "dirs": [f"{cfg.base_parent}/{d}" for d in self._job_dirs(j)],
                        "reason": f"state {(st or {}).get('state', 'unreadable')!r} without its live namespace"}
                (skipped if item["processes"] else jobs).append(item)
            for pin in runstate.list_pins(cfg):
                if pin not in states and isinstance(pin, int):
                    ident = runstate.pin_identity(cfg, pin)
                    item = {"job": pin, "user": None, "state": None, "pinned": bool(ident),
                            "processes": proc.processes_in(ident) if ident else [], "dirs": [],
                            "reason": "pin without a state file"}
                    (skipped if item["processes"] else jobs).append(item)
            for item in skipped:
                item["reason"] += f"; processes {item['processes']} still inside: privtmpctl cleanup {item['job']}"
                live[item["job"]] = None    # in use: the sweep below keeps all its directories
            orphans = None
        if not dry_run:
            for item in jobs:
                info = namespace.destroy(cfg, item["job"], on_trash=self.queue_removal)
                for d in self._job_dirs(item["job"]):
                    pfd = safefs.open_dir(cfg.base_parent)
                    try:
                        jr = names.NameMatcher(cfg.base_name).job_dir(d)
                        tname = namespace.trash_if_ours(pfd, cfg, d, item["job"], jr[1])
                    finally:
                        os.close(pfd)
                    if tname:
                        self.queue_removal(cfg.base_parent, tname)
                item["killed"] = info["killed"]
                log.warning(event("teardown", "ok", item["job"], item["user"], reason=item["reason"],
                                  killed=",".join(map(str, info["killed"])), dirs=",".join(item["dirs"])))
            self.metrics.set_active(len(runstate.list_pins(cfg)))
        if orphans is None:
            orphans = self._sweep_base(live, dry_run)
        return protocol.ok(dry_run=dry_run, jobs=jobs, orphans=orphans, skipped=skipped)

    def check_kept(self, now=None):
        """keep_failed=: remove kept directories whose time is up, and queue
        for measuring those whose size is unknown or older than a minute
        (users may still write into their kept directories: that counts
        too).  The measuring is done in steps by the loop (_measure_kept),
        and keep_max is enforced once every queued size is known."""
        cfg = self.cfg
        now = time.time() if now is None else now
        self.next_kept_check = time.monotonic() + 5.0
        kept = namespace.kept_dirs(cfg)
        if not kept:
            self.kept_sizes.clear()
            return
        walking = self.kept_walk[0]["name"] if self.kept_walk else None
        queued = {k["name"] for k in self.kept_queue}
        pfd = safefs.open_dir(cfg.base_parent)
        try:
            for k in kept:
                if k["until"] <= now:
                    if k["name"] == walking:
                        self._stop_kept_walk()
                    self._drop_kept(pfd, k, "expired")
                    continue
                size, when = self.kept_sizes.get(k["name"], (None, 0.0))
                if (size is None or time.monotonic() - when > 60) and k["name"] not in queued | {walking}:
                    self.kept_queue.append(k)
        finally:
            os.close(pfd)
        live = {k["name"] for k in namespace.kept_dirs(cfg)}
        self.kept_queue = [k for k in self.kept_queue if k["name"] in live]
        for name in list(self.kept_sizes):
            if name not in live:
                del self.kept_sizes[name]
        if not self.kept_queue and not self.kept_walk:
            self._enforce_keep_max()

    def _stop_kept_walk(self):
        if self.kept_walk:
            self.kept_walk[1].close()
            self.kept_walk = None

    def _measure_kept(self):
        """One turn's share of measuring kept directories: at most
        KEPT_STEP_SECONDS, and not while a request waits.  A kept tree of
        any size never delays a Prolog by more than one step."""
        deadline = time.monotonic() + KEPT_STEP_SECONDS
        while time.monotonic() < deadline and not self._request_waiting():
            if not self.kept_walk:
                if not self.kept_queue:
                    self._enforce_keep_max()
                    return
                k = self.kept_queue.pop(0)
                pfd = safefs.open_dir(self.cfg.base_parent)
                try:
                    if not safefs.is_ours(pfd, k["name"]):
                        continue
                    self.kept_walk = (k, safefs.UsageWalk(pfd, k["name"], KEPT_MEASURE_MAX,
                                                          mounts_at_top=(limitfs.LIMITED_FS,)))
                except OSError:
                    continue            # gone meanwhile
                finally:
                    os.close(pfd)
            k, walk = self.kept_walk
            try:
                done = walk.step(deadline, self._request_waiting)
            except OSError:
                # Unknown, not small: measured again at the next check.
                self._stop_kept_walk()
                continue
            if not done:
                return
            self.kept_walk = None
            if not walk.complete:
                # A kept tree that cannot be measured whole cannot be kept.
                pfd = safefs.open_dir(self.cfg.base_parent)
                try:
                    self._drop_kept(pfd, k, f"cannot be measured: {walk.why}")
                finally:
                    os.close(pfd)
                continue
            self.kept_sizes[k["name"]] = (walk.bytes, time.monotonic())

    def _enforce_keep_max(self):
        """Over keep_max, evict the oldest kept directory of the user whose
        kept directories use the most, until all of them fit: a user who
        fills the space loses their own first; another user's go only when
        that user uses as much or more."""
        kept = namespace.kept_dirs(self.cfg)
        sizes = {k["name"]: self.kept_sizes.get(k["name"], (0,))[0] for k in kept}
        total = sum(sizes.values())
        if total <= self.cfg.keep_max:
            return
        by_user = {}
        for k in kept:                  # oldest first (earliest expiry)
            by_user.setdefault(k["uid"], []).append(k)
        pfd = safefs.open_dir(self.cfg.base_parent)
        try:
            while total > self.cfg.keep_max and by_user:
                user = max(by_user, key=lambda u: sum(sizes[k["name"]] for k in by_user[u]))
                k = by_user[user].pop(0)
                if not by_user[user]:
                    del by_user[user]
                self._drop_kept(pfd, k, f"kept directories use {total} bytes, over keep_max={self.cfg.keep_max}; "
                                        f"uid {user} uses the most")
                total -= sizes[k["name"]]
                self.kept_sizes.pop(k["name"], None)
        finally:
            os.close(pfd)

    def _drop_kept(self, pfd, k, why):
        tname = namespace.trash_if_ours(pfd, self.cfg, k["name"], k["job"], k["restart"], kept=True)
        if tname:
            self.removal_user[(self.cfg.base_parent, tname)] = k["uid"]     # not the last request's user
            log.info(event("kept", "removed", k["job"], k["uid"], dir=k["path"], reason=why))
            self.queue_removal(self.cfg.base_parent, tname)

    def _job_dirs(self, job):
        """Names of job's directories ($base.JOB.*, ours: root-owned) in the base's parent."""
        cfg = self.cfg
        match = names.NameMatcher(cfg.base_name)
        out = []
        pfd = safefs.open_dir(cfg.base_parent)
        try:
            with os.scandir(pfd) as it:
                for e in it:
                    jr = match.job_dir(e.name)
                    if jr and jr[0] == job and safefs.is_ours(pfd, e.name):
                        out.append(e.name)
        finally:
            os.close(pfd)
        return sorted(out)

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
        if self.metrics.path:
            self._guarded("metrics", self._sample_gauges)
            self.metrics.write()
        while not self.stopping:
            self._guarded("retry", self._retry_due)
            self._guarded("remove", self._start_removals)
            for key, _ in self.sel.select(0 if self.kept_walk or self.kept_queue else 1.0):
                if key.data == "listen":
                    self._guarded("accept", self._accept)
                elif key.data == "signal":
                    self._signals()
                else:
                    self._guarded("read", self._read, key.data)
            self._guarded("expire", self._expire)
            if (self.cfg.keep_failed or self.kept_sizes) and time.monotonic() >= self.next_kept_check:
                self._guarded("kept", self.check_kept)
            if self.kept_walk or self.kept_queue:
                self._guarded("kept", self._measure_kept)
            self._guarded("reap", self._reap)
            self._guarded("metrics", self.metrics.maybe_write, self._sample_gauges)
        self.shutdown()

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
                self.stopping = True
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
        op, job, error, dry = "?", None, None, False
        self.req_user = None
        try:
            op, fields = protocol.parse_request(data)
            job, dry = fields.get("job"), fields.get("dry_run", False)
            reply = self.handle(op, fields)
            result = "ok" if reply.startswith(b'{"ok":true') else "refused"
        except protocol.ProtocolError as e:
            error = str(e)
            reply, result = protocol.error(error, "bad-request"), "bad-request"
        except Exception as e:      # noqa: BLE001 - one place where errors become replies
            error = describe(e)
            reply, result = protocol.error(error), "error"
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
        log.log(level, event(op, result, job, self.req_user, ms, **({"error": error} if error else {})))
        self._reply(sock, reply)
        if op in ("create", "destroy"):
            self.metrics.inc(f"privtmpd_{op}s_total", result=result)
            self.metrics.observe(f"privtmpd_{op}_seconds", ms / 1000)

    def _sample_gauges(self):
        """Gauges read from the system, set just before the metrics file is
        written (at most once a second), not per request: listing the pins
        and /proc/self/fd cost each job ~0.3 ms of CPU."""
        self.metrics.set_active(len(runstate.list_pins(self.cfg)))
        self.metrics.set("privtmpd_removals_pending", len(self.removals) + len(self.workers) + len(self.deferred))
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
        except OSError:
            pass
        finally:
            sock.close()
        self.replied = True

    def shutdown(self):
        """Fast stop (SIGTERM): jobs keep their namespaces; interrupted
        removals are found again by the next start (trash names on disk)."""
        sd_notify("STOPPING=1")
        for c in list(self.conns.values()):
            self._drop(c)
            self._reply(c.sock, protocol.error("privtmpd is stopping; retry", "busy"))
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(self.workers):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            os.close(self.workers.pop(pid)[2])
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
            "count_bytes": cfg.count_bytes, **mountopts.config_json(cfg)}


def _user(state):
    """The job's user for log lines: the name Slurm gave, else the uid."""
    state = state or {}
    return state.get("user") or state.get("uid")


def _job_of(cfg, name):
    """Job id in a job, trash or temporary directory name, for log lines."""
    rest = name.lstrip(".")
    if rest.startswith(cfg.base_name + "."):
        head = rest[len(cfg.base_name) + 1:].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def _lexists_at(dirfd, path):
    try:
        os.stat(path, dir_fd=dirfd, follow_symlinks=False)
        return True
    except OSError:
        return False


def _owner_of(pfd, name, lookup=True):
    """The user whose files a job directory holds (its subdirectories are
    the user's; the top is root's), for the removal's log line.  The name
    is looked up only in a removal worker (lookup=True): a lookup may wait
    on LDAP, the daemon must not; the daemon logs the uid."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            with os.scandir(fd) as it:
                uid = next((safefs.lstat_at(fd, e.name).st_uid for e in it), None)
        finally:
            os.close(fd)
    except OSError:
        return None
    if uid is None or uid == 0:
        return None
    if not lookup:
        return uid
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid


# --- command line ----------------------------------------------------------

def _setup_logging(foreground, debug):
    handler = None
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
    _setup_logging(True, args.debug)
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
        _setup_logging(False, args.debug)
        d.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

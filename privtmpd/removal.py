"""Removal of trash trees: the daemon's queue, its inline budget, the forked
workers, and retries.

A job's directories are renamed to a trash name by the Epilog's request
(O(1)); the trees are removed here, after the reply:
- in the daemon itself while a tree is small (INLINE_*: most jobs leave a
  few files, and a fork plus a Python worker cost ~3.5 ms of CPU per job,
  on the CPUs the next job starts on), in steps that give way to a waiting
  request;
- in forked workers beyond that (a limit= image, a kept directory, or a
  tree over the inline budget), at most remove_workers at once;
- a failed removal is retried after 2, 4, 8... seconds, then at the next
  start (the trash name on disk is the state: nothing lives only here).

Each removal is one record (_Removal) in one dict; where it stands
(queued, paused inline, handed to a worker, running, waiting for a retry)
is a field of that record, not membership in parallel lists.

A job's final usage (op=usage, and the job size histograms) comes from the
removal's own walk, which counts files and directories anyway: no second
walk.  Bytes are known when every removed file was measured (an inline
removal measures each for its budget; a worker only with count_bytes=yes);
otherwise the line says bytes=- rather than a partial sum.  A job with its
own filesystem (limit=) is measured by statvfs at teardown instead
(jobs.py), and its removal reports nothing.
"""

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from . import forked, jobdirs, leftovers, limitfs, mountopts, names, runstate, safefs
from .logfmt import describe, event

log = logging.getLogger("privtmpd")

REMOVE_RETRIES = 5           # a failed removal is retried this often,
REMOVE_RETRY_DELAY = 2.0     # after 2, 4, 8... seconds (then at the next start)
INLINE_ENTRIES = 2000
INLINE_BYTES = 64 << 20      # unlinking a big file cannot be interrupted
INLINE_SECONDS = 0.02        # per turn of the loop, all inline removals together
REMOVAL_MAX_WAIT = 1.0       # seconds removals give way to waiting requests, at most
_REPORT_MAX = 60000          # bytes of a worker's JSON report (one pipe read)

Key = Tuple[str, str]        # (parent directory, trash name)

QUEUED, RUNNING, DEFERRED = "queued", "running", "deferred"
SWEEP = "<leftovers>"        # the parent of a sweep's record: never a directory
EMPTYING = "<tmpfs>"         # the parent of a tmpfs emptying's record


@dataclass
class _Removal:
    parent: str
    name: str
    user: object = None                     # the job's user, for the log line
    where: str = QUEUED
    attempts: int = 0                       # failed attempts so far
    stats: Optional[safefs.RemoveStats] = None   # what an inline attempt removed
    budget: Optional[safefs.Budget] = None  # set while paused inline
    handed_over: bool = False               # too big for inline: a worker finishes it
    started: float = 0.0                    # monotonic start of this attempt
    due: float = 0.0                        # DEFERRED: when to retry
    pid: int = 0                            # RUNNING: the worker
    report_fd: int = -1                     # RUNNING: its report pipe
    usage: bool = False                     # log the job's usage from this removal's counts
    usage_extra: Optional[dict] = None      # plus these (the job's tmpfs= points: bytes, files)
    sweep: Optional[dict] = None            # leftovers.sweep()'s arguments: a sweep, not a tree
    emptying: Optional[dict] = None         # {"nsfd", "points"}: a job's tmpfs= points, not a tree

    @property
    def path(self):
        if self.sweep is not None:
            return f"{self.name} in {','.join(self.sweep['points'])}"
        if self.emptying is not None:
            return f"{self.name} at {','.join(self.emptying['points'])}"
        return f"{self.parent}/{self.name}"


class RemovalQueue:
    def __init__(self, cfg, metrics, request_waiting: Callable[[], bool],
                 close_in_worker: Callable[[], None] = lambda: None):
        self.cfg = cfg
        self.metrics = metrics
        self.request_waiting = request_waiting
        self.close_in_worker = close_in_worker     # the daemon's sockets, closed in a forked worker
        self._all: Dict[Key, _Removal] = {}
        self._order: List[Key] = []                # QUEUED, oldest first
        self.held_since: Optional[float] = None    # removals gave way to waiting requests since then
        self.replied = False                       # a reply went out since the last step
        self.stopping = False
        self._free = {"trees": 0, "sweeps": 0}     # worker places free in this step()
        self._sweeping: set = set()                # uids whose sweep runs, in this step()
        self._emptyings = 0                        # tmpfs emptyings queued so far (their names)

    # --- what is there ----------------------------------------------------

    def queue(self, parent: str, name: str, user=None, usage=False, usage_extra=None) -> None:
        """Queue parent/name for removal, once (again while queued,
        running or waiting for a retry is a no-op).  usage: the tree is a
        job's private directories as the job left them; its counts, plus
        usage_extra's, are the job's usage."""
        r = self._all.get((parent, name))
        if r is None:
            r = self._all[(parent, name)] = _Removal(parent, name, user, usage=usage, usage_extra=usage_extra)
            self._order.append((parent, name))
        elif r.user is None:
            r.user = user

    def queue_sweep(self, job: int, restart: int, user, sweep: dict, recorded=False) -> None:
        """Queue a sweep of the shared mount points for the files job's
        user left there (leftovers.py): always in a worker, since its work
        grows with those directories, and never retried (a sweep that
        failed is logged; doctor reports what stays).  Recorded in the run
        directory until it is done, for the next daemon should this one
        stop first (recorded: it is, this is that next daemon)."""
        # One per run: a requeued run's sweep is not lost behind the last one's.
        key = (SWEEP, f"files of job {job}.{restart}'s user")
        if key in self._all:
            return
        sweep = dict(sweep, job=job, restart=restart)
        if not recorded:
            try:
                runstate.write_sweep(self.cfg, job, restart, dict(sweep, user=user))
            except OSError as e:
                log.warning(event("leftovers", "not-recorded", job, user, error=describe(e),
                                  note="swept now, but not again should privtmpd stop first"))
        self._all[key] = _Removal(*key, user, handed_over=True, sweep=sweep)
        self._order.append(key)

    def resume_sweeps(self) -> None:
        """At start-up: queue the sweeps the last daemon recorded and did
        not finish."""
        shared = leftovers.shared_points(self.cfg)
        for job, restart, sweep in runstate.pending_sweeps(self.cfg):
            if job is None:
                log.warning(event("leftovers", "bad-record", None, file=f"{self.cfg.rundir}/sweeps/{restart}",
                                  error=sweep, note="removed; not a sweep privtmpd wrote"))
                continue
            user = sweep.get("user")
            user = user if isinstance(user, (str, int)) else sweep["uid"]
            # Today's configuration bounds what a record asks for: only the
            # shared mount points configured now (one dropped from mount=
            # since may be anything by now), and removal only while
            # host_leftovers=remove.
            dropped = [p for p in sweep["points"] if p not in shared]
            sweep = dict(sweep, points=[p for p in sweep["points"] if p in shared],
                         remove=sweep["remove"] and self.cfg.host_leftovers == leftovers.REMOVE)
            if dropped:
                log.warning(event("leftovers", "not-resumed", job, user, mounts=",".join(dropped),
                                  note="no longer a shared mount point of the configuration: not swept"))
            if not sweep["points"]:
                runstate.remove_sweep(self.cfg, job, restart)
                continue
            self.queue_sweep(job, restart, user, sweep, recorded=True)

    def queue_emptying(self, job: int, user, nsfd: int, points) -> None:
        """Queue the emptying of a job's tmpfs= points (mountopts.empty_tmpfs)
        in a worker, in the namespace nsfd keeps alive (the queue owns the
        fd and closes it once the worker has its copy).  Not retried."""
        self._emptyings += 1
        key = (EMPTYING, f"tmpfs of job {job} ({self._emptyings})")
        self._all[key] = _Removal(*key, user, handed_over=True,
                                  emptying={"job": job, "nsfd": nsfd, "points": list(points)})
        self._order.append(key)

    def set_user(self, parent: str, name: str, user) -> None:
        r = self._all.get((parent, name))
        if r is not None:
            r.user = user

    def names(self) -> set:
        return {n for _, n in self._all}

    def paths(self) -> List[str]:
        return [r.path for r in self._all.values()]

    def count(self, where=None) -> int:
        return sum(1 for r in self._all.values() if where is None or r.where == where)

    def paused(self) -> List[Key]:
        return [k for k, r in self._all.items() if r.budget is not None]

    def busy(self) -> bool:
        return bool(self._order)

    # --- the loop's steps -------------------------------------------------

    def retry_due(self) -> None:
        now = time.monotonic()
        for key, r in self._all.items():
            if r.where == DEFERRED and r.due <= now:
                r.where = QUEUED
                self._order.append(key)

    def step(self) -> None:
        """Start removals: inline within INLINE_SECONDS, then workers."""
        if not self._order:
            self.replied = False
            return
        # Requests first: a Prolog or Epilog waiting in the socket would
        # otherwise wait behind up to INLINE_SECONDS of unlinking (or a
        # fork).  Bounded, so that a stream of requests cannot hold
        # removals back for long; an inline removal also pauses when one
        # arrives (Budget.interrupt) and goes on at the next turn.
        now = time.monotonic()
        if self.request_waiting():
            if self.held_since is None:
                self.held_since = now
            if now - self.held_since < REMOVAL_MAX_WAIT:
                return
        self.held_since = None
        if self.replied:
            # The reply just sent woke a hook, and the scheduler tends to
            # queue a woken task on the waker's CPU (wake-affine): without
            # this, the hook, and with it the Epilog, waits for the
            # unlinking below.
            self.replied = False
            os.sched_yield()
        deadline = time.monotonic() + INLINE_SECONDS
        # Free worker places, counted once per step (not per queued removal).
        running = [r for r in self._all.values() if r.where == RUNNING]
        self._sweeping = {r.sweep["uid"] for r in running if r.sweep is not None}
        self._free = {"trees": self.cfg.remove_workers - sum(1 for r in running if r.sweep is None),
                      "sweeps": self.cfg.remove_workers - len(self._sweeping)}
        while self._order and not self.stopping:
            # The first removal that can go on now: one waiting for a
            # worker must not hold back those behind it (a sweep the user
            # stopped keeps its worker leftovers.SECONDS).
            inline = time.monotonic() < deadline
            if not inline and self._free["trees"] <= 0 and self._free["sweeps"] <= 0:
                return
            key = next((k for k in self._order if self._can_start(self._all[k], inline)), None)
            if key is None:
                return
            r = self._all[key]
            if r.budget is not None and not inline:
                return                  # paused inline: goes on at the next turn
            if not r.handed_over and inline:
                if self._remove_inline(r, deadline):
                    continue
                if r.budget is not None:
                    return              # paused for a request
                if not self._can_start(r, False):
                    continue            # too big: waits for a worker
            self._start_worker(r)

    def _can_start(self, r: _Removal, inline: bool) -> bool:
        """Inline removals while the turn lasts; trees in a worker up to
        remove_workers; sweeps of the shared mount points up to
        remove_workers too, beside those, and one at a time per user:
        their length is the user's to choose (a child the user stops is
        killed after leftovers.SECONDS), so a user who stops theirs holds
        one place, never another user's sweep nor a removal."""
        if inline and not r.handed_over:
            return True
        if r.sweep is not None:
            return self._free["sweeps"] > 0 and r.sweep["uid"] not in self._sweeping
        return self._free["trees"] > 0

    def _remove_inline(self, r: _Removal, deadline: float) -> bool:
        """Remove r here, within the inline budget.  True when the attempt
        is over (removed, or failed and deferred); False when it paused for
        a waiting request (r.budget kept: it goes on at the next turn) or
        is too big (r.handed_over: a worker finishes it)."""
        if r.budget is None:            # a new attempt, not a paused one going on
            r.stats, r.started = safefs.RemoveStats(), time.monotonic()
        try:
            pfd = safefs.open_dir(r.parent)
        except OSError as e:
            self._done(r, {"error": describe(e)}, by="daemon")
            return True
        try:
            if r.user is None:
                r.user = jobdirs.owner_uid(pfd, r.name)
            image = jobdirs.lexists_at(pfd, f"{r.name}/{limitfs.LIMITED_FS}.img")
            if image:
                r.usage = False         # measured by statvfs at teardown; the walk sees one image file
            if image or names.NameMatcher(self.cfg.base_name).kept_trash(r.name):
                # limit=: one file as big as the job's data; a kept
                # directory: removed with its owner's credentials, by a
                # forked process.  Never inline.
                r.handed_over = True
                return False
            budget = r.budget or safefs.Budget(INLINE_ENTRIES, INLINE_BYTES, deadline, self.request_waiting)
            budget.deadline = deadline
            r.budget = None
            safefs.remove_tree(pfd, r.name, r.stats, budget)
            info = dict(r.stats.__dict__, user=r.user)
        except safefs.Paused:
            r.budget = budget
            return False
        except safefs.OverBudget:
            r.handed_over = True
            return False
        except Exception as e:      # noqa: BLE001 - as a worker reports it: logged, retried later
            info = {"error": describe(e)}
        finally:
            os.close(pfd)
        self._done(r, info, by="daemon")
        return True

    def _start_worker(self, r: _Removal) -> None:
        # An OSError from fork leaves the removal queued: tried again next turn.
        pid, rfd = forked.spawn(lambda wfd: self._worker(wfd, r))
        self._free["sweeps" if r.sweep is not None else "trees"] -= 1
        if r.sweep is not None:
            self._sweeping.add(r.sweep["uid"])
        if r.emptying is not None:
            os.close(r.emptying.pop("nsfd"))        # the worker has its own
        self._order.remove((r.parent, r.name))
        if not r.handed_over:
            r.stats = None
        r.started = time.monotonic()
        r.where, r.pid, r.report_fd = RUNNING, pid, rfd

    def _worker(self, wfd: int, r: _Removal) -> None:
        """In the forked worker (forked.spawn: it dies with its daemon, as it
        does on a SIGTERM stop; the next daemon finds the trash name and
        resumes the removal)."""
        code = 1
        try:
            self.close_in_worker()
            # Lowest priority: a big removal must not slow the jobs that
            # run meanwhile.
            try:
                os.nice(10)
            except OSError:
                pass
            if r.emptying is not None:
                if "nsfd" not in r.emptying:
                    raise RuntimeError("the job's namespace was let go before this attempt")
                stats = mountopts.empty_tmpfs(r.emptying["nsfd"], r.emptying["points"])
                os.write(wfd, json.dumps(dict(stats.__dict__, user=r.user)).encode()[:_REPORT_MAX])
                os._exit(0)
            if r.sweep is not None:
                args = {k: r.sweep[k] for k in ("points", "uid", "gid", "since", "until", "remove")}
                os.write(wfd, json.dumps(leftovers.sweep(**args)).encode()[:_REPORT_MAX])
                os._exit(0)
            pfd = safefs.open_dir(r.parent)
            owner = jobdirs.owner_name(pfd, r.name)
            # A limit= image still mounted (a sweep or retry after a
            # crash): removal never crosses it, so detach it first.
            try:
                limitfs.umount_limited_fs(r.parent, r.name)
            except OSError:
                pass
            image = jobdirs.lexists_at(pfd, f"{r.name}/{limitfs.LIMITED_FS}.img")
            if names.NameMatcher(self.cfg.base_name).kept_trash(r.name):
                stats = safefs.remove_as_owner(pfd, r.name)
            else:
                stats = safefs.remove_tree(pfd, r.name, sizes=self.cfg.count_bytes)
            os.write(wfd, json.dumps(dict(stats.__dict__, user=owner, image=image)).encode()[:_REPORT_MAX])
            code = 0
        except BaseException as e:
            try:
                os.write(wfd, json.dumps({"error": describe(e)}).encode()[:_REPORT_MAX])
            except OSError:
                pass
        finally:
            os._exit(code)

    def reap(self) -> None:
        """Collect finished workers (the loop wakes on SIGCHLD).  Each by
        its PID, never waitpid(-1): the daemon has other children (the
        namespace scripts, nsscripts.py) that are not ours to reap."""
        for r in [r for r in self._all.values() if r.where == RUNNING]:
            try:
                pid, status = os.waitpid(r.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = r.pid, -1
            if pid == 0:
                continue
            try:
                raw = os.read(r.report_fd, 65536)
            finally:
                os.close(r.report_fd)
                r.report_fd = -1
            try:
                info = json.loads(raw) if raw else {"error": f"worker died (status {status})"}
            except ValueError:
                info = {"error": "worker sent a bad report"}
            if r.handed_over and r.stats is not None and "files" in info:
                # What the inline attempt removed before handing over.
                for k in ("files", "dirs", "bytes"):
                    info[k] += getattr(r.stats, k)
                info["sized"] = info["sized"] and r.stats.sized
            self._done(r, info, by="worker")

    def _done(self, r: _Removal, info: dict, by: str) -> None:
        """Log, count and (on failure) schedule a retry of one removal."""
        ms = (time.monotonic() - r.started) * 1000
        if r.sweep is not None:
            self._sweep_done(r, info, ms)
            return
        if r.emptying is not None:
            self._emptying_done(r, info, ms)
            return
        job, user = jobdirs.job_of(self.cfg.base_name, r.name), info.get("user", r.user)
        # Bytes only when every removed file was measured (count_bytes=, or
        # removed inline, which measures them for its budget): a partial
        # sum in a log line or the counter would read as the job's usage.
        sized = {"bytes": info["bytes"]} if info.get("sized") else {}
        failed = "error" in info or info.get("failures") or info.get("mounts_skipped")
        if "error" in info:
            log.error(event("remove", "error", job, user, ms, dir=r.path, by=by, error=info["error"]))
            self.metrics.inc("privtmpd_removals_total", result="error")
        elif failed:
            log.error(event("remove", "incomplete", job, user, ms, dir=r.path, by=by, files=info["files"],
                            **sized, left=info["failures"], mounts_skipped=info["mounts_skipped"],
                            errors="; ".join(info["errors"][:5])))
            self.metrics.inc("privtmpd_removals_total", result="incomplete")
        else:
            log.info(event("remove", "ok", job, user, ms, dir=r.path, by=by, files=info["files"],
                           dirs=info["dirs"], **sized))
            self.metrics.inc("privtmpd_removals_total", result="ok")
        if r.usage and r.attempts == 0 and "files" in info and not info.get("image"):
            # The first attempt's counts are the job's; a retry only sees
            # what the first one left.
            extra = r.usage_extra or {"bytes": 0, "files": 0}
            log_usage(self.metrics, job, user, "removal", "partial" if failed else "ok",
                      info["files"] + extra["files"], info["dirs"], info["bytes"] + extra["bytes"] if sized else None)
        if "files" in info:
            self.metrics.inc("privtmpd_removed_files_total", info["files"])
            self.metrics.inc("privtmpd_removed_dirs_total", info["dirs"])
            if sized:
                self.metrics.inc("privtmpd_removed_bytes_total", info["bytes"])
            self.metrics.observe("privtmpd_remove_seconds", ms / 1000)
        key = (r.parent, r.name)
        if key in self._order:
            self._order.remove(key)
        r.stats, r.budget, r.handed_over, r.pid = None, None, False, 0
        if failed:
            self._defer(r, job)
        else:
            del self._all[key]

    def _sweep_done(self, r: _Removal, info: dict, ms: float) -> None:
        """The sweep is over: its line, then its record goes (a stop in
        between sweeps the same window again, which finds nothing more,
        rather than lose the line).  A record that cannot be removed (a
        read-only or failing /run) is logged: reap() must go on."""
        del self._all[(r.parent, r.name)]
        assert r.sweep is not None
        try:
            self._log_sweep(r, info, ms)
        finally:
            try:
                runstate.remove_sweep(self.cfg, r.sweep["job"], r.sweep["restart"])
            except OSError as e:
                log.error(event("leftovers", "record-not-removed", r.sweep["job"], r.user, error=describe(e),
                                note="the next start sweeps this window again"))

    def _log_sweep(self, r: _Removal, info: dict, ms: float) -> None:
        """One line when the sweep found something or failed; silence for
        the usual job that left nothing in the shared mount points."""
        assert r.sweep is not None
        job, remove = r.sweep["job"], r.sweep["remove"]
        if "error" in info:
            info = {"found": 0, "removed": 0, "names": [], "errors": [info["error"]]}
        if info.get("removed"):
            self.metrics.inc("privtmpd_leftovers_removed_total", info["removed"])
        if not (info.get("found") or info.get("errors")):
            return
        fields = dict(found=info["found"], names=",".join(info["names"]) + (",..." if info["found"] >
                                                                              len(info["names"]) else ""))
        if remove:
            fields["removed"] = info["removed"]
        if info.get("truncated"):
            fields["scanned"] = f"the first {leftovers.SCAN_MAX} entries of each mount point"
        if info.get("errors") or info.get("truncated"):
            log.error(event("leftovers", "incomplete", job, r.user, ms, **fields,
                            errors="; ".join(info.get("errors") or ["not every entry was looked at"]),
                            note="what stays is reported by privtmpctl doctor while the user has a job here"))
        elif remove:
            log.info(event("leftovers", "removed", job, r.user, ms, **fields,
                           note="written from the host's namespace (sbcast) during the job"))
        else:
            log.warning(event("leftovers", "found", job, r.user, ms, **fields,
                              note="host_leftovers=report: not removed; sbcast to $PRIVTMPD_HOST_TMP (sbcast=yes) "
                                   "lands in the job's /tmp"))

    def _emptying_done(self, r: _Removal, info: dict, ms: float) -> None:
        """A job's tmpfs= points emptied: logged like a removal when it
        removed something or failed (usually there was nothing: the job's
        processes are gone, and nobody held the tmpfs)."""
        del self._all[(r.parent, r.name)]
        assert r.emptying is not None
        job, where = r.emptying["job"], "tmpfs:" + ",".join(r.emptying["points"])
        if "error" in info or info.get("failures"):
            log.error(event("remove", "incomplete", job, r.user, ms, dir=where, by="worker",
                            files=info.get("files", 0), errors="; ".join(info.get("errors", [info.get("error", "")])[:5]),
                            note="a process outside the job holds the tmpfs; it is freed when that process lets go"))
            self.metrics.inc("privtmpd_removals_total", result="incomplete")
        elif info.get("files") or info.get("dirs"):
            log.warning(event("remove", "ok", job, r.user, ms, dir=where, by="worker", files=info["files"],
                              dirs=info["dirs"], note="the job's tmpfs was held open from outside the job: emptied"))
            self.metrics.inc("privtmpd_removals_total", result="ok")

    def _defer(self, r: _Removal, job) -> None:
        """A removal failed (an I/O error, a busy or immutable entry): try
        again later rather than leave the tree until the next restart."""
        r.attempts += 1
        if r.attempts > REMOVE_RETRIES or not os.path.lexists(r.path):
            del self._all[(r.parent, r.name)]
            if r.attempts > REMOVE_RETRIES:
                log.error(event("remove", "given-up", job, dir=r.path, attempts=r.attempts,
                                note="retried at the next start, or: privtmpctl cleanup --orphans"))
            return
        delay = REMOVE_RETRY_DELAY * 2 ** (r.attempts - 1)
        r.where, r.due = DEFERRED, time.monotonic() + delay
        log.warning(event("remove", "retry-scheduled", job, dir=r.path, attempt=r.attempts, in_s=delay))

    def kill_workers(self) -> None:
        """Fast stop: workers die now; their trash names stay on disk and
        the next start resumes them."""
        running = [r for r in self._all.values() if r.where == RUNNING]
        for r in running:
            try:
                os.kill(r.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for r in running:
            try:
                os.waitpid(r.pid, 0)
            except ChildProcessError:
                pass
            os.close(r.report_fd)
            r.report_fd, r.where = -1, QUEUED


def log_usage(metrics, job, user, source, result, files, dirs=None, nbytes=None):
    """One op=usage line per job at teardown, and the job size histograms.
    nbytes None: not measured (bytes=- in the line, no bytes observation):
    a partial sum would read as the job's usage."""
    log.info(event("usage", result, job, user, bytes=nbytes, files=files, dirs=dirs, source=source))
    metrics.observe("privtmpd_job_files", files)
    if nbytes is not None:
        metrics.observe("privtmpd_job_bytes", nbytes)

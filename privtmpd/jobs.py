"""The job lifecycle on one node: create, destroy, reconcile after a
restart, sweep the base, cleanup on an admin's request.

Lifecycle of job J (restart count R), all done by the daemon's main thread
in the host mount namespace, one request at a time:

  create   1. record state "creating" in <rundir>/jobs/J.json (runstate)
           2. build $base.J.R/<mount dirs> (safefs: fd-relative, no
              symlinks), or a limit= image holding them (limitfs)
           3. build the namespace with the directories bound over the
              mount points, pin it on <rundir>/ns/J (namespace, runstate)
           4. ns_script= (nsscripts): run in the namespace; the reply waits
              for it without holding other requests up
           5. record state "ready" with the pinned namespace's identity
  destroy  ns_epilog= (nsscripts) in the namespace, reply deferred likewise;
           log the job's usage where one statvfs tells it (limit=);
           kill what is left in the namespace (proc), unpin, rename
           $base.J.* to trash names (jobdirs, O(1)); the trees are removed
           after the reply (removal).

This module is the only place that decides what is live and what is ours;
those decisions are the plain functions at the top, testable without root.
Nothing lives only in memory: the run directory and the base directory are
the state, and reconcile() makes them agree after a restart, a crash or a
reboot.
"""

import logging
import os
import time
from typing import Dict, List, Optional, Tuple

from . import hostpath, jobdirs, leftovers, limitfs, mountopts, names, namespace, nsscripts, proc, protocol, removal, runstate, safefs
from .logfmt import describe, event

log = logging.getLogger("privtmpd")


# --- decisions (pure) ------------------------------------------------------

def is_live(state: Optional[dict], ident) -> bool:
    """A job is live only if its state says ready and its pin still holds
    the very namespace recorded at creation (namespace ids are reused, so
    (dev, ino) of the pin is compared with the state, never trusted alone)."""
    return bool(state and state.get("state") == runstate.STATE_READY and ident and list(ident) == state.get("ns"))


def is_duplicate_create(state: Optional[dict], ident, restart: int, uid: int, gid: int) -> bool:
    """Same job, run, owner and pinned namespace: a duplicate Prolog.  A
    namespace left by an earlier job with this id (missed Epilog, then job
    ids wrapped) must never go to another user."""
    return bool(state and is_live(state, ident) and state.get("restart") == restart
                and state.get("uid") == uid and state.get("gid") == gid)


def runs_to_tear_down(state: dict, restart_hint: Optional[int]) -> List[int]:
    """Restart counts whose directories a destroy looks for.  The count the
    Epilog sees may already be the next run's (Slurm 22.05 requeue), so the
    state's count, the hinted one and the one before it."""
    runs = set()
    if isinstance(state.get("restart"), int):
        runs.add(state["restart"])
    if restart_hint is not None:
        runs.update({restart_hint, max(restart_hint - 1, 0)})
    return sorted(runs)


def sweep_reason(entry: jobdirs.Entry, live: Dict[int, Optional[dict]], busy: set) -> Optional[str]:
    """Why an entry of ours in the base must go, or None to leave it: a job
    directory with no live job of that run, trash of an interrupted removal,
    a temporary name of an interrupted start.  live maps job -> state (None:
    in use, keep every run).  busy: names already being removed."""
    if entry.kind == "job":
        if entry.job not in live:
            return f"no live namespace for job {entry.job}"
        st = live[entry.job]
        if st is None or st.get("restart") == entry.restart:
            return None
        return f"job {entry.job} is running as restart {st.get('restart')}, this is run {entry.restart}"
    if entry.name in busy:
        return None
    if entry.kind in ("trash", "kept-trash"):
        return "interrupted removal"
    if entry.kind == "temporary":
        return "left by an interrupted job start"
    return None


def user_of(state: Optional[dict]):
    """The job's user for log lines: the name Slurm gave, else the uid."""
    state = state or {}
    return state.get("user") or state.get("uid")


def request_user(cfg, op, fields):
    """The job's user for the log line of a request that failed before its
    handler could say (the handlers return it with their reply)."""
    if op == "create":
        return fields.get("user") or fields.get("uid")
    if isinstance(fields.get("job"), int):
        return user_of(runstate.read_state(cfg, fields["job"]))
    return None


# --- create and destroy ----------------------------------------------------

def create(cfg, job, restart, uid, gid, user="", on_trash=None, timeout=30.0, limit=None, ready=True):
    """Build and pin job's namespace.  Returns the state dict.  ready=False
    leaves the state "creating" (ns_script runs before the job is ready).

    limit: bytes of the job's limit= filesystem (default cfg.limit).
    on_trash(parent, name) receives directories to remove in the background
    (a leftover of ours found at the job path)."""
    plan = [(m, sub) for m, sub in cfg.mount_plan() if not cfg.tmpfs_size(m)]     # tmpfs=: no directory
    dname = names.job_dir_name(cfg.base_name, job, restart)
    dpath = f"{cfg.base_parent}/{dname}"
    state = {"job": job, "restart": restart, "uid": uid, "gid": gid, "user": user,
             "dir": dpath, "mounts": sorted(cfg.mounts), "shm": cfg.shm,
             "created": time.time(), "state": runstate.STATE_CREATING}
    if cfg.tmpfs:
        state["tmpfs"] = dict(cfg.tmpfs)
    limit = cfg.limit if limit is None else limit
    if limit:
        state["limit"] = limit
    runstate.write_state(cfg, job, state)
    with jobdirs.parent_fd(cfg) as pfd:
        placement = safefs.create_job_dir(pfd, dname, [] if limit else [sub for _, sub in plan],
                                          uid, gid, cfg.mode)
        if placement.displaced_ours and on_trash:
            on_trash(cfg.base_parent, placement.displaced_name)
    state["displaced"] = placement.displaced
    if cfg.sbcast:
        state["sbcast_tmp"] = list(placement.subdirs["tmp"])
    top = dpath
    if limit:
        top = f"{dpath}/{limitfs.LIMITED_FS}"
        placement.subdirs, state["reserved"] = limitfs.make_limited_fs(cfg, dpath, [sub for _, sub in plan],
                                                                       uid, gid, limit)
        # What an empty filesystem already uses (ext4's metadata, our
        # directories): subtracted from the job's usage at teardown.
        state["fs_base"] = list(limitfs.limited_fs_counts(dpath) or (0, 0))
    binds = [(m, f"{top}/{sub}", *placement.subdirs[sub], mountopts.extra_flags(cfg, m)) for m, sub in plan]
    namespace.build_and_pin(cfg, job, binds, timeout)
    state["ns"] = list(runstate.pin_identity(cfg, job))
    if ready:
        open_for_sbcast(cfg, state)
        state["state"] = runstate.STATE_READY
    runstate.write_state(cfg, job, state)
    return state


def open_for_sbcast(cfg, state):
    """sbcast=yes: the job's user reaches $base.J.R/tmp from the host from
    now on.  Only once the job is ready: after the namespace is built (a
    mount the user put on the path meanwhile cannot fail the Prolog) and
    after ns_script= (which must not find the user's links in the job's
    /tmp).  Teardown closes it again and removes it with the owner's rights
    (jobdirs.trash_if_ours)."""
    if cfg.sbcast and isinstance(state.get("sbcast_tmp"), list):
        with jobdirs.parent_fd(cfg) as pfd:
            hostpath.open_top_to_owner(pfd, os.path.basename(state["dir"]), state["sbcast_tmp"])


def destroy(cfg, job, restart_hint=None, on_trash=None, keep_until=None, exit_code=0, on_tmpfs=None,
            state=None):
    """Tear down whatever job has on this node.  Idempotent: no pin and no
    directory is success.  Returns a dict describing what was done.

    The directory comes from the state file, and other runs' directories
    are looked for too (runs_to_tear_down).  keep_until (Unix time): keep
    the directories under their kept name (keep_failed=) instead.
    on_tmpfs(nsfd, mount points): handed an fd on the job's namespace,
    opened before the unpin, to empty its tmpfs= points (the callee owns
    the fd).  state: the job's state file, if the caller has read it."""
    info = {"job": job, "killed": [], "cgroups": [], "unpinned": False, "dirs": [], "kept": [],
            "keep_errors": [], "usage": None}
    if state is None:
        state = runstate.read_state(cfg, job) or {}
    ns_id = runstate.pin_identity(cfg, job)
    if ns_id and isinstance(state.get("ns"), list) and list(ns_id) != state["ns"]:
        # The pin was replaced by hand with some other namespace: never
        # kill into a namespace that is not the job's.
        ns_id = None
    subdirs = []
    if isinstance(state.get("dir"), str) and isinstance(state.get("mounts"), list):
        top = f"{state['dir']}/{limitfs.LIMITED_FS}" if state.get("limit") else state["dir"]
        subdirs = [f"{top}/{names.mount_dirname(m)}" for m in state["mounts"]
                   if isinstance(m, str) and not mountopts.is_tmpfs_state(state, m)]
    tmpfs_points = [m for m in state.get("mounts") or () if mountopts.is_tmpfs_state(state, m)]
    marks = mountopts.tmpfs_marks(job) if tmpfs_points else ()
    if ns_id or ((subdirs or marks) and state.get("state") == runstate.STATE_READY):
        # Without a pin (unmounted by someone), the job's namespace lives on
        # as long as a process is in it: those are found by the job's
        # directories, or its tmpfs mounts, mounted in their namespace.
        target = ns_id or (os.stat("/proc/self/ns/mnt").st_dev, 0)
        uid = state.get("uid") if type(state.get("uid")) is int else None
        try:
            info["killed"] = proc.kill_processes_in(
                target, cfg.kill_timeout, subdirs, uid, job,
                on_cgroup=lambda cg, n: info["cgroups"].append(f"{cg[1]} ({n})"), marks=marks)
        except proc.StillRunning as e:
            raise namespace.NamespaceError(str(e)) from None
    tmpfs = None
    nsfd = mountopts.open_namespace(names.pin_path(cfg.rundir, job)) if tmpfs_points and ns_id else None
    if nsfd is not None:
        try:
            # Their usage is one statvfs each, read from inside the
            # namespace now that its processes are gone and before the
            # unpin frees it: the tmpfs lives nowhere else.
            tmpfs = mountopts.tmpfs_totals(mountopts.tmpfs_usage([(nsfd, tmpfs_points)])[0])
            if on_tmpfs:
                # A process of the user's outside the job (an ssh session,
                # a task of their other job) may hold a directory of the
                # tmpfs open through /proc/<task>/root: then the unpin does
                # not free it, and its files would outlive the job.  A
                # worker empties it from inside the namespace, which the fd
                # keeps alive.
                on_tmpfs(nsfd, tmpfs_points)
                nsfd = None         # the worker's now
        finally:
            if nsfd is not None:
                os.close(nsfd)
    if os.path.lexists(names.pin_path(cfg.rundir, job)):
        runstate.unpin(cfg, job)
        info["unpinned"] = True
    if state.get("limit") and isinstance(state.get("dir"), str):
        # The job's own filesystem: its usage is one statvfs, now, while
        # it is still mounted on the host side.
        counts = limitfs.limited_fs_counts(state["dir"])
        if counts:
            base = state.get("fs_base")
            if not (isinstance(base, list) and len(base) == 2 and all(type(n) is int for n in base)):
                base = [0, 0]
            info["usage"] = {"bytes": max(counts[0] - base[0], 0), "files": max(counts[1] - base[1], 0)}
            if tmpfs:
                info["usage"] = {k: info["usage"][k] + tmpfs[k] for k in ("bytes", "files")}
    with jobdirs.parent_fd(cfg) as pfd:
        for r in runs_to_tear_down(state, restart_hint):
            dname = names.job_dir_name(cfg.base_name, job, r)
            if keep_until and safefs.is_ours(pfd, dname):
                kname, why = jobdirs.keep_if_ours(pfd, cfg, dname, job, r, keep_until, exit_code)
                if kname:
                    info["kept"].append(f"{cfg.base_parent}/{kname}")
                    continue
                info["keep_errors"].append(f"{dname}: {why}")
            tname = jobdirs.trash_if_ours(pfd, cfg, dname, job, r)
            if tname:
                info["dirs"].append(dname)
                if on_trash:
                    # Without a statvfs, the removal's walk gives the usage
                    # (plus the tmpfs= points', once: the first directory).
                    on_trash(cfg.base_parent, tname, usage_ok=info["usage"] is None,
                             usage_extra=None if info["dirs"][1:] else tmpfs)
    if tmpfs and not info["dirs"] and not info["kept"] and info["usage"] is None:
        info["usage"] = tmpfs           # every mount point a tmpfs=
    runstate.remove_state(cfg, job)
    return info


# --- the daemon's side -----------------------------------------------------

class Jobs:
    """The lifecycle as the daemon runs it: each request handler returns
    (reply bytes, the job's user for the request's log line)."""

    def __init__(self, cfg, removals, kept, metrics):
        self.cfg = cfg
        self.removals = removals
        self.kept = kept
        self.metrics = metrics
        self.scripts: Dict[int, nsscripts.ScriptRun] = {}   # job -> its ns_script or ns_epilog running

    def _trash_for(self, user, usage=True):
        """on_trash for create/destroy.  usage=False for directories that
        are not a job's final state (a rolled-back create's, empty)."""
        return lambda parent, name, usage_ok=False, usage_extra=None, **_: self.removals.queue(
            parent, name, user, usage=usage and usage_ok, usage_extra=usage_extra)

    def _empty_tmpfs_for(self, job, user):
        """on_tmpfs for destroy: a worker empties the tmpfs= points."""
        return lambda nsfd, points: self.removals.queue_emptying(job, user, nsfd, points)

    def _cancel_script(self, job, reason):
        run = self.scripts.pop(job, None)
        if run is not None:
            run.cancel(reason)

    # --- requests --------------------------------------------------------

    def create(self, f):
        """(reply, user), or the ScriptRun of ns_script= the reply waits for."""
        cfg, job, restart = self.cfg, f["job"], f["restart"]
        user = f.get("user") or f["uid"]
        on_trash = self._trash_for(user, usage=False)
        pending = self.scripts.get(job)
        if pending is not None:
            if (pending.kind == nsscripts.INIT and pending.env["SLURM_JOB_RESTART_COUNT"] == str(restart)
                    and pending.env["SLURM_JOB_UID"] == str(f["uid"])
                    and pending.env["SLURM_JOB_GID"] == str(f["gid"])):
                return pending      # a duplicate Prolog waits for the same script
            self._cancel_script(job, f"a create for run {restart} of the job came")
        st = runstate.read_state(cfg, job)
        ident = runstate.pin_identity(cfg, job)
        if is_duplicate_create(st, ident, restart, f["uid"], f["gid"]):
            return protocol.ok(job=job, dir=st["dir"], existing=True), user
        if st or ident or os.path.lexists(names.pin_path(cfg.rundir, job)):
            # A previous run of this job (requeue without Epilog here, or a
            # half-made attempt): start from nothing.
            destroy(cfg, job, restart_hint=restart, on_trash=self._trash_for(user), on_tmpfs=self._empty_tmpfs_for(job, user))
        try:
            st = create(cfg, job, restart, f["uid"], f["gid"], f.get("user", ""), on_trash=on_trash,
                        limit=self.job_limit(job, f.get("slurm_conf"), user), ready=not cfg.ns_script)
            if cfg.ns_script:
                run = nsscripts.ScriptRun(cfg, nsscripts.INIT, job, user, nsscripts.environment(cfg, nsscripts.INIT, st),
                                          on_done=lambda run: self._init_done(run, st, user))
        except BaseException:
            # No partial state: roll back pin, state and directories.
            try:
                destroy(cfg, job, restart_hint=restart, on_trash=on_trash)
            except Exception as e2:   # noqa: BLE001 - report the first error, log this one
                log.error(event("create-rollback", "error", job, user, error=describe(e2)))
            raise
        if st.get("displaced"):
            log.warning(event("create", "displaced", job, user, found=st["displaced"]))
        if cfg.limit_reserve and st.get("limit") and not st.get("reserved"):
            log.warning(event("create", "not-reserved", job, user, limit=st["limit"],
                              dir=st["dir"], note="the disk could not hold the whole image: it is "
                              "sparse, and the job may get EIO before its limit if the disk fills up"))
        if cfg.ns_script:
            self.scripts[job] = run
            return run
        return protocol.ok(job=job, dir=st["dir"], existing=False), user

    def _init_done(self, run: nsscripts.ScriptRun, st, user) -> Tuple[bytes, object]:
        """ns_script is over: the job is ready, or (on_script_error=fail)
        rolled back and the Prolog fails, which drains the node."""
        cfg, job = self.cfg, run.job
        if self.scripts.get(job) is run:
            del self.scripts[job]
        if run.cancelled:
            # Whoever cancelled it (the job's Epilog, a new create, cleanup,
            # the daemon stopping) deals with the namespace.
            return protocol.error(f"job {job}: its ns_script was {run.describe()}", "busy"), user
        # Another job's teardown may have carried leftovers_since into the
        # state file while the script ran (leftovers.carry_since): st is
        # the copy from before.
        leftovers.carry_since(st, leftovers.since_of(runstate.read_state(cfg, job) or {}))
        if not run.succeeded and cfg.on_script_error == "fail":
            try:
                destroy(cfg, job, restart_hint=st["restart"], on_trash=self._trash_for(user, usage=False))
                # The files of the window carried into this job are swept
                # as at any teardown (or carried on).
                self._sweep_leftovers(job, user, st)
            except Exception as e:  # noqa: BLE001 - report the script's failure, log this one
                log.error(event("create-rollback", "error", job, user, error=describe(e)))
            return protocol.error(f"ns_script {run.path} {run.describe()} (its output is in privtmpd's log); "
                                  f"the job's namespace was removed (on_script_error=fail)"), user
        if not run.succeeded:
            log.warning(event("create", "script-error-ignored", job, user, status=run.describe(),
                              note="on_script_error=log: the job starts anyway"))
        if list(runstate.pin_identity(cfg, job) or ()) != st["ns"]:
            raise namespace.NamespaceError(f"job {job}: its namespace pin went away while ns_script ran")
        open_for_sbcast(cfg, st)
        st["state"] = runstate.STATE_READY
        runstate.write_state(cfg, job, st)
        return protocol.ok(job=job, dir=st["dir"], existing=False), user

    def destroy(self, f):
        """(reply, user), or the ScriptRun of ns_epilog= the reply waits for."""
        cfg, job = self.cfg, f["job"]
        st = runstate.read_state(cfg, job)
        user = user_of(st)
        pending = self.scripts.get(job)
        if pending is not None:
            if pending.kind == nsscripts.EPILOG:
                return pending      # the Epilog again (a retry): waits for the same teardown
            # The job ended before ns_script did (cancelled, or the Prolog
            # failed elsewhere): no ns_epilog for a job that never was ready.
            self._cancel_script(job, "the job's Epilog came first")
        elif cfg.ns_epilog and is_live(st, runstate.pin_identity(cfg, job)):
            code = f.get("exit_code")
            try:
                run = nsscripts.ScriptRun(cfg, nsscripts.EPILOG, job, user,
                                          nsscripts.environment(cfg, nsscripts.EPILOG, st, code),
                                          on_done=lambda run: self._epilog_done(run, f, user))
            except Exception as e:  # noqa: BLE001 - teardown goes on without the script
                log.error(event(nsscripts.EPILOG, "error", job, user, error=describe(e),
                                note="the job is torn down without it"))
            else:
                self.scripts[job] = run
                return run
        return self._teardown(f, user)

    def _epilog_done(self, run: nsscripts.ScriptRun, f, user) -> Tuple[bytes, object]:
        """ns_epilog is over, however it ended: tear down.  Its failure is
        logged, never the Epilog's: the teardown does not depend on it, and
        a failed Epilog would drain the node for nothing."""
        if self.scripts.get(run.job) is run:
            del self.scripts[run.job]
        return self._teardown(f, user)

    def _teardown(self, f, user) -> Tuple[bytes, object]:
        cfg, job = self.cfg, f["job"]
        code = f.get("exit_code", 0)
        keep = time.time() + cfg.keep_failed if cfg.keep_failed and code else None
        state = runstate.read_state(cfg, job) or {}
        info = destroy(cfg, job, restart_hint=f.get("restart"), on_trash=self._trash_for(user),
                       keep_until=keep, exit_code=code, on_tmpfs=self._empty_tmpfs_for(job, user),
                       state=state)
        self._sweep_leftovers(job, user, state)
        if keep and cfg.tmpfs:
            # A tmpfs= point lives only in the job's namespace, gone with it.
            log.info(event("destroy", "not-kept-tmpfs", job, user, exit_code=code,
                           mounts=",".join(m for m, _ in cfg.tmpfs),
                           note="tmpfs= mount points are freed with the namespace and cannot be kept"))
        if info["usage"]:
            removal.log_usage(self.metrics, job, user, "statvfs", "ok", info["usage"]["files"],
                              nbytes=info["usage"]["bytes"])
        for why in info["keep_errors"]:
            log.warning(event("destroy", "not-kept", job, user, exit_code=code, error=why, note="removed instead"))
        if info["kept"]:
            log.info(event("destroy", "kept", job, user, exit_code=code, dirs=",".join(info["kept"]),
                           until=time.ctime(keep)))
            self.kept.check_soon()      # keep_max: measured after this reply, not before
        if info["killed"] or info["cgroups"]:
            log.warning(event("destroy", "killed", job, user, count=len(info["killed"]),
                              pids=",".join(map(str, info["killed"][:50])),
                              **({"cgroups": ",".join(info["cgroups"])} if info["cgroups"] else {})))
        return protocol.ok(**info), user

    def _sweep_leftovers(self, job, user, state) -> None:
        """The files job's user left in the node's shared mount points
        during the job (leftovers.py): swept by a worker after the reply,
        or carried along to the user's other jobs on this node."""
        cfg = self.cfg
        since = leftovers.window_start(state)
        if since is None:
            return
        # Nothing was created in a mount point whose mtime is older than the
        # window (one statx each): then there is nothing to sweep, nor to
        # carry to the user's other jobs, and no state file is read.
        points = [p for p in leftovers.shared_points(cfg) if leftovers.changed_since(p, since)]
        if not points:
            return
        try:
            others = runstate.all_states(cfg)
        except OSError:
            return
        later = leftovers.same_user_jobs(job, state, others)
        for other in later:
            st = others[other]
            if st is not None and leftovers.carry_since(st, since + leftovers.CLOCK_SLACK):
                if runstate.read_state(cfg, other) is not None:     # not torn down meanwhile
                    runstate.write_state(cfg, other, st)
        if not later:
            self.removals.queue_sweep(job, state.get("restart", 0), user, dict(
                points=points, uid=state["uid"],
                gid=state["gid"] if type(state.get("gid")) is int else state["uid"],
                since=since, until=time.time(), remove=cfg.host_leftovers == leftovers.REMOVE))

    def listing(self, f, show=False) -> Tuple[bytes, object]:
        """list, or show one job: states, pins, processes, kept directories
        and removals."""
        cfg, jobs, tmpfs_ns = self.cfg, [], []
        try:
            for job, st in sorted(runstate.all_states(cfg).items()):
                if show and job != f["job"]:
                    continue
                st = dict(st or {"job": job, "state": "unreadable"})
                ident = runstate.pin_identity(cfg, job)
                st["pinned"] = bool(ident)
                st["processes"] = proc.processes_in(ident) if ident else []
                if job in self.scripts:
                    st["script"] = self.scripts[job].kind
                if st.get("limit") and isinstance(st.get("dir"), str):
                    st["used"] = (limitfs.limited_fs_usage(st["dir"]) or (None,))[0]
                if isinstance(st.get("tmpfs"), dict) and ident:
                    # Held until the probe below, and closed whatever
                    # fails before it: each fd keeps a job's namespace,
                    # and its tmpfs, alive after the job's unpin.
                    nsfd = mountopts.open_namespace(names.pin_path(cfg.rundir, job))
                    if nsfd is not None:
                        tmpfs_ns.append((st, nsfd, list(st["tmpfs"])))
                jobs.append(st)
            # One forked probe for all jobs with tmpfs= points, one time limit.
            usage = mountopts.tmpfs_usage([(nsfd, points) for _, nsfd, points in tmpfs_ns])
            for (st, _, _), used in zip(tmpfs_ns, usage):
                st["tmpfs_used"] = used
        finally:
            for _, nsfd, _ in tmpfs_ns:
                os.close(nsfd)
        if show and not jobs:
            return protocol.error(f"no job {f['job']} on this node", "not-found"), None
        kept = [dict(k, bytes=self.kept.size_of(k["name"])) for k in jobdirs.kept_dirs(cfg)]
        extra = {"kept": kept, "keep_max": cfg.keep_max} if kept or cfg.keep_failed else {}
        return protocol.ok(jobs=jobs, **extra, removals=self.removals.paths()), \
            user_of(jobs[0]) if show else None

    def job_limit(self, job, slurm_conf, user=None):
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
            log.warning(event("limit", result, job, user, limit=size, error=note))
        return size

    # --- start-up and orphans ----------------------------------------------

    def reconcile(self) -> Dict[int, dict]:
        """Make the run directory and the base directory agree.

        A job survives only if it is live (is_live).  Anything else - a
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
            if is_live(st, ident):
                live[job] = st
                continue
            log.warning(event("recover", "rollback", job, user_of(st), state=(st or {}).get("state", "unreadable"),
                              pin="live" if ident else "none"))
            destroy(cfg, job, on_trash=self._trash_for(user_of(st)), on_tmpfs=self._empty_tmpfs_for(job, user_of(st)))
        for pin in runstate.list_pins(cfg):
            if pin not in live:
                log.warning(event("recover", "unpin-orphan", pin))
                runstate.unpin(cfg, pin)
        self.sweep(live)
        self.kept.check()
        self.metrics.set_active(len(live))
        log.info(event("recover", "ok", ms=(time.monotonic() - t0) * 1000, live_jobs=len(live),
                       queued_removals=self.removals.count()))
        return live

    def sweep(self, live, dry_run=False) -> List[dict]:
        """Queue for removal every entry of ours in the base that no live
        job owns (sweep_reason).  Returns [{"path", "job", "reason"}]; with
        dry_run only says what it would do."""
        cfg = self.cfg
        busy = self.removals.names()
        found = []
        entries = jobdirs.scan(cfg, ("job", "trash", "kept-trash", "temporary"))
        with jobdirs.parent_fd(cfg) as pfd:
            for e in entries:
                why = sweep_reason(e, live, busy)
                if why is None:
                    continue
                item = {"path": f"{cfg.base_parent}/{e.name}", "job": e.job, "reason": why}
                if dry_run:
                    found.append(item)
                elif e.kind != "job":
                    self.removals.queue(cfg.base_parent, e.name)
                    found.append(item)
                elif self._trash_job_dir(pfd, e):
                    log.info(event("sweep", "orphan-queued", e.job, dir=item["path"], reason=why))
                    self.metrics.inc("privtmpd_orphans_swept_total")
                    found.append(item)
        return found

    def _trash_job_dir(self, pfd, e: jobdirs.Entry) -> bool:
        assert e.kind == "job" and e.job is not None and e.restart is not None
        tname = jobdirs.trash_if_ours(pfd, self.cfg, e.name, e.job, e.restart)
        if tname:
            self.removals.queue(self.cfg.base_parent, tname)
        return bool(tname)

    def _orphan_item(self, job, user, state, ident, dirs, reason):
        return {"job": job, "user": user, "state": state, "pinned": bool(ident),
                "processes": proc.processes_in(ident) if ident else [],
                "dirs": [f"{self.cfg.base_parent}/{d}" for d in dirs], "reason": reason}

    def cleanup(self, f) -> Tuple[bytes, object]:
        """`privtmpctl cleanup`.  Whether a Slurm job is over cannot be known
        here, so a live job is only torn down when named (the admin knows).
        Without a job: what no live job owns - state or pins without a live
        namespace, job directories without a live job, interrupted removals -
        by the rules of start-up.  The reply says what and why; with dry_run
        nothing changes."""
        cfg, job, dry_run = self.cfg, f.get("job"), f.get("dry_run", False)
        jobs: List[dict] = []
        skipped: List[dict] = []
        user = None
        live: Dict[int, Optional[dict]] = {}
        if job is not None:
            if not dry_run:
                self._cancel_script(job, "privtmpctl cleanup named the job")
            st = runstate.read_state(cfg, job)
            ident = runstate.pin_identity(cfg, job)
            dirs = jobdirs.job_dirs(cfg, job)
            user = user_of(st)
            if st or ident or os.path.lexists(names.pin_path(cfg.rundir, job)) or dirs:
                jobs.append(self._orphan_item(job, user, (st or {}).get("state"), ident, dirs,
                                              "named by the administrator"))
        else:
            states = runstate.all_states(cfg)
            for j, st in states.items():
                ident = runstate.pin_identity(cfg, j)
                if is_live(st, ident) or j in self.scripts:
                    # A script's job is being made or torn down right now.
                    live[j] = st
                    continue
                state = (st or {}).get("state", "unreadable")
                item = self._orphan_item(j, user_of(st), state, ident, jobdirs.job_dirs(cfg, j),
                                         f"state {state!r} without its live namespace")
                (skipped if item["processes"] else jobs).append(item)
            for pin in runstate.list_pins(cfg):
                if pin not in states and isinstance(pin, int) and pin not in self.scripts:
                    item = self._orphan_item(pin, None, None, runstate.pin_identity(cfg, pin), [],
                                             "pin without a state file")
                    (skipped if item["processes"] else jobs).append(item)
            for item in skipped:
                item["reason"] += f"; processes {item['processes']} still inside: privtmpctl cleanup {item['job']}"
                live[item["job"]] = None    # in use: the sweep below keeps all its directories
        if not dry_run:
            for item in jobs:
                info = destroy(cfg, item["job"], on_trash=self._trash_for(item["user"]))
                # Directories of other runs of a named job, not in its state.
                entries = jobdirs.scan(cfg, ("job",), item["job"])
                with jobdirs.parent_fd(cfg) as pfd:
                    for e in entries:
                        self._trash_job_dir(pfd, e)
                item["killed"] = info["killed"]
                log.warning(event("teardown", "ok", item["job"], item["user"], reason=item["reason"],
                                  killed=",".join(map(str, info["killed"])), dirs=",".join(item["dirs"])))
            self.metrics.set_active(len(runstate.list_pins(cfg)))
        orphans = [] if job is not None else self.sweep(live, dry_run)
        return protocol.ok(dry_run=dry_run, jobs=jobs, orphans=orphans, skipped=skipped), user

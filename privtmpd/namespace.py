"""Create, pin, verify and destroy one job's mount namespace.

Lifecycle of job J (restart count R), all done by the daemon's main thread
in the host mount namespace, one request at a time:

  create   1. build $base.J.R/<mount dirs> (safefs: fd-relative, no symlinks)
           2. record state "creating" in <rundir>/jobs/J.json
           3. start a thread; it unshares its mount namespace, makes /
              rslave, bind-mounts the job's directories over the mount
              points, opens its /proc/thread-self/ns/mnt and ends
           4. bind-mount that fd's namespace onto <rundir>/ns/J (the pin),
              record state "ready"
  destroy  kill what is left in the namespace, unpin, rename $base.J.* out
           of the way (O(1)); the daemon removes the renamed trees later.

The pin keeps the namespace alive with no process in it (runstate).
"""

import errno
import os
import threading
import time

from . import hostpath, kernel, limitfs, mountopts, names, proc, runstate, safefs
from .kernel import KernelError


class NamespaceError(Exception):
    """Creating or entering a namespace failed; message is for the admin."""


# --- create --------------------------------------------------------------

def _build_and_pin(cfg, job, binds, timeout):
    """Build the job's namespace and pin it, on another CPU if the kernel
    refuses the pin.

    The kernel binds a mount namespace file only if that namespace is newer
    than the caller's (the loop check compares namespace ids).  On recent
    kernels (seen on 6.18) those ids come from per-CPU batches, so a
    namespace made now on one CPU may have a smaller id than an older one
    made on another.  In the
    initial namespace (the oldest) that never matters; a daemon in a
    container's or a test node's mount namespace gets EINVAL for a
    namespace built on the wrong CPU (10-16 of 20 concurrent creates).  Ids
    only grow on each CPU, so building once on each allowed CPU in turn
    reaches the one where the daemon's own namespace was made."""
    cpus = sorted(os.sched_getaffinity(0))
    for cpu in [None] + cpus:
        nsfd = build_namespace(binds, cfg.shm, timeout, cpu, tmpfs=mountopts.tmpfs_plan(cfg))
        try:
            runstate.pin(cfg, job, nsfd)
            return
        except KernelError as e:
            if e.errno != errno.EINVAL or cpu == cpus[-1]:
                raise
            runstate.unpin(cfg, job)
        finally:
            os.close(nsfd)

def _mount_flags_of(fd):
    """Per-mount flags of the mount the source lives on, so a bind of a
    directory from a noexec or read-only filesystem does not gain exec or
    write; nosuid and nodev are always added."""
    f = os.statvfs(f"/proc/self/fd/{fd}").f_flag
    flags = kernel.MS_NOSUID | kernel.MS_NODEV
    for st_bit, ms_bit in ((os.ST_RDONLY, kernel.MS_RDONLY), (os.ST_NOEXEC, kernel.MS_NOEXEC),
                           (os.ST_NOATIME, kernel.MS_NOATIME), (os.ST_NODIRATIME, kernel.MS_NODIRATIME),
                           (os.ST_RELATIME, kernel.MS_RELATIME)):
        if f & st_bit:
            flags |= ms_bit
    return flags


def _setup_in(binds, shm, opened, tmpfs=()):
    """Runs in the namespace thread: unshare, rslave, bind, remount, mount
    the tmpfs= points.  Every fd it opens is appended to `opened` (the fd
    table is the daemon's).  binds: (target, source path, dev, ino[, extra
    MS_* flags]); tmpfs: (target, mount data, extra MS_* flags)."""
    # The thread shares the daemon's fd table and memory but not, after
    # this, its mount namespace or fs_struct (CLONE_NEWNS implies CLONE_FS;
    # only CLONE_VM/SIGHAND/THREAD/NEWUSER are refused to threads).  The
    # daemon's main thread stays in the host namespace throughout.
    kernel.unshare(kernel.CLONE_NEWNS)
    # rslave: host mounts made later (autofs, NFS) still reach the job, and
    # nothing mounted here propagates back to the host.  Never touch the
    # host's own propagation.
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_SLAVE)
    # Open every source and target first: mounting over /tmp hides a base
    # under /tmp, so the order of mount= must not matter.
    pairs = []
    for target, src_path, dev, ino, *extra in binds:
        src = safefs.open_verified(src_path, dev, ino)
        opened.append(src)
        tgt = safefs.open_dir(target, safefs.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        opened.append(tgt)
        pairs.append((target, src, tgt, extra[0] if extra else 0))
    fresh = []
    for target, data, extra in tmpfs:
        tgt = safefs.open_dir(target, safefs.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        opened.append(tgt)
        fresh.append((tgt, data, extra))
    for target, src, tgt, extra in pairs:
        # mount_options= only adds flags: the source's own (a noexec or
        # read-only filesystem, flags locked by a user namespace) are kept,
        # since a remount that drops a locked flag fails with EPERM.
        flags = _mount_flags_of(src) | extra
        kernel.mount(f"/proc/self/fd/{src}", f"/proc/self/fd/{tgt}", None, kernel.MS_BIND)
        # Remount through an fd on the new mount's root, checked to be the
        # job's directory (a bind's root is that very inode), not by path.
        st = os.fstat(src)
        top = safefs.open_verified(target, st.st_dev, st.st_ino)
        opened.append(top)
        kernel.mount(None, f"/proc/self/fd/{top}", None, kernel.MS_REMOUNT | kernel.MS_BIND | flags)
    for tgt, data, extra in fresh:
        mountopts.mount_tmpfs(tgt, data, extra)
    if shm:
        # shm=job:N%: N% of the RAM until the entry helper, which knows the
        # job's memory on this node, resizes it in the job's first task.
        kernel.mount("tmpfs", "/dev/shm", "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV,
                     f"size={shm.removeprefix('job:')},mode=1777")
    # /proc/thread-self: /proc/self would name the main thread's namespace.
    return os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)


class _NamespaceThread(threading.Thread):
    """Builds one job's namespace in a thread of its own, which then ends:
    the namespace lives on in the fd it hands back, until pinned.

    A thread instead of a forked child: no fork of the daemon's memory
    (copy-on-write faults on both sides), no child to reap; the daemon's
    create went from 3.0 to 1.5 ms (docs/performance.md).  The thread never returns to the host
    namespace and is never reused, so nothing else ever runs in a job's
    namespace, and a failure half-way leaves nothing behind but a namespace
    no one references."""

    def __init__(self, binds, shm, cpu=None, tmpfs=()):
        super().__init__(name="privtmpd-ns", daemon=True)
        self.binds, self.shm, self.cpu, self.tmpfs = binds, shm, cpu, tmpfs
        self.lock = threading.Lock()
        self.abandoned = False      # the daemon gave up waiting (timeout)
        self.nsfd = None
        self.error = None

    def run(self):
        opened = []
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})     # this thread only
            nsfd = _setup_in(self.binds, self.shm, opened, self.tmpfs)
        except BaseException as e:      # noqa: BLE001 - handed to the daemon
            self.error = e
            nsfd = None
        finally:
            for fd in opened:
                os.close(fd)
        with self.lock:
            if self.abandoned and nsfd is not None:
                os.close(nsfd)
            else:
                self.nsfd = nsfd

    def result(self, timeout):
        """The namespace fd (the caller closes it), or the error raised."""
        self.join(timeout)
        with self.lock:
            if self.is_alive() and self.nsfd is None and self.error is None:
                self.abandoned = True
                raise NamespaceError(f"namespace setup timed out after {timeout:.0f} s "
                                     f"(a mount point that does not answer?)")
        if self.error is not None:
            raise self.error
        return self.nsfd


def build_namespace(binds, shm, timeout=30.0, cpu=None, tmpfs=()):
    """A new mount namespace, a rslave copy of the host's with binds
    (target, source path, dev, ino[, extra flags]) mounted, tmpfs (target,
    data, extra flags) mounted and shm's tmpfs; returns an O_RDONLY fd on
    it.  cpu: build it on that CPU (see _build_and_pin)."""
    t = _NamespaceThread(binds, shm, cpu, tmpfs)
    t.start()
    return t.result(timeout)


def create(cfg, job, restart, uid, gid, user="", on_trash=None, timeout=30.0, limit=None):
    """Build and pin job's namespace.  Returns the state dict.

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
    pfd = safefs.open_dir(cfg.base_parent)
    try:
        placement = safefs.create_job_dir(pfd, dname, [] if limit else [sub for _, sub in plan],
                                          uid, gid, cfg.mode)
        if placement.displaced_ours and on_trash:
            on_trash(cfg.base_parent, placement.displaced_name)
        if cfg.sbcast:
            hostpath.open_top_to_owner(pfd, dname, placement.subdirs["tmp"])
    finally:
        os.close(pfd)
    state["displaced"] = placement.displaced
    top = dpath
    if limit:
        top = f"{dpath}/{limitfs.LIMITED_FS}"
        placement.subdirs, state["reserved"] = limitfs.make_limited_fs(cfg, dpath, [sub for _, sub in plan], uid, gid,
                                                                limit)
    binds = [(m, f"{top}/{sub}", *placement.subdirs[sub], mountopts.extra_flags(cfg, m)) for m, sub in plan]
    _build_and_pin(cfg, job, binds, timeout)
    state["ns"] = list(runstate.pin_identity(cfg, job))
    state["state"] = runstate.STATE_READY
    runstate.write_state(cfg, job, state)
    return state


# --- destroy -------------------------------------------------------------

def destroy(cfg, job, restart_hint=None, on_trash=None, keep_until=None, exit_code=0):
    """Tear down whatever job has on this node.  Idempotent: no pin and no
    directory is success.  Returns a dict describing what was done.

    The restart count the Epilog sees may already be the next run's (Slurm
    22.05 requeue), so the directory comes from the state file, and both
    the hinted count and the one before it are tried as well.

    keep_until (Unix time): keep the directories under their kept name
    (keep_failed=) instead of removing them."""
    info = {"job": job, "killed": [], "cgroups": [], "unpinned": False, "dirs": [], "kept": [],
            "keep_errors": []}
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
    if ns_id or (subdirs and state.get("state") == runstate.STATE_READY):
        # Without a pin (unmounted by someone), the job's namespace lives on
        # as long as a process is in it: those are found by the job's
        # directories mounted in their namespace.
        target = ns_id or (os.stat("/proc/self/ns/mnt").st_dev, 0)
        uid = state.get("uid") if type(state.get("uid")) is int else None
        try:
            info["killed"] = proc.kill_processes_in(
                target, cfg.kill_timeout, subdirs, uid, job,
                on_cgroup=lambda cg, n: info["cgroups"].append(f"{cg[1]} ({n})"))
        except proc.StillRunning as e:
            raise NamespaceError(str(e)) from None
    if os.path.lexists(names.pin_path(cfg.rundir, job)):
        runstate.unpin(cfg, job)
        info["unpinned"] = True
    restarts = set()
    if isinstance(state.get("restart"), int):
        restarts.add(state["restart"])
    if restart_hint is not None:
        restarts.update({restart_hint, max(restart_hint - 1, 0)})
    pfd = safefs.open_dir(cfg.base_parent)
    try:
        for r in sorted(restarts):
            dname = names.job_dir_name(cfg.base_name, job, r)
            if keep_until and safefs.is_ours(pfd, dname):
                kname, why = keep_if_ours(pfd, cfg, dname, job, r, keep_until, exit_code)
                if kname:
                    info["kept"].append(f"{cfg.base_parent}/{kname}")
                    continue
                info["keep_errors"].append(f"{dname}: {why}")
            tname = trash_if_ours(pfd, cfg, dname, job, r)
            if tname:
                info["dirs"].append(dname)
                if on_trash:
                    on_trash(cfg.base_parent, tname)
    finally:
        os.close(pfd)
    runstate.remove_state(cfg, job)
    return info


def keep_if_ours(pfd, cfg, dname, job, restart, until, exit_code):
    """Rename a job directory of ours to its kept name and let its owner
    reach it: the top stays root's (that marks it ours) with mode 0711, the
    subdirectories stay the user's, 0700.  Returns (kept name, None), or
    (None, why) when it cannot be kept (the caller removes it instead and
    logs why: a failure to keep is never silent)."""
    if not safefs.is_ours(pfd, dname):
        return None, "not a directory of privtmpd's"
    for _ in range(8):
        kname = names.kept_name(cfg.base_name, job, restart, int(until), exit_code, safefs._nonce())
        try:
            if not safefs.rename_aside(pfd, dname, kname):
                return None, "the job directory vanished"
            break
        except (OSError, KernelError) as e:
            if e.errno != errno.EEXIST:
                return None, f"renameat2 {kname}: {os.strerror(e.errno)}"
            # Taken (by a guess at a random name): another nonce.
    else:
        return None, "every kept name tried was taken"
    fd = os.open(kname, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        _owner_only(fd)
        os.fchmod(fd, 0o711)
    finally:
        os.close(fd)
    return kname, None


def _owner_only(fd, depth=0):
    """While the job ran, the 0700 root-owned top kept other users out of
    its directories; a kept top opens to 0711, so each user directory in it
    (and in the limit= image, one level down) drops group and other access
    whatever mode= gave it.  fd-relative, O_NOFOLLOW, fchmod on the inode."""
    with os.scandir(fd) as it:
        names_ = [e.name for e in it if e.is_dir(follow_symlinks=False)]
    for name in names_:
        try:
            cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            continue
        try:
            st = os.fstat(cfd)
            if st.st_uid != 0:
                os.fchmod(cfd, st.st_mode & 0o700)
            elif depth == 0:
                _owner_only(cfd, 1)
        finally:
            os.close(cfd)


def kept_dirs(cfg):
    """[{"name", "job", "restart", "until", "exit_code", "uid"}] for every
    kept directory of ours (root-owned: users cannot make those)."""
    match = names.NameMatcher(cfg.base_name)
    out = []
    pfd = safefs.open_dir(cfg.base_parent)
    try:
        with os.scandir(pfd) as it:
            found = [(e.name, k) for e in it if (k := match.kept(e.name))]
        for name, (job, restart, until, code) in found:
            if not safefs.is_ours(pfd, name):
                continue
            out.append({"name": name, "path": f"{cfg.base_parent}/{name}", "job": job, "restart": restart,
                        "until": until, "exit_code": code, "uid": _owner_uid(pfd, name)})
    finally:
        os.close(pfd)
    return sorted(out, key=lambda k: (k["until"], k["name"]))


def _owner_uid(pfd, name):
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    except OSError:
        return None
    try:
        with os.scandir(fd) as it:
            uids = [safefs.lstat_at(fd, e.name).st_uid for e in it if e.name != limitfs.LIMITED_FS + ".img"
                    and e.name != limitfs.LIMITED_FS]
        if not uids:        # limit=: the job's directories are in the filesystem at fs/ (ours)
            sfd = os.open(limitfs.LIMITED_FS, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                with os.scandir(sfd) as it:
                    uids = [safefs.lstat_at(sfd, e.name).st_uid for e in it if e.name != "lost+found"]
            finally:
                os.close(sfd)
        return uids[0] if uids else None
    except OSError:
        return None
    finally:
        os.close(fd)


def trash_if_ours(pfd, cfg, dname, job, restart, kept=False):
    """Rename a job directory to its trash name if it is ours (a root-owned
    directory; users cannot create those).  Returns the trash name or None.
    kept: dname is a kept directory (see names.trash_name)."""
    if not safefs.is_ours(pfd, dname):
        return None
    limitfs.umount_limited_fs(cfg.base_parent, dname)
    tname = names.trash_name(cfg.base_name, job, restart, safefs._nonce(), kept)
    if safefs.rename_aside(pfd, dname, tname):
        return tname
    return None

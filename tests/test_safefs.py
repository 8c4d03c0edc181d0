"""safefs against hostile trees, for real (root).

Job directories sit in a world-writable sticky directory (like /tmp) and
their subdirectories belong to the job's user, who can plant anything
there: symlinks to root's files, hard links, FIFOs, devices, bind mounts
(root in the job may), immutable files, absurdly deep trees.  Creating and
removing must never follow, cross or hang on any of it, and must leave
whatever root owns elsewhere (the "canary") exactly as it was.
"""

import errno
import hashlib
import os
import pickle
import signal
import socket
import stat
import subprocess
import time
import uuid

import pytest

from conftest import TEST_BASE_PARENT, TEST_RUN
from privtmpd import kernel, safefs

pytestmark = pytest.mark.root

USER = 65534
USER_PY = "/usr/bin/python3"        # readable by nobody, unlike a pyenv under /root


# --- helpers ---------------------------------------------------------------------

def as_user(script, cwd=None, check=True):
    return subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                           "sh", "-c", script], cwd=cwd, capture_output=True, text=True, check=check)


def snapshot(top):
    """Everything about a tree that removal could damage: names, types,
    owners, modes, link counts and file contents.  Never follows symlinks."""
    st = os.lstat(top)
    out = {".": (st.st_mode, st.st_uid, st.st_gid, st.st_nlink)}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            digest = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            out[os.path.relpath(p, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size, digest)
    return out


def mountpoints():
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def run_in_child(fn, timeout):
    """fn() in a forked child, with a hard time limit: a hang (a removal
    looping on an entry it cannot remove) fails the test instead of
    blocking the suite.  Returns fn's (picklable) result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                data = pickle.dumps(("ok", fn()))
            except BaseException as e:       # noqa: BLE001 - reported to the parent
                data = pickle.dumps(("error", repr(e)))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        pytest.fail(f"did not finish within {timeout} s")
    with os.fdopen(r, "rb") as f:
        kind, value = pickle.loads(f.read())
    if kind == "error":
        pytest.fail(f"child raised {value}")
    return value


class Work:
    """<TEST_BASE_PARENT>/safefs-<id>/{base (1777 like /tmp), canary (root's)}."""

    def __init__(self):
        name = f"safefs-{uuid.uuid4().hex[:8]}"
        self.top = f"{TEST_BASE_PARENT}/{name}"
        # A live pid file of that name tells another test session's leftover
        # cleanup that this directory is in use.
        os.makedirs(TEST_RUN, 0o755, exist_ok=True)
        self.claim = f"{TEST_RUN}/{name}.pid"
        with open(self.claim, "w") as f:
            f.write(str(os.getpid()))
        os.makedirs(self.top, 0o755)
        os.chmod(self.top, 0o755)
        self.parent = f"{self.top}/base"
        os.mkdir(self.parent)
        os.chmod(self.parent, 0o1777)
        self.canary = f"{self.top}/canary"
        os.mkdir(self.canary, 0o700)
        with open(f"{self.canary}/secret", "w") as f:
            f.write("root's data\n")
        os.chmod(f"{self.canary}/secret", 0o600)
        os.mkdir(f"{self.canary}/sub", 0o755)
        with open(f"{self.canary}/sub/file", "w") as f:
            f.write("more\n")
        self.canary_before = snapshot(self.canary)
        self.immutable = []
        self.fd = safefs.open_dir(self.parent)

    def canary_intact(self):
        return snapshot(self.canary) == self.canary_before

    def path(self, *parts):
        return os.path.join(self.parent, *parts)

    def cleanup(self):
        os.close(self.fd)
        for p in self.immutable:
            subprocess.run(["chattr", "-i", p], stderr=subprocess.DEVNULL)
        for mp in sorted((m for m in mountpoints() if m.startswith(self.top)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", self.top], check=False)
        os.unlink(self.claim)


@pytest.fixture
def work():
    w = Work()
    yield w
    w.cleanup()


# --- create_job_dir -----------------------------------------------------------------

SUBS = ["tmp", "var_tmp"]


def check_ours(w, name, placement, mode):
    st = os.lstat(w.path(name))
    assert stat.S_ISDIR(st.st_mode)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)
    assert sorted(os.listdir(w.path(name))) == SUBS
    for sub in SUBS:
        sst = os.lstat(w.path(name, sub))
        assert stat.S_ISDIR(sst.st_mode)
        assert (sst.st_uid, sst.st_gid, stat.S_IMODE(sst.st_mode)) == (USER, USER, mode)
        assert (sst.st_dev, sst.st_ino) == placement.subdirs[sub]
        assert os.listdir(w.path(name, sub)) == []


def test_create_plain(work):
    pl = safefs.create_job_dir(work.fd, "job.1.0", SUBS, USER, USER, 0o700)
    check_ours(work, "job.1.0", pl, 0o700)
    assert pl.displaced == "" and not pl.displaced_ours
    # The temporary build name is gone: only the job directory is left.
    assert os.listdir(work.parent) == ["job.1.0"]


SQUATTERS = {
    # A user's directory, itself booby-trapped: its "tmp" points at root's
    # canary, so using the directory (or chowning through it) would hand
    # the canary over.
    "user-dir": "mkdir job.7.0 && echo planted > job.7.0/planted && ln -s {canary} job.7.0/tmp",
    "symlink-to-canary": "ln -s {canary} job.7.0",
    "fifo": "mkfifo job.7.0",
    "file": "echo planted > job.7.0",
    "dangling-symlink": "ln -s {parent}/nothing-here job.7.0",
}


@pytest.mark.parametrize("kind", sorted(SQUATTERS))
def test_create_displaces_squatter(work, kind):
    as_user(SQUATTERS[kind].format(canary=work.canary, parent=work.parent), cwd=work.parent)
    before = os.lstat(work.path("job.7.0"))
    assert before.st_uid == USER
    pl = safefs.create_job_dir(work.fd, "job.7.0", SUBS, USER, USER, 0o750)

    check_ours(work, "job.7.0", pl, 0o750)
    assert os.lstat(work.path("job.7.0")).st_ino != before.st_ino
    # The squatter is moved aside, untouched, and still the user's.
    assert not pl.displaced_ours
    assert pl.displaced_name.startswith("job.7.0.squatted.")
    moved = os.lstat(work.path(pl.displaced_name))
    assert (moved.st_ino, moved.st_mode, moved.st_uid) == (before.st_ino, before.st_mode, USER)
    if kind == "user-dir":
        assert sorted(os.listdir(work.path(pl.displaced_name))) == ["planted", "tmp"]
        assert os.readlink(work.path(pl.displaced_name, "tmp")) == work.canary
    if kind == "symlink-to-canary":
        assert os.readlink(work.path(pl.displaced_name)) == work.canary
    assert f"owned by uid {USER}" in pl.displaced
    assert sorted(os.listdir(work.parent)) == sorted(["job.7.0", pl.displaced_name])
    assert work.canary_intact()


@pytest.mark.parametrize("kind", ["empty-user-dir", "user-dir"])
def test_create_without_renameat2_flags_displaces_squatter(work, monkeypatch, kind):
    """On a filesystem without RENAME_NOREPLACE/EXCHANGE (EINVAL), the plain
    rename(2) fallback would replace an empty directory: a user's one, even
    empty, is moved aside like any squatter, never replaced."""
    real = kernel.renameat2

    def no_flags(olddirfd, oldpath, newdirfd, newpath, flags):
        if flags:
            raise kernel.KernelError(errno.EINVAL, "renameat2", newpath)
        return real(olddirfd, oldpath, newdirfd, newpath, flags)

    monkeypatch.setattr(kernel, "renameat2", no_flags)
    as_user("mkdir job.7.0" + (" && echo planted > job.7.0/planted" if kind == "user-dir" else ""),
            cwd=work.parent)
    before = os.lstat(work.path("job.7.0"))
    pl = safefs.create_job_dir(work.fd, "job.7.0", SUBS, USER, USER, 0o750)
    check_ours(work, "job.7.0", pl, 0o750)
    assert pl.displaced_name.startswith("job.7.0.squatted.")
    moved = os.lstat(work.path(pl.displaced_name))
    assert (moved.st_ino, moved.st_uid) == (before.st_ino, USER)
    assert sorted(os.listdir(work.parent)) == sorted(["job.7.0", pl.displaced_name])


def test_create_replaces_our_leftover(work):
    # A root-owned directory at the job path is a leftover of ours (users
    # cannot make root-owned directories): swapped out and handed back for
    # removal, never reused.
    os.mkdir(work.path("job.8.0"), 0o700)
    os.mkdir(work.path("job.8.0", "tmp"))
    with open(work.path("job.8.0", "tmp", "old-file"), "w") as f:
        f.write("from the previous run\n")
    old_ino = os.lstat(work.path("job.8.0")).st_ino
    pl = safefs.create_job_dir(work.fd, "job.8.0", SUBS, USER, USER, 0o700)
    check_ours(work, "job.8.0", pl, 0o700)
    assert pl.displaced_ours
    assert os.lstat(work.path(pl.displaced_name)).st_ino == old_ino
    assert os.listdir(work.path(pl.displaced_name, "tmp")) == ["old-file"]


def test_failed_create_leaves_nothing(work):
    # The second mkdir of "tmp" fails: the half-built directory must go.
    with pytest.raises(FileExistsError):
        safefs.create_job_dir(work.fd, "job.9.0", ["tmp", "tmp"], USER, USER, 0o700)
    assert os.listdir(work.parent) == []


def test_failure_after_swap_keeps_the_squatters_files(work, monkeypatch):
    """If moving the squatter aside fails after the exchange (a full
    directory, say), the create fails, but the user's files, now at the
    temporary name, are not deleted by root."""
    as_user("mkdir job.7.0 && echo mine > job.7.0/precious", cwd=work.parent)

    def fail(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safefs, "_note_displaced", fail)
    with pytest.raises(OSError):
        safefs.create_job_dir(work.fd, "job.7.0", SUBS, USER, USER, 0o700)
    found = [os.path.join(r, f) for r, _, fs in os.walk(work.parent) for f in fs]
    assert len(found) == 1 and found[0].endswith("/precious"), found
    with open(found[0]) as f:
        assert f.read() == "mine\n"
    assert os.stat(found[0]).st_uid == USER


ATTACKER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
name, alt, target = sys.argv[1:4]
os.makedirs(alt, exist_ok=True)
n = 0
while True:
    try:
        os.symlink(target, name)
    except FileExistsError:
        pass
    # RENAME_EXCHANGE: the job path flips between a symlink to root's
    # directory and the attacker's directory, as fast as the CPU allows.
    if libc.renameat2(-100, name.encode(), -100, alt.encode(), 2) == 0:
        n += 1
        if n == 1000:
            open("started", "w").close()
"""


def test_create_under_symlink_swapping(work):
    """The attack that beat the original plugin: the next job's path is
    swapped between a symlink and a user directory in a loop while the job
    starts.  Every time, the job path must end up our own root-owned
    directory, and root's canary must never be touched."""
    with open(f"{work.top}/attacker.py", "w") as f:
        f.write(ATTACKER)
    proc = subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                             USER_PY, f"{work.top}/attacker.py", "job.5.0", "alt", work.canary],
                            cwd=work.parent)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(work.path("started")):
            assert time.monotonic() < deadline and proc.poll() is None, "attacker did not start"
            time.sleep(0.01)
        displaced = 0
        for i in range(150):
            pl = safefs.create_job_dir(work.fd, "job.5.0", SUBS, USER, USER, 0o700)
            st = os.lstat(work.path("job.5.0"))
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
            for sub in SUBS:
                sst = os.lstat(work.path("job.5.0", sub))
                assert (sst.st_dev, sst.st_ino) == pl.subdirs[sub] and sst.st_uid == USER
            displaced += bool(pl.displaced)
            # Take it out again for the next round, as the Epilog does.
            assert safefs.rename_aside(work.fd, "job.5.0", f"job.5.0.deleting.{i}")
            stats = safefs.remove_tree(work.fd, f"job.5.0.deleting.{i}")
            assert stats.complete, stats.errors
        assert displaced > 0, "the attacker never won the race to the job path: the test proved nothing"
    finally:
        proc.kill()
        proc.wait()
    assert work.canary_intact()
    # Nothing root-owned was left anywhere the attacker controls.
    for name in os.listdir(work.parent):
        st = os.lstat(work.path(name))
        assert st.st_uid == USER or name in ("started",), (name, st.st_uid)


# --- remove_tree ------------------------------------------------------------------

def make_job(w, name="job.3.0"):
    os.mkdir(w.path(name), 0o700)
    os.mkdir(w.path(name, "tmp"), 0o700)
    os.chown(w.path(name, "tmp"), USER, USER)
    return w.path(name, "tmp")


def mkfile(path, data=b"x" * 100):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data)
    os.close(fd)


def make_deep(top, depth, leaf_files=1):
    """A chain of `depth` directories below top, built fd-relative: the
    path is far longer than PATH_MAX, as a user's runaway job makes it."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        for i in range(leaf_files):
            f = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.close(f)
    finally:
        os.close(fd)


def test_remove_hostile_tree(work):
    tmp = make_job(work)
    null_before = os.stat("/dev/null")
    # Symlinks to root's canary (absolute and relative, to the directory
    # and to a file inside) at several depths, and one to /.
    d = tmp
    for depth in range(1, 11):
        d = os.path.join(d, f"level{depth}")
        os.mkdir(d)
        if depth in (1, 3, 10):
            os.symlink(work.canary, f"{d}/to-canary")
            os.symlink(f"{work.canary}/secret", f"{d}/to-secret")
            os.symlink(os.path.relpath(work.canary, d), f"{d}/to-canary-rel")
            mkfile(f"{d}/file")
    os.symlink("/", f"{tmp}/to-root")
    os.mkfifo(f"{tmp}/fifo")
    s = socket.socket(socket.AF_UNIX)
    dfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    s.bind(f"/proc/self/fd/{dfd}/socket")
    os.close(dfd)
    s.close()
    assert stat.S_ISSOCK(os.lstat(f"{tmp}/socket").st_mode)
    os.mknod(f"{tmp}/null-dev", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(f"{tmp}/block-dev", stat.S_IFBLK | 0o600, os.makedev(7, 250))
    # Mode 0000 files and directories, nested.
    os.makedirs(f"{tmp}/locked/inner")
    mkfile(f"{tmp}/locked/inner/f")
    mkfile(f"{tmp}/locked/f")
    mkfile(f"{tmp}/zero-mode")
    for p in (f"{tmp}/zero-mode", f"{tmp}/locked/inner", f"{tmp}/locked"):
        os.chmod(p, 0)
    # Awkward names: newline, 255 bytes (ASCII and multi-byte), invalid UTF-8.
    bt = os.fsencode(tmp)
    mkfile(f"{tmp}/new\nline")
    os.mkdir(f"{tmp}/dir\nwith newline")
    mkfile(f"{tmp}/dir\nwith newline/x")
    mkfile(f"{tmp}/" + "n" * 255)
    os.mkdir(f"{tmp}/" + "é" * 127 + "x")
    mkfile(f"{tmp}/" + "é" * 127 + "x/" + "m" * 255)
    mkfile(bt + b"/bad-\xff\xfe-utf8")
    os.mkdir(bt + b"/dir-\xc3\x28")
    mkfile(bt + b"/dir-\xc3\x28/\x80")
    os.symlink(work.canary, bt + b"/dir-\xc3\x28/link-\xff")
    for root, dirs, files in os.walk(tmp):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), USER, USER)
    # A hard link to a root-owned file (made after the chown above, which
    # would otherwise have given the canary away): the link goes, the file stays.
    os.link(f"{work.canary}/secret", f"{tmp}/hardlink")
    assert os.stat(f"{work.canary}/secret").st_nlink == 2

    stats = run_in_child(lambda: safefs.remove_tree(work.fd, "job.3.0"), timeout=60)

    assert stats.complete, stats.errors
    assert stats.failures == 0 and stats.mounts_skipped == 0
    assert not os.path.lexists(work.path("job.3.0"))
    assert os.listdir(work.parent) == []
    assert stats.files >= 25 and stats.dirs >= 16
    assert os.stat(f"{work.canary}/secret").st_nlink == 1
    assert work.canary_intact()
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev, after.st_mode) == (null_before.st_ino, null_before.st_rdev,
                                                            null_before.st_mode)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "file"])
def test_remove_top_that_is_not_a_directory(work, kind):
    # The entry to remove was replaced by a non-directory: only the name goes.
    p = work.path("job.4.0.deleting.x")
    {"symlink": lambda: os.symlink(work.canary, p), "fifo": lambda: os.mkfifo(p),
     "file": lambda: mkfile(p)}[kind]()
    stats = safefs.remove_tree(work.fd, "job.4.0.deleting.x")
    assert stats.complete and stats.files == 1
    assert os.listdir(work.parent) == []
    assert work.canary_intact()


def test_remove_missing_is_a_no_op(work):
    # Removal resumes after a crash and may race an earlier worker: a name
    # that is already gone is not an error.
    stats = safefs.remove_tree(work.fd, "job.4.0.deleting.gone")
    assert stats.complete and stats.files == 0 and stats.dirs == 0


def test_remove_within_a_budget(work):
    """The daemon removes small trees itself, within a Budget: it stops
    before the entry that would exceed it (a big file is never unlinked
    over the budget: that cannot be interrupted), leaks no fd, and what is
    left is removed by a later remove_tree."""
    tmp = make_job(work)
    for i in range(50):
        mkfile(f"{tmp}/f{i}")
    fds = len(os.listdir("/proc/self/fd"))
    far = time.monotonic() + 60
    stats = safefs.RemoveStats()
    with pytest.raises(safefs.OverBudget):
        safefs.remove_tree(work.fd, "job.3.0", stats, safefs.Budget(10, 1 << 30, far))
    # Charged: tmp (not yet removed) and 9 files; the 11th entry stops it.
    assert (stats.files, stats.dirs) == (9, 0)
    assert len(os.listdir(tmp)) == 41
    assert len(os.listdir("/proc/self/fd")) == fds

    subprocess.run(["fallocate", "-l", "4M", f"{tmp}/big"], check=True)
    with pytest.raises(safefs.OverBudget):
        safefs.remove_tree(work.fd, "job.3.0", safefs.RemoveStats(), safefs.Budget(1000, 1 << 20, far))
    assert os.path.exists(f"{tmp}/big"), "unlinked a file over the byte budget"

    with pytest.raises(safefs.OverBudget):
        safefs.remove_tree(work.fd, "job.3.0", safefs.RemoveStats(), safefs.Budget(1000, 1 << 30, 0.0))
    assert len(os.listdir("/proc/self/fd")) == fds

    stats = safefs.remove_tree(work.fd, "job.3.0")
    assert stats.complete and not os.path.exists(work.path("job.3.0"))


def test_remove_pauses_and_resumes_with_its_budget(work):
    """Budget.interrupt: remove_tree stops (Paused) at the next check once
    it says so, and the same Budget and stats carry on where it stopped.
    Files are charged once; a directory on the way again at each resume."""
    tmp = make_job(work)
    for i in range(200):
        mkfile(f"{tmp}/f{i}")
    calls = []
    budget = safefs.Budget(1000, 1 << 30, time.monotonic() + 60, lambda: calls.append(1) or len(calls) <= 2)
    stats = safefs.RemoveStats()
    for _ in range(2):
        with pytest.raises(safefs.Paused):
            safefs.remove_tree(work.fd, "job.3.0", stats, budget)
        assert os.path.isdir(tmp) and 0 < len(os.listdir(tmp)) < 200
    safefs.remove_tree(work.fd, "job.3.0", stats, budget)
    assert not os.path.exists(work.path("job.3.0"))
    assert stats.complete and (stats.files, stats.dirs) == (200, 2) and stats.sized
    assert 1000 - 201 - 2 <= budget.entries <= 1000 - 201       # 200 files, tmp/ up to 3 times


@pytest.mark.parametrize("sizes", [False, True])
def test_remove_measures_bytes_only_when_asked(work, sizes):
    """Without sizes= a removal is one unlinkat per file, as rm -rf does;
    with it (or under a Budget, which needs the sizes) every file is
    lstat'ed first and the stats say whether bytes cover all of them."""
    tmp = make_job(work)
    subprocess.run(["fallocate", "-l", "2M", f"{tmp}/big"], check=True)
    for i in range(5):
        mkfile(f"{tmp}/f{i}")
    stats = safefs.remove_tree(work.fd, "job.3.0", sizes=sizes)
    assert stats.complete and stats.files == 6 and stats.dirs == 2
    assert stats.sized is sizes
    assert (stats.bytes >= 2 << 20) if sizes else stats.bytes == 0

    tmp = make_job(work)
    mkfile(f"{tmp}/f")
    stats = safefs.remove_tree(work.fd, "job.3.0", budget=safefs.Budget(100, 1 << 30, time.monotonic() + 60))
    assert stats.sized and stats.bytes > 0


def test_removal_counts_a_hard_linked_file_once(work):
    """A user's 4 MiB file under 50 names is 4 MiB of the job's usage, not
    200: only the last name's unlink frees the blocks.  A name of a file
    that lives on outside the tree frees nothing and counts nothing."""
    tmp = make_job(work)
    subprocess.run(["fallocate", "-l", "4M", f"{tmp}/big"], check=True)
    for i in range(49):
        os.link(f"{tmp}/big", f"{tmp}/l{i}")
    subprocess.run(["fallocate", "-l", "1M", work.path("outside")], check=True)
    os.link(work.path("outside"), f"{tmp}/o")
    stats = safefs.remove_tree(work.fd, "job.3.0", sizes=True)
    assert stats.complete and stats.files == 51 and stats.sized
    assert 4 << 20 <= stats.bytes < 5 << 20, stats.bytes
    assert os.path.getsize(work.path("outside")) == 1 << 20


def test_remove_5000_deep(work):
    tmp = make_job(work)
    make_deep(tmp, 5000, leaf_files=3)
    t0 = time.monotonic()
    stats = run_in_child(lambda: safefs.remove_tree(work.fd, "job.3.0"), timeout=60)
    elapsed = time.monotonic() - t0
    assert stats.complete, stats.errors
    assert stats.dirs == 5000 + 2 and stats.files == 3
    assert os.listdir(work.parent) == []
    print(f"5 000-deep tree removed in {elapsed:.2f} s")


def test_remove_100000_deep(work):
    tmp = make_job(work)
    t0 = time.monotonic()
    make_deep(tmp, 100_000)
    built = time.monotonic() - t0
    # Far beyond Python's recursion limit and the fd limit (ulimit -n), were
    # either used per level.
    t0 = time.monotonic()
    stats = run_in_child(lambda: safefs.remove_tree(work.fd, "job.3.0"), timeout=60)
    elapsed = time.monotonic() - t0
    assert stats.complete, stats.errors
    assert stats.dirs == 100_000 + 2 and stats.files == 1
    assert os.listdir(work.parent) == []
    print(f"100 000-deep tree: built in {built:.1f} s, removed in {elapsed:.1f} s")
    assert elapsed < 60


def test_remove_does_not_cross_a_bind_mount(work):
    tmp = make_job(work)
    src = f"{work.top}/bindsrc"
    os.makedirs(f"{src}/sub")
    mkfile(f"{src}/keep")
    mkfile(f"{src}/sub/keep2")
    before = snapshot(src)
    os.makedirs(f"{tmp}/a/mnt")
    mkfile(f"{tmp}/a/sibling")
    mkfile(f"{tmp}/other")
    kernel.mount(src, f"{tmp}/a/mnt", None, kernel.MS_BIND)
    assert f"{tmp}/a/mnt" in mountpoints()

    stats = run_in_child(lambda: safefs.remove_tree(work.fd, "job.3.0"), timeout=30)

    assert stats.mounts_skipped == 1
    assert not stats.complete
    assert any("mnt" in e for e in stats.errors), stats.errors
    # Not traversed: everything in the mounted directory survives.
    assert snapshot(src) == before
    assert f"{tmp}/a/mnt" in mountpoints()
    # Everything else is gone; what is left is the path down to the mount.
    left = sorted(os.path.relpath(os.path.join(r, n), work.parent)
                  for r, ds, fs in os.walk(work.parent) for n in ds + fs if not r.startswith(f"{tmp}/a/mnt"))
    assert left == ["job.3.0", "job.3.0/tmp", "job.3.0/tmp/a", "job.3.0/tmp/a/mnt"]


def test_remove_top_that_is_a_mount_point(work):
    os.mkdir(work.path("job.6.0.deleting.x"))
    src = f"{work.top}/bindsrc"
    os.mkdir(src)
    mkfile(f"{src}/keep")
    kernel.mount(src, work.path("job.6.0.deleting.x"), None, kernel.MS_BIND)
    stats = safefs.remove_tree(work.fd, "job.6.0.deleting.x")
    assert stats.mounts_skipped == 1 and not stats.complete
    assert os.listdir(src) == ["keep"]


def test_remove_with_immutable_file(work):
    tmp = make_job(work)
    os.makedirs(f"{tmp}/x/y")
    for i in range(50):
        mkfile(f"{tmp}/x/y/f{i}")
        mkfile(f"{tmp}/g{i}")
    mkfile(f"{tmp}/x/immutable")
    work.immutable.append(f"{tmp}/x/immutable")
    subprocess.run(["chattr", "+i", f"{tmp}/x/immutable"], check=True)
    with pytest.raises(PermissionError):
        os.unlink(f"{tmp}/x/immutable")

    t0 = time.monotonic()
    stats = run_in_child(lambda: safefs.remove_tree(work.fd, "job.3.0"), timeout=30)
    elapsed = time.monotonic() - t0

    assert not stats.complete
    assert stats.failures >= 1
    assert any("immutable" in e and "Operation not permitted" in e for e in stats.errors), stats.errors
    left = sorted(os.path.relpath(os.path.join(r, n), work.parent)
                  for r, ds, fs in os.walk(work.parent) for n in ds + fs)
    assert left == ["job.3.0", "job.3.0/tmp", "job.3.0/tmp/x", "job.3.0/tmp/x/immutable"]
    assert elapsed < 10


def test_remove_while_user_swaps_symlinks(work):
    """The job's user (who owns its /tmp) flips a directory and a symlink to
    root's canary with RENAME_EXCHANGE while the tree is being removed
    (the CVE-2023-41914 pattern).  The canary must survive."""
    tmp = make_job(work)
    for i in range(20):
        os.makedirs(f"{tmp}/d{i}/sub")
        for j in range(50):
            mkfile(f"{tmp}/d{i}/sub/f{j}")
    for root, dirs, files in os.walk(tmp):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), USER, USER)
    swapper = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
canary = sys.argv[1]
for i in range(20):
    try:
        os.symlink(canary, f"l{i}")
    except OSError:
        pass
open("ready", "w").close()
while True:
    for i in range(20):
        libc.renameat2(-100, f"d{i}".encode(), -100, f"l{i}".encode(), 2)
        libc.renameat2(-100, f"d{i}/sub".encode(), -100, f"l{i}".encode(), 2)
"""
    with open(f"{work.top}/swapper.py", "w") as f:
        f.write(swapper)
    proc = subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                             USER_PY, f"{work.top}/swapper.py", work.canary], cwd=tmp)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{tmp}/ready"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        run_in_child(lambda: safefs.remove_tree(work.fd, "job.3.0"), timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert work.canary_intact()
    # With the swapper gone, a second pass finishes the job.
    stats = safefs.remove_tree(work.fd, "job.3.0")
    assert stats.complete, stats.errors
    assert os.listdir(work.parent) == []


def test_remove_ends_while_a_process_keeps_writing(work, monkeypatch):
    """Processes outside the job (handed a directory fd by a job process)
    keep creating files in the tree being removed.  Removal must
    end anyway (a worker looping forever is a worker slot lost, and with
    a few of those no job's directory is ever removed again).  Usually it
    wins a race within a second; when the writers keep winning, the bound
    on passes ends it (5 s here instead of 300, inherited by the fork)."""
    monkeypatch.setattr(safefs, "PASSES_SECONDS", 5.0)
    tmp = make_job(work)
    os.makedirs(f"{tmp}/sub")
    os.chown(f"{tmp}/sub", USER, USER)
    writer = r"""
import os, sys
open("ready", "w").close()
sub = os.open("sub", os.O_RDONLY | os.O_DIRECTORY)
i = 0
while True:
    for d in (None, sub):
        try:
            fd = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d)
            os.close(fd)
        except OSError:
            pass
        i += 1
"""
    with open(f"{work.top}/writer.py", "w") as f:
        f.write(writer)
    procs = [subprocess.Popen(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                               USER_PY, f"{work.top}/writer.py"], cwd=tmp) for _ in range(3)]
    proc = procs[0]
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{tmp}/ready"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        time.sleep(0.5)
        run_in_child(lambda: safefs.remove_tree(work.fd, "job.3.0"), timeout=30)
        assert proc.poll() is None, "the writer died: the test proved nothing"
    finally:
        for p in procs:
            p.kill()
            p.wait()
    stats = safefs.remove_tree(work.fd, "job.3.0")
    assert stats.complete, stats.errors
    assert os.listdir(work.parent) == []


def test_concurrent_removals_of_one_tree(work):
    """Two removers on one tree (a worker orphaned by a crashed daemon and
    the restarted daemon's): entries vanishing under one of them are not
    errors, and the tree goes.  One of them may find the top directory
    refilled by the other's moved-up deep subtrees and report that
    rmdir; nothing else."""
    tmp = make_job(work)
    for i in range(40):
        os.makedirs(f"{tmp}/d{i}/e")
        for j in range(100):
            mkfile(f"{tmp}/d{i}/e/f{j}", b"")
    make_deep(tmp, 300)
    results = []
    pids = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                st = safefs.remove_tree(work.fd, "job.3.0")
                os.write(w, pickle.dumps((st.failures, st.mounts_skipped, st.errors)))
            except BaseException as e:       # noqa: BLE001
                os.write(w, pickle.dumps((-1, 0, [repr(e)])))
            finally:
                os._exit(0)
        os.close(w)
        pids.append((pid, r))
    for pid, r in pids:
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            results.append(pickle.loads(f.read()))
    assert os.listdir(work.parent) == []
    for failures, skipped, errors in results:
        assert failures >= 0, errors          # -1: remove_tree raised
        assert skipped == 0
        assert set(errors) <= {"rmdir('job.3.0'): Directory not empty"}, errors


# --- measuring ------------------------------------------------------------------

def test_usage_walk_in_steps_measures_what_one_walk_measures(work):
    """The daemon measures a kept tree a step per turn; a step ends at
    every look at the clock here (deadline in the past), and whatever the
    pauses, each entry is measured, and each directory entered, once."""
    top = work.path("job.7.0")
    for d in range(4):
        os.makedirs(f"{top}/d{d}/sub")
        for i in range(safefs.TreeWalk.CHECK_EVERY // 2 + 7):
            with open(f"{top}/d{d}/f{i}", "wb") as f:
                f.write(b"x" * 4096)
            os.mkdir(f"{top}/d{d}/sub/e{i}")
            with open(f"{top}/d{d}/sub/e{i}/g", "wb") as f:
                f.write(b"y" * 8192)
    whole = safefs.tree_usage(work.fd, "job.7.0")
    walk = safefs.UsageWalk(work.fd, "job.7.0")
    steps = 1
    while not walk.step(deadline=0.0):
        steps += 1
    assert steps == whole[1] // safefs.TreeWalk.CHECK_EVERY + 1 and walk.done
    assert (walk.bytes, walk.entries, walk.complete) == whole
    assert whole[1] == 4 * (2 + 3 * (safefs.TreeWalk.CHECK_EVERY // 2 + 7)) and whole[2]


def test_open_dir_refuses_symlinked_component(work):
    os.mkdir(work.path("real"))
    os.symlink(work.path("real"), work.path("link"))
    with pytest.raises(safefs.UnsafePath):
        safefs.open_dir(work.path("link"))
    with pytest.raises(safefs.UnsafePath):
        safefs.open_dir(work.path("link", "x"))
    fd = safefs.open_dir(work.path("real"))
    assert os.fstat(fd).st_ino == os.lstat(work.path("real")).st_ino
    os.close(fd)


def test_open_verified_detects_swapped_directory(work):
    os.mkdir(work.path("a"))
    st = os.lstat(work.path("a"))
    fd = safefs.open_verified(work.path("a"), st.st_dev, st.st_ino)
    os.close(fd)
    os.rename(work.path("a"), work.path("b"))
    os.mkdir(work.path("a"))
    with pytest.raises(safefs.UnsafePath) as ei:
        safefs.open_verified(work.path("a"), st.st_dev, st.st_ino)
    assert ei.value.errno == errno.ESTALE


def test_inline_budget_charges_a_name_whose_other_name_may_go_away(work, monkeypatch):
    """The inline budget charges every name's blocks, not only a last
    name's (nlink 1): a user who gave a big file a second name outside the
    tree (a hard link in the host's /tmp with sbcast=yes) and unlinks it
    between the daemon's lstat and its unlink makes the daemon's unlink the
    one that frees the file, in the main thread.  The user's unlink is put
    exactly in that window here."""
    tmp = make_job(work)
    subprocess.run(["fallocate", "-l", "64M", f"{tmp}/big"], check=True)
    os.link(f"{tmp}/big", work.path("outside"))          # the user's second name
    real = safefs.lstat_at

    def lstat_then_user_unlinks_the_other_name(fd, name):
        st = real(fd, name)
        if name == "big" and os.path.exists(work.path("outside")):
            os.unlink(work.path("outside"))               # the racing user process
        return st

    monkeypatch.setattr(safefs, "lstat_at", lstat_then_user_unlinks_the_other_name)
    far = time.monotonic() + 60
    with pytest.raises(safefs.OverBudget):
        safefs.remove_tree(work.fd, "job.3.0", safefs.RemoveStats(), safefs.Budget(1000, 1 << 20, far))
    assert os.path.exists(f"{tmp}/big"), "a 64 MiB file was freed inline against a 1 MiB budget"


def test_open_dir_refuses_dot_dot(work):
    """below= is where the walk starts; ".." would climb out of it."""
    os.mkdir(work.path("a"))
    with pytest.raises(ValueError, match="normalised"):
        safefs.open_dir(work.path("a") + "/../a", below=work.path("a"))
    fd = safefs.open_dir(work.path("a"), below=work.parent)
    os.close(fd)

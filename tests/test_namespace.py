"""Job mount namespaces, made by a real daemon and inspected from outside
(/proc/self/mountinfo) and inside (nsenter on the pin)."""

import os
import stat
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import TEST_BASE_PARENT, nsenter
from privtmpd import kernel

pytestmark = pytest.mark.root

USER = "65534"


def mountinfo(pin=None):
    """[(mount id, root, mount point, optional fields, fstype, per-mount options)]
    of the host, or of the namespace behind pin."""
    if pin:
        text = nsenter(pin, "cat", "/proc/self/mountinfo").stdout
    else:
        with open("/proc/self/mountinfo") as f:
            text = f.read()
    out = []
    for line in text.splitlines():
        left, right = line.split(" - ", 1)
        f = left.split()
        out.append((f[0], _unescape(f[3]), _unescape(f[4]), " ".join(f[6:]), right.split()[0], f[5]))
    return out


def _unescape(s):
    return s.encode().decode("unicode_escape") if "\\" in s else s


def mounts_at(path, pin=None):
    return [m for m in mountinfo(pin) if m[2] == path]


def ident(path):
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def inside_ident(pin, path):
    # stat -c %d prints the device number in decimal, as os.stat does.
    return nsenter(pin, "stat", "-c", "%d:%i", path).stdout.strip()


def ns_inode(pin):
    return os.stat(pin).st_ino


# --- the pin ------------------------------------------------------------------

def test_pin_is_an_nsfs_mount_of_a_mount_namespace(daemon):
    reply = daemon.create(101)
    assert reply["ok"] and reply["dir"] == daemon.job_dir(101) and reply["existing"] is False
    pin = daemon.pin(101)
    [m] = mounts_at(pin)
    assert m[4] == "nsfs"
    assert m[1] == f"mnt:[{ns_inode(pin)}]"
    fd = os.open(pin, os.O_RDONLY)
    try:
        assert kernel.ns_type(fd) == kernel.CLONE_NEWNS
    finally:
        os.close(fd)
    # The pin holds a namespace that is not ours, and entering it lands there.
    assert ns_inode(pin) != os.stat("/proc/self/ns/mnt").st_ino
    assert nsenter(pin, "readlink", "/proc/self/ns/mnt").stdout.strip() == f"mnt:[{ns_inode(pin)}]"
    # The pin directory is a private mount: a shared one would make the bind
    # fail with EINVAL and would copy pins into other namespaces.
    [nsdir] = mounts_at(f"{daemon.rundir}/ns")
    assert "shared:" not in nsdir[3]
    # And pins are never copied into jobs' namespaces.
    assert not [m for m in mountinfo(pin) if m[4] == "nsfs"]


def test_private_tmp_and_var_tmp_inside(daemon):
    assert daemon.create(102)["ok"]
    pin, jd = daemon.pin(102), daemon.job_dir(102)
    assert inside_ident(pin, "/tmp") == ident(f"{jd}/tmp")
    assert inside_ident(pin, "/var/tmp") == ident(f"{jd}/var_tmp")
    assert inside_ident(pin, "/tmp") != ident("/tmp")
    for target, sub in (("/tmp", "tmp"), ("/var/tmp", "var_tmp")):
        # The topmost mount there (mountinfo lists them in mount order);
        # below it may be the host's own, when its /tmp is a tmpfs.
        m = mounts_at(target, pin)[-1]
        assert m[1].endswith(f"/job.102.0/{sub}"), m
        assert len(mounts_at(target, pin)) == len(mounts_at(target)) + 1
        # nosuid,nodev: a user's /tmp is no way to run setuid binaries or
        # open devices, whatever the host's /tmp allows.
        assert {"nosuid", "nodev"} <= set(m[5].split(",")), m
    # The host's own /tmp is untouched by the job's mounts.
    assert not mounts_at("/tmp") or all("job.102" not in m[1] for m in mounts_at("/tmp"))


def test_files_written_inside_land_in_the_job_dir(daemon):
    assert daemon.create(103)["ok"]
    pin, jd = daemon.pin(103), daemon.job_dir(103)
    tag = uuid.uuid4().hex
    host_file = f"/tmp/privtmpd-test-host-{tag}"
    with open(host_file, "w") as f:
        f.write("host\n")
    try:
        r = nsenter(pin, "sh", "-c", f"echo inside > /tmp/f-{tag} && echo var > /var/tmp/v-{tag} && "
                                     f"ls -A /tmp && id -u", user=USER)
        assert r.stdout.split() == [f"f-{tag}", USER]     # the host's /tmp is not visible
        st = os.lstat(f"{jd}/tmp/f-{tag}")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        with open(f"{jd}/tmp/f-{tag}") as f:
            assert f.read() == "inside\n"
        with open(f"{jd}/var_tmp/v-{tag}") as f:
            assert f.read() == "var\n"
        assert not os.path.exists(f"/tmp/f-{tag}")
        assert not os.path.exists(f"/var/tmp/v-{tag}")
        # The user's /tmp is writable by its owner only (mode=0700 default).
        assert stat.S_IMODE(os.stat(f"{jd}/tmp").st_mode) == 0o700
    finally:
        os.unlink(host_file)


def test_two_processes_of_one_job_share_tmp(daemon):
    assert daemon.create(104)["ok"]
    pin = daemon.pin(104)
    a = subprocess.Popen(["nsenter", f"--mount={pin}", "--", "setpriv", f"--reuid={USER}", f"--regid={USER}",
                          "--clear-groups", "sh", "-c",
                          "echo from-a > /tmp/a; i=0; while [ ! -e /tmp/b ] && [ $i -lt 1200 ]; do "
                          "sleep 0.05; i=$((i+1)); done; cat /tmp/b"],
                         stdout=subprocess.PIPE, text=True)
    try:
        # Generous: each side is a fork and exec of nsenter and setpriv.
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{daemon.job_dir(104)}/tmp/a"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = nsenter(pin, "sh", "-c", "cat /tmp/a && echo from-b > /tmp/b", user=USER)
        assert r.stdout == "from-a\n"
        out, _ = a.communicate(timeout=120)
        assert out == "from-b\n"
    finally:
        a.kill()
        a.wait()


def test_two_jobs_are_isolated(daemon):
    assert daemon.create(105, uid=65534, gid=65534)["ok"]
    assert daemon.create(106, uid=0, gid=0)["ok"]
    p5, p6 = daemon.pin(105), daemon.pin(106)
    assert ns_inode(p5) != ns_inode(p6)
    assert inside_ident(p5, "/tmp") != inside_ident(p6, "/tmp")
    nsenter(p5, "sh", "-c", "echo secret > /tmp/secret && echo v > /var/tmp/secret", user=USER)
    r = nsenter(p6, "sh", "-c", "ls -A /tmp /var/tmp")
    assert "secret" not in r.stdout
    assert os.listdir(f"{daemon.job_dir(106)}/tmp") == []
    assert not os.path.exists("/tmp/secret") or open("/tmp/secret").read() != "secret\n"
    # Job 106 runs as root here: its directories belong to root.
    assert os.stat(f"{daemon.job_dir(106)}/tmp").st_uid == 0


# --- propagation ---------------------------------------------------------------------

@pytest.fixture
def shared_mnt():
    """A shared mount on the host, like those systemd makes (this VM has no
    systemd, so / itself is private here): the host's later mounts under it
    must reach jobs, a job's mounts must not reach the host."""
    top = f"/mnt/privtmpd-test-prop-{uuid.uuid4().hex[:8]}"
    os.makedirs(top)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "privtmpd-test", top], check=True)
    subprocess.run(["mount", "--make-shared", top], check=True)
    for d in ("late", "inner"):
        os.mkdir(f"{top}/{d}")
    yield top
    for m in sorted((m[2] for m in mountinfo() if m[2].startswith(top)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False)
    os.rmdir(top)


def test_propagation_host_to_job_only(daemon, shared_mnt):
    assert daemon.create(107)["ok"]
    pin = daemon.pin(107)
    # Inside, the host's shared mount is a slave: it receives, never sends.
    [m] = mounts_at(shared_mnt, pin)
    assert "master:" in m[3] and "shared:" not in m[3], m
    # Mounted on the host after the job started: visible inside.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "late", f"{shared_mnt}/late"], check=True)
    with open(f"{shared_mnt}/late/hello", "w") as f:
        f.write("from the host\n")
    assert nsenter(pin, "cat", f"{shared_mnt}/late/hello").stdout == "from the host\n"
    # Mounted inside the job: invisible on the host.
    host_tmp = mounts_at("/tmp")
    nsenter(pin, "sh", "-c", f"mount -t tmpfs -o size=1m inner {shared_mnt}/inner && "
                             f"echo job > {shared_mnt}/inner/f && mount -t tmpfs -o size=1m x /tmp")
    assert mounts_at(f"{shared_mnt}/inner", pin)
    assert not mounts_at(f"{shared_mnt}/inner")
    assert os.listdir(f"{shared_mnt}/inner") == []
    assert mounts_at("/tmp") == host_tmp
    # The job's own /tmp mount did not leak into its directory on the host either.
    assert not mounts_at(f"{daemon.job_dir(107)}/tmp")


def test_host_propagation_unchanged(daemon_factory, shared_mnt):
    def host_state():
        root = subprocess.run(["findmnt", "-no", "PROPAGATION", "/"], capture_output=True,
                              text=True, check=True).stdout.strip()
        # Propagation tags of every mount that existed before, by mount id.
        return root, {m[0]: (m[2], m[3]) for m in mountinfo()}

    before_root, before = host_state()
    d = daemon_factory()
    for job in (108, 109):
        assert d.create(job)["ok"]
        nsenter(d.pin(job), "true")
    d.destroy(108)
    after_root, after = host_state()
    assert after_root == before_root
    # Every pre-existing mount keeps its peer group and its master: the
    # original plugins ran `mount --make-rshared /` on the host.
    assert {k: after[k] for k in before if k in after} == before
    assert set(before) <= set(after)
    [m] = mounts_at(shared_mnt)
    assert "shared:" in m[3]


# --- configuration variants ------------------------------------------------------

@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("layout", ["base-under-tmp", "base-under-own-mount"])
def test_order_of_mounts_does_not_matter(daemon_factory, order, layout):
    """The base lies under a directory that is itself privatised (the
    original default base=/tmp/slurm with mount=/tmp): binding /tmp first
    hides the job's other source directories unless all are opened before
    the first mount, whatever the order in the config."""
    tag = uuid.uuid4().hex[:8]
    if layout == "base-under-tmp":
        parent = f"/tmp/privtmpd-test-order-{tag}"
        mounts = ["/tmp", "/var/tmp"]
    else:
        parent = f"{TEST_BASE_PARENT}/order-{tag}"
        mounts = [parent, "/var/tmp"]     # sorts before /var/tmp: bound first
    if order == "reverse":
        mounts.reverse()
    d = daemon_factory(start=False, base_parent=parent, name=f"order-{tag}")
    d.text = (f"base={parent}/job\n" + "".join(f"mount={m}\n" for m in mounts) + f"rundir={d.rundir}\n")
    d.start()
    assert d.create(110)["ok"]
    pin, jd = d.pin(110), d.job_dir(110)
    for m in mounts:
        sub = m.strip("/").replace("/", "_")
        assert inside_ident(pin, m) == ident(f"{jd}/{sub}"), m
    nsenter(pin, "sh", "-c", " && ".join(f"echo x > {m}/written" for m in mounts), user=USER)
    for m in mounts:
        sub = m.strip("/").replace("/", "_")
        assert os.listdir(f"{jd}/{sub}") == ["written"]


def test_private_dev_shm(daemon_factory):
    d = daemon_factory(extra="shm=16m")
    assert d.create(111)["ok"]
    pin = d.pin(111)
    [m] = [m for m in mountinfo(pin) if m[2] == "/dev/shm"][-1:]
    assert m[4] == "tmpfs"
    out = nsenter(pin, "findmnt", "-no", "OPTIONS", "--target", "/dev/shm").stdout
    assert "size=16384k" in out, out
    tag = uuid.uuid4().hex
    nsenter(pin, "sh", "-c", f"echo x > /dev/shm/privtmpd-test-{tag}", user=USER)
    assert not os.path.exists(f"/dev/shm/privtmpd-test-{tag}")
    # The host /dev/shm is not mounted over.
    assert all(x[1] == "/" for x in mounts_at("/dev/shm"))


@pytest.mark.root
def test_mount_made_inside_the_job_is_neither_leaked_nor_traversed(daemon):
    """A bind mount made inside the job's namespace (root in the job, or a
    setuid helper) over a directory in the job's /tmp: the host never sees
    it, and teardown never deletes through it."""
    canary = f"{daemon.rundir}-canary"
    os.makedirs(canary, exist_ok=True)
    with open(f"{canary}/keep", "w") as f:
        f.write("canary\n")
    try:
        assert daemon.create(9101)["ok"]
        pin = daemon.pin(9101)
        subprocess.run(["nsenter", f"--mount={pin}", "--", "sh", "-c",
                        f"mkdir /tmp/m && mount --bind {canary} /tmp/m && test -e /tmp/m/keep"], check=True)
        with open("/proc/self/mountinfo") as f:
            assert "/tmp/m " not in f.read()                  # not leaked to the host
        assert os.listdir(f"{daemon.job_dir(9101)}/tmp/m") == []   # the host sees the plain directory
        assert daemon.destroy(9101)["ok"]
        daemon.wait_removals()
        assert not os.path.exists(daemon.job_dir(9101))
        assert open(f"{canary}/keep").read() == "canary\n"    # never deleted through the mount
    finally:
        shutil.rmtree(canary, ignore_errors=True)


def test_daemon_stays_in_the_host_namespace_with_one_thread(daemon):
    """Each job's namespace is built by a thread of its own that ends:
    after many creates the daemon still has a single thread, and it is in
    the host's mount namespace, not in any job's."""
    host = os.readlink("/proc/self/ns/mnt")
    pid = daemon.proc.pid
    pins = set()
    for job in range(700, 720):
        assert daemon.create(job)["ok"]
        pins.add(os.stat(daemon.pin(job)).st_ino)
    assert len(pins) == 20
    assert os.readlink(f"/proc/{pid}/ns/mnt") == host
    # Thread.join() returns once the thread's Python state is gone; the
    # kernel task leaves /proc a moment later (glibc's thread exit runs
    # after), so a build thread may still be listed for a few microseconds.
    deadline = time.monotonic() + 5
    while os.listdir(f"/proc/{pid}/task") != [str(pid)] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.listdir(f"/proc/{pid}/task") == [str(pid)]
    for job in range(700, 720):
        assert daemon.destroy(job)["ok"]


def test_namespace_thread_abandoned_on_timeout(monkeypatch):
    """A namespace build that hangs (a mount point that does not answer)
    fails the create after the timeout; when the thread finally ends, the
    namespace it made is closed, not leaked.  The hang is simulated: no
    real mount point can be made to hang on cue."""
    import threading

    from privtmpd import namespace

    release = threading.Event()

    def slow_setup(binds, shm, opened, tmpfs=(), job=0):
        release.wait(10)
        return os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)

    monkeypatch.setattr(namespace, "_setup_in", slow_setup)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(namespace.NamespaceError, match="timed out"):
        namespace.build_namespace([], None, timeout=0.2)
    [t] = [t for t in threading.enumerate() if t.name == "privtmpd-ns"]
    release.set()
    t.join(10)
    assert not t.is_alive()
    assert set(os.listdir("/proc/self/fd")) == fds, "the abandoned namespace's fd leaked"


def test_namespace_thread_error_keeps_its_type(tmp_path):
    """An error in the thread reaches the daemon as raised there (a
    KernelError names the syscall and the path), with no fd left open."""
    from privtmpd import namespace

    fds = set(os.listdir("/proc/self/fd"))
    src = tmp_path / "gone"
    src.mkdir()
    st = os.stat(src)
    src.rmdir()
    with pytest.raises(OSError) as e:
        namespace.build_namespace([("/tmp", str(src), st.st_dev, st.st_ino)], None)
    assert str(src) in str(e.value) or "gone" in str(e.value)
    assert set(os.listdir("/proc/self/fd")) == fds

"""The SPANK entry helper (spank/privtmpd_spank.c) on a real Slurm cluster.

The daemon is not involved: a test Prolog pins a mount namespace by hand,
the way privtmpd does (a holder process unshares, binds a prepared
root-owned directory onto /tmp, and its /proc/<pid>/ns/mnt is bind-mounted
onto <rundir>/ns/<jobid>), and a test Epilog unpins it.  What is checked is
the helper's contract: a task with a valid pin runs in that namespace with
TMPDIR=/tmp, and a task without one (or with a bad one) fails instead of
running on the host /tmp.

Needs root, gcc, make, util-linux and the Debian Slurm packages.  Skipped
otherwise, unless PRIVTMPD_REQUIRE_PRIVILEGED=1, which turns the skip into a
failure (for CI, where a silently skipped suite would prove nothing).
"""

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import localcluster  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.slurm]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNDIR = "/run/privtmpd-spanktest"
# Not under /tmp: an srun started inside a batch job runs in the private
# namespace and must still find the plugin, slurm.conf and its cwd.
BASE = "/var/lib/privtmpd-test/spanktest"
USER = "privtmp1"

PROLOG = r"""#!/bin/sh
# Test Prolog: pin a private mount namespace for the job by hand.
# Runs as root with no PATH, in the host mount namespace.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
RUN=@RUNDIR@
id=$SLURM_JOB_ID
case $id in ''|*[!0-9]*) exit 1 ;; esac
mode=$(cat "$RUN/mode" 2>/dev/null)
echo "$id ${mode:=pin}" >> "$RUN/prolog.log"
case $mode in
nopin) exit 0 ;;
stale) : > "$RUN/ns/$id"; exit 0 ;;
fifo) mkfifo "$RUN/ns/$id"; exit 0 ;;
netns) : > "$RUN/ns/$id"; exec mount --bind /proc/self/ns/net "$RUN/ns/$id" ;;
esac
priv=$RUN/priv/$id
rm -rf "$priv" "$RUN/holders/$id"
mkdir -m 1777 "$priv" || exit 1
echo "private-$id" > "$priv/marker"
# The holder gets its own session and no inherited pipes: slurmd waits for
# the Prolog's output to close and may kill its process group.
setsid -f unshare --mount --propagation slave sh -c \
    'mount --bind "$1" /tmp && echo $$ > "$2.new" && mv "$2.new" "$2" &&
     exec sleep 3600' holder "$priv" "$RUN/holders/$id" \
    </dev/null >/dev/null 2>&1
i=0
while [ ! -s "$RUN/holders/$id" ]; do
    i=$((i + 1)); [ $i -gt 1000 ] && exit 1
    sleep 0.01
done
ns=/proc/$(cat "$RUN/holders/$id")/ns/mnt
# symlink: a real namespace, but reached through a symlink.
[ "$mode" = symlink ] && exec ln -s "$ns" "$RUN/ns/$id"
: > "$RUN/ns/$id"
exec mount --bind "$ns" "$RUN/ns/$id"
"""

EPILOG = r"""#!/bin/sh
# Test Epilog: unpin and stop the holder.  Never fails (that would drain
# the node).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
RUN=@RUNDIR@
id=$SLURM_JOB_ID
case $id in ''|*[!0-9]*) exit 0 ;; esac
echo "$id" >> "$RUN/epilog.log"
while umount "$RUN/ns/$id" 2>/dev/null; do :; done
rm -f "$RUN/ns/$id"
if [ -s "$RUN/holders/$id" ]; then
    kill "$(cat "$RUN/holders/$id")" 2>/dev/null
fi
rm -rf "$RUN/holders/$id" "$RUN/priv/$id"
exit 0
"""


def _missing_requirements():
    if os.geteuid() != 0:
        return "needs root (mounts, namespaces, Slurm daemons)"
    for tool in ("slurmctld", "slurmd", "srun", "sbatch", "munged", "make",
                 "gcc", "unshare", "setsid", "mount", "umount", "runuser"):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":"
                            + localcluster.SBIN_PATH):
            return f"{tool} not installed"
    if not os.path.exists("/usr/include/slurm/spank.h"):
        return "slurm/spank.h missing (install libslurm-dev)"
    return None


def _require():
    reason = _missing_requirements()
    if reason:
        if os.environ.get("PRIVTMPD_REQUIRE_PRIVILEGED") == "1":
            pytest.fail(f"PRIVTMPD_REQUIRE_PRIVILEGED=1 but {reason}")
        pytest.skip(reason)


# ------------------------------------------------------------ mount helpers
def _mounts_under(top):
    """Mount points at or below top, deepest (last mounted) first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == top or mnt.startswith(top + "/"):
                found.append(mnt)
    return found[::-1]


def _kill_holders():
    d = os.path.join(RUNDIR, "holders")
    if not os.path.isdir(d):
        return
    for name in os.listdir(d):
        try:
            with open(os.path.join(d, name)) as f:
                pid = int(f.read().split()[0])
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "sleep":
                    continue
            os.kill(pid, 9)
        except (OSError, ValueError, IndexError):
            pass


def _teardown_rundir():
    """Remove every pin, holder and directory of this suite, including the
    leftovers of an interrupted earlier run."""
    _kill_holders()
    for _ in range(10):
        mounts = _mounts_under(RUNDIR)
        if not mounts:
            break
        for mnt in mounts:
            if subprocess.run(["umount", mnt], capture_output=True).returncode:
                subprocess.run(["umount", "-l", mnt], capture_output=True)
    assert not _mounts_under(RUNDIR), "cannot unmount " + RUNDIR
    # Nothing is mounted below RUNDIR any more, so rmtree stays on this fs.
    shutil.rmtree(RUNDIR, ignore_errors=True)
    if os.path.islink(RUNDIR + "-link"):
        os.unlink(RUNDIR + "-link")


def _setup_rundir():
    _teardown_rundir()
    for sub in ("", "ns", "holders", "priv"):
        os.mkdir(os.path.join(RUNDIR, sub), 0o755)
    ns = os.path.join(RUNDIR, "ns")
    # An ns file can only be bound onto a file on a private mount.
    subprocess.run(["mount", "--bind", ns, ns], check=True)
    subprocess.run(["mount", "--make-private", ns], check=True)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def plugin():
    _require()
    os.makedirs(BASE, mode=0o755, exist_ok=True)
    for old in glob.glob(os.path.join(BASE, "lib-*")):  # interrupted runs
        shutil.rmtree(old, ignore_errors=True)
    d = tempfile.mkdtemp(prefix="lib-", dir=BASE)
    os.chmod(d, 0o755)  # srun loads the plugin as the job user
    try:
        r = subprocess.run(["make", "-C", os.path.join(REPO, "spank"),
                            f"BUILDDIR={d}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "warning" not in r.stderr, r.stderr
        yield os.path.join(d, "privtmpd_spank.so")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(plugin):
    hooks = os.path.join(BASE, "hooks")
    os.makedirs(hooks, mode=0o755, exist_ok=True)
    paths = {}
    for name, text in (("prolog", PROLOG), ("epilog", EPILOG)):
        paths[name] = os.path.join(hooks, name)
        with open(paths[name], "w") as f:
            f.write(text.replace("@RUNDIR@", RUNDIR))
        os.chmod(paths[name], 0o755)
    c = localcluster.LocalCluster(
        os.path.join(BASE, "cluster"), prolog=paths["prolog"],
        epilog=paths["epilog"], plugstack_lines=[plugstack_line(plugin)])
    c.plugin = plugin
    try:
        _setup_rundir()
        c.ensure_users()
        c.start()
        yield c
    finally:
        c.stop()  # cancels what is left, so Epilogs unpin before we sweep
        _teardown_rundir()


def plugstack_line(plugin, *args):
    args = args or (f"rundir={RUNDIR}", "tmpdir=/tmp")
    return " ".join(("required", plugin) + args)


@pytest.fixture
def mode(cluster):
    """Tell the test Prolog how to pin the next jobs (pin, nopin, ...)."""
    def set_mode(value):
        with open(os.path.join(RUNDIR, "mode"), "w") as f:
            f.write(value + "\n")
    set_mode("pin")
    yield set_mode
    set_mode("pin")
    cluster.write_plugstack([plugstack_line(cluster.plugin)])
    os.chmod(os.path.join(RUNDIR, "ns"), 0o755)
    cluster.wait_idle()
    cluster.assert_not_drained()


@pytest.fixture
def scratch(cluster):
    """An existing directory the user may write to, as a site would export
    in TMPDIR: Slurm keeps such a TMPDIR (it only falls back to /tmp when
    the directory cannot be created), so only the helper can override it."""
    d = os.path.join(cluster.user_dir(USER), "scratch")
    os.makedirs(d, exist_ok=True)
    pw = pwd.getpwnam(USER)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def _fields(text):
    """'k=v k2=v2' lines -> list of dicts."""
    rows = []
    for line in text.splitlines():
        if "=" in line:
            rows.append(dict(f.partition("=")[::2] for f in line.split()))
    return rows


def _host_ns():
    return os.readlink("/proc/self/ns/mnt")


def _canary():
    return "/tmp/privtmpd-spanktest-canary-" + uuid.uuid4().hex


# -------------------------------------------------------------------- tests
REPORT = ('echo "job=$SLURM_JOB_ID marker=$(cat /tmp/marker) '
          'tmpdir=$TMPDIR cwd=$(pwd) ns=$(readlink /proc/self/ns/mnt)"')


def test_task_enters_private_tmp(cluster, mode, scratch):
    canary = _canary()
    r = cluster.srun(USER, ["-n2", "sh", "-c", REPORT + f"; touch {canary}"],
                     env={"TMPDIR": scratch})
    assert r.returncode == 0, r.stderr + cluster.logs()
    rows = _fields(r.stdout)
    assert len(rows) == 2, r.stdout
    jobid = rows[0]["job"]
    for row in rows:
        assert row["marker"] == f"private-{jobid}"
        # An inherited TMPDIR must not win over the private /tmp.
        assert row["tmpdir"] == "/tmp"
        # setns() resets cwd to /; slurmstepd restores the job's cwd.
        assert row["cwd"] == cluster.user_dir(USER)
        assert row["ns"] != _host_ns()
    assert rows[0]["ns"] == rows[1]["ns"]
    assert not os.path.exists(canary), "task wrote to the host /tmp"


BATCH = f"""#!/bin/sh
{REPORT} | sed 's/^/batch /'
echo shared > /tmp/shared-$SLURM_JOB_ID
srun -n2 sh -c '{REPORT} | sed "s/^/step /";
                echo "shared=$(cat /tmp/shared-$SLURM_JOB_ID)";
                echo step >> /tmp/steps'
srun sh -c 'echo "later steps=$(wc -l < /tmp/steps)"'
"""


def test_batch_script_and_steps_share_private_tmp(cluster, mode, scratch):
    jobid, out = r = cluster.sbatch(USER, BATCH, args=["-n2"],
                                    env={"TMPDIR": scratch})
    assert r.returncode == 0 and r.state == "COMPLETED", out + cluster.logs()
    rows = _fields(out)
    reports = [row for row in rows if "marker" in row]
    assert len(reports) == 3, out  # the batch script and two step tasks
    for row in reports:
        assert row["job"] == jobid
        assert row["marker"] == f"private-{jobid}"
        assert row["tmpdir"] == "/tmp"
        assert row["cwd"] == cluster.user_dir(USER)
        assert row["ns"] == reports[0]["ns"] != _host_ns()
    assert sum(1 for row in rows if row.get("shared") == "shared") == 2, out
    assert "later steps=2" in out
    assert not os.path.exists(f"/tmp/shared-{jobid}")


@pytest.mark.parametrize("how, expect", [
    ("nopin", "no private namespace for this job"),
    ("stale", "stale pin"),
    ("fifo", "not a namespace"),
    ("netns", "not a mount namespace"),
    ("symlink", "Too many levels of symbolic links"),
])
def test_task_fails_without_valid_pin(cluster, mode, how, expect):
    mode(how)
    canary = _canary()
    r = cluster.srun(USER, ["sh", "-c", f"touch {canary}; echo RAN"])
    assert r.returncode != 0
    assert "RAN" not in r.stdout
    assert "privtmpd: " in r.stderr and expect in r.stderr, r.stderr
    assert not os.path.exists(canary), "task ran on the host /tmp"


def test_batch_script_fails_without_pin(cluster, mode):
    mode("nopin")
    canary = _canary()
    r = cluster.sbatch(USER, f"#!/bin/sh\ntouch {canary}\necho RAN\n")
    assert r.state != "COMPLETED" and r.returncode != 0, (r, r.state)
    assert "RAN" not in r.output
    assert not os.path.exists(canary), "batch script ran on the host /tmp"


def test_refuses_writable_pin_directory(cluster, mode):
    os.chmod(os.path.join(RUNDIR, "ns"), 0o775)
    r = cluster.srun(USER, ["echo", "RAN"])
    assert r.returncode != 0 and "RAN" not in r.stdout
    assert "privtmpd: " in r.stderr and "writable" in r.stderr, r.stderr


def test_refuses_symlink_in_rundir(cluster, mode):
    os.symlink(RUNDIR, RUNDIR + "-link")
    cluster.write_plugstack([plugstack_line(
        cluster.plugin, f"rundir={RUNDIR}-link")])
    r = cluster.srun(USER, ["echo", "RAN"])
    assert r.returncode != 0 and "RAN" not in r.stdout
    assert "privtmpd: " in r.stderr and "symlink" in r.stderr, r.stderr


@pytest.mark.parametrize("args, expect", [
    (("rundir=relative/dir",), "absolute"),
    ((f"rundir={RUNDIR}", "bogus=1"), "bogus=1"),
    (("tmpdir=",), "tmpdir="),
    ((f"rundir={RUNDIR}", "shm=0%"), "shm=0%"),
    ((f"rundir={RUNDIR}", "shm=50"), "shm=50"),
    ((f"rundir={RUNDIR}", "shm=+5%"), "shm=+5%"),
    ((f"rundir={RUNDIR}", "create=no"), "create=no"),
])
def test_bad_plugin_arguments_fail_the_task(cluster, mode, args, expect):
    cluster.write_plugstack([plugstack_line(cluster.plugin, *args)])
    r = cluster.srun(USER, ["echo", "RAN"])
    assert r.returncode != 0 and "RAN" not in r.stdout
    assert "privtmpd: " in r.stderr and expect in r.stderr, r.stderr


def test_tmpdir_none_leaves_tmpdir_alone(cluster, mode, scratch):
    cluster.write_plugstack([plugstack_line(
        cluster.plugin, f"rundir={RUNDIR}", "tmpdir=none")])
    r = cluster.srun(USER, ["sh", "-c", REPORT], env={"TMPDIR": scratch})
    assert r.returncode == 0, r.stderr
    row, = _fields(r.stdout)
    assert row["marker"] == f"private-{row['job']}"
    assert row["tmpdir"] == scratch


def test_node_not_drained_and_pins_released(cluster, mode):
    # Every failure mode above, back to back, then a good job.
    for how in ("nopin", "stale", "fifo", "netns", "symlink"):
        mode(how)
        assert cluster.srun(USER, ["true"]).returncode != 0
    mode("nopin")
    cluster.sbatch(USER, "#!/bin/sh\ntrue\n")
    mode("pin")
    r = cluster.srun(USER, ["cat", "/tmp/marker"])
    assert r.returncode == 0 and r.stdout.startswith("private-"), r.stderr
    cluster.wait_idle()
    cluster.assert_not_drained()
    assert "IDLE" == cluster.node_state()
    # The Epilogs unpinned everything and stopped every holder.
    assert _mounts_under(os.path.join(RUNDIR, "ns")) == \
        [os.path.join(RUNDIR, "ns")]
    assert os.listdir(os.path.join(RUNDIR, "ns")) == []
    assert os.listdir(os.path.join(RUNDIR, "holders")) == []

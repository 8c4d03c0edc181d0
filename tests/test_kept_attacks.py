"""keep_failed= under attack by the kept directory's own user: foreign
entries renamed in, predictable names, hard links, huge trees.  Each case
failed on the version before its fix."""

import os
import secrets
import subprocess
import time

import pytest

from cli import wait_for
from harness import TEST_BASE_PARENT
from privtmpd import client, config, jobdirs, kernel, safefs

pytestmark = pytest.mark.root

ATTACKER, VICTIM = 4085201, 4085202      # uids of their own, no passwd entry needed


def as_user(uid, *argv, check=True):
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, check=check)


def _kept_path(d, job, exit_code="256"):
    reply = d.request(op="destroy", job=str(job), exit_code=exit_code)
    assert reply["ok"] and len(reply["kept"]) == 1, reply
    return reply["kept"][0]


@pytest.fixture
def drop():
    """A world-writable directory without the sticky bit, on the filesystem
    of the job directories (a shared drop box, a careless 0777 directory)."""
    path = f"{TEST_BASE_PARENT}/drop-{secrets.token_hex(4)}"
    os.makedirs(path)
    os.chmod(path, 0o777)
    yield path
    subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)


def victims_dir(drop):
    """The victim's files in drop: a directory anyone may move (0777), and
    in it one that only the victim may change."""
    os.makedirs(f"{drop}/vdir/sub")
    with open(f"{drop}/vdir/sub/secret", "w") as f:
        f.write("the victim's\n")
    for p in (f"{drop}/vdir", f"{drop}/vdir/sub", f"{drop}/vdir/sub/secret"):
        os.chown(p, VICTIM, VICTIM)
    os.chmod(f"{drop}/vdir", 0o777)
    os.chmod(f"{drop}/vdir/sub", 0o755)


def test_removing_a_kept_directory_never_deletes_what_its_user_could_not(daemon_factory, drop, figures):
    d = daemon_factory("keep_failed=3s keep_max=1g")
    assert d.create(7101, uid=ATTACKER, gid=ATTACKER)["ok"]
    kept = _kept_path(d, 7101)
    victims_dir(drop)
    assert as_user(ATTACKER, "rm", "-rf", f"{drop}/vdir/sub", check=False).returncode != 0
    assert os.path.exists(f"{drop}/vdir/sub/secret")
    # The attacker's own files, some behind modes they set themselves.
    as_user(ATTACKER, "sh", "-c", f"cd {kept}/tmp && mkdir -p a/b && touch a/b/f own && chmod 0 a/b a")
    # From a host shell: the victim's directory into the kept directory.
    as_user(ATTACKER, "mv", f"{drop}/vdir", f"{kept}/tmp/loot")
    wait_for(lambda: "op=remove result=incomplete" in d.log(), timeout=30, what="the kept directory's removal")
    left = [os.path.join(dp, f) for dp, _, fs in os.walk(d.base_parent) for f in fs]
    assert any(p.endswith("/loot/sub/secret") for p in left), (left, d.log())
    # Everything the attacker could remove is gone; what is left is the victim's.
    assert not [p for p in left if p.endswith(("/own", "/a/b/f"))], left
    for p in left:
        assert os.lstat(p).st_uid == VICTIM, p
    assert "Permission denied" in d.log()
    figures("another user's directory renamed into a kept directory, which then expires",
            victim_files_left=len(left), attacker_files_left=0, canary_intact=True)


def test_sbcast_job_directory_is_removed_with_its_users_rights(daemon_factory, drop):
    """sbcast=yes opens a running job's directory to its user on the host,
    as keeping does: the same attack, at the job's end, must leave the
    victim's file too.  Root removed it before this was fixed."""
    d = daemon_factory("sbcast=yes")
    assert d.create(7111, uid=ATTACKER, gid=ATTACKER)["ok"]
    victims_dir(drop)
    as_user(ATTACKER, "mv", f"{drop}/vdir", f"{d.job_dir(7111)}/tmp/loot")
    assert d.destroy(7111)["ok"]
    wait_for(lambda: "op=remove result=incomplete" in d.log(), timeout=30, what="the job directory's removal")
    left = [os.path.join(dp, f) for dp, _, fs in os.walk(d.base_parent) for f in fs]
    assert any(p.endswith("/loot/sub/secret") for p in left), (left, d.log())
    for p in left:
        assert os.lstat(p).st_uid == VICTIM, p


def test_a_kept_directory_of_the_users_own_is_removed_whatever_its_modes(daemon_factory):
    d = daemon_factory("keep_failed=2s keep_max=1g")
    assert d.create(7102, uid=ATTACKER, gid=ATTACKER)["ok"]
    kept = _kept_path(d, 7102)
    as_user(ATTACKER, "sh", "-c", f"cd {kept}/tmp && mkdir -p x/y/z && touch x/y/z/f x/y/g && "
                                  f"chmod 0 x/y/z && chmod 500 x/y && chmod 0 x && chmod 0 {kept}/var_tmp")
    wait_for(lambda: not os.path.exists(kept) and "op=remove result=ok" in d.log(), timeout=30,
             what="the kept directory's removal")
    assert not [n for n in os.listdir(d.base_parent) if ".7102." in n]


def test_kept_names_cannot_be_guessed(daemon_factory, figures):
    """Every name an earlier version would have used is taken by another
    user beforehand: the job is kept all the same."""
    d = daemon_factory("keep_failed=1h keep_max=1g")
    assert d.create(7103, uid=VICTIM, gid=VICTIM)["ok"]
    now = int(time.time()) + 3600
    for until in range(now - 2, now + 30):
        as_user(ATTACKER, "mkdir", f"{d.base_parent}/job.7103.0.kept.{until}.256")
    kept = _kept_path(d, 7103)
    assert os.stat(kept).st_uid == 0 and os.stat(f"{kept}/tmp").st_uid == VICTIM
    figures("every kept name of the old scheme pre-created by another user", attempts=32, failures=0)


def test_a_failure_to_keep_is_logged(tmp_path, monkeypatch):
    """When no kept name can be had, the directory is removed as usual and
    the reason reaches the log (keep_if_ours says why)."""
    base = tmp_path / "b"
    base.mkdir()
    cfg = config.parse(f"base={base}/job")
    (base / "job.5.0").mkdir()
    monkeypatch.setattr(jobdirs, "_nonce", lambda: "ab")
    (base / f"job.5.0.kept.{int(time.time())}.1.ab").mkdir()
    pfd = safefs.open_dir(str(base))
    try:
        name, why = jobdirs.keep_if_ours(pfd, cfg, "job.5.0", 5, 0, time.time(), 1)
    finally:
        os.close(pfd)
    assert name is None and "taken" in why
    assert (base / "job.5.0").is_dir()


# --- sizes: each inode once, the biggest user evicted first --------------

def _fill(d, job, uid, mib, links=0):
    """mib MiB of data in the job's /tmp (and `links` more names for it)."""
    assert d.create(job, uid=uid, gid=uid)["ok"]
    path = f"{d.job_dir(job)}/tmp/blob"
    with open(path, "wb") as f:
        f.write(os.urandom(mib << 20))
    os.chown(path, uid, uid)
    for i in range(links):
        os.link(path, f"{path}.{i}")
    return _kept_path(d, job)


def _measured(d, paths):
    reply = d.request(op="list")
    assert reply["ok"], reply
    kept = {k["path"]: k["bytes"] for k in reply["kept"]}
    return all(kept.get(p) is not None for p in paths if os.path.exists(p))


def test_hard_links_count_once_and_evict_nobody(daemon_factory, figures):
    d = daemon_factory("keep_failed=1h keep_max=4m")
    victim = _fill(d, 7201, VICTIM, 2)
    time.sleep(1.1)                                 # distinct expiry: the victim's is the oldest
    attacker = _fill(d, 7202, ATTACKER, 1, links=100)
    wait_for(lambda: _measured(d, [victim, attacker]), timeout=20, what="both kept directories measured")
    time.sleep(1)
    assert os.path.exists(victim), d.log()
    sizes = {k["path"]: k["bytes"] for k in d.request(op="list")["kept"]}
    assert sizes[attacker] < 2 << 20, sizes         # 1 MiB linked 100 times is 1 MiB
    figures("1 MiB hard-linked 100 times in a kept directory, keep_max=4m", counted_bytes=sizes[attacker],
            victim_evicted=False)


def test_keep_max_evicts_the_biggest_users_own_first(daemon_factory, figures):
    d = daemon_factory("keep_failed=1h keep_max=5m")
    victim = _fill(d, 7211, VICTIM, 1)
    time.sleep(1.1)
    first = _fill(d, 7212, ATTACKER, 2)
    time.sleep(1.1)
    second = _fill(d, 7213, ATTACKER, 2)           # 5 MiB + directories: over keep_max
    wait_for(lambda: not os.path.exists(first), timeout=20, what="eviction of the attacker's oldest")
    assert os.path.exists(victim) and os.path.exists(second), d.log()
    figures("over keep_max: 1 MiB of one user's (oldest), 2 x 2 MiB of another's", evicted="the 2nd user's oldest",
            victim_evicted=False)


def test_measuring_a_huge_kept_directory_does_not_hold_up_prologs(daemon_factory, figures):
    """No work that grows with user data in one turn of the daemon: a kept
    directory of 150 000 files is measured in steps between requests."""
    d = daemon_factory("keep_failed=1h keep_max=10g")
    assert d.create(7221, uid=VICTIM, gid=VICTIM)["ok"]
    top = f"{d.job_dir(7221)}/tmp"
    for i in range(150):
        os.mkdir(f"{top}/d{i}")
        for j in range(1000):
            os.close(os.open(f"{top}/d{i}/{j}", os.O_WRONLY | os.O_CREAT, 0o600))
    t0 = time.monotonic()
    kept = _kept_path(d, 7221)                      # measuring starts after this reply
    worst, n, job = 0.0, 0, 7300
    while not _measured(d, [kept]):
        assert time.monotonic() - t0 < 120, "the kept directory was never measured"
        t = time.monotonic()
        client.request({"op": "create", "job": str(job), "restart": "0", "uid": "1", "gid": "1"},
                       d.socket, timeout=60)
        worst = max(worst, time.monotonic() - t)
        client.request({"op": "destroy", "job": str(job)}, d.socket, timeout=60)
        job, n = job + 1, n + 1
    took = time.monotonic() - t0
    figures("prolog latency while a 150k-file kept dir is measured",
            worst_prolog_ms=round(worst * 1000, 1), prologs=n, measure_s=round(took, 2))
    assert n >= 5, f"only {n} Prologs during the measurement ({took:.2f} s)"
    assert worst < 0.25, f"a Prolog waited {worst * 1000:.0f} ms while the kept directory was measured"


def _hanging_fuse(path, uid, allow_other):
    """A FUSE mount at path that never answers (nothing reads /dev/fuse),
    owned by uid as a user's fusermount3 would make it: with allow_other
    (user_allow_other in /etc/fuse.conf) root's requests wait for ever;
    without, root gets EACCES.  Returns the fd; closing it aborts the
    connection and frees whoever waits on it."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    kernel.mount("privtmpd-test-hang", path, "fuse", kernel.MS_NOSUID | kernel.MS_NODEV,
                 f"fd={fd},rootmode=40000,user_id={uid},group_id={uid}" + (",allow_other" if allow_other else ""))
    return fd


def test_a_hanging_fuse_mount_cannot_stop_the_daemon(daemon_factory, figures):
    """A user mounts a FUSE filesystem that never answers inside their kept
    directory and on a squatted kept name: a plain lstat of either would
    block the daemon's only thread, and with it every Prolog."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    d = daemon_factory("keep_failed=1h keep_max=1g")
    assert d.create(7231, uid=ATTACKER, gid=ATTACKER)["ok"]
    kept = _kept_path(d, 7231)
    inside, squat = f"{kept}/tmp/m", f"{d.base_parent}/job.7232.0.kept.9999999999.0"
    denying, next_job = f"{d.base_parent}/job.7234.0.kept.9999999999.0", d.job_dir(7235)
    mounts = [(inside, True), (squat, True), (denying, False), (next_job, True)]
    for p, _ in mounts:
        os.mkdir(p)
        os.chown(p, ATTACKER, ATTACKER)
    fds = []
    try:
        fds = [_hanging_fuse(p, ATTACKER, other) for p, other in mounts]
        # A mount squatting the next job's path: its Prolog still succeeds.
        assert d.create(7235, uid=VICTIM, gid=VICTIM)["ok"]
        assert os.stat(d.job_dir(7235)).st_uid == 0
        assert d.create(7233, uid=VICTIM, gid=VICTIM)["ok"]
        _kept_path(d, 7233)                         # measuring starts after this reply
        worst = 0.0
        for i in range(20):
            t = time.monotonic()
            # A daemon stuck on the FUSE mount would never answer: a long
            # timeout still fails it, a busy machine's slow create does not.
            assert client.request({"op": "create", "job": str(7300 + i), "restart": "0", "uid": "1", "gid": "1"},
                                  d.socket, timeout=60)["ok"]
            worst = max(worst, time.monotonic() - t)
            time.sleep(0.05)
        wait_for(lambda: _measured(d, [kept]), timeout=20, what="the kept directory measured")
        figures("FUSE mounts that never answer, in a kept directory and on a squatted name",
                worst_prolog_ms=round(worst * 1000, 1), failures=0)
    finally:
        for fd in fds:
            os.close(fd)
        for p, _ in mounts:
            subprocess.run(["umount", "-l", p], stderr=subprocess.DEVNULL)

"""Optional features, against a real daemon (root): per-job /dev/shm
sized from the job's memory (shm=job), keeping a failed job's directories
(keep_failed=, keep_max=), and their configuration checks."""

import json
import os
import stat
import subprocess
import time

import pytest

from cli import ctl, wait_for
from harness import nsenter
from privtmpd import client, config, protocol

root = pytest.mark.root


# --- configuration ---------------------------------------------------------

def test_shm_job_share_parses():
    assert config.parse("shm=job").shm == "job:100%"
    assert config.parse("shm=job:50%").shm == "job:50%"
    assert config.parse("shm=512m").shm == "512m"


@pytest.mark.parametrize("text, message", [
    ("shm=job:50", "the share after 'job:' is a percentage"),
    ("shm=job:0%", "1%..100%"),
    ("shm=job:101%", "1%..100%"),
    ("shm=jobs", "is not a size"),
    ("keep_failed=2x", "is not a duration"),
    ("keep_failed=0s", "between 1s and 365d"),
    ("keep_failed=400d", "between 1s and 365d"),
    ("keep_max=1g", "no effect without keep_failed"),
    ("keep_failed=1h keep_max=lots", "is not a size"),
    ("keep_failed=1h keep_max=0", "is not a size"),
])
def test_feature_keys_are_checked_with_file_and_line(text, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse(f"base=/tmp/slurm\n{text}\n", "/etc/privtmpd/privtmpd.conf")
    assert str(e.value).startswith("/etc/privtmpd/privtmpd.conf:2: ")
    assert message in str(e.value)


def test_keep_durations_and_sizes():
    cfg = config.parse("keep_failed=30m keep_max=2g")
    assert (cfg.keep_failed, cfg.keep_max) == (1800, 2 << 30)
    assert config.parse("keep_failed=7d").keep_failed == 7 * 86400
    assert config.parse("keep_failed=no").keep_failed == 0
    assert config.parse("").keep_failed == 0


def test_destroy_exit_code_field():
    op, f = protocol.parse_request(b'{"op":"destroy","job":"5","exit_code":"256"}\n')
    assert f["exit_code"] == 256
    with pytest.raises(protocol.ProtocolError, match="exit code"):
        protocol.parse_request(b'{"op":"destroy","job":"5","exit_code":"-1"}\n')


@pytest.mark.parametrize("env, sent", [
    ({"SLURM_JOB_EXIT_CODE": "256", "SLURM_JOB_DERIVED_EC": "0"}, "256"),
    ({"SLURM_JOB_EXIT_CODE": "0", "SLURM_JOB_DERIVED_EC": "9"}, "9"),
    ({"SLURM_JOB_EXIT_CODE": "0", "SLURM_JOB_DERIVED_EC": "0"}, None),
    ({"SLURM_JOB_EXIT_CODE": "-3"}, None),         # never fail the Epilog on a strange value
    ({}, None),
])
def test_epilog_sends_the_exit_code(env, sent):
    msg = client._hook_request("epilog", dict(env, SLURM_JOB_ID="7"))
    assert msg.get("exit_code") == sent


# --- /dev/shm per job --------------------------------------------------------

@root
def test_shm_job_gives_each_job_its_own_tmpfs(daemon_factory):
    d = daemon_factory("shm=job:25%")
    d.create(41)
    d.create(42)
    host = os.stat("/dev/shm").st_dev
    a = nsenter(d.pin(41), "stat", "-c", "%d %a", "/dev/shm").stdout.split()
    b = nsenter(d.pin(42), "stat", "-c", "%d %a", "/dev/shm").stdout.split()
    assert a[1] == b[1] == "1777"
    assert len({host, int(a[0]), int(b[0])}) == 3
    nsenter(d.pin(41), "sh", "-c", "echo x > /dev/shm/seg")
    assert not os.path.exists("/dev/shm/seg")
    assert nsenter(d.pin(42), "ls", "-A", "/dev/shm").stdout == ""
    # Until the entry helper resizes it: 25% of the node's RAM.
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    size = int(nsenter(d.pin(41), "stat", "-f", "-c", "%b*%S", "/dev/shm").stdout.split("*")[0]) * \
        int(nsenter(d.pin(41), "stat", "-f", "-c", "%S", "/dev/shm").stdout)
    assert abs(size - total // 4) < 1 << 20
    d.destroy(41)
    d.destroy(42)


# --- keep on failure -----------------------------------------------------------

def _kept(d):
    return d.request(op="list")["kept"]


@root
def test_failed_job_is_kept_for_its_owner_and_listed(daemon_factory):
    d = daemon_factory("keep_failed=1h keep_max=1g")
    d.create(51, uid=65534, gid=65534)
    nsenter(d.pin(51), "sh", "-c", "echo core > /tmp/core.1", user="65534")
    d.destroy(51)                                   # no exit code: success, removed
    d.create(52, uid=65534, gid=65534)
    nsenter(d.pin(52), "sh", "-c", "echo core > /tmp/core.1", user="65534")
    reply = d.request(op="destroy", job="52", exit_code="256")
    assert reply["ok"] and len(reply["kept"]) == 1
    path = reply["kept"][0]
    assert path.startswith(f"{d.base_parent}/job.52.0.kept.")
    assert not os.path.exists(d.job_dir(52)) and not os.path.exists(d.pin(52))
    top, sub = os.lstat(path), os.lstat(f"{path}/tmp")
    assert top.st_uid == 0 and stat.S_IMODE(top.st_mode) == 0o711
    assert sub.st_uid == 65534 and stat.S_IMODE(sub.st_mode) == 0o700
    assert open(f"{path}/tmp/core.1").read() == "core\n"
    d.wait_removals()
    assert not os.path.exists(d.job_dir(51))
    kept = _kept(d)
    assert [(k["job"], k["exit_code"], k["uid"]) for k in kept] == [(52, 256, 65534)]
    assert 3500 < kept[0]["until"] - time.time() <= 3600
    # privtmpctl list --kept, plain and JSON
    r = ctl(d.conf_path, "list", "--kept")
    assert r.returncode == 0, r.stderr
    assert "52" in r.stdout and "nobody" in r.stdout and path in r.stdout
    r = ctl(d.conf_path, "list", "--kept", "--json")
    assert json.loads(r.stdout)["kept"][0]["path"] == path
    # The other user cannot get in.
    r = nsenter("/proc/1/ns/mnt", "cat", f"{path}/tmp/core.1", user="1", check=False)
    assert r.returncode != 0


@root
def test_kept_dirs_survive_a_restart_and_expire(daemon_factory):
    d = daemon_factory("keep_failed=4s keep_max=1g")
    d.create(61)
    path = d.request(op="destroy", job="61", exit_code="1")["kept"][0]
    d.stop()
    d.start()
    assert [k["path"] for k in _kept(d)] == [path]    # the name is the state
    wait_for(lambda: not os.path.exists(path), timeout=20, what="the kept directory to expire")
    d.wait_removals()
    assert _kept(d) == []
    assert not [n for n in os.listdir(d.base_parent) if ".61." in n]


@root
def test_keep_max_evicts_the_oldest(daemon_factory):
    d = daemon_factory("keep_failed=1h keep_max=3m")
    paths = []
    for job in (71, 72, 73):
        d.create(job)
        nsenter(d.pin(job), "dd", "if=/dev/urandom", "of=/tmp/blob", "bs=1M", "count=1")
        paths.append(d.request(op="destroy", job=str(job), exit_code="256")["kept"][0])
        time.sleep(1.1)                              # distinct expiry times: a defined order
    # 3 x 1 MiB (+ directories) is over 3 MiB: the oldest goes, the newer two stay.
    wait_for(lambda: not os.path.exists(paths[0]), timeout=20, what="eviction of the oldest")
    assert os.path.exists(paths[1]) and os.path.exists(paths[2])
    kept = _kept(d)
    assert [k["job"] for k in kept] == [72, 73]
    assert all(k["bytes"] and k["bytes"] >= 1 << 20 for k in kept)


@root
def test_no_keep_without_the_setting(daemon):
    daemon.create(81)
    reply = daemon.request(op="destroy", job="81", exit_code="256")
    assert reply["kept"] == []
    daemon.wait_removals()
    assert not [n for n in os.listdir(daemon.base_parent) if ".81." in n]


# --- size limits (limit=) --------------------------------------------------------

def _loops_under(path):
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if path in line]


def test_limit_parses():
    assert config.parse("limit=64m").limit == 64 << 20
    assert config.parse("limit=no").limit == 0
    for bad, msg in (("limit=1m", "between 16m and 64t"), ("limit=big", "is not a size")):
        with pytest.raises(config.ConfigError, match=msg) as e:
            config.parse(f"\n{bad}", "/etc/p.conf")
        assert str(e.value).startswith("/etc/p.conf:2: ")


@root
def test_limit_gives_enospc_to_that_job_only(daemon_factory):
    d = daemon_factory("limit=32m")
    d.create(91)
    d.create(92)
    assert len(_loops_under(d.base_parent)) == 2          # one filesystem image per job
    free_before = os.statvfs(d.base_parent).f_bavail
    fill = ("dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>&1; echo dd=$?; "
            "dd if=/dev/zero of=/var/tmp/more bs=1M count=1 2>&1; echo dd2=$?")
    r = nsenter(d.pin(91), "sh", "-c", fill, user="65534", check=False)
    assert "No space left on device" in r.stdout and "dd=1" in r.stdout and "dd2=1" in r.stdout, r
    # The other job still writes; the node's disk lost at most the limit.
    r = nsenter(d.pin(92), "sh", "-c", "dd if=/dev/zero of=/tmp/x bs=1M count=4 2>&1 && echo ok", user="65534")
    assert r.stdout.strip().endswith("ok")
    used = (free_before - os.statvfs(d.base_parent).f_bavail) * os.statvfs(d.base_parent).f_frsize
    assert used < 40 << 20
    jobs = {j["job"]: j for j in d.request(op="list")["jobs"]}
    assert jobs[91]["limit"] == 32 << 20 and 28 << 20 < jobs[91]["used"] <= 32 << 20
    assert jobs[92]["used"] < 8 << 20
    r = ctl(d.conf_path, "list")
    assert r.returncode == 0 and "of 32.0M" in r.stdout.replace("32M", "32.0M"), r.stdout
    # The user's directories are the job's, in the image; the host /tmp is untouched.
    assert os.lstat(f"{d.job_dir(91)}/fs/tmp").st_uid == 65534
    assert not os.path.exists("/tmp/fill")
    d.destroy(91)
    d.destroy(92)
    d.wait_removals()
    assert _loops_under(d.base_parent) == []              # loop devices released
    assert not os.path.exists(d.job_dir(91)) and not os.path.exists(d.job_dir(92))


def test_limit_reserve_parses():
    assert config.parse("limit=64m limit_reserve=yes").limit_reserve is True
    assert config.parse("limit=64m").limit_reserve is False
    for bad, msg in (("limit=64m limit_reserve=full", "use limit_reserve=yes"),
                     ("limit_reserve=yes", "no effect without limit=")):
        with pytest.raises(config.ConfigError, match=msg) as e:
            config.parse(f"\n{bad}", "/etc/p.conf")
        assert str(e.value).startswith("/etc/p.conf:2: ")


@root
def test_limit_reserve_allocates_images_until_the_disk_is_promised(daemon_factory):
    """limit_reserve=yes: each image is allocated in full when the job
    starts, so the limits never promise more than the disk has.  On an 80 MB
    base, two 32 MB jobs get theirs; the third cannot, starts anyway with a
    sparse image (a failed Prolog would drain the node) and is logged."""
    from harness import TEST_BASE_PARENT
    small = f"{TEST_BASE_PARENT}/small-{os.getpid()}"
    os.makedirs(small, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m,mode=1777", "privtmpd-test-small", small], check=True)
    try:
        d = daemon_factory("limit=32m limit_reserve=yes", base_parent=small)
        for job in (95, 96, 97):
            assert d.create(job)["ok"]
        blocks = {job: os.stat(f"{d.job_dir(job)}/fs.img").st_blocks * 512 for job in (95, 96, 97)}
        # (mkfs.ext4 gives back a few blocks it zeroes by punching holes)
        assert blocks[95] >= 31 << 20 and blocks[96] >= 31 << 20, blocks
        assert blocks[97] < 8 << 20, blocks
        log = d.log()
        assert "job=97 " in log and "op=create result=not-reserved" in log, log
        assert "job=95 user=nobody op=create result=not-reserved" not in log
        shown = {job: ctl(d.conf_path, "show", str(job)).stdout for job in (95, 97)}
        assert "32.0M, allocated in full" in shown[95] and "32.0M, sparse" in shown[97], shown
        # The reserved job still gets ENOSPC at its limit, not before.
        r = nsenter(d.pin(95), "sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>&1; echo dd=$?",
                    user="65534", check=False)
        assert "No space left on device" in r.stdout and "dd=1" in r.stdout, r
        used = int(nsenter(d.pin(95), "sh", "-c", "du -sk /tmp/fill | cut -f1", user="65534").stdout) << 10
        assert used > 28 << 20, used
        for job in (95, 96, 97):
            d.destroy(job)
        d.wait_removals()
        assert _loops_under(small) == [] and os.listdir(small) == []
        d.stop()
    finally:
        subprocess.run(["umount", "-l", small], check=False)
        os.rmdir(small)


@root
def test_list_shows_what_a_limited_job_wrote_not_its_reserved_image(daemon_factory):
    """limit_reserve=yes allocates the 64 MB image in full; `list` must
    still show the 20 MiB the job wrote (it showed 60.0M of 64.0M)."""
    d = daemon_factory("limit=64m limit_reserve=yes")
    assert d.create(94)["ok"]
    nsenter(d.pin(94), "sh", "-c", "dd if=/dev/zero of=/tmp/data bs=1M count=20 status=none; "
            "touch /tmp/a /var/tmp/b", user="65534")
    row = [line.split() for line in ctl(d.conf_path, "list").stdout.splitlines() if line.startswith("94 ")]
    assert row, ctl(d.conf_path, "list").stdout
    size, of, limit, files = row[0][4:8]
    assert of == "of" and limit == "64.0M", row
    assert size.endswith("M") and 20 <= float(size[:-1]) < 28, row
    # tmp/, var_tmp/, data, a, b (and the filesystem's lost+found)
    assert 5 <= int(files) <= 6, row
    d.destroy(94)
    d.wait_removals()


@root
def test_limit_with_keep_failed_keeps_the_filesystem_readable(daemon_factory):
    d = daemon_factory("limit=16m keep_failed=3s")
    d.create(93)
    nsenter(d.pin(93), "sh", "-c", "echo core > /tmp/core", user="65534")
    path = d.request(op="destroy", job="93", exit_code="256")["kept"][0]
    assert open(f"{path}/fs/tmp/core").read() == "core\n"
    assert [(k["job"], k["uid"]) for k in d.request(op="list")["kept"]] == [(93, 65534)]
    wait_for(lambda: not os.path.exists(path), timeout=20, what="the kept directory to expire")
    d.wait_removals()
    assert _loops_under(d.base_parent) == []


# --- ssh sessions adopted into a job: the PAM module ------------------------------
#
# pam_slurm_adopt is not run here (it needs sshd, proctrack/cgroup and the
# extern step); what it does to a session is done by hand: the process is
# moved into a .../job_<id>/step_extern cgroup, as Slurm makes it: on cgroup
# v1 in the freezer hierarchy (proctrack/cgroup, .../uid_<uid>/job_<id>), on
# cgroup v2 in the unified one (cgroup/v2, .../slurmstepd.scope/job_<id>);
# then the session stack is run by a small PAM application
# (tests/pam_driver.c) that execs a command in the result.

PAM_WORK = "/var/lib/privtmpd-test/pam"


def _v2_top():
    """The cgroup v2 hierarchy: /sys/fs/cgroup on a systemd host of today,
    /sys/fs/cgroup/unified on a hybrid one."""
    for top in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if os.path.exists(f"{top}/cgroup.controllers"):
            return top
    return None


CGROUP_LAYOUTS = {
    "v1": lambda: ("/sys/fs/cgroup/freezer/privtmpd-test-pam" if os.path.isdir("/sys/fs/cgroup/freezer") else None,
                   "uid_0/job_{job}/step_extern"),
    "v2": lambda: (_v2_top() and f"{_v2_top()}/privtmpd-test-pam",
                   "system.slice/slurmstepd.scope/job_{job}/step_extern"),
}


@pytest.fixture(params=sorted(CGROUP_LAYOUTS))
def pam_setup(request):
    if not os.path.exists("/usr/include/security/pam_modules.h"):
        from conftest import privileged_skip
        privileged_skip("libpam0g-dev not installed (security/pam_modules.h)")
    CG, layout = CGROUP_LAYOUTS[request.param]()
    if not CG:
        pytest.skip(f"no cgroup {request.param} hierarchy on this machine (the other one is tested)")
    from harness import REPO
    os.makedirs(PAM_WORK, exist_ok=True)
    subprocess.run(["make", "-B", "-s", "-C", f"{REPO}/pam", f"BUILDDIR={PAM_WORK}"], check=True)
    subprocess.run(["gcc", "-Wall", "-o", f"{PAM_WORK}/pam_driver", f"{REPO}/tests/pam_driver.c", "-lpam"],
                   check=True)
    made = []

    def session(d, job, cmd, conf_extra=""):
        confdir = f"{PAM_WORK}/conf"
        os.makedirs(confdir, exist_ok=True)
        with open(f"{confdir}/privtmpd-test", "w") as f:
            f.write(f"session required {PAM_WORK}/pam_privtmpd.so rundir={d.rundir} tmpdir=/tmp {conf_extra}\n"
                    "session optional pam_permit.so\n")
        enter = "true"
        if job is not None:
            cg = f"{CG}/{layout.format(job=job)}"
            os.makedirs(cg, exist_ok=True)
            made.append(cg)
            enter = f"echo $$ > {cg}/cgroup.procs"
        return subprocess.run(["sh", "-c", f'{enter} && exec "$@"', "sh", f"{PAM_WORK}/pam_driver", confdir,
                               "root"] + cmd, capture_output=True, text=True, timeout=30)

    yield session
    for cg in made:
        parts = cg[len(CG) + 1:].split("/")
        for i in range(len(parts), 0, -1):
            try:
                os.rmdir(f"{CG}/{'/'.join(parts[:i])}")
            except OSError:
                pass
    try:
        os.rmdir(CG)
    except OSError:
        pass


@root
def test_pam_session_adopted_into_a_job_sees_its_tmp(daemon, pam_setup):
    daemon.create(301)
    daemon.create(302)
    nsenter(daemon.pin(301), "sh", "-c", "echo job301 > /tmp/marker")
    nsenter(daemon.pin(302), "sh", "-c", "echo job302 > /tmp/marker")
    r = pam_setup(daemon, 302, ["sh", "-c", "cat /tmp/marker; echo TMPDIR=$TMPDIR; pwd"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["job302", "TMPDIR=/tmp", "/"]
    assert not os.path.exists("/tmp/marker")
    # A session that was not adopted keeps the host's /tmp.
    r = pam_setup(daemon, None, ["sh", "-c", "ls /tmp/marker 2>&1; echo TMPDIR=${TMPDIR:-unset}"])
    assert r.returncode == 0 and "No such file" in r.stdout and "TMPDIR=unset" in r.stdout, r


@root
def test_pam_session_of_a_job_without_namespace_is_refused(daemon, pam_setup):
    r = pam_setup(daemon, 399, ["sh", "-c", "echo logged-in"])
    assert r.returncode == 10 and "logged-in" not in r.stdout
    # A stale pin (plain file) is refused too.
    open(daemon.pin(398), "w").close()
    r = pam_setup(daemon, 398, ["sh", "-c", "echo logged-in"])
    assert r.returncode == 10 and "logged-in" not in r.stdout
    os.unlink(daemon.pin(398))


@root
def test_pam_refuses_an_untrusted_pin_directory(daemon, pam_setup):
    """The PAM module walks to the pin like the entry helper (one shared
    open_trusted_dir): a pin directory writable by group or other is
    refused, whatever pin it holds."""
    daemon.create(304)
    assert pam_setup(daemon, 304, ["true"]).returncode == 0
    ns = f"{daemon.rundir}/ns"
    mode = os.stat(ns).st_mode & 0o7777
    os.chmod(ns, mode | 0o020)
    try:
        r = pam_setup(daemon, 304, ["sh", "-c", "echo logged-in"])
    finally:
        os.chmod(ns, mode)
    assert r.returncode == 10 and "logged-in" not in r.stdout


@root
def test_pam_bad_argument_refuses_the_session(daemon, pam_setup):
    daemon.create(303)
    r = pam_setup(daemon, 303, ["true"], conf_extra="bogus=1")
    assert r.returncode == 10

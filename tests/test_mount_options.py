"""Per-mount-point options (mount_options=) and tmpfs-backed mount points
(tmpfs=), against a real daemon and real namespaces: what a job sees is
checked from inside the job's namespace, as the job's user."""

import json
import os
import stat
import subprocess
import time

import pytest

from cli import ctl, wait_for
from conftest import privileged_skip
from harness import nsenter
from privtmpd import config

root = pytest.mark.root


# --- configuration -----------------------------------------------------------

def test_old_configs_keep_their_meaning():
    cfg = config.parse("base=/tmp/slurm\nmount=/var/tmp mount=/tmp\n")
    assert cfg.mount_options == () and cfg.tmpfs == ()
    assert cfg.options_of("/tmp") == () and cfg.tmpfs_size("/tmp") == ""


def test_options_and_tmpfs_parse():
    cfg = config.parse("mount=/tmp mount=/var/tmp\nmount_options=/tmp:noexec,nosuid\n"
                       "tmpfs=/var/tmp:4G\nmount_options=/var/tmp:noexec\n")
    assert cfg.options_of("/tmp") == ("noexec", "nosuid")
    assert cfg.tmpfs_size("/var/tmp") == "4g" and cfg.tmpfs_size("/tmp") == ""
    assert config.parse("tmpfs=/tmp:10%").tmpfs_size("/tmp") == "10%"
    assert config.parse("tmpfs=/tmp:JOB:25%").tmpfs_size("/tmp") == "job:25%"
    assert config.parse("tmpfs=/tmp:job").tmpfs_size("/tmp") == "job:100%"
    # Keys may come before the mount= they name; the longest mount= wins.
    cfg = config.parse("mount_options=/a:b:noexec\nmount=/a:b mount=/a\n")
    assert cfg.options_of("/a:b") == ("noexec",) and cfg.options_of("/a") == ()


@pytest.mark.parametrize("text, message", [
    ("mount_options=/tmp:ro", "'ro' is not allowed"),
    ("mount_options=/tmp:suid", "'suid' is not allowed"),
    ("mount_options=/tmp:dev", "'dev' is not allowed"),
    ("mount_options=/tmp:noexe", "unknown option 'noexe'"),
    ("mount_options=/tmp:exec,noexec", "both exec and noexec"),
    ("mount_options=/tmp:", "give options separated by ','"),
    ("mount_options=/tmp:noexec,,nodev", "give options separated by ','"),
    ("mount_options=/scratch:noexec", "/scratch is not one of the mount= points"),
    ("mount_options=noexec", "write mount_options=<mount point>:<value>"),
    ("mount_options=/tmp:noexec mount_options=/tmp:nodev", "given twice"),
    ("tmpfs=/tmp", "write tmpfs=<mount point>:<value>"),
    ("tmpfs=/tmp:lots", "is not a size"),
    ("tmpfs=/tmp:0", "is not a size"),
    ("tmpfs=/tmp:512k", "at least 1m"),
    ("tmpfs=/tmp:0%", "1%..100%"),
    ("tmpfs=/tmp:150%", "1%..100%"),
    ("tmpfs=/tmp:job:50", "the share after 'job:' is a percentage"),
    ("tmpfs=/tmp:job:0%", "1%..100%"),
    ("tmpfs=/tmp:job:4g", "the share after 'job:' is a percentage"),
    ("mount=/a\\b tmpfs=/a\\b:job:10%", "cannot contain a space, a tab or a backslash"),
    ("tmpfs=/tmp:4g tmpfs=/tmp:2g", "given twice"),
    ("mount=/tmp\ntmpfs=/tmp:4g limit=1g", "every mount point is a tmpfs="),
])
def test_bad_per_mount_settings_name_the_line(text, message):
    err = _refused(text)
    assert err.startswith("/etc/privtmpd/privtmpd.conf:") and message in err, err


def _refused(text):
    """The error config gives for privtmpd.conf with text on its line 2."""
    with pytest.raises(config.ConfigError) as e:
        config.parse(f"base=/tmp/slurm\n{text}\n", "/etc/privtmpd/privtmpd.conf")
    return str(e.value)


def test_limit_with_some_tmpfs_points_is_fine():
    cfg = config.parse("mount=/tmp mount=/var/tmp tmpfs=/tmp:1g limit=1g")
    assert cfg.limit == 1 << 30 and cfg.tmpfs_size("/tmp") == "1g"


# --- mount options, seen from inside the job -----------------------------------

def _mount_opts(pin, target):
    """The per-mount options of target in the job's namespace (last line wins:
    the mount on top)."""
    out = nsenter(pin, "cat", "/proc/self/mountinfo").stdout
    opts = None
    for line in out.splitlines():
        f = line.split()
        if f[4] == target:
            opts = set(f[5].split(","))
    assert opts is not None, f"{target} not mounted in the job"
    return opts


_EXEC = "cp /bin/true {d}/t && {d}/t; echo rc=$?"


@root
def test_noexec_stops_exec_in_that_mount_point_only(daemon_factory):
    d = daemon_factory("mount_options=/tmp:noexec")
    d.create(301)
    pin = d.pin(301)
    r = nsenter(pin, "sh", "-c", _EXEC.format(d="/tmp"), user="65534", check=False)
    assert "Permission denied" in r.stderr + r.stdout and "rc=126" in r.stdout, r
    r = nsenter(pin, "sh", "-c", _EXEC.format(d="/var/tmp"), user="65534", check=False)
    assert "rc=0" in r.stdout, r
    assert {"noexec", "nosuid", "nodev"} <= _mount_opts(pin, "/tmp")
    var = _mount_opts(pin, "/var/tmp")
    assert {"nosuid", "nodev"} <= var and "noexec" not in var      # the defaults only
    d.destroy(301)


@root
def test_defaults_are_nosuid_nodev_and_exec(daemon):
    daemon.create(302)
    for m in ("/tmp", "/var/tmp"):
        opts = _mount_opts(daemon.pin(302), m)
        assert {"nosuid", "nodev"} <= opts and "noexec" not in opts, (m, opts)
    daemon.destroy(302)


# --- tmpfs-backed mount points ---------------------------------------------------

def _tmpfs_dev(pin, target):
    out = nsenter(pin, "cat", "/proc/self/mountinfo").stdout
    found = None
    for line in out.splitlines():
        f = line.split()
        if f[4] == target:
            found = (f[2], f[f.index("-") + 1])
    return found


def _shmem():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no Shmem: in /proc/meminfo")


def _mounted_anywhere(majmin):
    """Whether any process on the machine still has a mount of device majmin."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                if any(line.split()[2] == majmin for line in f):
                    return True
        except OSError:
            pass
    return False


@root
def test_tmpfs_point_is_private_sized_and_leaves_nothing(daemon_factory):
    d = daemon_factory("tmpfs=/tmp:8m mount_options=/tmp:noexec")
    d.create(311)
    d.create(312)
    a, b = d.pin(311), d.pin(312)
    dev_a, dev_b = _tmpfs_dev(a, "/tmp"), _tmpfs_dev(b, "/tmp")
    assert dev_a[1] == dev_b[1] == "tmpfs" and dev_a[0] != dev_b[0]
    assert {"noexec", "nosuid", "nodev"} <= _mount_opts(a, "/tmp")
    # /tmp-like: root's, 1777, so the job's user writes and programs that
    # check for the sticky bit are happy.
    assert nsenter(a, "stat", "-c", "%u %a", "/tmp").stdout.split() == ["0", "1777"]
    # One inode per 4 KiB of size (the kernel's default would be half the
    # RAM's pages): 8 MiB, 2048 inodes, and ENOSPC for the 2049th name.
    assert nsenter(a, "stat", "-f", "-c", "%c", "/tmp").stdout.split() == ["2048"]
    r = nsenter(a, "sh", "-c", "cd /tmp && i=0; while [ $i -lt 2100 ]; do true > e$i 2>/dev/null || break; i=$((i+1)); done; "
                "echo made=$i; rm -f e*", user="65534", check=False)
    assert "made=2047" in r.stdout, r.stdout            # the root directory holds one inode
    r = nsenter(a, "sh", "-c", "echo secret > /tmp/mine && cat /tmp/mine", user="65534")
    assert r.stdout == "secret\n"
    assert nsenter(b, "ls", "-A", "/tmp").stdout == ""             # the other job sees nothing
    assert not os.path.exists("/tmp/mine")                          # nor does the host
    # size= is enforced: ENOSPC past 8 MiB.
    r = nsenter(a, "sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=16 2>&1; echo dd=$?",
                user="65534", check=False)
    assert "No space left on device" in r.stdout and "dd=1" in r.stdout, r
    used = int(nsenter(a, "du", "-sk", "/tmp").stdout.split()[0])
    assert 7 * 1024 <= used <= 8 * 1024
    # Nothing on the host's disk: the job directory has /var/tmp's only.
    assert os.listdir(d.job_dir(311)) == ["var_tmp"]
    assert stat.S_ISDIR(os.lstat(f"{d.job_dir(311)}/var_tmp").st_mode)
    # The disk-backed point is still a bind of that directory.
    nsenter(a, "sh", "-c", "echo v > /var/tmp/v", user="65534")
    assert open(f"{d.job_dir(311)}/var_tmp/v").read() == "v\n"
    # Listed with the tmpfs's own usage.
    job = {j["job"]: j for j in d.request(op="list")["jobs"]}[311]
    assert job["tmpfs"] == {"/tmp": "8m"}
    assert 7 << 20 <= job["tmpfs_used"]["/tmp"][0] <= 8 << 20 and job["tmpfs_used"]["/tmp"][1] == 8 << 20
    r = ctl(d.conf_path, "show", "311")
    assert r.returncode == 0 and "tmpfs:   /tmp: 8.0M used of 8.0M" in r.stdout, r.stdout
    r = ctl(d.conf_path, "list", "--json")
    listed = {j["job"]: j for j in json.loads(r.stdout)["jobs"]}
    assert listed[311]["bytes"] >= 7 << 20 and listed[312]["bytes"] < 1 << 20     # the tmpfs counted
    # Gone with the namespace: a process of the job shows the mount until
    # destroy, no process anywhere after, and the 8 MiB of tmpfs pages are
    # given back (Shmem counts tmpfs pages).
    sleeper = subprocess.Popen(["nsenter", f"--mount={a}", "--", "setpriv", "--reuid=65534", "--regid=65534",
                                "--clear-groups", "sleep", "600"])
    try:
        wait_for(lambda: _mounted_anywhere(dev_a[0]), 10, "the job's sleeper")
        shmem = _shmem()
        d.destroy(311)
        assert sleeper.wait(10) is not None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not _mounted_anywhere(dev_a[0])
    wait_for(lambda: shmem - _shmem() >= 7 << 20, 10, "the tmpfs pages to be freed")
    d.destroy(312)
    d.wait_removals()
    assert not os.path.exists(d.job_dir(311))


@root
def test_tmpfs_share_of_ram(daemon_factory):
    d = daemon_factory("tmpfs=/var/tmp:10%")
    d.create(321)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    out = nsenter(d.pin(321), "stat", "-f", "-c", "%b %S", "/var/tmp").stdout.split()
    assert abs(int(out[0]) * int(out[1]) - total // 10) < 1 << 20
    assert os.listdir(d.job_dir(321)) == ["tmp"]
    d.destroy(321)


@root
def test_tmpfs_share_of_the_jobs_memory_is_marked_for_the_entry_helper(daemon_factory):
    """tmpfs=<dir>:job:N%: N% of the RAM until the entry helper resizes it,
    with the mark it finds the mount by (the Slurm tests resize it)."""
    d = daemon_factory("tmpfs=/var/tmp:job:30% shm=job:20% mount_options=/var/tmp:noexec")
    d.create(322)
    lines = nsenter(d.pin(322), "cat", "/proc/self/mountinfo").stdout.splitlines()
    mine = {ln.split()[4]: ln for ln in lines}
    assert " - tmpfs privtmpd.322:job:30% " in mine["/var/tmp"], mine["/var/tmp"]
    assert " - tmpfs privtmpd.322:job:20% " in mine["/dev/shm"], mine["/dev/shm"]
    assert "noexec" in mine["/var/tmp"].split()[5]
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    out = nsenter(d.pin(322), "stat", "-f", "-c", "%b %S", "/var/tmp").stdout.split()
    assert abs(int(out[0]) * int(out[1]) - total * 30 // 100) < 1 << 20
    assert os.listdir(d.job_dir(322)) == ["tmp"]
    d.destroy(322)


@root
def test_tmpfs_with_keep_failed_keeps_the_disk_points_and_says_so(daemon_factory):
    d = daemon_factory("tmpfs=/tmp:8m keep_failed=1h")
    d.create(331)
    nsenter(d.pin(331), "sh", "-c", "echo a > /tmp/a; echo b > /var/tmp/b", user="65534")
    reply = d.request(op="destroy", job="331", exit_code="256")
    assert reply["ok"] and len(reply["kept"]) == 1
    kept = reply["kept"][0]
    assert os.listdir(kept) == ["var_tmp"]
    assert "not-kept-tmpfs" in d.log() and "/tmp" in d.log()


# --- sbcast=yes ------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("sbcast=maybe", "use sbcast=yes"),
    ("mount=/var/tmp sbcast=yes", "needs mount=/tmp as a directory"),
    ("mount=/tmp tmpfs=/tmp:1g sbcast=yes", "needs mount=/tmp as a directory"),
    ("sbcast=yes limit=1g", "does not work with limit="),
    ("sbcast=yes mode=0750", "must be owner-only"),
])
def test_bad_sbcast_settings_name_the_line(text, message):
    err = _refused(text)
    assert err.startswith("/etc/privtmpd/privtmpd.conf:2: ") and message in err, err


@root
def test_sbcast_opens_only_the_top_for_traversal(daemon_factory):
    d = daemon_factory("sbcast=yes")
    d.create(341, uid=65534, gid=65534)
    top, sub = os.lstat(d.job_dir(341)), os.lstat(f"{d.job_dir(341)}/tmp")
    assert top.st_uid == 0 and stat.S_IMODE(top.st_mode) == 0o711
    assert sub.st_uid == 65534 and stat.S_IMODE(sub.st_mode) == 0o700
    # The owner writes there from the host, as sbcast does; the job sees it.
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
                        f"echo from-host > {d.job_dir(341)}/tmp/f"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert nsenter(d.pin(341), "cat", "/tmp/f").stdout == "from-host\n"
    # Another user cannot.
    r = subprocess.run(["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", "sh", "-c",
                        f"ls {d.job_dir(341)}/tmp || echo x > {d.job_dir(341)}/tmp/g"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    d.destroy(341)
    d.create(342)
    assert stat.S_IMODE(os.lstat(d.job_dir(342)).st_mode) == 0o711
    d.destroy(342)


@root
def test_without_sbcast_the_top_stays_root_only(daemon):
    daemon.create(343)
    assert stat.S_IMODE(os.lstat(daemon.job_dir(343)).st_mode) == 0o700
    daemon.destroy(343)


# --- doctor ------------------------------------------------------------------------

def _doctor(conf, slurm_conf, check):
    from privtmpd import doctor as doc
    d = doc.Doctor(conf, slurm_conf)
    assert d.check_config(), d.results
    getattr(d, check)()
    return d.results[-1] if d.results[1:] else None


def _slurm_files(tmp_path, prolog_flags, plugstack_args):
    ps = tmp_path / "plugstack.conf"
    ps.write_text(f"required /usr/lib/privtmpd_spank.so {plugstack_args}\n")
    sc = tmp_path / "slurm.conf"
    sc.write_text(f"ClusterName=x\n{prolog_flags}\nPlugStackConfig={ps}\n")
    return str(sc)


def test_doctor_sbcast_needs_host_tmp_and_prolog_flags(tmp_path):
    conf = tmp_path / "p.conf"
    conf.write_text("base=/tmp/slurm\nmount=/tmp\nsbcast=yes\n")
    r = _doctor(str(conf), _slurm_files(tmp_path, "", "tmpdir=/tmp"), "check_sbcast")
    assert r.status == "warn" and "no host_tmp=" in r.detail and "PrologFlags" in r.detail
    assert "host_tmp=/tmp/slurm" in r.fix and "PrologFlags=Alloc" in r.fix
    r = _doctor(str(conf), _slurm_files(tmp_path, "PrologFlags=Alloc,X11", "host_tmp=/tmp/slurm"), "check_sbcast")
    assert r.status == "ok", r
    r = _doctor(str(conf), _slurm_files(tmp_path, "PrologFlags=Contain", "host_tmp=/scratch/x"), "check_sbcast")
    assert r.status == "warn" and "host_tmp=/scratch/x" in r.detail
    conf.write_text("base=/tmp/slurm\nmount=/tmp\n")
    r = _doctor(str(conf), _slurm_files(tmp_path, "PrologFlags=Alloc", "host_tmp=/tmp/slurm"), "check_sbcast")
    assert r.status == "warn" and "no sbcast=yes" in r.detail
    r = _doctor(str(conf), _slurm_files(tmp_path, "", ""), "check_sbcast")
    assert r is None        # not used, nothing to say


def test_doctor_tmpfs_sizes_against_ram(tmp_path):
    conf = tmp_path / "p.conf"
    conf.write_text("mount=/tmp mount=/var/tmp tmpfs=/tmp:60% tmpfs=/var/tmp:50%\n")
    r = _doctor(str(conf), "/dev/null", "check_tmpfs_sizes")
    assert r.status == "warn" and "more than this node's" in r.detail
    conf.write_text("mount=/tmp mount=/var/tmp tmpfs=/tmp:10% tmpfs=/var/tmp:1m\n")
    assert _doctor(str(conf), "/dev/null", "check_tmpfs_sizes").status == "ok"
    conf.write_text("mount=/tmp mount=/var/tmp tmpfs=/tmp:job:60% tmpfs=/var/tmp:1g shm=job:50%\n")
    r = _doctor(str(conf), "/dev/null", "check_tmpfs_sizes")
    assert r.status == "warn" and "add up to 110%" in r.detail, r
    conf.write_text("mount=/tmp mount=/var/tmp tmpfs=/tmp:job:50% shm=job:50%\n")
    r = _doctor(str(conf), "/dev/null", "check_tmpfs_sizes")
    assert r.status == "ok" and "plus 100% of the job's memory" in r.detail, r


@root
def test_doctor_reports_files_a_job_user_left_in_the_shared_tmp(daemon):
    from privtmpd import doctor as doc
    r = _doctor(daemon.conf_path, "/dev/null", "check_shared_tmp_leftovers")
    assert r is None                                  # no job, nothing to compare with
    daemon.create(351, uid=65534, gid=65534)
    path = "/var/tmp/privtmpd-test-sbcast-leftover"
    link = "/var/tmp/privtmpd-test-sbcast-link"
    evil = "/var/tmp/privtmpd-test-\x1b[2J-name"
    try:
        # What `sbcast f /var/tmp/f` does: the user writes in the host's namespace.
        subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
                        f"echo x > {path}; ln -s /etc/passwd {link}; echo y > '{evil}'"], check=True)
        r = _doctor(daemon.conf_path, "/dev/null", "check_shared_tmp_leftovers")
        assert r.status == doc.WARN and f"{path} (uid 65534, job 351)" in r.detail, r
        assert link not in r.detail                 # not a regular file; never followed
        assert "\x1b" not in r.detail and "privtmpd-test-\\x1b[2J-name" in r.detail   # escaped
        assert os.path.exists(path)                 # reported, never removed
    finally:
        for p in (path, link, evil):
            if os.path.lexists(p):
                os.unlink(p)
    assert _doctor(daemon.conf_path, "/dev/null", "check_shared_tmp_leftovers").status == doc.OK
    daemon.destroy(351)


def test_slurm_config_prints_host_tmp_with_sbcast():
    from privtmpd import install
    assert "host_tmp=" not in install.plugstack_line(config.parse("base=/tmp/slurm"))
    line = install.plugstack_line(config.parse("base=/tmp/slurm sbcast=yes"))
    assert line.endswith(" host_tmp=/tmp/slurm")


def test_config_check_shows_the_per_mount_settings(tmp_path):
    conf = tmp_path / "p.conf"
    conf.write_text("base=/tmp/slurm\nmount=/tmp mount=/var/tmp\nmount_options=/tmp:noexec\n"
                    "tmpfs=/var/tmp:1g\nsbcast=yes\n")
    r = ctl(str(conf), "config", "check")
    assert r.returncode == 0, r.stderr
    assert "mount_options=/tmp:noexec tmpfs=/var/tmp:1g sbcast=yes" in r.stdout
    r = ctl(str(conf), "config", "check", "--json")
    data = json.loads(r.stdout)
    assert data["mount_options"] == {"/tmp": "noexec"} and data["tmpfs"] == {"/var/tmp": "1g"} and data["sbcast"]


@root
def test_tmpfs_and_options_survive_a_daemon_restart(daemon_factory):
    d = daemon_factory("tmpfs=/tmp:8m mount_options=/var/tmp:noexec")
    d.create(361)
    nsenter(d.pin(361), "sh", "-c", "echo kept > /tmp/k", user="65534")
    d.stop()
    d.start()
    assert nsenter(d.pin(361), "cat", "/tmp/k").stdout == "kept\n"
    assert "noexec" in _mount_opts(d.pin(361), "/var/tmp")
    assert d.request(op="list")["jobs"][0]["tmpfs_used"]["/tmp"][1] == 8 << 20
    d.destroy(361)


@root
def test_options_apply_to_a_limit_image_too(daemon_factory):
    d = daemon_factory("limit=32m mount_options=/tmp:noexec tmpfs=/var/tmp:4m")
    d.create(371)
    pin = d.pin(371)
    r = nsenter(pin, "sh", "-c", _EXEC.format(d="/tmp"), user="65534", check=False)
    assert "rc=126" in r.stdout, r
    assert nsenter(pin, "stat", "-f", "-c", "%T", "/var/tmp").stdout.strip() == "tmpfs"
    assert sorted(os.listdir(f"{d.job_dir(371)}/fs")) == ["lost+found", "tmp"]
    d.destroy(371)


def test_doctor_says_the_entry_helpers_shm_argument_is_ignored(tmp_path):
    """shm=N% on the entry helper's line came from the old way of sizing
    /dev/shm; the share is privtmpd.conf's now, and doctor says so."""
    from privtmpd import doctor as doc
    from privtmpd.install import spank_path
    so = spank_path()
    assert so, "the entry helper is not built (make -C spank)"
    # A private mount point the .so does not lie under (a checkout in /tmp).
    mp = "/var/tmp" if so.startswith("/tmp/") else "/tmp"
    conf = tmp_path / "p.conf"
    conf.write_text(f"base=/tmp/slurm\nmount={mp}\nshm=job:25%\n")
    ps = tmp_path / "plugstack.conf"
    ps.write_text(f"required {so} rundir=/run/privtmpd tmpdir=/tmp shm=50%\n")
    d = doc.Doctor(str(conf), "/dev/null")
    assert d.check_config(), d.results
    d._check_plugstack(str(ps))
    r = [r for r in d.results if r.name == "entry helper"][-1]
    assert "shm=50%, which the entry helper ignores" in r.detail and "shm=job:25%" in r.fix, r


# --- exec on a noexec base -----------------------------------------------------------

@pytest.fixture
def noexec_fs(tmp_path):
    """A real tmpfs mounted noexec, for base= to live on; unmounted after
    the test (and after the daemons of daemon_factory, set up later, are
    gone)."""
    mnt = tmp_path / "noexec-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,nosuid,nodev,size=16m,mode=0755", "privtmpd-test-noexec",
                    str(mnt)], check=True)
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        assert not os.path.ismount(mnt)


_START_WARNING = "op=start result=warning"


@root
def test_exec_on_a_noexec_base_is_reported_by_doctor_and_at_start(noexec_fs, daemon_factory, tmp_path):
    """The job's /tmp is a bind of a directory on base's filesystem and
    keeps its noexec: mount_options=/tmp:exec cannot give exec back, and the
    admin hears so from doctor and from the daemon's start-up log."""
    base_parent = f"{noexec_fs}/base"
    os.mkdir(base_parent, 0o755)
    conf = tmp_path / "p.conf"
    conf.write_text(f"base={base_parent}/job\nmount=/tmp mount=/var/tmp\nmount_options=/tmp:exec,nosuid\n")
    r = _doctor(str(conf), "/dev/null", "check_exec_on_noexec_base")
    assert r.status == "warn", r
    assert f"mount_options=/tmp:exec has no effect: base={base_parent}/job is on {noexec_fs}, mounted noexec" in r.detail
    assert "/var/tmp" not in r.detail
    assert f"mount -o remount,exec {noexec_fs}" in r.fix and "move base=" in r.fix, r
    # Only the explicit exec: without it, or with tmpfs= or limit=, base's flags are not the job's.
    for other in ("", "mount_options=/tmp:noexec", "mount_options=/tmp:exec tmpfs=/tmp:4m",
                  "mount_options=/tmp:exec limit=32m"):
        conf.write_text(f"base={base_parent}/job\nmount=/tmp mount=/var/tmp\n{other}\n")
        assert _doctor(str(conf), "/dev/null", "check_exec_on_noexec_base") is None, other

    d = daemon_factory("mount_options=/tmp:exec", base_parent=base_parent)
    log = d.log()
    warnings = [ln for ln in log.splitlines() if _START_WARNING in ln]
    assert len(warnings) >= 1 and "mount_options=/tmp:exec has no effect" in warnings[-1], log
    assert f"remount {noexec_fs} exec" in warnings[-1]
    # The warning is true: the job cannot run a program from its /tmp.
    d.create(381)
    r = nsenter(d.pin(381), "sh", "-c", _EXEC.format(d="/tmp"), user="65534", check=False)
    assert "rc=126" in r.stdout, r
    d.destroy(381)
    d.stop()

    # Base's filesystem remounted exec: doctor is content, the daemon silent.
    subprocess.run(["mount", "-o", "remount,exec", noexec_fs], check=True)
    conf.write_text(f"base={base_parent}/job\nmount=/tmp mount=/var/tmp\nmount_options=/tmp:exec\n")
    r = _doctor(str(conf), "/dev/null", "check_exec_on_noexec_base")
    assert r.status == "ok" and f"on a filesystem mounted exec ({noexec_fs})" in r.detail, r
    d.start()
    assert len([ln for ln in d.log().splitlines() if _START_WARNING in ln]) == len(warnings), d.log()
    d.create(382)
    r = nsenter(d.pin(382), "sh", "-c", _EXEC.format(d="/tmp"), user="65534", check=False)
    assert "rc=0" in r.stdout, r
    d.destroy(382)


# --- the usage probe: many jobs' namespaces in one child ---------------------

def _namespace_with_a_hung_tmp():
    """A process in a private mount namespace of its own whose /tmp is a
    FUSE mount nobody answers: a statvfs there waits until it is killed,
    as over a FUSE mount whose daemon is stopped.  Private, so nothing
    else on the machine ever sees it; gone with the process."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            from privtmpd import kernel
            os.close(r)
            kernel.unshare(kernel.CLONE_NEWNS)
            kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
            fuse = os.open("/dev/fuse", os.O_RDWR)
            kernel.mount("privtmpd-test-hung", "/tmp", "fuse", kernel.MS_NOSUID | kernel.MS_NODEV,
                         f"fd={fuse},rootmode=40000,user_id=0,group_id=0")
            os.write(w, b"x")
            time.sleep(120)
        finally:
            os._exit(1)
    os.close(w)
    ready = os.read(r, 1)
    os.close(r)
    if ready != b"x":
        os.waitpid(pid, 0)
        privileged_skip("no FUSE on this machine (/dev/fuse, or a kernel without fuse)")
    return pid


@root
def test_one_jobs_namespace_costs_no_other_job_its_tmpfs_figures(daemon_factory):
    """list probes every tmpfs= job in one child: a namespace whose
    statvfs fails skips that job only, and one that hangs until the time
    limit costs nothing to the jobs read before it."""
    from privtmpd import mountopts

    d = daemon_factory("tmpfs=/tmp:8m")
    d.create(371)
    d.create(372)
    a, b = mountopts.open_namespace(d.pin(371)), mountopts.open_namespace(d.pin(372))
    hung = _namespace_with_a_hung_tmp()
    h = os.open(f"/proc/{hung}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # A point job 371's namespace does not have: statvfs fails there.
        usage = mountopts.tmpfs_usage([(a, ["/tmp", "/no/such/point"]), (b, ["/tmp"]), (a, ["/tmp"])])
        assert usage[0] == {} and usage[1]["/tmp"][1] == usage[2]["/tmp"][1] == 8 << 20, usage
        t0 = time.monotonic()
        usage = mountopts.tmpfs_usage([(a, ["/tmp"]), (b, ["/tmp"]), (h, ["/tmp"]), (a, ["/tmp"])])
        took = time.monotonic() - t0
        assert took < mountopts.USAGE_SECONDS + 5, took      # unbounded, it would wait for the hung mount
        assert usage[0]["/tmp"][1] == usage[1]["/tmp"][1] == 8 << 20 and usage[2:] == [{}, {}], usage
    finally:
        for fd in (a, b, h):
            os.close(fd)
        os.kill(hung, 9)
        os.waitpid(hung, 0)


@root
def test_list_lets_go_of_every_namespace_when_it_fails(daemon_factory):
    """list holds an fd on each tmpfs= job's namespace until its one probe:
    when something fails on the way (here a later job's pin that is a
    symlink: O_NOFOLLOW, ELOOP; on a node, EMFILE), none may stay open, or
    each keeps a namespace, and its tmpfs, alive after the job's end."""
    d = daemon_factory("tmpfs=/tmp:4m")
    for job in range(381, 385):
        d.create(job)
    with open(f"{d.rundir}/jobs/999.json", "w") as f:
        json.dump({"job": 999, "state": "ready"}, f)
    os.symlink("/proc/self/ns/mnt", d.pin(999))
    pid = d.proc.pid

    def namespaces_held():
        held = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                # An fd opened on a pin reads as the pin's path.
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith((f"{d.rundir}/ns/", "mnt:")):
                    held.append(fd)
            except OSError:
                pass
        return held

    try:
        assert namespaces_held() == []
        reply = d.request(op="list")
        assert not reply["ok"] and "999" in reply["error"], reply       # it did fail on the way
        assert namespaces_held() == [], "list left namespaces open: fds " + ", ".join(namespaces_held())
    finally:
        os.unlink(d.pin(999))
        os.unlink(f"{d.rundir}/jobs/999.json")
    assert d.request(op="list")["ok"]

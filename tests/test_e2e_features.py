"""End to end on the local Slurm cluster for the optional features: a
per-job /dev/shm sized from the job's memory, keeping a failed job's
directories, and per-job size limits."""

import os
import subprocess
import time

import pytest

from harness import Stack

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.usefixtures("node_healthy")]

U1, U2 = "privtmp1", "privtmp2"


@pytest.fixture(scope="module")
def stack():
    # The entry helper sizes /dev/shm and /var/tmp from the job's memory on
    # the node: the shares are privtmpd.conf's alone (nothing in plugstack).
    s = Stack("feat", daemon_extra="shm=job:50% keep_failed=1h keep_max=1g limit=32m "
              "tmpfs=/var/tmp:job:25% mount_options=/var/tmp:noexec",
              extra_conf="SelectTypeParameters=CR_Core_Memory")
    s.start()
    yield s
    s.stop()


def _shm_mb(out):
    """Size in MiB from `stat -f -c '%b %S' /dev/shm` output."""
    blocks, bsize = out.split()[:2]
    return int(blocks) * int(bsize) // (1 << 20)


def test_dev_shm_follows_the_jobs_memory(stack):
    c = stack.cluster
    host_st = os.stat("/dev/shm")
    r = c.srun(U1, ["--mem=200", "sh", "-c", "stat -f -c '%b %S' /dev/shm; stat -c '%a %d' /dev/shm; "
                    "echo x > /dev/shm/seg && echo wrote; stat -f -c 'vt %b %S' /var/tmp; "
                    "stat -f -c 'inodes %c' /var/tmp; "
                    "grep ' /var/tmp ' /proc/self/mountinfo"])
    assert r.returncode == 0, r.stderr + c.logs()
    lines = r.stdout.splitlines()
    assert _shm_mb(lines[0]) == 100, r.stdout           # 50% of --mem=200
    vt = [line[3:] for line in lines if line.startswith("vt ")]
    assert [_shm_mb(v) for v in vt] == [50], r.stdout   # tmpfs=/var/tmp:job:25%
    # nr_inodes follows the size (one per 4 KiB): not the count for 25% of the RAM.
    assert [line for line in lines if line.startswith("inodes ")] == [f"inodes {50 * 256}"], r.stdout
    # The resize kept mount_options=/var/tmp:noexec and the nosuid,nodev.
    opts = [line.split()[5].split(",") for line in lines if " /var/tmp " in line][-1]
    assert {"noexec", "nosuid", "nodev"} <= set(opts), r.stdout
    mode, dev = lines[1].split()
    assert mode == "1777" and int(dev) != host_st.st_dev  # the job's own tmpfs
    assert "wrote" in r.stdout
    assert not os.path.exists("/dev/shm/seg")            # not on the host


def test_dev_shm_size_per_job_and_enospc_at_the_limit(stack):
    c = stack.cluster
    r = c.srun(U2, ["--mem=64", "-n2", "sh", "-c",
                    "stat -f -c 'shm %b %S' /dev/shm; stat -f -c 'vt %b %S' /var/tmp; "
                    "[ $SLURM_PROCID = 0 ] && { dd if=/dev/zero of=/dev/shm/big bs=1M count=64 2>&1; "
                    "echo dd=$?; } ; true"])
    assert r.returncode == 0, r.stderr + c.logs()
    sizes = [line[4:] for line in r.stdout.splitlines() if line.startswith("shm ")]
    assert [_shm_mb(s) for s in sizes] == [32, 32], r.stdout   # both tasks: same tmpfs, same size
    sizes = [line[3:] for line in r.stdout.splitlines() if line.startswith("vt ")]
    assert [_shm_mb(s) for s in sizes] == [16, 16], r.stdout
    assert "No space left on device" in r.stdout and "dd=1" in r.stdout


def test_failed_job_keeps_its_tmp_for_the_user(stack):
    c = stack.cluster
    import pwd
    uid = pwd.getpwnam(U1).pw_uid
    failed = c.sbatch(U1, "#!/bin/sh\necho evidence > /tmp/core.txt\nexit 3\n")
    done = c.sbatch(U1, "#!/bin/sh\necho fine > /tmp/ok.txt\n")
    bad, good = failed.jobid, done.jobid
    # The states wait_job saw: asking again later may find a job slurmctld
    # already forgot (MinJobAge=30) on a slow machine.
    assert (failed.state, done.state) == ("FAILED", "COMPLETED"), (failed.state, done.state)
    c.wait_idle(timeout=60)                          # both Epilogs done
    stack.daemon.wait_removals()
    kept = [k for k in stack.daemon.request(op="list")["kept"] if k["job"] in (int(bad), int(good))]
    assert [(k["job"], k["exit_code"], k["uid"]) for k in kept] == [(int(bad), 3 << 8, uid)]
    path = kept[0]["path"]
    # Its owner reads it after the job, another user cannot.
    r = c.srun(U1, ["cat", f"{path}/fs/tmp/core.txt"])      # limit=: in the job's filesystem
    assert r.stdout == "evidence\n", r.stderr
    r = c.srun(U2, ["cat", f"{path}/fs/tmp/core.txt"])
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert not os.path.exists(stack.job_dir(bad)) and not os.path.exists(stack.job_dir(good))


def test_size_limit_gives_the_job_enospc_not_the_node(stack):
    c = stack.cluster
    free_before = os.statvfs(stack.daemon.base_parent).f_bavail
    r = c.srun(U1, ["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=100 2>&1; echo dd=$?; "
                    "df -k /tmp | tail -1"])
    assert "No space left on device" in r.stdout and "dd=1" in r.stdout, r.stdout + r.stderr
    assert int(r.stdout.splitlines()[-1].split()[1]) <= 32 * 1024      # df in the job: the limit
    c.wait_idle(timeout=60)
    stack.daemon.wait_removals()
    st = os.statvfs(stack.daemon.base_parent)
    assert (free_before - st.f_bavail) * st.f_frsize < 8 << 20        # all given back after the job
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    # Loop devices stay only for kept directories of failed jobs (earlier tests).
    assert [line for line in out.splitlines() if stack.daemon.base_parent in line and ".kept." not in line] == []


def _set_prolog(c, enabled):
    """Drop or restore the Prolog= line of the running cluster's slurm.conf."""
    with open(c.conf) as f:
        lines = [line for line in f.read().splitlines() if not line.startswith("Prolog=")]
    if enabled:
        lines.insert(1, f"Prolog={c.prolog}")
    with open(c.conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    c.scontrol("reconfigure")
    time.sleep(1)


def test_no_prolog_mode_the_first_task_creates_the_namespace(stack):
    """create=yes: no Prolog; the entry helper asks the daemon on the job's
    first task, all tasks (racing) share one namespace, the Epilog cleans up."""
    c = stack.cluster
    lines = list(c.plugstack_lines)
    _set_prolog(c, False)
    c.write_plugstack([line + " create=yes" for line in lines])
    try:
        script = """#!/bin/sh
srun -n2 sh -c 'echo task-$SLURM_PROCID > /tmp/t-$SLURM_PROCID; sleep 0.5; ls /tmp | tr "\\n" " "; echo'
echo BATCH: $(ls /tmp | tr "\\n" " ") TMPDIR=$TMPDIR
"""
        jobid, out = c.sbatch(U1, script, args=["-n2"])
        assert "BATCH: t-0 t-1 TMPDIR=/tmp" in out, out + c.logs()
        assert out.count("t-0 t-1") == 3, out          # both tasks and the batch step saw both files
        assert not os.path.exists("/tmp/t-0")
        # The helper's request (it sends no user name) made it, not a Prolog.
        import pwd
        uid = pwd.getpwnam(U1).pw_uid
        creates = [line for line in open(stack.daemon.log_path)
                   if f"job={jobid} " in line and "op=create result=ok" in line]
        assert creates and all(f"user={uid}" in line for line in creates), creates
        c.wait_idle(timeout=60)
        stack.daemon.wait_removals()
        assert not os.path.exists(stack.job_dir(jobid))
        assert not os.path.exists(stack.daemon.pin(jobid))
    finally:
        c.write_plugstack(lines)
        _set_prolog(c, True)


def test_helper_never_resizes_the_hosts_dev_shm(stack):
    """A daemon without shm=job: the job's /dev/shm is the host's, carries
    no mark, and the helper leaves it alone, even with the old plugin
    argument shm=50% (now ignored)."""
    from harness import DaemonProc
    c = stack.cluster
    other = DaemonProc("feat-noshm").start()
    lines = list(c.plugstack_lines)
    before = os.statvfs("/dev/shm").f_blocks
    try:
        c.write_plugstack([f"required {stack.so} rundir={other.rundir} tmpdir=/tmp shm=50% create=yes"])
        r = c.srun(U1, ["--mem=64", "stat", "-c", "%d", "/dev/shm"])
    finally:
        c.write_plugstack(lines)
        other.cleanup()
    assert r.returncode == 0, r.stderr + c.logs()
    assert int(r.stdout) == os.stat("/dev/shm").st_dev           # the host's, as configured
    assert os.statvfs("/dev/shm").f_blocks == before

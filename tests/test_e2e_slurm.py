"""End to end on a real one-node Slurm cluster (Slurm 22.05 from the
distribution), with jobs run as unprivileged users: the Prolog asks the
daemon for the job's namespace, the entry helper puts every task into it,
the Epilog tears it down."""

import os
import subprocess
import time

import pytest

from harness import Stack, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.usefixtures("node_healthy")]

U1, U2 = "privtmp1", "privtmp2"


@pytest.fixture(scope="module")
def stack():
    s = Stack("e2e").start()
    yield s
    s.stop()


def _gate(stack, user, name):
    """A file in the user's work directory: the job waits for it, so the
    test can look at the host side while the job runs."""
    path = os.path.join(stack.cluster.user_dir(user), name)
    if os.path.exists(path):
        os.unlink(path)     # left by an earlier run
    return path


def _release(path):
    with open(path, "w"):
        pass


def test_batch_steps_and_tasks_share_the_private_tmp(stack):
    c = stack.cluster
    gate = _gate(stack, U1, "go-share")
    script = f"""#!/bin/sh
echo from-batch > /tmp/batch-file
echo from-batch > /var/tmp/batch-file
echo "TMPDIR=$TMPDIR"
echo "PWD=$(pwd)"
while [ ! -e {gate} ]; do sleep 0.05; done
srun -n2 sh -c 'cat /tmp/batch-file && echo task-$SLURM_PROCID > /tmp/task-$SLURM_PROCID'
srun --overlap -n1 sh -c 'echo LATER: $(ls /tmp | sort | tr "\\n" " ")'
echo VARTMP: $(ls /var/tmp)
"""
    # An existing, writable TMPDIR from the submit side: Slurm would keep it.
    jobid, _ = c.sbatch(U1, script, args=["-n2"], wait=False, env={"TMPDIR": c.user_dir(U1)})
    jdir = stack.job_dir(jobid)
    wait_for(lambda: os.path.exists(f"{jdir}/tmp/batch-file"), what="the job's file on the host")
    # On the host the job's files are in $base.$jobid.0/<mount>, owned by the user...
    assert open(f"{jdir}/var_tmp/batch-file").read() == "from-batch\n"
    st = os.stat(f"{jdir}/tmp")
    import pwd
    assert st.st_uid == pwd.getpwnam(U1).pw_uid and st.st_mode & 0o777 == 0o700
    # ...and not in the host's /tmp or /var/tmp.
    assert not os.path.exists("/tmp/batch-file") and not os.path.exists("/var/tmp/batch-file")
    _release(gate)
    info = c.wait_job(jobid)
    out = c.read_output(U1, jobid)
    assert info["state"] == "COMPLETED", out + c.logs()
    assert "TMPDIR=/tmp" in out                       # overrides the submit side's TMPDIR
    assert f"PWD={c.user_dir(U1)}" in out             # working directory kept
    assert out.count("from-batch") == 2               # both tasks saw the batch step's file
    assert "LATER: batch-file task-0 task-1" in out   # a later step sees the tasks' files
    assert "VARTMP: batch-file" in out
    stack.daemon.wait_removals()
    assert not os.path.exists(jdir)                   # everything gone after the job
    assert not os.path.exists(stack.daemon.pin(jobid))


def test_srun_job_gets_empty_private_tmp(stack):
    r = stack.cluster.srun(U1, ["sh", "-c", "ls -A /tmp /var/tmp | wc -w; stat -c '%U %a' /tmp; "
                                "touch /tmp/x && echo wrote"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "2"           # just the two "dir:" headers: both empty
    assert lines[1:3] == [U1, "700"]
    assert "wrote" in r.stdout
    assert not os.path.exists("/tmp/x")


def test_two_users_jobs_are_isolated(stack):
    c = stack.cluster
    gate = _gate(stack, U1, "go-iso")
    a, _ = c.sbatch(U1, f"""#!/bin/sh
echo secret > /tmp/secret-a
while [ ! -e {gate} ]; do sleep 0.05; done
""", wait=False)
    adir = stack.job_dir(a)
    wait_for(lambda: os.path.exists(f"{adir}/tmp/secret-a"), what="job A's file")
    b = c.srun(U2, ["sh", "-c", f"ls -A /tmp; cat {adir}/tmp/secret-a; ls {adir}; echo done"])
    _release(gate)
    assert b.returncode == 0, b.stderr
    assert "secret" not in b.stdout.replace("secret-a:", "")
    assert b.stdout.strip().endswith("done")
    assert "Permission denied" in b.stderr or "No such file" in b.stderr
    assert c.wait_job(a)["state"] == "COMPLETED"


def test_requeued_job_gets_an_empty_tmp(stack):
    c = stack.cluster
    gate = _gate(stack, U1, "go-requeue")
    script = f"""#!/bin/sh
echo "run=$SLURM_RESTART_COUNT files=$(ls -A /tmp | tr '\\n' ,)"
echo run$SLURM_RESTART_COUNT > /tmp/marker
if [ "$SLURM_RESTART_COUNT" = "" ] || [ "$SLURM_RESTART_COUNT" = 0 ]; then
    while [ ! -e {gate} ]; do sleep 0.05; done
fi
"""
    jobid, _ = c.sbatch(U1, script, args=["--requeue", "--open-mode=append"], wait=False)
    wait_for(lambda: os.path.exists(f"{stack.job_dir(jobid, 0)}/tmp/marker"), what="run 0's marker")
    c.scontrol("requeue", jobid)
    # A requeued job waits ~120 s before it may start again; skip that.
    wait_for(lambda: c.job_state(jobid) == "PENDING", what="the requeue")
    time.sleep(3)   # let slurmd's credential-cache scan pass (NOTES: Prolog skipped within ~2 s)
    c.scontrol("update", f"jobid={jobid}", "starttime=now")
    info = c.wait_job(jobid, timeout=120)
    _release(gate)
    out = c.read_output(U1, jobid)
    assert info["state"] == "COMPLETED", out + c.logs()
    assert "run=1 files=\n" in out or "run=1 files=" in out.splitlines()[-1], out
    assert "run=1 files=marker" not in out          # run 1 did not inherit run 0's /tmp
    stack.daemon.wait_removals()
    assert not os.path.exists(stack.job_dir(jobid, 0))
    assert not os.path.exists(stack.job_dir(jobid, 1))


def test_job_without_namespace_fails_instead_of_using_host_tmp(stack):
    """Daemon down: the Prolog fails (the node drains, as Slurm does for any
    failed Prolog) and no task ever runs on the host /tmp.  The test then
    resumes the node."""
    c = stack.cluster
    stack.daemon.stop()
    try:
        r = c.srun(U1, ["sh", "-c", "touch /tmp/leak-check; echo ran"], timeout=90)
    finally:
        stack.daemon.start()
    assert "ran" not in r.stdout
    assert not os.path.exists("/tmp/leak-check")
    # slurmctld drains the node on slurmd's report of the failed Prolog,
    # which need not have been handled when srun gives up.
    wait_for(lambda: "DRAIN" in c.node_state().upper(), what="the node to be drained", timeout=60)
    # sinfo -R names the problem, not only Slurm's "Prolog error".
    wait_for(lambda: "privtmpd: job" in c.node_info().get("Reason", ""), what="privtmpd's drain reason",
              timeout=20)
    assert "privtmpd" in subprocess.run(["sinfo", "-R", "-h"], env=c.env(), capture_output=True,
                                        text=True).stdout
    c.scontrol("update", f"nodename={c.host}", "state=resume")
    # slurmctld flags a resumed node NOT_RESPONDING until its next ping.
    c.scontrol("reconfigure")
    wait_for(lambda: "NOT_RESPONDING" not in c.node_info().get("State", ""), what="the node to respond")

"""The privilege boundary, for real: a non-root user cannot talk to the
daemon, read the run directory, its pins or another job's directories,
nor enter another job's namespace; and a real Slurm job's tasks inherit no
file descriptor of privtmpd.  Plus 50 short jobs of two users submitted at
once on the real cluster."""

import os
import re
import subprocess
import time

import pytest

from relutil import USER, USER_PY, as_user, job_entries, mounts_under, pins, state_files

pytestmark = pytest.mark.root

OTHER = 12345       # a second unprivileged user


def test_non_root_cannot_reach_daemon_pins_or_other_jobs(daemon, figures):
    assert daemon.create(21, uid=USER, gid=USER)["ok"]
    assert daemon.create(22, uid=OTHER, gid=OTHER)["ok"]
    tried = {}
    probe = r"""
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
rundir, pin, other_tmp, pid_in_job, sock = sys.argv[1:6]
pinfd = int(sys.argv[6])
def attempt(name, fn):
    try:
        fn(); print(name, "ALLOWED")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
def conn():
    s = socket.socket(socket.AF_UNIX); s.connect(sock)
attempt("connect", conn)
attempt("list-rundir", lambda: os.listdir(rundir))
attempt("list-pins", lambda: os.listdir(rundir + "/ns"))
attempt("open-pin", lambda: os.close(os.open(pin, os.O_RDONLY)))
attempt("list-other-job", lambda: os.listdir(other_tmp))
attempt("open-job-ns", lambda: os.close(os.open(f"/proc/{pid_in_job}/ns/mnt", os.O_RDONLY)))
def setns():
    if libc.setns(pinfd, 0x20000) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
attempt("setns-inherited-pin-fd", setns)
"""
    holder = subprocess.Popen(["nsenter", f"--mount={daemon.pin(22)}", "--", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt") \
                or os.readlink(f"/proc/{holder.pid}/exe").endswith("nsenter"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Even handed an open fd on the pin (a leak), setns needs CAP_SYS_ADMIN.
        pinfd = os.open(daemon.pin(22), os.O_RDONLY)
        try:
            r = as_user([USER_PY, "-c", probe, daemon.rundir, daemon.pin(22), f"{daemon.job_dir(22)}/tmp",
                         str(holder.pid), daemon.socket, str(pinfd)], pass_fds=(pinfd,), check=True)
        finally:
            os.close(pinfd)
    finally:
        holder.kill()
        holder.wait()
    for line in r.stdout.split("\n"):
        if line:
            k, v = line.split()
            tried[k] = v
    assert tried == {"connect": "EACCES", "list-rundir": "EACCES", "list-pins": "EACCES", "open-pin": "EACCES",
                     "list-other-job": "EACCES", "open-job-ns": "EACCES", "setns-inherited-pin-fd": "EPERM"}, tried
    assert daemon.destroy(21, restart=0)["ok"] and daemon.destroy(22, restart=0)["ok"]
    figures("non-root: socket, run directory, pins, other job's directory, setns", attempts=len(tried),
            refused=sum(v != "ALLOWED" for v in tried.values()), allowed=0)


# --- real Slurm cluster ------------------------------------------------------------

@pytest.fixture(scope="module")
def stack():
    from harness import Stack
    s = Stack("reliability").start()
    yield s
    s.stop()


FD_REPORT = r"""
for f in /proc/self/fd/*; do
  n=${f##*/}; t=$(readlink "$f" 2>/dev/null)
  echo "fd $n $t"
done
echo "tmp $(ls -A /tmp | wc -l) $(stat -c %u:%a /tmp)"
"""


@pytest.mark.slurm
def test_job_tasks_inherit_no_daemon_fd(stack, figures):
    d = stack.daemon
    jobid, out = stack.cluster.sbatch("privtmp1", "#!/bin/sh\n" + FD_REPORT + "srun sh -c '" +
                                      FD_REPORT.replace("'", "'\\''") + "'\n")
    fds = [line.split(" ", 2) for line in out.splitlines() if line.startswith("fd ")]
    assert fds, out
    bad = []
    for _, n, target in fds:
        target = target if len(target) else ""
        if any(x in target for x in (d.rundir, d.base_parent, "privtmpd", "nsfs", "mnt:[")):
            bad.append((n, target))
    assert not bad, bad
    # The private /tmp the task got, as a check that the helper did run.
    assert re.search(r"^tmp 0 ", out, re.M), out
    figures("fds inherited by a real Slurm job's tasks (batch + srun)", fds_checked=len(fds), daemon_fds=0)


@pytest.mark.slurm
def test_50_jobs_of_two_users_at_once(stack, figures):
    d = stack.daemon
    c = stack.cluster
    script = ("#!/bin/sh\nn=$(ls -A /tmp | wc -l)\nowner=$(stat -c %U /tmp)\n"
              "echo $SLURM_JOB_ID > /tmp/mine\nsleep 1\n"
              "echo \"start=$n owner=$owner me=$(id -un) mine=$(cat /tmp/mine) others=$(ls -A /tmp | wc -l)\"\n")
    t0 = time.monotonic()
    ids = []
    for i in range(50):
        user = "privtmp1" if i % 2 == 0 else "privtmp2"
        jobid, _ = c.sbatch(user, script, wait=False)
        ids.append((user, jobid))
    outputs = {}
    for user, jobid in ids:
        c.wait_job(jobid, timeout=600)
        outputs[jobid] = (user, c.read_output(user, jobid))
    elapsed = time.monotonic() - t0
    bad = []
    for jobid, (user, out) in outputs.items():
        want = f"start=0 owner={user} me={user} mine={jobid} others=1"
        if want not in out:
            bad.append((jobid, out))
    assert not bad, bad[:5]
    c.wait_idle(timeout=120)
    c.assert_not_drained()
    d.wait_removals(timeout=120)
    assert pins(d) == [] and state_files(d) == [] and job_entries(d) == []
    assert len(mounts_under(d.rundir)) == 1 and not mounts_under(d.base_parent)
    figures("50 Slurm jobs of two users submitted at once", jobs=50, users=2, seconds=round(elapsed, 1),
            private_and_empty=50, leftovers=0, node_drained=False, failures=0)

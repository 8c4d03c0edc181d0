"""sbcast into the job's private /tmp, end to end on the multi-node lab
(tests/nodelab.py) with Slurm's real sbcast.

sbcast writes as the job's user from slurmd's namespace (the host's), so a
plain `sbcast f /tmp/f` lands in each node's shared /tmp.  With sbcast=yes
in privtmpd.conf and host_tmp=BASE on the entry helper's plugstack line,
the job gets PRIVTMPD_HOST_TMP, the host path of its private /tmp (the
same on every node), and `sbcast f "$PRIVTMPD_HOST_TMP/f"` puts f in the
job's /tmp on every node of the job.

The same lab checks mount_options= and tmpfs= through Slurm: every task
on every node gets them."""

import os

import pytest

from harness import wait_for
from nodelab import LabStack

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.usefixtures("node_healthy")]

U1, U2 = "privtmp1", "privtmp2"
NODES = ("n1", "n2")
# The lab's nodes run the production layout plus the per-mount-point
# features: /tmp on disk with noexec (and reachable by sbcast), /var/tmp a
# 16 MiB tmpfs of each job's own.
CONF = ("base=/tmp/slurm\nmount=/tmp\nmount=/var/tmp\nsbcast=yes\n"
        "mount_options=/tmp:noexec\ntmpfs=/var/tmp:16m\n")


@pytest.fixture(scope="module")
def stack():
    s = LabStack(nodes=len(NODES), daemon_conf=CONF,
                 plugstack_args="tmpdir=/tmp host_tmp=/tmp/slurm",
                 # Every node's Prolog at allocation: sbcast reaches nodes no step ran on yet.
                 extra_conf="PrologFlags=Alloc").start()
    yield s
    s.stop()


def _lines(output, tag):
    return sorted(line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(tag + " "))


def test_sbcast_to_the_host_path_reaches_the_private_tmp_of_every_node(stack):
    c = stack.cluster
    src = os.path.join(c.user_dir(U1), "payload.txt")
    with open(src, "w") as f:
        f.write("broadcast payload\n")
    os.chown(src, *_ids(U1))
    script = f"""#!/bin/sh
echo "HOST $PRIVTMPD_HOST_TMP"
sbcast -f {src} "$PRIVTMPD_HOST_TMP/payload.txt"; echo "SBCAST $?"
srun -N2 --ntasks-per-node=1 sh -c 'echo "SEEN $(hostname) $(cat /tmp/payload.txt) $(stat -c %U /tmp/payload.txt)"'
"""
    r = c.sbatch(U1, script, args=["-N2", "--ntasks-per-node=1"])
    assert r.returncode == 0, r.output
    assert _lines(r.output, "HOST") == [f"/tmp/slurm.{r.jobid}.0/tmp"], r.output
    assert _lines(r.output, "SBCAST") == ["0"], r.output
    assert _lines(r.output, "SEEN") == [f"{n} broadcast payload {U1}" for n in NODES], r.output
    for n in NODES:
        # Nothing landed on the node's shared /tmp.
        assert not os.path.exists(stack.node_path(n, "/tmp/payload.txt")), n
    wait_for(lambda: not any(os.path.lexists(stack.job_dir(n, r.jobid)) for n in NODES), timeout=60,
             what="the job's directories to be removed on every node")


def test_a_plain_sbcast_to_tmp_is_removed_from_every_node_when_the_job_ends(stack):
    """`sbcast f /tmp/f` without the variable lands in each node's shared
    /tmp (slurmd writes from the host's namespace); the job's end removes it
    there with the user's rights (host_leftovers=remove, the default), and
    a file of the same user's from before the job stays."""
    c = stack.cluster
    src = os.path.join(c.user_dir(U1), "plain.txt")
    with open(src, "w") as f:
        f.write("plain payload\n")
    os.chown(src, *_ids(U1))
    for n in NODES:
        old = stack.node_path(n, "/tmp/privtmp1-before.txt")
        with open(old, "w") as f:
            f.write("kept\n")
        os.chown(old, *_ids(U1))
    script = f"""#!/bin/sh
sbcast -f {src} /tmp/plain-$SLURM_JOB_ID.txt; echo "SBCAST $?"
srun -N2 --ntasks-per-node=1 sh -c 'test -e /tmp/plain-$SLURM_JOB_ID.txt; echo "INJOB $(hostname) $?"'
"""
    r = c.sbatch(U1, script, args=["-N2", "--ntasks-per-node=1"])
    assert r.returncode == 0 and _lines(r.output, "SBCAST") == ["0"], r.output
    # Not in the job's private /tmp: in the node's shared one.
    assert _lines(r.output, "INJOB") == [f"{n} 1" for n in NODES], r.output
    name = f"/tmp/plain-{r.jobid}.txt"
    wait_for(lambda: not any(os.path.lexists(stack.node_path(n, name)) for n in NODES), timeout=60,
             what=f"{name} to be removed from every node's shared /tmp")
    for n in NODES:
        assert os.path.exists(stack.node_path(n, "/tmp/privtmp1-before.txt")), n
        os.unlink(stack.node_path(n, "/tmp/privtmp1-before.txt"))
        # The sweep's child unlinks before its worker reports: the line
        # comes a moment after the file is gone.
        wait_for(lambda n=n: any(f"job={r.jobid} " in line and "op=leftovers result=removed" in line
                             for line in stack.daemon_log(n).splitlines()), timeout=30,
                 what=f"the op=leftovers line of job {r.jobid} on {n}")


def test_another_user_cannot_sbcast_into_a_running_job(stack):
    """The job directory's top is 0711 for sbcast; the user's /tmp in it is
    0700: a second user's sbcast to the first job's host path is refused,
    and the first job's /tmp stays unreadable to them from the host."""
    c = stack.cluster
    gate = os.path.join(c.user_dir(U1), "go-sbcast")
    for p in (gate, gate + ".ready"):
        if os.path.exists(p):
            os.unlink(p)
    script = f"""#!/bin/sh
echo secret > /tmp/secret
touch {gate}.ready
while [ ! -e {gate} ]; do sleep 0.05; done
ls -A /tmp | sed 's/^/LS /'
"""
    victim, _ = c.sbatch(U1, script, args=["-N1", "-w", "n1"], wait=False)
    wait_for(lambda: os.path.exists(gate + ".ready"), what="the victim job to start")
    host_tmp = f"/tmp/slurm.{victim}.0/tmp"
    src = os.path.join(c.user_dir(U2), "evil.txt")
    with open(src, "w") as f:
        f.write("planted\n")
    os.chown(src, *_ids(U2))
    attack = f"""#!/bin/sh
sbcast -f {src} {host_tmp}/evil.txt; echo "SBCAST $?"
cat {host_tmp}/secret; echo "CAT $?"
"""
    r = c.sbatch(U2, attack, args=["-N1", "-w", "n1"])
    open(gate, "w").close()
    assert _lines(r.output, "SBCAST") != ["0"], r.output
    assert "secret" not in r.output.replace("/secret", ""), r.output
    assert _lines(r.output, "CAT") != ["0"], r.output
    info = c.wait_job(victim, timeout=60)
    out = c.read_output(U1, victim)
    assert info["returncode"] == 0 and _lines(out, "LS") == ["secret"], out


def _ids(user):
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def test_mount_options_and_tmpfs_in_every_task_of_every_node(stack):
    c = stack.cluster
    script = r"""#!/bin/sh
srun -N2 --ntasks-per-node=1 sh -c '
h=$(hostname)
cp /bin/true /tmp/t; /tmp/t; echo "EXEC $h $?"
echo "FS $h $(stat -f -c %T /var/tmp) $(stat -c %a /var/tmp)"
dd if=/dev/zero of=/var/tmp/fill bs=1M count=32 2>/dev/null; echo "DD $h $?"
echo "USED $h $(du -sm /var/tmp | cut -f1)"'
"""
    r = c.sbatch(U1, script, args=["-N2", "--ntasks-per-node=1"])
    assert r.returncode == 0, r.output
    assert _lines(r.output, "EXEC") == [f"{n} 126" for n in NODES], r.output      # noexec
    assert _lines(r.output, "FS") == [f"{n} tmpfs 1777" for n in NODES], r.output
    assert _lines(r.output, "DD") == [f"{n} 1" for n in NODES], r.output          # ENOSPC
    assert _lines(r.output, "USED") == [f"{n} 16" for n in NODES], r.output
    for n in NODES:
        assert not os.path.exists(stack.node_path(n, "/var/tmp/fill")), n
    wait_for(lambda: not any(os.path.lexists(stack.job_dir(n, r.jobid)) for n in NODES), timeout=60,
             what="the job's directories to be removed on every node")

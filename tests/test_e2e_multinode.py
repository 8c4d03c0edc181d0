"""End to end on a real multi-node Slurm cluster: a controller and three
nodes, each with its own PID, mount, network and UTS namespace, its own
/tmp (a tmpfs), /run and munged (tests/nodelab.py), privtmpd on every node
with the production defaults (base=/tmp/slurm, rundir=/run/privtmpd).

What each test shows is what an admin would check on a real cluster: every
node of a job builds the job's namespace in that node's own job directory,
every step on a node shares it, jobs of two users on the same nodes never
see each other's files, a daemon restarted on one node does not disturb a
running job, a daemon that is down on one node at job start drains that
node with a reason that says why and lets no task run on a shared /tmp."""

import os
import re

import pytest

from harness import wait_for
from nodelab import LabStack

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.usefixtures("node_healthy")]

U1, U2 = "privtmp1", "privtmp2"
NODES = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def stack():
    s = LabStack(nodes=len(NODES)).start()
    yield s
    s.stop()


def _gate(stack, user, name):
    path = os.path.join(stack.cluster.user_dir(user), name)
    for p in (path, path + ".ready"):
        if os.path.exists(p):
            os.unlink(p)
    return path


def _release(path):
    with open(path, "w"):
        pass


def _gone_everywhere(stack, job):
    wait_for(lambda: not any(os.path.lexists(stack.job_dir(n, job)) for n in NODES), timeout=60,
              what=f"job {job}'s directories to be removed on every node")
    for n in NODES:
        assert not os.path.lexists(stack.node_path(n, f"/run/privtmpd/ns/{job}")), n


def _lines(output, tag):
    """{hostname: rest} of the output lines 'TAG host rest'."""
    out = {}
    for line in output.splitlines():
        if line.startswith(tag + " "):
            _, host, rest = (line.split(" ", 2) + [""])[:3]
            out.setdefault(host, []).append(rest)
    return out


def test_every_node_of_a_job_has_its_own_private_tmp(stack):
    c = stack.cluster
    gate = _gate(stack, U1, "go-nodes")
    script = f"""#!/bin/sh
srun -N3 --ntasks-per-node=1 sh -c 'echo "$(hostname) $SLURM_JOB_ID" > /tmp/mine && \
echo "TMPDIR $(hostname) $TMPDIR" && echo "LS $(hostname) $(ls -A /tmp | tr "\\n" " ")"'
touch {gate}.ready
while [ ! -e {gate} ]; do sleep 0.05; done
"""
    job, _ = c.sbatch(U1, script, args=["-N3", "--ntasks-per-node=1"], wait=False)
    wait_for(lambda: os.path.exists(gate + ".ready"), what="the job's first step")
    for n in NODES:
        # The host's view of each node: the file is in that node's own job
        # directory, under the default base, and nowhere on the node's /tmp.
        with open(stack.job_dir(n, job) + "/tmp/mine") as f:
            assert f.read() == f"{n} {job}\n"
        assert not os.path.exists(stack.node_path(n, "/tmp/mine")), n
        assert os.stat(stack.job_dir(n, job) + "/tmp").st_uid == c_uid(U1)
    _release(gate)
    r = c.wait_job(job)
    out = c.read_output(U1, job)
    assert r["state"] == "COMPLETED", out
    assert _lines(out, "TMPDIR") == {n: ["/tmp"] for n in NODES}, out
    assert _lines(out, "LS") == {n: ["mine "] for n in NODES}, out
    _gone_everywhere(stack, job)


def c_uid(user):
    import pwd
    return pwd.getpwnam(user).pw_uid


def test_steps_across_nodes_share_one_namespace_per_node(stack):
    c = stack.cluster
    script = """#!/bin/sh
echo "BATCH $(hostname) $(readlink /proc/self/ns/mnt)"
echo batch > /tmp/batch-file
srun -N3 -n3 sh -c 'echo "S1 $(hostname) $(readlink /proc/self/ns/mnt)"; \
echo step1 > /tmp/step1-$(hostname)'
srun -N3 -n6 sh -c 'echo "S2 $(hostname) $(readlink /proc/self/ns/mnt) $(ls /tmp | tr "\\n" " ")"'
"""
    job, out = c.sbatch(U1, script, args=["-N3", "--ntasks-per-node=2"])
    batch, s1, s2 = _lines(out, "BATCH"), _lines(out, "S1"), _lines(out, "S2")
    assert set(s1) == set(s2) == set(NODES), out
    (batch_host, [batch_ns]), = batch.items()
    ns = {}
    for host in NODES:
        [step1_ns] = s1[host]
        assert len(s2[host]) == 2, out
        for line in s2[host]:
            step2_ns, files = line.split(" ", 1)
            # Every step and task on a node: the same namespace, and in it
            # the files of that node only.
            assert step2_ns == step1_ns, out
            expect = {f"step1-{host}"} | ({"batch-file"} if host == batch_host else set())
            assert set(files.split()) == expect, out
        ns[host] = step1_ns
    assert ns[batch_host] == batch_ns, out
    assert len(set(ns.values())) == len(NODES), out
    _gone_everywhere(stack, job)


def test_two_users_jobs_on_the_same_nodes_are_isolated(stack):
    c = stack.cluster
    jobs = {}
    gates = {}
    for user in (U1, U2):
        gates[user] = _gate(stack, user, "go-two")
        script = f"""#!/bin/sh
srun -N3 --ntasks-per-node=1 sh -c 'echo secret-$(id -un) > /tmp/secret-$(id -un)'
touch {gates[user]}.ready
while [ ! -e {gates[user]} ]; do sleep 0.05; done
srun -N3 --ntasks-per-node=1 sh -c 'echo "LS $(hostname) $(ls /tmp | tr "\\n" " ")"; \
cat /tmp/secret-privtmp1 /tmp/secret-privtmp2 2>/dev/null | sed "s/^/READ $(hostname) /"; true'
"""
        jobs[user], _ = c.sbatch(user, script, args=["-N3", "--ntasks-per-node=1"], wait=False)
    for user in (U1, U2):
        wait_for(lambda gate=gates[user]: os.path.exists(gate + ".ready"), what=f"{user}'s job")
    # Both jobs run on all three nodes at once.
    for n in NODES:
        for user in (U1, U2):
            d = stack.job_dir(n, jobs[user])
            assert os.listdir(d + "/tmp") == [f"secret-{user}"], (n, user)
            assert os.stat(d + "/tmp").st_uid == c_uid(user)
    for user in (U1, U2):
        _release(gates[user])
    for user in (U1, U2):
        r = c.wait_job(jobs[user])
        out = c.read_output(user, jobs[user])
        assert r["state"] == "COMPLETED", out
        assert _lines(out, "LS") == {n: [f"secret-{user} "] for n in NODES}, out
        assert _lines(out, "READ") == {n: [f"secret-{user}"] for n in NODES}, out
    for user in (U1, U2):
        _gone_everywhere(stack, jobs[user])


def test_daemon_restarted_on_one_node_mid_job(stack):
    c = stack.cluster
    gate = _gate(stack, U2, "go-restart")
    script = f"""#!/bin/sh
srun -N3 --ntasks-per-node=1 sh -c 'echo before-$(hostname) > /tmp/kept'
touch {gate}.ready
while [ ! -e {gate} ]; do sleep 0.05; done
srun -N3 --ntasks-per-node=1 sh -c 'echo "AFTER $(hostname) $(cat /tmp/kept) $(readlink /proc/self/ns/mnt)"'
"""
    job, _ = c.sbatch(U2, script, args=["-N3", "--ntasks-per-node=1"], wait=False)
    wait_for(lambda: os.path.exists(gate + ".ready"), what="the job's first step")
    stopped = stack.stop_daemon("n2")
    assert stopped, "no privtmpd found on n2"
    stack.start_daemon("n2")
    _release(gate)
    r = c.wait_job(job)
    out = c.read_output(U2, job)
    assert r["state"] == "COMPLETED", out
    after = _lines(out, "AFTER")
    assert {h: v[0].split()[0] for h, v in after.items()} == {n: f"before-{n}" for n in NODES}, out
    # The restarted daemon found the job's pin again and tore it down.
    _gone_everywhere(stack, job)
    log = stack.daemon_log("n2")
    assert re.search(rf"op=destroy .*job={job}\b.*result=ok|job={job}\b.*op=destroy.*result=ok", log), log[-3000:]


def test_daemon_down_on_one_node_at_job_start(stack):
    c = stack.cluster
    stack.stop_daemon("n3")
    job = None
    try:
        script = """#!/bin/sh
srun -N3 --ntasks-per-node=1 sh -c 'echo leaked > /tmp/leak-$(hostname)'
"""
        job, _ = c.sbatch(U1, script, args=["-N3", "--ntasks-per-node=1"], wait=False)
        wait_for(lambda: "DRAIN" in c.node_state("n3"), timeout=90, what="n3 to be drained")
        reason = c.node_info("n3").get("Reason", "")
        wait_for(lambda: c.node_info("n3").get("Reason", "").startswith("privtmpd:"), timeout=30,
                  what="the drain reason to name privtmpd")
        reason = c.node_info("n3")["Reason"]
        assert f"job {job}" in reason, reason
        c.wait_job(job, timeout=90)
        c.wait_idle(timeout=60, jobs=False)
        for n in NODES:
            # No task ran anywhere on a node's shared /tmp...
            leaks = [f for f in os.listdir(stack.node_path(n, "/tmp")) if f.startswith("leak-")]
            assert leaks == [], (n, leaks)
        # ... and the nodes whose Prolog worked were cleaned up by their Epilog.
        _gone_everywhere(stack, job)
        c.assert_not_drained(["n1", "n2"])
    finally:
        stack.start_daemon("n3")
        if job:
            c._client(["scancel", job], check=False)
        c.scontrol("update", "nodename=n3", "state=resume")
        c.wait_idle(timeout=60)


def test_job_array_spread_over_nodes(stack):
    c = stack.cluster
    gate = _gate(stack, U2, "go-array")
    ncpus = os.cpu_count() or 1
    tasks = len(NODES) * ncpus          # one per CPU: every node gets some
    script = f"""#!/bin/sh
echo a-$SLURM_ARRAY_TASK_ID > /tmp/task
touch {gate}.$SLURM_ARRAY_TASK_ID
while [ ! -e {gate} ]; do sleep 0.05; done
echo "TASK $(hostname) $SLURM_ARRAY_TASK_ID $SLURM_JOB_ID $(ls /tmp | tr "\\n" " ")$(cat /tmp/task)"
"""
    for i in range(1, tasks + 1):
        if os.path.exists(f"{gate}.{i}"):
            os.unlink(f"{gate}.{i}")
    job, _ = c.sbatch(U2, script, args=[f"--array=1-{tasks}", "-n1", "-o",
                                       os.path.join(c.user_dir(U2), "array-%A_%a.out")], wait=False)
    wait_for(lambda: all(os.path.exists(f"{gate}.{i}") for i in range(1, tasks + 1)),
              what="every array task to run at once")
    per_node = {n: [d for d in os.listdir(stack.node_path(n, "/tmp")) if d.startswith("slurm.")] for n in NODES}
    assert all(per_node.values()), per_node
    assert sum(len(v) for v in per_node.values()) == tasks, per_node
    _release(gate)
    seen = {}
    job_ids = []
    for i in range(1, tasks + 1):
        path = os.path.join(c.user_dir(U2), f"array-{job}_{i}.out")
        wait_for(lambda path=path: os.path.exists(path) and "TASK" in open(path).read(), what=f"array task {i}")
        for host, rest in _lines(open(path).read(), "TASK").items():
            task, jobid, files = rest[0].split(" ", 2)
            assert task == str(i)
            assert files == f"task a-{i}", files
            seen.setdefault(host, []).append(i)
            job_ids.append(jobid)
    assert len(seen) == len(NODES), seen
    c.wait_idle(timeout=60)
    for jobid in job_ids:
        _gone_everywhere(stack, jobid)

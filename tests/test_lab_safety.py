"""The test cluster never touches a Slurm of the machine's own: processes
named slurmctld, slurmd, slurmstepd and munged that it did not start live
through its start and stop, and it listens on ports of its own."""

import os
import shutil
import subprocess

import pytest

from localcluster import PORTS, LocalCluster

pytestmark = [pytest.mark.slurm, pytest.mark.root]

DECOYS = "/var/lib/privtmpd-test/decoys"


@pytest.fixture
def decoys():
    """Stand-ins for a real node's daemons: `sleep` under their names."""
    os.makedirs(DECOYS, exist_ok=True)
    procs = []
    for name in ("slurmctld", "slurmd", "slurmstepd", "munged"):
        exe = f"{DECOYS}/{name}"
        shutil.copy("/bin/sleep", exe)
        procs.append(subprocess.Popen([exe, "300"], start_new_session=True))
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_cluster_start_and_stop_leave_other_slurm_daemons_alone(decoys):
    c = LocalCluster()
    c.ensure_users()
    c.start()
    try:
        conf = open(c.conf).read()
        assert f"SlurmctldPort={PORTS[0]}" in conf and f"SlurmdPort={PORTS[1]}" in conf
        assert f"AuthInfo=socket={c.munge_socket}" in conf
        r = c.srun("privtmp1", ["true"])
        assert r.returncode == 0, r.stderr + c.logs()
    finally:
        c.stop()
    assert all(p.poll() is None for p in decoys), "the test cluster killed a process it did not start"
    # And a second start (which stops an interrupted run's leftovers) too.
    c.start()
    c.stop()
    assert all(p.poll() is None for p in decoys)


def _host_view():
    """What the lab must leave as it is: the host's network devices,
    /etc/hosts and the TCP ports listening in the host's namespace."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    with open("/etc/hosts", "rb") as f:
        hosts = f.read()
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":
                    listening.add(int(local.rsplit(":", 1)[1], 16))
    return sorted(line.split(":", 2)[1].split("@")[0].strip() for line in links.splitlines()), hosts, listening


def test_multinode_lab_leaves_the_host_alone(decoys):
    from nodelab import LabStack
    before = _host_view()
    lab = LabStack(nodes=2)
    lab.start()
    try:
        during = _host_view()
        r = lab.cluster.srun("privtmp1", ["-N2", "hostname"])
        assert r.returncode == 0, r.stderr + lab.cluster.logs()
        assert sorted(r.stdout.split()) == ["n1", "n2"]
    finally:
        lab.stop()
    after = _host_view()
    # No device, no /etc/hosts line, no listening port of the lab on the host
    # (slurmctld and slurmd listen on 6817/6818 in the lab's namespaces only).
    assert during[:2] == before[:2] == after[:2]
    assert not {6817, 6818} & (during[2] - before[2])
    assert all(p.poll() is None for p in decoys), "the lab killed a process it did not start"


def test_multinode_lab_stops_what_an_interrupted_run_left(decoys):
    """A run killed without its cleanup leaves the machines running; the
    next start stops them (and only them) by their holders' PIDs."""
    import sys
    from nodelab import DEFAULT_LABDIR, LabCluster
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from nodelab import LabStack; "
            "s = LabStack(nodes=2); s.start(); print(' '.join(str(m.pid) for m in s.cluster.machines), flush=True); "
            "os._exit(0)")
    r = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    holders = [int(p) for p in r.stdout.split()]
    inside = []
    lab_ns = set()
    for pid in holders:
        ns = os.stat(f"/proc/{pid}/ns/pid").st_ino
        lab_ns.add(ns)
        inside += [int(p) for p in os.listdir("/proc") if p.isdigit() and _ns_ino(p) == ns]
    assert len(inside) > 2 * len(holders), "the interrupted run left no daemons to find"
    c = LabCluster(DEFAULT_LABDIR, nodes=2)
    c.kill_leftovers()
    # Still alive in one of the lab's PID namespaces: a PID that merely
    # exists again may be anyone's (pid_max is 32768 here, and the suite
    # forks a lot), so a bare /proc/<pid> check could fail on a reused PID.
    alive = [p for p in set(inside) | set(holders) if _ns_ino(p) in lab_ns]
    assert alive == [], alive
    assert all(p.poll() is None for p in decoys)


def _ns_ino(pid):
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None

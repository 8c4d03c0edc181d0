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

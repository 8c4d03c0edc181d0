"""The daemon in a mount namespace that is not the initial one, as in a
container running slurmd and privtmpd, or a test node of a namespaced lab.

There the kernel's loop check (a mount namespace file may be bound only by
a caller whose own namespace is older) met per-CPU namespace ids: a job
namespace built on the wrong CPU had a smaller id than the daemon's, and
10-16 of 20 concurrent creates failed with EINVAL, each one a drained node.
"""

import os
import subprocess
import threading

import pytest

from harness import DaemonProc
from privtmpd import client

pytestmark = pytest.mark.root


@pytest.fixture
def contained():
    d = DaemonProc("container-ns", prefix=["unshare", "--mount", "--propagation", "slave"])
    d.start()
    yield d
    d.cleanup()


def _inside(d, *argv):
    """argv in the daemon's own mount namespace (where its pins are)."""
    return subprocess.run(["nsenter", "-t", str(d.proc.pid), "-m", "--", *argv], capture_output=True, text=True)


def test_every_create_pins_under_concurrent_load(contained, figures):
    d = contained
    own = _inside(d, "readlink", "/proc/self/ns/mnt").stdout.strip()
    assert own.startswith("mnt:[") and own != os.readlink("/proc/self/ns/mnt")     # not the initial one
    jobs = list(range(9001, 9041))
    replies = {}

    def create(job):
        replies[job] = client.request({"op": "create", "job": str(job), "restart": "0", "uid": "65534",
                                       "gid": "65534"}, d.socket, timeout=60, retry=5)

    for rnd in range(2):
        threads = [threading.Thread(target=create, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = {j: r for j, r in replies.items() if not r.get("ok")}
        figures("daemon in a child mount namespace, 40 concurrent creates", round=rnd, jobs=len(jobs),
                failures=len(failed))
        assert not failed, list(failed.items())[:3]
        # Each pin holds a mount namespace, in the daemon's own namespace.
        r = _inside(d, "sh", "-c", f"for j in {' '.join(map(str, jobs))}; do "
                                   f"nsenter --mount={d.rundir}/ns/$j -- true || echo bad $j; done")
        assert r.returncode == 0 and "bad" not in r.stdout, r.stdout + r.stderr
        for j in jobs:
            assert d.destroy(j)["ok"]
        replies.clear()


def test_namespace_tests_pass_with_a_tmpfs_tmp():
    """/tmp on a tmpfs (Debian 13's default): the namespace tests, run in a
    mount namespace of their own whose /tmp is a fresh tmpfs (the daemon
    they start then lives there too: not the initial namespace either).
    The checkout is bound outside /tmp first: CI's may be under /tmp."""
    import sys
    from harness import REPO
    here = "/var/lib/privtmpd-test/repo-bind"      # not under TEST_RUN: the inner run cleans that
    os.makedirs(here, exist_ok=True)
    python = sys.executable
    if python.startswith(REPO + "/"):
        python = here + python[len(REPO):]
    env = {k: v for k, v in os.environ.items() if k != "PRIVTMPD_RELIABILITY_LOG"}
    script = ('mount --bind "$1" "$2" && mount -t tmpfs -o mode=1777 privtmpd-test-tmp /tmp && cd "$2" && '
              'exec "$3" -m pytest -q -p no:cacheprovider tests/test_namespace.py')
    r = subprocess.run(["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, "sh", REPO, here, python],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1]

"""Shared fixtures.

Privileged tests (markers `root`, `slurm`) run for real: real namespaces,
real mounts, a real Slurm cluster.  Where they cannot run they skip with the
reason, unless PRIVTMPD_REQUIRE_PRIVILEGED=1 (set by CI), which turns every
such skip into a failure.
"""

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (DaemonProc, REPO, TEST_BASE_PARENT, TEST_RUN,  # noqa: E402,F401
                     clean_leftovers, nsenter)

REQUIRE = os.environ.get("PRIVTMPD_REQUIRE_PRIVILEGED") == "1"


def privileged_skip(reason):
    if REQUIRE:
        pytest.fail(f"privileged test cannot run: {reason} (PRIVTMPD_REQUIRE_PRIVILEGED=1)")
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running reliability case (still run in CI)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("root") or item.get_closest_marker("slurm"):
        if os.geteuid() != 0:
            privileged_skip("needs root (mount namespaces, mounts)")
    if item.get_closest_marker("slurm"):
        for tool in ("slurmctld", "slurmd", "munged", "srun"):
            if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
                privileged_skip(f"{tool} not installed (apt-get install slurmctld slurmd slurm-client munge)")


@pytest.fixture(scope="session", autouse=True)
def _session_leftovers():
    if os.geteuid() == 0:
        clean_leftovers()
    yield


@pytest.fixture
def daemon_factory(request):
    made = []

    def make(extra="", name=None, start=True, base_parent=None):
        n = name or f"{request.node.name}-{len(made)}"
        d = DaemonProc(n, extra, base_parent)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory()




@pytest.fixture
def node_healthy(request):
    """After each test on a module's `stack` (harness.Stack): the node is
    idle again and was never drained.  Slurm tests use it through
    pytest.mark.usefixtures("node_healthy")."""
    stack = request.getfixturevalue("stack")
    yield
    stack.cluster.wait_idle(timeout=60)
    stack.cluster.assert_not_drained()


@pytest.fixture
def figures(request):
    """record(case, **figures): one JSON line per measured case, appended to
    $PRIVTMPD_RELIABILITY_LOG when set (tools/reliability_report.py turns
    them into docs/reliability.md), and printed either way."""
    import json
    import time

    def record(case, **data):
        row = {"test": request.node.nodeid, "case": case, "time": time.time(), **data}
        print("FIGURES " + json.dumps(row, sort_keys=True))
        path = os.environ.get("PRIVTMPD_RELIABILITY_LOG")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
    return record

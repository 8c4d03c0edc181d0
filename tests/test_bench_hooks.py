"""The benchmark runs our hooks as shipped, with only the socket changed:
keep bench.common.make_hooks in step with scripts/prolog.py."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import make_hooks  # noqa: E402


def test_bench_hooks_are_the_shipped_ones_with_another_socket(tmp_path):
    sock = str(tmp_path / "none.sock")
    hooks = make_hooks(str(tmp_path / "hooks"), sock)
    for kind in ("prolog", "epilog"):
        text = open(hooks[kind]).read()
        assert text.startswith("#!/usr/bin/python3 -IS\n")
        assert f'run_hook("{kind}", ["--socket", {sock!r}])' in text
    # No daemon there: the hook says so and fails, naming the socket.
    r = subprocess.run([hooks["epilog"]], env={"SLURM_JOB_ID": "5"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and sock in r.stderr and r.stderr.startswith("privtmpd-epilog:")

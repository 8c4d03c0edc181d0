"""The Prolog and Epilog under a hostile environment: PATH and PYTHONPATH
pointing at a directory with a fake `privtmpd` package and a fake `json`
module, LD_PRELOAD of a missing library, PYTHONSTARTUP, PYTHONINSPECT,
PYTHONHOME, a hostile working directory.  The hooks still do the right
thing, and none of the planted code runs."""

import os
import subprocess

import pytest

from relutil import gone, live, run_hook

pytestmark = pytest.mark.root

PLANT = "import os\nopen(os.environ.get('EVIL_MARK', '/dev/null'), 'a').write(__name__ + '\\n')\n"


@pytest.fixture
def evil(tmp_path):
    d = tmp_path / "evil"
    (d / "privtmpd").mkdir(parents=True)
    for rel in ("privtmpd/__init__.py", "privtmpd/client.py", "json.py", "posix.py", "_socket.py",
                "startup.py", "sitecustomize.py", "usercustomize.py"):
        (d / rel).write_text(PLANT + ("def run_hook(*a):\n    return 0\n" if rel.endswith("client.py") else ""))
    for tool in ("python3", "sh", "mount", "nsenter"):
        (d / tool).write_text(f"#!/bin/sh\necho planted >> {tmp_path}/mark\nexit 0\n")
        (d / tool).chmod(0o755)
    return d


CASES = {
    "PATH": {"PATH": "{evil}"},
    "PYTHONPATH": {"PYTHONPATH": "{evil}"},
    "LD_PRELOAD": {"LD_PRELOAD": "/nonexistent/libevil.so"},
    "PYTHONSTARTUP+PYTHONINSPECT": {"PYTHONSTARTUP": "{evil}/startup.py", "PYTHONINSPECT": "1"},
    "PYTHONHOME": {"PYTHONHOME": "{evil}"},
    "everything": {"PATH": "{evil}", "PYTHONPATH": "{evil}", "LD_PRELOAD": "/nonexistent/libevil.so",
                   "PYTHONSTARTUP": "{evil}/startup.py", "PYTHONINSPECT": "1", "PYTHONUSERBASE": "{evil}",
                   "PYTHONSAFEPATH": "", "PYTHONDONTWRITEBYTECODE": "", "TMPDIR": "{evil}", "HOME": "{evil}"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hooks_ignore_hostile_environment(daemon, evil, tmp_path, case, figures):
    mark = tmp_path / "mark"
    env = {k: v.format(evil=evil) for k, v in CASES[case].items()}
    env["EVIL_MARK"] = str(mark)
    job = 500
    # Run from inside the hostile directory too.
    r = subprocess.run([f"{os.path.dirname(os.path.dirname(__file__))}/scripts/prolog.py", "--socket",
                        daemon.socket], cwd=evil, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       env={"SLURM_JOB_ID": str(job), "SLURM_JOB_UID": "65534", "SLURM_JOB_GID": "65534",
                            "SLURM_JOB_RESTART_COUNT": "0", **env})
    assert r.returncode == 0, r.stderr
    assert live(daemon, job), "the Prolog did not create the job's namespace"
    r2 = run_hook(daemon, "epilog", job, env=env)
    assert r2.returncode == 0, r2.stderr
    daemon.wait_removals()
    assert gone(daemon, job)
    assert not mark.exists(), f"planted code ran: {mark.read_text()}"
    assert ">>>" not in r.stdout + r2.stdout, "interactive mode entered"
    figures(f"hostile environment in Prolog/Epilog: {case}", runs=2, planted_code_ran=False, failures=0)

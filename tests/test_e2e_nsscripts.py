"""End to end on the local Slurm cluster: namespace scripts (ns_script=,
ns_epilog=) run around real jobs, and each job's usage is logged at its
teardown."""

import os
import re
import shutil

import pytest

from harness import Stack, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.root, pytest.mark.usefixtures("node_healthy")]

U1 = "privtmp1"
SCRIPTS = "/var/lib/privtmpd-test/scripts/e2e"


@pytest.fixture(scope="module")
def stack():
    shutil.rmtree(SCRIPTS, ignore_errors=True)
    os.makedirs(SCRIPTS, mode=0o755)
    os.chmod(os.path.dirname(SCRIPTS), 0o755)
    init, epilog = f"{SCRIPTS}/ns-init.sh", f"{SCRIPTS}/ns-epilog.sh"
    with open(init, "w") as f:
        f.write('#!/bin/sh\necho "ready for $SLURM_JOB_ID $SLURM_JOB_USER" > /tmp/ns-ready\n'
                'chown "$SLURM_JOB_UID:$SLURM_JOB_GID" /tmp/ns-ready\necho "init saw job $SLURM_JOB_ID"\n')
    with open(epilog, "w") as f:
        f.write('#!/bin/sh\necho "epilog sees: $(ls /tmp | tr "\\n" " ")"\n')
    os.chmod(init, 0o755)
    os.chmod(epilog, 0o755)
    s = Stack("nsscr", daemon_extra=f"ns_script={init} ns_epilog={epilog} ns_script_timeout=20")
    s.start()
    yield s
    s.stop()
    shutil.rmtree(SCRIPTS, ignore_errors=True)


def test_scripts_run_around_a_slurm_job_and_usage_is_logged(stack):
    c = stack.cluster
    r = c.srun(U1, ["sh", "-c", "cat /tmp/ns-ready; head -c 3000000 /dev/zero > /tmp/data; echo $SLURM_JOB_ID"])
    assert r.returncode == 0, r.stderr + c.logs()
    job = r.stdout.split()[-1]
    assert r.stdout.splitlines()[0] == f"ready for {job} {U1}"
    c.wait_idle(timeout=60)
    stack.daemon.wait_removals()

    def log():
        with open(stack.daemon.log_path, errors="replace") as f:
            return f.read()
    wait_for(lambda: re.search(rf"job={job} .*op=usage ", log()), 30, "the job's usage line")
    text = log()
    assert re.search(rf'job={job} user={U1} op=ns_script result=output .*line="init saw job {job}"', text)
    assert re.search(rf"job={job} .*op=ns_script result=ok ", text)
    assert re.search(rf'job={job} .*op=ns_epilog result=output .*line="epilog sees: data ns-ready "', text)
    usage = re.search(rf"job={job} user={U1} op=usage result=ok .*bytes=(\d+) files=2 ", text)
    assert usage and 3000000 <= int(usage.group(1)) < 3200000, text[-3000:]
    assert not os.path.exists(stack.job_dir(job))

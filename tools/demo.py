"""Demo: privtmpd on a real local Slurm cluster.  Run through tools/demo.sh."""

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from harness import Stack, clean_leftovers  # noqa: E402

USER = "privtmp1"
JOB = """#!/bin/bash
echo "== inside job $SLURM_JOB_ID on $(hostname), as $(id -un)"
echo "TMPDIR=$TMPDIR"
echo "hello from job $SLURM_JOB_ID" > /tmp/hello.txt
dd if=/dev/zero of=/var/tmp/scratch.bin bs=1M count=8 status=none
echo "-- what the job sees in /tmp and /var/tmp:"
ls -la /tmp /var/tmp
echo "-- the mounts behind them:"
findmnt -no TARGET,SOURCE /tmp
findmnt -no TARGET,SOURCE /var/tmp
echo "-- every task of a step shares it:"
srun -n2 bash -c 'echo "task $SLURM_PROCID reads: $(cat /tmp/hello.txt)"'
touch ready
while [ ! -e go ]; do sleep 0.1; done
"""


def say(text):
    print(f"\n\033[1m>>> {text}\033[0m", flush=True)


def main():
    if os.geteuid() != 0:
        sys.exit("demo: run as root")
    clean_leftovers()
    stack = Stack("demo")
    say("starting privtmpd and a one-node Slurm cluster (munged, slurmctld, slurmd) on localhost")
    stack.start()
    c = stack.cluster
    try:
        print(f"privtmpd config:\n  {stack.daemon.text.strip().replace(chr(10), chr(10) + '  ')}")
        print(f"slurm.conf: Prolog={c.prolog}\n            Epilog={c.epilog}")
        print(f"plugstack.conf: {c.plugstack_lines[0]}")
        for f in ("ready", "go"):
            try:
                os.unlink(os.path.join(c.user_dir(USER), f))
            except FileNotFoundError:
                pass
        say(f"submitting a batch job as {USER}")
        jobid, _ = c.sbatch(USER, JOB, args=["-n2"], wait=False)
        ready = os.path.join(c.user_dir(USER), "ready")
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if time.monotonic() > deadline:
                raise SystemExit("demo: the job did not start; logs:\n" + c.logs())
            time.sleep(0.1)
        print(open(c.output_path(USER, jobid)).read())
        jdir = stack.job_dir(jobid)
        say(f"while job {jobid} runs, the host sees its files under {jdir}")
        for dirpath, dirs, files in sorted(os.walk(jdir)):
            for f in files:
                p = os.path.join(dirpath, f)
                print(f"  {p}  ({os.path.getsize(p)} bytes)")
        print(f"  and the host's /tmp has no hello.txt: {not os.path.exists('/tmp/hello.txt')}")
        say("privtmpctl list (the admin's view)")
        os.system(f"{sys.executable} -m privtmpd.ctl --config {stack.daemon.conf_path} list")
        open(os.path.join(c.user_dir(USER), "go"), "w").close()
        info = c.wait_job(jobid)
        say(f"job {jobid} ended ({info['state']}); the Epilog tore its namespace down")
        stack.daemon.wait_removals()
        print(f"  {jdir} exists: {os.path.exists(jdir)}")
        print(f"  pin {stack.daemon.pin(jobid)} exists: {os.path.exists(stack.daemon.pin(jobid))}")
        print(f"  node state: {c.node_state()}")
        print("  daemon log:")
        for line in stack.daemon.log().splitlines():
            if f"job={jobid}" in line or "op=remove" in line:
                print("    " + line)
    finally:
        say("stopping the cluster and privtmpd")
        stack.stop()


if __name__ == "__main__":
    main()

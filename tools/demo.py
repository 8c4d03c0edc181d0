"""Demo: privtmpd on a real Slurm cluster of a controller and two nodes,
each in namespaces of its own (tests/nodelab.py).  Run through tools/demo.sh.

The nodes run privtmpd as an admin installs it: the production defaults
(base=/tmp/slurm, rundir=/run/privtmpd), the hooks as Prolog= and Epilog=,
the entry helper in plugstack.conf."""

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from nodelab import LabStack  # noqa: E402

USER = "privtmp1"
NODES = 2
JOB = """#!/bin/bash
echo "== batch script of job $SLURM_JOB_ID on $(hostname), as $(id -un); TMPDIR=$TMPDIR"
echo "hello from job $SLURM_JOB_ID" > /tmp/hello.txt
echo "-- one task per node: each node has its own private /tmp"
srun -N2 -n2 -l bash -c 'echo "$(hostname) $(date +%N)" > /tmp/from-$(hostname); \
  dd if=/dev/zero of=/var/tmp/scratch.bin bs=1M count=4 status=none; \
  echo "on $(hostname): /tmp holds: $(ls /tmp | tr "\\n" " ")  (mounted from $(findmnt -no SOURCE /tmp | tail -n1))"'
echo "-- a plain sbcast to /tmp: slurmd writes it from outside the job, into each node's shared /tmp"
sbcast -f "$HOME_DIR/input.dat" /tmp/sbcast-$SLURM_JOB_ID.dat && echo "sbcast /tmp/sbcast-$SLURM_JOB_ID.dat: ok"
touch ready
while [ ! -e go ]; do sleep 0.1; done
"""


def say(text):
    print(f"\n\033[1m>>> {text}\033[0m", flush=True)


def main():
    if os.geteuid() != 0:
        sys.exit("demo: run as root")
    stack = LabStack(nodes=NODES)
    c = stack.cluster
    say(f"starting a Slurm cluster in namespaces of its own: controller {c.ctl.name} ({c.ctl.ip}), nodes "
        + ", ".join(f"{m.name} ({m.ip})" for m in c.nodes.values())
        + "; each with its own hostname, network, /tmp, /run, munged; privtmpd on every node")
    stack.start()
    try:
        print(f"privtmpd.conf (every node):\n  {stack.daemon_conf.strip().replace(chr(10), chr(10) + '  ')}")
        print(f"slurm.conf:     Prolog={c.prolog}\n                Epilog={c.epilog}")
        print(f"plugstack.conf: {c.plugstack_lines[0]}")
        for f in ("ready", "go"):
            try:
                os.unlink(os.path.join(c.user_dir(USER), f))
            except FileNotFoundError:
                pass
        src = os.path.join(c.user_dir(USER), "input.dat")
        with open(src, "w") as f:
            f.write("input for every node\n")
        os.chown(src, *_ids(USER))
        say(f"submitting a two-node batch job as {USER}")
        jobid, _ = c.sbatch(USER, JOB.replace("$HOME_DIR", c.user_dir(USER)), args=["-N2", "-n2"], wait=False)
        ready = os.path.join(c.user_dir(USER), "ready")
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if time.monotonic() > deadline:
                raise SystemExit("demo: the job did not start; logs:\n" + c.logs())
            time.sleep(0.1)
        print(open(c.output_path(USER, jobid)).read())
        for node in c.nodes:
            jdir = stack.job_dir(node, jobid)
            say(f"while job {jobid} runs, node {node} keeps its files in /tmp/slurm.{jobid}.0")
            for dirpath, _dirs, files in sorted(os.walk(jdir)):
                for f in sorted(files):
                    p = os.path.join(dirpath, f)
                    print(f"  {p[len(jdir) - len(f'/tmp/slurm.{jobid}.0'):]}  ({os.path.getsize(p)} bytes)")
            shared = sorted(os.listdir(stack.node_path(node, "/tmp")))
            print(f"  {node}'s own /tmp, outside the job, holds only: {' '.join(shared)}")
        print(f"  this machine's /tmp has no hello.txt: {not os.path.exists('/tmp/hello.txt')}")
        say("privtmpctl list on n1 (the admin's view)")
        subprocess.run(c.node("n1").enter([sys.executable, "-m", "privtmpd.ctl", "--config", stack.conf_path,
                                           "list"], cwd=REPO))
        open(os.path.join(c.user_dir(USER), "go"), "w").close()
        info = c.wait_job(jobid)
        say(f"job {jobid} ended ({info['state']}); each node's Epilog tore its namespace down")
        deadline = time.monotonic() + 30
        while any(os.path.exists(stack.job_dir(n, jobid)) or os.path.exists(stack.node_path(n, f"/tmp/sbcast-{jobid}.dat"))
                  for n in c.nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        for node in c.nodes:
            print(f"  {node}: /tmp/slurm.{jobid}.0 exists: {os.path.exists(stack.job_dir(node, jobid))}; "
                  f"pin /run/privtmpd/ns/{jobid} exists: "
                  f"{os.path.exists(stack.node_path(node, f'/run/privtmpd/ns/{jobid}'))}; "
                  f"state: {c.node_state(node)}; "
                  f"sbcast's file in its shared /tmp: "
                  f"{os.path.exists(stack.node_path(node, f'/tmp/sbcast-{jobid}.dat'))}")
        print("  privtmpd's log on n1:")
        for line in stack.daemon_log("n1").splitlines():
            if f"job={jobid}" in line or "op=remove" in line:
                print("    " + line)
    finally:
        say("stopping the cluster: each machine's processes, mounts and /tmp go with its namespaces")
        stack.stop()


def _ids(user):
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


if __name__ == "__main__":
    main()

"""limit_from=tmp: the size of a job's private directories from its --tmp.

The value comes from slurmctld, in a form the job's user cannot write into.
`scontrol -o show job` is not such a form: it prints the job name, the
comment and the work dir unescaped, ahead of the real MinTmpDiskNode= field,
so `sbatch -J "x MinTmpDiskNode=3G"` would choose its own size.  What is
asked here is one field alone, `squeue --noheader --noconvert -o %d`, which
prints the request in MB ("40M", "3072M": --noconvert keeps "1536M" from
becoming "1.50G") and nothing else.

Whatever comes back is parsed strictly, bounded in length before int(), and
capped (limit_max=, else the size of the filesystem that holds the base):
no value, however absurd, can fail the Prolog, which would drain the node.
Every refusal falls back to limit= and says why.
"""

import os
import re
import subprocess

MIN_LIMIT = 16 << 20        # the smallest image mkfs.ext4 and the job can use
_MB = re.compile(r"([0-9]{1,12})M?\Z", re.ASCII)     # up to 10^12 MB: far past any disk, and an int
SQUEUE_PATHS = ("/usr/bin/squeue", "/usr/local/bin/squeue", "/opt/slurm/bin/squeue")


class Refused(Exception):
    """No usable --tmp value; the message says why, for the fallback's log line."""


def squeue_path():
    return next((p for p in SQUEUE_PATHS if os.access(p, os.X_OK)), None)


def parse_mb(text):
    """Bytes of squeue's %d ("40M", "100"), 0 for no request.  Raises Refused."""
    value = text.strip()
    m = _MB.match(value)
    if not m:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise Refused(f"squeue printed {shown!r}, not a size in MB")
    return int(m.group(1)) << 20


def cap_for(cfg):
    """The largest image a job can ask for: limit_max=, else the size of the
    filesystem the images live on (an image bigger than its disk only
    promises what is not there)."""
    if cfg.limit_max:
        return cfg.limit_max
    v = os.statvfs(cfg.base_parent)
    return v.f_blocks * v.f_frsize


def query(job, slurm_conf=None, timeout=10.0):
    """The job's --tmp in bytes as slurmctld has it (0: none).  Raises Refused."""
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    argv = [squeue_path() or "squeue", "--noheader", "--noconvert", "--format=%d", f"--jobs={job}"]
    try:
        r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Refused(f"squeue: {e}") from None
    if r.returncode:
        raise Refused(f"squeue exited {r.returncode}: {r.stderr.strip()[:200]}")
    lines = r.stdout.splitlines()
    if len(lines) != 1:
        raise Refused(f"squeue printed {len(lines)} lines for job {job}, expected 1")
    return parse_mb(lines[0])


def job_limit(cfg, job, slurm_conf=None, ask=query):
    """(bytes, result, note): the image size for job under limit_from=tmp.
    result is None when the job's request (or, without one, limit=) was
    used as it is; else "fallback" (to limit=) or "capped", and note says
    why, for the log line."""
    try:
        want = ask(job, slurm_conf)
    except Refused as e:
        return cfg.limit, "fallback", str(e)
    if not want:
        return cfg.limit, None, None        # no --tmp: limit= is the size
    try:
        cap = max(cap_for(cfg), MIN_LIMIT)
    except OSError as e:
        return cfg.limit, "fallback", f"cannot size {cfg.base_parent}: {e.strerror}"
    if want > cap:
        which = "limit_max=" if cfg.limit_max else f"the size of {cfg.base_parent}"
        return cap, "capped", f"--tmp of {want >> 20} MB is over {which} ({cap >> 20} MB)"
    return max(want, MIN_LIMIT), None, None

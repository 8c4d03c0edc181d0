"""Prometheus text-format metrics for node-exporter's textfile collector.

The daemon counts in memory and rewrites <metrics_dir>/privtmpd.prom
atomically: the text goes to a new, randomly named hidden file in the same
directory (created with O_EXCL|O_NOFOLLOW, as the directory may be writable
by the exporter's user), which is then renamed over privtmpd.prom, so the
collector never reads half a file.  The collector only reads *.prom files.

The file is rewritten at most every WRITE_INTERVAL seconds and only when
something changed.  Counters restart from zero with the daemon, as
Prometheus expects (privtmpd_start_time_seconds tells when).  Every family
is present from the start, with its usual labels at zero, so alerts and
rate() work before the first job.
"""

import math
import os
import secrets
import time
from typing import Dict, List, Optional, Tuple

from . import __version__

WRITE_INTERVAL = 1.0
FILENAME = "privtmpd.prom"

# Seconds.  Creating a namespace takes milliseconds; a destroy that has to
# kill leftover processes waits up to kill_timeout; a removal of a big tree
# takes minutes.
FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SLOW_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0)

# A job's private directories at teardown (op=usage): bytes from 1 MiB to
# 1 TiB, by factors of 4 (local scratch disks); files by factors of 10.
JOB_BYTES_BUCKETS = tuple(float(1 << n) for n in range(20, 41, 2))
JOB_FILES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)

RESULTS = ("ok", "refused", "error")

# name -> (type, help, {label: initial values}, buckets)
FAMILIES: Dict[str, Tuple[str, str, Dict[str, Tuple[str, ...]], Optional[Tuple[float, ...]]]] = {
    "privtmpd_build_info": ("gauge", "privtmpd version running on this node (always 1).", {}, None),
    "privtmpd_start_time_seconds": ("gauge", "Unix time the daemon started.", {}, None),
    "privtmpd_jobs_active": ("gauge", "Job namespaces currently pinned on this node.", {}, None),
    "privtmpd_daemon_resident_bytes": ("gauge", "Resident memory of the daemon process.", {}, None),
    "privtmpd_daemon_open_fds": ("gauge", "Open file descriptors of the daemon process.", {}, None),
    "privtmpd_removals_pending": ("gauge", "Job directories queued or being removed in the background.",
                                  {}, None),
    "privtmpd_creates_total": ("counter", "Prolog requests to create a job namespace, by result.",
                               {"result": RESULTS}, None),
    "privtmpd_destroys_total": ("counter", "Epilog requests to tear a job down, by result.",
                                {"result": RESULTS}, None),
    "privtmpd_create_seconds": ("histogram", "Time to create and pin a job namespace (the Prolog's wait).",
                                {}, FAST_BUCKETS),
    "privtmpd_destroy_seconds": ("histogram", "Time to tear a job down (the Epilog's wait).",
                                 {}, FAST_BUCKETS),
    "privtmpd_removals_total": ("counter", "Background removals of job directories, by result.",
                                {"result": ("ok", "incomplete", "error")}, None),
    "privtmpd_remove_seconds": ("histogram", "Time to remove one job directory in the background.",
                                {}, SLOW_BUCKETS),
    "privtmpd_removed_files_total": ("counter", "Files and other non-directories removed.", {}, None),
    "privtmpd_removed_dirs_total": ("counter", "Directories removed.", {}, None),
    "privtmpd_removed_bytes_total": ("counter", "Bytes freed by removals that measured them (count_bytes=).",
                                     {}, None),
    "privtmpd_job_bytes": ("histogram", "Bytes in a job's private directories at teardown, where measured "
                           "(limit= jobs, small trees, count_bytes=yes).", {}, JOB_BYTES_BUCKETS),
    "privtmpd_job_files": ("histogram", "Files and directories in a job's private directories at teardown.",
                           {}, JOB_FILES_BUCKETS),
    "privtmpd_leftovers_removed_total": ("counter", "Files a job's user left in the node's shared mount points "
                                         "(sbcast to /tmp), removed at the job's end.", {}, None),
    "privtmpd_orphans_swept_total": ("counter", "Job directories found without a live job and removed.",
                                     {}, None),
}


def _num(v):
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _label_text(pairs):
    if not pairs:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, esc)) + "}"


class Metrics:
    def __init__(self, cfg, log=None):
        self.path = os.path.join(cfg.metrics_dir, FILENAME) if cfg.metrics_dir else None
        self.log = log
        # (name, labels) -> number, for counters and gauges
        self.values: Dict[Tuple[str, Tuple[Tuple[str, object], ...]], float] = {}
        self.hist: Dict[str, List[float]] = {}      # name -> [bucket counts..., sum, count]
        self.dirty = True
        self.last = 0.0
        self.failing = False
        for name, (kind, _help, labels, buckets) in FAMILIES.items():
            if kind == "histogram":
                self.hist[name] = [0] * len(buckets or ()) + [0.0, 0]
            elif name in ("privtmpd_build_info", "privtmpd_start_time_seconds"):
                continue
            elif labels:
                (label, initial), = labels.items()
                for v in initial:
                    self.values[(name, ((label, v),))] = 0
            else:
                self.values[(name, ())] = 0
        self.values[("privtmpd_build_info", (("version", __version__),))] = 1
        self.values[("privtmpd_start_time_seconds", ())] = round(time.time(), 3)

    def inc(self, name, amount=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0) + amount
        self.dirty = True

    def set(self, name, value, **labels):
        key = (name, tuple(sorted(labels.items())))
        if self.values.get(key) != value:
            self.values[key] = value
            self.dirty = True

    def set_active(self, n):
        self.set("privtmpd_jobs_active", n)

    def observe(self, name, value):
        """One observation (seconds, bytes or files) of a histogram."""
        h = self.hist[name]
        for i, bound in enumerate(FAMILIES[name][3] or ()):
            if value <= bound:
                h[i] += 1
        h[-2] += value
        h[-1] += 1
        self.dirty = True

    def render(self):
        lines = []
        for name, (kind, text, _labels, buckets) in FAMILIES.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                h = self.hist[name]
                for bound, n in zip(buckets or (), h):
                    lines.append(f'{name}_bucket{{le="{_num(bound)}"}} {n}')
                lines.append(f'{name}_bucket{{le="+Inf"}} {h[-1]}')
                lines.append(f"{name}_sum {_num(h[-2])}")
                lines.append(f"{name}_count {h[-1]}")
                continue
            for (family, labels), v in sorted(self.values.items()):
                if family == name:
                    lines.append(f"{name}{_label_text(labels)} {_num(v)}")
        return "\n".join(lines) + "\n"

    def write(self):
        if not self.path:
            return
        d = os.path.dirname(self.path)
        tmp = os.path.join(d, f".{FILENAME}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.fchmod(fd, 0o644)        # readable by node-exporter, whatever the umask
                data = self.render().encode()
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            # A metrics problem must never stop job service: say it once.
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if not self.failing and self.log:
                from .logfmt import describe, event
                self.log.warning(event("metrics", "error", error=describe(
                    e, hint=f"create {d}, or fix metrics_dir= in the configuration")))
            self.failing = True
            self.last = time.monotonic()
            return
        if self.failing and self.log:
            from .logfmt import event
            self.log.info(event("metrics", "ok", file=self.path))
        self.failing = False
        self.dirty = False
        self.last = time.monotonic()

    def maybe_write(self, sample=None):
        """Write if something changed and WRITE_INTERVAL has passed; sample()
        first sets the gauges that are read, not counted (they cost a
        directory listing or two, so only when a write is due)."""
        if self.path and self.dirty and time.monotonic() - self.last >= WRITE_INTERVAL:
            if sample:
                sample()
            self.write()

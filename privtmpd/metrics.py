"""Prometheus text-format metrics for node-exporter's textfile collector.

The daemon counts in memory and rewrites <metrics_dir>/privtmpd.prom
atomically (write a temporary file in the same directory, then rename), at
most every WRITE_INTERVAL seconds and only when something changed.
Counters restart from zero with the daemon, as Prometheus expects.
"""

import os
import time

WRITE_INTERVAL = 10.0
FILENAME = "privtmpd.prom"

_HELP = {
    "privtmpd_jobs_active": ("gauge", "Job namespaces currently pinned on this node."),
    "privtmpd_creates_total": ("counter", "Prolog requests to create a job namespace, by result."),
    "privtmpd_destroys_total": ("counter", "Epilog requests to tear a job down, by result."),
    "privtmpd_create_seconds": ("summary", "Time to create and pin a job namespace."),
    "privtmpd_destroy_seconds": ("summary", "Time to tear a job down (the Epilog's wait)."),
    "privtmpd_removals_total": ("counter", "Background removals of job directories, by result."),
    "privtmpd_remove_seconds": ("summary", "Time to remove one job's directories in the background."),
    "privtmpd_removed_files_total": ("counter", "Files and other non-directories removed."),
    "privtmpd_removed_bytes_total": ("counter", "Bytes of disk space freed by removals."),
    "privtmpd_orphans_swept_total": ("counter", "Job directories found without a live job and removed."),
}


def _family(name):
    for suffix in ("_sum", "_count"):
        if name.endswith(suffix) and name[:-len(suffix)] in _HELP:
            return name[:-len(suffix)]
    return name


class Metrics:
    def __init__(self, cfg):
        self.path = os.path.join(cfg.metrics_dir, FILENAME) if cfg.metrics_dir else None
        self.values = {}            # (name, labels) -> number
        self.dirty = True
        self.last = 0.0

    def inc(self, name, amount=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0) + amount
        self.dirty = True

    def set_active(self, n):
        self.values[("privtmpd_jobs_active", ())] = n
        self.dirty = True

    def observe(self, name, seconds):
        self.inc(name + "_sum", seconds)
        self.inc(name + "_count")

    def render(self):
        lines, seen = [], set()
        for (name, labels), value in sorted(self.values.items()):
            base = _family(name)
            if base not in seen and base in _HELP:
                kind, text = _HELP[base]
                lines += [f"# HELP {base} {text}", f"# TYPE {base} {kind}"]
                seen.add(base)
            lab = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{lab}}} {value:g}" if lab else f"{name} {value:g}")
        return "\n".join(lines) + "\n"

    def write(self):
        if not self.path:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(self.render())
            os.replace(tmp, self.path)
        except OSError:
            return      # a metrics directory problem must never stop job service
        self.dirty = False
        self.last = time.monotonic()

    def maybe_write(self):
        if self.dirty and time.monotonic() - self.last >= WRITE_INTERVAL:
            self.write()

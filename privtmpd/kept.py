"""keep_failed=: a failed job's directories kept for a while, and keep_max.

The kept directories' names are the state (names.kept_name: job, run,
expiry, exit code); this only caches their sizes.  Sizes are measured in
steps of at most KEPT_STEP_SECONDS between requests (a kept tree may hold
millions of entries, and users may still write into their kept
directories), and keep_max is enforced once every size is known.
"""

import logging
import time
from typing import Dict, List, Optional, Tuple

from . import jobdirs, limitfs, safefs
from .logfmt import event

log = logging.getLogger("privtmpd")

KEPT_MEASURE_MAX = 200_000   # entries a kept directory may have
KEPT_STEP_SECONDS = 0.005    # measuring, per turn of the loop at most
CHECK_EVERY = 5.0            # seconds between two looks for expired kept directories
REMEASURE_AFTER = 60.0       # seconds a measured size is trusted


def eviction(kept: List[dict], sizes: Dict[str, int], keep_max: int) -> List[Tuple[dict, str]]:
    """Which kept directories go, and why, so that the rest fit keep_max.
    The oldest kept directory of the user whose kept directories use the
    most goes first: a user who fills the space loses their own first;
    another user's go only when that user uses as much or more.  kept is
    earliest expiry first (jobdirs.kept_dirs).  Pure: no I/O."""
    total = sum(sizes.get(k["name"], 0) for k in kept)
    by_user: Dict[object, List[dict]] = {}
    for k in kept:
        by_user.setdefault(k["uid"], []).append(k)
    out = []
    while total > keep_max and by_user:
        user = max(by_user, key=lambda u: sum(sizes.get(k["name"], 0) for k in by_user[u]))
        k = by_user[user].pop(0)
        if not by_user[user]:
            del by_user[user]
        out.append((k, f"kept directories use {total} bytes, over keep_max={keep_max}; uid {user} uses the most"))
        total -= sizes.get(k["name"], 0)
    return out


class KeptDirs:
    def __init__(self, cfg, removals, request_waiting):
        self.cfg = cfg
        self.removals = removals
        self.request_waiting = request_waiting
        self.sizes: Dict[str, Tuple[int, float]] = {}   # name -> (bytes, measured at, monotonic)
        self.queue: List[dict] = []                     # waiting to be measured
        self.walk: Optional[Tuple[dict, safefs.UsageWalk]] = None
        self.next_check = 0.0

    def due(self) -> bool:
        return bool(self.cfg.keep_failed or self.sizes) and time.monotonic() >= self.next_check

    def measuring(self) -> bool:
        return bool(self.walk or self.queue)

    def check_soon(self) -> None:
        """A directory was just kept: look at keep_max after this reply."""
        self.next_check = 0.0

    def size_of(self, name):
        return self.sizes.get(name, (None,))[0]

    def check(self, now=None) -> None:
        """Remove kept directories whose time is up, and queue for
        measuring those whose size is unknown or too old."""
        now = time.time() if now is None else now
        self.next_check = time.monotonic() + CHECK_EVERY
        kept = jobdirs.kept_dirs(self.cfg)
        if not kept:
            self.sizes.clear()
            return
        walking = self.walk[0]["name"] if self.walk else None
        queued = {k["name"] for k in self.queue}
        with jobdirs.parent_fd(self.cfg) as pfd:
            for k in kept:
                if k["until"] <= now:
                    if k["name"] == walking:
                        self._stop_walk()
                    self._drop(pfd, k, "expired")
                    continue
                size, when = self.sizes.get(k["name"], (None, 0.0))
                stale = size is None or time.monotonic() - when > REMEASURE_AFTER
                if stale and k["name"] not in queued | {walking}:
                    self.queue.append(k)
        live = {k["name"] for k in jobdirs.kept_dirs(self.cfg)}
        self.queue = [k for k in self.queue if k["name"] in live]
        for name in list(self.sizes):
            if name not in live:
                del self.sizes[name]
        if not self.queue and not self.walk:
            self.enforce_keep_max()

    def _stop_walk(self) -> None:
        if self.walk:
            self.walk[1].close()
            self.walk = None

    def measure_step(self) -> None:
        """One turn's share of measuring: at most KEPT_STEP_SECONDS, and not
        while a request waits.  A kept tree of any size never delays a
        Prolog by more than one step."""
        deadline = time.monotonic() + KEPT_STEP_SECONDS
        while time.monotonic() < deadline and not self.request_waiting():
            if not self.walk:
                if not self.queue:
                    self.enforce_keep_max()
                    return
                k = self.queue.pop(0)
                try:
                    with jobdirs.parent_fd(self.cfg) as pfd:
                        if not safefs.is_ours(pfd, k["name"]):
                            continue
                        self.walk = (k, safefs.UsageWalk(pfd, k["name"], KEPT_MEASURE_MAX,
                                                         mounts_at_top=(limitfs.LIMITED_FS,)))
                except OSError:
                    continue            # gone meanwhile
            k, walk = self.walk
            try:
                done = walk.step(deadline, self.request_waiting)
            except OSError:
                # Unknown, not small: measured again at the next check.
                self._stop_walk()
                continue
            if not done:
                return
            self.walk = None
            if not walk.complete:
                # A kept tree that cannot be measured whole cannot be kept.
                with jobdirs.parent_fd(self.cfg) as pfd:
                    self._drop(pfd, k, f"cannot be measured: {walk.why}")
                continue
            self.sizes[k["name"]] = (walk.bytes, time.monotonic())

    def enforce_keep_max(self) -> None:
        kept = jobdirs.kept_dirs(self.cfg)
        sizes = {k["name"]: self.sizes.get(k["name"], (0,))[0] for k in kept}
        gone = eviction(kept, sizes, self.cfg.keep_max)
        if not gone:
            return
        with jobdirs.parent_fd(self.cfg) as pfd:
            for k, why in gone:
                self._drop(pfd, k, why)
                self.sizes.pop(k["name"], None)

    def _drop(self, pfd, k, why) -> None:
        tname = jobdirs.trash_if_ours(pfd, self.cfg, k["name"], k["job"], k["restart"], kept=True)
        if tname:
            log.info(event("kept", "removed", k["job"], k["uid"], dir=k["path"], reason=why))
            # The kept directory's owner, not the last request's user.
            # usage: the kept directory is the job's as it ended; its
            # removal reports the job's usage (op=usage).
            self.removals.queue(self.cfg.base_parent, tname, k["uid"], usage=True)
            self.removals.set_user(self.cfg.base_parent, tname, k["uid"])

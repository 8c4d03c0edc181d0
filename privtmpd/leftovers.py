"""Files a job's user left in the node's shared mount points during the job.

A job's processes see only its private /tmp, but whatever writes as the
job's user from the host's namespace lands in the node's shared one: above
all sbcast (`sbcast f /tmp/f`, slurmd writes as the user in its own
namespace), also an ssh session not adopted into the job.  Such files would
stay forever.  At teardown, once the user has no other job on this node,
privtmpd removes them (host_leftovers=remove, the default) or only logs
them (host_leftovers=report).

What counts as one, decided by is_leftover: a regular file at the top of a
shared mount point (where sbcast writes), owned by the user, created
(statx btime) between the start of the user's first job on the node still
unaccounted for and the teardown.  Removing files in a world-writable
directory on such a guess is safe only because it is done with the user's
rights and nothing more: a forked child with the user's uid and gid alone
scans and unlinks, so it cannot remove anything the user could not (the
sticky bit keeps every other user's names out of reach), and a name the
user swaps between the check and the unlink is still only theirs.  A
filesystem without creation times (btime) is never swept.

While another job of the same user runs on the node, its files in the
shared /tmp may be that job's (an sbcast for it): the sweep waits for the
user's last job, which carries the earliest start along in its state file
(leftovers_since).

The work grows with the shared directories, so it never runs in the
daemon's main thread: it is a removal queue entry (removal.py) whose worker
runs sweep(), bounded by SCAN_MAX entries per mount point and SECONDS.
"""

import codecs
import json
import os
import stat
from typing import Dict, Iterable, List, Optional

from . import forked, kernel
from .logfmt import describe

SCAN_MAX = 100_000          # entries looked at per mount point
SECONDS = 30.0              # the user's child is killed after this long
NAMES_SHOWN = 10            # names in the log line

# File times come from the kernel's coarse clock, up to a tick (1-10 ms)
# behind time.time(): a file created right after the job started may carry
# a btime just before it.
CLOCK_SLACK = 0.1

REMOVE, REPORT = "remove", "report"


def shared_points(cfg) -> List[str]:
    """The host's own mount points a job has a private copy of: where a
    write from the host's namespace lands instead of the job's."""
    points = list(cfg.mounts)
    if cfg.shm and "/dev/shm" not in points:
        points.append("/dev/shm")
    return sorted(points)


def changed_since(point: str, since: float) -> bool:
    """Whether a name was created in (or removed from) point since then:
    its mtime.  One statx, so the daemon asks it at every teardown and
    forks a sweep only for the mount points where something happened (on a
    node where every job has a private /tmp, the shared one rarely
    changes).  A point that cannot be looked at is swept: the sweep says
    why it failed."""
    try:
        return kernel.statx_nofollow(kernel.AT_FDCWD, point).st_mtime >= since
    except OSError:
        return True


def is_leftover(st: kernel.Stat, uid: int, since: float, until: float) -> bool:
    """A name at the top of a shared mount point the sweep takes: a regular
    file of uid's (not a mount point) created within [since, until]."""
    return (stat.S_ISREG(st.st_mode) and st.st_uid == uid and not st.mount_root
            and st.btime is not None and since <= st.btime <= until)


def window_start(state: dict) -> Optional[float]:
    """At a job's teardown: from when on its user's files count (the start
    of the earliest of the user's jobs on the node it accounts for), or
    None for no sweep at all (root's job, no usable state)."""
    uid, created = state.get("uid"), state.get("created")
    if type(uid) is not int or uid == 0 or not isinstance(created, (int, float)):
        return None
    return min(created, since_of(state)) - CLOCK_SLACK


def same_user_jobs(job: int, state: dict, others: Dict[int, Optional[dict]]) -> List[int]:
    """The other jobs of job's user on the node: while there is one, the
    sweep waits, and they carry the window's start along (carry_since)."""
    return [j for j, st in others.items() if j != job and st and st.get("uid") == state["uid"]]


def since_of(state: dict) -> float:
    """The earliest start of the user's jobs whose files this job's
    teardown accounts for (inf: none but its own)."""
    s = state.get("leftovers_since")
    return s if isinstance(s, (int, float)) else float("inf")


def carry_since(state: dict, since: float) -> bool:
    """Record in a later job's state that the user's files are unaccounted
    for since `since`; True when that changed the state."""
    if since < since_of(state):
        state["leftovers_since"] = since
        return True
    return False


def sweep(points: Iterable[str], uid: int, gid: int, since: float, until: float, remove: bool) -> dict:
    """Find (and with remove, unlink) the user's leftovers, in a forked
    child that has uid's and gid's rights only.  Runs in a removal worker;
    returns {"found", "removed", "names", "errors", "truncated"}."""
    points = list(points)

    def body(w: int) -> None:
        try:
            # Imported while still root: the user may not be able to read
            # the Python installation (one under /root, a private venv).
            codecs.lookup("unicode_escape")
            forked.become_user(uid, gid, keep=(w,))
            report = _sweep_here(points, uid, since, until, remove)
        except Exception as e:  # noqa: BLE001 - the report says what went wrong
            report = {"found": 0, "removed": 0, "names": [], "errors": [describe(e)], "truncated": False}
        os.write(w, json.dumps(report).encode()[:60000])

    data = forked.run(body, SECONDS)
    if data is None:
        return {"found": 0, "removed": 0, "names": [], "errors": [f"killed after {SECONDS:.0f} s"],
                "truncated": False}
    try:
        return json.loads(data)
    except ValueError:
        return {"found": 0, "removed": 0, "names": [], "errors": ["the sweep ended without a report"],
                "truncated": False}


def _sweep_here(points: List[str], uid: int, since: float, until: float, remove: bool) -> dict:
    found = removed = 0
    shown: List[str] = []
    errors: List[str] = []
    truncated = False
    for point in points:
        try:
            fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            errors.append(f"{point}: {e.strerror}")
            continue
        try:
            with os.scandir(fd) as it:
                for i, entry in enumerate(it):
                    if i >= SCAN_MAX:
                        truncated = True
                        break
                    try:
                        st = kernel.statx_nofollow(fd, entry.name)
                    except OSError:
                        continue
                    if not is_leftover(st, uid, since, until):
                        continue
                    found += 1
                    # The name is the user's: escaped, so it cannot write
                    # control sequences into the log.
                    path = f"{point}/" + entry.name.encode("unicode_escape", "backslashreplace").decode("ascii")
                    if len(shown) < NAMES_SHOWN:
                        shown.append(path)
                    if remove:
                        try:
                            os.unlink(entry.name, dir_fd=fd)
                            removed += 1
                        except OSError as err:
                            errors.append(f"{path}: {err.strerror}")
        except OSError as e:
            errors.append(f"{point}: {e.strerror}")
        finally:
            os.close(fd)
    return {"found": found, "removed": removed, "names": shown, "errors": errors[:5], "truncated": truncated}

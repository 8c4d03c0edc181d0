"""Job id + restart count -> names and paths.  Pure: no I/O.

Every value that reaches a path goes through parse_job_id/parse_count first:
decimal ASCII digits only, no sign, no leading zero, bounded.  "007", "-1",
"../x", "1\\n", "١٢" (Arabic-Indic digits, which int() accepts) are refused.
"""

import re
from typing import Optional, Tuple

# Slurm job ids are uint32; 0xfffffffe/0xffffffff are NO_VAL/INFINITE.
JOB_ID_MAX = 0xFFFFFFFD
# job_record.restart_cnt is a uint16.
RESTART_MAX = 0xFFFF
# uid_t/gid_t; (uid_t)-1 means "no change" to chown, so it is refused.
ID_MAX = 0xFFFFFFFE

_DIGITS = re.compile(r"(0|[1-9][0-9]{0,9})\Z", re.ASCII)


class BadName(ValueError):
    """A job id, restart count or id that must never become part of a path."""


def _parse(text: object, what: str, lo: int, hi: int) -> int:
    if not isinstance(text, str):
        raise BadName(f"{what} must be a string of decimal digits, got {type(text).__name__}")
    if not _DIGITS.match(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise BadName(f"{what} {shown!r} is not a plain decimal number (digits 0-9, no sign, no leading zero)")
    value = int(text)
    if not lo <= value <= hi:
        raise BadName(f"{what} {text} is out of range ({lo}..{hi})")
    return value


def parse_job_id(text: object) -> int:
    return _parse(text, "job id", 1, JOB_ID_MAX)


def parse_restart_count(text: object) -> int:
    return _parse(text, "restart count", 0, RESTART_MAX)


def parse_id(text: object, what: str = "uid") -> int:
    return _parse(text, what, 0, ID_MAX)


def mount_dirname(mountpoint: str) -> str:
    """The per-mount subdirectory name, as the original plugin named it:
    "/var/tmp" -> "var_tmp", "/tmp" -> "tmp"."""
    return mountpoint.strip("/").replace("/", "_")


def job_dir_name(base_name: str, job: int, restart: int) -> str:
    """Last component of $base.$jobid.$restartcount (base_name is basename(base))."""
    return f"{base_name}.{job}.{restart}"


def trash_name(base_name: str, job: int, restart: int, nonce: str, kept: bool = False) -> str:
    """A job directory being removed: renamed (atomically, in the same parent)
    so the job path is free at once and the removal can resume after a crash.
    kept: it was a kept directory, reachable by its user from the host, so
    its user directories are removed with their owner's credentials only
    (the name says so, across a restart too)."""
    return f"{base_name}.{job}.{restart}.deleting{'-kept' if kept else ''}.{nonce}"


def kept_name(base_name: str, job: int, restart: int, until: int, exit_code: int, nonce: str) -> str:
    """A failed job's directories kept for debugging until the Unix time
    `until`: the name alone carries what the daemon needs after a restart
    or a reboot.  The nonce makes it unpredictable: a user who could guess
    it could pre-create it and have another user's job silently not kept."""
    return f"{base_name}.{job}.{restart}.kept.{until}.{exit_code}.{nonce}"


TEMPORARY_KINDS = ("new", "aside")


def temporary_name(name: str, kind: str, nonce: str) -> str:
    """Where safefs builds a job directory (kind "new") before renaming it
    into place, or moves an entry that blocks its name ("aside"): hidden,
    next to it, recognised by NameMatcher.temporary after a crash."""
    assert kind in TEMPORARY_KINDS
    return f".{name}.{kind}.{nonce}"


class NameMatcher:
    """Recognises our entries in the base's parent directory."""

    def __init__(self, base_name: str) -> None:
        self.base_name = base_name
        b = re.escape(base_name)
        num = r"(0|[1-9][0-9]*)"
        self._job = re.compile(rf"{b}\.{num}\.{num}\Z", re.ASCII)
        # Kept names of earlier versions had no nonce.
        self._kept = re.compile(rf"{b}\.{num}\.{num}\.kept\.{num}\.{num}(?:\.[0-9a-f]+)?\Z", re.ASCII)
        self._trash = re.compile(rf"{b}\.{num}\.{num}\.deleting(?P<kept>-kept)?\.[0-9a-z]+\Z", re.ASCII)
        # temporary_name(): leftovers of a crash during a job's start.
        kinds = "|".join(TEMPORARY_KINDS)
        self._temp = re.compile(rf"\.{b}\.{num}\.{num}\.({kinds})\.[0-9a-z]+\Z", re.ASCII)

    def job_dir(self, name: str) -> Optional[Tuple[int, int]]:
        """(job, restart) when name is a job directory name, else None."""
        m = self._job.match(name)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def kept(self, name: str) -> Optional[Tuple[int, int, int, int]]:
        """(job, restart, until, exit_code) for a kept directory's name, else None."""
        m = self._kept.match(name)
        if not m:
            return None
        job, restart, until, exit_code = map(int, m.groups())
        return job, restart, until, exit_code

    def trash(self, name: str) -> bool:
        return self._trash.match(name) is not None

    def kept_trash(self, name: str) -> bool:
        """A kept directory being removed (trash_name(kept=True))."""
        m = self._trash.match(name)
        return bool(m and m.group("kept"))

    def temporary(self, name: str) -> bool:
        return self._temp.match(name) is not None


def pin_path(rundir: str, job: int) -> str:
    """Where the job's mount namespace is pinned; the entry helper opens it."""
    return f"{rundir}/ns/{job}"


def state_path(rundir: str, job: int) -> str:
    return f"{rundir}/jobs/{job}.json"

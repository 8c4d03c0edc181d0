"""Parse and validate /etc/privtmpd/privtmpd.conf.

The syntax is the original private-tmpdir plugin's: whitespace-separated
``key=value`` words, one or several per line, ``#`` starts a comment.  A
plugstack.conf line pasted as is (``required private-tmpdir.so base=...
mount=...``) is accepted too: its first two words are skipped.

    base=/tmp/slurm
    mount=/var/tmp mount=/tmp

parse() checks the syntax and the values (pure); check_filesystem() checks
what only the running system can tell (symlinks, ownership) and is called
by the daemon at start-up and by ``privtmpctl doctor``.
"""

import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Dict

from . import names

DEFAULT_PATH = "/etc/privtmpd/privtmpd.conf"

_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    base: str = "/tmp/slurm"
    mounts: tuple = ("/tmp", "/var/tmp")
    rundir: str = "/run/privtmpd"
    socket: str = ""            # default: <rundir>/privtmpd.sock
    mode: int = 0o700           # of the job's private directories
    shm: str = ""               # "" = keep the host /dev/shm; else tmpfs size= (e.g. 512m, 10%), or "job:N%"
    tmpdir: str = ""            # what TMPDIR points to in tasks; "" = /tmp if mounted; "none"
    remove_workers: int = 2     # parallel background removals
    kill_timeout: float = 5.0   # seconds to wait for leftover job processes to die
    metrics_dir: str = ""       # node-exporter textfile collector directory; "" = off
    keep_failed: int = 0        # seconds a failed job's directories are kept; 0 = removed at once
    keep_max: int = 1 << 30     # bytes all kept directories may use together; oldest evicted beyond
    limit: int = 0              # bytes: each job's directories live in a filesystem image this big; 0 = off
    limit_from: str = ""        # "tmp": the job's --tmp request when it made one, else limit=
    limit_max: int = 0          # bytes: cap on a --tmp request (limit_from=tmp); 0 = the base filesystem's size
    limit_reserve: bool = False  # allocate each limit= image in full at job start (no overcommit)
    count_bytes: bool = False   # lstat every file a removal worker unlinks, to log the bytes freed
    # --- per mount point (mount_options=, tmpfs=; see the block before _KEYS)
    mount_options: tuple = ()   # ((mount point, ("noexec", ...)), ...): flags added to that bind
    tmpfs: tuple = ()           # ((mount point, size), ...): a private tmpfs instead of a directory under base
    sbcast: bool = False        # job directory's top 0711: its owner reaches $base.J.R/tmp from the host (sbcast)
    host_leftovers: str = "remove"  # the user's files in the shared mount points at teardown (leftovers.py)
    # --- namespace scripts (nsscripts.py) ------------------------------------
    ns_script: str = ""         # run as root inside each new job namespace before the Prolog's reply
    ns_epilog: str = ""         # run as root inside the job namespace at teardown, before its processes are killed
    ns_script_timeout: float = 30.0   # seconds each script may run; then its process group is killed
    on_script_error: str = "fail"     # ns_script failed or timed out: "fail" the Prolog, or "log" and go on
    # --- end of namespace scripts ----------------------------------------------
    source: str = "<defaults>"
    lines: dict = field(default_factory=dict, compare=False)  # key -> "file:line" for messages

    @property
    def socket_path(self):
        return self.socket or f"{self.rundir}/privtmpd.sock"

    @property
    def base_parent(self):
        return posixpath.dirname(self.base)

    @property
    def base_name(self):
        return posixpath.basename(self.base)

    @property
    def tmpdir_value(self):
        if self.tmpdir:
            return self.tmpdir
        if "/tmp" in self.mounts:
            return "/tmp"
        return "none"

    def mount_plan(self):
        """[(mount point, subdirectory name)] in a stable order."""
        return [(m, names.mount_dirname(m)) for m in sorted(self.mounts)]

    def options_of(self, mount):
        """The mount_options= words given for mount (a tuple, maybe empty)."""
        return dict(self.mount_options).get(mount, ())

    def tmpfs_size(self, mount):
        """tmpfs= size of mount ("4g", "10%", "job:50%"), or "" for a directory under base."""
        return dict(self.tmpfs).get(mount, "")


def _abs_path(value, key, where):
    if not value.startswith("/"):
        raise ConfigError(f"{where}: {key}={value!r} must be an absolute path")
    if "\0" in value or "\n" in value:
        raise ConfigError(f"{where}: {key}= contains a NUL or newline")
    parts = value.split("/")[1:]
    if value != "/" and (any(p in ("", ".", "..") for p in parts)):
        raise ConfigError(f"{where}: {key}={value!r} must be a normalised path "
                          f"(no '.', '..', '//' or trailing '/'); did you mean {posixpath.normpath(value)!r}?")
    if value == "/":
        raise ConfigError(f"{where}: {key}=/ is not allowed")
    return value


def parse_size(value, max_digits=15):
    """("size", bytes, text) for a size such as 512m (k/m/g/t, powers of
    1024), ("percent", N, text) for N% with 1 <= N <= 100, or None.  The
    one size syntax of the file; each key says what it accepts.  Lengths
    are bounded before int(): besides being absurd as sizes, strings of more
    than 4300 digits make int() raise a plain ValueError."""
    v = value.strip().lower()
    if v.endswith("%"):
        num = v[:-1]
        if num.isascii() and num.isdigit() and len(num) <= 3 and 1 <= int(num) <= 100:
            return "percent", int(num), f"{int(num)}%"
        return None
    unit = v[-1:] if v[-1:] in "kmgt" else ""
    num = v[:-1] if unit else v
    if not (num.isascii() and num.isdigit()) or len(num) > max_digits or int(num) == 0:
        return None
    return "size", int(num) * _SIZE_SUFFIX[unit], f"{int(num)}{unit}"


def _job_share(value, shown, example, where):
    """"job:N%" for job or job:N% (job alone is all of it): a tmpfs the
    daemon mounts at N% of the RAM and the entry helper, which knows the
    job's memory on the node (S_JOB_ALLOC_MEM), resizes to N% of that in
    the job's first task (namespace.job_share_source marks it)."""
    pct = value.strip().lower()[4:] or "100%"
    parsed = parse_size(pct) if pct.endswith("%") else None
    if parsed is None:
        raise ConfigError(f"{where}: {shown}: the share after 'job:' is a percentage of 1%..100% ({example})")
    return f"job:{parsed[2]}"


def _parse_size(value, where):
    """shm=: a size or a percentage, kept as written (the kernel's size=)."""
    parsed = parse_size(value, max_digits=20)
    if parsed is None and value.strip().endswith("%"):
        raise ConfigError(f"{where}: shm={value!r}: a percentage must be 1%..100%")
    if parsed is None:
        raise ConfigError(f"{where}: shm={value!r} is not a size (examples: 512m, 2g, 10%, job, job:50%; or shm=no)")
    return value


_DURATION_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(value, key, where):
    v = value.strip().lower()
    unit = v[-1:] if v[-1:] in "smhd" else ""
    num = v[:-1] if unit else v
    if not (num.isascii() and num.isdigit()) or len(num) > 9:
        raise ConfigError(f"{where}: {key}={value!r} is not a duration (examples: 600, 30m, 12h, 7d; or {key}=no)")
    secs = int(num) * _DURATION_UNIT[unit]
    if not 1 <= secs <= 365 * 86400:
        raise ConfigError(f"{where}: {key}={value}: must be between 1s and 365d")
    return secs


def _size_bytes(value, key, where):
    parsed = parse_size(value)
    if parsed is None or parsed[0] != "size":
        raise ConfigError(f"{where}: {key}={value!r} is not a size (examples: 500m, 20g, 1t)")
    return parsed[1]


def parse(text, source="<string>"):
    values = {}
    mounts = []
    per_mount = []      # (key, value, "file:line") of mount_options= and tmpfs=
    where_of = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        where = f"{source}:{lineno}"
        # A pasted plugstack.conf line: "required|optional /path/x.so k=v ..."
        if words[0] in ("required", "optional") and len(words) >= 2 and words[1].endswith(".so"):
            words = words[2:]
        for word in words:
            key, sep, value = word.partition("=")
            if not sep:
                raise ConfigError(f"{where}: {word!r} is not key=value (keys: {', '.join(sorted(_KEYS))})")
            if key not in _KEYS:
                raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(_KEYS))})")
            if key in _PER_MOUNT_KEYS:
                per_mount.append((key, value, where))
                continue
            if key == "mount":
                m = _abs_path(value, key, where)
                if m in mounts:
                    raise ConfigError(f"{where}: mount={m} is given twice")
                mounts.append(m)
                where_of[f"mount={m}"] = where
                continue
            if key in values:
                raise ConfigError(f"{where}: {key}= is set twice (first at {where_of[key]})")
            values[key] = value
            where_of[key] = where

    def at(key):
        return where_of.get(key, source)

    kw = {"source": source, "lines": where_of}
    if "base" in values:
        kw["base"] = _abs_path(values["base"], "base", at("base"))
    if mounts:
        kw["mounts"] = tuple(mounts)
    for key in ("rundir", "socket", "metrics_dir"):
        if key in values:
            kw[key] = _abs_path(values[key], key, at(key))
    if "mode" in values:
        v = values["mode"]
        try:
            mode = int(v, 8)
        except ValueError:
            raise ConfigError(f"{at('mode')}: mode={v!r} is not an octal mode such as 0700") from None
        if mode & ~0o1777 or not mode & 0o700 == 0o700:
            raise ConfigError(f"{at('mode')}: mode={v}: must be at most 1777 and give the owner rwx (e.g. 0700, 0750)")
        kw["mode"] = mode
    if "shm" in values:
        v = values["shm"]
        if v.lower() in ("no", "none", "off", ""):
            kw["shm"] = ""
        elif v == "job" or v.startswith("job:"):
            kw["shm"] = _job_share(v, f"shm={v!r}", "shm=job:50%", at("shm"))
        else:
            kw["shm"] = _parse_size(v, at("shm"))
    if "keep_failed" in values:
        v = values["keep_failed"]
        kw["keep_failed"] = 0 if v.lower() in ("no", "off", "0") else _parse_duration(v, "keep_failed",
                                                                                     at("keep_failed"))
    if "keep_max" in values:
        kw["keep_max"] = _size_bytes(values["keep_max"], "keep_max", at("keep_max"))
        if not kw.get("keep_failed"):
            raise ConfigError(f"{at('keep_max')}: keep_max= has no effect without keep_failed=<duration>")
    if "limit" in values:
        v = values["limit"]
        if v.lower() not in ("no", "off"):
            kw["limit"] = _size_bytes(v, "limit", at("limit"))
            if not 16 << 20 <= kw["limit"] <= 64 << 40:
                raise ConfigError(f"{at('limit')}: limit={v}: must be between 16m and 64t")
    if "limit_from" in values:
        v = values["limit_from"]
        if v not in ("tmp", "no"):
            raise ConfigError(f"{at('limit_from')}: limit_from={v!r}: use limit_from=tmp (the job's --tmp "
                              f"request) or limit_from=no")
        if v == "tmp" and not kw.get("limit"):
            raise ConfigError(f"{at('limit_from')}: limit_from=tmp needs limit=<size>, the size of jobs "
                              f"that request no --tmp")
        kw["limit_from"] = "" if v == "no" else v
    if "limit_max" in values:
        kw["limit_max"] = _size_bytes(values["limit_max"], "limit_max", at("limit_max"))
        if not kw.get("limit_from"):
            raise ConfigError(f"{at('limit_max')}: limit_max= caps a job's --tmp request and has no effect "
                              f"without limit_from=tmp")
        if kw["limit_max"] < kw.get("limit", 0):
            raise ConfigError(f"{at('limit_max')}: limit_max={values['limit_max']} is smaller than limit=; "
                              f"a job that asks for more than limit= would get less than one that asks nothing")
    for key, meaning in (("limit_reserve", "allocate each job's image in full"),
                         ("count_bytes", "log the bytes each removal frees, at one lstat per file")):
        if key in values:
            v = values[key].lower()
            if v not in ("yes", "no"):
                raise ConfigError(f"{at(key)}: {key}={values[key]!r}: use {key}=yes ({meaning}) or {key}=no")
            kw[key] = v == "yes"
    if kw.get("limit_reserve") and not kw.get("limit"):
        raise ConfigError(f"{at('limit_reserve')}: limit_reserve=yes has no effect without limit=<size>")
    if "tmpdir" in values:
        v = values["tmpdir"]
        kw["tmpdir"] = v if v == "none" else _abs_path(v, "tmpdir", at("tmpdir"))
    for key, conv, lo, hi in (("remove_workers", int, 1, 64), ("kill_timeout", float, 0.0, 300.0)):
        if key in values:
            try:
                num = conv(values[key])
            except ValueError:
                raise ConfigError(f"{at(key)}: {key}={values[key]!r} is not a number") from None
            if not lo <= num <= hi:
                raise ConfigError(f"{at(key)}: {key}={values[key]} must be between {lo} and {hi}")
            kw[key] = num
    kw.update(_parse_per_mount(per_mount, kw.get("mounts", Config.mounts), where_of))
    if "sbcast" in values:
        v = values["sbcast"].lower()
        if v not in ("yes", "no"):
            raise ConfigError(f"{at('sbcast')}: sbcast={values['sbcast']!r}: use sbcast=yes (let each job's "
                              f"user reach their private /tmp from the host, where sbcast writes) or sbcast=no")
        kw["sbcast"] = v == "yes"
    if "host_leftovers" in values:
        v = values["host_leftovers"].lower()
        if v not in ("remove", "report"):
            raise ConfigError(f"{at('host_leftovers')}: host_leftovers={values['host_leftovers']!r}: use remove "
                              f"(at a job's end, remove the files its user created in the node's shared "
                              f"mount points during it, with the user's rights) or report (only log them)")
        kw["host_leftovers"] = v
    _parse_ns_scripts(values, kw, at)
    cfg = Config(**kw)
    _check_consistency(cfg, at)
    _check_per_mount(cfg)
    _check_ns_scripts(cfg, at)
    return cfg


# --- namespace scripts (nsscripts.py) ----------------------------------------
# One block for the four keys, their parsing and their checks.

NS_SCRIPT_KEYS = {"ns_script", "ns_epilog", "ns_script_timeout", "on_script_error"}
# The Prolog waits REPLY_TIMEOUT (300 s) for the daemon's reply, and that
# reply may also wait behind other jobs' requests: a script's limit stays
# well below it, so a hanging script fails as a script, not as a lost daemon.
NS_SCRIPT_TIMEOUT_MAX = 240.0


def _parse_ns_scripts(values, kw, at):
    for key in ("ns_script", "ns_epilog"):
        if key in values:
            v = values[key]
            kw[key] = "" if v.lower() in ("no", "none", "off") else _abs_path(v, key, at(key))
    if "ns_script_timeout" in values:
        v = values["ns_script_timeout"]
        try:
            num = float(v)
        except ValueError:
            raise ConfigError(f"{at('ns_script_timeout')}: ns_script_timeout={v!r} is not a number of seconds") from None
        if not 1.0 <= num <= NS_SCRIPT_TIMEOUT_MAX:
            raise ConfigError(f"{at('ns_script_timeout')}: ns_script_timeout={v} must be between 1 and "
                              f"{NS_SCRIPT_TIMEOUT_MAX:.0f} seconds (the Prolog waits 300 s for its reply)")
        kw["ns_script_timeout"] = num
    if "on_script_error" in values:
        v = values["on_script_error"]
        if v not in ("fail", "log"):
            raise ConfigError(f"{at('on_script_error')}: on_script_error={v!r}: use fail (a failing ns_script "
                              f"fails the Prolog: Slurm drains the node and requeues the job) or log (the job "
                              f"starts anyway)")
        kw["on_script_error"] = v
    if ("ns_script_timeout" in values or "on_script_error" in values) and not (kw.get("ns_script")
                                                                                 or kw.get("ns_epilog")):
        key = "ns_script_timeout" if "ns_script_timeout" in values else "on_script_error"
        raise ConfigError(f"{at(key)}: {key}= has no effect without ns_script= or ns_epilog=")


def _check_ns_scripts(cfg, at):
    """A script runs inside the job's mount namespace, where the mount
    points (and /dev/shm with shm=) are the job user's own directories and
    the base's job directories are the users': a script path under any of
    them would run a file the job user wrote, as root."""
    hidden = list(cfg.mounts) + (["/dev/shm"] if cfg.shm else [])
    for key in ("ns_script", "ns_epilog"):
        path = getattr(cfg, key)
        if not path:
            continue
        for m in hidden:
            if is_under(path, m):
                raise ConfigError(f"{at(key)}: {key}={path} lies under {m}, which inside a job is the job "
                                  f"user's private directory; put the script in a root-only directory such "
                                  f"as /etc/privtmpd")
        if path.startswith(cfg.base + ".") or is_under(path, cfg.rundir):
            raise ConfigError(f"{at(key)}: {key}={path} lies in privtmpd's own job or run directories")


def check_ns_script(path, what):
    """Start-up check of a script: a root-owned executable regular file
    that only root can change, reached through root-owned directories no
    one else can write to (no sticky-bit exception: someone else's file in
    a sticky directory could still be put in place of a missing script),
    without a symlink anywhere."""
    missing = _check_no_symlinks(posixpath.dirname(path), what)
    if missing:
        raise ConfigError(f"{what}: {missing} does not exist")
    cur = ""
    for part in [""] + path.strip("/").split("/"):
        cur = (cur.rstrip("/") + "/" + part) if part else "/"
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise ConfigError(f"{what}: {cur} does not exist; install the script or remove this setting") from None
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(f"{what}: {cur} is a symbolic link to {os.readlink(cur)!r}; configure the real path")
        if st.st_uid != 0:
            raise ConfigError(f"{what}: {cur} is owned by uid {st.st_uid}; the script and every directory "
                              f"above it must belong to root (chown root: {cur})")
        if st.st_mode & 0o022:
            raise ConfigError(f"{what}: {cur} is writable by group or others; run chmod go-w {cur}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what}: {path} is not a regular file")
    if not st.st_mode & 0o100:
        raise ConfigError(f"{what}: {path} is not executable; run chmod 0755 {path}")


def check_ns_scripts(cfg):
    for key in ("ns_script", "ns_epilog"):
        path = getattr(cfg, key)
        if path:
            check_ns_script(path, f"{cfg.lines.get(key, cfg.source)}: {key}={path}")
# --- end of namespace scripts ----------------------------------------------


_KEYS = {"base", "mount", "rundir", "socket", "mode", "shm", "tmpdir", "remove_workers", "kill_timeout",
         "metrics_dir", "keep_failed", "keep_max", "limit", "limit_from", "limit_max",
         "limit_reserve", "count_bytes"} | NS_SCRIPT_KEYS


# --- per mount point: mount_options= and tmpfs= ---------------------------
#
#   mount_options=/tmp:noexec        flags for that mount point's bind
#   tmpfs=/tmp:4g                    that mount point is a private tmpfs
#
# Both name a mount= point, then ':', then their value; both may be repeated
# (once per mount point).  mount= itself stays a plain path, so a config
# that has neither key means what it always meant, and a mount point whose
# name contains ':' still works (the longest mount= that matches wins).

_PER_MOUNT_KEYS = ("mount_options", "tmpfs")
_KEYS |= set(_PER_MOUNT_KEYS) | {"sbcast", "host_leftovers"}

# Accepted words.  nosuid and nodev are always set on every private mount
# (a user-writable directory has no business holding setuid binaries or
# device nodes), so naming them is allowed and changes nothing; exec is the
# default.  suid, dev and ro are refused: see _REFUSED_OPTIONS.
MOUNT_OPTIONS = ("noexec", "exec", "nosuid", "nodev")
_REFUSED_OPTIONS = {
    "suid": "setuid binaries in a directory every job user can write are a privilege escalation "
            "waiting for a kernel or file-capability bug; nosuid is always on",
    "dev": "device nodes in a user-writable directory bypass /dev's permissions; nodev is always on",
    "ro": "a private /tmp that no job can write is of no use, and the job's first write fails; "
          "to stop programs running from it use noexec",
    "rw": "private mounts are always read-write",
}


def _split_mount_value(key, value, mounts, where):
    """(mount point, rest) for "MOUNTPOINT:REST", MOUNTPOINT a mount= path."""
    match = [m for m in mounts if value.startswith(m + ":")]
    if not match:
        head = value.split(":", 1)[0]
        if ":" not in value:
            raise ConfigError(f"{where}: {key}={value!r}: write {key}=<mount point>:<value>, "
                              f"e.g. {_EXAMPLE[key]}")
        raise ConfigError(f"{where}: {key}={value!r}: {head} is not one of the mount= points "
                          f"({', '.join(mounts)}); add mount={head} or fix the path")
    m = max(match, key=len)
    return m, value[len(m) + 1:]


_EXAMPLE = {"mount_options": "mount_options=/tmp:noexec", "tmpfs": "tmpfs=/tmp:4g"}


def _parse_tmpfs_size(value, m, where):
    """A tmpfs size= as the kernel takes it: bytes with k/m/g/t, or N% of RAM."""
    shown = f"tmpfs={m}:{value}"
    v = value.strip().lower()
    if v == "job" or v.startswith("job:"):
        if any(c in m for c in " \t\\"):
            # The entry helper finds the mount by its line in
            # /proc/self/mountinfo, which escapes these characters.
            raise ConfigError(f"{where}: {shown}: a mount point sized from the job's memory cannot contain "
                              f"a space, a tab or a backslash; give a fixed size or rename the mount point")
        return _job_share(value, shown, f"tmpfs={m}:job:50%", where)
    parsed = parse_size(value)
    if parsed is None and v.endswith("%"):
        raise ConfigError(f"{where}: {shown}: a share of the node's RAM must be 1%..100%")
    if parsed is None:
        raise ConfigError(f"{where}: {shown} is not a size (examples: tmpfs={m}:4g, tmpfs={m}:512m, "
                          f"tmpfs={m}:10%)")
    kind, amount, text = parsed
    if kind == "size" and amount < 1 << 20:
        raise ConfigError(f"{where}: {shown}: at least 1m (the kernel rounds to pages; a smaller "
                          f"tmpfs holds next to nothing)")
    return text


def _parse_per_mount(entries, mounts, where_of):
    options: Dict[str, tuple] = {}
    sizes: Dict[str, str] = {}
    for key, value, where in entries:
        m, rest = _split_mount_value(key, value, mounts, where)
        seen = options if key == "mount_options" else sizes
        if m in seen:
            raise ConfigError(f"{where}: {key}= for {m} is given twice (first at {where_of[f'{key}={m}']}); "
                              f"put everything on one line")
        where_of[f"{key}={m}"] = where
        if key == "tmpfs":
            sizes[m] = _parse_tmpfs_size(rest, m, where)
            continue
        words = rest.split(",") if rest else []
        if not words or "" in words:
            raise ConfigError(f"{where}: mount_options={value!r}: give options separated by ',' "
                              f"(e.g. mount_options={m}:noexec,nosuid)")
        for w in words:
            if w in _REFUSED_OPTIONS:
                raise ConfigError(f"{where}: mount_options={value}: {w!r} is not allowed: {_REFUSED_OPTIONS[w]}")
            if w not in MOUNT_OPTIONS:
                raise ConfigError(f"{where}: mount_options={value}: unknown option {w!r} "
                                  f"(known: {', '.join(MOUNT_OPTIONS)})")
        if "exec" in words and "noexec" in words:
            raise ConfigError(f"{where}: mount_options={value}: both exec and noexec; keep one")
        options[m] = tuple(dict.fromkeys(words))
    return {"mount_options": tuple(sorted(options.items())), "tmpfs": tuple(sorted(sizes.items()))}


def _check_per_mount(cfg):
    for m, _ in cfg.tmpfs:
        where = cfg.lines.get(f"tmpfs={m}", cfg.source)
        if m == "/dev/shm":
            raise ConfigError(f"{where}: tmpfs=/dev/shm: use shm=<size> (or shm=job:N%) for /dev/shm")
    if cfg.sbcast:
        where = cfg.lines.get("sbcast", cfg.source)
        if "/tmp" not in cfg.mounts or cfg.tmpfs_size("/tmp"):
            raise ConfigError(f"{where}: sbcast=yes gives sbcast the host path of the job's private /tmp, "
                              f"which needs mount=/tmp as a directory under base (not tmpfs=/tmp)")
        if cfg.limit:
            raise ConfigError(f"{where}: sbcast=yes does not work with limit= yet (the job's /tmp is inside "
                              f"its filesystem image); remove one of them")
        if cfg.mode & 0o077:
            raise ConfigError(f"{where}: sbcast=yes opens each job directory's top to other users' traversal, "
                              f"so the job's own directories must be owner-only: mode={cfg.mode:04o} gives "
                              f"group or others access; use mode=0700")
    if cfg.limit and cfg.tmpfs and all(cfg.tmpfs_size(m) for m in cfg.mounts):
        raise ConfigError(f"{cfg.lines.get('limit', cfg.source)}: limit= sizes the disk-backed mount "
                          f"points, but every mount point is a tmpfs= (whose size is its limit); "
                          f"remove limit=")

MKFS_PATHS = ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4")


def mkfs_path():
    return next((p for p in MKFS_PATHS if os.access(p, os.X_OK)), None)


def is_under(path, top):
    """path is top or lies below it (both normalised, absolute)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _check_consistency(cfg, at):
    by_name: dict[str, str] = {}
    for m in cfg.mounts:
        where = cfg.lines.get(f"mount={m}", cfg.source)
        name = names.mount_dirname(m)
        if name in by_name:
            raise ConfigError(f"{where}: mount={m} and mount={by_name[name]} would share the "
                              f"directory {name!r} in each job directory; keep only one")
        by_name[name] = m
        if m == "/dev/shm" and cfg.shm:
            raise ConfigError(f"{where}: mount=/dev/shm and shm= both privatise /dev/shm; use one")
        for other in cfg.mounts:
            if other != m and is_under(m, other):
                raise ConfigError(f"{where}: mount={m} lies under mount={other}; nested private "
                                  f"mounts are not supported")
        # A job directory is $base.<job>.<n>: a mount point inside one would
        # be covered by a user-owned directory.
        if m.startswith(cfg.base + "."):
            raise ConfigError(f"{where}: mount={m} lies inside the job directories {cfg.base}.*")
        if is_under(cfg.rundir, m):
            raise ConfigError(f"{at('rundir')}: rundir={cfg.rundir} lies under mount={m}: the "
                              f"entry helper could not find pins from inside a job")
    if cfg.base_parent == "/":
        raise ConfigError(f"{at('base')}: base={cfg.base}: job directories would be created in /; "
                          f"use a directory such as /tmp/slurm or /var/lib/privtmpd/job")
    if is_under(cfg.base, cfg.rundir):
        raise ConfigError(f"{at('base')}: base={cfg.base} must not lie under rundir={cfg.rundir}")
    if cfg.tmpdir not in ("", "none") and not any(is_under(cfg.tmpdir, m) for m in cfg.mounts):
        raise ConfigError(f"{at('tmpdir')}: tmpdir={cfg.tmpdir} is not under any private mount "
                          f"({', '.join(cfg.mounts)}): TMPDIR would point at a shared directory")


def load(path=DEFAULT_PATH):
    """Read and parse; a missing default file means all defaults."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if path == DEFAULT_PATH:
            return Config()
        raise ConfigError(f"{path}: no such file (give --config an existing file)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, path)


def _check_no_symlinks(path, what):
    """Every component must be a real directory (lstat): the daemon never
    resolves a symlink anywhere in a path it acts on."""
    cur = ""
    for part in path.strip("/").split("/"):
        cur += "/" + part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return cur
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(f"{what}: {cur} is a symbolic link to {os.readlink(cur)!r}; "
                              f"configure the real path instead")
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{what}: {cur} is not a directory")
    return None


def check_filesystem(cfg):
    """Start-up checks against the running system: ConfigError naming the
    line and the fix when one fails."""
    for m in cfg.mounts:
        missing = _check_no_symlinks(m, f"mount={m}")
        if missing:
            raise ConfigError(f"mount={m}: {missing} does not exist; create it or remove this mount=")
    where = cfg.lines.get("base", cfg.source)
    missing = _check_no_symlinks(cfg.base_parent, f"{where}: base={cfg.base}")
    if missing:
        raise ConfigError(f"{where}: base={cfg.base}: {missing} does not exist; create it (root-owned, 0755)")
    if cfg.limit_from:
        from .tmprequest import squeue_path
        if not squeue_path():
            raise ConfigError(f"{cfg.lines.get('limit_from', cfg.source)}: limit_from=tmp asks slurmctld for "
                              f"the job's --tmp with squeue, which is not installed (slurm-client)")
    if cfg.limit and not mkfs_path():
        raise ConfigError(f"{cfg.lines.get('limit', cfg.source)}: limit= needs mkfs.ext4 "
                          f"(apt-get install e2fsprogs / dnf install e2fsprogs)")
    # Each ancestor of the job directories must be root's: a user who can
    # rename an ancestor can redirect where the job's /tmp lands.  A
    # world-writable parent is acceptable only with the sticky bit (/tmp),
    # because then nobody but root can rename or remove our root-owned
    # job directories in it.
    _check_root_owned(cfg.base_parent, f"{where}: base={cfg.base}", "above the job directories")
    check_ns_scripts(cfg)
    # The same for the parents of each mount point: a user who can rename
    # one could make the Prolog fail, or have the job's directory bound
    # somewhere else.
    for m in cfg.mounts:
        parent = m.rpartition("/")[0] or "/"
        _check_root_owned(parent, f"{cfg.lines.get(f'mount={m}', cfg.source)}: mount={m}", f"above {m}")


def _check_root_owned(path, what, role):
    cur = ""
    for part in [""] + path.strip("/").split("/"):
        cur = (cur.rstrip("/") + "/" + part) if part else "/"
        st = os.lstat(cur)
        if st.st_uid != 0:
            raise ConfigError(f"{what}: {cur} is owned by uid {st.st_uid}; every directory {role} "
                              f"must belong to root")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise ConfigError(f"{what}: {cur} is writable by group or others without the sticky bit; "
                              f"run chmod go-w {cur}")

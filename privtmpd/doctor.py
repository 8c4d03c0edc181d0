"""`privtmpctl doctor`: the checks that otherwise cost an admin an afternoon.

Each check returns a Result with a status (ok, warn, FAIL), what was found
and the fix.  Only what breaks jobs or safety is a FAIL: doctor is meant to
run from Node Health Check, where a FAIL drains the node.
"""

import os
import re
import shutil
from dataclasses import dataclass

from . import config, kernel
from .client import ClientError, request


@dataclass
class Result:
    name: str
    status: str
    detail: str
    fix: str = ""


def _mountinfo():
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            out.append((parts[4], parts[6:sep]))
    return out


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def read_slurm_conf(path):
    """{lowercased key: value} of a slurm.conf (first occurrence; no includes)."""
    values = {}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            m = re.match(r"([A-Za-z]+)\s*=\s*(\S+)", line)
            if m and " " not in line.split("=", 1)[0].strip():
                values.setdefault(m.group(1).lower(), m.group(2))
    return values


def _plugstack_lines(path, depth=0):
    lines = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line.startswith("include ") and depth < 4:
                    import glob
                    for inc in sorted(glob.glob(line.split(None, 1)[1])):
                        lines += _plugstack_lines(inc, depth + 1)
                elif line:
                    lines.append(line)
    except OSError:
        pass
    return lines


def run_checks(cfg):
    from .ctl import hook_path, plugstack_line, spank_path
    res = []
    add = lambda *a: res.append(Result(*a))  # noqa: E731

    try:
        config.check_filesystem(cfg)
        add("config", "ok", f"{cfg.source} is valid")
    except (config.ConfigError, OSError) as e:
        add("config", "FAIL", str(e), "edit the configuration file, then privtmpctl config check")

    try:
        st = request({"op": "status"}, cfg.socket_path, timeout=10, retry=0)
        add("daemon", "ok" if st.get("ok") else "FAIL", f"reachable on {cfg.socket_path}, version "
            f"{st.get('version')}, {st.get('jobs')} job(s)")
    except ClientError as e:
        add("daemon", "FAIL", str(e), "systemctl start privtmpd (journalctl -u privtmpd for why it stopped)")

    mounts = _mountinfo()
    nsdir = f"{cfg.rundir}/ns"
    opts = [o for mp, o in mounts if mp == nsdir]
    if not opts:
        add("pin directory", "FAIL", f"{nsdir} is not a mount point", "restart privtmpd (it sets this up)")
    elif any(o.startswith("shared:") for o in opts[-1]):
        add("pin directory", "FAIL", f"{nsdir} is a shared mount: pins would fail with EINVAL",
            f"mount --make-private {nsdir} (privtmpd re-asserts this before every pin)")
    else:
        add("pin directory", "ok", f"{nsdir} is a private mount")

    root_opts = [o for mp, o in mounts if mp == "/"]
    prop = "shared" if root_opts and any(o.startswith("shared:") for o in root_opts[-1]) else "private/slave"
    add("host propagation", "ok", f"/ is {prop} on the host; jobs see it as rslave (host mounts such as "
        f"autofs reach jobs, job mounts never leak out); privtmpd never changes it")

    slurm_conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    sc = {}
    try:
        sc = read_slurm_conf(slurm_conf)
    except OSError as e:
        add("slurm.conf", "warn", f"cannot read {slurm_conf}: {e.strerror}", "set SLURM_CONF to your slurm.conf")
    for kind in ("prolog", "epilog"):
        want = hook_path(kind)
        have = sc.get(kind)
        if not sc:
            continue
        if have != want:
            add(f"slurm.conf {kind.title()}", "FAIL", f"{kind.title()}={have or '(unset)'} in {slurm_conf}",
                f"set {kind.title()}={want} (privtmpctl slurm-config prints the lines)")
        elif not os.access(want, os.X_OK):
            add(f"slurm.conf {kind.title()}", "FAIL", f"{want} is not executable", f"chmod 755 {want}")
        else:
            add(f"slurm.conf {kind.title()}", "ok", want)
    if not os.access("/usr/bin/python3", os.X_OK):
        add("hook interpreter", "FAIL", "/usr/bin/python3 is missing (the hooks' interpreter)",
            "install python3 (>= 3.9)")

    so = spank_path()
    if not so:
        add("entry helper", "FAIL", "privtmpd_spank.so is not built or installed",
            "install libslurm-dev (or slurm-devel) and gcc, then reinstall privtmpd")
    else:
        ps = sc.get("plugstackconfig", os.path.join(os.path.dirname(slurm_conf), "plugstack.conf"))
        lines = [line for line in _plugstack_lines(ps) if "privtmpd_spank" in line]
        if not lines:
            add("entry helper", "FAIL", f"{so} is not listed in {ps}: tasks would run on the host /tmp",
                f"add to {ps}: {plugstack_line(cfg, so)}")
        elif f"rundir={cfg.rundir}" not in lines[0] and cfg.rundir != "/run/privtmpd":
            add("entry helper", "FAIL", f"{ps} does not pass rundir={cfg.rundir}", f"use: {plugstack_line(cfg, so)}")
        else:
            add("entry helper", "ok", f"{so} listed in {ps}")
        for m in cfg.mounts:
            if _under(so, m):
                add("entry helper location", "FAIL", f"{so} lies under private mount {m}: srun inside a job "
                    f"cannot load it", "install it outside the privatised directories")

    for key in ("slurmdspooldir", "statesavelocation"):
        path = sc.get(key)
        for m in cfg.mounts:
            if path and _under(path, m):
                add(f"slurm {key}", "FAIL", f"{path} lies under private mount {m}: jobs cannot see it "
                    f"(batch jobs fail: Could not open stdout file)", f"move {key} out of {m}")

    try:
        vfs = os.statvfs(cfg.base_parent)
        free = vfs.f_bavail / max(vfs.f_blocks, 1)
        ifree = vfs.f_favail / max(vfs.f_files, 1) if vfs.f_files else 1
        status = "ok" if free > 0.05 and ifree > 0.05 else "warn"
        add("free space", status, f"{cfg.base_parent}: {free:.0%} of blocks and {ifree:.0%} of inodes free",
            "privtmpctl list shows which jobs use it; privtmpctl cleanup --orphans removes leftovers")
    except OSError as e:
        add("free space", "FAIL", f"statvfs({cfg.base_parent}): {e.strerror}")

    if not shutil.which("nsenter"):
        add("nsenter", "warn", "nsenter not found (only needed for debugging)", "install util-linux")
    try:
        fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
        ok = kernel.ns_type(fd) == kernel.CLONE_NEWNS
        os.close(fd)
        add("kernel", "ok" if ok else "FAIL", "NS_GET_NSTYPE works" if ok else "nsfs ioctls missing (kernel < 4.11)")
    except OSError as e:
        add("kernel", "FAIL", f"cannot open /proc/self/ns/mnt: {e.strerror}")
    return res

"""`privtmpctl doctor`: the checks that otherwise cost an admin an afternoon.

Each check gives a Result: a status (ok, warn, FAIL), what was found and,
unless it is ok, the fix.  Only what breaks jobs or safety is a FAIL:
doctor is meant to run from Node Health Check, where a FAIL drains the
node; a warn is worth knowing but keeps the node in service.
"""

import dataclasses
import glob
import os
import re
import stat
import subprocess
import time
from dataclasses import dataclass
from typing import Dict

from . import client, config, kernel, mountopts, proc
from .client import ClientError, request

OK, WARN, FAIL = "ok", "warn", "FAIL"

SLURM_CONF_CANDIDATES = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf",
                         # configless Slurm: slurmd's cached copy
                         "/var/spool/slurmd/conf-cache/slurm.conf", "/var/spool/slurm/d/conf-cache/slurm.conf")
SPANK_NAME = "privtmpd_spank.so"


@dataclass
class Result:
    name: str
    status: str
    detail: str
    fix: str = ""


def _mountinfo():
    """[(mount point, optional fields)] of this mount namespace."""
    return [(m.mountpoint, m.optional) for m in proc.mounts()]


def _shared(opts):
    return any(o.startswith("shared:") for o in opts)


# --- Slurm's configuration files --------------------------------------------

def find_slurm_conf(explicit=None):
    if explicit:
        return explicit
    if os.environ.get("SLURM_CONF"):
        return os.environ["SLURM_CONF"]
    for cand in SLURM_CONF_CANDIDATES:
        if os.path.exists(cand):
            return cand
    return SLURM_CONF_CANDIDATES[0]


def read_slurm_conf(path, depth=0):
    """{lowercased key: value} of a slurm.conf, following Include lines.
    Keys are case-insensitive in slurm.conf; the last definition wins."""
    values = {}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.match(r"include\s+(\S+)", line, re.I)
            if m and depth < 8:
                inc = m.group(1)
                if not inc.startswith("/"):
                    inc = os.path.join(os.path.dirname(path), inc)
                for p in sorted(glob.glob(inc)):
                    values.update(read_slurm_conf(p, depth + 1))
                continue
            # Lines such as NodeName=x CPUs=4 hold several pairs; only the
            # first word's key names the line.
            m = re.match(r"([A-Za-z]+)\s*=\s*(\"[^\"]*\"|\S+)", line)
            if m:
                values[m.group(1).lower()] = m.group(2).strip('"')
    return values


def plugstack_lines(path, depth=0):
    """Non-comment lines of a plugstack.conf, following `include GLOB`."""
    lines = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("include ") and depth < 8:
                pattern = line.split(None, 1)[1]
                if not pattern.startswith("/"):
                    pattern = os.path.join(os.path.dirname(path), pattern)
                for inc in sorted(glob.glob(pattern)):
                    try:
                        lines += plugstack_lines(inc, depth + 1)
                    except OSError:
                        pass
            elif line:
                lines.append(line)
    return lines


def _plugin_args(line):
    """("required", "/path/x.so", {"rundir": ..., ...}) of a plugstack line."""
    words = line.split()
    args = dict(w.split("=", 1) for w in words[2:] if "=" in w)
    return words[0], (words[1] if len(words) > 1 else ""), args


def _is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _same_file_content(a, b):
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


# --- the checks ------------------------------------------------------------

def _only_paths(cfg, **changes):
    """cfg for config.check_filesystem's path checks alone (limit= has its own check)."""
    if getattr(cfg, "limit", 0):
        changes["limit"] = 0
    changes.update(ns_script="", ns_epilog="")     # checked by check_ns_scripts
    return dataclasses.replace(cfg, **changes)


class Doctor:
    def __init__(self, config_path, slurm_conf=None):
        self.config_path = config_path
        self.slurm_conf = find_slurm_conf(slurm_conf)
        self.slurm_conf_explicit = bool(slurm_conf or os.environ.get("SLURM_CONF"))
        self.results = []
        self.cfg: config.Config         # loaded by check_config, the first check
        self.sysctl_fs = "/proc/sys/fs"

    def add(self, name, status, detail, fix=""):
        self.results.append(Result(name, status, detail, fix if status != OK else ""))

    def run(self):
        if not self.check_config():
            return self.results
        for check in (self.check_base, self.check_mounts, self.check_limit, self.check_ns_scripts,
                      self.check_rundir, self.check_propagation,
                      self.check_daemon, self.check_slurm, self.check_hook_interpreter, self.check_free_space,
                      self.check_metrics, self.check_kernel, self.check_link_protection,
                      self.check_tmpfs_sizes, self.check_sbcast, self.check_exec_on_noexec_base,
                      self.check_host_leftovers, self.check_shared_tmp_leftovers):
            try:
                check()
            except Exception as e:      # noqa: BLE001 - a broken check must not hide the others
                from .logfmt import describe
                self.add(check.__name__[6:].replace("_", " "), FAIL, f"the check itself failed: {describe(e)}",
                         "report this with the output of privtmpctl doctor --json")
        return self.results

    def check_config(self):
        try:
            self.cfg = config.load(self.config_path)
        except config.ConfigError as e:
            self.add("config", FAIL, str(e), f"edit {self.config_path}, then run privtmpctl config check "
                     "and systemctl restart privtmpd")
            return False
        self.add("config", OK, f"{self.cfg.source} is valid")
        return True

    def check_base(self):
        cfg = self.cfg
        try:
            config.check_filesystem(_only_paths(cfg, mounts=()))
        except config.ConfigError as e:
            self.add("base directory", FAIL, str(e), f"make {cfg.base_parent} and every directory above it "
                     f"root-owned and not writable by others (sticky like /tmp is fine), or change base=")
            return
        except OSError as e:
            self.add("base directory", FAIL, f"{cfg.base_parent}: {e.strerror}", f"mkdir -p {cfg.base_parent}")
            return
        st = os.lstat(cfg.base_parent)
        kind = "world-writable and sticky" if st.st_mode & 0o002 else "root-only"
        self.add("base directory", OK, f"{cfg.base_parent} and its ancestors are root's, no symlinks ({kind})")

    def check_mounts(self):
        cfg = self.cfg
        bad = []
        for m in cfg.mounts:
            try:
                config.check_filesystem(_only_paths(cfg, mounts=(m,)))
            except config.ConfigError as e:
                if f"mount={m}" in str(e):
                    bad.append(str(e))
        if bad:
            self.add("mount points", FAIL, "; ".join(bad), "create the directory (a real directory, not a "
                     "symlink) or remove that mount= line")
        else:
            self.add("mount points", OK, f"{', '.join(cfg.mounts)} exist and are real directories"
                     + (f"; /dev/shm: private tmpfs size={cfg.shm}" if cfg.shm else ""))

    def check_limit(self):
        cfg = self.cfg
        if not getattr(cfg, "limit", 0):
            return
        mkfs = config.mkfs_path()
        if mkfs:
            self.add("limit", OK, f"limit={cfg.limit} bytes per job, images made with {mkfs}")
        else:
            self.add("limit", FAIL, "limit= is set but mkfs.ext4 is missing: no job could start",
                     "dnf install e2fsprogs (apt-get install e2fsprogs)")

    def check_ns_scripts(self):
        cfg = self.cfg
        for key in ("ns_script", "ns_epilog"):
            path = getattr(cfg, key)
            if not path:
                continue
            try:
                config.check_ns_script(path, f"{key}={path}")
            except config.ConfigError as e:
                self.add(key, FAIL, f"{e}: privtmpd refuses to start",
                         f"install {path} as root, mode 0755, in a root-only directory outside the mount "
                         f"points (chown root: and chmod go-w each directory above it)")
                continue
            self.add(key, OK, f"{path} is root's, executable, reached through root-only directories; "
                     f"time limit {cfg.ns_script_timeout:g} s"
                     + (f", on_script_error={cfg.on_script_error}" if key == "ns_script" else ""))
        if not (cfg.ns_script or cfg.ns_epilog):
            return
        try:
            sc = read_slurm_conf(self.slurm_conf)
        except OSError:
            return                      # check_slurm reports an unreadable slurm.conf
        limit = sc.get("prologepilogtimeout", "")
        if limit.isdigit() and 0 < int(limit) <= cfg.ns_script_timeout + 5:
            self.add("script time limit", WARN, f"PrologEpilogTimeout={limit} in {self.slurm_conf} is not "
                     f"above ns_script_timeout={cfg.ns_script_timeout:g}: slurmd kills the Prolog or Epilog "
                     f"(and drains the node) before privtmpd's own limit ends the script",
                     f"raise PrologEpilogTimeout, or lower ns_script_timeout= below {int(limit) - 5}")

    def check_rundir(self):
        cfg = self.cfg
        nsdir = f"{cfg.rundir}/ns"
        try:
            st = os.lstat(cfg.rundir)
        except FileNotFoundError:
            self.add("run directory", FAIL, f"{cfg.rundir} does not exist: privtmpd has not run since boot",
                     "systemctl start privtmpd")
            return
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            self.add("run directory", FAIL, f"{cfg.rundir} is not a root-owned 0700 directory "
                     f"(mode {stat.filemode(st.st_mode)}, uid {st.st_uid})",
                     f"stop privtmpd, chown root: {cfg.rundir}; chmod 700 {cfg.rundir}; start privtmpd")
            return
        opts = [o for mp, o in _mountinfo() if mp == nsdir]
        if not opts:
            self.add("run directory", FAIL, f"{nsdir} is not a mount point (pins need a private mount)",
                     "systemctl restart privtmpd (it sets this up at start)")
        elif _shared(opts[-1]):
            self.add("run directory", FAIL, f"{nsdir} is a shared mount: pinning a job fails with EINVAL "
                     f"and pins would leak into other namespaces",
                     f"mount --make-private {nsdir} (privtmpd re-asserts this before every pin; something "
                     f"ran mount --make-rshared / since)")
        else:
            self.add("run directory", OK, f"{cfg.rundir} is root's, 0700; {nsdir} is a private mount")

    def check_propagation(self):
        root_opts = [o for mp, o in _mountinfo() if mp == "/"]
        if root_opts and _shared(root_opts[-1]):
            self.add("host propagation", OK, "/ is shared on the host; jobs get it rslave: host mounts made "
                     "later (autofs, NFS) reach running jobs, nothing a job mounts leaks out")
        else:
            self.add("host propagation", WARN, "/ is private on the host: filesystems mounted after a job "
                     "started (autofs, NFS) will not appear inside it",
                     "usual under systemd, which makes / shared at boot; privtmpd never changes the "
                     "host's propagation itself")

    def check_daemon(self):
        cfg = self.cfg
        try:
            st = request({"op": "status"}, cfg.socket_path, timeout=10, retry=0)
        except ClientError as e:
            self.add("daemon", FAIL, str(e), "systemctl start privtmpd (journalctl -u privtmpd says why it "
                     "stopped)")
            return
        if not st.get("ok"):
            self.add("daemon", FAIL, st.get("error", "refused the status request"), "run doctor as root")
            return
        running = st.get("config", {})
        differs = [k for k, want in (("base", cfg.base), ("mounts", sorted(cfg.mounts)), ("rundir", cfg.rundir),
                                     ("shm", cfg.shm or "no"), ("mode", oct(cfg.mode)))
                   if (sorted(running.get(k, [])) if k == "mounts" else running.get(k)) != want]
        if differs:
            self.add("daemon", WARN, f"running since before {cfg.source} changed ({', '.join(differs)} differ)",
                     "systemctl restart privtmpd (running jobs keep their namespaces)")
        else:
            self.add("daemon", OK, f"pid {st.get('pid')}, version {st.get('version')}, {st.get('jobs')} job(s), "
                     f"on {cfg.socket_path}")
        try:
            rep = request({"op": "cleanup", "dry_run": True}, cfg.socket_path, timeout=30, retry=0)
        except ClientError:
            return
        left = len(rep.get("orphans", [])) + len(rep.get("jobs", []))
        if left:
            self.add("leftovers", WARN, f"{left} leftover(s) that no live job owns (directories, state, pins)",
                     "privtmpctl cleanup --orphans --dry-run shows them; without --dry-run removes them")

    # -- Slurm --

    def check_slurm(self):
        cfg = self.cfg
        path = self.slurm_conf
        try:
            sc = read_slurm_conf(path)
        except OSError as e:
            self.add("slurm.conf", FAIL if self.slurm_conf_explicit else WARN,
                     f"cannot read {path}: {e.strerror}; Prolog, Epilog and plugstack.conf not checked",
                     "give its path: privtmpctl doctor --slurm-conf PATH (or set SLURM_CONF)")
            return
        for kind in ("prolog", "epilog"):
            self._check_hook(kind, sc.get(kind), path)
        if sc.get("jobcontainertype", "").endswith("tmpfs"):
            self.add("job_container", FAIL, f"JobContainerType={sc['jobcontainertype']} in {path} also "
                     f"privatises /tmp", "remove JobContainerType= (and PrologFlags=Contain if only it needed "
                     "it): use one or the other")
        ps = sc.get("plugstackconfig") or os.path.join(os.path.dirname(path), "plugstack.conf")
        self._check_plugstack(ps)
        paths = [("SlurmdSpoolDir", sc.get("slurmdspooldir", "/var/spool/slurmd")), ("slurm.conf", path),
                 ("PlugStackConfig", ps)]
        hidden = [(k, p, m) for k, p in paths for m in cfg.mounts if config.is_under(p, m)]
        if hidden:
            self.add("slurm paths", FAIL, "; ".join(f"{k} {p} lies under private mount {m}: jobs cannot see it "
                                                   f"(batch jobs fail: Could not open stdout file)"
                                                   for k, p, m in hidden),
                     "move it out of the privatised directories, or drop that mount=")
        else:
            self.add("slurm paths", OK, "SlurmdSpoolDir, slurm.conf and plugstack.conf stay visible inside jobs")

    def _check_hook(self, kind, value, slurm_conf):
        from .install import hook_path
        name, key = f"slurm.conf {kind.title()}", kind.title()
        want = hook_path(kind)
        fix_lines = "privtmpctl slurm-config prints the lines for this installation"
        if not value:
            self.add(name, FAIL, f"no {key}= in {slurm_conf}: job directories would never be created "
                     f"(or never removed)", f"set {key}={want} ({fix_lines}), then scontrol reconfigure")
            return
        progs = sorted(glob.glob(value)) if any(c in value for c in "*?[") else [value]
        default_socket = self.cfg.socket_path == client.DEFAULT_SOCKET
        wrapper_fix = (f"privtmpd listens on {self.cfg.socket_path}, not the hooks' default: run them from a "
                       f"wrapper, exec {want} --socket {self.cfg.socket_path}")
        for prog in progs:
            if not os.path.exists(prog):
                continue
            if os.path.realpath(prog) == os.path.realpath(want):
                if not os.access(prog, os.X_OK):
                    self.add(name, FAIL, f"{prog} is not executable", f"chmod 755 {os.path.realpath(prog)}")
                elif not default_socket:
                    self.add(name, FAIL, f"{prog} talks to {client.DEFAULT_SOCKET}", wrapper_fix)
                else:
                    self.add(name, OK, f"{key}={value} runs {want}")
                return
            text = self._small_text(prog)
            calls = [w for w in re.findall(r"[^\s'\";|&]+", text)
                     if w.endswith((f"/privtmpd/hooks/{kind}.py", f"/scripts/{kind}.py", f"/privtmpd/{kind}.py"))]
            if not calls:
                continue
            target = calls[0]
            if not os.path.exists(target):
                self.add(name, FAIL, f"{prog} runs {target}, which does not exist",
                         f"point it at {want}")
            elif not os.access(prog, os.X_OK):
                self.add(name, FAIL, f"{prog} is not executable", f"chmod 755 {prog}")
            elif not default_socket and f"--socket {self.cfg.socket_path}" not in text:
                self.add(name, FAIL, f"{prog} runs {target} without --socket {self.cfg.socket_path}", wrapper_fix)
            elif os.path.realpath(target) != os.path.realpath(want):
                self.add(name, WARN, f"{prog} runs {target}, not this installation's {want}",
                         f"point it at {want}")
            else:
                self.add(name, OK, f"{key}={value}: {prog} runs {want}")
            return
        self.add(name, FAIL, f"{key}={value} does not run privtmpd's {kind} hook",
                 f"set {key}={want}, or run it from your {kind} script ({fix_lines})")

    @staticmethod
    def _small_text(path):
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            return ""
        return "" if b"\0" in data else data.decode("utf-8", "replace")

    def _check_plugstack(self, ps):
        from .install import plugstack_line, spank_path
        cfg = self.cfg
        ours = spank_path()
        try:
            lines = plugstack_lines(ps)
        except OSError as e:
            self.add("entry helper", FAIL, f"cannot read {ps}: {e.strerror}: tasks would run on the host /tmp",
                     f"create {ps} with: {plugstack_line(cfg)}")
            return
        old = [ln for ln in lines if "private-tmpdir" in ln or "private_tmpdir" in ln]
        if old:
            self.add("original plugin", FAIL, f"{ps} still loads the original plugin: {old[0]}",
                     "remove that line: privtmpd replaces it (its base= and mount= go to privtmpd.conf)")
        mine = [ln for ln in lines if SPANK_NAME in ln]
        if not mine:
            self.add("entry helper", FAIL, f"{SPANK_NAME} is not listed in {ps}: tasks would run on the host /tmp",
                     f"add to {ps} on every node and submit host: {plugstack_line(cfg)}")
            return
        kind, so, args = _plugin_args(mine[0])
        problems, warnings = [], []
        if not os.path.exists(so):
            problems.append((f"{so} (listed in {ps}) does not exist",
                             f"install privtmpd's entry helper there, or list {ours or 'it'} instead"))
        elif not _is_elf(so):
            problems.append((f"{so} is not a shared object", "reinstall privtmpd"))
        if args.get("rundir", "/run/privtmpd") != cfg.rundir:
            problems.append((f"{ps} gives rundir={args.get('rundir', '/run/privtmpd (default)')}, "
                             f"privtmpd uses {cfg.rundir}: no task would find its namespace",
                             f"use: {plugstack_line(cfg, so)}"))
        if args.get("tmpdir", "/tmp") != cfg.tmpdir_value:
            warnings.append((f"{ps} gives tmpdir={args.get('tmpdir', '/tmp (default)')}, privtmpd.conf says "
                             f"{cfg.tmpdir_value}", f"use: {plugstack_line(cfg, so)}"))
        if "shm" in args:
            # The share of the job's memory comes from the daemon's mount
            # now (resize_job_tmpfs in the entry helper): one place to set it.
            warnings.append((f"{ps} gives shm={args['shm']}, which the entry helper ignores: the share of the "
                             f"job's memory comes from privtmpd.conf (shm=job:N%, tmpfs=<dir>:job:N%)",
                             f"drop shm= from that line; privtmpd.conf says shm={cfg.shm or 'no'}"))
        if kind != "required":
            warnings.append((f"listed as {kind}: if it cannot load, tasks run on the host /tmp",
                             "use required"))
        for m in cfg.mounts:
            if config.is_under(so, m):
                problems.append((f"{so} lies under private mount {m}: an srun inside a job cannot load it",
                                 "install it outside the privatised directories"))
        if ours and os.path.exists(so) and not _same_file_content(so, ours):
            warnings.append((f"{so} differs from this installation's {ours} (another build or version)",
                             f"cp {ours} {so}, or list {ours}"))
        if problems:
            self.add("entry helper", FAIL, "; ".join(p for p, _ in problems), "; ".join(f for _, f in problems))
        elif warnings:
            self.add("entry helper", WARN, "; ".join(p for p, _ in warnings), "; ".join(f for _, f in warnings))
        else:
            self.add("entry helper", OK, f"{so} listed in {ps} ({kind}, rundir={cfg.rundir})")

    def check_hook_interpreter(self):
        # The hooks run as /usr/bin/python3 -IS and find the package next to
        # themselves; make sure that interpreter can load it from here.
        import privtmpd
        top = os.path.dirname(os.path.dirname(os.path.abspath(privtmpd.__file__)))
        py = "/usr/bin/python3"
        if not os.access(py, os.X_OK):
            self.add("hook interpreter", FAIL, f"{py} is missing: the Prolog and Epilog cannot run",
                     "install python3 (3.9 or later)")
            return
        r = subprocess.run([py, "-IS", "-c", f"import sys; sys.path.insert(0, {top!r}); import privtmpd.client"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode:
            err = (r.stderr.strip().splitlines() or ["no output"])[-1]
            self.add("hook interpreter", FAIL, f"{py} cannot load privtmpd from {top}: {err}",
                     "install privtmpd for the system python3 (3.9 or later)")
        else:
            self.add("hook interpreter", OK, f"{py} loads the hooks' client from {top}")

    def check_free_space(self):
        cfg = self.cfg
        try:
            vfs = os.statvfs(cfg.base_parent)
        except OSError as e:
            self.add("free space", FAIL, f"statvfs({cfg.base_parent}): {e.strerror}",
                     f"create {cfg.base_parent} (root-owned)")
            return
        free = vfs.f_bavail / max(vfs.f_blocks, 1)
        ifree = vfs.f_favail / vfs.f_files if vfs.f_files else 1.0
        detail = f"{cfg.base_parent}: {free:.0%} of space and {ifree:.0%} of inodes free"
        fix = "privtmpctl list shows which jobs use it; privtmpctl cleanup --orphans removes leftovers"
        if min(free, ifree) < 0.02:
            self.add("free space", FAIL, detail, fix)
        elif min(free, ifree) < 0.10:
            self.add("free space", WARN, detail, fix)
        else:
            self.add("free space", OK, detail)

    def check_metrics(self):
        cfg = self.cfg
        if not cfg.metrics_dir:
            return
        d = cfg.metrics_dir
        if not os.path.isdir(d):
            self.add("metrics", WARN, f"metrics_dir={d} does not exist: no metrics are written",
                     f"mkdir -p {d} (node-exporter --collector.textfile.directory={d})")
        elif not os.path.exists(os.path.join(d, "privtmpd.prom")):
            self.add("metrics", WARN, f"{d}/privtmpd.prom is missing", "systemctl restart privtmpd")
        else:
            self.add("metrics", OK, f"{d}/privtmpd.prom")

    def check_kernel(self):
        try:
            fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.add("kernel", FAIL, f"open(/proc/self/ns/mnt): {e.strerror}", "mount /proc")
            return
        try:
            if kernel.ns_type(fd) != kernel.CLONE_NEWNS:
                self.add("kernel", FAIL, "the NS_GET_NSTYPE ioctl is missing (Linux < 4.11)",
                         "privtmpd needs Linux 5.6 or later")
                return
        finally:
            os.close(fd)
        try:
            os.close(kernel.openat2(-100, "/", os.O_RDONLY | os.O_DIRECTORY, kernel.RESOLVE_NO_SYMLINKS))
        except OSError as e:
            self.add("kernel", WARN, f"openat2: {e.strerror}: removal falls back to per-directory mount checks",
                     "Linux 5.6 or later gives openat2(RESOLVE_NO_XDEV)")
            return
        self.add("kernel", OK, f"{os.uname().release}: nsfs ioctls and openat2 available")


    def check_link_protection(self):
        """fs.protected_symlinks and fs.protected_hardlinks: privtmpd itself
        never follows a link, but root on the node does (admins, Slurm's
        own hooks) in the sticky /tmp where the job directories live, and
        without protected_hardlinks a user can link root's files (setuid
        binaries, /etc/shadow) into their job's /tmp."""
        bad = []
        for key in ("protected_symlinks", "protected_hardlinks"):
            try:
                with open(f"{self.sysctl_fs}/{key}") as f:
                    if f.read().strip() == "0":
                        bad.append(f"fs.{key}")
            except OSError:
                pass
        if bad:
            self.add("link protection", WARN, f"{', '.join(bad)} = 0: root following or writing through a "
                     f"user's links in a sticky directory (the base's) can be redirected anywhere",
                     f"sysctl -w {'=1 '.join(bad)}=1, and the same in /etc/sysctl.d/")
        else:
            self.add("link protection", OK, "fs.protected_symlinks and fs.protected_hardlinks are on")


    # --- mount_options=, tmpfs=, sbcast= ----------------------------------

    def check_tmpfs_sizes(self):
        """tmpfs= pages are RAM (or swap): sizes that add up to more than
        the node has let one job's /tmp take the memory other jobs and
        slurmd need.  Counted per job: every job gets all of them.  Shares
        of the job's memory (job:N%, with shm=job:N%) are charged to the
        job's own memory cgroup: above 100% in all, its files can take all
        of its memory and the job is killed for it."""
        cfg = self.cfg
        if not cfg.tmpfs:
            return
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        total = job_share = 0
        for _, size in cfg.tmpfs:
            if size.startswith("job:"):
                job_share += int(size[4:-1])
            elif size.endswith("%"):
                total += ram * int(size[:-1]) // 100
            else:
                total += config.parse_size(size)[1]
        shown = ", ".join(f"{m}={size}" for m, size in cfg.tmpfs)
        if cfg.shm.startswith("job:"):
            job_share += int(cfg.shm[4:-1])
        if total > ram:
            self.add("tmpfs mount points", WARN, f"tmpfs= sizes ({shown}) add up to {total >> 20} MiB per job, "
                     f"more than this node's {ram >> 20} MiB of RAM: one job's files can push the node into swap "
                     f"or the OOM killer", "lower the sizes (a share such as 10% follows each node's RAM)")
        elif job_share > 100:
            self.add("tmpfs mount points", WARN, f"shares of the job's memory ({shown}"
                     + (f", shm={cfg.shm}" if cfg.shm.startswith("job:") else "")
                     + f") add up to {job_share}%: a job's files can take all of its memory, and the OOM killer "
                     f"ends the job", "lower the shares so that they add up to 100% at most")
        else:
            self.add("tmpfs mount points", OK, f"{shown}: {total >> 20} MiB per job at most, of {ram >> 20} MiB RAM"
                     + (f", plus {job_share}% of the job's memory" if job_share else ""))

    def check_sbcast(self):
        """sbcast=yes needs three things to agree: privtmpd.conf (the job
        directory reachable by its owner), the entry helper's host_tmp=
        (the variable users give sbcast) and PrologFlags=Alloc (every
        node's job directory exists before a step reaches it)."""
        cfg = self.cfg
        try:
            sc = read_slurm_conf(self.slurm_conf)
            ps = sc.get("plugstackconfig") or os.path.join(os.path.dirname(self.slurm_conf), "plugstack.conf")
            mine = [ln for ln in plugstack_lines(ps) if SPANK_NAME in ln]
        except OSError:
            return          # check_slurm says what cannot be read
        host_tmp = _plugin_args(mine[0])[2].get("host_tmp") if mine else None
        if not cfg.sbcast:
            if host_tmp:
                self.add("sbcast", WARN, f"{ps} gives host_tmp={host_tmp} but privtmpd.conf has no sbcast=yes: "
                         f"jobs get PRIVTMPD_HOST_TMP, and sbcast to it fails with Permission denied",
                         "add sbcast=yes to privtmpd.conf and restart privtmpd, or drop host_tmp=")
            return
        problems = []
        if host_tmp != cfg.base:
            problems.append((f"sbcast=yes, but the entry helper's line in {ps} gives "
                             + (f"host_tmp={host_tmp}" if host_tmp else "no host_tmp=")
                             + f": PRIVTMPD_HOST_TMP would not name the job's /tmp under {cfg.base}",
                             f"add host_tmp={cfg.base} to that line on every node"))
        flags = [f.strip().lower() for f in sc.get("prologflags", "").split(",")]
        if not {"alloc", "contain"} & set(flags):
            problems.append(("PrologFlags has neither Alloc nor Contain: a node's Prolog runs when the first "
                             "step reaches it, so sbcast from the batch script finds no job directory on the "
                             "other nodes (No such file or directory)",
                             f"set PrologFlags=Alloc in {self.slurm_conf}"))
        if problems:
            self.add("sbcast", WARN, "; ".join(p for p, _ in problems), "; ".join(f for _, f in problems))
        else:
            self.add("sbcast", OK, f"jobs get PRIVTMPD_HOST_TMP={cfg.base}.<job>.<restart>/tmp on every node")

    def check_exec_on_noexec_base(self):
        """mount_options=<mp>:exec cannot undo a noexec filesystem under
        base=: the job's directory is bind-mounted from there, and the bind
        keeps every flag of its source (namespace._mount_flags_of)."""
        lost = mountopts.exec_lost_to_noexec_base(self.cfg)
        if lost is None:
            return
        points, fs = lost
        cfg = self.cfg
        if points:
            self.add("exec mount points", WARN, mountopts.noexec_base_warning(cfg, points, fs),
                     f"remount that filesystem exec (mount -o remount,exec {fs}, and drop noexec from its fstab "
                     f"line), or move base= to a filesystem mounted exec")
        else:
            self.add("exec mount points", OK, f"base={cfg.base} is on a filesystem mounted exec ({fs}): "
                     f"mount_options=...:exec takes effect")

    def check_host_leftovers(self):
        """host_leftovers=remove decides by creation time (statx btime): on
        a filesystem that keeps none, nothing is ever swept there.  The
        mount point's own btime tells whether its filesystem keeps them."""
        from . import leftovers
        cfg = self.cfg
        points = leftovers.shared_points(cfg)
        blind = []
        for p in points:
            try:
                if kernel.statx_nofollow(kernel.AT_FDCWD, p).btime is None:
                    blind.append(p)
            except OSError:
                continue        # check_mounts says why
        if cfg.host_leftovers != leftovers.REMOVE:
            self.add("host leftovers", OK, "host_leftovers=report: files users leave in "
                     f"{', '.join(points)} during jobs (a plain sbcast to /tmp) are logged, not removed")
        elif blind:
            self.add("host leftovers", WARN, f"{', '.join(blind)}: the filesystem keeps no creation times, so "
                     f"host_leftovers=remove never removes what users leave there during their jobs",
                     "put that mount point on a filesystem with creation times (ext4, xfs, btrfs, tmpfs), "
                     "or rely on the shared tmp check below while jobs run")
        else:
            self.add("host leftovers", OK, f"files users leave in {', '.join(points)} during their jobs (a plain "
                     f"sbcast to /tmp) are removed when their last job on the node ends")

    LEFTOVER_SCAN_MAX = 100000

    def check_shared_tmp_leftovers(self):
        """Files a running job's user put in the host's own mount points
        (the shared /tmp) since their job started: what `sbcast f /tmp/f`
        leaves behind (sbcast writes from the host namespace).  Reported
        here while the job runs, by the rule the daemon's sweep applies at
        the user's last job's end (leftovers.is_leftover: regular files of
        the user's created since their job started, at the top of each
        shared mount point), which removes them with the user's rights
        (host_leftovers=remove) or only logs them (report).  At most
        LEFTOVER_SCAN_MAX entries each."""
        from . import leftovers, runstate
        cfg = self.cfg
        try:
            states = runstate.all_states(cfg)
        except OSError:
            return
        started: Dict[int, tuple] = {}      # uid -> (earliest creation, job)
        for job, st in states.items():
            if st and type(st.get("uid")) is int and st["uid"] != 0 and isinstance(st.get("created"), (int, float)):
                if st["uid"] not in started or st["created"] < started[st["uid"]][0]:
                    started[st["uid"]] = (st["created"], job)
        if not started:
            return
        found = []
        now = time.time()
        for m in leftovers.shared_points(cfg):
            try:
                fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                with os.scandir(fd) as it:
                    for i, e in enumerate(it):
                        if i >= self.LEFTOVER_SCAN_MAX:
                            break
                        try:
                            # statx without asking the filesystem: a user's
                            # FUSE mount in /tmp cannot hang doctor.
                            st = kernel.statx_nofollow(fd, e.name)
                        except OSError:
                            continue
                        hit = started.get(st.st_uid)
                        # What the daemon's sweep would take at the job's end.
                        if hit and leftovers.is_leftover(st, st.st_uid, hit[0] - leftovers.CLOCK_SLACK, now):
                            # The name is the user's: escaped, so it cannot
                            # write control sequences to the admin's terminal.
                            shown = e.name.encode("unicode_escape", "backslashreplace").decode("ascii")
                            found.append(f"{m}/{shown} (uid {st.st_uid}, job {hit[1]})")
            except OSError:
                continue
            finally:
                os.close(fd)
        if found:
            self.add("shared tmp", WARN, f"{len(found)} file(s) written to the host's shared mount points by "
                     f"users of running jobs (sbcast to /tmp lands there, not in the job): "
                     + ", ".join(found[:10]) + (" ..." if len(found) > 10 else ""),
                     "tell users to sbcast to \"$PRIVTMPD_HOST_TMP/<file>\" (sbcast=yes); "
                     + ("privtmpd removes these files when the user's last job on this node ends"
                        if cfg.host_leftovers == "remove" else
                        "host_leftovers=report: these files outlive the job; remove them once it has ended, "
                        "or set host_leftovers=remove"))
        else:
            self.add("shared tmp", OK, "no files of running jobs' users in the host's shared mount points")


def run_checks(config_path, slurm_conf=None):
    return Doctor(config_path, slurm_conf).run()


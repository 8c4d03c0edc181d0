"""privtmpctl: the admin's view of privtmpd on one node.

Human-readable output by default, --json for scripts.  Exit codes: 0
success; 1 the operation failed or `doctor` found a problem; 2 bad usage;
3 the daemon cannot be reached.  Progress of long operations goes to
stderr, and only when stderr is a terminal.  Errors become one-line
messages in main() only.
"""

import argparse
import json
import os
import pwd
import sys
from typing import NoReturn
import time

from . import __version__, config, kernel, limitfs, mountopts, names, runstate, safefs
from .install import hook_path, plugstack_line, spank_path
from .client import DEFAULT_SOCKET, ClientError, request

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
class CtlError(Exception):
    def __init__(self, message, code=EXIT_FAIL):
        super().__init__(message)
        self.code = code


# --- helpers ---------------------------------------------------------------

def _ask(cfg, msg, timeout=120):
    try:
        reply = request(msg, cfg.socket_path, timeout=timeout, retry=0)
    except ClientError as e:
        raise CtlError(str(e), EXIT_UNREACHABLE) from None
    if not reply.get("ok"):
        raise CtlError(reply.get("error", "privtmpd refused the request"))
    reply.pop("ok", None)
    return reply


def _human(n):
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _age(seconds):
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def _user_name(j):
    if j.get("user"):
        return j["user"]
    uid = j.get("uid")
    if uid is None:
        return "-"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Progress:
    """One self-overwriting status line on stderr, only on a terminal."""

    def __init__(self, enabled=None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = 0.0
        self.shown = False

    def show(self, text, force=False):
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()
        self.shown = True

    def done(self, text=""):
        if self.enabled and (self.shown or text):
            sys.stderr.write(f"\r\033[K{text}" + ("\n" if text else ""))
            sys.stderr.flush()
        self.shown = False


def tree_usage(path, limit=10_000_000, progress=None, label=""):
    """(bytes, entries) under path, walked by the same rules as removal."""
    show = (lambda n, b: progress.show(f"measuring {label}: {n} entries, {_human(b)}")) if progress else None
    parent, _, name = path.rpartition("/")
    try:
        pfd = safefs.open_dir(parent or "/")
    except OSError:
        return 0, 0
    try:
        total, count, _complete = safefs.tree_usage(pfd, name, limit, show)
    except OSError:
        return 0, 0
    finally:
        os.close(pfd)
    return total, count


def _table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _print_json(obj):
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    print()


def _job_arg(text):
    try:
        return names.parse_job_id(text)
    except names.BadName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _need_root():
    if os.geteuid() != 0:
        raise CtlError("must run as root (the daemon's socket and the job namespaces are root's)")


# --- commands --------------------------------------------------------------

def cmd_status(cfg, args):
    _need_root()
    st = _ask(cfg, {"op": "status"})
    vfs = os.statvfs(cfg.base_parent)
    st["base_free_bytes"] = vfs.f_bavail * vfs.f_frsize
    st["base_size_bytes"] = vfs.f_blocks * vfs.f_frsize
    st["base_free_inodes"] = vfs.f_favail
    if args.json:
        return _print_json(st)
    c = st["config"]
    usage = f", {_human(st['rss_bytes'])} resident, {st['open_fds']} fds" if st.get("rss_bytes") else ""
    print(f"privtmpd {st['version']} running, pid {st['pid']}, up {_age(st['uptime'])}{usage}")
    print(f"config:   {c['source']}")
    print(f"base:     {c['base']}.<job>.<restart>   mounts: {' '.join(c['mounts'])}   shm: {c['shm']}")
    print(f"jobs:     {st['jobs']} active; removals: {st['removals_running']} running, "
          f"{st['removals_queued']} queued")
    print(f"disk:     {_human(st['base_free_bytes'])} free of {_human(st['base_size_bytes'])} "
          f"on {cfg.base_parent}, {st['base_free_inodes']} inodes free")
    if c.get("metrics_dir"):
        print(f"metrics:  {c['metrics_dir']}/privtmpd.prom")


def _jobs(cfg, op, job=None, usage=True):
    msg = {"op": op}
    if job is not None:
        msg["job"] = str(job)
    reply = _ask(cfg, msg)
    now = time.time()
    progress = Progress()
    for j in reply["jobs"]:
        if usage and j.get("dir") and j.get("used") is not None:
            # A limit= job: what it wrote is inside its own filesystem, whose
            # usage the daemon read with statvfs.  Walking the job directory
            # would count the image file, all of it under limit_reserve=yes.
            # ("/." : the walk never crosses into another mount, so it starts
            # at the filesystem's root instead of entering it from the job dir.)
            _, j["entries"] = tree_usage(f"{j['dir']}/{limitfs.LIMITED_FS}/.", progress=progress,
                                         label=f"job {j['job']}")
            j["bytes"] = j["used"]
        elif usage and j.get("dir"):
            j["bytes"], j["entries"] = tree_usage(j["dir"], progress=progress, label=f"job {j['job']}")
        else:
            j["bytes"], j["entries"] = None, None
        if j["bytes"] is not None and isinstance(j.get("tmpfs_used"), dict):
            # tmpfs= points: nothing under the job directory; their usage was
            # read by the daemon from inside the job's namespace.
            j["bytes"] += sum(u[0] for u in j["tmpfs_used"].values())
        j["age_seconds"] = round(now - j["created"], 1) if j.get("created") else None
        j["user"] = _user_name(j)
    progress.done()
    return reply


def cmd_list(cfg, args):
    _need_root()
    if args.kept:
        return _list_kept(cfg, args)
    reply = _jobs(cfg, "list", usage=not args.no_usage)
    if args.json:
        return _print_json(reply)
    if not reply["jobs"]:
        print("no job namespaces on this node")
    else:
        rows = [[j.get("job"), j.get("restart", "-"), j["user"],
                 _age(j["age_seconds"]) if j["age_seconds"] is not None else "-",
                 ("-" if j["bytes"] is None else _human(j["bytes"]))
                 + (f" of {_human(j['limit'])}" if j.get("limit") else ""),
                 "-" if j["entries"] is None else j["entries"],
                 len(j.get("processes", [])), j.get("state", "?") + ("" if j.get("pinned") else " (no pin!)")]
                for j in reply["jobs"]]
        _table(rows, ["JOB", "RESTART", "USER", "AGE", "SIZE", "FILES", "PROCS", "STATE"])
    if reply["removals"]:
        n = len(reply["removals"])
        print(f"\nbeing removed: {n} director{'y' if n == 1 else 'ies'}")


def _list_kept(cfg, args):
    """Directories of failed jobs kept for debugging (keep_failed=)."""
    reply = _ask(cfg, {"op": "list"})
    kept = reply.get("kept", [])
    for k in kept:
        k["user"] = _user_name(k)
    if args.json:
        return _print_json({"kept": kept, "keep_max": reply.get("keep_max")})
    if not kept:
        print("no kept directories on this node")
        return 0
    now = time.time()
    _table([[k["job"], k["restart"], k["user"], k["exit_code"], "-" if k.get("bytes") is None else _human(k["bytes"]),
             _age(max(k["until"] - now, 0)), k["path"]] for k in kept],
           ["JOB", "RESTART", "USER", "EXIT", "SIZE", "EXPIRES IN", "PATH"])
    if reply.get("keep_max"):
        total = sum(k.get("bytes") or 0 for k in kept)
        print(f"\n{_human(total)} of keep_max={_human(reply['keep_max'])}")
    return 0


def cmd_show(cfg, args):
    _need_root()
    reply = _jobs(cfg, "show", args.job)
    j = reply["jobs"][0]
    j["pin"] = names.pin_path(cfg.rundir, j["job"])
    if args.json:
        return _print_json(j)
    rows = [("job", j["job"]), ("restart", j.get("restart")), ("user", f"{j['user']} (uid {j.get('uid')}, "
                                                                      f"gid {j.get('gid')})"),
            ("state", j.get("state")), ("pinned", "yes" if j.get("pinned") else "NO (stale: privtmpctl cleanup)"),
            ("pin", j["pin"]), ("dir", j.get("dir")), ("mounts", ", ".join(j.get("mounts") or [])),
            ("shm", j.get("shm") or "host /dev/shm")]
    if j.get("created"):
        rows.append(("created", f"{time.ctime(j['created'])} ({_age(j['age_seconds'])} ago)"))
    if j.get("limit"):
        rows.append(("limit", f"{_human(j['limit'])}, " + ("allocated in full" if j.get("reserved") else "sparse")))
    for m, size in sorted((j.get("tmpfs") or {}).items()):
        used = (j.get("tmpfs_used") or {}).get(m)
        rows.append(("tmpfs", f"{m}: " + (f"{_human(used[0])} used of {_human(used[1])}" if used else f"size={size}")))
    rows.append(("usage", "-" if j["bytes"] is None else f"{_human(j['bytes'])} in {j['entries']} entries"))
    rows.append(("procs", " ".join(map(str, j.get("processes", []))) or "none"))
    for key, value in rows:
        print(f"{key + ':':9}{value}")


def cmd_enter(cfg, args):
    """setns into the job's pinned namespace and run a command, like
    nsenter --mount=PIN.  This process is single-threaded, as setns needs.
    Does not need the daemon: a pin is enough.

    Inside, /tmp and /var/tmp are the job user's own directories, not
    sticky: every name in them is the user's to create, swap or point
    anywhere.  As root, that is a trap (a symlink at a name a root tool
    writes to lands on any file of the host), so: a warning, TMPDIR at a
    directory of root's own, and --user to look as the job's user instead."""
    _need_root()
    job = args.job
    pin = names.pin_path(cfg.rundir, job)
    ident = None
    if args.user:
        st = runstate.read_state(cfg, job) or {}
        if type(st.get("uid")) is not int or type(st.get("gid")) is not int:
            raise CtlError(f"job {job}: no state file with its uid and gid in {cfg.rundir}/jobs; "
                           f"enter it as root (without --user)")
        ident = (st["uid"], st["gid"], st.get("user") or "")
    try:
        fd = os.open(pin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CtlError(f"job {job} has no namespace on this node ({pin} missing)") from None
    try:
        if kernel.ns_type(fd) != kernel.CLONE_NEWNS:
            raise CtlError(f"{pin} is not a pinned mount namespace (stale pin); privtmpctl cleanup {job}")
        kernel.setns(fd, kernel.CLONE_NEWNS, pin)
    finally:
        os.close(fd)
    os.chdir("/")
    os.environ["PRIVTMPD_JOB"] = str(job)
    cmd = args.command or [os.environ.get("SHELL") or "/bin/sh"]
    private = None
    if ident:
        if cfg.tmpdir_value != "none":
            os.environ["TMPDIR"] = cfg.tmpdir_value
        if os.isatty(0):
            # Not on the admin's terminal: a process of the user's there
            # could push keystrokes into it (TIOCSTI) for the root shell
            # that reads it next, as su without --pty allowed.
            code = _on_own_terminal(cmd, lambda: _become(*ident))
            if code:
                raise CtlError("", code)
            return
        _become(*ident)
    else:
        import tempfile
        private = tempfile.mkdtemp(prefix=f"privtmpctl-enter.{job}.", dir="/run")
        os.environ["TMPDIR"] = private
        if not args.command or sys.stderr.isatty():
            print(f"privtmpctl: root in job {job}'s namespace: /tmp and /var/tmp are the job user's own "
                  f"directories; do not follow or write to their entries as root (TMPDIR is {private}); "
                  f"privtmpctl enter --user {job} looks as the job's user", file=sys.stderr)
    sys.stdout.flush()
    if private is None:
        _exec(cmd)
    pid = os.fork()
    if pid == 0:
        _exec(cmd)
    import signal
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)      # the command's to handle, at the terminal
    _, status = os.waitpid(pid, 0)
    import shutil
    shutil.rmtree(private, ignore_errors=True)  # root's own directory, root's files
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    if code:
        raise CtlError("", code)        # the command's status, and it said why itself


def _on_own_terminal(cmd, become):
    """Run cmd in a new session on a new pseudo-terminal, relayed to ours
    (raw), and return its exit status."""
    import fcntl
    import pty
    import select
    import termios
    import tty
    pid, master = pty.fork()
    if pid == 0:
        try:
            become()
        except OSError as e:
            print(f"privtmpctl: cannot become the job's user: {e.strerror}", file=sys.stderr)
            os._exit(1)
        _exec(cmd)
    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        pass
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    inputs = [master, 0]
    try:
        while True:
            ready, _, _ = select.select(inputs, [], [])
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:         # EIO: the other side is closed
                    data = b""
                if not data:
                    break
                os.write(1, data)
            if 0 in ready:
                data = os.read(0, 65536)
                if data:
                    os.write(master, data)
                else:
                    inputs.remove(0)
    finally:
        termios.tcsetattr(0, termios.TCSAFLUSH, saved)
        os.close(master)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _become(uid, gid, user):
    """The job user's credentials: their groups when the name resolves,
    else their primary group only."""
    import pwd
    try:
        if user and pwd.getpwnam(user).pw_uid == uid:
            os.initgroups(user, gid)
        else:
            os.setgroups([gid])
    except KeyError:
        os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _exec(cmd: list) -> NoReturn:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"privtmpctl: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
        os._exit(1)


def _describe_cleanup(reply, dry):
    verb = "would " if dry else ""
    lines = []
    for j in reply.get("jobs", []):
        procs = j.get("killed") if not dry else j.get("processes")
        what = [f"state {j.get('state') or 'none'}", "pinned" if j.get("pinned") else "no pin"]
        if procs:
            what.append(f"{'killed' if not dry else 'would kill'} {len(procs)} process(es) {procs}")
        dirs = ", ".join(j.get("dirs") or []) or "no directory"
        lines.append(f"job {j['job']} ({j.get('user') or '-'}): {verb}tear down ({'; '.join(what)}), "
                     f"{verb}remove {dirs}: {j['reason']}")
    for o in reply.get("orphans", []):
        lines.append(f"{o['path']}: {verb}remove: {o['reason']}")
    for j in reply.get("skipped", []):
        lines.append(f"job {j['job']}: left alone: {j['reason']}")
    return lines


def cmd_cleanup(cfg, args):
    if args.job is not None and args.orphans:
        raise CtlError("give either a JOB or --orphans, not both", EXIT_USAGE)
    if args.job is None and not args.orphans:
        raise CtlError("nothing to do: give a JOB to tear down, or --orphans to sweep what no live job owns",
                       EXIT_USAGE)
    _need_root()
    msg = {"op": "cleanup", "dry_run": args.dry_run}
    if args.job is not None:
        msg["job"] = str(args.job)
    reply = _ask(cfg, msg)
    if args.json:
        _print_json(reply)
    else:
        lines = _describe_cleanup(reply, args.dry_run)
        for line in lines:
            print(line)
        if not lines:
            print(f"nothing to clean up{f' for job {args.job}' if args.job is not None else ''}")
    removing = reply.get("jobs") or reply.get("orphans")
    if not args.dry_run and removing and (args.wait or (sys.stderr.isatty() and not args.json)):
        _wait_removals(cfg)


def _wait_removals(cfg, timeout=None):
    progress = Progress()
    t0 = time.monotonic()
    while True:
        st = _ask(cfg, {"op": "status"})
        left = st["removals_queued"] + st["removals_running"]
        if not left:
            progress.done("removal finished" if progress.enabled else "")
            return
        progress.show(f"removing: {left} director{'y' if left == 1 else 'ies'} left, "
                      f"{time.monotonic() - t0:.0f} s", force=True)
        time.sleep(0.2)


def cmd_config_check(cfg, args):
    config.check_filesystem(cfg)
    if args.json:
        # (warnings: kept in the JSON for scripts that read it; every
        # problem check_filesystem finds is an error.)
        return _print_json({"source": cfg.source, "valid": True, "warnings": [], "base": cfg.base,
                            "mounts": list(cfg.mounts), "rundir": cfg.rundir, "socket": cfg.socket_path,
                            "mode": oct(cfg.mode), "shm": cfg.shm or "no", "tmpdir": cfg.tmpdir_value,
                            "remove_workers": cfg.remove_workers, "kill_timeout": cfg.kill_timeout,
                            "count_bytes": cfg.count_bytes, "limit": cfg.limit or None,
                            "limit_reserve": cfg.limit_reserve,
                            "metrics_dir": cfg.metrics_dir or None, **mountopts.config_json(cfg)})
    print(f"{cfg.source}: OK: base={cfg.base} mounts={','.join(cfg.mounts)} rundir={cfg.rundir} "
          f"mode={cfg.mode:04o} shm={cfg.shm or 'no'} tmpdir={cfg.tmpdir_value}"
          + "".join(f" mount_options={m}:{','.join(o)}" for m, o in cfg.mount_options)
          + "".join(f" tmpfs={m}:{size}" for m, size in cfg.tmpfs) + (" sbcast=yes" if cfg.sbcast else "")
          + f" host_leftovers={cfg.host_leftovers}")


def cmd_slurm_config(cfg, args):
    so = spank_path()
    prolog, epilog = hook_path("prolog"), hook_path("epilog")
    wrapped = cfg.socket_path != DEFAULT_SOCKET
    if args.json:
        return _print_json({"prolog": prolog, "epilog": epilog, "plugstack": plugstack_line(cfg), "spank": so,
                            "socket": cfg.socket_path, "needs_wrapper": wrapped})
    print("# slurm.conf")
    if wrapped:
        # Slurm runs the Prolog and Epilog without arguments: a socket other
        # than the default needs a one-line wrapper.
        print(f"# privtmpd listens on {cfg.socket_path}, not {DEFAULT_SOCKET}: run the hooks from")
        print("# wrappers, e.g. /etc/slurm/privtmpd-prolog.sh and /etc/slurm/privtmpd-epilog.sh:")
        print(f"#   #!/bin/sh\n#   exec {prolog} --socket {cfg.socket_path}")
        print(f"#   #!/bin/sh\n#   exec {epilog} --socket {cfg.socket_path}")
        print("Prolog=/etc/slurm/privtmpd-prolog.sh")
        print("Epilog=/etc/slurm/privtmpd-epilog.sh")
    else:
        print(f"Prolog={prolog}")
        print(f"Epilog={epilog}")
    print("# plugstack.conf (every node, and submit hosts: srun/sbatch load it too)")
    print(plugstack_line(cfg))
    from .install import LIBEXEC_DIR
    for kind, path in (("prolog", prolog), ("epilog", epilog)):
        stable = f"{LIBEXEC_DIR}/{kind}"
        if path != stable and os.path.lexists(stable):
            print(f"# note: {stable} belongs to another installation of privtmpd than this privtmpctl "
                  f"({path}); run the privtmpctl of the installation slurm.conf should use", file=sys.stderr)
    if not so:
        print("# note: the entry helper is not built here; install libslurm-dev (or slurm-devel) and gcc, "
              "then reinstall privtmpd (or make -C spank install)", file=sys.stderr)


def cmd_install(cfg_path, args):
    from .install import InstallError, install, uninstall
    try:
        actions = uninstall(args.root) if args.uninstall else install(args.root, with_spank=not args.no_spank)
    except InstallError as e:
        raise CtlError(str(e)) from None
    if args.json:
        return _print_json({"files": [{"path": p, "action": a} for p, a in actions]})
    for path, what in actions:
        print(f"{what:>9}  {args.root}{path}")
    if not args.uninstall:
        print("next: privtmpctl slurm-config prints the slurm.conf and plugstack.conf lines; "
              "systemctl daemon-reload && systemctl enable --now privtmpd")


def cmd_doctor(cfg_path, args):
    from .doctor import FAIL, WARN, run_checks
    results = run_checks(cfg_path, args.slurm_conf)
    bad = [r for r in results if r.status == FAIL]
    warned = [r for r in results if r.status == WARN]
    if args.json:
        _print_json({"ok": not bad, "problems": len(bad), "warnings": len(warned),
                     "checks": [r.__dict__ for r in results]})
    elif args.quiet:
        # One line per problem, nothing else: Node Health Check puts the
        # first line into the node's drain reason.
        for r in bad:
            print(f"privtmpd: {r.name}: {r.detail} (fix: {r.fix})")
    else:
        for r in results:
            print(f"[{r.status:^4}] {r.name}: {r.detail}")
            if r.fix:
                print(f"       fix: {r.fix}")
        print(f"\n{len(bad)} problem(s), {len(warned)} warning(s)")
    if bad:
        raise CtlError("", EXIT_FAIL)


def build_parser():
    # argparse exits 2 on a usage error, as documented.
    p = argparse.ArgumentParser(prog="privtmpctl",
                                description="Inspect and manage privtmpd's per-job private directories on "
                                            "this node.",
                                epilog="Exit codes: 0 ok, 1 failure or problem found, 2 usage error, 3 daemon "
                                       "unreachable.  See privtmpctl(8).")
    p.add_argument("--config", default=config.DEFAULT_PATH, metavar="FILE",
                   help="privtmpd's configuration file (default %(default)s)")
    p.add_argument("--version", action="version", version=f"privtmpctl {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    def add(parent, name, func, text, json_opt=True):
        sp = parent.add_parser(name, help=text, description=text)
        sp.set_defaults(func=func)
        if json_opt:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    add(sub, "status", cmd_status, "daemon state, configuration in force, counts, free space")
    sp = add(sub, "list", cmd_list, "every job namespace on this node: job, restart count, user, age, size, "
             "processes inside")
    sp.add_argument("--no-usage", action="store_true", help="do not measure disk usage (fast on huge trees)")
    sp.add_argument("--kept", action="store_true", help="directories of failed jobs kept for debugging "
                    "(keep_failed=), their owners and when they expire")
    sp = add(sub, "show", cmd_show, "one job's namespace in detail")
    sp.add_argument("job", type=_job_arg, metavar="JOB", help="Slurm job id")
    sp = add(sub, "enter", cmd_enter, "run a shell or a command inside a job's mount namespace (the job's "
             "/tmp); exits with the command's status", json_opt=False)
    sp.add_argument("job", type=_job_arg, metavar="JOB", help="Slurm job id")
    sp.add_argument("--user", action="store_true", help="run as the job's user (uid, gid and groups), not root: "
                    "the safe way to look at the user's files")
    sp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD",
                    help="command and arguments (default: $SHELL)")
    sp = add(sub, "cleanup", cmd_cleanup, "tear down one job now, or remove what no live job owns, saying what "
             "and why")
    sp.add_argument("job", nargs="?", type=_job_arg, metavar="JOB", help="job to tear down (kills what is left "
                    "inside)")
    sp.add_argument("--orphans", action="store_true", help="remove job directories, state and pins that no live "
                    "job owns (never touches a live job)")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be removed and why")
    sp.add_argument("--wait", action="store_true", help="wait until the background removal has finished")
    sp = add(sub, "doctor", cmd_doctor, "check this node's setup; exit 1 if something is wrong (for Node "
             "Health Check)")
    sp.add_argument("--quiet", "-q", action="store_true", help="print only problems, one line each")
    sp.add_argument("--slurm-conf", metavar="FILE", help="slurm.conf to check (default: $SLURM_CONF, "
                    "/etc/slurm/slurm.conf or slurmd's configless cache)")
    sp.set_defaults(needs_config=False)
    sp = sub.add_parser("config", help="configuration file commands",
                        description="configuration file commands")
    csub = sp.add_subparsers(dest="config_cmd", metavar="SUBCOMMAND")
    csub.required = True
    add(csub, "check", cmd_config_check, "validate the configuration file against this system")
    add(sub, "slurm-config", cmd_slurm_config, "print the slurm.conf and plugstack.conf lines for this "
        "installation")
    sp = add(sub, "install", cmd_install, "from a virtualenv (/opt/privtmpd): put launchers for the daemon, "
             "the CLI and the hooks, the entry helper and the unit at the stable paths the .deb and the RPM "
             "use; never overwrites a file it did not write")
    sp.add_argument("--no-spank", action="store_true", help="without the entry helper (not built: no "
                    "libslurm-dev/slurm-devel when pip ran)")
    sp.add_argument("--uninstall", action="store_true", help="remove what privtmpctl install wrote (and "
                    "nobody changed since); the configuration stays")
    sp.add_argument("--root", default="", metavar="DIR", help="install into the root filesystem at DIR "
                    "(an image being built) instead of /")
    sp.set_defaults(needs_config=False)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    try:
        if getattr(args, "needs_config", True):
            args.func(config.load(args.config), args)
        else:
            args.func(args.config, args)
    except CtlError as e:
        if str(e):
            print(f"privtmpctl: {e}", file=sys.stderr)
        return e.code
    except (config.ConfigError, names.BadName) as e:
        print(f"privtmpctl: {e}", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        from .logfmt import describe
        print(f"privtmpctl: {describe(e)}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""privtmpctl: the admin's view of privtmpd on one node.

Exit codes: 0 success; 1 the operation failed or `doctor` found a problem;
2 bad usage; 3 the daemon cannot be reached.  Errors become one-line
messages in main() only.
"""

import argparse
import json
import os
import stat
import sys
import time

from . import __version__, config, kernel, names, safefs
from .client import ClientError, request

EXIT_FAIL, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
_SRC_TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CtlError(Exception):
    def __init__(self, message, code=EXIT_FAIL):
        super().__init__(message)
        self.code = code


# --- where things are installed -------------------------------------------

def hook_path(kind):
    """Absolute path of the Prolog/Epilog script of this installation."""
    try:
        from . import hooks
        here = os.path.dirname(os.path.abspath(hooks.__file__))
    except ImportError:
        here = os.path.join(_SRC_TOP, "scripts")     # running from a source checkout
    return os.path.join(here, f"{kind}.py")


def spank_path():
    for cand in (os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "privtmpd_spank.so"),
                 os.path.join(_SRC_TOP, "spank", "privtmpd_spank.so"),
                 "/usr/lib64/privtmpd/privtmpd_spank.so", "/usr/lib/privtmpd/privtmpd_spank.so",
                 "/usr/local/lib/privtmpd/privtmpd_spank.so"):
        if os.path.exists(cand):
            return cand
    return None


def plugstack_line(cfg, so=None):
    args = f"rundir={cfg.rundir} tmpdir={cfg.tmpdir_value}"
    return f"required {so or spank_path() or '/usr/lib64/privtmpd/privtmpd_spank.so'} {args}"


# --- helpers ---------------------------------------------------------------

def _ask(cfg, msg):
    try:
        reply = request(msg, cfg.socket_path, timeout=120, retry=0)
    except ClientError as e:
        raise CtlError(str(e), EXIT_UNREACHABLE) from None
    if not reply.get("ok"):
        raise CtlError(reply.get("error", "privtmpd refused the request"))
    return reply


def _human(n):
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _age(t):
    s = max(0, int(time.time() - t))
    return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m" \
        if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def tree_usage(path, limit=2_000_000):
    """(bytes, entries) under path, walked fd-relative without following
    symlinks or crossing mounts (the same rules as removal)."""
    try:
        top = safefs.open_dir(path)
    except OSError:
        return 0, 0
    total, count, stack = 0, 0, [top]
    try:
        while stack and count < limit:
            fd = stack.pop()
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        count += 1
                        try:
                            st = e.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        total += st.st_blocks * 512
                        if stat.S_ISDIR(st.st_mode):
                            try:
                                stack.append(safefs._open_child_dir(fd, e.name))
                            except OSError:
                                pass
            finally:
                os.close(fd)
    finally:
        for fd in stack:
            os.close(fd)
    return total, count


def _table(rows, headers):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def _print_json(obj):
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    print()


# --- commands --------------------------------------------------------------

def cmd_status(cfg, args):
    st = _ask(cfg, {"op": "status"})
    vfs = os.statvfs(cfg.base_parent)
    st["base_free_bytes"] = vfs.f_bavail * vfs.f_frsize
    st["base_size_bytes"] = vfs.f_blocks * vfs.f_frsize
    st["base_free_inodes"] = vfs.f_favail
    if args.json:
        return _print_json(st)
    c = st["config"]
    print(f"privtmpd {st['version']} running, pid {st['pid']}, up {_age(time.time() - st['uptime'])}")
    print(f"config:   {c['source']}")
    print(f"base:     {c['base']}.<job>.<restart>   mounts: {' '.join(c['mounts'])}   shm: {c['shm']}")
    print(f"jobs:     {st['jobs']} active; removals: {st['removals_running']} running, {st['removals_queued']} queued")
    print(f"disk:     {_human(st['base_free_bytes'])} free of {_human(st['base_size_bytes'])} "
          f"on {cfg.base_parent}, {st['base_free_inodes']} inodes free")


def _jobs(cfg, op, job=None):
    msg = {"op": op}
    if job is not None:
        msg["job"] = str(job)
    reply = _ask(cfg, msg)
    for j in reply["jobs"]:
        j["bytes"], j["entries"] = tree_usage(j["dir"]) if j.get("dir") else (0, 0)
    return reply


def cmd_list(cfg, args):
    reply = _jobs(cfg, "list")
    if args.json:
        return _print_json(reply)
    rows = [[j.get("job"), j.get("restart", "-"), j.get("user") or j.get("uid", "-"),
             _age(j["created"]) if j.get("created") else "-", _human(j["bytes"]), j["entries"],
             len(j["processes"]), j.get("state", "?") + ("" if j["pinned"] else " (no pin!)")]
            for j in reply["jobs"]]
    _table(rows, ["JOB", "RESTART", "USER", "AGE", "SIZE", "FILES", "PROCS", "STATE"])
    if reply["removals"]:
        print(f"\nbeing removed: {len(reply['removals'])} director{'y' if len(reply['removals']) == 1 else 'ies'}")


def cmd_show(cfg, args):
    reply = _jobs(cfg, "show", args.job)
    j = reply["jobs"][0]
    if args.json:
        return _print_json(j)
    for key in ("job", "restart", "user", "uid", "gid", "state", "pinned", "dir", "mounts", "shm"):
        print(f"{key + ':':10}{j.get(key)}")
    print(f"{'pin:':10}{names.pin_path(cfg.rundir, j['job'])}")
    print(f"{'created:':10}{time.ctime(j['created'])} ({_age(j['created'])} ago)" if j.get("created") else "")
    print(f"{'usage:':10}{_human(j['bytes'])} in {j['entries']} entries")
    print(f"{'procs:':10}{' '.join(map(str, j['processes'])) or 'none'}")


def cmd_enter(cfg, args):
    """setns into the job's pinned namespace and exec a command, like
    nsenter --mount=PIN.  Python is single-threaded here, which setns needs."""
    job = names.parse_job_id(args.job)
    pin = names.pin_path(cfg.rundir, job)
    try:
        fd = os.open(pin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CtlError(f"job {job} has no namespace on this node ({pin} missing)") from None
    if kernel.ns_type(fd) != kernel.CLONE_NEWNS:
        raise CtlError(f"{pin} is not a pinned mount namespace (stale pin); try privtmpctl cleanup {job}")
    kernel.setns(fd, kernel.CLONE_NEWNS, pin)
    os.close(fd)
    os.chdir("/")
    cmd = args.command or [os.environ.get("SHELL") or "/bin/sh"]
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        raise CtlError(f"cannot run {cmd[0]}: {e.strerror}") from None


def cmd_cleanup(cfg, args):
    if args.job is not None and args.orphans:
        raise CtlError("give either a JOB or --orphans", EXIT_USAGE)
    if args.job is None and not args.orphans:
        raise CtlError("nothing to do: give a JOB to tear down, or --orphans to sweep "
                       "directories that no running job owns", EXIT_USAGE)
    msg = {"op": "cleanup", "dry_run": args.dry_run}
    if args.job is not None:
        msg["job"] = str(names.parse_job_id(args.job))
    reply = _ask(cfg, msg)
    if args.json:
        return _print_json(reply)
    if args.dry_run:
        for w in reply.get("would_destroy", []):
            print(f"would tear down job {w['job']} (state {w['state']}, pinned {w['pinned']})")
        for o in reply.get("orphans", []):
            print(f"would remove {o}: no running job owns it")
        if not reply.get("would_destroy") and not reply.get("orphans"):
            print("nothing to clean up")
        return
    for d in reply.get("destroyed", []):
        print(f"job {d['job']}: unpinned={d['unpinned']} killed={d['killed']} removing={d['dirs']}")
    if "queued" in reply:
        print(f"{reply['queued']} orphaned director{'y' if reply['queued'] == 1 else 'ies'} queued for removal")
        if sys.stdout.isatty() and reply["queued"]:
            _progress(cfg)


def _progress(cfg):
    while True:
        st = _ask(cfg, {"op": "status"})
        left = st["removals_queued"] + st["removals_running"]
        sys.stdout.write(f"\rremoving: {left} left   ")
        sys.stdout.flush()
        if not left:
            print("\rremoval finished      ")
            return
        time.sleep(0.5)


def cmd_config_check(cfg, args):
    warnings = config.check_filesystem(cfg)
    for w in warnings:
        print(f"warning: {w}")
    print(f"{cfg.source}: OK: base={cfg.base} mounts={','.join(cfg.mounts)} "
          f"rundir={cfg.rundir} mode={oct(cfg.mode)} shm={cfg.shm or 'no'} tmpdir={cfg.tmpdir_value}")


def cmd_slurm_config(cfg, args):
    print("# slurm.conf")
    print(f"Prolog={hook_path('prolog')}")
    print(f"Epilog={hook_path('epilog')}")
    print("# plugstack.conf (every node, and submit hosts: srun/sbatch load it too)")
    print(plugstack_line(cfg))
    if not spank_path():
        print("# note: the entry helper is not built here; install libslurm-dev and gcc, "
              "then reinstall privtmpd (or run make -C spank install)", file=sys.stderr)


def cmd_doctor(cfg, args):
    from .doctor import run_checks
    results = run_checks(cfg)
    bad = [r for r in results if r.status == "FAIL"]
    if args.json:
        _print_json([r.__dict__ for r in results])
    else:
        for r in results:
            if args.quiet and r.status == "ok":
                continue
            print(f"[{r.status:4}] {r.name}: {r.detail}")
            if r.fix and r.status != "ok":
                print(f"       fix: {r.fix}")
        if not args.quiet:
            print(f"\n{len(bad)} problem(s), {sum(r.status == 'warn' for r in results)} warning(s)")
    if bad:
        raise CtlError(f"{len(bad)} problem(s) found" if args.quiet else "", EXIT_FAIL)


def build_parser():
    p = argparse.ArgumentParser(prog="privtmpctl", description="Inspect and manage privtmpd's per-job private "
                                "directories on this node.")
    p.add_argument("--config", default=config.DEFAULT_PATH, help="configuration file (default %(default)s)")
    p.add_argument("--version", action="version", version=f"privtmpctl {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    def add(name, func, help_text):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(func=func)
        return sp

    for name, func, text in (("status", cmd_status, "daemon state, configuration in force, counts, free space"),
                             ("list", cmd_list, "every job namespace on this node")):
        add(name, func, text).add_argument("--json", action="store_true", help="machine-readable output")
    sp = add("show", cmd_show, "one job's namespace in detail")
    sp.add_argument("job")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add("enter", cmd_enter, "run a shell or command inside a job's namespace (root)")
    sp.add_argument("job")
    sp.add_argument("command", nargs=argparse.REMAINDER, help="command (after --); default $SHELL")
    sp = add("cleanup", cmd_cleanup, "tear down one job, or remove what no running job owns")
    sp.add_argument("job", nargs="?")
    sp.add_argument("--orphans", action="store_true", help="remove job directories without a live namespace")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be removed and why")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = add("doctor", cmd_doctor, "check this node's setup; exit 1 if something is wrong (NHC friendly)")
    sp.add_argument("--quiet", "-q", action="store_true", help="print only problems")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = sub.add_parser("config", help="configuration commands")
    csub = sp.add_subparsers(dest="config_cmd", metavar="SUBCOMMAND")
    csub.required = True
    csub.add_parser("check", help="validate the configuration file").set_defaults(func=cmd_config_check)
    add("slurm-config", cmd_slurm_config, "print the slurm.conf and plugstack.conf lines for this installation")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    try:
        cfg = config.load(args.config)
        args.func(cfg, args)
    except CtlError as e:
        if str(e):
            print(f"privtmpctl: {e}", file=sys.stderr)
        return e.code
    except (config.ConfigError, names.BadName) as e:
        print(f"privtmpctl: {e}", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:
        return 0
    except PermissionError as e:
        print(f"privtmpctl: {e.strerror}: {e.filename or ''} (run as root)", file=sys.stderr)
        return EXIT_FAIL
    except OSError as e:
        print(f"privtmpctl: {e}", file=sys.stderr)
        return EXIT_FAIL
    return 0


if __name__ == "__main__":
    sys.exit(main())

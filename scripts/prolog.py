#!/usr/bin/python3 -IS
"""Slurm Prolog and Epilog: have privtmpd build, or tear down, this job's
private directories.  epilog.py is this same file (a symlink, or a copy in
an installed wheel): the name it was run under says which hook it is.

Runs as root, child of slurmd, with no PATH and an environment made by
slurmd.  -I ignores PYTHON* variables and the user site; -S skips site
(10-40 ms per job).  Without site the package is found next to this file:
<site-packages>/privtmpd/hooks/ when installed, or the source checkout.
"""
import sys


def _chain(path):
    """path, then each path its symlinks lead to (at most 40).  os is not
    imported: under -S nothing has loaded it yet, and it would cost every
    job 1 ms; ".." in a target is resolved by the kernel."""
    import posix
    for _ in range(40):
        yield path
        try:
            target = posix.readlink(path)
        except OSError:
            return
        head, sep, _ = path.rpartition("/")
        path = target if target.startswith("/") else head + sep + target


def _find_package():
    # A symlinked hook (/usr/libexec/privtmpd/) is followed to the
    # installed file: the package is next to it.
    import posix
    *_, path = _chain(__file__)
    head, sep, _ = path.rpartition("/")
    here = (head or "/") if sep else "."
    for up in (here + "/..", here + "/../.."):
        try:
            if posix.stat(up + "/privtmpd/client.py").st_mode & 0o170000 == 0o100000:
                sys.path.insert(0, up)
                return
        except OSError:
            pass


def _kind():
    # slurmd says which hook this is (SLURM_SCRIPT_CONTEXT); an Epilog run
    # as a Prolog would build a namespace at job end that nothing tears
    # down.  Without it (run by hand), the first name in the symlink chain
    # that says prolog or epilog: /etc/slurm/epilog.d/50-privtmpd ->
    # /usr/libexec/privtmpd/epilog is the Epilog.  A context of another
    # Slurm version that is not the controller's also falls back to that.
    import posix
    ctx = posix.environ.get(b"SLURM_SCRIPT_CONTEXT", b"")
    if ctx in (b"prolog_slurmd", b"epilog_slurmd"):
        return ctx[:6].decode()
    if ctx.endswith(b"_slurmctld"):
        sys.exit(f"privtmpd: SLURM_SCRIPT_CONTEXT={ctx.decode(errors='replace')!r}: this is the slurmd "
                 f"Prolog/Epilog (Prolog= and Epilog= in slurm.conf), not a PrologSlurmctld or task hook")
    for path in _chain(__file__):
        name = path.rpartition("/")[2]
        if name.startswith(("prolog", "epilog")):
            return name[:6]
    sys.exit(f"privtmpd: cannot tell Prolog from Epilog: no name in {__file__}'s symlink chain starts "
             f"with prolog or epilog, and SLURM_SCRIPT_CONTEXT is not set")


_find_package()
from privtmpd.client import exit_hook, run_hook  # noqa: E402

exit_hook(run_hook(_kind()))

"""Where this installation's pieces are: the Prolog/Epilog hooks, the entry
helper, the plugstack.conf line that loads it.  Used by `privtmpctl
slurm-config` and `doctor`, which before this module imported each other."""

import os

_SRC_TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Stable locations that packages (see packaging/privtmpd.spec) give the hooks
# and the entry helper, so slurm.conf and plugstack.conf survive a Python
# upgrade that moves site-packages.
LIBEXEC_DIRS = ("/usr/libexec/privtmpd",)
SPANK_DIRS = ("/usr/lib64/privtmpd", "/usr/lib/privtmpd", "/usr/local/lib/privtmpd")


def _package_hook(kind):
    try:
        from . import hooks     # type: ignore[attr-defined]  # scripts/, installed as privtmpd.hooks
        here = os.path.dirname(os.path.abspath(hooks.__file__))
    except ImportError:
        here = os.path.join(_SRC_TOP, "scripts")     # running from a source checkout
    return os.path.join(here, f"{kind}.py")


def hook_path(kind):
    """Absolute path of the Prolog/Epilog script of this installation."""
    pkg = _package_hook(kind)
    for d in LIBEXEC_DIRS:
        cand = os.path.join(d, f"{kind}.py")
        if os.path.exists(cand) and os.path.realpath(cand) == os.path.realpath(pkg):
            return cand
    return pkg


def spank_path():
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in ([os.path.join(d, "privtmpd_spank.so") for d in SPANK_DIRS]
                 + [os.path.join(here, "lib", "privtmpd_spank.so"),
                    os.path.join(_SRC_TOP, "spank", "privtmpd_spank.so")]):
        if os.path.exists(cand):
            return cand
    return None


def plugstack_line(cfg, so=None):
    args = f"rundir={cfg.rundir} tmpdir={cfg.tmpdir_value}"
    return f"required {so or spank_path() or '/usr/lib64/privtmpd/privtmpd_spank.so'} {args}"

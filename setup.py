"""Build script: metadata lives in setup.cfg.

The only custom step compiles the SPANK entry helper (spank/privtmpd_spank.c)
into the package when Slurm's headers are installed (libslurm-dev on
Debian/Ubuntu, slurm-devel on RHEL-like systems), so that one install
command gives the daemon, the CLI, the hooks and the helper.  Set
PRIVTMPD_NO_SPANK=1 to skip it (e.g. on submit-only hosts that get the .so
from a package).
"""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
SPANK_SRC = os.path.join("spank", "privtmpd_spank.c")
PAM_SRC = os.path.join("pam", "pam_privtmpd.c")
HEADER_DIRS = ("/usr/include", "/usr/local/include")


def _have_spank_header():
    return any(os.path.exists(os.path.join(d, "slurm", "spank.h")) for d in HEADER_DIRS)


class BuildPyWithSpank(build_py):
    def run(self):
        super().run()
        # build_py copies without modes; Slurm executes the hooks directly.
        for hook in ("prolog.py", "epilog.py"):
            path = os.path.join(self.build_lib, "privtmpd", "hooks", hook)
            if os.path.exists(path):
                os.chmod(path, 0o755)
        if os.environ.get("PRIVTMPD_NO_SPANK") == "1":
            return
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not (_have_spank_header() and cc):
            self.announce("privtmpd: slurm/spank.h or a C compiler is missing: the entry helper "
                          "is not built (install libslurm-dev/slurm-devel and gcc)", level=3)
            return
        out = os.path.join(self.build_lib, "privtmpd", "lib", "privtmpd_spank.so")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.check_call([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                               "-o", out, os.path.join(HERE, SPANK_SRC)])
        # The PAM session module for ssh sessions adopted into a job
        # (docs/features.md), when the PAM headers are there too.
        if any(os.path.exists(os.path.join(d, "security", "pam_modules.h")) for d in HEADER_DIRS):
            subprocess.check_call([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                                   "-o", os.path.join(os.path.dirname(out), "pam_privtmpd.so"),
                                   os.path.join(HERE, PAM_SRC), "-lpam"])


class BinaryDistribution(Distribution):
    """The wheel carries a compiled .so: tag it for this platform."""

    def has_ext_modules(self):
        return _have_spank_header() and os.environ.get("PRIVTMPD_NO_SPANK") != "1"


setup(cmdclass={"build_py": BuildPyWithSpank}, distclass=BinaryDistribution)

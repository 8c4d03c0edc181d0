"""README.md's "Installing on a cluster", executed literally: every shell
block marked `<!-- install-test: NAME ... -->` runs as written, the build in
a copy of the checkout, the node commands as root on a clean Debian 12
(tests/installroot.py), so the instructions cannot rot.  apt-get is told
yes (APT_CONFIG) as an admin at a terminal would answer."""

import json
import os
import re
import subprocess

import pytest

from cli import PKG_WORK, source_copy
from harness import REPO
from installroot import DebianRoot, RootError

REQUIRE = os.environ.get("PRIVTMPD_REQUIRE_PRIVILEGED") == "1"
JOB_ENV = {"SLURM_JOB_ID": "7", "SLURM_JOB_UID": "65534", "SLURM_JOB_GID": "65534"}
SRC_INSIDE = "/usr/src/privtmpd"      # where the README's venv block expects the checkout


def skip_or_fail(reason):
    if REQUIRE:
        pytest.fail(f"{reason} (PRIVTMPD_REQUIRE_PRIVILEGED=1)")
    pytest.skip(reason)


def readme_blocks():
    """{name: shell text} of the marked blocks."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    blocks = {}
    for m in re.finditer(r"<!-- install-test: ([\w-]+)[^>]*-->\n```sh\n(.*?)```", text, re.S):
        assert m.group(1) not in blocks, f"two README blocks named {m.group(1)}"
        blocks[m.group(1)] = m.group(2)
    return blocks


def test_readme_marks_the_install_blocks():
    blocks = readme_blocks()
    assert set(blocks) == {"deb-build", "deb", "venv"}, set(blocks)
    assert "privtmpctl install" in blocks["venv"] and "python3 -m venv /opt/privtmpd" in blocks["venv"]
    assert "apt-get install ./dist/" in blocks["deb"]
    # Nothing that would only work on the machine that wrote the README.
    for name, block in blocks.items():
        assert "sed " not in block and "python3." not in block, (name, block)


@pytest.fixture(scope="module")
def checkout_with_deb():
    """A copy of the checkout after the README's build block ran in it."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (a clean Debian 12 root filesystem in mount namespaces)")
    for header in ("slurm/spank.h", "security/pam_modules.h"):
        if not os.path.exists(f"/usr/include/{header}"):
            skip_or_fail(f"/usr/include/{header} is missing (apt-get install libslurm-dev libpam0g-dev)")
    src = source_copy(os.path.join(PKG_WORK, f"readme-src-{os.getpid()}"))
    # source_copy copies files, not git metadata; build-deb.sh lists the
    # checkout's files with git.
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run(["git", "add", "-A"], cwd=src, check=True)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_blocks()["deb-build"]], cwd=src,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    yield src
    subprocess.run(["rm", "-rf", src], check=False)


@pytest.fixture
def node(request):
    try:
        root = DebianRoot(os.path.join(PKG_WORK, f"readme-root-{os.getpid()}"))
    except RootError as e:
        skip_or_fail(str(e))
    with root:
        root.run("printf 'APT::Get::Assume-Yes \"true\";\\n' > /etc/apt/apt.conf.d/99yes-as-at-a-terminal")
        yield root


def run_block(node, name, cwd):
    return node.run("set -euo pipefail\n" + readme_blocks()[name], cwd=cwd, timeout=900)


def assert_stable_slurm_config(out):
    assert "Prolog=/usr/libexec/privtmpd/prolog\n" in out and "Epilog=/usr/libexec/privtmpd/epilog\n" in out, out
    assert "\nrequired /usr/lib/privtmpd/privtmpd_spank.so rundir=/run/privtmpd tmpdir=/tmp" in out, out


def hooks_work(node, job):
    env = dict(JOB_ENV, SLURM_JOB_ID=str(job))
    node.run("/usr/libexec/privtmpd/prolog", env=env)
    assert node.exists(f"/run/privtmpd/ns/{job}") and node.exists(f"/tmp/slurm.{job}.0/tmp")
    node.run("/usr/libexec/privtmpd/epilog", env=env)
    assert not node.exists(f"/run/privtmpd/ns/{job}")


@pytest.mark.root
@pytest.mark.slow
def test_readme_deb_install(checkout_with_deb, node):
    node.put(checkout_with_deb, "/xfer/src")
    out = run_block(node, "deb", "/xfer/src").stdout
    assert_stable_slurm_config(out)
    # Another installation's privtmpctl (the checkout's) prints its own
    # hooks and says that the stable paths belong to someone else.
    r = node.run("python3 -m privtmpd.ctl slurm-config", cwd="/xfer/src")
    assert "Prolog=/xfer/src/scripts/prolog.py\n" in r.stdout, r.stdout
    assert "# note: /usr/libexec/privtmpd/prolog belongs to another installation" in r.stderr, r.stderr
    node.run("/usr/sbin/privtmpd")
    node.wait_for("privtmpctl status >/dev/null", what="the daemon")
    hooks_work(node, 7)


@pytest.mark.root
@pytest.mark.slow
def test_readme_venv_install_and_recovery_after_the_venv_breaks(checkout_with_deb, node):
    node.put(checkout_with_deb, "/xfer/src")
    node.run(f"rm -rf /xfer/src/dist /xfer/src/build && cp -a /xfer/src {SRC_INSIDE}")
    assert node.run("python3 -m pip --version", check=False).returncode != 0     # no pip on the system
    out = run_block(node, "venv", "/root").stdout
    assert_stable_slurm_config(out)
    for path in ("/usr/sbin/privtmpd", "/usr/sbin/privtmpctl", "/usr/libexec/privtmpd/prolog",
                 "/usr/libexec/privtmpd/epilog", "/usr/lib/privtmpd/privtmpd_spank.so",
                 "/lib/systemd/system/privtmpd.service", "/etc/privtmpd/privtmpd.conf"):
        assert node.exists(path), path
    # The unit as shipped starts the launcher: no sed.
    assert "ExecStart=/usr/sbin/privtmpd --foreground" in node.run("cat /lib/systemd/system/privtmpd.service").stdout
    # Idempotent: a second run changes nothing.
    again = json.loads(node.run("/opt/privtmpd/bin/privtmpctl install --json").stdout)["files"]
    assert {f["action"] for f in again} == {"unchanged", "kept"}, again

    node.run("/usr/sbin/privtmpd")                      # the launcher, detached by python-daemon from PyPI
    node.wait_for("privtmpctl status >/dev/null", what="the daemon")
    hooks_work(node, 7)
    pid = node.run("cat /run/privtmpd.pid").stdout.strip()
    node.run(f"kill -TERM {pid}")
    node.wait_for(f"! test -e /proc/{pid}/status || grep -q '^State:.*Z' /proc/{pid}/status", what="daemon stop")

    # The virtualenv breaks as a Python upgrade breaks it (its lib/python3.X
    # no longer used): the stable launchers say what happened and what to do.
    node.run("mv /opt/privtmpd/lib /opt/privtmpd/lib.old")
    for argv, env in (("/usr/sbin/privtmpctl --version", {}), ("/usr/sbin/privtmpd --version", {}),
                      ("/usr/libexec/privtmpd/prolog", JOB_ENV)):
        r = node.run(argv, env=env, check=False)
        assert r.returncode == 1, (argv, r)
        assert "python3 -m venv --clear /opt/privtmpd" in r.stderr and "privtmpctl install" in r.stderr, r.stderr
    # ...and doing what they say repairs it, slurm.conf's paths unchanged.
    node.run(f"rm -rf /opt/privtmpd/lib.old && python3 -m venv --clear /opt/privtmpd && "
             f"/opt/privtmpd/bin/pip install -q {SRC_INSIDE} && /opt/privtmpd/bin/privtmpctl install", timeout=900)
    assert_stable_slurm_config(node.run("privtmpctl slurm-config").stdout)
    node.run("/usr/sbin/privtmpd")
    node.wait_for("privtmpctl status >/dev/null", what="the daemon")
    hooks_work(node, 8)

"""The .deb on a clean Debian 12 node (tests/installroot.py): installed with
apt (dependencies from the distribution), files at the stable paths,
slurm-config naming them, the Prolog and Epilog against the installed
daemon, an upgrade with a job running (its namespace, its directories and
its processes survive, the Epilog tears it down after), removed and
installed again with a job running, remove (conffile kept) and purge
(conffile gone)."""

import json
import os
import subprocess

import pytest

from cli import PKG_WORK
from harness import REPO
from installroot import DebianRoot, RootError
from privtmpd import __version__

REQUIRE = os.environ.get("PRIVTMPD_REQUIRE_PRIVILEGED") == "1"
pytestmark = [pytest.mark.root, pytest.mark.slow]

NEW = f"{__version__}+upgrade"
STABLE = {
    "/usr/sbin/privtmpd": "daemon",
    "/usr/sbin/privtmpctl": "CLI",
    "/usr/libexec/privtmpd/prolog": "Prolog",
    "/usr/libexec/privtmpd/epilog": "Epilog",
    "/usr/lib/privtmpd/privtmpd_spank.so": "entry helper",
    "/lib/systemd/system/privtmpd.service": "unit",
    "/etc/privtmpd/privtmpd.conf": "configuration",
}
JOB_ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_UID": "65534", "SLURM_JOB_GID": "65534", "SLURM_JOB_USER": "nobody"}


def skip_or_fail(reason):
    if REQUIRE:
        pytest.fail(f"{reason} (PRIVTMPD_REQUIRE_PRIVILEGED=1)")
    pytest.skip(reason)


def build_deb(out, version=None):
    for tool, pkg in (("dpkg-deb", "dpkg"), ("gcc", "gcc")):
        if not subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode == 0:
            skip_or_fail(f"{tool} is not installed (apt-get install {pkg})")
    if not os.path.exists("/usr/include/slurm/spank.h"):
        skip_or_fail("slurm/spank.h is missing (apt-get install libslurm-dev)")
    argv = [os.path.join(REPO, "tools", "build-deb.sh"), "--out", out]
    if version:
        argv += ["--version", version]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def debs():
    out = os.path.join(PKG_WORK, f"debs-{os.getpid()}")
    old = build_deb(out)
    new = build_deb(out, f"{NEW}-1")
    yield old, new
    subprocess.run(["rm", "-rf", out], check=False)


@pytest.fixture
def node():
    try:
        root = DebianRoot(os.path.join(PKG_WORK, f"deb-root-{os.getpid()}"))
    except RootError as e:
        skip_or_fail(str(e))
    with root:
        yield root


def start_daemon(node):
    # Detached, as init scripts start it: python3-daemon (a dependency the
    # .deb pulls from the distribution) does the detaching.
    node.run("/usr/sbin/privtmpd --config /etc/privtmpd/privtmpd.conf")
    node.wait_for("test -S /run/privtmpd/privtmpd.sock && privtmpctl status >/dev/null", what="the daemon")
    return int(node.run("cat /run/privtmpd.pid").stdout)


def stop_daemon(node, pid):
    """What systemctl stop does: SIGTERM to the daemon, checked by pid."""
    node.run(f"test \"$(cat /run/privtmpd.pid)\" = {pid} && kill -TERM {pid}")
    node.wait_for(f"! test -e /proc/{pid}/status || grep -q '^State:.*Z' /proc/{pid}/status",
                  what="the daemon to stop")


def test_deb_install_upgrade_remove_purge_on_a_clean_debian12(debs, node):
    old, new = (node.put(p, f"/xfer/{os.path.basename(p)}") for p in debs)
    assert node.run("dpkg -s python3-psutil", check=False).returncode != 0     # the root is clean

    # --- install with apt: the dependencies come from the distribution.
    node.run(f"apt-get install -y -q {old}")
    status = node.run("dpkg-query -W -f '${Status} ${Version}' privtmpd python3-psutil python3-daemon").stdout
    assert status.count("install ok installed") == 3 and f"{__version__}-1" in status
    listed = node.run("dpkg -L privtmpd").stdout.split()
    for path, what in STABLE.items():
        assert path in listed, (path, what)
    assert "/usr/lib/python3/dist-packages/privtmpd/daemon.py" in listed
    # Nothing in the package depends on the Python version.
    assert not [p for p in listed if "python3." in p], [p for p in listed if "python3." in p]
    assert node.run("cat /var/lib/dpkg/info/privtmpd.conffiles").stdout.split() == ["/etc/privtmpd/privtmpd.conf"]
    assert node.run("grep '^ExecStart=' /lib/systemd/system/privtmpd.service").stdout.startswith(
        "ExecStart=/usr/sbin/privtmpd --foreground --config /etc/privtmpd/privtmpd.conf")
    assert node.run("privtmpctl --version").stdout.strip() == f"privtmpctl {__version__}"
    assert node.run("head -c4 /usr/lib/privtmpd/privtmpd_spank.so | od -An -c").stdout.split() == ["177", "E", "L", "F"]

    # --- slurm-config names the stable paths.
    cfg = json.loads(node.run("privtmpctl slurm-config --json").stdout)
    assert cfg["prolog"] == "/usr/libexec/privtmpd/prolog" and cfg["epilog"] == "/usr/libexec/privtmpd/epilog"
    assert cfg["spank"] == "/usr/lib/privtmpd/privtmpd_spank.so"
    assert cfg["plugstack"].startswith("required /usr/lib/privtmpd/privtmpd_spank.so ")
    text = node.run("privtmpctl slurm-config").stdout
    assert "Prolog=/usr/libexec/privtmpd/prolog\n" in text and "Epilog=/usr/libexec/privtmpd/epilog\n" in text

    # --- the hooks against the installed daemon, with a job that keeps running.
    daemon = start_daemon(node)
    node.run("/usr/libexec/privtmpd/prolog", env=JOB_ENV)
    assert node.exists("/run/privtmpd/ns/42")
    assert node.run("stat -c %u /tmp/slurm.42.0/tmp").stdout.strip() == "65534"
    node.run("setsid nsenter --mount=/run/privtmpd/ns/42 -- sh -c 'echo alive > /tmp/marker; echo $$ > "
             "/run/job42.pid.tmp; mv /run/job42.pid.tmp /run/job42.pid 2>/dev/null; exec sleep 3600' "
             "</dev/null >/dev/null 2>&1 &")
    # /run inside the job is the node's /run (only /tmp and /var/tmp are private).
    node.wait_for("test -s /run/job42.pid", what="the job process")
    job_pid = node.run("cat /run/job42.pid").stdout.strip()
    assert node.run("cat /tmp/slurm.42.0/tmp/marker").stdout == "alive\n"
    assert not node.exists("/tmp/marker")                  # the node's /tmp is not the job's

    # --- upgrade with the job running: an admin's edit of the conffile
    # stays, the daemon is restarted as systemctl try-restart does, and the
    # job keeps its namespace, its files and its processes.
    node.run("echo '# edited by the admin' >> /etc/privtmpd/privtmpd.conf")
    node.run(f"apt-get install -y -q {new}")
    assert f"{NEW}-1" in node.run("dpkg-query -W -f '${Version}' privtmpd").stdout
    assert "# edited by the admin" in node.run("cat /etc/privtmpd/privtmpd.conf").stdout
    stop_daemon(node, daemon)
    assert node.exists("/run/privtmpd/ns/42")
    daemon = start_daemon(node)
    assert node.run("privtmpctl --version").stdout.strip() == f"privtmpctl {NEW}"
    listed = json.loads(node.run("privtmpctl list --json --no-usage").stdout)
    assert "42" in json.dumps(listed), listed
    assert node.run("nsenter --mount=/run/privtmpd/ns/42 -- cat /tmp/marker").stdout == "alive\n"
    assert node.exists(f"/proc/{job_pid}")
    # The Epilog of the upgraded package tears the job down: processes
    # killed, pin and directories gone.
    node.run("/usr/libexec/privtmpd/epilog", env=JOB_ENV)
    assert not node.exists("/run/privtmpd/ns/42")
    node.wait_for(f"! test -e /proc/{job_pid}/status || grep -q '^State:.*Z' /proc/{job_pid}/status",
                  what="the job's process to be killed")
    node.wait_for("! test -e /tmp/slurm.42.0", what="the job's directories to be removed")

    # --- removed with a job running, then installed again: the job's pin
    # and directories outlive the package, and the reinstalled daemon
    # serves its Epilog.
    env43 = dict(JOB_ENV, SLURM_JOB_ID="43")
    node.run("/usr/libexec/privtmpd/prolog", env=env43)
    node.run("echo kept > /tmp/slurm.43.0/tmp/file")
    stop_daemon(node, daemon)
    node.run("apt-get remove -y -q privtmpd")
    assert not node.exists("/usr/sbin/privtmpd")
    assert node.exists("/run/privtmpd/ns/43")
    assert node.run("nsenter --mount=/run/privtmpd/ns/43 -- cat /tmp/file").stdout == "kept\n"
    node.run(f"apt-get install -y -q {new}")
    daemon = start_daemon(node)
    assert "43" in json.dumps(json.loads(node.run("privtmpctl list --json --no-usage").stdout))
    node.run("/usr/libexec/privtmpd/epilog", env=env43)
    assert not node.exists("/run/privtmpd/ns/43")
    node.wait_for("! test -e /tmp/slurm.43.0", what="job 43's directories to be removed")

    # --- remove: code gone, conffile kept; purge: conffile gone.
    stop_daemon(node, daemon)
    node.run("apt-get remove -y -q privtmpd")
    assert "deinstall ok config-files" in node.run("dpkg-query -W -f '${Status}' privtmpd").stdout
    for path in STABLE:
        if path != "/etc/privtmpd/privtmpd.conf":
            assert not node.exists(path), path
    assert not node.exists("/usr/lib/python3/dist-packages/privtmpd")       # no __pycache__ left behind
    assert not node.exists("/usr/libexec/privtmpd") and not node.exists("/usr/lib/privtmpd")
    assert "# edited by the admin" in node.run("cat /etc/privtmpd/privtmpd.conf").stdout
    node.run("dpkg --purge privtmpd")
    assert not node.exists("/etc/privtmpd")
    assert node.run("dpkg-query -W privtmpd", check=False).returncode != 0

"""Packaging, for real: the systemd unit through systemd-analyze verify and
the notify protocol; the wheel (contents, metadata, an install into a
fresh virtualenv); the sdist; the RPM built with rpmbuild from the spec;
the man pages rendered without warnings and in step with the code."""

import configparser
import glob
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from cli import PKG_WORK, build_wheel, ctl, make_venv, pip_install, site_packages, source_copy, start_daemon
from harness import REPO
from privtmpd import __version__, config

UNIT = os.path.join(REPO, "systemd", "privtmpd.service")
SPEC = os.path.join(REPO, "packaging", "privtmpd.spec")
MAN = {"privtmpd.8": 8, "privtmpctl.8": 8, "privtmpd.conf.5": 5}
REQUIRE = os.environ.get("PRIVTMPD_REQUIRE_PRIVILEGED") == "1"


def need(tool, package):
    """Skip when a tool is missing, with the way to get it; in CI (which
    installs it through tools/bootstrap.sh) a missing tool is a failure."""
    path = shutil.which(tool) or (os.path.exists(f"/usr/sbin/{tool}") and f"/usr/sbin/{tool}")
    if not path:
        msg = f"{tool} is not installed (apt-get install {package})"
        if REQUIRE:
            pytest.fail(msg + " and PRIVTMPD_REQUIRE_PRIVILEGED=1")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def work():
    d = os.path.join(PKG_WORK, f"packaging-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(work):
    return build_wheel(source_copy(os.path.join(work, "src")), os.path.join(work, "wheels"))


@pytest.fixture(scope="module")
def man_tree(work):
    """The man pages laid out as a MANPATH directory."""
    top = os.path.join(work, "man")
    for page, section in MAN.items():
        os.makedirs(f"{top}/man{section}", exist_ok=True)
        shutil.copy(os.path.join(REPO, "man", page), f"{top}/man{section}/{page}")
    return top


# --- systemd ---------------------------------------------------------------

def unit_settings():
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str
    cp.read(UNIT)
    return cp


def test_unit_verifies(work, man_tree):
    need("systemd-analyze", "systemd")
    # Everything as shipped but the daemon's path: here it is the test
    # environment's console script rather than a package's /usr/bin.
    exe = os.path.join(os.path.dirname(sys.executable), "privtmpd")
    assert os.access(exe, os.X_OK), exe
    with open(UNIT) as f:
        text = f.read()
    assert text.count("ExecStart=/usr/sbin/privtmpd ") == 1
    copy = os.path.join(work, "privtmpd.service")
    with open(copy, "w") as f:
        f.write(text.replace("ExecStart=/usr/sbin/privtmpd ", f"ExecStart={exe} "))
    # verify also runs man(1) for each Documentation=man: page.
    r = subprocess.run(["systemd-analyze", "verify", copy], capture_output=True, text=True,
                       env=dict(os.environ, MANPATH=man_tree), timeout=120)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_unit_settings():
    cp = unit_settings()
    svc = cp["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["Restart"] == "on-failure"
    assert svc["ExecStart"].split()[1:] == ["--foreground", "--config", config.DEFAULT_PATH]
    assert svc["KillMode"] == "mixed" and svc["RuntimeDirectoryPreserve"] == "yes"
    assert svc["RuntimeDirectory"] == "privtmpd"
    assert "slurmd.service" in cp["Unit"]["Before"]
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    assert cp["Unit"]["Documentation"].split() == ["man:privtmpd(8)", "man:privtmpctl(8)", "man:privtmpd.conf(5)"]
    # Nothing that gives the service a mount namespace of its own.
    forbidden = {"PrivateTmp", "PrivateMounts", "PrivateDevices", "ProtectSystem", "ProtectHome",
                 "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
                 "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage",
                 "MountFlags", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                 "ProtectControlGroups", "ProtectProc", "ProcSubset", "ProtectHostname", "ProtectClock",
                 "DynamicUser", "MountAPIVFS", "PrivateUsers", "LogsDirectory", "StateDirectory"}
    for section in cp.sections():
        assert not forbidden & set(cp[section]), forbidden & set(cp[section])
    # ...and the unit says why, right there.
    with open(UNIT) as f:
        comments = " ".join(ln.lstrip("# ").strip() for ln in f if ln.startswith("#"))
    assert "mount namespace of its own" in comments and "host mount namespace" in comments


def test_type_notify_protocol(daemon_factory):
    """What systemd sees: READY=1 with the daemon's pid once the socket
    serves, STOPPING=1 on SIGTERM, a stop well within TimeoutStopSec."""
    for abstract in (False, True):
        d = daemon_factory(start=False, name=f"notify-{int(abstract)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"privtmpd-test-notify-{os.getpid()}"
            sock.bind("\0" + name)
            env_path = "@" + name
        else:
            env_path = f"{d.rundir}.notify"
            if os.path.exists(env_path):
                os.unlink(env_path)
            sock.bind(env_path)
        sock.settimeout(15)
        try:
            start_daemon(d, env={"NOTIFY_SOCKET": env_path})
            ready = sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in ready.splitlines())
            assert fields["READY"] == "1" and fields["MAINPID"] == str(d.proc.pid)
            assert d.socket in fields["STATUS"]
            assert d.create(301)["ok"]
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096).decode() == "STOPPING=1"
            assert d.proc.wait(15) == 0
            assert time.monotonic() - t0 < 5
            assert os.path.exists(d.pin(301))          # the job outlives the daemon
        finally:
            sock.close()
            if not abstract and os.path.exists(env_path):
                os.unlink(env_path)


# --- wheel and sdist -------------------------------------------------------

def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
        meta = z.read(f"privtmpd-{__version__}.dist-info/METADATA").decode()
        entry = z.read(f"privtmpd-{__version__}.dist-info/entry_points.txt").decode()
        so = z.read("privtmpd/lib/privtmpd_spank.so")
    # The hooks keep their exec bits: Slurm runs them directly.
    for hook in ("prolog", "epilog"):
        mode = infos[f"privtmpd/hooks/{hook}.py"].external_attr >> 16
        assert mode & 0o111 == 0o111, oct(mode)
    # The entry helper is built in, and the wheel is tagged for this platform.
    assert so[:4] == b"\x7fELF" and "linux" in os.path.basename(wheel)
    data = f"privtmpd-{__version__}.data/data/"
    for path in ("share/man/man8/privtmpd.8", "share/man/man8/privtmpctl.8", "share/man/man5/privtmpd.conf.5",
                 "share/privtmpd/systemd/privtmpd.service", "share/privtmpd/privtmpd.conf.example",
                 "share/privtmpd/admin-guide.md", "share/privtmpd/spank/privtmpd_spank.c",
                 "share/privtmpd/spank/trusted_dir.h", "share/privtmpd/spank/privtmpd_entry.h",
                 "share/privtmpd/spank/Makefile"):
        assert data + path in infos, path
    for mod in ("client", "config", "ctl", "daemon", "doctor", "kernel", "logfmt", "metrics", "names", "namespace",
                "protocol", "safefs"):
        assert f"privtmpd/{mod}.py" in infos
    assert "privtmpd = privtmpd.daemon:main" in entry and "privtmpctl = privtmpd.ctl:main" in entry
    headers = {}
    for line in meta.split("\n\n", 1)[0].splitlines():
        k, _, v = line.partition(": ")
        headers.setdefault(k, []).append(v)
    assert headers["Name"] == ["privtmpd"] and headers["Version"] == [__version__]
    assert headers["Requires-Python"] == [">=3.9"] and headers["License"] == ["GPL-2.0-or-later"]
    assert set(headers["Provides-Extra"]) == {"test", "bench"}
    deps = headers["Requires-Dist"]
    assert "psutil>=5.8" in deps and "python-daemon>=2.3" in deps
    assert any(d.startswith("pytest") and 'extra == "test"' in d for d in deps)
    assert any(d.startswith("matplotlib") and 'extra == "bench"' in d for d in deps)
    assert "Operating System :: POSIX :: Linux" in headers["Classifier"]
    assert headers["Summary"][0].startswith("Per-job private /tmp")


def test_wheel_installs_and_runs_in_a_fresh_virtualenv(wheel, work):
    venv = make_venv(os.path.join(work, "venv"))
    pip_install(venv, wheel)
    site = site_packages(venv)
    r = subprocess.run([f"{venv}/bin/privtmpctl", "--version"], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == f"privtmpctl {__version__}"
    r = subprocess.run([f"{venv}/bin/privtmpd", "--version"], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == f"privtmpd {__version__}"
    for page in ("man8/privtmpd.8", "man8/privtmpctl.8", "man5/privtmpd.conf.5"):
        assert os.path.exists(f"{venv}/share/man/{page}")
    assert os.path.exists(f"{venv}/share/privtmpd/systemd/privtmpd.service")
    # slurm-config points into the installation, at files that work.
    conf = os.path.join(work, "default.conf")
    with open(conf, "w") as f:
        f.write("base=/tmp/slurm\n")
    r = subprocess.run([f"{venv}/bin/privtmpctl", "--config", conf, "slurm-config", "--json"], capture_output=True,
                       text=True, cwd="/")
    paths = json.loads(r.stdout)
    assert paths["prolog"] == f"{site}/privtmpd/hooks/prolog.py" and os.access(paths["prolog"], os.X_OK)
    assert paths["epilog"] == f"{site}/privtmpd/hooks/epilog.py" and os.access(paths["epilog"], os.X_OK)
    assert paths["spank"] and os.path.exists(paths["spank"])
    # The installed hook runs as Slurm runs it (shebang: /usr/bin/python3
    # -IS, no PATH) and finds its package next to itself.
    r = subprocess.run([paths["prolog"]], env={}, capture_output=True, text=True, cwd="/")
    assert r.returncode == 1 and "SLURM_JOB_ID is not set" in r.stderr, r.stderr


def test_sdist_contents(work):
    src = source_copy(os.path.join(work, "sdist-src"))
    out = os.path.join(work, "sdist")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", out], cwd=src, check=True,
                   capture_output=True, timeout=300)
    [tgz] = glob.glob(f"{out}/privtmpd-{__version__}.tar.gz")
    with tarfile.open(tgz) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for path in ("setup.py", "setup.cfg", "README.md", "man/privtmpd.8", "man/privtmpctl.8", "man/privtmpd.conf.5",
                 "packaging/privtmpd.spec", "systemd/privtmpd.service", "spank/privtmpd_spank.c", "spank/Makefile",
                 "spank/trusted_dir.h", "spank/privtmpd_entry.h", "pam/pam_privtmpd.c",
                 "docs/admin-guide.md", "docs/privtmpd.conf.example", "scripts/prolog.py", "scripts/epilog.py",
                 "privtmpd/ctl.py", "tools/bootstrap.sh", "tests/test_ctl.py", "tools/build-deb.sh",
                 "tools/bookworm-root.sh", "packaging/debian/control.in", "packaging/debian/postinst"):
        assert path in names, path


# --- RPM -------------------------------------------------------------------

def test_spec_matches_the_code():
    with open(SPEC) as f:
        spec = f.read()
    assert re.search(rf"(?m)^Version:\s+{re.escape(__version__)}$", spec)
    assert "%config(noreplace) %{_sysconfdir}/privtmpd/privtmpd.conf" in spec


def test_rpmbuild(work):
    need("rpmbuild", "rpm")
    src = source_copy(os.path.join(work, "rpm-src"))
    top = os.path.join(work, "rpmbuild")
    os.makedirs(f"{top}/SOURCES")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", f"{top}/SOURCES"], cwd=src, check=True,
                   capture_output=True, timeout=300)
    # --nodeps: the build requirements are RPM package names, and this may
    # be a system whose packages rpm does not know.
    r = subprocess.run(["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {top}", SPEC],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [rpm] = glob.glob(f"{top}/RPMS/*/privtmpd-{__version__}-1*.rpm")

    def q(*args):
        return subprocess.run(["rpm", "-qp", *args, rpm], capture_output=True, text=True, check=True).stdout

    files = set(q("-l").split())
    for path in ("/usr/sbin/privtmpd", "/usr/sbin/privtmpctl", "/usr/lib/systemd/system/privtmpd.service",
                 "/etc/privtmpd/privtmpd.conf", "/usr/lib64/privtmpd/privtmpd_spank.so",
                 "/usr/libexec/privtmpd/prolog", "/usr/libexec/privtmpd/epilog",
                 "/usr/share/privtmpd/spank/privtmpd_spank.c", "/usr/share/privtmpd/spank/trusted_dir.h",
                 "/usr/share/privtmpd/spank/privtmpd_entry.h"):
        assert path in files, path
    for page, section in MAN.items():
        assert any(f.startswith(f"/usr/share/man/man{section}/{page}") for f in files), page
    assert any(f.endswith("/privtmpd/hooks/prolog.py") for f in files)
    assert not any(f.endswith("/privtmpd/lib/privtmpd_spank.so") for f in files)      # moved to libdir
    flags = dict(line.split(None, 1)[::-1] for line in q("--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]")
                 .splitlines() if line.strip() and not line.startswith(" "))
    assert set(flags["/etc/privtmpd/privtmpd.conf"]) >= {"c", "n"}           # %config(noreplace)
    scripts = q("--scripts")
    assert "systemctl try-restart privtmpd.service" in scripts and "disable --now privtmpd.service" in scripts
    requires = q("--requires")
    assert "python3-psutil" in requires and "python3 >= 3.9" in requires
    assert q("--qf", "%{LICENSE}") == "GPL-2.0-or-later"

    # Unpacked: the hooks behind the stable libexec paths are executable
    # files of the package, and the example configuration is the one shipped.
    root = os.path.join(work, "rpm-root")
    os.makedirs(root)
    tgz = os.path.join(work, "rpm.tgz")
    with open(rpm, "rb") as src, open(tgz, "wb") as dst:
        subprocess.run(["rpm2archive", "-"], stdin=src, stdout=dst, check=True)
    with tarfile.open(tgz) as t:
        # Our own package, with absolute symlinks (the hooks at their stable
        # paths) that the "data" filter would refuse: extracted as tar(1) does.
        t.extractall(root, **({"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}))
    for hook in ("prolog", "epilog"):
        link = f"{root}/usr/libexec/privtmpd/{hook}"
        target = os.readlink(link)
        assert target.endswith(f"/privtmpd/hooks/{hook}.py")
        assert stat.S_IMODE(os.stat(root + target).st_mode) == 0o755
    with open(f"{root}/etc/privtmpd/privtmpd.conf") as a, open(os.path.join(REPO, "docs/privtmpd.conf.example")) as b:
        assert a.read() == b.read()
    assert open(f"{root}/usr/lib64/privtmpd/privtmpd_spank.so", "rb").read(4) == b"\x7fELF"


# --- man pages -------------------------------------------------------------

@pytest.mark.parametrize("page", sorted(MAN))
def test_man_page_renders_without_warnings(page):
    need("groff", "groff-base")
    path = os.path.join(REPO, "man", page)
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", path], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    man = need("man", "man-db")
    r = subprocess.run([man, "--warnings", "-l", path], capture_output=True, text=True,
                       env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0", PAGER="cat", GROFF_NO_SGR="1"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"):
        assert f"\n{heading}\n" in plain(r.stdout)
    with open(path) as f:
        th = f.readline()
    assert th.startswith(".TH ") and f'"privtmpd {__version__}"' in th and f" {MAN[page]} " in th


def plain(text):
    """Terminal output without overstriking (bold, underline) or typographic hyphens."""
    return re.sub(".\x08", "", text).replace("\u2010", "-").replace("\u2212", "-")


def rendered(page):
    r = subprocess.run(["man", "-l", os.path.join(REPO, "man", page)], capture_output=True, text=True,
                       env=dict(os.environ, MANWIDTH="200", PAGER="cat", GROFF_NO_SGR="1"))
    return plain(r.stdout)


def options_of(argv):
    r = subprocess.run(argv + ["--help"], capture_output=True, text=True, cwd=REPO)
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", r.stdout)) - {"-h", "--help"}


def test_privtmpctl_man_page_covers_every_command_and_option():
    need("man", "man-db")
    text = rendered("privtmpctl.8")
    from privtmpd.ctl import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    base = [sys.executable, "-m", "privtmpd.ctl"]
    assert options_of(base) <= set(re.findall(r"--?[a-z][a-z-]*", text)) | {"-h"}
    for cmd in sub.choices:
        assert cmd in text, cmd
        argv = base + (["config", "check"] if cmd == "config" else [cmd])
        for opt in options_of(argv):
            assert opt in text, (cmd, opt)
    for code in ("0", "1", "2", "3"):
        assert re.search(rf"\n\s+{code}\s", text.split("EXIT STATUS", 1)[1])


def test_privtmpd_man_page_covers_every_option():
    need("man", "man-db")
    text = rendered("privtmpd.8")
    for opt in options_of([sys.executable, "-m", "privtmpd.daemon"]):
        assert opt in text, opt


def test_config_man_page_covers_every_setting():
    need("man", "man-db")
    text = rendered("privtmpd.conf.5")
    for key in config._KEYS:
        assert re.search(rf"\n\s+{key}=", text), key
    from privtmpd.metrics import FAMILIES
    for name in FAMILIES:
        assert name in text, name


def test_config_example_is_valid():
    r = ctl(os.path.join(REPO, "docs", "privtmpd.conf.example"), "config", "check", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["base"] == "/tmp/slurm" and data["mounts"] == ["/var/tmp", "/tmp"]

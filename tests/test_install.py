"""The .deb's contents (tools/build-deb.sh) and `privtmpctl install` from a
fresh virtualenv into a scratch root directory (--root): launchers that run,
idempotence, refusal to overwrite what it did not write, uninstall, and the
launchers' message when the virtualenv's Python is not the one it was made
for.  The same on a real Debian 12 root: test_install_deb.py and
test_install_readme.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from cli import PKG_WORK, build_wheel, make_venv, pip_install, site_packages, source_copy
from harness import REPO
from privtmpd import __version__
from privtmpd.install import _program_launcher

REQUIRE = os.environ.get("PRIVTMPD_REQUIRE_PRIVILEGED") == "1"
STABLE_FILES = ["/usr/sbin/privtmpd", "/usr/sbin/privtmpctl", "/usr/libexec/privtmpd/prolog",
                "/usr/libexec/privtmpd/epilog", "/usr/lib/privtmpd/privtmpd_spank.so",
                "/lib/systemd/system/privtmpd.service"]


def skip_or_fail(reason):
    if REQUIRE:
        pytest.fail(f"{reason} (PRIVTMPD_REQUIRE_PRIVILEGED=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def work():
    d = os.path.join(PKG_WORK, f"install-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def venv(work):
    """A virtualenv with privtmpd installed from a wheel of this checkout."""
    if not os.path.exists("/usr/include/slurm/spank.h"):
        skip_or_fail("slurm/spank.h is missing: the wheel would carry no entry helper (apt-get install "
                     "libslurm-dev)")
    wheel = build_wheel(source_copy(os.path.join(work, "src")), os.path.join(work, "wheels"))
    v = make_venv(os.path.join(work, "venv"))
    pip_install(v, wheel)
    return v


def install(venv, root, *args):
    return subprocess.run([f"{venv}/bin/privtmpctl", "install", "--root", root, *args], capture_output=True,
                          text=True, cwd="/", timeout=120)


def test_deb_contents(work):
    if not shutil.which("dpkg-deb"):
        skip_or_fail("dpkg-deb is not installed (apt-get install dpkg)")
    if not os.path.exists("/usr/include/slurm/spank.h"):
        skip_or_fail("slurm/spank.h is missing (apt-get install libslurm-dev)")
    r = subprocess.run([os.path.join(REPO, "tools", "build-deb.sh"), "--out", os.path.join(work, "deb")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    deb = r.stdout.split()[-1]
    assert os.path.basename(deb).startswith(f"privtmpd_{__version__}-1_")
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    entries = {}
    for line in listing.splitlines():
        fields = line.split(None, 5)
        name = fields[5].split(" -> ")
        entries[name[0].lstrip(".").rstrip("/")] = (fields[0], name[1] if len(name) > 1 else None)
    for path in STABLE_FILES + ["/etc/privtmpd/privtmpd.conf",
                                "/usr/lib/python3/dist-packages/privtmpd/daemon.py",
                                "/usr/share/man/man8/privtmpctl.8.gz"]:
        assert path in entries, path
    assert not [p for p in entries if "python3." in p or "__pycache__" in p]
    for hook in ("prolog", "epilog"):
        mode, target = entries[f"/usr/libexec/privtmpd/{hook}"]
        assert mode.startswith("l") and target == f"/usr/lib/python3/dist-packages/privtmpd/hooks/{hook}.py"
        assert entries[target][0] == "-rwxr-xr-x"
    for prog in ("privtmpd", "privtmpctl"):
        assert entries[f"/usr/sbin/{prog}"][0] == "-rwxr-xr-x"
    assert any(p.endswith("/security/pam_privtmpd.so") for p in entries)

    def field(name):
        return subprocess.run(["dpkg-deb", "-f", deb, name], capture_output=True, text=True, check=True).stdout.strip()
    depends = [d.strip().split()[0] for d in field("Depends").split(",")]
    assert {"python3", "python3-psutil", "python3-daemon"} <= set(depends), depends
    ctrl = os.path.join(work, "ctrl")
    subprocess.run(["dpkg-deb", "-e", deb, ctrl], check=True)
    with open(f"{ctrl}/conffiles") as f:
        assert f.read().split() == ["/etc/privtmpd/privtmpd.conf"]
    with open(f"{ctrl}/postinst") as f:
        postinst = f.read()
    # An upgrade restarts the daemon; it never stops it for good.
    assert "try-restart privtmpd.service" in postinst and "stop" not in postinst
    ex = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True).stdout
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(ex)) as t:
        unit = t.extractfile("./lib/systemd/system/privtmpd.service").read().decode()
        conf = t.extractfile("./etc/privtmpd/privtmpd.conf").read().decode()
    assert "\nExecStart=/usr/sbin/privtmpd --foreground --config /etc/privtmpd/privtmpd.conf\n" in unit
    with open(os.path.join(REPO, "docs", "privtmpd.conf.example")) as f:
        assert conf == f.read()


def test_install_writes_working_launchers_and_is_idempotent(venv, work):
    root = os.path.join(work, "root-ok")
    os.makedirs(f"{root}/lib/systemd/system")
    r = install(venv, root)
    assert r.returncode == 0, r.stderr
    for path in STABLE_FILES + ["/etc/privtmpd/privtmpd.conf"]:
        assert os.path.isfile(root + path), path
    # The launchers run the virtualenv's programs, wherever the caller stands.
    for prog in ("privtmpd", "privtmpctl"):
        out = subprocess.run([f"{root}/usr/sbin/{prog}", "--version"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0 and out.stdout.strip() == f"{prog} {__version__}", out.stderr
    # The hook launcher runs the virtualenv's hook as Slurm would (no environment).
    out = subprocess.run([f"{root}/usr/libexec/privtmpd/prolog"], env={}, capture_output=True, text=True, cwd="/")
    assert out.returncode == 1 and "SLURM_JOB_ID is not set" in out.stderr, out.stderr
    site = site_packages(venv)
    with open(f"{root}/usr/libexec/privtmpd/epilog") as f:
        assert f"\nhook={site}/privtmpd/hooks/epilog.py\n" in f.read()
    with open(f"{root}/usr/lib/privtmpd/privtmpd_spank.so", "rb") as a, \
            open(f"{site}/privtmpd/lib/privtmpd_spank.so", "rb") as b:
        assert a.read() == b.read()
    with open(f"{root}/lib/systemd/system/privtmpd.service") as a, open(os.path.join(REPO, "systemd",
                                                                                      "privtmpd.service")) as b:
        assert a.read() == b.read()                                   # as shipped: no sed
    with open(f"{root}/var/lib/privtmpd/install-manifest.json") as f:
        manifest = json.load(f)
    assert sorted(manifest["files"]) == sorted(STABLE_FILES) and manifest["venv"] == venv
    # Again: nothing changes; the configuration is never replaced.
    with open(f"{root}/etc/privtmpd/privtmpd.conf", "a") as f:
        f.write("# the admin's\n")
    r = install(venv, root, "--json")
    actions = {f["path"]: f["action"] for f in json.loads(r.stdout)["files"]}
    assert actions.pop("/etc/privtmpd/privtmpd.conf") == "kept" and set(actions.values()) == {"unchanged"}
    # Uninstall removes what it wrote, not the configuration.
    r = install(venv, root, "--uninstall")
    assert r.returncode == 0, r.stderr
    for path in STABLE_FILES:
        assert not os.path.lexists(root + path), path
    assert os.path.exists(f"{root}/etc/privtmpd/privtmpd.conf")
    assert not os.path.exists(f"{root}/usr/libexec/privtmpd")


@pytest.mark.parametrize("foreign", ["/usr/sbin/privtmpd", "/lib/systemd/system/privtmpd.service",
                                     "/usr/libexec/privtmpd/prolog"])
def test_install_refuses_to_overwrite_files_it_did_not_write(venv, work, foreign):
    root = os.path.join(work, "root-foreign" + foreign.replace("/", "-"))
    os.makedirs(f"{root}/lib/systemd/system")
    os.makedirs(os.path.dirname(root + foreign), exist_ok=True)
    # A package's file (the .deb's unit is byte for byte the one install
    # would write: identical content is still not ours).
    if foreign.endswith(".service"):
        shutil.copy(os.path.join(REPO, "systemd", "privtmpd.service"), root + foreign)
    else:
        os.symlink("/usr/lib/python3/dist-packages/privtmpd/hooks/prolog.py", root + foreign)
    r = install(venv, root)
    assert r.returncode == 1
    assert f"{root}{foreign} exists and was not written by privtmpctl install" in r.stderr, r.stderr
    assert f"dpkg -S {foreign}" in r.stderr and "apt-get remove privtmpd" in r.stderr
    # Nothing at all was written.
    written = [os.path.join(d, f)[len(root):] for d, _, fs in os.walk(root) for f in fs]
    assert written == [foreign], written


def test_install_refuses_to_overwrite_a_launcher_the_admin_changed(venv, work):
    root = os.path.join(work, "root-changed")
    os.makedirs(f"{root}/lib/systemd/system")
    assert install(venv, root).returncode == 0
    with open(f"{root}/usr/sbin/privtmpctl", "a") as f:
        f.write("# local change\n")
    r = install(venv, root)
    assert r.returncode == 1 and "was changed after privtmpctl install wrote it" in r.stderr, r.stderr
    with open(f"{root}/usr/sbin/privtmpctl") as f:
        assert f.read().endswith("# local change\n")
    r = install(venv, root, "--uninstall")
    assert os.path.exists(f"{root}/usr/sbin/privtmpctl") and not os.path.exists(f"{root}/usr/sbin/privtmpd")


def test_install_outside_a_virtualenv_says_what_to_use(work):
    # The system's Python, not a virtualenv: the .deb/RPM lay the paths out.
    r = subprocess.run(["/usr/bin/python3", "-m", "privtmpd.ctl", "install", "--root", work], capture_output=True,
                       text=True, cwd=REPO)
    if "No module named" in r.stderr:
        pytest.skip(f"the system python3 lacks a dependency of privtmpctl: {r.stderr.strip()[-200:]}")
    assert r.returncode == 1 and "not from a virtualenv" in r.stderr and "/opt/privtmpd" in r.stderr, r.stderr


def test_install_bad_root(venv):
    r = install(venv, "relative/dir")
    assert r.returncode == 1 and "--root relative/dir: not an absolute path of a directory" in r.stderr


def test_launcher_after_a_python_upgrade_says_how_to_recreate_the_venv(venv, work):
    """The launcher of a virtualenv made for another Python (what a Debian
    upgrade does to /opt/privtmpd) stops with the way out; the same launcher
    for the running Python runs the program."""
    for pyver, ok in ((sys.version_info[:2], True), ((3, 99), False)):
        path = os.path.join(work, f"launcher-{pyver[1]}")
        with open(path, "w") as f:
            f.write(_program_launcher(venv, "privtmpctl", pyver))
        os.chmod(path, 0o755)
        r = subprocess.run([path, "--version"], capture_output=True, text=True, cwd="/")
        if ok:
            assert r.returncode == 0 and r.stdout.strip() == f"privtmpctl {__version__}", r.stderr
        else:
            assert r.returncode == 1 and r.stdout == ""
            assert "made for Python 3.99" in r.stderr and f"python3 -m venv --clear {venv}" in r.stderr
            assert f"{venv}/bin/privtmpctl install" in r.stderr


def test_install_refuses_paths_the_launchers_shell_would_read(tmp_path):
    """The launchers are shell scripts every Prolog runs as root."""
    from privtmpd import install
    for venv in ("/opt/privtmpd env", "/opt/$(reboot)", "/opt/a;b", "relative/venv"):
        with pytest.raises(install.InstallError, match="accepts only absolute paths"):
            install.planned_files(venv)


def test_install_refuses_a_root_others_can_change(tmp_path):
    from privtmpd import install
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(install.InstallError, match="must be root's and writable by root only"):
        install.install(root=str(loose))


# --- uninstall trusts only what root wrote, and only the stable paths -------------------

def _installed_root(tmp_path):
    """privtmpctl install of this checkout into tmp_path/root (in process:
    the checks below are about what uninstall does with the manifest)."""
    from privtmpd import install as inst
    old = os.umask(0o022)
    try:
        root = tmp_path / "root"
        (root / "lib" / "systemd" / "system").mkdir(parents=True)
        inst.install(root=str(root), with_spank=False)
    finally:
        os.umask(old)
    return str(root)


def _sha(data):
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _plant(path, data):
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


STABLE_WITHOUT_SPANK = [p for p in STABLE_FILES if not p.endswith(".so")]


def test_uninstall_removes_nothing_but_the_stable_paths_it_wrote(tmp_path):
    """A manifest that lists other files, with their right checksums (what
    anyone who can edit it can compute), removes none of them."""
    from privtmpd import install as inst
    root = _installed_root(tmp_path)
    manifest_path = root + inst.MANIFEST
    victims = {"/etc/shadow": _plant(f"{root}/etc/shadow", b"root:$6$...:19000::::::\n"),
               "/usr/bin/python3": _plant(f"{root}/usr/bin/python3", b"\x7fELF python\n"),
               "/../outside": _plant(str(tmp_path / "outside"), b"beside --root\n"),
               "/usr/sbin/../../etc/shadow": f"{root}/etc/shadow"}
    with open(manifest_path) as f:
        manifest = json.load(f)
    for listed, real in victims.items():
        with open(real, "rb") as f:
            manifest["files"][listed] = _sha(f.read())
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    actions = dict(inst.uninstall(root))
    for listed, real in victims.items():
        assert os.path.exists(real), (listed, actions[listed])
        assert actions[listed].startswith("refused (not a path privtmpctl install writes")
        assert manifest_path in actions[listed]
    for path in STABLE_WITHOUT_SPANK:
        assert actions[path] == "removed" and not os.path.lexists(root + path), path
    assert not os.path.lexists(manifest_path)


@pytest.mark.parametrize("how", ["group-writable", "not-roots", "symlink", "loose-directory"])
def test_uninstall_refuses_a_manifest_others_could_have_written(tmp_path, how):
    from privtmpd import install as inst
    root = _installed_root(tmp_path)
    manifest_path = root + inst.MANIFEST
    if how == "group-writable":
        os.chmod(manifest_path, 0o664)
        expect = "mode 0664: only root may write the list of files"
    elif how == "not-roots":
        os.chown(manifest_path, 65534, 65534)
        expect = "owned by uid 65534"
    elif how == "symlink":
        elsewhere = str(tmp_path / "elsewhere.json")
        os.rename(manifest_path, elsewhere)
        os.symlink(elsewhere, manifest_path)
        expect = "is a symlink"
    else:
        os.chmod(os.path.dirname(manifest_path), 0o777)
        expect = "mode 0777: not root's alone"
    with pytest.raises(inst.InstallError) as e:
        inst.uninstall(root)
    msg = str(e.value)
    assert msg.startswith(manifest_path) and expect in msg, msg
    assert "remove the link" in msg if how == "symlink" else f"chown root:root {manifest_path}" in msg, msg
    for path in STABLE_WITHOUT_SPANK:
        assert os.path.isfile(root + path), path


def test_uninstall_never_follows_a_symlink(tmp_path):
    """A stable path, or a directory on the way to one, replaced by a
    symlink to a file with the very content install wrote: the file it
    leads to stays."""
    from privtmpd import install as inst
    root = _installed_root(tmp_path)
    # The launcher itself: a link to /etc/shadow-like file with the right digest.
    victim = str(tmp_path / "shadow")
    shutil.copy(f"{root}/usr/sbin/privtmpctl", victim)
    os.unlink(f"{root}/usr/sbin/privtmpctl")
    os.symlink(victim, f"{root}/usr/sbin/privtmpctl")
    # The hooks' directory: out of --root.
    away = str(tmp_path / "away")
    os.rename(f"{root}/usr/libexec/privtmpd", away)
    os.symlink(away, f"{root}/usr/libexec/privtmpd")
    # The unit's directory: within --root, but a link someone else made.
    os.rename(f"{root}/lib/systemd/system", f"{root}/srv-units")
    os.symlink("../../srv-units", f"{root}/lib/systemd/system")
    os.lchown(f"{root}/lib/systemd/system", 65534, 65534)
    actions = dict(inst.uninstall(root))
    assert os.path.isfile(victim) and os.path.islink(f"{root}/usr/sbin/privtmpctl")
    assert actions["/usr/sbin/privtmpctl"].startswith("kept (a symlink now"), actions
    for hook in ("prolog", "epilog"):
        assert os.path.isfile(f"{away}/{hook}")
        assert f"leads through a symlink to {away}, outside {root}" in actions[f"/usr/libexec/privtmpd/{hook}"]
    assert os.path.isfile(f"{root}/srv-units/privtmpd.service")
    assert "is a symlink owned by uid 65534" in actions["/lib/systemd/system/privtmpd.service"], actions
    assert actions["/usr/sbin/privtmpd"] == "removed"
    # What was kept stays listed, for the admin and for the next install.
    with open(root + inst.MANIFEST) as f:
        assert sorted(json.load(f)["files"]) == sorted(p for p in STABLE_WITHOUT_SPANK if p != "/usr/sbin/privtmpd")


def test_install_writes_only_the_stable_paths():
    from privtmpd import install as inst
    assert set(inst.planned_files(sys.prefix, with_spank=False)) <= inst.INSTALLED_PATHS

"""privtmpd.conf parsing and the start-up filesystem checks.

parse() is pure and runs everywhere.  check_filesystem() looks at owners
and symlinks of real directories and needs root to set them up.
"""

import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privtmpd import config
from privtmpd.config import ConfigError

SRC = "/etc/privtmpd/privtmpd.conf"


def parse(text):
    return config.parse(text, SRC)


# --- the syntax admins already have -------------------------------------------

def test_defaults_for_empty_file():
    cfg = parse("# nothing but a comment\n\n   \n")
    assert cfg.base == "/tmp/slurm"
    assert sorted(cfg.mounts) == ["/tmp", "/var/tmp"]
    assert cfg.mode == 0o700
    assert cfg.shm == ""
    assert cfg.tmpdir_value == "/tmp"
    assert cfg.socket_path == "/run/privtmpd/privtmpd.sock"


def test_original_one_line_syntax():
    cfg = parse("base=/tmp/slurm mount=/var/tmp mount=/tmp\n")
    assert cfg.base == "/tmp/slurm"
    assert set(cfg.mounts) == {"/tmp", "/var/tmp"}
    assert cfg.base_parent == "/tmp"
    assert cfg.base_name == "slurm"
    assert cfg.mount_plan() == [("/tmp", "tmp"), ("/var/tmp", "var_tmp")]


def test_repeated_mount_lines_and_comments():
    cfg = parse("# private dirs\nbase=/var/lib/privtmpd/job   # per-job dirs live here\n"
                "mount=/tmp\n\tmount=/var/tmp\nmount=/dev/shm\n")
    assert cfg.base == "/var/lib/privtmpd/job"
    assert set(cfg.mounts) == {"/tmp", "/var/tmp", "/dev/shm"}
    assert cfg.mount_plan() == [("/dev/shm", "dev_shm"), ("/tmp", "tmp"), ("/var/tmp", "var_tmp")]


@pytest.mark.parametrize("prefix", ["required private-tmpdir.so",
                                    "optional /usr/lib/x86_64-linux-gnu/slurm/private-tmpdir.so"])
def test_pasted_plugstack_line(prefix):
    cfg = parse(f"{prefix} base=/tmp/slurm mount=/var/tmp mount=/tmp\n")
    assert cfg.base == "/tmp/slurm"
    assert set(cfg.mounts) == {"/tmp", "/var/tmp"}


def test_required_without_so_is_not_skipped():
    # Only "required|optional <x>.so" is a plugstack prefix; a bare word is an error.
    with pytest.raises(ConfigError, match=rf"^{SRC}:1: 'required' is not key=value"):
        parse("required base=/tmp/slurm\n")


@pytest.mark.parametrize("order", [
    "mount=/tmp mount=/var/tmp mount=/dev/shm",
    "mount=/var/tmp mount=/dev/shm mount=/tmp",
    "mount=/dev/shm\nmount=/tmp\nmount=/var/tmp",
])
def test_order_of_mounts_does_not_matter(order):
    cfg = parse(f"base=/tmp/slurm\n{order}\n")
    assert cfg.mount_plan() == [("/dev/shm", "dev_shm"), ("/tmp", "tmp"), ("/var/tmp", "var_tmp")]


def test_all_keys():
    cfg = parse("base=/var/lib/privtmpd/job\nmount=/tmp\nrundir=/run/pt\nsocket=/run/pt/s.sock\n"
                "mode=0750\nshm=512m\ntmpdir=/tmp/work\nremove_workers=4\nkill_timeout=2.5\n"
                "metrics_dir=/var/lib/node_exporter\n")
    assert cfg.rundir == "/run/pt"
    assert cfg.socket_path == "/run/pt/s.sock"
    assert cfg.mode == 0o750
    assert cfg.shm == "512m"
    assert cfg.tmpdir_value == "/tmp/work"
    assert cfg.remove_workers == 4
    assert cfg.kill_timeout == 2.5
    assert cfg.metrics_dir == "/var/lib/node_exporter"


@pytest.mark.parametrize("value,expect", [("no", ""), ("off", ""), ("", ""), ("10%", "10%"),
                                          ("2G", "2G"), ("1048576", "1048576")])
def test_shm_values(value, expect):
    assert parse(f"shm={value}\n").shm == expect


def test_count_bytes():
    assert parse("").count_bytes is False
    assert parse("count_bytes=yes\n").count_bytes is True
    assert parse("count_bytes=No\n").count_bytes is False


def test_shipped_example_parses_with_every_setting_enabled():
    """docs/privtmpd.conf.example is installed as /etc/privtmpd/privtmpd.conf:
    as shipped, and with each commented-out setting enabled (one at a
    time: some exclude each other), it must be a valid configuration."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "privtmpd.conf.example")
    text = open(path, encoding="utf-8").read()
    parse(text)
    settings_ = [ln[2:] for ln in text.splitlines() if ln.startswith("# ") and "=" in ln.split()[1]]
    assert len(settings_) >= 8, settings_
    for line in settings_:
        parse(f"{text}\n{line}\n")
        key = line.split("=", 1)[0]
        assert key in config._KEYS, line
    assert parse(text + "\ncount_bytes=yes\n").count_bytes


def test_tmpdir_none_and_default_without_tmp():
    assert parse("mount=/var/tmp\n").tmpdir_value == "none"
    assert parse("tmpdir=none\n").tmpdir_value == "none"


# --- every bad line names file:line ----------------------------------------

# (line 3 content, extra lines 1-2, expected fragment of the message)
BAD = [
    ("bse=/tmp/slurm", "unknown setting 'bse'"),
    ("base", "'base' is not key=value"),
    ("mount=/scratch base", "'base' is not key=value"),
    ("base=tmp/slurm", "must be an absolute path"),
    ("base=", "must be an absolute path"),
    ("base=/tmp/../slurm", "normalised path"),
    ("base=/tmp/./slurm", "normalised path"),
    ("mount=/var//tmp", "normalised path"),
    ("mount=/", "mount=/ is not allowed"),
    ("base=/", "base=/ is not allowed"),
    ("mount=/tmp/", "normalised path"),
    ("base=/tmp/slurm/", "normalised path"),
    ("base=/slurm", "job directories would be created in /"),
    ("rundir=run/privtmpd", "must be an absolute path"),
    ("mode=0600", "must be at most 1777 and give the owner rwx"),
    ("mode=4700", "must be at most 1777"),
    ("mode=800", "is not an octal mode"),
    ("mode=rwx", "is not an octal mode"),
    ("mode=", "is not an octal mode"),
    ("shm=lots", "is not a size"),
    ("shm=0", "is not a size"),
    ("shm=12q", "is not a size"),
    ("shm=m", "is not a size"),
    ("shm=0%", "a percentage must be 1%..100%"),
    ("shm=101%", "a percentage must be 1%..100%"),
    ("shm=" + "9" * 5000 + "m", "is not a size"),
    ("shm=" + "9" * 5000 + "%", "a percentage must be"),
    ("shm=\u0661\u0662m", "is not a size"),
    ("remove_workers=0", "must be between 1 and 64"),
    ("remove_workers=many", "is not a number"),
    ("remove_workers=" + "1" * 5000, "is not a number"),
    ("kill_timeout=nan", "must be between"),
    ("kill_timeout=-1", "must be between"),
    ("tmpdir=/scratch/tmp", "is not under any private mount"),
    ("tmpdir=relative", "must be an absolute path"),
    ("count_bytes=1", "use count_bytes=yes"),
    ("count_bytes=", "use count_bytes=yes"),
]


@pytest.mark.parametrize("line,fragment", BAD, ids=[b[0][:30] for b in BAD])
def test_bad_line_names_file_and_line(line, fragment):
    text = f"# site config\nmount=/tmp mount=/var/tmp\n{line}\n"
    with pytest.raises(ConfigError) as ei:
        parse(text)
    msg = str(ei.value)
    assert msg.startswith(f"{SRC}:3:"), msg
    assert fragment in msg, msg


@pytest.mark.parametrize("first,second,fragment", [
    ("base=/tmp/a", "base=/tmp/b", "base= is set twice (first at /etc/privtmpd/privtmpd.conf:2)"),
    ("mode=0700", "mode=0750", "mode= is set twice"),
    ("mount=/scratch", "mount=/scratch", "mount=/scratch is given twice"),
    ("mount=/var/tmp", "mount=/var_tmp", "would share the directory 'var_tmp'"),
    ("mount=/a/b_c", "mount=/a_b/c", "would share the directory 'a_b_c'"),
    ("mount=/scratch", "mount=/scratch/deeper", "nested private mounts are not supported"),
    ("mount=/dev/shm", "shm=64m", "both privatise /dev/shm"),
    ("base=/scratch/job", "mount=/scratch/job.1.0", "lies inside the job directories"),
    ("rundir=/scratch/run", "mount=/scratch", "lies under mount=/scratch"),
])
def test_conflicting_lines(first, second, fragment):
    # The first line is fine on its own; the error names the line that conflicts.
    text = f"mount=/tmp\n{first}\n{second}\n"
    with pytest.raises(ConfigError) as ei:
        parse(text)
    msg = str(ei.value)
    assert fragment in msg, msg
    assert msg.startswith((f"{SRC}:2:", f"{SRC}:3:")), msg


def test_collision_reported_whatever_the_order():
    for text in ("mount=/var_tmp\nmount=/var/tmp\n", "mount=/var/tmp\nmount=/var_tmp\n"):
        with pytest.raises(ConfigError, match=rf"^{SRC}:2: .*would share the directory 'var_tmp'"):
            parse(text)


def test_base_under_rundir_refused():
    with pytest.raises(ConfigError, match=rf"^{SRC}:1: base=/run/pt/job must not lie under rundir"):
        parse("base=/run/pt/job\nrundir=/run/pt\nmount=/tmp\n")


def test_pasted_line_errors_keep_line_number():
    with pytest.raises(ConfigError, match=rf"^{SRC}:2: unknown setting 'dir'"):
        parse("\nrequired private-tmpdir.so base=/tmp/slurm dir=/x\n")


# --- load() ------------------------------------------------------------------

def test_load_reads_file(tmp_path):
    p = tmp_path / "privtmpd.conf"
    p.write_text("base=/tmp/slurm mount=/var/tmp mount=/tmp\nmode=bad\n")
    with pytest.raises(ConfigError, match=rf"^{p}:2: mode='bad'"):
        config.load(str(p))
    p.write_text("base=/var/lib/x/job mount=/tmp\n")
    cfg = config.load(str(p))
    assert cfg.base == "/var/lib/x/job" and cfg.source == str(p)


def test_load_missing_and_undecodable(tmp_path, monkeypatch):
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(missing))
    # Only the default path may be absent (a package installed with no config).
    monkeypatch.setattr(config, "DEFAULT_PATH", str(missing))
    assert config.load(str(missing)) == config.Config()
    bad = tmp_path / "latin1.conf"
    bad.write_bytes(b"base=/tmp/caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid UTF-8"):
        config.load(str(bad))


# --- property tests ----------------------------------------------------------

_WORDS = st.sampled_from(sorted(config._KEYS) + ["required", "optional", "x.so", "#", "bogus"])
_VALUES = st.one_of(
    st.sampled_from(["/tmp", "/var/tmp", "/dev/shm", "/tmp/slurm", "/", "", "none", "no", "0700",
                     "10%", "512m", "0", "-1", "nan", "inf", "/tmp/", "/tmp/../x", "/var_tmp",
                     "1e400", "7" * 5000, "\u0661", "1_0"]),
    st.text(max_size=20),
    # Long digit strings: int() refuses more than 4300 digits with a plain ValueError.
    st.tuples(st.sampled_from("190"), st.sampled_from([1, 3, 20, 21, 4300, 4301, 6000]), st.sampled_from(["", "m", "%", "g"]))
      .map(lambda t: t[0] * t[1] + t[2]),
)


@st.composite
def config_texts(draw):
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        words = []
        for _ in range(draw(st.integers(0, 4))):
            k = draw(_WORDS)
            words.append(f"{k}={draw(_VALUES)}" if draw(st.booleans()) else k)
        lines.append(" ".join(words))
    return "\n".join(lines)


_GOOD = {"base": "/tmp/slurm", "mount": "/tmp", "rundir": "/run/pt", "socket": "/run/pt/s",
         "mode": "0700", "shm": "64m", "tmpdir": "/tmp", "remove_workers": "2", "kill_timeout": "5",
         "metrics_dir": "/var/lib/m", "keep_failed": "1h", "keep_max": "2g", "limit": "1g",
         "limit_from": "tmp", "limit_max": "2g", "limit_reserve": "yes", "count_bytes": "yes",
         "mount_options": "/tmp:noexec", "tmpfs": "/tmp:1g", "sbcast": "yes",
         "ns_script": "/etc/privtmpd/init", "ns_epilog": "/etc/privtmpd/epilog", "ns_script_timeout": "30",
         "on_script_error": "log", "host_leftovers": "report"}


def one_key_per_line():
    # Every key at most once and always key=value, mostly with good values,
    # so that a bad value usually gets past the other checks and reaches its
    # own validation.
    keys = st.lists(st.sampled_from(sorted(config._KEYS)), unique=True, max_size=len(config._KEYS))

    def line(k):
        return st.one_of(st.just(_GOOD[k]), st.just(_GOOD[k]), _VALUES).map(lambda v: f"{k}={v}")
    return keys.flatmap(lambda ks: st.tuples(*[line(k) for k in ks])).map("\n".join)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), config_texts(), one_key_per_line()))
def test_parse_raises_only_config_error(text):
    try:
        cfg = config.parse(text, "f")
    except ConfigError as e:
        assert str(e).startswith("f"), str(e)
        return
    # What parses must be usable as is: normalised absolute paths, no collisions.
    for p in (cfg.base, cfg.rundir, *cfg.mounts):
        assert p.startswith("/") and p != "/" and os.path.normpath(p) == p
    assert len({d for _, d in cfg.mount_plan()}) == len(cfg.mounts)
    assert cfg.mode & 0o700 == 0o700 and not cfg.mode & ~0o1777


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(config._KEYS)), _VALUES)
def test_any_single_value_raises_only_config_error(key, value):
    text = f"mount=/tmp\n{key}={value}\n" if key != "mount" else f"mount={value}\n"
    try:
        config.parse(text, "f")
    except ConfigError as e:
        assert str(e).startswith("f:"), str(e)


# --- check_filesystem (needs root to make root- and user-owned dirs) ---------

@pytest.fixture
def tree(tmp_path):
    # tmp_path sits in /tmp/pytest-of-root (root 0700), under root-owned ancestors.
    top = tmp_path / "fs"
    top.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(top, 0o755)
    return top


@pytest.mark.root
def test_check_filesystem_accepts_sticky_world_writable_parent(tree):
    parent = tree / "base"
    parent.mkdir()
    os.chmod(parent, 0o1777)
    cfg = parse(f"base={parent}/job\nmount=/tmp\n")
    assert config.check_filesystem(cfg) is None


@pytest.mark.root
def test_check_filesystem_refuses_symlink_ancestor(tree):
    real = tree / "real"
    real.mkdir()
    (tree / "link").symlink_to(real)
    cfg = parse(f"base={tree}/link/job\nmount=/tmp\n")
    with pytest.raises(ConfigError, match=rf"^{SRC}:1: base=.*{tree}/link is a symbolic link"):
        config.check_filesystem(cfg)


@pytest.mark.root
def test_check_filesystem_refuses_user_owned_ancestor(tree):
    mid = tree / "user"
    mid.mkdir()
    os.chown(mid, 65534, 65534)
    (mid / "base").mkdir()
    cfg = parse(f"base={mid}/base/job\nmount=/tmp\n")
    with pytest.raises(ConfigError, match=f"{mid} is owned by uid 65534"):
        config.check_filesystem(cfg)


@pytest.mark.root
def test_check_filesystem_refuses_writable_non_sticky_parent(tree):
    parent = tree / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    cfg = parse(f"base={parent}/job\nmount=/tmp\n")
    with pytest.raises(ConfigError, match="without the sticky bit"):
        config.check_filesystem(cfg)
    os.chmod(parent, 0o775)
    with pytest.raises(ConfigError, match="without the sticky bit"):
        config.check_filesystem(cfg)


@pytest.mark.root
def test_check_filesystem_missing_parent_and_mount(tree):
    cfg = parse(f"base={tree}/missing/job\nmount=/tmp\n")
    with pytest.raises(ConfigError, match=f"{tree}/missing does not exist"):
        config.check_filesystem(cfg)
    (tree / "base").mkdir()
    cfg = parse(f"base={tree}/base/job\nmount={tree}/nomount\n")
    with pytest.raises(ConfigError, match=f"mount={tree}/nomount: .* does not exist"):
        config.check_filesystem(cfg)


@pytest.mark.root
def test_check_filesystem_refuses_symlinked_mount_target(tree):
    (tree / "base").mkdir()
    (tree / "real").mkdir()
    (tree / "scratch").symlink_to(tree / "real")
    cfg = parse(f"base={tree}/base/job\nmount={tree}/scratch\n")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        config.check_filesystem(cfg)
    # Nothing was created or changed by the check.
    assert stat.S_ISLNK(os.lstat(tree / "scratch").st_mode)
    assert os.listdir(tree / "real") == []

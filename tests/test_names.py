"""Job ids and restart counts become path components: only plain decimal
ASCII numbers in range may pass."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtmpd import names
from privtmpd.names import BadName

REFUSED_JOB_IDS = [
    "../x", "..", ".", "/", "1/..", "x", "007", "01", "0", "-1", "-0", "", " ", "9" * 10000,
    "1\0", "\0", "1\n", "\n1", "1\r", "١٢", "１２", "٣", "²", "+1", " 1", "1 ", "\t1", "1.0", "1e3",
    "0x10", "1_000", "１", "4294967294", "4294967295", "4294967296", "99999999999",
    "12345678901", "1\u200b",
]


@pytest.mark.parametrize("text", REFUSED_JOB_IDS, ids=repr)
def test_refused_job_ids(text):
    with pytest.raises(BadName) as ei:
        names.parse_job_id(text)
    msg = str(ei.value)
    assert msg.startswith("job id "), msg
    # The message quotes a bounded prefix: a 10 000-digit id must not make a
    # 10 000-character log line.
    assert len(msg) < 200


@pytest.mark.parametrize("value", [12, 12.0, None, b"12", ["12"], {"job": "12"}, True])
def test_non_strings_refused(value):
    with pytest.raises(BadName, match="must be a string of decimal digits"):
        names.parse_job_id(value)


@pytest.mark.parametrize("text,value", [("1", 1), ("42", 42), ("123456789", 123456789),
                                        ("4294967293", 0xFFFFFFFD)])
def test_valid_job_ids(text, value):
    assert names.parse_job_id(text) == value


def test_restart_count_bounds():
    assert names.parse_restart_count("0") == 0
    assert names.parse_restart_count("1") == 1
    assert names.parse_restart_count("65535") == 65535
    for bad in ("65536", "-1", "00", "01", "", "1\n", "٠"):
        with pytest.raises(BadName, match="restart count"):
            names.parse_restart_count(bad)


def test_uid_gid_bounds():
    assert names.parse_id("0") == 0
    assert names.parse_id("65534", "gid") == 65534
    assert names.parse_id("4294967294") == 0xFFFFFFFE
    # (uid_t)-1 tells chown "leave unchanged": it must never reach fchown.
    with pytest.raises(BadName, match="uid 4294967295 is out of range"):
        names.parse_id("4294967295")
    with pytest.raises(BadName, match="^gid "):
        names.parse_id("-1", "gid")


@pytest.mark.parametrize("mount,dirname", [("/tmp", "tmp"), ("/var/tmp", "var_tmp"),
                                           ("/dev/shm", "dev_shm"), ("/a/b/c", "a_b_c")])
def test_mount_dirname(mount, dirname):
    assert names.mount_dirname(mount) == dirname


def test_paths():
    assert names.job_dir_name("slurm", 12, 0) == "slurm.12.0"
    assert names.trash_name("slurm", 12, 3, "ab12") == "slurm.12.3.deleting.ab12"
    assert names.pin_path("/run/privtmpd", 12) == "/run/privtmpd/ns/12"
    assert names.state_path("/run/privtmpd", 12) == "/run/privtmpd/jobs/12.json"


def test_name_matcher():
    m = names.NameMatcher("slurm")
    assert m.job_dir("slurm.12.0") == (12, 0)
    assert m.job_dir("slurm.12.3") == (12, 3)
    for other in ("slurm.012.0", "slurm.12.00", "slurm.12", "slurm.12.0.squatted.abc",
                  "slurmX12.0", "slurm.12x0", "xslurm.12.0", "slurm.12.0\n", "slurm.١٢.0",
                  ".slurm.12.0.new.ab", "slurm.12.0.deleting.ab"):
        assert m.job_dir(other) is None, other
    assert m.trash("slurm.12.0.deleting.0a1b")
    assert not m.trash("slurm.12.0.deleting.")
    assert not m.trash("slurm.12.0.deleting.AB")
    assert not m.trash("slurm.12.0.squatted.ab")
    assert m.trash("slurm.12.0.deleting-kept.0a1b") and m.kept_trash("slurm.12.0.deleting-kept.0a1b")
    assert not m.kept_trash("slurm.12.0.deleting.0a1b")
    assert names.trash_name("slurm", 12, 3, "ab", kept=True) == "slurm.12.3.deleting-kept.ab"
    kname = names.kept_name("slurm", 12, 3, 1700000000, 256, "0a1b")
    assert kname == "slurm.12.3.kept.1700000000.256.0a1b"
    assert m.kept(kname) == (12, 3, 1700000000, 256)
    assert m.kept("slurm.12.3.kept.1700000000.256") == (12, 3, 1700000000, 256)    # earlier versions
    assert m.kept("slurm.12.3.kept.1700000000.256.") is None
    assert m.kept("slurm.12.3.kept.1700000000.256.XY") is None
    assert m.temporary(".slurm.12.0.new.ab12")
    assert m.temporary(".slurm.12.0.aside.ab12")
    assert not m.temporary("slurm.12.0.new.ab12")
    assert not m.temporary(".slurm.12.0.squatted.ab12")
    # A base name with regex metacharacters matches only literally.
    dot = names.NameMatcher("a.b")
    assert dot.job_dir("a.b.1.0") == (1, 0)
    assert dot.job_dir("aXb.1.0") is None


# deadline=None: Hypothesis's default 200 ms per example fails a run (as
# "Unreliable test timings") when a busy machine stalls one example.
@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30))
def test_parse_job_id_round_trips_or_refuses(text):
    try:
        value = names.parse_job_id(text)
    except BadName:
        return
    # Whatever is accepted is exactly the canonical decimal form of a valid id.
    assert str(value) == text
    assert 1 <= value <= names.JOB_ID_MAX


@settings(deadline=None)
@given(st.integers(1, names.JOB_ID_MAX), st.integers(0, names.RESTART_MAX))
def test_every_valid_id_accepted(job, restart):
    assert names.parse_job_id(str(job)) == job
    assert names.parse_restart_count(str(restart)) == restart
    dname = names.job_dir_name("slurm", job, restart)
    assert names.NameMatcher("slurm").job_dir(dname) == (job, restart)
    assert "/" not in dname

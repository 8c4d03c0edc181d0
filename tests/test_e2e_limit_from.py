"""limit_from=tmp on a real Slurm cluster: a job's private directories get
the size of its --tmp request; a job without one gets limit=."""

import os

import pytest

from harness import Stack
from privtmpd import config
from privtmpd import tmprequest

U1 = "privtmp1"


def test_limit_from_needs_limit_and_a_known_value():
    with pytest.raises(config.ConfigError, match=r"t.conf:1: limit_from=tmp needs limit="):
        config.parse("limit_from=tmp", "t.conf")
    with pytest.raises(config.ConfigError, match=r"t.conf:1: limit_from='disk'"):
        config.parse("limit=1g limit_from=disk", "t.conf")
    assert config.parse("limit=1g limit_from=tmp").limit_from == "tmp"
    assert config.parse("limit=1g limit_from=no").limit_from == ""


@pytest.mark.parametrize("text, want", [
    ("40M\n", 40 << 20),
    ("3072M", 3 << 30),
    ("100", 100 << 20),
    ("0", 0),
    ("0M", 0),
])
def test_tmp_request_parsing(text, want):
    assert tmprequest.parse_mb(text) == want


@pytest.mark.parametrize("text", ["1.50G", "x1M", "-1M", "3G", "", "9" * 400, "40M MinTmpDiskNode=3G", "٣M"])
def test_tmp_request_refuses_anything_else(text):
    with pytest.raises(tmprequest.Refused) as e:
        tmprequest.parse_mb(text)
    assert len(str(e.value)) < 120


def _cfg(extra=""):
    return config.parse(f"base=/var/tmp/slurm limit=32m limit_from=tmp {extra}")


@pytest.mark.parametrize("answer, want, result", [
    (0, 32 << 20, None),                        # no --tmp: limit=
    (1 << 20, 16 << 20, None),                  # below what an image can be: the floor
    (64 << 20, 64 << 20, None),
    (128 << 20, 128 << 20, None),               # limit_max= itself
    (129 << 20, 128 << 20, "capped"),
    (10 ** 12 << 20, 128 << 20, "capped"),      # absurd: capped, never an error
    (tmprequest.Refused("squeue exited 1"), 32 << 20, "fallback"),
])
def test_job_limit_caps_and_falls_back(answer, want, result):
    def ask(job, conf):
        if isinstance(answer, Exception):
            raise answer
        return answer
    size, res, note = tmprequest.job_limit(_cfg("limit_max=128m"), 5, None, ask)
    assert (size, res) == (want, result)
    assert (note is None) == (result is None)


def test_job_limit_caps_at_the_base_filesystem_without_limit_max():
    v = os.statvfs("/var/tmp")
    disk = v.f_blocks * v.f_frsize
    assert tmprequest.job_limit(_cfg(), 5, None, lambda j, c: disk + (1 << 30))[:2] == (disk, "capped")


def test_limit_max_is_checked():
    with pytest.raises(config.ConfigError, match=r"t.conf:1: limit_max= caps"):
        config.parse("limit=32m limit_max=1g", "t.conf")
    with pytest.raises(config.ConfigError, match=r"t.conf:1: limit_max=16m is smaller than limit="):
        config.parse("limit=32m limit_from=tmp limit_max=16m", "t.conf")


@pytest.fixture(scope="module")
def stack():
    s = Stack("tmpreq", daemon_extra="limit=32m limit_from=tmp limit_max=128m").start()
    yield s
    s.stop()


def _df_mb(stack, args):
    r = stack.cluster.srun(U1, args + ["stat", "-f", "-c", "%b %S", "/tmp"])
    assert r.returncode == 0, r.stderr + stack.cluster.logs()
    blocks, bsize = r.stdout.split()[:2]
    return int(blocks) * int(bsize) / (1 << 20)


@pytest.mark.slurm
@pytest.mark.root
def test_job_tmp_request_sizes_its_private_directories(stack):
    requested = _df_mb(stack, ["--tmp=96M"])
    default = _df_mb(stack, [])
    # ext4 keeps a little for itself: sizes are a few MB under the image.
    assert 80 < requested <= 96, requested
    assert 24 < default <= 32, default
    stack.cluster.wait_idle(timeout=60)
    stack.cluster.assert_not_drained()


@pytest.mark.slurm
@pytest.mark.root
@pytest.mark.parametrize("name", ["x MinTmpDiskNode=3G", "x MinTmpDiskNode=900000000000T",
                                  "MinTmpDiskNode=1 MinTmpDiskNode=2T"])
def test_job_name_cannot_choose_the_size(stack, name, figures):
    """The job's user writes the job name, which `scontrol -o show job`
    prints unescaped before the real MinTmpDiskNode= field: the size must
    come from the request alone, and no name may fail the Prolog."""
    got = _df_mb(stack, ["--tmp=40M", "-J", name])
    assert 30 < got <= 40, got
    stack.cluster.wait_idle(timeout=60)
    stack.cluster.assert_not_drained()
    figures(f"limit_from=tmp, --tmp=40M, job name {name!r}", image_mb=round(got, 1), node_drained=False)


@pytest.mark.slurm
@pytest.mark.root
def test_request_over_limit_max_is_capped_and_logged(stack):
    got = _df_mb(stack, ["--tmp=200M"])
    assert 110 < got <= 128, got
    assert "op=limit result=capped" in stack.daemon.log()
    stack.cluster.assert_not_drained()

"""limit_from=tmp on a real Slurm cluster: a job's private directories get
the size of its --tmp request; a job without one gets limit=."""

import pytest

from harness import Stack
from privtmpd import config
from privtmpd.daemon import _min_tmp_disk

U1 = "privtmp1"


def test_limit_from_needs_limit_and_a_known_value():
    with pytest.raises(config.ConfigError, match=r"t.conf:1: limit_from=tmp needs limit="):
        config.parse("limit_from=tmp", "t.conf")
    with pytest.raises(config.ConfigError, match=r"t.conf:1: limit_from='disk'"):
        config.parse("limit=1g limit_from=disk", "t.conf")
    assert config.parse("limit=1g limit_from=tmp").limit_from == "tmp"
    assert config.parse("limit=1g limit_from=no").limit_from == ""


@pytest.mark.parametrize("line, want", [
    ("JobId=5 MinTmpDiskNode=64M Features=(null)", 64 << 20),
    ("MinTmpDiskNode=2G", 2 << 30),
    ("MinTmpDiskNode=100", 100 << 20),
    ("MinTmpDiskNode=0", 0),
    ("MinTmpDiskNode=x1M", None),
    ("JobId=5 NumNodes=1", None),
])
def test_min_tmp_disk_parsing(line, want):
    assert _min_tmp_disk(line) == want


@pytest.fixture(scope="module")
def stack():
    s = Stack("tmpreq", daemon_extra="limit=32m limit_from=tmp").start()
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

"""Per-job usage at teardown (op=usage lines, privtmpd_job_bytes and
privtmpd_job_files histograms), against a real daemon: from the removal's
walk for plain directories (bytes only where measured), from one statvfs
for a limit= job's own filesystem."""

import os
import shutil

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli import wait_for
from harness import nsenter
from privtmpd import metrics, removal

pytestmark = pytest.mark.root

MDIR_TOP = "/var/lib/privtmpd-test/metrics"
MiB = 1 << 20


@pytest.fixture
def mdir(request):
    d = os.path.join(MDIR_TOP, "usage-" + request.node.name[:40])
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def samples(mdir):
    with open(os.path.join(mdir, metrics.FILENAME)) as f:
        text = f.read()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, s.labels.get("le"))] = s.value
    return out


def usage_line(d, job, timeout=30):
    found = d.log_lines(job, "usage", timeout)
    assert len(found) == 1, found           # one line per job
    return dict(kv.split("=", 1) for kv in found[0].split(" op=", 1)[1].split() if "=" in kv)


def fill(d, job, files, size):
    """As the job user, inside the job: `files` files of `size` bytes in /tmp."""
    nsenter(d.pin(job), "sh", "-c", f"i=0; while [ $i -lt {files} ]; do head -c {size} /dev/zero > /tmp/f$i; "
            f"i=$((i+1)); done; mkdir /var/tmp/sub; echo x > /var/tmp/sub/y", user="65534")


def create(d, job):
    assert d.request(op="create", job=str(job), restart="0", uid="65534", gid="65534", user="nobody")["ok"]


def test_small_job_usage_from_the_inline_removal(daemon_factory, mdir):
    d = daemon_factory(f"metrics_dir={mdir}")
    create(d, 81)
    fill(d, 81, 3, 2 * MiB)
    assert d.destroy(81)["ok"]
    d.wait_removals()
    u = usage_line(d, 81)
    assert u["result"] == "ok" and u["source"] == "removal"
    assert u["files"] == "4"                        # f0 f1 f2 and sub/y
    assert 6 * MiB <= int(u["bytes"]) <= 6 * MiB + 64 * 1024
    # The job's directories: tmp, var_tmp, var_tmp/sub, and the job directory itself.
    assert u["dirs"] == "4"

    def seen():
        s = samples(mdir)
        return s.get(("privtmpd_job_bytes_count", None)) == 1 and s
    s = wait_for(seen, 15, "the job in privtmpd_job_bytes")
    assert s[("privtmpd_job_bytes_bucket", "4194304")] == 0
    assert s[("privtmpd_job_bytes_bucket", "16777216")] == 1
    assert s[("privtmpd_job_files_bucket", "1")] == 0
    assert s[("privtmpd_job_files_bucket", "10")] == 1
    assert s[("privtmpd_job_files_count", None)] == 1


def test_big_job_without_count_bytes_reports_files_not_bytes(daemon_factory, mdir):
    d = daemon_factory(f"metrics_dir={mdir}")
    create(d, 82)
    fill(d, 82, 3000, 10)       # over the inline budget: a worker removes it, without lstat
    assert d.destroy(82)["ok"]
    d.wait_removals()
    u = usage_line(d, 82)
    assert u["files"] == "3001" and u["bytes"] == "-"
    s = wait_for(lambda: samples(mdir).get(("privtmpd_job_files_count", None)) == 1 and samples(mdir), 15,
                 "the job in privtmpd_job_files")
    assert s[("privtmpd_job_files_bucket", "1000")] == 0 and s[("privtmpd_job_files_bucket", "10000")] == 1
    assert s[("privtmpd_job_bytes_count", None)] == 0     # unknown bytes are not observed as 0


def test_big_job_with_count_bytes_reports_bytes(daemon_factory):
    d = daemon_factory("count_bytes=yes")
    create(d, 83)
    fill(d, 83, 3000, 10)
    assert d.destroy(83)["ok"]
    d.wait_removals()
    u = usage_line(d, 83)
    assert u["files"] == "3001" and int(u["bytes"]) >= 3000 * 512


def test_limit_job_usage_is_one_statvfs(daemon_factory, mdir):
    d = daemon_factory(f"limit=64m metrics_dir={mdir}")
    create(d, 84)
    fill(d, 84, 5, 3 * MiB)
    reply = d.destroy(84)
    assert reply["ok"] and reply["usage"]["bytes"] >= 15 * MiB
    u = usage_line(d, 84)
    assert u["source"] == "statvfs" and u["result"] == "ok"
    assert 15 * MiB <= int(u["bytes"]) <= 16 * MiB
    assert u["files"] == "7"                    # 5 files, sub/ and sub/y: inodes beyond the empty filesystem's
    d.wait_removals()
    assert len(usage_line(d, 84)) > 0           # the image's removal adds no second line
    s = wait_for(lambda: samples(mdir).get(("privtmpd_job_bytes_count", None)) == 1 and samples(mdir), 15,
                 "the job in privtmpd_job_bytes")
    assert s[("privtmpd_job_bytes_bucket", "16777216")] == 1


def test_a_replaced_run_reports_its_usage_once(daemon_factory):
    """A create for the next run of a job still here (requeue without an
    Epilog on this node) tears the old run down: its usage is logged once."""
    d = daemon_factory()
    create(d, 85)
    assert d.request(op="create", job="85", restart="1", uid="65534", gid="65534", user="nobody")["ok"]
    d.wait_removals()
    u = usage_line(d, 85)           # exactly one: the replaced run 0
    assert u["files"] == "0"
    assert d.destroy(85)["ok"]


def test_log_usage_without_bytes_leaves_the_bytes_histogram_alone():
    from privtmpd import config
    m = metrics.Metrics(config.Config())
    removal.log_usage(m, 1, "u", "removal", "ok", 12, 3, None)
    assert m.hist["privtmpd_job_bytes"][-1] == 0 and m.hist["privtmpd_job_files"][-1] == 1


def test_tmpfs_points_count_in_the_jobs_usage(daemon_factory, mdir):
    """tmpfs=/tmp: one statvfs from inside the namespace at teardown (the
    tmpfs is gone after), added to what the removal of /var/tmp counted."""
    d = daemon_factory(f"tmpfs=/tmp:16m metrics_dir={mdir}")
    create(d, 86)
    fill(d, 86, 3, 2 * MiB)             # f0..f2 in the tmpfs, sub/y on disk
    assert d.destroy(86)["ok"]
    d.wait_removals()
    u = usage_line(d, 86)
    assert u["source"] == "removal" and u["result"] == "ok"
    assert u["files"] == "4", u         # f0 f1 f2 in the tmpfs; sub/y removed (sub counts in dirs)
    assert 6 * MiB <= int(u["bytes"]) <= 6 * MiB + 64 * 1024, u


def test_tmpfs_only_job_usage_is_its_statvfs(daemon_factory, mdir):
    d = daemon_factory(f"tmpfs=/tmp:16m tmpfs=/var/tmp:4m metrics_dir={mdir}")
    create(d, 87)
    fill(d, 87, 2, 3 * MiB)             # f0 f1 in /tmp, sub/ and sub/y in /var/tmp
    assert d.destroy(87)["ok"]
    d.wait_removals()
    u = usage_line(d, 87)           # the removal of the empty job directory carries it
    assert u["files"] == "4" and 6 * MiB <= int(u["bytes"]) <= 6 * MiB + 64 * 1024, u
    s = wait_for(lambda: samples(mdir).get(("privtmpd_job_bytes_count", None)) == 1 and samples(mdir), 15,
                 "the job in privtmpd_job_bytes")
    assert s[("privtmpd_job_bytes_bucket", "16777216")] == 1

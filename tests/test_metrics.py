"""Prometheus metrics from a real daemon: the textfile-collector file in
metrics_dir, parsed with prometheus_client's own parser, following real
jobs, removals, errors and orphan sweeps."""

import os
import shutil
import stat
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli import ctl, wait_for
from privtmpd import __version__, metrics

pytestmark = pytest.mark.root

MDIR_TOP = "/var/lib/privtmpd-test/metrics"


@pytest.fixture
def mdir(request):
    d = os.path.join(MDIR_TOP, request.node.name[:50])
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def read(mdir):
    """{(name, frozenset(labels)): value} of the sample lines, and the families."""
    with open(os.path.join(mdir, metrics.FILENAME)) as f:
        text = f.read()
    assert text.endswith("\n")
    families = list(text_string_to_metric_families(text))
    samples = {}
    for fam in families:
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, {f.name: f for f in families}


def value(mdir, name, **labels):
    return read(mdir)[0].get((name, frozenset(labels.items())))


def wait_value(mdir, name, want, timeout=15, **labels):
    """The file is rewritten at most every WRITE_INTERVAL seconds."""
    return wait_for(lambda: value(mdir, name, **labels) == want, timeout,
                    f"{name}{labels} == {want} (now {value(mdir, name, **labels)})")


def create(daemon, job):
    assert daemon.request(op="create", job=str(job), restart="0", uid="65534", gid="65534", user="nobody")["ok"]


def test_file_is_there_from_the_start_with_every_family(daemon_factory, mdir):
    t0 = time.time()
    daemon_factory(f"metrics_dir={mdir}")
    path = os.path.join(mdir, metrics.FILENAME)
    wait_for(lambda: os.path.exists(path), what="the metrics file")
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0      # node-exporter reads it as its own user
    samples, fams = read(mdir)
    assert set(fams) == {n[:-len("_total")] if n.endswith("_total") else n for n in metrics.FAMILIES}
    assert fams["privtmpd_creates"].type == "counter" and fams["privtmpd_create_seconds"].type == "histogram"
    assert fams["privtmpd_jobs_active"].type == "gauge"
    assert samples[("privtmpd_build_info", frozenset({("version", __version__)}))] == 1
    assert t0 - 1 <= samples[("privtmpd_start_time_seconds", frozenset())] <= time.time()
    for result in ("ok", "refused", "error"):
        assert samples[("privtmpd_creates_total", frozenset({("result", result)}))] == 0
        assert samples[("privtmpd_destroys_total", frozenset({("result", result)}))] == 0
    for name in ("privtmpd_jobs_active", "privtmpd_removals_pending", "privtmpd_orphans_swept_total",
                 "privtmpd_removed_bytes_total", "privtmpd_removed_files_total", "privtmpd_create_seconds_count"):
        assert samples[(name, frozenset())] == 0
    assert samples[("privtmpd_create_seconds_bucket", frozenset({("le", "+Inf")}))] == 0
    assert os.listdir(mdir) == [metrics.FILENAME]


def test_counters_follow_jobs_and_removals(daemon_factory, mdir):
    daemon = daemon_factory(f"metrics_dir={mdir}")
    for job in (1, 2, 3):
        create(daemon, job)
    for i in range(3):
        with open(f"{daemon.job_dir(1)}/tmp/f{i}", "wb") as f:
            f.write(os.urandom(1 << 20))
    wait_value(mdir, "privtmpd_jobs_active", 3)
    for job in (1, 2):
        assert daemon.destroy(job)["ok"]
    daemon.wait_removals()
    wait_value(mdir, "privtmpd_removals_total", 2, result="ok")
    samples, _ = read(mdir)

    def v(name, **labels):
        return samples[(name, frozenset(labels.items()))]

    assert v("privtmpd_creates_total", result="ok") == 3 and v("privtmpd_destroys_total", result="ok") == 2
    assert v("privtmpd_jobs_active") == 1 and v("privtmpd_removals_pending") == 0
    assert v("privtmpd_create_seconds_count") == 3 and v("privtmpd_destroy_seconds_count") == 2
    assert 0 < v("privtmpd_create_seconds_sum") < 30
    assert v("privtmpd_create_seconds_bucket", le="+Inf") == 3
    buckets = [v("privtmpd_create_seconds_bucket", le=metrics._num(b)) for b in metrics.FAST_BUCKETS]
    assert buckets == sorted(buckets) and buckets[-1] == 3          # cumulative
    assert v("privtmpd_removed_files_total") == 3
    assert v("privtmpd_removed_dirs_total") == 2 * 3               # job dir, tmp, var_tmp
    assert v("privtmpd_removed_bytes_total") >= 3 << 20
    assert v("privtmpd_remove_seconds_count") == 2
    assert v("privtmpd_orphans_swept_total") == 0


def test_results_other_than_ok(daemon_factory, mdir):
    daemon = daemon_factory(f"metrics_dir={mdir}")
    moved = daemon.base_parent + ".away"
    os.rename(daemon.base_parent, moved)          # the base vanishes: creates fail
    try:
        r = daemon.create(5)
        assert not r["ok"] and "No such file or directory" in r["error"]
    finally:
        os.rename(moved, daemon.base_parent)
    wait_value(mdir, "privtmpd_creates_total", 1, result="error")
    assert value(mdir, "privtmpd_creates_total", result="ok") == 0
    assert value(mdir, "privtmpd_create_seconds_count") == 1
    # The next one works again.
    create(daemon, 6)
    wait_value(mdir, "privtmpd_creates_total", 1, result="ok")


def test_orphans_swept_at_start_and_by_cleanup(daemon_factory, mdir):
    daemon = daemon_factory(f"metrics_dir={mdir}", start=False)
    os.makedirs(daemon.base_parent, exist_ok=True)
    os.chmod(daemon.base_parent, 0o1777)
    for job in (7, 8):
        os.makedirs(f"{daemon.job_dir(job)}/tmp")
        with open(f"{daemon.job_dir(job)}/tmp/data", "wb") as f:
            f.write(b"x" * 10000)
    daemon.start()                 # a reboot's leftovers: swept before serving
    wait_value(mdir, "privtmpd_orphans_swept_total", 2)
    daemon.wait_removals()
    wait_value(mdir, "privtmpd_removed_files_total", 2)
    os.makedirs(f"{daemon.job_dir(9)}/tmp")
    r = ctl(daemon.conf_path, "cleanup", "--orphans", "--wait")
    assert r.returncode == 0, r.stderr
    wait_value(mdir, "privtmpd_orphans_swept_total", 3)
    # A dry run sweeps nothing.
    os.makedirs(f"{daemon.job_dir(10)}/tmp")
    assert ctl(daemon.conf_path, "cleanup", "--orphans", "--dry-run").returncode == 0
    time.sleep(metrics.WRITE_INTERVAL + 1.5)
    assert value(mdir, "privtmpd_orphans_swept_total") == 3


def test_rewrites_are_atomic(daemon_factory, mdir):
    """A reader polling the file while jobs come and go only ever sees a
    complete, parsable file, and no temporary file is ever left behind."""
    daemon = daemon_factory(f"metrics_dir={mdir}")
    path = os.path.join(mdir, metrics.FILENAME)
    wait_for(lambda: os.path.exists(path), what="the metrics file")
    stop, seen, bad = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                with open(path) as f:
                    text = f.read()
            except FileNotFoundError:
                bad.append("missing")
                continue
            # Complete: every family, and the last line whole.
            if not text.endswith("\n") or not all(f"# TYPE {n} " in text for n in metrics.FAMILIES):
                bad.append(text[-200:])
            else:
                list(text_string_to_metric_families(text))
                seen.append(text)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for job in range(100, 130):
            create(daemon, job)
            assert daemon.destroy(job)["ok"]
            time.sleep(0.1)
        wait_value(mdir, "privtmpd_destroys_total", 30, result="ok")
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:3]
    assert len(set(seen)) >= 3                  # it really was rewritten meanwhile
    daemon.wait_removals()
    # The removals just finished make the file due for a rewrite, whose
    # temporary file exists for a moment: a leftover one would stay.
    wait_for(lambda: os.listdir(mdir) == [metrics.FILENAME], 15, f"only {metrics.FILENAME} left in {mdir}")


def test_a_missing_metrics_dir_never_stops_job_service(daemon_factory):
    mdir = os.path.join(MDIR_TOP, "not-yet")
    shutil.rmtree(mdir, ignore_errors=True)
    daemon = daemon_factory(f"metrics_dir={mdir}")
    create(daemon, 11)
    assert daemon.destroy(11)["ok"]
    log = daemon.log()
    assert "op=metrics result=error" in log
    assert f"openat({mdir}/.privtmpd.prom." in log and f"create {mdir}, or fix metrics_dir=" in log
    assert log.count("op=metrics result=error") == 1                 # said once, not every second
    os.makedirs(mdir)
    try:
        wait_for(lambda: os.path.exists(os.path.join(mdir, metrics.FILENAME)), what="the metrics file")
        wait_value(mdir, "privtmpd_creates_total", 1, result="ok")
        # The recovery is logged right after the file is replaced.
        wait_for(lambda: "op=metrics result=ok" in daemon.log(), what="the recovery in the log")
    finally:
        shutil.rmtree(mdir)


def test_a_planted_symlink_is_replaced_not_followed(daemon_factory, mdir):
    """The collector's directory may be writable by the exporter's user:
    whatever they plant at the file's name is replaced, never written
    through."""
    canary = os.path.join(MDIR_TOP, "canary")
    with open(canary, "w") as f:
        f.write("untouched\n")
    try:
        os.symlink(canary, os.path.join(mdir, metrics.FILENAME))
        daemon = daemon_factory(f"metrics_dir={mdir}")
        create(daemon, 12)
        wait_for(lambda: not os.path.islink(os.path.join(mdir, metrics.FILENAME)), what="the symlink replaced")
        wait_value(mdir, "privtmpd_creates_total", 1, result="ok")
        assert open(canary).read() == "untouched\n"
    finally:
        os.unlink(canary)


def test_status_and_config_check_name_the_metrics_file(daemon_factory, mdir):
    daemon = daemon_factory(f"metrics_dir={mdir}")
    r = ctl(daemon.conf_path, "status")
    assert f"metrics:  {mdir}/privtmpd.prom" in r.stdout
    r = ctl(daemon.conf_path, "config", "check", "--json")
    assert r.returncode == 0 and f'"metrics_dir": "{mdir}"' in r.stdout

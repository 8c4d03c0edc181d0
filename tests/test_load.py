"""Load, for real: 200 jobs created and torn down at once (200 client
connections together), then create/teardown cycles in a row for a time
budget, with zero failures, zero leaked mounts, pins, state files,
directories or daemon file descriptors, and the daemon's memory flat."""

import os
import threading
import time

import pytest

from privtmpd import client
from relutil import (daemon_fds, daemon_rss_kb, job_entries, mountinfo_lines, mounts_under, pins,
                     processes_of, state_files)

pytestmark = pytest.mark.root

CONCURRENT = 200
CYCLES = int(os.environ.get("PRIVTMPD_LOAD_CYCLES", "10000"))
BUDGET_S = float(os.environ.get("PRIVTMPD_LOAD_SECONDS", "300"))


def leaks(d):
    return {"pins": pins(d), "states": state_files(d), "dirs": job_entries(d),
            "mounts": len(mounts_under(d.rundir, d.base_parent)), "forks": processes_of(d)}


CLEAN = {"pins": [], "states": [], "dirs": [], "mounts": 1, "forks": []}


def _all_at_once(d, msgs):
    """Send every request on its own connection, all connected before any is sent."""
    replies = [None] * len(msgs)
    barrier = threading.Barrier(len(msgs))

    def go(i):
        barrier.wait()
        try:
            replies[i] = client.request(msgs[i], d.socket, timeout=300, retry=30)
        except client.ClientError as e:
            replies[i] = {"ok": False, "error": str(e)}

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(msgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def test_200_jobs_at_once(daemon, figures):
    daemon.create(1)
    daemon.destroy(1, restart=0)
    daemon.wait_removals()
    fds0, rss0, mi0 = daemon_fds(daemon), daemon_rss_kb(daemon), mountinfo_lines()
    jobs = range(100, 100 + CONCURRENT)
    t0 = time.monotonic()
    replies = _all_at_once(daemon, [{"op": "create", "job": str(j), "restart": "0", "uid": "65534",
                                     "gid": "65534"} for j in jobs])
    t_create = time.monotonic() - t0
    failed = [r for r in replies if not r.get("ok")]
    assert not failed, failed[:3]
    assert len(pins(daemon)) == CONCURRENT
    assert len(mounts_under(daemon.rundir)) == 1 + CONCURRENT
    t0 = time.monotonic()
    replies = _all_at_once(daemon, [{"op": "destroy", "job": str(j), "restart": "0"} for j in jobs])
    t_destroy = time.monotonic() - t0
    failed = [r for r in replies if not r.get("ok")]
    assert not failed, failed[:3]
    daemon.wait_removals(timeout=300)
    assert leaks(daemon) == CLEAN
    fds1, rss1 = daemon_fds(daemon), daemon_rss_kb(daemon)
    assert fds1 == fds0, (fds0, fds1)
    figures("200 jobs created and torn down concurrently (200 connections at once)", jobs=CONCURRENT,
            create_all_s=round(t_create, 2), destroy_all_s=round(t_destroy, 2), failures=0,
            leaked_mounts=0, leaked_fds=fds1 - fds0, leaked_dirs=0, daemon_fds_before=fds0,
            daemon_fds_after=fds1, rss_kb_before=rss0, rss_kb_after=rss1,
            host_mountinfo_lines_before=mi0, host_mountinfo_lines_after=mountinfo_lines())


@pytest.mark.slow
def test_create_teardown_cycles(daemon, figures):
    """CYCLES create/teardown cycles in a row, or as many as fit in
    BUDGET_S seconds (the rate is recorded either way)."""
    # Warm up (imports, caches), then measure.
    for j in range(1, 51):
        assert daemon.create(j)["ok"] and daemon.destroy(j, restart=0)["ok"]
    daemon.wait_removals()
    fds0, rss0 = daemon_fds(daemon), daemon_rss_kb(daemon)
    samples = []
    t0 = time.monotonic()
    done = 0
    job = 1000
    while done < CYCLES and time.monotonic() - t0 < BUDGET_S:
        job += 1
        r = daemon.create(job)
        assert r["ok"], r
        r = daemon.destroy(job, restart=0)
        assert r["ok"] and r["dirs"] == [f"job.{job}.0"], r
        done += 1
        if done % 500 == 0:
            samples.append((done, daemon_rss_kb(daemon), daemon_fds(daemon)))
    elapsed = time.monotonic() - t0
    daemon.wait_removals(timeout=300)
    assert leaks(daemon) == CLEAN
    fds1, rss1 = daemon_fds(daemon), daemon_rss_kb(daemon)
    assert fds1 == fds0, (fds0, fds1)
    # Flat memory: no growth per job (a leak of even 1 kB per job would show).
    assert rss1 - rss0 < max(4096, done // 4), (rss0, rss1, samples)
    assert done >= min(CYCLES, 1000)
    figures("create/teardown cycles in a row", cycles=done, target=CYCLES, seconds=round(elapsed, 1),
            rate_per_s=round(done / elapsed, 1), failures=0, leaked_mounts=0, leaked_dirs=0,
            leaked_fds=fds1 - fds0, daemon_fds_before=fds0, daemon_fds_after=fds1, rss_kb_before=rss0,
            rss_kb_after=rss1, rss_samples=samples[-5:])


@pytest.mark.root
def test_more_clients_than_the_daemon_serves_at_once_wait_not_fail(daemon):
    """Past MAX_CLIENTS open connections the daemon stops accepting, so
    further Prologs wait in the listen backlog instead of being refused
    (a refused Prolog drains the node)."""
    import socket as _s
    from privtmpd.daemon import MAX_CLIENTS
    silent = []
    try:
        for _ in range(MAX_CLIENTS + 40):
            s = _s.socket(_s.AF_UNIX, _s.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(daemon.socket)
            except BlockingIOError:
                pass
            silent.append(s)
        reply = daemon.create(4242)     # waits until the silent ones time out
        assert reply["ok"], reply
    finally:
        for s in silent:
            s.close()
    assert daemon.destroy(4242)["ok"]


@pytest.mark.root
def test_a_million_files(daemon, figures):
    """A job that leaves 1 000 000 small files: the Epilog's wait stays that
    of an empty job (the tree is renamed away, O(1)) and the background
    removal frees everything."""
    assert daemon.create(4300)["ok"]
    top = f"{daemon.job_dir(4300)}/tmp"
    t0 = time.monotonic()
    made = 0
    for d in range(1000):
        os.mkdir(f"{top}/d{d}")
        dfd = os.open(f"{top}/d{d}", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(1000):
                os.close(os.open(str(i), os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dfd))
                made += 1
        finally:
            os.close(dfd)
    built = time.monotonic() - t0
    t0 = time.monotonic()
    assert daemon.destroy(4300)["ok"]
    epilog_ms = (time.monotonic() - t0) * 1000
    assert not os.path.exists(daemon.job_dir(4300))        # out of the way at once
    t0 = time.monotonic()
    daemon.wait_removals(timeout=600)
    removed = time.monotonic() - t0
    assert [n for n in os.listdir(daemon.base_parent) if "4300" in n] == []
    assert "files=1000000" in daemon.log()
    # A rename, whatever the tree holds; removing it in the Epilog's wait
    # would take minutes.  Generous for a busy disk still writing back the
    # million inodes just made.
    assert epilog_ms < 10000
    figures("a job that left a million small files", files=made, epilog_ms=round(epilog_ms, 1),
            removal_seconds=round(removed, 1), build_seconds=round(built, 1), leaked=0)

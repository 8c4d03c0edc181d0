"""Regression tests for the findings of a security review of the daemon:
each case failed (or could not be expressed) before its fix."""

import os
import stat
import time

import pytest

from privtmpd import config, names, runstate, safefs


# --- a namespace never goes to another user -------------------------------

@pytest.mark.root
def test_existing_namespace_is_not_reused_for_another_user(daemon):
    """A namespace left by an earlier job with the same id and restart count
    (missed Epilog, then job ids wrapped) is rebuilt for the new owner,
    never handed over."""
    assert daemon.create(7001, uid=65534, gid=65534)["ok"]
    with open(f"{daemon.job_dir(7001)}/tmp/secret", "w") as f:
        f.write("first owner\n")
    first = runstate.read_state(daemon.cfg, 7001)["created"]
    again = daemon.create(7001, uid=1, gid=1)
    assert again["ok"] and not again["existing"]
    st = runstate.read_state(daemon.cfg, 7001)
    # (namespace inode numbers are reused: the state's creation time tells)
    assert st["uid"] == 1 and st["created"] != first
    assert os.listdir(f"{daemon.job_dir(7001)}/tmp") == []
    assert os.stat(f"{daemon.job_dir(7001)}/tmp").st_uid == 1
    # The same owner again is a duplicate Prolog: one namespace.
    assert daemon.create(7001, uid=1, gid=1)["existing"]
    assert daemon.destroy(7001)["ok"]


# --- a squatter removing its displaced entry cannot fail the Prolog -------

@pytest.mark.root
def test_displaced_entry_vanishing_is_not_an_error(tmp_path):
    pfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = safefs.Placement({})
        safefs._note_displaced(pfd, ".gone.new.x", "job.1.0", result)   # nothing there: no raise
        assert "removed meanwhile" in result.displaced
        assert not result.displaced_ours
    finally:
        os.close(pfd)


# --- removal is bounded against a writer that never stops -----------------

@pytest.mark.root
def test_remove_tree_gives_up_on_a_tree_that_keeps_growing(tmp_path, monkeypatch):
    top = tmp_path / "victim"
    top.mkdir()
    (top / "f0").write_bytes(b"")
    real_empty = safefs._empty
    counter = [0]

    def empty_then_refill(fd, stats, *args):
        # What a process holding a directory fd of the tree could do:
        # every pass finds something new.
        real_empty(fd, stats, *args)
        counter[0] += 1
        fd2 = os.open(f"f{counter[0]}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd)
        os.close(fd2)

    monkeypatch.setattr(safefs, "_empty", empty_then_refill)
    monkeypatch.setattr(safefs, "PASSES_SECONDS", 0.3)
    pfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.monotonic()
        stats = safefs.remove_tree(pfd, "victim")
        assert time.monotonic() - t0 < 5
    finally:
        os.close(pfd)
    assert not stats.complete and counter[0] > 2
    assert any("remove_tree" in e for e in stats.errors)


# --- one bounded walker for usage -----------------------------------------

@pytest.mark.root
def test_tree_usage_is_bounded_and_never_opens_more_than_max_depth(tmp_path):
    d = tmp_path / "t"
    deep = d
    for _ in range(safefs.MAX_DEPTH + 10):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x" * 8192)
    for i in range(50):
        (d / f"wide{i}").mkdir()
    pfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        nbytes, count, complete = safefs.tree_usage(pfd, "t")
        assert not complete                  # deeper than MAX_DEPTH: not all seen
        assert count >= safefs.MAX_DEPTH + 50
        nbytes, count, complete = safefs.tree_usage(pfd, "t", max_entries=10)
        assert not complete and count == 11
    finally:
        os.close(pfd)


# --- keep_failed= opens the top, never the user's directories -------------

@pytest.mark.root
def test_kept_directory_is_private_to_its_owner_whatever_mode(daemon_factory):
    d = daemon_factory("keep_failed=1h mode=0755")
    assert d.create(7002, uid=65534, gid=65534)["ok"]
    assert stat.S_IMODE(os.stat(f"{d.job_dir(7002)}/tmp").st_mode) == 0o755
    assert d.request(op="destroy", job="7002", exit_code="1")["ok"]
    kept = [n for n in os.listdir(d.base_parent) if ".kept." in n]
    assert len(kept) == 1
    top = f"{d.base_parent}/{kept[0]}"
    assert stat.S_IMODE(os.stat(top).st_mode) == 0o711 and os.stat(top).st_uid == 0
    for sub in ("tmp", "var_tmp"):
        st = os.stat(f"{top}/{sub}")
        assert st.st_uid == 65534 and stat.S_IMODE(st.st_mode) == 0o700


# --- mount points under a user's directory are refused at start-up --------

@pytest.mark.root
def test_mount_target_under_a_user_directory_is_refused(tmp_path):
    owned = tmp_path / "users"
    owned.mkdir()
    (owned / "scratch").mkdir()
    os.chown(owned, 65534, 65534)
    os.chmod(tmp_path, 0o755)
    cfg = config.parse(f"base=/tmp/slurm mount={owned}/scratch", "t.conf")
    with pytest.raises(config.ConfigError, match=r"owned by uid 65534.*must belong to root"):
        config.check_filesystem(cfg)


# --- cleanup never sweeps the directories of a job still in use ----------

@pytest.mark.root
def test_cleanup_keeps_directories_of_a_job_with_processes(daemon):
    import subprocess
    assert daemon.create(7003)["ok"]
    pin = daemon.pin(7003)
    p = subprocess.Popen(["nsenter", f"--mount={pin}", "--", "sleep", "1000"])
    try:
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{p.pid}/ns/mnt").st_ino != os.stat(pin).st_ino:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Its state file becomes unreadable: cleanup cannot call it live.
        with open(names.state_path(daemon.rundir, 7003), "w") as f:
            f.write("{broken")
        reply = daemon.request(op="cleanup")
        assert [s["job"] for s in reply["skipped"]] == [7003]
        daemon.wait_removals()
        assert os.path.isdir(f"{daemon.job_dir(7003)}/tmp")
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()
    assert daemon.destroy(7003)["ok"]

"""The job lifecycle's decisions, as plain functions: what is live, what is
a duplicate Prolog, which runs a destroy tears down, what the sweep
removes and why, which kept directories keep_max evicts, and what an entry
name in the base is.  No root, no file system."""

import pytest

from privtmpd import jobdirs, jobs, kept, names, runstate

READY = runstate.STATE_READY
NS = (4026532000, 77)


def state(**kw):
    st = {"job": 5, "restart": 0, "uid": 1000, "gid": 1000, "state": READY, "ns": list(NS)}
    st.update(kw)
    return st


@pytest.mark.parametrize("st,ident,live", [
    (state(), NS, True),
    (state(), None, False),                                   # pin gone
    (state(), (4026532000, 78), False),                       # pin holds another namespace
    (state(state=runstate.STATE_CREATING), NS, False),        # a half-made create
    (None, NS, False),                                        # pin without state
    ({}, NS, False),
    (state(ns=None), NS, False),
])
def test_live_only_when_ready_and_the_pin_holds_the_recorded_namespace(st, ident, live):
    assert jobs.is_live(st, ident) is live


def test_a_duplicate_prolog_needs_the_same_run_and_owner():
    assert jobs.is_duplicate_create(state(), NS, 0, 1000, 1000)
    assert not jobs.is_duplicate_create(state(), NS, 1, 1000, 1000)       # requeued: a new run
    assert not jobs.is_duplicate_create(state(), NS, 0, 1001, 1000)       # ids wrapped: another user
    assert not jobs.is_duplicate_create(state(), NS, 0, 1000, 1001)
    assert not jobs.is_duplicate_create(state(), None, 0, 1000, 1000)


@pytest.mark.parametrize("st,hint,runs", [
    (state(restart=0), None, [0]),
    (state(restart=0), 1, [0, 1]),      # Slurm 22.05: the requeued run's Epilog sees 1 for run 0
    (state(restart=3), 3, [2, 3]),
    ({}, 0, [0]),
    ({}, None, []),
    (state(restart="x"), 2, [1, 2]),     # a state that lies about its run is not believed
])
def test_a_destroy_looks_for_the_runs_slurm_may_mean(st, hint, runs):
    assert jobs.runs_to_tear_down(st, hint) == runs


def E(name, kind, job=None, restart=None):
    return jobdirs.Entry(name, kind, job, restart)


@pytest.mark.parametrize("entry,live,busy,reason", [
    (E("s.5.0", "job", 5, 0), {5: state(restart=0)}, set(), None),
    (E("s.5.0", "job", 5, 0), {}, set(), "no live namespace for job 5"),
    (E("s.5.0", "job", 5, 0), {5: state(restart=1)}, set(), "job 5 is running as restart 1, this is run 0"),
    (E("s.5.0", "job", 5, 0), {5: None}, set(), None),               # processes still inside: keep all
    (E("s.5.0.deleting.ab", "trash", 5), {}, set(), "interrupted removal"),
    (E("s.5.0.deleting.ab", "trash", 5), {}, {"s.5.0.deleting.ab"}, None),     # being removed
    (E("s.5.0.deleting-kept.ab", "kept-trash", 5), {}, set(), "interrupted removal"),
    (E(".s.5.0.new.ab", "temporary", 5), {}, set(), "left by an interrupted job start"),
    (E("s.5.0.kept.99.1.ab", "kept", 5, 0), {}, set(), None),        # kept: its expiry decides
])
def test_the_sweep_removes_what_no_live_job_owns(entry, live, busy, reason):
    assert jobs.sweep_reason(entry, live, busy) == reason


@pytest.mark.parametrize("name,kind,job", [
    ("s.5.0", "job", 5),
    ("s.5.0.kept.1700000000.1.ab12", "kept", 5),
    ("s.5.0.kept.1700000000.1", "kept", 5),               # an earlier version's kept name
    ("s.5.0.deleting.ab12", "trash", 5),
    ("s.5.0.deleting-kept.ab12", "kept-trash", 5),
    (".s.5.0.new.ab12", "temporary", 5),
    (".s.5.0.aside.ab12", "temporary", 5),
    ("s.05.0", None, None), ("s.5.0/x", None, None), ("t.5.0", None, None), ("s.5", None, None),
    ("s.5.0.deleting.", None, None), ("s.-1.0", None, None), ("s.5.0 ", None, None),
])
def test_entries_in_the_base_are_known_by_name(name, kind, job):
    e = jobdirs.classify(names.NameMatcher("s"), name)
    assert (e and e.kind, e and e.job) == (kind, job)


def K(name, uid, until):
    return {"name": name, "uid": uid, "until": until, "job": 1, "restart": 0, "path": "/x/" + name}


def test_keep_max_evicts_the_oldest_of_the_user_who_uses_the_most():
    ks = [K("a1", 1, 10), K("b1", 2, 11), K("a2", 1, 12), K("b2", 2, 13)]
    sizes = {"a1": 50, "a2": 50, "b1": 10, "b2": 10}
    gone = kept.eviction(ks, sizes, keep_max=70)
    assert [k["name"] for k, _ in gone] == ["a1"]
    assert "over keep_max=70" in gone[0][1] and "uid 1 uses the most" in gone[0][1]
    # Tighter: user 1 loses both before user 2 loses anything of theirs...
    assert [k["name"] for k, _ in kept.eviction(ks, sizes, keep_max=20)] == ["a1", "a2"]
    # ...and when they are level, the next oldest of either goes.
    assert [k["name"] for k, _ in kept.eviction(ks, sizes, keep_max=0)] == ["a1", "a2", "b1", "b2"]
    assert kept.eviction(ks, sizes, keep_max=120) == []


def test_keep_max_counts_unmeasured_directories_as_empty():
    ks = [K("a1", 1, 10), K("b1", 2, 11)]
    assert kept.eviction(ks, {"b1": 100}, keep_max=50)[0][0]["name"] == "b1"


def test_job_ids_in_names_for_log_lines():
    assert jobdirs.job_of("s", "s.5.0.deleting.ab") == 5
    assert jobdirs.job_of("s", ".s.12.0.new.ab") == 12
    assert jobdirs.job_of("s", "t.5.0") is None
    assert jobdirs.job_of("s", "s.x.0") is None


def test_request_user_for_a_failed_request_needs_no_state_for_create():
    assert jobs.request_user(None, "create", {"job": 5, "uid": 1000, "user": "alice"}) == "alice"
    assert jobs.request_user(None, "create", {"job": 5, "uid": 1000}) == 1000
    assert jobs.request_user(None, "status", {}) is None

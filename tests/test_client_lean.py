"""The hook client stays lean: it imports neither json nor socket (each
costs every job ~6 ms of interpreter start-up), and its hand-written
request encoding is exactly what json reads back."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from privtmpd import client  # noqa: E402

HEAVY = {"json", "socket", "enum", "re", "selectors", "collections", "functools"}


def test_hook_client_imports_no_heavy_module():
    code = ("import sys; before = set(sys.modules); sys.path.insert(0, %r); "
            "import privtmpd.client; print(' '.join(sorted(set(sys.modules) - before)))" % REPO)
    out = subprocess.run(["/usr/bin/python3", "-IS", "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "privtmpd.client" in out
    assert not HEAVY & set(out), f"the hook client pulls in {sorted(HEAVY & set(out))}"


_values = st.one_of(st.text(), st.booleans(), st.none(), st.integers(-2 ** 70, 2 ** 70))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _values, max_size=6))
def test_encode_request_round_trips_through_json(msg):
    data = client.encode_request(msg)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    data.decode("ascii")
    assert json.loads(data) == msg


@settings(deadline=None)       # no 200 ms per example: a busy machine stalls one now and then
@given(st.text())
def test_strings_are_written_as_json_writes_them(text):
    assert client._json_str(text) == json.dumps(text)


def test_other_values_fall_back_to_json():
    msg = {"op": "x", "list": [1, "a"], "float": 1.5, "nested": {"a": None}}
    assert json.loads(client.encode_request(msg)) == msg


@pytest.fixture
def fake_daemon(tmp_path):
    """A one-connection server on a Unix socket answering with `reply`."""
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    got = []

    def serve(reply):
        def loop():
            conn, _ = srv.accept()
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                buf += chunk
            got.append(buf)
            conn.sendall(reply)
            conn.close()
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t

    yield path, serve, got
    srv.close()


ENV = {"SLURM_JOB_ID": "42", "SLURM_JOB_UID": "1000", "SLURM_JOB_GID": "1000",
       "SLURM_JOB_USER": 'we"ird\\us\u00e9r\n', "SLURM_JOB_RESTART_COUNT": "1"}


def test_hook_sends_what_json_would_and_accepts_success(fake_daemon):
    path, serve, got = fake_daemon
    t = serve(b'{"ok":true,"job":42,"dir":"/x","existing":false}\n')
    assert client.run_hook("prolog", ["--socket", path], ENV) == 0
    t.join(5)
    assert json.loads(got[0]) == client._hook_request("prolog", ENV)


@pytest.mark.parametrize("reply", [b'{"ok":false,"error":"boom","kind":"failed"}\n',
                                   b'{"ok":truex}\n', b'{"ok":true', b'not json\n', b'[1]\n'])
def test_hook_fails_on_anything_but_a_success(fake_daemon, reply, capsys):
    path, serve, _ = fake_daemon
    t = serve(reply)
    assert client.run_hook("epilog", ["--socket", path], ENV) == 1
    t.join(5)
    assert "privtmpd-epilog: job=42:" in capsys.readouterr().err


def test_request_parses_full_replies(fake_daemon):
    path, serve, _ = fake_daemon
    serve(b'{"ok":true,"jobs":[{"job":1,"processes":[]}]}\n')
    assert client.request({"op": "list"}, path, timeout=5, retry=0) == {"ok": True, "jobs": [{"job": 1, "processes": []}]}


def test_request_reports_a_missing_daemon(tmp_path):
    with pytest.raises(client.ClientError, match="is privtmpd running"):
        client.request({"op": "status"}, str(tmp_path / "none.sock"), timeout=1, retry=0)


@pytest.mark.parametrize("code", [0, 1, 2])
def test_exit_hook_keeps_status_and_output(code):
    """Success ends with posix._exit (no interpreter finalization), after
    flushing what was written; a failure exits normally.  Either way the
    status is the hook's and nothing written is lost."""
    prog = ("import sys; sys.path.insert(0, %r); from privtmpd.client import exit_hook; "
            "print('out', end=''); sys.stderr.write('err'); exit_hook(%d); print('not reached')" % (REPO, code))
    r = subprocess.run(["/usr/bin/python3", "-IS", "-c", prog], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (code, "out", "err")


@pytest.mark.parametrize("link_to,ctx,op", [
    ("epilog.py", None, "destroy"),                 # epilog.d/50-privtmpd -> .../epilog: the chain says so
    ("prolog.py", None, "create"),
    ("prolog.py", "epilog_slurmd", "destroy"),      # slurmd's word wins over a wrong link
    ("epilog.py", "prolog_slurmd", "create"),
    ("epilog.py", "prolog_slurmctld", None),        # not a hook of ours: refused
])
def test_the_hook_kind_comes_from_slurmd_or_the_link_chain(tmp_path, fake_daemon, link_to, ctx, op):
    """An Epilog run as a Prolog would build a namespace at job end that
    nothing tears down: the kind is never guessed from a name like
    /etc/slurm/epilog.d/50-privtmpd."""
    path, serve, got = fake_daemon
    t = serve(b'{"ok":true}\n') if op else None     # a refused hook never connects
    hook = tmp_path / "50-privtmpd"
    hook.symlink_to(os.path.join(REPO, "scripts", link_to))
    env = dict(ENV, **({"SLURM_SCRIPT_CONTEXT": ctx} if ctx else {}))
    r = subprocess.run([str(hook), "--socket", path], env=env, capture_output=True, text=True, timeout=60)
    if op:
        t.join(5)
        assert r.returncode == 0 and json.loads(got[0])["op"] == op, (r.stderr, got)
    else:
        assert r.returncode != 0 and "not a PrologSlurmctld" in r.stderr and not got, r.stderr


def test_a_hook_named_neither_way_refuses_to_guess(tmp_path):
    (tmp_path / "bin").mkdir()
    hook = tmp_path / "bin" / "50-privtmpd"
    hook.write_bytes(open(os.path.join(REPO, "scripts", "prolog.py"), "rb").read())
    hook.chmod(0o755)
    (tmp_path / "privtmpd").symlink_to(os.path.join(REPO, "privtmpd"))
    r = subprocess.run([str(hook), "--socket", str(tmp_path / "none")], env={"SLURM_JOB_ID": "5"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cannot tell Prolog from Epilog" in r.stderr, r.stderr

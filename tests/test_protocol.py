"""Request framing and validation: everything a client can send either
parses into a known operation with checked fields, or is a ProtocolError
with a message that says what is wrong."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privtmpd import protocol
from privtmpd.protocol import ProtocolError, parse_request


def line(obj):
    return json.dumps(obj).encode() + b"\n"


CREATE = {"op": "create", "job": "12", "restart": "0", "uid": "1000", "gid": "100", "user": "alice"}


def test_valid_requests():
    assert parse_request(line(CREATE)) == ("create", {"job": 12, "restart": 0, "uid": 1000, "gid": 100,
                                                      "user": "alice"})
    assert parse_request(line({"op": "destroy", "job": "12"})) == ("destroy", {"job": 12})
    assert parse_request(line({"op": "destroy", "job": "12", "restart": "3"})) == \
        ("destroy", {"job": 12, "restart": 3})
    assert parse_request(line({"op": "status"})) == ("status", {})
    assert parse_request(line({"op": "list"})) == ("list", {})
    assert parse_request(line({"op": "show", "job": "7"})) == ("show", {"job": 7})
    assert parse_request(line({"op": "cleanup", "dry_run": True})) == ("cleanup", {"dry_run": True})
    # CRLF from a hand-typed request (socat) is JSON whitespace.
    assert parse_request(b'{"op":"status"}\r\n') == ("status", {})


def test_max_size_boundary():
    head = b'{"op":"status"'
    exact = head + b" " * (protocol.MAX_REQUEST - len(head) - 2) + b"}\n"
    assert len(exact) == protocol.MAX_REQUEST
    assert parse_request(exact) == ("status", {})
    over = head + b" " * (protocol.MAX_REQUEST - len(head) - 1) + b"}\n"
    with pytest.raises(ProtocolError, match="larger than 4096 bytes"):
        parse_request(over)


BAD = [
    (b"", "empty request"),
    (b'{"op":"status"}', "truncated request (no newline at the end)"),
    (b'{"op":"sta', "truncated request"),
    (b"x" * 5000 + b"\n", "larger than 4096 bytes"),
    (b'{"op":"status"}' + b" " * 5000 + b"\n", "larger than 4096 bytes"),
    (b'{"op":"stat\xffus"}\n', "not valid UTF-8"),
    (b'{"op":"status", "user":"\xed\xa0\x80"}\n', "not valid UTF-8"),     # encoded surrogate
    (b"{op: status}\n", "not valid JSON"),
    (b"\n", "not valid JSON"),
    (b'{"op":"status"}}\n', "not valid JSON"),
    (b"[" * 2000 + b"]" * 2000 + b"\n", "nested too deeply"),
    (b'{"op":' + b"[" * 2000 + b"]" * 2000 + b"}\n", "nested too deeply"),
    (b'["op","status"]\n', "must be a JSON object"),
    (b'"status"\n', "must be a JSON object"),
    (b"null\n", "must be a JSON object"),
    (b"12\n", "must be a JSON object"),
    (b"{}\n", "unknown operation None"),
    (line({"op": "format"}), "unknown operation 'format'"),
    (line({"op": 1}), "unknown operation 1"),
    (line({"op": ["create"]}), "unknown operation"),
    (line({"op": "status", "verbose": True}), "status: unknown field(s) 'verbose'"),
    (line({**CREATE, "path": "/etc"}), "create: unknown field(s) 'path'"),
    (line({k: v for k, v in CREATE.items() if k != "uid"}), "create: missing field 'uid'"),
    (line({"op": "destroy"}), "destroy: missing field 'job'"),
    (line({**CREATE, "job": 12}), "create: job: job id must be a string of decimal digits, got int"),
    (line({**CREATE, "job": None}), "got NoneType"),
    (line({**CREATE, "job": ["12"]}), "got list"),
    (line({**CREATE, "job": "../12"}), "create: job: job id '../12' is not a plain decimal number"),
    (line({**CREATE, "job": "012"}), "not a plain decimal number"),
    (line({**CREATE, "job": "١٢"}), "not a plain decimal number"),
    (line({**CREATE, "job": "4294967295"}), "out of range"),
    (line({**CREATE, "restart": "65536"}), "create: restart: restart count 65536 is out of range"),
    (line({**CREATE, "uid": "-1"}), "create: uid: uid '-1'"),
    (line({**CREATE, "gid": 0}), "create: gid: gid must be a string"),
    (line({**CREATE, "user": 5}), "create: user: user must be a printable string"),
    (line({**CREATE, "user": "a\nb"}), "create: user: user must be a printable string"),
    (line({**CREATE, "user": "u" * 65}), "at most 64 characters"),
    (line({"op": "cleanup", "dry_run": "yes"}), "cleanup: dry_run: must be true or false"),
    (line({"op": "cleanup", "dry_run": 1}), "must be true or false"),
    (line({"op": "status"}) + b'{"op":"status"}\n', "unexpected data after the request line"),
    (line({"op": "status"}) + b"x", "unexpected data after the request line"),
    (line({"op": "status"}) + b"\n", "unexpected data after the request line"),
    (b'{"op":"status"}\x00\n', "not valid JSON"),
    (b'{"op":"show","job":"1","job":12}\n', "got int"),     # the last duplicate is the one checked
]


@pytest.mark.parametrize("data,fragment", BAD, ids=[repr(b[0][:40]) for b in BAD])
def test_bad_requests(data, fragment):
    with pytest.raises(ProtocolError) as ei:
        parse_request(data)
    assert fragment in str(ei.value), str(ei.value)
    # The message goes back to the client in one JSON line: keep it bounded.
    assert len(str(ei.value)) < 400


def test_replies_are_one_json_line():
    for reply in (protocol.ok(job=1, dir="/tmp/slurm.1.0"), protocol.error("boom\nbang", "bad-request")):
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1
        obj = json.loads(reply)
        assert isinstance(obj["ok"], bool)
    assert json.loads(protocol.error("x"))["kind"] == "failed"


# --- property tests ------------------------------------------------------------

def _check(data):
    try:
        op, fields = parse_request(data)
    except ProtocolError as e:
        assert str(e)
        return
    # Accepted requests are exactly the closed set, with parsed fields only.
    assert op in protocol.OPS
    assert set(fields) <= set(protocol.OPS[op])
    for key, value in fields.items():
        if key in ("job", "restart", "uid", "gid"):
            assert type(value) is int and value >= 0


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_protocol_error(data):
    _check(data)
    _check(data + b"\n")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.sampled_from(["12", "0", "65534", "create", "destroy", "status", "show", "cleanup", "../1", "١"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)

_KEY = st.sampled_from(["op", "job", "restart", "uid", "gid", "user", "dry_run", "x"]) | st.text(max_size=6)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEY, _JSON, max_size=7), st.sampled_from(sorted(protocol.OPS) + ["bogus", None]))
def test_random_objects_only_protocol_error(obj, op):
    if op is not None:
        obj["op"] = op
    _check(json.dumps(obj).encode() + b"\n")
    _check(json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4200), st.sampled_from([b"[", b"{\"a\":", b"[{\"b\":"]))
def test_deep_nesting_only_protocol_error(depth, opener):
    _check(opener * depth + b"\n")



@pytest.mark.parametrize("msg", [
    {"op": "x" * 4000},
    {"op": "status", "y" * 4000: 1},
    {"op": "status", **{f"f{i}" * 40: 1 for i in range(30)}},
    {"op": "create", "job": "1" * 3000, "restart": "0", "uid": "0", "gid": "0"},
])
def test_error_does_not_echo_a_hostile_request(msg):
    """A client's long value is quoted back shortened: the reply (and the
    daemon's log line, which carries the same text) stays small."""
    data = line(msg)
    assert len(data) <= protocol.MAX_REQUEST
    with pytest.raises(ProtocolError) as e:
        parse_request(data)
    assert len(str(e.value)) < 300, str(e.value)[:400]

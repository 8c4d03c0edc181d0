"""The closed set of requests the daemon answers, and their framing.

Framing: one request per connection, one JSON object on one line, UTF-8,
at most MAX_REQUEST bytes including the newline; nothing may follow it.
The reply is one JSON object on one line: {"ok": true, ...} or
{"ok": false, "error": "...", "kind": "..."}.

Every field is checked here, before the daemon acts: unknown operations,
unknown or missing fields, wrong types and out-of-range values are refused
with a message that names the field.  Numbers travel as decimal strings
(they come from Slurm's environment) and are parsed by names.py.
"""

import json
from typing import Any, Callable, Dict, Tuple

from . import names

MAX_REQUEST = 4096


class ProtocolError(ValueError):
    """A request that is not well-formed; the message goes back to the client."""


SHOWN_MAX = 40      # characters of a client's value quoted back in an error


def _shown(value: object) -> str:
    """A client's value as an error message may quote it: short.  The
    sender of a hostile request must not get its 4 KB back in the reply,
    nor fill the daemon's log with it."""
    text = repr(value)
    return text if len(text) <= SHOWN_MAX else f"{text[:SHOWN_MAX]}... ({len(text)} characters)"


def _job(v: object) -> int:
    return names.parse_job_id(v)


def _restart(v: object) -> int:
    return names.parse_restart_count(v)


def _uid(v: object) -> int:
    return names.parse_id(v, "uid")


def _gid(v: object) -> int:
    return names.parse_id(v, "gid")


def _user(v: object) -> str:
    if not isinstance(v, str) or len(v) > 64 or not v.isprintable():
        raise names.BadName("user must be a printable string of at most 64 characters")
    return v


def _exit_code(v: object) -> int:
    # SLURM_JOB_EXIT_CODE / SLURM_JOB_DERIVED_EC: a wait status, as decimal.
    return names.parse_id(v, "exit code")


def _slurm_conf(v: object) -> str:
    # Only ever given to scontrol as SLURM_CONF (limit_from=tmp).
    if not isinstance(v, str) or not v.startswith("/") or len(v) > 1024 or not v.isprintable():
        raise names.BadName("slurm_conf must be an absolute path")
    return v


def _flag(v: object) -> bool:
    if not isinstance(v, bool):
        raise names.BadName("must be true or false")
    return v


# op -> {field: (parser, required)}
OPS: Dict[str, Dict[str, Tuple[Callable[[object], Any], bool]]] = {
    "create": {"job": (_job, True), "restart": (_restart, True), "uid": (_uid, True),
               "gid": (_gid, True), "user": (_user, False), "slurm_conf": (_slurm_conf, False)},
    "destroy": {"job": (_job, True), "restart": (_restart, False), "exit_code": (_exit_code, False)},
    "status": {},
    "list": {},
    "show": {"job": (_job, True)},
    "cleanup": {"job": (_job, False), "dry_run": (_flag, False)},
}


MAX_DEPTH = 2       # the request object and one level in it


def _too_deep(line: bytes) -> bool:
    """Brackets nested deeper than MAX_DEPTH outside strings."""
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False            # every real request: no scan
    depth, in_str, escaped = 0, False, False
    for c in line:
        if in_str:
            if escaped:
                escaped = False
            elif c == 0x5C:     # backslash
                escaped = True
            elif c == 0x22:     # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
    return False


def parse_request(data: bytes) -> Tuple[str, Dict[str, Any]]:
    """bytes (as received, newline included) -> (op, {field: value})."""
    if not data:
        raise ProtocolError("empty request")
    if len(data) > MAX_REQUEST:
        raise ProtocolError(f"request larger than {MAX_REQUEST} bytes")
    line, nl, rest = data.partition(b"\n")
    if not nl:
        raise ProtocolError("truncated request (no newline at the end)")
    if rest:
        raise ProtocolError("unexpected data after the request line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request is not valid UTF-8") from None
    if _too_deep(line):
        # Requests are flat objects.  Refused before parsing, the same on
        # every Python (3.13's parser no longer stops at depth ~1000).
        raise ProtocolError("request nested too deeply")
    try:
        msg = json.loads(text)
    except RecursionError:
        raise ProtocolError("request nested too deeply") from None
    except ValueError as e:
        raise ProtocolError(f"request is not valid JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("request must be a JSON object")
    op = msg.pop("op", None)
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown operation {_shown(op)} (known: {', '.join(sorted(OPS))})")
    spec = OPS[op]
    unknown = sorted(set(msg) - set(spec))
    if unknown:
        shown = ", ".join(map(_shown, unknown[:3])) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise ProtocolError(f"{op}: unknown field(s) {shown}")
    fields: Dict[str, Any] = {}
    for key, (parse, required) in spec.items():
        if key not in msg:
            if required:
                raise ProtocolError(f"{op}: missing field {key!r}")
            continue
        try:
            fields[key] = parse(msg[key])
        except names.BadName as e:
            raise ProtocolError(f"{op}: {key}: {e}") from None
    return op, fields


def encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def ok(**fields: Any) -> bytes:
    return encode({"ok": True, **fields})


def error(message: str, kind: str = "failed") -> bytes:
    """kind: "bad-request" (the client's fault), "failed" (ours or the system's)."""
    return encode({"ok": False, "error": message, "kind": kind})

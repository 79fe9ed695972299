"""The decision log's wire format: what a sidecar ships and a collector accepts.

A batch is one JSON document, POSTed with ``Content-Type: application/json``,
``Content-Encoding: gzip`` and ``Authorization: Bearer TOKEN``::

    {"format": "safous-decisions/1", "records": [RECORD, ...]}

A record is an activity log row with its trace, the pod that decided and the record's id — the
fields of a JSON decision log line, under the same names::

    {"id": "9f3c…-1a", "pod": "app-7d9f-x2k4", "time": "2026-11-28T14:00:00.123Z",
     "request_id": "…", "username": "…", "source_ip": "…", "method": "GET", "host": "…",
     "path": "…", "policy": "app" | null, "policy_source": "match" | "route",
     "decision": "allow" | "deny" | "audit_deny", "code": "value_mismatch", "reason": "…",
     "latency_ms": 1.25, "trace": {…} | null}

The id is unique to the record (a random prefix per process, then a counter), so a batch sent
again after a lost answer is written once. Every bound is the activity log's own
(``sidecar.db.activity``): the sidecar cuts a value to it before shipping, so that what it sends
is never refused; the collector refuses a batch with any value past it, whole, naming the first
problem (``MalformedBatch``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from ..db import ActivityRecord, iso_time, parse_iso_time
from ..db.activity import (
    ACTIVITY_FIELD_CHARS,
    HOST_CHARS,
    METHOD_CHARS,
    PATH_CHARS,
    REQUEST_ID_CHARS,
    SOURCE_IP_CHARS,
    STATUS_CHARS,
    TRACE_MAX_BYTES,
    USERNAME_CHARS,
    utf8_encodable,
)
from ..decision import result_name

__all__ = [
    "FORMAT",
    "MAX_BATCH_BYTES",
    "MAX_BODY_BYTES",
    "MAX_RECORDS",
    "POD_NAME",
    "MalformedBatch",
    "batch_body",
    "encode_record",
    "read_batch",
]

FORMAT = "safous-decisions/1"

MAX_RECORDS = 5000
"""Records a collector takes in one batch at most."""
MAX_BODY_BYTES = 4 << 20
"""A batch's size on the wire (gzip'd) a collector takes at most."""
MAX_JSON_BYTES = 8 << 20
"""A batch's size once decompressed a collector takes at most: a gzip bomb stops there (and the
objects one batch parses into, some six times its JSON, stay within about 50 MB)."""
MAX_BATCH_BYTES = 2 << 20
"""What a sidecar puts in one batch at most, uncompressed: within both bounds above whatever
gzip makes of it."""
MAX_BATCH_RECORDS = 2000
"""Records a sidecar puts in one batch at most (``--decision-log-batch-records``)."""

POD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
"""A pod's name: a DNS name as Kubernetes gives pods and hosts, at most 253 characters."""
_RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
POLICY_CHARS = 1024
"""A policy's name as a record carries it at most (admins name policies; names are not bounded)."""
_TIME_CHARS = 40

# The activity log's ``status`` is ``reason`` here, as in a decision log line.
_WIRE = {"status": "reason"}
# The record's client values and their bounds, by name on the wire.
_CHARS: Mapping[str, int] = {_WIRE.get(name, name): chars for name, chars in ACTIVITY_FIELD_CHARS.items()}
_DECISIONS = {"allow": (True, False), "deny": (False, False), "audit_deny": (True, True)}


class MalformedBatch(ValueError):
    """A batch that is not one a sidecar sends: not JSON, another format, too many records, a
    record with a field missing, of the wrong type or past its bound. The message names the
    first problem (``record 3: path: longer than 1024 characters``)."""


# ------------------------------------------------------------------------------ the sidecar

def encode_record(record: ActivityRecord, trace: str | None, *, pod: str, record_id: str) -> bytes:
    """``record`` as it is shipped, with its stored trace (``db.prepare_activity``'s JSON)."""
    # One literal, the bounds as constants: this runs for every decision (in the activity
    # writer's thread, but on the same interpreter as the checks), where a loop over the
    # fields cost twice as much.
    entry = {"id": record_id, "pod": pod, "time": iso_time(record.at),
             "request_id": record.request_id[:REQUEST_ID_CHARS], "username": record.username[:USERNAME_CHARS],
             "source_ip": record.source_ip[:SOURCE_IP_CHARS], "method": record.method[:METHOD_CHARS],
             "host": record.host[:HOST_CHARS], "path": record.path[:PATH_CHARS],
             "policy": record.policy[:POLICY_CHARS] if record.policy is not None else None,
             "policy_source": record.policy_source, "decision": result_name(record.allowed, record.audit_deny),
             "code": record.code, "reason": record.status[:STATUS_CHARS], "latency_ms": round(record.latency_ms, 3),
             # The trace is JSON already (as rules.db stores it): embedded as it is, not parsed again.
             "trace": orjson.Fragment(trace) if trace is not None else None}
    try:
        return orjson.dumps(entry)
    except TypeError:
        # A lone surrogate (a client's header can carry one), which UTF-8 cannot: replaced, so
        # that one odd value cannot cost a batch its other records.
        entry["trace"] = json.loads(trace) if trace is not None else None
        return orjson.dumps(utf8_encodable(entry))


def batch_body(records: Sequence[bytes]) -> bytes:
    """The batch document of encoded records (``encode_record``)."""
    return b'{"format":"' + FORMAT.encode() + b'","records":[' + b",".join(records) + b"]}"


# ---------------------------------------------------------------------------- the collector

def read_batch(data: bytes | bytearray, *, max_records: int = MAX_RECORDS) -> list[ActivityRecord]:
    """The records of a batch (decompressed), each with its ``pod``, ``record_id`` and trace.
    Raises ``MalformedBatch``."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8 and nesting past 1,024 levels
        raise MalformedBatch(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MalformedBatch(f"not a batch of decisions: a JSON object with \"format\": \"{FORMAT}\" is expected")
    records = doc.get("records")
    if not isinstance(records, list):
        raise MalformedBatch("\"records\" is not a list")
    if len(records) > max_records:
        raise MalformedBatch(f"{len(records)} records, more than the {max_records} a batch may hold")
    read = []
    for number, entry in enumerate(records, start=1):
        try:
            read.append(_record(entry))
        except MalformedBatch as exc:
            raise MalformedBatch(f"record {number}: {exc}") from None
    return read


def _record(entry: Any) -> ActivityRecord:
    if not isinstance(entry, dict):
        raise MalformedBatch("not a JSON object")
    values = {name: _text(entry, name, chars) for name, chars in _CHARS.items()}
    record_id = _matching(entry, "id", _RECORD_ID, "1 to 64 letters, digits, _ or -")
    pod = _matching(entry, "pod", POD_NAME, "a DNS name (letters, digits, '.', '_', '-'; at most 253)")
    code = _matching(entry, "code", _CODE, "a decision code (lower case letters, digits and _)")
    decision = entry.get("decision")
    if decision not in _DECISIONS:
        raise MalformedBatch(f"decision: one of {', '.join(_DECISIONS)} is expected")
    allowed, audit_deny = _DECISIONS[decision]
    policy_source = entry.get("policy_source")
    if policy_source not in ("match", "route"):
        raise MalformedBatch("policy_source: match or route is expected")
    policy = entry.get("policy")
    if policy is not None and not (isinstance(policy, str) and len(policy) <= POLICY_CHARS):
        raise MalformedBatch(f"policy: null or a string of at most {POLICY_CHARS} characters is expected")
    latency = entry.get("latency_ms")
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not 0 <= latency < math.inf:
        raise MalformedBatch("latency_ms: a number of milliseconds is expected")
    when = _text(entry, "time", _TIME_CHARS)
    try:
        at = parse_iso_time(when)
    except ValueError:
        raise MalformedBatch(f"time: {when!r} is not an ISO 8601 time") from None
    if not 0 <= at < 253402300800:  # 1970 to 9999: what the log's time format writes
        raise MalformedBatch(f"time: {when!r} is out of range")
    trace = entry.get("trace")
    if trace is not None:
        _check_trace(trace)
        # Cutting a trace past the bound costs time quadratic in its rules (a million empty
        # ones fit in a few KB of gzip): refused instead. A sidecar ships the trace it stored,
        # within the bound already.
        try:
            size = len(orjson.dumps(trace))
        except orjson.JSONEncodeError:  # nested past the 254 levels orjson writes: no sidecar's trace is
            raise MalformedBatch("trace: nested too deeply") from None
        if size > TRACE_MAX_BYTES:
            raise MalformedBatch(f"trace: larger than {TRACE_MAX_BYTES} bytes")
    return ActivityRecord(
        at=at, request_id=values["request_id"], username=values["username"], source_ip=values["source_ip"],
        host=values["host"], path=values["path"], method=values["method"], policy=policy, allowed=allowed,
        code=code, status=values["reason"], latency_ms=float(latency), policy_source=policy_source,
        audit_deny=audit_deny, trace=(lambda: trace) if trace is not None else None, pod=pod, record_id=record_id)


def _text(entry: dict[str, Any], name: str, chars: int) -> str:
    value = entry.get(name)
    if not isinstance(value, str):
        raise MalformedBatch(f"{name}: a string is expected")
    if len(value) > chars:
        raise MalformedBatch(f"{name}: longer than {chars} characters")
    return value


def _matching(entry: dict[str, Any], name: str, pattern: re.Pattern[str], what: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise MalformedBatch(f"{name}: {what} is expected")
    return value


def _check_trace(doc: Any) -> None:
    """What ``safous-admin explain`` relies on in a trace: the rest is shown as text, whatever
    it holds."""
    if not isinstance(doc, dict):
        raise MalformedBatch("trace: null or a JSON object is expected")
    rules = doc.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(rule, dict) for rule in rules):
        raise MalformedBatch("trace: rules: a list of objects is expected")
    for rule in rules:
        request = rule.get("request")
        if request is not None and not (isinstance(request, dict) and _pairs(request.get("headers", []))):
            raise MalformedBatch("trace: a rule's request: an object whose headers are [name, value] pairs "
                                 "is expected")
        answer = rule.get("answer")
        actions = rule.get("actions", [])
        if (answer is not None and not isinstance(answer, dict)) or not (
                isinstance(actions, list) and all(isinstance(action, dict) for action in actions)):
            raise MalformedBatch("trace: a rule's answer: an object, and its actions: a list of objects, are "
                                 "expected")


def _pairs(headers: Any) -> bool:
    return isinstance(headers, list) and all(isinstance(pair, list) and len(pair) == 2 for pair in headers)

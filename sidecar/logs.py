"""Log lines on stderr: one JSON object per line (default) or readable text.

Fields passed with ``extra=`` become JSON keys, or ``key=value`` pairs in text. Nothing here
ever logs request headers wholesale, secrets or certificate bodies: callers pass only the fields
they mean to show.

One record is one line in either format (in text, a traceback follows on indented lines),
whatever a client sent: a request id, a policy name or a message may hold newlines or Unicode
line separators, so text lines escape them (JSON lines are escaped, and kept ASCII). A line
that starts in the first column always begins a record.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from .db import ActivityRecord, iso_time, parse_iso_time
from .decision import result_name

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}
_QUOTE = re.compile(r'[ ="\\]')


def _escape(char: str) -> str:
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    if code > 0xFFFF:  # JSON spells a character beyond the BMP as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def text_value(value: object) -> str:
    """``value`` as one logfmt token: as is when plain (printable, without space, ``=``, ``"``
    or backslash), else in double quotes with JSON string escapes, so that no value can end its
    field or its line. ``str.isprintable`` is false for every control character (C0, C1 such as
    U+0085), line and paragraph separators (U+2028, U+2029) and format characters."""
    text = str(value)
    if text and text.isprintable() and not _QUOTE.search(text):
        return text
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else _escape(c) for c in text) + '"'


def text_message(text: str) -> str:
    """Free text (a message, a traceback line) on one line: non-printable characters escaped
    as in JSON, the rest kept as written."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value ...`` on one line, values as ``text_value``
    tokens; a traceback follows on lines indented by two spaces."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = text_message(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={text_value(v)}" for k, v in extras.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if block:
                # An exception's text may quote a client value: indented and escaped, no line
                # of it can pass for a record.
                line += "".join("\n  " + text_message(part) for part in block.split("\n"))
        return line


class _WorkerFilter(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


_format = "json"
_worker: int | None = None


def _json_line(entry: dict[str, Any]) -> str:
    """``json.dumps(entry)``, compact, in C (orjson: a tenth of the time, for a line per
    decision). Lines stay ASCII as json.dumps makes them — a client's bidi or look-alike
    characters reach a terminal escaped — so the rare non-ASCII entry takes json.dumps."""
    try:
        line = orjson.dumps(entry)
    except TypeError:  # orjson.JSONEncodeError: e.g. a lone surrogate, which json.dumps escapes
        return json.dumps(entry, separators=(",", ":"))
    return line.decode() if line.isascii() else json.dumps(entry, separators=(",", ":"))


def _decision_entry(d: ActivityRecord) -> dict[str, Any]:
    entry = {"time": iso_time(d.at), "level": "info", "logger": "sidecar.decision",
             "message": result_name(d.allowed, d.audit_deny), "request_id": d.request_id, "policy": d.policy,
             "code": d.code, "latency_ms": round(d.latency_ms, 3), "reason": d.status, "username": d.username,
             "source_ip": d.source_ip, "method": d.method, "host": d.host, "path": d.path,
             "policy_source": d.policy_source}
    if _worker is not None:
        entry["worker"] = _worker
    return entry


def write_decisions(decisions: Sequence[Any]) -> None:
    """One ``sidecar.decision`` line per decision, written in one go (called off the request
    path with a batch). JSON lines carry the whole activity log record — the fleet's activity
    feed, read back by ``decision_from_log_line`` (``safous-admin logs activity --from-log``);
    text lines the request id, policy, result, code, latency and a denial's reason (a TCP
    connection has no response to carry it). Client values are JSON- or logfmt-escaped; never a
    header or a secret."""
    logger = logging.getLogger("sidecar.decision")
    if not logger.isEnabledFor(logging.INFO) or not logging.getLogger().handlers:
        return
    handler = logging.getLogger().handlers[0]
    if not isinstance(handler, logging.StreamHandler):
        return
    if _format == "json":
        lines = [_json_line(_decision_entry(d)) for d in decisions]
    else:
        lines = [f"{iso_time(d.at)} INFO sidecar.decision: {result_name(d.allowed, d.audit_deny)} "
                 f"request_id={text_value(d.request_id)} policy={text_value(d.policy)} code={text_value(d.code)} "
                 f"latency_ms={round(d.latency_ms, 3)}"
                 + ("" if d.allowed and not d.audit_deny else f" reason={text_value(d.status)}")
                 + (f" worker={_worker}" if _worker is not None else "") for d in decisions]
    with handler.lock:  # type: ignore[union-attr]
        handler.stream.write("\n".join(lines) + "\n")
        handler.stream.flush()


def decision_from_log_line(line: str) -> ActivityRecord | None:
    """The activity record of a JSON ``sidecar.decision`` line, or None for any other line.
    Whatever precedes the first ``{`` is ignored (``kubectl logs --prefix`` adds the pod)."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        entry = json.loads(line[start:])
        if not isinstance(entry, dict) or entry.get("logger") != "sidecar.decision":
            return None
        result = entry["message"]
        return ActivityRecord(
            at=parse_iso_time(entry["time"]), request_id=str(entry.get("request_id", "")),
            username=str(entry.get("username", "")), source_ip=str(entry.get("source_ip", "")),
            host=str(entry.get("host", "")), path=str(entry.get("path", "")), method=str(entry.get("method", "")),
            policy=entry.get("policy"), allowed=result != "deny", code=str(entry.get("code", "")),
            status=str(entry.get("reason", "")), latency_ms=float(entry.get("latency_ms", 0.0)),
            policy_source="route" if entry.get("policy_source") == "route" else "match",
            audit_deny=result == "audit_deny")
    # RecursionError: a line nested deeper than the recursion limit is anyone's text, not a
    # decision, and must not end the reading of the others.
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def configure(fmt: str, level: str, worker: int | None = None) -> None:
    """Log to stderr; with ``--workers``, each line says which worker wrote it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker is not None:
        handler.addFilter(_WorkerFilter(worker))
    global _format, _worker
    _format, _worker = fmt, worker
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

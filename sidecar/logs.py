"""Log lines on stderr: one JSON object per line (default) or readable text.

Fields passed with ``extra=`` become JSON keys. Nothing here ever logs request headers
wholesale, secrets or certificate bodies: callers pass only the fields they mean to show.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .store import iso_time

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


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
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


def write_decisions(decisions: Sequence[Any]) -> None:
    """One ``sidecar.decision`` line per decision, written in one go (called off the request
    path with a batch). Fields: request id, policy, result, code, latency — never headers,
    user names or reasons, which may carry what a client sent."""
    logger = logging.getLogger("sidecar.decision")
    if not logger.isEnabledFor(logging.INFO) or not logging.getLogger().handlers:
        return
    handler = logging.getLogger().handlers[0]
    if not isinstance(handler, logging.StreamHandler):
        return
    lines = []
    for d in decisions:
        result = "allow" if d.allowed else "deny"
        latency = round(d.latency_ms, 3)
        if _format == "json":
            entry = {"time": iso_time(d.at), "level": "info", "logger": "sidecar.decision", "message": result,
                     "request_id": d.request_id, "policy": d.policy, "code": d.code, "latency_ms": latency}
            if _worker is not None:
                entry["worker"] = _worker
            lines.append(json.dumps(entry))
        else:
            lines.append(f"{iso_time(d.at)} INFO sidecar.decision: {result} request_id={d.request_id} "
                         f"policy={d.policy} code={d.code} latency_ms={latency}"
                         + (f" worker={_worker}" if _worker is not None else ""))
    with handler.lock:  # type: ignore[union-attr]
        handler.stream.write("\n".join(lines) + "\n")
        handler.stream.flush()


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

"""What the fleet's tests share (tests/test_fleet_*.py): ``safous-admin collect`` run as its own
process, batches made and POSTed as a sidecar makes them, and fleet.db read back.

    with collector(fleet_db) as running: ...          # running.url, running.port, running.kill()
    status, answer = await post(running.url, body)    # gzip'd, with the fleet's token
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.db import ActivityRecord
from sidecar.db.activity import trace_json
from sidecar.fleet import batch_body, encode_record
from tests.helpers import ROOT, ServerLog, first_line

TOKEN = "fleet-TOKEN-3b9e0c"
TOKEN_VARIABLE = "SAFOUS_SECRET_FLEET_TOKEN"
TOKEN_ENV = {TOKEN_VARIABLE: TOKEN}
"""The environment a sidecar and the collector read the fleet's token from (``env:`` reference)."""

_ADDRESS = re.compile(r"collecting decisions on (https?://\S+?)(/v1/decisions) into ")


@dataclass
class RunningCollector:
    """A ``safous-admin collect`` process: where it takes batches, its port, its stderr log."""

    url: str
    port: int
    log: ServerLog
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.log.proc

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye, as a crashed or evicted collector goes."""
        self.proc.kill()
        self.proc.wait()

    def peak_rss_mb(self) -> float:
        """The most memory the process has held at once so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")


@contextlib.contextmanager
def collector(db: Path, *args: str, listen: str = "127.0.0.1:0", env: Mapping[str, str] = TOKEN_ENV,
              timeout: float = 20.0) -> Iterator[RunningCollector]:
    """``safous-admin --db DB collect --listen LISTEN --token env:SAFOUS_SECRET_FLEET_TOKEN ARGS``
    as its own process, once it prints its address; stopped with SIGTERM at the end (a killed
    one is only reaped)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.admin", "--db", str(db), "collect", "--listen", listen,
         "--token", f"env:{TOKEN_VARIABLE}", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    log = ServerLog(proc, group=True)
    try:
        line = first_line(proc, timeout, "the collector")
        found = _ADDRESS.search(line)
        assert found, f"no address in {line!r}; stderr:\n{log.tail()}"
        base = found[1]
        yield RunningCollector(base + found[2], int(base.rsplit(":", 1)[1]), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        log.close()
        if proc.stdout is not None:
            proc.stdout.close()


def record(request_id: str, *, allowed: bool = False, at: float = 1_790_000_000.0,
           trace: dict[str, Any] | None = None, **fields: Any) -> ActivityRecord:
    """A decision as the activity log holds it (a denial by default)."""
    values: dict[str, Any] = {
        "at": at, "request_id": request_id, "username": "alice", "source_ip": "203.0.113.7",
        "host": "app.example.com", "path": "/app", "method": "GET", "policy": "app", "allowed": allowed,
        "code": "rules_passed" if allowed else "value_mismatch",
        "status": "" if allowed else 'rule "posture": status is "unknown", expected "active"', "latency_ms": 1.5}
    values.update(fields)
    return ActivityRecord(**values, trace=(lambda: trace) if trace is not None else None)


def batch(*records: ActivityRecord, pod: str = "pod-a", ids: str = "test") -> bytes:
    """A batch as a sidecar ships it, uncompressed; record ``n`` gets the id ``IDS-n``."""
    return batch_body([encode_record(r, trace_json(r.trace()) if r.trace else None, pod=pod, record_id=f"{ids}-{n}")
                       for n, r in enumerate(records)])


def headers(token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    found = {"Content-Type": "application/json", "Content-Encoding": "gzip", **extra}
    if token is not None:
        found["Authorization"] = f"Bearer {token}"
    return found


async def post(url: str, body: bytes, *, compress: bool = True, token: str | None = TOKEN,
               **extra: str) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (gzip'd unless told) to the collector: its status and its JSON answer."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(url, data=gzip.compress(body) if compress else body,
                                headers=headers(token, **extra)) as resp:
            return resp.status, await resp.json(content_type=None)


def fleet_rows(db: Path) -> list[tuple[str | None, str, int, str, str]]:
    """(pod, request_id, allowed, code, status) of every activity log row, by id."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT pod, request_id, allowed, code, status FROM activity_log ORDER BY id").fetchall()

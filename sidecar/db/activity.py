"""The activity log table: one row per decision, appended in batches, pruned in batches, read
back by the admin script.

Times are epoch seconds in Python (``ActivityRecord.at``) and UTC ISO 8601 text with
milliseconds in rules.db (``iso_time``), so that they sort and compare as text there.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from ..decision import PolicySource
from .connection import StoreError, sqlite_utils_db, transaction, translated


class ActivityRecord(NamedTuple):
    """One decision in the activity log. ``at``: when, in epoch seconds (the check path takes
    ``time.time()``; formatting is left to the batch writer, off the event loop).

    Construct it by keyword. A named tuple, not a frozen dataclass, because every check makes
    one on the event loop: 0.7 µs against 1.6 µs."""

    at: float
    request_id: str
    username: str
    source_ip: str
    host: str
    path: str
    method: str
    policy: str | None
    allowed: bool
    code: str
    status: str
    latency_ms: float
    policy_source: PolicySource = "match"
    audit_deny: bool = False


def iso_time(epoch: float) -> str:
    """Epoch seconds as the database writes times: ``2026-11-28T14:00:00.123Z`` (milliseconds,
    truncated)."""
    # To the microsecond first (a float epoch holds no finer: a quarter of one today), so that
    # a time read back from the log, an exact millisecond a float may hold a hair below, keeps
    # its millisecond.
    seconds, micros = divmod(round(epoch * 1_000_000), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros // 1000:03d}Z"


def parse_iso_time(text: str) -> float:
    """The epoch seconds of a time in the log's format (a time without zone is UTC): the
    inverse of ``iso_time``. Raises ValueError."""
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def insert_activity(conn: sqlite3.Connection, records: Sequence[ActivityRecord]) -> None:
    """Append decisions to the activity log in one transaction. Raises ``StoreError``."""
    if not records:
        return
    with translated("cannot write the activity log"):
        with transaction(conn, immediate=True):
            conn.executemany(
                "INSERT INTO activity_log (at, request_id, username, source_ip, host, path, method,"
                " policy, allowed, code, status, latency_ms, policy_source, audit_deny)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (iso_time(r.at), r.request_id, r.username, r.source_ip, r.host, r.path, r.method,
                     r.policy, int(r.allowed), r.code, r.status, r.latency_ms, r.policy_source, int(r.audit_deny))
                    for r in records
                ],
            )


# SQLite has one writer at a time, and a connection waiting for the lock does not queue: its
# busy handler sleeps and retries, at most 100 ms apart. A pruner that took the lock again as
# soon as it released it could make the activity writer or an admin command miss every free
# moment until its busy timeout. So pruning deletes in short batches, each in its own
# transaction, and pauses between them for longer than that longest retry sleep: a waiting
# writer gets the lock in the pause, and waits at most about one batch.
PRUNE_PAUSE = 0.15


def prune_activity(conn: sqlite3.Connection, *, older_than: str | None, keep_rows: int | None,
                   batch: int = 5000, pause: float = PRUNE_PAUSE,
                   stop: threading.Event | None = None) -> int:
    """Delete the activity log rows older than ``older_than`` (a time in the log's format: UTC,
    ISO 8601), then those beyond the newest ``keep_rows`` (by id); None skips that limit. Return
    how many rows were deleted.

    At most ``batch`` rows per BEGIN IMMEDIATE transaction, ``pause`` seconds between
    transactions (see above). ``stop``, set from another thread, ends the pruning between two
    batches. Raises ``StoreError``; the batches committed before the error stay deleted."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    if keep_rows is not None and keep_rows < 0:
        raise ValueError("keep_rows must not be negative")
    deleted = 0
    need_pause = False  # none before the first transaction

    def delete(select: str, args: tuple[Any, ...]) -> bool:
        """Delete in batches the rows whose ids ``select`` gives; False if stopped."""
        nonlocal deleted, need_pause
        while True:
            if need_pause:
                if stop is not None:
                    if stop.wait(pause):
                        return False
                else:
                    time.sleep(pause)
            if stop is not None and stop.is_set():
                return False
            with transaction(conn, immediate=True):
                count = conn.execute(f"DELETE FROM activity_log WHERE id IN ({select})",
                                     (*args, batch)).rowcount
            deleted += count
            need_pause = True
            if count < batch:
                return True

    with translated("cannot prune the activity log"):
        # Walks the index on ``at`` from the oldest entry.
        if older_than is not None and not delete(
                "SELECT id FROM activity_log WHERE at < ? LIMIT ?", (older_than,)):
            return deleted  # stopped
        if keep_rows is not None:
            # The id of the oldest row to keep, read once: rows written meanwhile are newer.
            if keep_rows == 0:
                row = conn.execute("SELECT max(id) + 1 FROM activity_log").fetchone()
            else:
                row = conn.execute("SELECT id FROM activity_log ORDER BY id DESC LIMIT 1 OFFSET ?",
                                   (keep_rows - 1,)).fetchone()
            if row is not None and row[0] is not None:
                delete("SELECT id FROM activity_log WHERE id < ? ORDER BY id LIMIT ?", (row[0],))
    return deleted


def read_activity(conn: sqlite3.Connection, *, denied: bool = False, would_deny: bool = False,
                  user: str | None = None, limit: int | None = None, since: str | None = None
                  ) -> list[ActivityRecord]:
    """The newest activity log rows first, optionally only denials, only what audit-mode
    policies would have denied, one user's, or since a time (in the log's format). Raises
    ``StoreError``, also for a row whose time is not one (only plain SQL can write such a
    row)."""
    where, args = [], []
    if denied:
        where.append("allowed = 0")
    if would_deny:
        where.append("audit_deny = 1")
    if user is not None:
        where.append("username = ?")
        args.append(user)
    if since:
        where.append("at >= ?")
        args.append(since)
    with translated("cannot read the activity log"):
        rows = sqlite_utils_db(conn).table("activity_log").rows_where(
            " AND ".join(where) or None, args, order_by="at DESC, id DESC", limit=limit,
        )
        return [
            ActivityRecord(at=_epoch(r["id"], r["at"]), request_id=r["request_id"], username=r["username"],
                           source_ip=r["source_ip"], host=r["host"], path=r["path"], method=r["method"],
                           policy=r["policy"], allowed=bool(r["allowed"]), code=r["code"],
                           status=r["status"], latency_ms=r["latency_ms"],
                           policy_source=r["policy_source"] or "match", audit_deny=bool(r["audit_deny"]))
            for r in rows
        ]


def _epoch(row_id: int, text: Any) -> float:
    try:
        return parse_iso_time(text)
    except (TypeError, ValueError):
        raise StoreError(f"cannot read the activity log: row {row_id}: {text!r} is not a time "
                         "(UTC, ISO 8601)") from None

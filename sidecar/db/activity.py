"""The activity log table: one row per decision, appended in batches, pruned in batches, read
back by the admin script; and the portal's full-text index of its reasons.

Times are epoch seconds in Python (``ActivityRecord.at``) and UTC ISO 8601 text with
milliseconds in rules.db (``iso_time``), so that they sort and compare as text there.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from ..decision import PolicySource
from .connection import StoreError, sqlite_utils_db, transaction, translated
from .replaced import FileConnection


class ActivityRecord(NamedTuple):
    """One decision in the activity log. ``at``: when, in epoch seconds (the check path takes
    ``time.time()``; formatting is left to the batch writer, off the event loop).

    Construct it by keyword (only the check path lists its fields in order: 0.35 µs against
    0.7 µs). A named tuple, not a frozen dataclass, because every check makes one on the event
    loop: 0.7 µs against 1.6 µs."""

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
    # The evidence behind the decision, built when written (off the request path), or None.
    # Read back, ``traced`` says whether a trace is stored for the row.
    trace: Callable[[], dict[str, Any]] | None = None
    traced: bool = False
    # Where the decision was made and the id it was shipped under: set only in a fleet's
    # activity log (``safous-admin collect``); a pod's own rows leave both None.
    pod: str | None = None
    record_id: str | None = None


def iso_time(epoch: float) -> str:
    """Epoch seconds as the database writes times: ``2026-11-28T14:00:00.123Z`` (milliseconds,
    truncated)."""
    # To the microsecond first (a float epoch holds no finer: a quarter of one today), so that
    # a time read back from the log, an exact millisecond a float may hold a hair below, keeps
    # its millisecond.
    global _last_second
    micros = round(epoch * 1_000_000)
    seconds = micros // 1_000_000
    last = _last_second  # one tuple read: safe from any thread
    if last[0] != seconds:
        # A batch's records share a handful of seconds: strftime once per second, not per row.
        last = _last_second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return last[1] + _MILLISECONDS[micros // 1000 % 1000]


_last_second: tuple[int, str] = (-1, "")
# Twice per decision (its log line and its row): looked up, not formatted.
_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))


def parse_iso_time(text: str) -> float:
    """The epoch seconds of a time in the log's format (a time without zone is UTC): the
    inverse of ``iso_time``. Raises ValueError."""
    when = datetime.fromisoformat(text)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


log = logging.getLogger(__name__)

# What the activity log keeps of each value a client sends, in characters: the check path cuts
# them once (``pipeline``), whatever a client sent, and a collector refuses a shipped record
# past them (``sidecar.fleet``).
REQUEST_ID_CHARS = 256
USERNAME_CHARS = 256
SOURCE_IP_CHARS = 64
HOST_CHARS = 256
PATH_CHARS = 1024
METHOD_CHARS = 32
STATUS_CHARS = 2048
ACTIVITY_FIELD_CHARS = {"request_id": REQUEST_ID_CHARS, "username": USERNAME_CHARS, "source_ip": SOURCE_IP_CHARS,
                        "host": HOST_CHARS, "path": PATH_CHARS, "method": METHOD_CHARS, "status": STATUS_CHARS}
"""Those bounds by ``ActivityRecord`` field."""

# The columns in ActivityRecord's field order: a row is the record but for its time's format.
ACTIVITY_COLUMNS = ActivityRecord._fields[:14]
_INSERT = f"INSERT INTO activity_log ({', '.join(ACTIVITY_COLUMNS)}) VALUES ({','.join('?' * len(ACTIVITY_COLUMNS))})"
TRACE_MAX_BYTES = 16 * 1024
"""A stored trace's size at most (UTF-8): past it, its request bodies and answers are cut."""
DEFAULT_TRACE_KEEP = 4096
"""Traces kept at most, the newest (so at most 64 MiB), whatever the activity log's retention."""


def _row(r: ActivityRecord) -> tuple[Any, ...]:
    # allowed and audit_deny are bools: sqlite3 stores them as 1 and 0.
    return (iso_time(r.at), *r[1:14])


class PreparedActivity(NamedTuple):
    """Decisions made ready for ``insert_prepared``: their rows and stored traces. The Python
    work of writing the activity log, done apart from (and before) its transaction, so that it
    can be paced (``prepare_activity`` a slice at a time)."""

    rows: list[tuple[Any, ...]]
    docs: list[str | None]


def prepare_activity(records: Sequence[ActivityRecord]) -> PreparedActivity:
    """The rows and traces of ``records`` (a trace that cannot be built is left out, logged)."""
    return PreparedActivity([_row(r) for r in records],
                            [_built(r.trace) if r.trace is not None else None for r in records])


def insert_prepared(conn: sqlite3.Connection, prepared: PreparedActivity, *,
                    keep_traces: int = DEFAULT_TRACE_KEEP) -> None:
    """Append prepared decisions to the activity log in one transaction, with their traces (at
    most ``keep_traces`` traces are kept, the newest). Raises ``StoreError``."""
    try:
        _insert_rows(conn, _INSERT, prepared.rows, prepared.docs, keep_traces)
    except UnicodeEncodeError:
        # A header that was not UTF-8 reaches here as lone surrogates (the HTTP edge's parser
        # keeps its bytes so), which SQLite's UTF-8 cannot hold: the whole batch failed. Each
        # is replaced by U+FFFD and the batch written again, so that one client cannot take
        # everyone's decisions out of the log with a byte. Only then: no cost otherwise.
        _insert_rows(conn, _INSERT, [tuple(utf8_encodable(v) for v in row) for row in prepared.rows],
                     utf8_encodable(prepared.docs), keep_traces)


_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_encodable(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (those of its dicts and lists too)
    replaced by U+FFFD, one for one: a value stays within its bound in characters."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {utf8_encodable(k): utf8_encodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [utf8_encodable(v) for v in value]
    return value


def _insert_rows(conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]], docs: Sequence[str | None],
                 keep_traces: int) -> int:
    """Insert ``rows`` with ``sql`` and their traces ``docs`` in one transaction, keeping the
    newest ``keep_traces`` traces; return how many rows were written. A row ``sql`` leaves out
    (``ON CONFLICT DO NOTHING``) leaves its trace out too."""
    if not rows:
        return 0
    with translated("cannot write the activity log"):
        with transaction(conn, immediate=True):
            if not any(doc is not None for doc in docs):
                return conn.executemany(sql, rows).rowcount
            written = 0
            for row, doc in zip(rows, docs, strict=True):
                cursor = conn.execute(sql, row)
                if not cursor.rowcount:
                    continue  # already written (a batch shipped again): the first copy keeps its trace
                written += 1
                if doc is not None:
                    conn.execute("INSERT INTO traces (activity_id, doc) VALUES (?, ?)", (cursor.lastrowid, doc))
            # By id, not by counting rows back from the newest (a walk over as many 16 KiB rows):
            # distinct integers, at most keep_traces ids lie above max(id) - keep_traces, and a
            # new row takes max(id) + 1, so those are the newest.
            conn.execute("DELETE FROM traces WHERE id <= (SELECT max(id) FROM traces) - ?", (keep_traces,))
    return written


_INSERT_SHIPPED = (f"INSERT INTO activity_log ({', '.join(ACTIVITY_COLUMNS)}, pod, record_id) "
                   f"VALUES ({','.join('?' * (len(ACTIVITY_COLUMNS) + 2))}) "
                   "ON CONFLICT (record_id) WHERE record_id IS NOT NULL DO NOTHING")


def insert_shipped(conn: sqlite3.Connection, records: Sequence[ActivityRecord], *,
                   keep_traces: int = DEFAULT_TRACE_KEEP) -> int:
    """Append decisions shipped by the fleet's sidecars (each with its ``pod`` and
    ``record_id``) to the activity log in one transaction, with their traces, and return how
    many were new: a record whose id is already there (a batch sent again) is left out, trace
    and all. At most ``keep_traces`` traces are kept, the newest. Raises ``StoreError``."""
    prepared = prepare_activity(records)
    rows = [(*row, record.pod, record.record_id) for record, row in zip(records, prepared.rows, strict=True)]
    return _insert_rows(conn, _INSERT_SHIPPED, rows, prepared.docs, keep_traces)


def insert_activity(conn: sqlite3.Connection, records: Sequence[ActivityRecord], *,
                    keep_traces: int = DEFAULT_TRACE_KEEP) -> None:
    """Append decisions to the activity log in one transaction, with their traces (at most
    ``keep_traces`` traces are kept, the newest). Raises ``StoreError``."""
    # Prepared before the transaction: its write lock is for the admin script too, and holding
    # it while the traces are dumped and cut would make an admin command wait for that work.
    insert_prepared(conn, prepare_activity(records), keep_traces=keep_traces)


def _built(trace: Callable[[], dict[str, Any]]) -> str | None:
    """A trace as stored, or None when building it failed: the decision is written anyway."""
    try:
        doc = trace()
        try:
            return trace_json(doc)
        except UnicodeEncodeError:
            # A client's header that was not UTF-8, kept as lone surrogates (the request id,
            # a path): the trace is kept with U+FFFD in their place. Only then: no cost otherwise.
            return trace_json(utf8_encodable(doc))
    except Exception:  # a bug in a trace must never cost the activity log its rows
        log.exception("could not build a decision's trace")
        return None


_CUT = f"(cut: a trace is kept under {TRACE_MAX_BYTES // 1024} KiB)"
_KEPT_CHARACTERS = 200
"""Characters kept at least of a summary field that had to be cut (a path, a reason)."""


def trace_json(doc: dict[str, Any]) -> str:
    """``doc`` as stored: JSON, at most ``TRACE_MAX_BYTES`` (request bodies and answers cut
    first, then rules dropped from the end, those that held or did not run before the one that
    failed, which is the evidence for the denial; then the longest strings of the summary cut;
    failing all that, a document that says only that it was cut)."""
    def dumped() -> str:
        return json.dumps(doc, ensure_ascii=False)

    def fits(text: str) -> bool:
        return len(text.encode()) <= TRACE_MAX_BYTES

    text = dumped()
    if fits(text):
        return text
    for rule in doc.get("rules", ()):
        for part in ("request", "answer"):
            if isinstance(rule.get(part), dict) and rule[part].get("body"):
                rule[part]["body"] = _CUT
    text = dumped()
    rules = doc.get("rules")
    while not fits(text) and rules:
        not_failing = [i for i, rule in enumerate(rules) if rule.get("outcome") in ("held", "not run")]
        rules.pop(not_failing[-1] if not_failing else -1)
        doc["cut"] = True
        text = dumped()
    # The summary alone may still be too big: a client's path or a reason quoting it, where a
    # control character takes six bytes as JSON. Halve the longest of its strings until it fits.
    while not fits(text):
        # Only strings that cutting makes shorter, so that the loop ends.
        strings = [(len(json.dumps(value, ensure_ascii=False)), key) for key, value in doc.items()
                   if isinstance(value, str) and len(value) > _KEPT_CHARACTERS + len(_CUT) + 1]
        if not strings:
            break
        _, key = max(strings)
        value = doc[key]
        doc[key] = value[:max(_KEPT_CHARACTERS, len(value) // 2 - len(_CUT) - 1)] + " " + _CUT
        doc["cut"] = True
        text = dumped()
    if not fits(text):
        text = json.dumps({"cut": True, "reason": _CUT})
    return text


def read_trace(conn: sqlite3.Connection, request_id: str, *, pod: str | None = None) -> dict[str, Any] | None:
    """The newest trace of a request (of those ``pod`` decided, when given), or None. In a
    fleet's activity log, the document says which pod decided (``pod``). Raises
    ``StoreError``."""
    fleet = _has_pods_column(conn)
    if pod is not None and not fleet:
        return None
    with translated("cannot read the traces"):
        row = conn.execute(
            f"SELECT t.doc, {'a.pod' if fleet else 'NULL'} FROM traces t JOIN activity_log a ON a.id = t.activity_id "
            f"WHERE a.request_id = ?{' AND a.pod = ?' if pod is not None else ''} ORDER BY t.id DESC LIMIT 1",
            (request_id, *([pod] if pod is not None else []))).fetchone()
    if row is None:
        return None
    doc: dict[str, Any] = json.loads(row[0])
    if row[1] is not None:
        doc["pod"] = row[1]
    return doc


def traced_pods(conn: sqlite3.Connection, request_id: str) -> list[str]:
    """The pods holding a trace of ``request_id`` in a fleet's activity log (one request may
    pass several sidecars: a gateway's, then a service's), by name. For a log known to have
    pods (its trace, from ``read_trace``, names one): on a rules.db older than the ``pod``
    column it raises ``StoreError``, as on any failure."""
    with translated("cannot read the traces"):
        return [pod for (pod,) in conn.execute(
            "SELECT DISTINCT a.pod FROM traces t JOIN activity_log a ON a.id = t.activity_id "
            "WHERE a.request_id = ? AND a.pod IS NOT NULL ORDER BY a.pod", (request_id,))]


def holds_pods(conn: sqlite3.Connection) -> bool:
    """Whether the activity log holds decisions shipped from pods (a fleet's): one seek in the
    partial index on ``pod``. False for a rules.db older than that column. Raises
    ``StoreError``."""
    if not _has_pods_column(conn):
        return False
    with translated("cannot read the activity log"):
        return conn.execute("SELECT 1 FROM activity_log WHERE pod IS NOT NULL LIMIT 1").fetchone() is not None


def _has_pods_column(conn: sqlite3.Connection) -> bool:
    # A reader may open a rules.db older than migration 0010 as it is (the admin script never
    # migrates on a read): it has no pods.
    with translated("cannot read the activity log"):
        return any(row[1] == "pod" for row in conn.execute("PRAGMA table_info(activity_log)"))


# SQLite has one writer at a time, and a connection waiting for the lock does not queue: its
# busy handler sleeps and retries, at most 100 ms apart. A pruner that took the lock again as
# soon as it released it could make the activity writer or an admin command miss every free
# moment until its busy timeout. So pruning deletes in short batches, each in its own
# transaction, and pauses between them for longer than that longest retry sleep: a waiting
# writer gets the lock in the pause, and waits at most about one batch.
PRUNE_PAUSE = 0.15


def prune_activity(rules_db: FileConnection, *, older_than: str | None, keep_rows: int | None,
                   batch: int = 5000, pause: float = PRUNE_PAUSE,
                   stop: threading.Event | None = None) -> int:
    """Delete the activity log rows older than ``older_than`` (a time in the log's format: UTC,
    ISO 8601), then those beyond the newest ``keep_rows`` (by id); None skips that limit. Return
    how many rows were deleted.

    At most ``batch`` rows per BEGIN IMMEDIATE transaction, ``pause`` seconds between
    transactions (see above). ``stop``, set from another thread, ends the pruning between two
    batches, and so does another file taking rules.db's name (checked before each batch: an id
    read from one file means nothing in another, and the next run prunes the new one). Raises
    ``StoreError``; the batches committed before the error stay deleted."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    if keep_rows is not None and keep_rows < 0:
        raise ValueError("keep_rows must not be negative")
    deleted = 0
    need_pause = False  # none before the first transaction
    first_opened: int | None = None

    @contextmanager
    def same_file() -> Iterator[sqlite3.Connection | None]:
        """The connection, or None once it is on another file than the pruning began on. Not
        held across pauses: a file replaced meanwhile is followed without waiting for them."""
        nonlocal first_opened
        with rules_db.use() as conn:
            if first_opened is None:
                first_opened = rules_db.opened
            yield conn if rules_db.opened == first_opened else None

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
            with same_file() as conn:
                if conn is None:
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
            with same_file() as conn:
                if conn is None:
                    return deleted
                if keep_rows == 0:
                    row = conn.execute("SELECT max(id) + 1 FROM activity_log").fetchone()
                else:
                    row = conn.execute("SELECT id FROM activity_log ORDER BY id DESC LIMIT 1 OFFSET ?",
                                       (keep_rows - 1,)).fetchone()
            if row is not None and row[0] is not None:
                delete("SELECT id FROM activity_log WHERE id < ? ORDER BY id LIMIT ?", (row[0],))
    return deleted


def read_activity(conn: sqlite3.Connection, *, denied: bool = False, would_deny: bool = False,
                  user: str | None = None, limit: int | None = None, since: str | None = None,
                  pod: str | None = None) -> list[ActivityRecord]:
    """The newest activity log rows first, optionally only denials, only what audit-mode
    policies would have denied, one user's, one pod's (a fleet's log), or since a time (in the
    log's format). Raises ``StoreError``, also for a row whose time is not one (only plain SQL
    can write such a row)."""
    where, args = [], []
    if pod is not None:
        if not _has_pods_column(conn):
            return []
        where.append("pod = ?")
        args.append(pod)
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
    sql = ("SELECT a.*, EXISTS(SELECT 1 FROM traces t WHERE t.activity_id = a.id) AS traced FROM activity_log a"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY at DESC, id DESC"
           + (" LIMIT ?" if limit else ""))
    with translated("cannot read the activity log"):
        rows = sqlite_utils_db(conn).query(sql, [*args, *([limit] if limit else [])])
        return [
            ActivityRecord(at=_epoch(r["id"], r["at"]), request_id=r["request_id"], username=r["username"],
                           source_ip=r["source_ip"], host=r["host"], path=r["path"], method=r["method"],
                           policy=r["policy"], allowed=bool(r["allowed"]), code=r["code"],
                           status=r["status"], latency_ms=r["latency_ms"],
                           policy_source=r["policy_source"] or "match", audit_deny=bool(r["audit_deny"]),
                           traced=bool(r["traced"]), pod=r.get("pod"))
            for r in rows
        ]


def _epoch(row_id: int, text: Any) -> float:
    try:
        return parse_iso_time(text)
    except (TypeError, ValueError):
        raise StoreError(f"cannot read the activity log: row {row_id}: {text!r} is not a time "
                         "(UTC, ISO 8601)") from None


# The portal's full-text index of the reasons (``activity_log.status``), for its searches. It
# lives in a database file of the portal's own, since the portal never writes rules.db.

REASON_INDEX_TABLE = "portal_reason_fts"
"""The FTS5 table of the reason index; its rowid is ``activity_log.id``."""


def create_reason_index(path: Path) -> sqlite3.Connection:
    """Create the reason index in a new database file at ``path`` and return an autocommit
    connection to it, usable from any thread. Contentless: it keeps each reason's words and the
    row's id, not the text. Raises ``StoreError``."""
    with translated(f"cannot create the reason index {path}"):
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            # WAL: the portal's connections read the index while a catch-up writes it.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"CREATE VIRTUAL TABLE {REASON_INDEX_TABLE} USING fts5(status, content='', "
                         "tokenize='unicode61 remove_diacritics 2')")
        except BaseException:
            conn.close()
            raise
    return conn


def clear_reason_index(index: sqlite3.Connection) -> None:
    """Empty the reason index. Raises ``StoreError``."""
    with translated("cannot write the reason index"):
        index.execute(f"INSERT INTO {REASON_INDEX_TABLE}({REASON_INDEX_TABLE}) VALUES ('delete-all')")


def add_reasons(index: sqlite3.Connection, rows: Sequence[tuple[int, str]]) -> None:
    """Index the reasons of activity log rows, given as (id, status), in one transaction.
    Raises ``StoreError``."""
    with translated("cannot write the reason index"):
        with transaction(index):
            index.executemany(f"INSERT INTO {REASON_INDEX_TABLE}(rowid, status) VALUES (?, ?)", rows)


def read_reasons(conn: sqlite3.Connection, *, after: int, limit: int) -> list[tuple[int, str, str]]:
    """(id, request_id, status) of at most ``limit`` activity log rows with an id above
    ``after``, by id. Raises ``StoreError``."""
    with translated("cannot read the activity log"):
        return conn.execute("SELECT id, request_id, status FROM activity_log WHERE id > ? ORDER BY id LIMIT ?",
                            (after, limit)).fetchall()


def activity_request_id(conn: sqlite3.Connection, row_id: int) -> str | None:
    """The request id of the activity log row ``row_id``, or None when there is no such row.
    Raises ``StoreError``."""
    with translated("cannot read the activity log"):
        row = conn.execute("SELECT request_id FROM activity_log WHERE id = ?", (row_id,)).fetchone()
    return None if row is None else str(row[0])


def count_activity_through(conn: sqlite3.Connection, row_id: int) -> int:
    """How many activity log rows have an id up to ``row_id``. Raises ``StoreError``."""
    with translated("cannot read the activity log"):
        (count,) = conn.execute("SELECT count(*) FROM activity_log WHERE id <= ?", (row_id,)).fetchone()
    return int(count)

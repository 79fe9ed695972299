"""The "record" stage: the activity log and the decision log lines, both off the request path.

A check only appends one tuple to an in-memory list (bounded: past ``max_queue`` pending
decisions a record is dropped and counted, never blocking a check). A background task flushes
the list every ``flush_interval`` seconds: one decision log line per decision, written in one
go, and one batched insert into rules.db in a worker thread. Batching keeps the per-check cost
to an append, and the worker thread's contention for the interpreter to a few short bursts a
second. Shutdown flushes what is pending.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from . import db
from .db import ActivityRecord

log = logging.getLogger(__name__)


class ActivityLog:
    def __init__(self, db_path: Path, max_queue: int = 10_000, *, flush_interval: float = 0.2,
                 on_batch: Callable[[list[ActivityRecord]], None] | None = None) -> None:
        self._path = db_path
        self._max = max_queue
        self._interval = flush_interval
        self._on_batch = on_batch
        self._pending: list[ActivityRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self.written = 0
        self.dropped = 0

    def record(self, decided: ActivityRecord) -> None:
        if self._closing or len(self._pending) >= self._max:
            self.dropped += 1
            return
        self._pending.append(decided)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="activity-log")

    def _write(self, batch: list[ActivityRecord]) -> None:
        """In the worker thread: the log lines, then the rows. Formatting here, not on the
        event loop, keeps a flush of a thousand decisions from stalling the checks."""
        if self._on_batch is not None:
            try:
                self._on_batch(batch)
            except Exception:
                log.exception("could not write decision log lines")
        identity = db.file_identity(self._path)
        if self._conn is not None and identity != self._identity:
            # rules.db was replaced or deleted: this connection writes to the old file.
            self._conn.close()
            self._conn = None
        if self._conn is None:
            self._conn = db.connect(self._path, create=False)
            self._identity = identity
        try:
            db.insert_activity(self._conn, batch)
        except db.StoreError:
            self._conn.close()
            self._conn = None
            raise

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await asyncio.to_thread(self._write, batch)
            self.written += len(batch)
        except db.StoreError as exc:
            self.dropped += len(batch)
            log.error("activity log write failed; %d decisions dropped", len(batch), extra={"error": str(exc)})

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            await self._flush()

    async def close(self) -> None:
        """Flush everything pending, then stop the writer. Records arriving after this are dropped."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            # The writer finishes its current flush, then flushes what is left, and returns;
            # it alone uses the connection until then.
            await self._task
            self._task = None
        self._closing = True
        await self._flush()
        if self._conn is not None:
            await asyncio.to_thread(self._conn.close)
            self._conn = None

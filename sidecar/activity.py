"""The "record" stage: the activity log, written off the request path.

``record`` only appends to a bounded in-memory queue; a background task drains it in batches
into rules.db through a worker thread, so a slow disk never slows a check. When the queue is
full the record is dropped and counted (never blocking a check); shutdown flushes what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

from . import store
from .store import ActivityRecord

log = logging.getLogger(__name__)

BATCH = 500


class ActivityLog:
    def __init__(self, db_path: Path, max_queue: int = 10_000) -> None:
        self._path = db_path
        self._queue: asyncio.Queue[ActivityRecord | None] = asyncio.Queue(max_queue)
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._conn: sqlite3.Connection | None = None
        self.written = 0
        self.dropped = 0

    def record(self, record: ActivityRecord) -> None:
        if self._closing:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="activity-log")

    def _write(self, batch: list[ActivityRecord]) -> None:
        if self._conn is None:
            self._conn = store.connect(self._path)
        try:
            store.insert_activity(self._conn, batch)
        except store.StoreError:
            self._conn.close()
            self._conn = None  # reopen next time: the file may have been replaced
            raise

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[ActivityRecord] = []
            item = await self._queue.get()
            while item is not None:
                batch.append(item)
                if len(batch) >= BATCH or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            stopping = item is None
            if not batch:
                continue
            try:
                await asyncio.to_thread(self._write, batch)
                self.written += len(batch)
            except store.StoreError as exc:
                self.dropped += len(batch)
                log.error("activity log write failed; %d decisions dropped", len(batch),
                          extra={"error": str(exc)})

    async def close(self) -> None:
        """Flush everything queued, then stop the writer. Records arriving after this are dropped."""
        self._closing = True
        if self._task is not None:
            # The sentinel queues behind every pending record, so they are all written first;
            # the writer, not this coroutine, owns the connection until it returns.
            await self._queue.put(None)
            await self._task
            self._task = None
        if self._conn is not None:
            await asyncio.to_thread(self._conn.close)
            self._conn = None

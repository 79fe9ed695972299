"""Activity log retention: keep at most N days and/or M rows of ``activity_log``, pruned in the
background.

Why in batches: SQLite has one writer at a time. One big DELETE of a day's decisions (hundreds
of thousands of rows) would hold the write lock for seconds, and meanwhile the activity writer
(see ``activity.py``) and the admin script would wait — up to their busy timeout, after which
decisions are dropped and edits fail. ``db.prune_activity`` instead deletes a few thousand
rows per short transaction and pauses between transactions long enough for a waiting writer to
take the lock, so either waits at most about one batch (tens of milliseconds). Checks never
touch the database, and readers never wait for writers (WAL).

The pruning runs in a worker thread on its own connection, soon after ``start`` and then every
``interval`` seconds. A failure (a read-only or missing rules.db, a lock held past the busy
timeout) is logged and kept in ``last_error``, never raised into the server, and the next run
tries again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import db
from .db import iso_time

log = logging.getLogger(__name__)

FIRST_RUN_DELAY = 1.0  # seconds after start: let the server finish starting first


class ActivityRetention:
    """Prunes rows older than ``days`` days and beyond the newest ``rows`` rows; disabled when
    both are None. ``clock`` gives the current time in epoch seconds."""

    def __init__(self, db_path: Path, *, days: float | None, rows: int | None,
                 interval: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        if days is not None and not days > 0:
            raise ValueError("days must be positive")
        if rows is not None and rows < 1:
            raise ValueError("rows must be at least 1")
        if not interval > 0:
            raise ValueError("interval must be positive")
        self._path = Path(db_path)
        self.days = days
        self.rows = rows
        self._interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._stop = threading.Event()  # ends a prune in progress between two batches
        self.deleted_total = 0
        self.runs = 0
        self.last_error: str | None = None
        self.last_run: float | None = None  # clock time at which the last run ended

    @property
    def enabled(self) -> bool:
        return self.days is not None or self.rows is not None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the background task (none when disabled). The first run is soon after."""
        if not self.enabled or self.running:
            return
        self._stop.clear()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="activity-retention")

    async def stop(self) -> None:
        """Stop the background task; a prune in progress ends after its current batch."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        if self._wake is not None:
            self._wake.set()
        try:
            await task
        finally:
            self._stop.clear()  # so that a later prune_now or start runs

    def _cutoff(self) -> str | None:
        if self.days is None:
            return None
        return iso_time(self._clock() - self.days * 86_400)

    def _prune(self, older_than: str | None) -> int:
        """In a worker thread: one prune on a connection of its own, which never creates
        rules.db and follows it when another file takes its name."""
        rules_db = db.DatabaseFile.at(self._path).connection()
        try:
            return db.prune_activity(rules_db, older_than=older_than, keep_rows=self.rows, stop=self._stop)
        except db.StoreError as exc:
            if not self._path.exists():  # only to word the error
                raise db.StoreError(f"cannot prune the activity log: {self._path} does not exist") from exc
            raise
        finally:
            rules_db.close()

    async def prune_now(self) -> int:
        """Prune once now; return the number of rows deleted (0 if it failed: see ``last_error``).
        Never raises ``StoreError``."""
        if not self.enabled:
            return 0
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            older_than = self._cutoff()
            started = time.monotonic()
            try:
                deleted = await asyncio.to_thread(self._prune, older_than)
            except db.StoreError as exc:
                self.last_error = str(exc)
                log.warning("activity log pruning failed; next try in %g s", self._interval,
                            extra={"error": str(exc)})
                return 0
            finally:
                self.runs += 1
                self.last_run = self._clock()
            self.last_error = None
            self.deleted_total += deleted
            if deleted:
                log.info("activity log pruned", extra={
                    "deleted": deleted, "older_than": older_than, "keep_rows": self.rows,
                    "seconds": round(time.monotonic() - started, 3)})
            return deleted

    async def _run(self) -> None:
        assert self._wake is not None
        delay = min(FIRST_RUN_DELAY, self._interval)
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            if self._stop.is_set():
                return
            try:
                await self.prune_now()
            except Exception as exc:  # a bug must not end retention, nor reach the server
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("activity log pruning failed")
            delay = self._interval

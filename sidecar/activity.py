"""The "record" stage: the activity log and the decision log lines, both off the request path.

A check only appends one tuple to an in-memory list (bounded: past ``max_queue`` pending
decisions a record is dropped and counted, never blocking a check). A background task flushes
the list every ``flush_interval`` seconds: one decision log line per decision, written in one
go, and one batched insert into rules.db in a worker thread. Batching keeps the per-check cost
to an append, and the worker thread's contention for the interpreter to a few short bursts a
second. Shutdown flushes what is pending.

Each decision also goes, once, to ``ship`` (with its trace as rules.db stores it): the fleet's
activity log (``sidecar.fleet``), which serialises it in this same thread.

A batch the database refuses (its write lock held past the busy timeout by an admin command, a
full disk, rules.db missing for a moment) is not lost: it goes back to the head of the list and
the next flush writes it with the decisions that came meanwhile, the list's bound still holding.
Its log lines are not written again, nor is it shipped again. Flushes that fail in a row come
further apart (at most ``RETRY_MAX_DELAY``), so a database gone for good costs one error line
every few seconds.
Another file put under rules.db's name (``mv``) gets the decisions not written yet; those
written before stay in the old file (``_write`` says why).

A decision with a trace (``record_traced``) holds up to some 40 KiB per rule until written. The
traces of the decisions not yet written (pending, being written, kept for a retry) stay within
``max_trace_bytes``: past it, a decision is recorded without its trace, counted in
``traces_dropped``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import db
from .db import ActivityRecord

log = logging.getLogger(__name__)

CHUNK = 16
"""Decisions whose log lines and rows the writer makes in one go: about 0.1 ms of Python, the
longest a check waits for the interpreter because of it (64, 0.4 ms, still showed in the gRPC
path's p99 through Envoy: 1.24x the bare servicer's against 1.14x, median of 5 runs each)."""
PAUSE = 0.0005
"""The writer's pause between two chunks, in which the event loop has the interpreter to itself
(a flush held it for 1-2 ms at a time, which showed in the checks' p99)."""
MAX_SLICES = 32
"""Chunks in one flush at most: past 32 x CHUNK decisions a flush, the chunks grow instead. Each
pause costs more than its 0.5 ms when the event loop is busy (the writer then waits up to the
switch interval for the interpreter), so 16-decision chunks wrote only ~8,000 decisions a second
while the HTTP endpoint answered 16,000 (and the rest were dropped); a check then waits for the
interpreter a little longer, but only in a process that is that loaded."""
RETRY_MAX_DELAY = 5.0
"""Seconds at most between two tries of a batch the database refused."""
MAX_PENDING_TRACE_BYTES = 16 << 20
"""What the traces of the decisions not yet written may hold, about (``record_traced``)."""


class ActivityLog:
    def __init__(self, db_path: Path, max_queue: int = 10_000, *, flush_interval: float = 0.2,
                 on_batch: Callable[[list[ActivityRecord]], None] | None = None,
                 ship: Callable[[Sequence[ActivityRecord], Sequence[str | None]], None] | None = None,
                 max_trace_bytes: int = MAX_PENDING_TRACE_BYTES) -> None:
        self._max = max_queue
        self._max_trace_bytes = max_trace_bytes
        # The size of each trace not yet written (pending or being written), by the id of its
        # record (alive until written, so its id is its own), and their sum.
        self._trace_sizes: dict[int, int] = {}
        self._trace_bytes = 0
        self._interval = flush_interval
        self._on_batch = on_batch
        self._ship = ship
        self._pending: list[ActivityRecord] = []
        # How many records at the head of ``_pending`` already had their log lines written
        # (a batch the database refused): a retry must not write them twice.
        self._announced = 0
        self._failures = 0  # flushes in a row the database refused
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._db = db.DatabaseFile.at(db_path).connection()
        self.written = 0
        self.dropped = 0
        self.traces_dropped = 0

    def record(self, decided: ActivityRecord) -> None:
        if self._closing or len(self._pending) >= self._max:
            self.dropped += 1
            return
        self._pending.append(decided)

    def record_traced(self, decided: ActivityRecord, trace_bytes: int) -> None:
        """``record`` for a decision with a trace holding about ``trace_bytes``: recorded
        without it when the traces not yet written would pass their bound."""
        if self._closing or len(self._pending) >= self._max:
            self.dropped += 1
            return
        if self._trace_bytes + trace_bytes > self._max_trace_bytes:
            self.traces_dropped += 1
            self._pending.append(decided._replace(trace=None))
            return
        self._trace_bytes += trace_bytes
        self._trace_sizes[id(decided)] = trace_bytes
        self._pending.append(decided)

    @property
    def trace_bytes(self) -> int:
        """What the traces of the decisions not yet written hold, about."""
        return self._trace_bytes

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="activity-log")

    def _write(self, batch: list[ActivityRecord], announced: int) -> None:
        """In the worker thread: the log lines of the records past the first ``announced`` (and
        their shipping), then the rows. Formatting here, not on the event loop, keeps a flush of a
        thousand decisions from stalling the checks; a slice at a time with a pause between
        slices (``CHUNK``, ``PAUSE``, ``MAX_SLICES``), so that the event loop never waits long
        for the interpreter while it runs."""
        rows: list[tuple[Any, ...]] = []
        docs: list[str | None] = []
        step = max(CHUNK, -(-len(batch) // MAX_SLICES))
        for start in range(0, len(batch), step):
            if start:
                time.sleep(PAUSE)
            chunk = batch[start:start + step]
            prepared = db.prepare_activity(chunk)
            if start + len(chunk) > announced:
                fresh = max(0, announced - start)
                if self._on_batch is not None:
                    try:
                        self._on_batch(chunk[fresh:])
                    except Exception:
                        log.exception("could not write decision log lines")
                if self._ship is not None:
                    # With the traces as rules.db stores them: built once for both.
                    try:
                        self._ship(chunk[fresh:], prepared.docs[fresh:])
                    except Exception:
                        log.exception("could not ship decisions")
            rows += prepared.rows
            docs += prepared.docs
        # Checked before each batch (use()): when another file has taken rules.db's name, the
        # batch goes to that file, and what was written before stays in the old one. So a
        # decision is written once, in the activity log that the name holds when it is
        # written: the one admins read. The old file, not it, would be the wrong one: `mv`
        # usually unlinks it (its rows would be lost with it), and writing there after the
        # switch would take an old connection whose -wal the new file may share.
        try:
            with self._db.use() as conn:
                db.insert_prepared(conn, db.PreparedActivity(rows, docs))
        except db.StoreError:
            self._db.close()
            raise

    async def _flush(self, *, last: bool = False) -> None:
        """Write what is pending. A batch the database refuses goes back to the head of the
        list, unless this is the ``last`` flush (no later one would write it)."""
        batch, self._pending = self._pending, []
        announced, self._announced = self._announced, 0
        if not batch:
            return
        try:
            await asyncio.to_thread(self._write, batch, announced)
        except db.StoreError as exc:
            self._failures += 1
            if last:
                self._release(batch)
                self.dropped += len(batch)
                log.error("activity log write failed; %d decisions dropped", len(batch), extra={"error": str(exc)})
                return
            # insert_prepared is one transaction: none of the batch was written. Past the bound,
            # the oldest go first: their log lines are out already, so only their rows are lost.
            overflow = max(0, len(batch) + len(self._pending) - self._max)
            kept = batch[overflow:]
            self._release(batch[:overflow])
            self._pending = kept + self._pending
            self._announced = len(kept)
            self.dropped += overflow
            log.error("activity log write failed; %d decisions kept for the next try%s", len(kept),
                      f", {overflow} dropped (queue full)" if overflow else "", extra={"error": str(exc)})
        except Exception:
            # Not the database but a bug, which the same batch would hit on every try: keeping
            # it would stop the activity log for good.
            self._release(batch)
            self.dropped += len(batch)
            log.exception("activity log write failed; %d decisions dropped", len(batch))
        else:
            self._release(batch)
            self.written += len(batch)
            self._failures = 0

    def _release(self, records: list[ActivityRecord]) -> None:
        """The traces of ``records`` (written or dropped) are no longer held here."""
        if self._trace_sizes:
            self._trace_bytes -= sum(self._trace_sizes.pop(id(record), 0) for record in records)

    def _delay(self) -> float:
        if not self._failures:
            return self._interval
        return max(self._interval, min(self._interval * 2.0 ** min(self._failures, 16), RETRY_MAX_DELAY))

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self._delay())
            except TimeoutError:
                pass
            if self._closing:
                break  # close() writes what is left
            try:
                await self._flush()
            except Exception:
                # Whatever it was, a writer that stopped would leave every later decision to
                # pile up and be dropped.
                log.exception("activity log writer failed; going on")

    async def close(self) -> None:
        """Flush everything pending, then stop the writer. Records arriving after this are dropped."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            # The writer finishes its current flush and returns; it alone uses the connection
            # until then.
            await self._task
            self._task = None
        await self._flush(last=True)
        await asyncio.to_thread(self._db.close)

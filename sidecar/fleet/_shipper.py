"""Shipping the decisions to a collector: a buffer bounded in bytes, filled by the activity
writer, emptied by a background task that POSTs gzip'd batches.

Never on the check path: the records are serialised in the activity writer's thread (``add``,
with the traces it built for rules.db) and POSTed by a task on the event loop; gzip runs in a
worker thread. A check pays nothing for shipping.

Bounded: the buffer holds at most ``max_bytes`` of serialised records (with a fixed cost per
record for its slot). Past it the oldest records go first, counted in ``dropped``; the local
activity log keeps them all. A batch stays at the head of the buffer until the collector
acknowledges it, so a failed POST (the collector down, a timeout, a 5xx, a 401 while a token
rotates) is tried again, later and later (``interval`` doubled per failure up to
``RETRY_MAX_DELAY``, less a random 0-20 %), with the same records under the same ids: the
collector writes a record once, however often it arrives. A batch the collector refuses as
malformed (400) would be refused for ever: it is dropped, counted and logged; one refused as too
large (413) is sent again in halves, and batches stay that small from then on.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import itertools
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

import aiohttp

from ..db import ActivityRecord
from ..urls import client_session, scrubbed, shown_url
from ._format import MAX_BATCH_BYTES, batch_body, encode_record

__all__ = ["RECORD_OVERHEAD", "DecisionShipper"]

log = logging.getLogger(__name__)

RECORD_OVERHEAD = 128
"""Bytes a buffered record costs beyond its own (its bytes object, tuple and deque slot)."""
RETRY_MAX_DELAY = 30.0
WARN_EVERY = 30.0
"""Seconds between two warnings about failing POSTs (the first is logged at once)."""
_SHOWN = 300  # characters of a collector's answer quoted in a log line

Outcome = Literal["delivered", "retry", "refused", "too_large"]


class DecisionShipper:
    """Ships the records ``add`` is given to ``url`` (the collector's ``/v1/decisions``),
    from ``pod``, with the token ``bearer()`` returns (called per POST: a rotated file is read
    anew; ``ValueError`` when it cannot be read). ``ca_bundle``: the CAs trusted for https (the
    system store when None). Records are sent ``interval`` seconds apart at most, sooner when
    ``batch_records`` are waiting."""

    def __init__(self, url: str, *, pod: str, bearer: Callable[[], str], ca_bundle: str | None = None,
                 interval: float = 1.0, batch_records: int = 1000, max_bytes: int = 32 << 20,
                 timeout: float = 10.0) -> None:
        self.url = url
        self.pod = pod
        self._shown = shown_url(url)
        self._bearer = bearer
        self._ca_bundle = ca_bundle
        self._interval = interval
        self._batch_records = batch_records
        self._batch_bytes = MAX_BATCH_BYTES
        self._max_bytes = max_bytes
        self._timeout = timeout
        # Ids: unique to this process (a random prefix), then a counter.
        self._prefix = os.urandom(8).hex()
        self._numbers = itertools.count(1)
        # (number, serialised record), oldest first; guarded by _lock (the writer thread adds,
        # the event loop takes and settles).
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()
        # The number of the last record of the batch being POSTed (0: none). Records the bound
        # pushes out meanwhile are only dropped if that POST fails (``_unsettled``).
        self._in_flight = 0
        self._unsettled = 0
        self._failures = 0  # POSTs failed in a row
        self._retry_at = 0.0
        self._warned_at = -WARN_EVERY
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self.shipped = 0
        self.dropped = 0
        self.failed_posts = 0
        self.last_delivery: float | None = None  # epoch seconds

    # ------------------------------------------------------------------ the writer's thread

    def add(self, records: Sequence[ActivityRecord], traces: Sequence[str | None]) -> None:
        """Buffer ``records`` with their stored traces (in the activity writer's thread)."""
        encoded = []
        for record, trace in zip(records, traces, strict=True):
            number = next(self._numbers)
            data = encode_record(record, trace, pod=self.pod, record_id=f"{self._prefix}-{number:x}")
            # Copied to a bytes object of its own size: orjson's keeps the capacity it grew to (4 KiB
            # and more for a record of 400 bytes), which the bound would not see.
            encoded.append((number, memoryview(data).tobytes()))
        with self._lock:
            for number, data in encoded:
                self._buffer.append((number, data))
                self._bytes += len(data) + RECORD_OVERHEAD
            self._trim()
            wake = len(self._buffer) >= self._batch_records and not self._failures
        if wake and self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed: the sidecar is stopping
                pass

    def _trim(self) -> None:
        """Under the lock: the oldest records out until the buffer is within its bound."""
        while self._bytes > self._max_bytes and self._buffer:
            number, data = self._buffer.popleft()
            self._bytes -= len(data) + RECORD_OVERHEAD
            if number <= self._in_flight:
                self._unsettled += 1  # being POSTed: dropped only if that fails
            else:
                self.dropped += 1

    @property
    def buffered(self) -> tuple[int, int]:
        """(records, bytes) waiting for the collector."""
        with self._lock:
            return len(self._buffer), self._bytes

    # -------------------------------------------------------------------- the event loop

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="decision-log")

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._closing:
            wait = self._retry_at - time.monotonic() if self._failures else self._interval
            if wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
            self._wake.clear()
            if self._closing:
                return
            if self._failures and time.monotonic() < self._retry_at:
                continue
            try:
                await self._ship()
            except Exception:
                # Whatever it was, a shipper that stopped would leave the buffer to fill and drop.
                log.exception("decision log shipping failed; going on")
                self._failed()

    async def _ship(self, *, final: bool = False) -> None:
        """POST what is buffered, a batch at a time, until none is left or a POST fails."""
        while not self._closing or final:
            batch = self._take()
            if batch is None:
                return
            last, records = batch
            outcome: Outcome = "retry"
            try:
                outcome, detail = await self._post(records)
            finally:
                self._settle(last, len(records), outcome)
            if outcome == "delivered" or outcome == "refused":
                if self._failures:
                    log.info("decision log shipping resumed", extra={"collector": self._shown,
                                                                     "failed_posts": self._failures})
                self._failures = 0
                if outcome == "refused":
                    log.error("the collector refused a batch of decisions: dropped (they are in this pod's "
                              "activity log)", extra={"collector": self._shown, "records": len(records),
                                                      "error": detail})
            elif outcome == "too_large":
                # Half of what was refused, not of the bound: the bound may be far above it.
                self._batch_records = max(1, len(records) // 2)
                self._batch_bytes = max(1, sum(map(len, records)) // 2)
                log.warning("the collector refused a batch as too large: sending smaller ones",
                            extra={"collector": self._shown, "batch_records": self._batch_records,
                                   "batch_bytes": self._batch_bytes})
            else:
                self._failed(detail)
                return

    def _take(self) -> tuple[int, list[bytes]] | None:
        """The batch at the head of the buffer: (the number of its last record, its records)."""
        records: list[bytes] = []
        size = last = 0
        with self._lock:
            for number, data in self._buffer:
                if records and (len(records) >= self._batch_records or size + len(data) > self._batch_bytes):
                    break
                records.append(data)
                size += len(data)
                last = number
            self._in_flight = last
        return (last, records) if records else None

    def _settle(self, last: int, count: int, outcome: Outcome) -> None:
        """The batch ending with record ``last`` was delivered, refused for good, or is to be
        sent again."""
        with self._lock:
            if outcome in ("delivered", "refused"):
                while self._buffer and self._buffer[0][0] <= last:
                    _, data = self._buffer.popleft()
                    self._bytes -= len(data) + RECORD_OVERHEAD
            if outcome == "delivered":
                self.shipped += count
                self.last_delivery = time.time()
            elif outcome == "refused":
                self.dropped += count
            else:
                self.dropped += self._unsettled  # pushed out by the bound, and not delivered
            self._unsettled = 0
            self._in_flight = 0

    def _failed(self, detail: str = "") -> None:
        self.failed_posts += 1
        self._failures += 1
        delay = min(self._interval * 2.0 ** min(self._failures - 1, 16), RETRY_MAX_DELAY)
        self._retry_at = time.monotonic() + delay * (1 - 0.2 * random.random())
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            records, size = self.buffered
            log.warning("cannot ship decisions to the collector: kept for the next try", extra={
                "collector": self._shown, "error": detail, "failed_posts": self._failures,
                "buffered_records": records, "buffered_bytes": size, "dropped": self.dropped})

    async def _post(self, records: list[bytes]) -> tuple[Outcome, str]:
        if self._session is None:
            try:
                self._session = client_session(self._ca_bundle, self._timeout)
            except (OSError, ssl.SSLError) as exc:
                return "retry", f"--decision-log-ca-bundle {self._ca_bundle}: {exc}"
        try:
            token = self._bearer()
        except ValueError as exc:  # SecretError: an unset variable, an unreadable file
            return "retry", f"--decision-log-bearer-token: {exc}"
        body = await asyncio.to_thread(_gzipped, records)
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip",
                   "Authorization": f"Bearer {token.strip()}"}
        try:
            async with self._session.post(self.url, data=body, headers=headers, allow_redirects=False) as resp:
                answer = (await resp.content.read(_SHOWN)).decode("utf-8", "replace")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            shown = scrubbed(str(exc) or type(exc).__name__, self.url, self._shown)
            return "retry", f"cannot reach {self._shown}: {shown}"
        if 200 <= status < 300:
            return "delivered", ""
        detail = f"HTTP {status} from {self._shown}: {answer}"
        if status == 413:
            return ("too_large" if len(records) > 1 else "refused"), detail
        if status in (400, 415, 422):
            return "refused", detail
        return "retry", detail

    async def close(self, timeout: float = 5.0) -> None:
        """Stop; first try, for ``timeout`` seconds at most, to deliver what is buffered (call
        it once the activity writer has written its last records). What is left is counted
        dropped and logged."""
        self._closing = True
        try:
            # One budget for both: a POST under way when the stop came (a slow collector) is
            # cancelled with it, its batch counted as not delivered.
            async with asyncio.timeout(timeout):
                if self._task is not None:
                    assert self._wake is not None
                    self._wake.set()
                    await self._task
                await self._ship(final=True)
        except TimeoutError:
            pass
        except Exception:
            log.exception("decision log shipping failed at stop")
        finally:
            self._task = None
        with self._lock:
            left = len(self._buffer)
            self._buffer.clear()
            self._bytes = 0
            self.dropped += left
        if left:
            log.warning("decisions not shipped at stop: they are in this pod's activity log",
                        extra={"collector": self._shown, "records": left})
        if self._session is not None:
            await self._session.close()
            self._session = None


def _gzipped(records: list[bytes]) -> bytes:
    # Level 1: 0.6 µs a record against 1.4 at level 5, for batches some 15 % larger (1,000
    # decisions: 22 KB against 19 KB; 400 KB before).
    return gzip.compress(batch_body(records), compresslevel=1, mtime=0)

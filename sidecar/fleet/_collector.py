"""The fleet's collector: an HTTP server that writes the batches the sidecars ship into one
activity log (``safous-admin collect``).

Everything a request may cost is bounded, and checked in the order that costs least:

1. the token (``Authorization: Bearer``), before a byte of the body is read: 401. Compared in
   constant time (SHA-256 digests with ``hmac.compare_digest``, against every token given);
2. the method and path (405, 404, from the router), the content type (415) and encoding
   (``gzip`` or none, else 415);
3. the announced size (``Content-Length`` past ``max_body_bytes``: 413, and with
   ``Expect: 100-continue`` the body is never sent);
4. batches being taken in at once (``max_in_progress``; one more: 503 with ``Retry-After``);
5. the body, read in chunks as it comes, for ``body_seconds`` at most (408) and
   ``max_body_bytes`` at most (413);
6. in the writer thread: decompressed in a stream with its output bounded (``max_json_bytes``:
   a gzip bomb stops there, 413), parsed and checked record by record (400, naming the first
   problem: ``sidecar.fleet._format``), then written in one transaction (503 when the database
   refuses: the sidecar sends it again).

A request refused at any step changes nothing; the server goes on. Written records are answered
``{"accepted": N, "new": M, "duplicates": N - M}``: a record whose id is already in the log (a
batch sent again after a lost answer) is not written twice. Only the activity log and its
traces are written (``db.insert_shipped``), never rules or policies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import logging
import socket
import ssl
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from .. import db
from ..activity_retention import ActivityRetention
from ._format import MAX_BODY_BYTES, MAX_JSON_BYTES, MAX_RECORDS, MalformedBatch, read_batch

__all__ = ["PATH", "Collector", "Limits"]

log = logging.getLogger(__name__)

PATH = "/v1/decisions"
"""Where the sidecars POST their batches (``--decision-log-url https://HOST:PORT/v1/decisions``)."""
_WARN_EVERY = 10.0  # seconds between two log lines about refusals of one kind
STOP_SECONDS = 10.0
"""What a stopping collector gives the batches being taken in; one cut short is not answered,
and its sidecar sends it again."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may cost the collector."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_json_bytes: int = MAX_JSON_BYTES
    max_records: int = MAX_RECORDS
    max_in_progress: int = 8
    body_seconds: float = 30.0


class _Refused(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class Collector:
    """Takes the sidecars' batches into the activity log of ``db_path`` (created, or brought up
    to date, by ``start``). ``tokens``: the bearer tokens accepted (several while one is
    rotated). ``keep_traces``: traces kept at most, the newest; ``retention_days`` and
    ``retention_rows`` prune the log as the sidecar's retention settings do."""

    def __init__(self, db_path: Path, tokens: Sequence[str], *, keep_traces: int = 65_536,
                 retention_days: float | None = None, retention_rows: int | None = None,
                 limits: Limits = Limits()) -> None:
        if not tokens or not all(tokens):
            raise ValueError("the collector needs a token (an empty one would let anyone in)")
        self._digests = [hashlib.sha256(token.encode()).digest() for token in tokens]
        self._path = db_path
        self._keep_traces = keep_traces
        self.limits = limits
        self._retention = ActivityRetention(db_path, days=retention_days, rows=retention_rows)
        # One writer thread: SQLite writes one transaction at a time anyway, and one batch
        # decompressed and parsed at a time bounds the memory they take.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="collector")
        self._db = db.DatabaseFile.at(db_path).connection()
        self._runner: web.AppRunner | None = None
        self._in_progress = 0
        # By error: when it was last logged, and how many were not logged since.
        self._warned: dict[str, tuple[float, int]] = {}
        self.registry = CollectorRegistry()
        self._records = Counter("safous_collector_records", "Records taken in: new, or already in the log "
                                "(duplicate: a batch sent again)", ["result"], registry=self.registry)
        self._batches = Counter("safous_collector_batches", "Batches answered, by HTTP status", ["status"],
                                registry=self.registry)
        Gauge("safous_collector_batches_in_progress", "Batches being taken in", registry=self.registry
              ).set_function(lambda: self._in_progress)

    async def start(self, sock: socket.socket, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve on the listening socket ``sock``. Raises ``StoreError``."""
        applied = await asyncio.to_thread(db.ensure_database, self._path)
        if applied:
            log.info("fleet database migrated", extra={"db": str(self._path), "applied": applied})
        app = web.Application()
        app.router.add_post(PATH, self._take, expect_handler=self._expect)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        # auto_decompress off: aiohttp would inflate a gzip'd body as it reads it, so that the
        # bound on what is sent would apply to what it inflates to; here the bytes sent are
        # bounded first (4 MiB), then what they inflate to (8 MiB), in the writer thread.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False,
                                     shutdown_timeout=STOP_SECONDS)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()
        self._retention.start()

    async def stop(self) -> None:
        """Finish the batches being taken in (``STOP_SECONDS`` at most), then close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._retention.stop()
        await asyncio.to_thread(self._writer.shutdown)
        await asyncio.to_thread(self._db.close)

    # --------------------------------------------------------------------- the steps

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found = False
        for digest in self._digests:  # every one, found or not: the time says nothing
            found |= hmac.compare_digest(given, digest)
        return found and scheme.lower() == "bearer"

    def _check_headers(self, request: web.Request) -> None:
        """Steps 1-3: raises ``_Refused``."""
        if not self._authorized(request.headers.get(hdrs.AUTHORIZATION, "")):
            raise _Refused(401, "unauthenticated", "a bearer token the collector knows is required")
        if request.content_type != "application/json":
            raise _Refused(415, "unsupported_media_type", "a batch is application/json")
        if request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() not in ("gzip", "identity"):
            raise _Refused(415, "unsupported_encoding", "a batch is sent gzip'd (Content-Encoding: gzip) or as it is")
        length = request.content_length
        if length is not None and length > self.limits.max_body_bytes:
            raise _Refused(413, "too_large", f"{length} bytes announced, more than the "
                           f"{self.limits.max_body_bytes} a batch may have")

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: a request refused on its headers is answered before its
        client sends the body."""
        try:
            self._check_headers(request)
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                raise _Refused(417, "expectation_failed", "only Expect: 100-continue is understood")
        except _Refused as exc:
            return self._refusal(request, exc)
        if request.version == HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # what follows is the answer itself
        return None

    async def _take(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_headers(request)
            if self._in_progress >= self.limits.max_in_progress:
                raise _Refused(503, "busy", f"{self._in_progress} batches are being taken in: send it again later")
            self._in_progress += 1
            try:
                body = await self._read(request)
                encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
                loop = asyncio.get_running_loop()
                new, total = await loop.run_in_executor(self._writer, functools.partial(self._write, body, encoding))
            finally:
                self._in_progress -= 1
        except _Refused as exc:
            return self._refusal(request, exc)
        self._records.labels("new").inc(new)
        self._records.labels("duplicate").inc(total - new)
        self._batches.labels("200").inc()
        return web.json_response({"accepted": total, "new": new, "duplicates": total - new})

    async def _read(self, request: web.Request) -> bytes:
        """Step 5: the body, bounded in size and time. Raises ``_Refused``."""
        limit = self.limits.max_body_bytes
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_seconds):
                while chunk := await request.content.readany():
                    body += chunk
                    if len(body) > limit:
                        raise _Refused(413, "too_large", f"more than the {limit} bytes a batch may have")
        except TimeoutError:
            raise _Refused(408, "timeout", f"the body did not arrive within {self.limits.body_seconds:g} s") from None
        except (ConnectionError, HttpProcessingError) as exc:
            # The client left, or its chunks did not parse: counted and logged as a refusal,
            # not as the traceback of a server error.
            raise _Refused(400, "incomplete", f"the body was cut short: {exc}") from None
        return bytes(body)

    def _write(self, body: bytes, encoding: str) -> tuple[int, int]:
        """Step 6, in the writer thread: (records new to the log, records in the batch).
        Raises ``_Refused``."""
        data = _inflated(body, self.limits.max_json_bytes) if encoding == "gzip" else body
        try:
            records = read_batch(data, max_records=self.limits.max_records)
        except MalformedBatch as exc:
            raise _Refused(400, "malformed", str(exc)) from None
        try:
            with self._db.use() as conn:
                return db.insert_shipped(conn, records, keep_traces=self._keep_traces), len(records)
        except db.StoreError as exc:
            self._db.close()  # reopened at the next batch, on whatever file the name holds then
            log.error("cannot write the fleet's activity log: the sidecars will send the batch again",
                      extra={"error": str(exc)})
            raise _Refused(503, "store_error", "the activity log cannot be written now: send it again later") from None

    def _refusal(self, request: web.Request, refused: _Refused) -> web.Response:
        self._batches.labels(str(refused.status)).inc()
        now = time.monotonic()
        last, quiet = self._warned.get(refused.error, (-_WARN_EVERY, 0))
        if now - last >= _WARN_EVERY:
            self._warned[refused.error] = (now, 0)
            peer = request.transport.get_extra_info("peername") if request.transport else None
            log.warning("batch refused", extra={"status": refused.status, "error": refused.error,
                                                "reason": str(refused), "peer": peer[0] if peer else None,
                                                "refused_since_last_line": quiet})
        else:
            self._warned[refused.error] = (last, quiet + 1)
        headers = {"WWW-Authenticate": 'Bearer realm="safous-collector"'} if refused.status == 401 else {}
        if refused.status == 503:
            headers["Retry-After"] = "1"
        response = web.json_response({"error": refused.error, "reason": str(refused)}, status=refused.status,
                                     headers=headers)
        if refused.status in (408, 413):
            response.force_close()  # the rest of the body is not wanted on this connection
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")


_SLICE = 1 << 20


def _inflated(body: bytes, limit: int) -> bytearray:
    """``body`` gunzip'd, at most ``limit`` bytes of it, decompressed a slice at a time: past
    ``limit`` the rest is never made, and what it holds at once is the output and one slice.
    Raises ``_Refused`` (413 past it, 400 not gzip)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = bytearray()
    pending = body
    try:
        while pending and not inflater.eof:
            # max_length 0 would mean no bound: there is always one byte of room here.
            out += inflater.decompress(pending, min(_SLICE, limit + 1 - len(out)))
            if len(out) > limit:
                raise _Refused(413, "too_large", f"the batch decompresses to more than the {limit} bytes it may")
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise _Refused(400, "malformed", f"not gzip: {exc}") from None
    if not inflater.eof:
        raise _Refused(400, "malformed", "the gzip stream ends early")
    if inflater.unused_data:
        raise _Refused(400, "malformed", "data after the gzip stream")
    return out


"""The HTTP authorization listener (``--authz-http``): where Envoy's ext_authz ``http_service``,
nginx ``auth_request``, Caddy ``forward_auth`` and Traefik ``forwardAuth`` ask.

An asyncio protocol on aiohttp's HTTP/1.1 parser (llhttp, in C): what a check needs of a web
server is a parsed request line and headers in, a few hundred bytes out. aiohttp's own server
(``web.Server``) costs ~110 µs of Python a request around that, measured behind Envoy: more than
the whole decision (docs/platform/performance.md). What it did that an authorizer needs is here:

- keep-alive; requests pipelined on one connection answered in order, at most ``MAX_QUEUED``
  read ahead (then the connection is not read until they are answered, nor while the client
  does not read its answers);
- the request line, each header and their number bounded: past a bound, or malformed, the
  request is answered 400 with why, and the connection closed. Every proxy takes that as a
  denial; nothing is decided or recorded;
- a body is never needed: it is discarded as it arrives (never buffered, never decompressed)
  and the connection goes on; the answer comes as soon as the headers are read;
- a HEAD request's answer has no body (else the proxy would read it as the next answer);
- a connection without a check in progress that sends nothing for ``IDLE_SECONDS`` is closed;
- a client that goes away (the proxy's timeout) cancels its check with its webhook calls; the
  check is recorded as ``caller_gone``.

The same ``Pipeline`` as the gRPC listener decides: same codes, reasons, activity log rows,
traces and metrics.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from . import http_edge
from .attributes import RequestAttributes
from .http_edge import HttpAnswer, HttpEdgeConfig
from .pipeline import INTERNAL, Pipeline
from .settings import split_host_port

MAX_LINE = 16 * 1024
"""The request line (the client's path and query, with Envoy's ``path_prefix``)."""
MAX_HEADER = 32 * 1024
"""One header: a URL-encoded client certificate is 3-6 KiB, a cookie header can be larger."""
MAX_HEADERS = 128
MAX_QUEUED = 16
"""Requests read ahead of their answers on one connection (proxies send one at a time)."""
IDLE_SECONDS = 75.0
"""aiohttp's and nginx's keep-alive timeout: longer than the proxies' own (Envoy: 1 h idle, but
it reconnects at once; nginx and Caddy: 60 s and 2 min)."""
_SWEEP_SECONDS = 5.0

_INTERNAL = http_edge.build_response(INTERNAL, "")


def _internal() -> HttpAnswer:
    return _INTERNAL


class AuthzHttpServer:
    """``listen`` is ``HOST:PORT`` (port 0 picks one: ``port`` once started)."""

    def __init__(self, listen: str, pipeline: Pipeline, config: HttpEdgeConfig, *, reuse_port: bool = False) -> None:
        self._host, self._port = split_host_port(listen)
        self.pipeline = pipeline
        self.config = config
        self.respond = functools.partial(http_edge.build_response, envoy=config.profile == "envoy")
        self._reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.connections: set[_Connection] = set()
        self.port = 0

    async def start(self) -> int:
        """Listen. Raises RuntimeError when the address cannot be listened on."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Connection(self, loop), self._host, self._port,
                                                    reuse_port=self._reuse_port or None)
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {self._host}:{self._port} (--authz-http): "
                               f"{exc.strerror or exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting and reading; checks in progress get ``grace`` seconds to be answered,
        then are cancelled (and recorded ``caller_gone``)."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.finish()
        answering = {c.task for c in self.connections if c.task is not None and c.answering}
        if answering:
            await asyncio.wait(answering, timeout=grace)
        for connection in list(self.connections):
            connection.abort()
        await self._server.wait_closed()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            idle_since = time.monotonic() - IDLE_SECONDS
            for connection in [c for c in self.connections if not c.answering and c.seen < idle_since]:
                connection.abort()


def _carriers(message: RawRequestMessage) -> tuple[Mapping[str, str], ...]:
    return (message.headers,)


class _Connection(BaseProtocol):
    """One client connection: its parser, the requests read and not yet answered, and the task
    that answers them one after another (aiohttp's parser wants its BaseProtocol, for a body's
    flow control).

    One task for the connection's life, not one per request: a task costs ~20 µs a request of
    this endpoint's ~100 µs, measured behind Envoy. Each check's trace is its own all the same:
    the pipeline starts one per check in the context it runs in."""

    def __init__(self, server: AuthzHttpServer, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._server = server
        self._reader = HttpRequestParser(self, loop, 2 ** 16, max_line_size=MAX_LINE, max_headers=MAX_HEADERS,
                                         max_field_size=MAX_HEADER, auto_decompress=False)
        self._queue: deque[RawRequestMessage | HttpAnswer] = deque()
        self._body: StreamReader | None = None  # a body still arriving
        self._finishing = False  # nothing more is read: answer what was, then close
        self._reads_paused = False
        self._more: asyncio.Future[None] | None = None  # the task waits on it for a request
        self.answering = False  # a check in progress
        self.task: asyncio.Task[None] | None = None
        self.seen = time.monotonic()

    def pause_reading(self) -> None:
        """(aiohttp's flow control for a body: a body is discarded within the data_received
        that brought it, so there is never anything to pause.)"""

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        """(See ``pause_reading``.)"""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # TCP_NODELAY: an answer is one small write
        self._server.connections.add(self)
        self.task = self._loop.create_task(self._serve())

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)
        self._queue.clear()
        self._body = None
        if self.task is not None:
            self.task.cancel()  # a check in progress is recorded as caller_gone by the pipeline

    def pause_writing(self) -> None:
        super().pause_writing()
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self._finishing:
            return
        self.seen = time.monotonic()
        try:
            messages, upgraded, _ = self._reader.feed_data(data)
        except HttpProcessingError as exc:  # past a bound, or malformed
            why = getattr(exc, "message", "") or type(exc).__name__
            self._queue.append(http_edge.bad_request(f"the authorization request could not be read: {why}"))
            self._finishing = True
        else:
            for message, payload in messages:
                self._queue.append(message)
                if payload is not EMPTY_PAYLOAD:
                    self._body = payload
                    # The client may wait for a 100 Continue we never send: its next bytes
                    # could be the body or the next request; only a new connection is sure.
                    if message.headers.get("expect", "").lower() == "100-continue":
                        self._finishing = True
            # An upgrade (or CONNECT): what follows is not HTTP.
            self._finishing = self._finishing or upgraded
        if self._body is not None:
            self._discard_body()
        self._update_reading()
        self._wake()

    def _discard_body(self) -> None:
        assert self._body is not None
        try:
            self._body.read_nowait(-1)
        except HttpProcessingError:  # a malformed body (the parser set its error): the next feed fails too
            self._body = None
            return
        if self._body.is_eof():
            self._body = None

    def _update_reading(self) -> None:
        if self.transport is None:
            return
        pause = self._finishing or self.writing_paused or len(self._queue) >= MAX_QUEUED
        if pause != self._reads_paused:
            self._reads_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    async def _serve(self) -> None:
        """Answer the requests read, in order; once the connection is finishing and they are
        answered, close it."""
        while True:
            while not self._queue:
                if self._finishing or self.transport is None:
                    if self.transport is not None:
                        self.transport.close()
                    return
                self._more = self._loop.create_future()
                await self._more
            item = self._queue.popleft()
            self._update_reading()
            if isinstance(item, HttpAnswer):  # a request that could not be read: the last one
                self._write(item, close=True, head_only=False)
                return
            self.answering = True
            try:
                answer = await self._server.pipeline.answer(
                    functools.partial(self._read, item), self._server.respond, _internal,
                    carriers=functools.partial(_carriers, item))
            finally:
                self.answering = False
            close = (self._finishing and not self._queue) or item.should_close
            self._write(answer, close=close, head_only=item.method == "HEAD")
            if close:
                return

    def _read(self, message: RawRequestMessage) -> RequestAttributes:
        return http_edge.read_request(message.method, message.path, message.headers.items(), self._server.config)

    def _write(self, answer: HttpAnswer, *, close: bool, head_only: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(answer.wire(close=close, head_only=head_only))
        if close:
            self._finishing = True
            transport.close()  # after what was written is sent

    def finish(self) -> None:
        """Answer the check in progress, if any, read nothing more, then close."""
        self._finishing = True
        self._queue.clear()
        self._update_reading()
        self._wake()

    def abort(self) -> None:
        """Close now (a check in progress is cancelled and recorded ``caller_gone``)."""
        if self.transport is not None:
            self.transport.close()
        if self.task is not None:
            self.task.cancel()

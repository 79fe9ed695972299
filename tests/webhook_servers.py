"""Third-party APIs on loopback for the webhook tests: an aiohttp app that records every
request (``Api``, started by the ``serve`` fixture), and ``RawServer``, HTTP/1.1 over asyncio
streams so that a fault can happen at any byte (the ``raw`` fixture). The fixtures are in
conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from sidecar.rules.client import WebhookFailure, WebhookResponse
from sidecar.rules.model import ActionType, ResponseAction
from sidecar.rules.templates import WebhookRequest

MiB = 1 << 20
PASSING = b'{"status": "active"}'


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: tuple[str, int]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Api:
    """A running third-party API: its base URL and every request it received."""

    url: str
    seen: list[Seen] = field(default_factory=list)

    @property
    def peers(self) -> set[tuple[str, int]]:
        return {s.peer for s in self.seen}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[..., Awaitable[Api]]


def get(url: str, *headers: tuple[str, str]) -> WebhookRequest:
    return WebhookRequest("GET", url, tuple(headers), None)


async def failure(call: Awaitable[WebhookResponse]) -> WebhookFailure:
    with pytest.raises(WebhookFailure) as info:
        await call
    return info.value


@dataclass
class RawRequest:
    """One request as it arrived: the head exactly as received, parsed for convenience."""

    method: str
    target: str
    head: bytes
    headers: list[tuple[str, bytes]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def values(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k == name.lower()]


Behaviour = Callable[[RawRequest, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """HTTP/1.1 on 127.0.0.1:0, one request per connection. ``routes`` maps a path (without
    query) to a ``Behaviour``, ``fallback`` answers the others. Records every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.fallback: Behaviour = respond(404, b'{"error": "no such route"}')
        self.requests: list[RawRequest] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> RawServer:
        # A large line limit: the injection tests send very long URLs and header values.
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=8 * MiB)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def seen(self, path: str) -> list[RawRequest]:
        return [r for r in self.requests if r.path == path]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head[:-4].split(b"\r\n")
            method, target, _ = request_line.decode("ascii").split(" ", 2)
            headers = []
            for line in lines:
                name, _, value = line.partition(b":")
                headers.append((name.decode("ascii").lower(), value.removeprefix(b" ")))
            length = int(next((v for k, v in headers if k == "content-length"), b"0"))
            body = await reader.readexactly(length)
            request = RawRequest(method, target, head, headers, body)
            self.requests.append(request)
            await self.routes.get(request.path, self.fallback)(request, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: what several faults are about
        finally:
            self._tasks.discard(task)
            writer.close()


def head(status: int, *, content_type: str | None = "application/json",
         length: int | None = None, extra: tuple[str, ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} Whatever"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [*extra, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def respond(status: int = 200, body: bytes = PASSING, *, content_type: str | None = "application/json",
            extra: tuple[str, ...] = ()) -> Behaviour:
    """A complete, well-formed answer."""
    async def behaviour(request: RawRequest, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(head(status, content_type=content_type, length=len(body), extra=extra) + body)
        await writer.drain()
    return behaviour


def action(kind: str, key: str, value: str) -> ResponseAction:
    return ResponseAction(type=ActionType(kind), key=key, value=value)

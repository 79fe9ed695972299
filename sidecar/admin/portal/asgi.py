"""The portal's two ASGI middlewares, in front of Datasette: requests refused before it sees
them. Each answers a short plain-text reason."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from . import guard

__all__ = ["ASGIApp", "host_guard", "refusing_sql_arguments"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _refuse(send: Send, status: int, reason: str) -> None:
    body = (reason + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def host_guard(app: ASGIApp, hosts: frozenset[str] | None) -> ASGIApp:
    """``app``, answering 421 to an HTTP request whose Host header is not one of ``hosts``
    (lower case, with the port); None: any."""
    if hosts is None:
        return app

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1").lower() for k, v in scope["headers"] if k == b"host"), "")
            if host not in hosts:
                await _refuse(send, 421, "this portal answers on its own address only")
                return
        await app(scope, receive, send)

    return guarded


def refusing_sql_arguments(app: ASGIApp) -> ASGIApp:
    """``app``, answering 403 to an HTTP request with one of ``guard.SQL_ARGUMENTS``."""
    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        name = guard.refused_argument(scope.get("query_string", b"")) if scope["type"] == "http" else None
        if name is not None:
            await _refuse(send, 403, f"the portal runs only its own SQL: {name}= is refused")
            return
        await app(scope, receive, send)

    return refusing

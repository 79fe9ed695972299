"""The webhook caller: every HTTP request the sidecar makes goes through ``WebhookClient``.

One shared ``aiohttp.ClientSession`` per process: pooled keep-alive connections (``pool_size``
in all), a DNS cache, TLS verified against the system store plus an optional CA bundle, no
cookies kept between calls, no proxy from the environment, no redirects followed (a 3xx is
returned like any status, and the rule fails on it).

A call (``WebhookClient.call``) sends a rendered ``WebhookRequest`` as it is: the URL is
already percent-encoded by the templates and is not re-quoted; headers keep their order and
duplicates. Its ``timeout`` bounds everything the call waits for: a pooled connection, the
connect and TLS handshake, an OAuth token, the status and headers, and the whole body. The
body is read incrementally and the connection dropped as soon as it passes
``max_response_bytes`` (a ``Content-Length`` above it is refused before reading anything).

Authentication (``NoAuth``, ``BasicAuth``, ``OAuthAuth``) replaces any ``Authorization``
header of the rule. OAuth tokens come from a ``sidecar.rules.oauth.TokenCache``; a 401 from the
webhook drops the token that was refused, takes a fresh one (one token request, shared by
the checks that got the same 401) and sends the request once more; a second 401 is
returned as the response. A refusal replaces the token at most once a second per client
(``TokenCache.invalidate``): within that second, a 401 for the current token is returned
at once, without a retry.

Failures are ``WebhookFailure(code, reason)``; aiohttp, socket and TLS exceptions are
translated here and chained (``from exc``). Reasons are short, do not name the rule (the
caller adds it) and never contain a secret, a token or a header value:

=======================  ==============================================================
code                     reasons
=======================  ==============================================================
webhook_timeout          ``webhook did not answer within 1000 ms``;
                         ``OAuth token endpoint did not answer within 1000 ms`` (the
                         call's time ran out while waiting for a token)
webhook_unreachable      ``webhook unreachable: connection refused`` (or another socket
                         error), ``webhook unreachable: cannot resolve host example``,
                         ``webhook TLS verification failed: <what OpenSSL says>``,
                         ``webhook TLS handshake failed``, ``webhook closed the
                         connection before answering``, ``webhook sent a malformed HTTP
                         response``, ``webhook URL cannot be requested``
response_too_large       ``webhook response exceeds 1 MiB``
oauth_failed             the ``sidecar.rules.oauth.OAuthError`` reason, e.g. ``OAuth token
                         endpoint unreachable: connection refused``, ``OAuth token
                         endpoint answered HTTP 400 (invalid_client)``
=======================  ==============================================================

A cancelled call raises ``CancelledError`` and releases (closes) its connection; a token
request it was waiting for goes on for the checks that come next.

Exceptions::

    Exception
     └── WebhookFailure   a call that produced no response to judge (``code``, ``reason``)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp
from yarl import URL

from sidecar import tracing
from sidecar.decision import Code
from sidecar.rules.oauth import (
    IssuedToken,
    OAuthAuth,
    OAuthError,
    TokenCache,
    TokenKey,
    parse_token_response,
    token_request,
)
from sidecar.rules.templates import WebhookRequest

__all__ = [
    "MAX_RESPONSE_BYTES",
    "Auth",
    "BasicAuth",
    "NoAuth",
    "OAuthAuth",
    "WebhookClient",
    "WebhookFailure",
    "WebhookResponse",
]

MAX_RESPONSE_BYTES = 1 << 20
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
"""A token response is a few KiB at most; more is not a token endpoint."""
USER_AGENT = "safous-sidecar"


class WebhookFailure(Exception):
    """A webhook call without a response: ``code`` (stable) and ``reason`` (short, human,
    without the rule's name, a secret or a header value)."""

    def __init__(self, code: Code, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


@dataclass(frozen=True, slots=True)
class WebhookResponse:
    """The webhook's answer: status, the whole body (at most ``max_response_bytes``, decoded
    from any Content-Encoding) and the raw ``Content-Type`` header (``""`` when absent)."""

    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True, slots=True)
class NoAuth:
    """No authentication: the rule's own headers, as rendered."""


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """HTTP Basic (RFC 7617), UTF-8, password already resolved (``sidecar.rules.secrets``)."""

    username: str
    password: str = field(repr=False)

    @property
    def header(self) -> str:
        credentials = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(credentials).decode("ascii")


Auth = NoAuth | BasicAuth | OAuthAuth
NO_AUTH = NoAuth()
# The span of a call while OpenTelemetry is off: none, and nothing to build for it.
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


class WebhookClient:
    """The shared HTTP client of the sidecar. ``start()`` before the first call, ``close()``
    at shutdown, or ``async with WebhookClient(...) as client``.

    ``ca_bundle``: a PEM file (or a directory of hashed certificates) trusted in addition to
    the system store, for webhooks and token endpoints behind a private CA.
    ``clock``: monotonic seconds, for the expiry of OAuth tokens (injectable for tests).
    """

    def __init__(
        self,
        *,
        ca_bundle: str | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        pool_size: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ca_bundle = ca_bundle
        self._max_response_bytes = max_response_bytes
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self.tokens = TokenCache(self._fetch_token, clock=clock)

    async def start(self) -> None:
        """Create the session. Raises ``ValueError`` when the CA bundle cannot be loaded."""
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=self._pool_size,
            ssl=_ssl_context(self._ca_bundle),
            use_dns_cache=True,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Bounded by each call's own asyncio.timeout; aiohttp's defaults (5 min) would
            # only get in the way.
            timeout=aiohttp.ClientTimeout(),
            headers={"User-Agent": USER_AGENT},
            # A webhook's Set-Cookie must not follow the next check (another user's) around.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        """Cancel token requests in flight and close every connection."""
        await self.tokens.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> WebhookClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(
        self, request: WebhookRequest, *, timeout: float, auth: Auth | None = NO_AUTH
    ) -> WebhookResponse:
        """Send ``request`` with ``auth`` and read the whole answer within ``timeout`` seconds.

        ``auth`` None is ``NoAuth()``. Returns the response whatever its status (3xx and a
        second 401 included). Raises ``WebhookFailure``: ``webhook_timeout``,
        ``webhook_unreachable``, ``response_too_large``, ``oauth_failed`` (module docstring).
        Cancellation propagates.
        """
        session = self._require_session()
        waiting_for_token = False
        try:
            async with asyncio.timeout(timeout):
                if isinstance(auth, OAuthAuth):
                    key = TokenKey.of(auth)
                    waiting_for_token = True
                    token = await self.tokens.token(auth, key)
                    waiting_for_token = False
                    response = await self._send(session, request, f"Bearer {token}")
                    if response.status != 401:
                        return response
                    if not self.tokens.invalidate(key, token):
                        # The webhook refuses even a fresh token: another would not help, and
                        # asking for one on every check would flood the token endpoint.
                        return response
                    waiting_for_token = True
                    token = await self.tokens.token(auth, key)
                    waiting_for_token = False
                    return await self._send(session, request, f"Bearer {token}")
                authorization = auth.header if isinstance(auth, BasicAuth) else None
                return await self._send(session, request, authorization)
        except TimeoutError as exc:
            waited = "OAuth token endpoint" if waiting_for_token else "webhook"
            reason = f"{waited} did not answer within {round(timeout * 1000)} ms"
            raise WebhookFailure(Code.WEBHOOK_TIMEOUT, reason) from exc
        except OAuthError as exc:
            raise WebhookFailure(Code.OAUTH_FAILED, exc.reason) from exc

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("WebhookClient is not started")
        return self._session

    async def _send(
        self, session: aiohttp.ClientSession, request: WebhookRequest, authorization: str | None
    ) -> WebhookResponse:
        headers = _headers(request.headers, authorization)
        limit = self._max_response_bytes
        try:
            url = URL(request.url, encoded=True)
        except ValueError as exc:
            raise WebhookFailure(Code.WEBHOOK_UNREACHABLE, "webhook URL cannot be requested") from exc
        try:
            with (tracing.outgoing_span("webhook call", request.method, url.host or "", headers)
                  if tracing.enabled() else _NO_SPAN) as span:
                async with session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=request.body,
                    allow_redirects=False,
                ) as response:
                    if span is not None:
                        span.set_attribute("http.response.status_code", response.status)
                    body = await _read_body(response, limit)
                    if body is None:
                        raise WebhookFailure(
                            Code.RESPONSE_TOO_LARGE, f"webhook response exceeds {_size(limit)}"
                        )
                    content_type = response.headers.get(aiohttp.hdrs.CONTENT_TYPE, "")
                    return WebhookResponse(response.status, body, content_type)
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise  # only asyncio.timeout bounds a call; the caller words it
            raise WebhookFailure(Code.WEBHOOK_UNREACHABLE, _unreachable("webhook", exc)) from exc

    async def _fetch_token(self, auth: OAuthAuth) -> IssuedToken:
        """``TokenFetch`` for this client's ``TokenCache``: the grant's request through the
        shared session. Raises ``OAuthError``."""
        session = self._require_session()
        request = token_request(auth)
        headers = list(request.headers)
        try:
            with (tracing.outgoing_span("oauth token", "POST", URL(request.url).host or "", headers)
                  if tracing.enabled() else _NO_SPAN) as span:
                async with session.post(
                    request.url, headers=headers, data=request.body, allow_redirects=False
                ) as response:
                    if span is not None:
                        span.set_attribute("http.response.status_code", response.status)
                    body = await _read_body(response, MAX_TOKEN_RESPONSE_BYTES)
                    if body is None:
                        raise OAuthError(
                            f"OAuth token response exceeds {_size(MAX_TOKEN_RESPONSE_BYTES)}"
                        )
                    status = response.status
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise OAuthError(_unreachable("OAuth token endpoint", exc)) from exc
        return parse_token_response(status, body)


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verify certificates and host names against the system store, plus ``ca_bundle``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_bundle:
        try:
            if os.path.isdir(ca_bundle):
                context.load_verify_locations(capath=ca_bundle)
            else:
                context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"CA bundle {ca_bundle}: {exc}") from exc
    return context


def _headers(
    pairs: Iterable[tuple[str, str]], authorization: str | None
) -> list[tuple[str, str]]:
    """The rule's headers in order, duplicates kept; the authentication's Authorization
    header, when there is one, instead of any the rule has."""
    if authorization is None:
        return list(pairs)
    headers = [(name, value) for name, value in pairs if name.lower() != "authorization"]
    headers.append(("Authorization", authorization))
    return headers


async def _read_body(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None (and the connection closed) as soon as it passes ``limit``."""
    length = response.content_length
    if length is not None and length > limit:
        response.close()
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            response.close()
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _unreachable(who: str, exc: BaseException) -> str:
    """A short reason for a transport failure, without URLs' secrets or header values."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        problem = exc.certificate_error
        detail = getattr(problem, "verify_message", None) or getattr(problem, "reason", None)
        return f"{who} TLS verification failed" + (f": {str(detail)[:80]}" if detail else "")
    if isinstance(exc, aiohttp.ClientConnectorSSLError | ssl.SSLError):
        return f"{who} TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"{who} unreachable: cannot resolve host {exc.host}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{who} closed the connection before answering"
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return f"{who} sent a malformed HTTP response"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return f"{who} URL cannot be requested"
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(os_error, ConnectionRefusedError):
        return f"{who} unreachable: connection refused"
    if isinstance(os_error, ConnectionResetError):
        return f"{who} unreachable: connection reset"
    if isinstance(os_error, OSError) and os_error.strerror:
        return f"{who} unreachable: {os_error.strerror.lower()}"
    return f"{who} unreachable ({type(exc).__name__})"


def _size(limit: int) -> str:
    if limit % (1 << 20) == 0:
        return f"{limit >> 20} MiB"
    if limit % (1 << 10) == 0:
        return f"{limit >> 10} KiB"
    return f"{limit} bytes"

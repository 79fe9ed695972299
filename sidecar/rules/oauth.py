"""OAuth 2.0 client-credentials grant (RFC 6749 §4.4) for rules with ``oauth`` authentication.

This module owns the grant and the token cache; ``sidecar.rules.client`` owns the HTTP session and
sends the token request this module describes (``token_request``), so that every socket of
the project goes through one pooled, TLS-verifying client.

The token request::

    POST <token URL>
    Authorization: Basic base64(form-urlencode(client_id) ":" form-urlencode(client_secret))
    Content-Type: application/x-www-form-urlencoded
    Accept: application/json

    grant_type=client_credentials

Client authentication is HTTP Basic as RFC 6749 §2.3.1 says: the id and the secret are
form-urlencoded *before* being joined and base64-encoded (so a ``:`` in the id survives).

The answer (``parse_token_response``) must be 2xx, a JSON object, with a non-empty string
``access_token`` made of RFC 6750 ``b64token`` characters, and a ``token_type`` that, when
present, is ``Bearer`` (any case). ``expires_in`` (``token_lifetime``):

==========================================  ====================================
``expires_in``                              the token is kept for
==========================================  ====================================
missing, ``null``, not a number, NaN,       300 s (``DEFAULT_LIFETIME``)
a boolean, a non-numeric string
a number or a numeric string (``"3599"``,   that many seconds, clamped to
as some providers send it)                  [1 s, 1 day]: ``0`` or ``-5`` → 1 s,
                                            ``1e9`` or ``Infinity`` → 1 day
==========================================  ====================================

A token is used until ``lifetime - min(30 s, 10 % of lifetime)`` after its request was *sent*
(the margin absorbs clock skew and the time the webhook call takes), then fetched anew.

``TokenCache`` keys tokens by (token URL, client id, SHA-256 of the secret): two rules with the
same client share a token; a changed secret is a new key. Concurrent checks needing the same
token share one in-flight request (single flight). A failed request is not a token: its
failure is shared by every check that waited for it, and kept for ``FAILURE_TTL`` (1 s) so
that a burst of checks during an outage of the token endpoint makes one token request per
second, not one per check. Likewise a token the webhook refuses (``invalidate``) is replaced
at most once per ``FAILURE_TTL``: a webhook that refuses every token (wrong scope or
audience) would otherwise make each check fetch a new one. A fetch runs in its own task,
bounded by its own timeout (10 s by default): a check that stops waiting (its rule's
timeout, or cancellation) does not cancel it, and the next checks find the token it brings.

Reasons name the problem, never the client secret or a token.

Exceptions::

    Exception
     └── OAuthError   no token: the endpoint failed or its answer is unusable (``reason``);
                      ``sidecar.rules.client`` turns it into ``WebhookFailure(oauth_failed)``
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import quote_plus

__all__ = [
    "DEFAULT_LIFETIME",
    "FAILURE_TTL",
    "MAX_LIFETIME",
    "MIN_LIFETIME",
    "TOKEN_REQUEST_BODY",
    "IssuedToken",
    "OAuthAuth",
    "OAuthError",
    "TokenCache",
    "TokenFetch",
    "TokenKey",
    "TokenRequest",
    "client_authorization",
    "parse_token_response",
    "refresh_margin",
    "token_lifetime",
    "token_request",
]

log = logging.getLogger(__name__)

DEFAULT_LIFETIME = 300.0
"""Seconds a token is kept when ``expires_in`` is missing or unusable."""
MIN_LIFETIME = 1.0
"""The shortest lifetime kept: an ``expires_in`` of 0 or less still bounds token requests to
about one per second per client; a token that really expired gets a 401, and the retry."""
MAX_LIFETIME = 86400.0
"""The longest lifetime kept (1 day), whatever ``expires_in`` claims."""
MAX_MARGIN = 30.0
"""A token is refreshed ``min(MAX_MARGIN, 10 % of its lifetime)`` before it expires."""
FAILURE_TTL = 1.0
"""Seconds a failed token request is remembered (and its reason reused) before a new try."""
FETCH_TIMEOUT = 10.0
"""Seconds a token request may take, whatever the timeouts of the checks waiting for it."""

TOKEN_REQUEST_BODY = b"grant_type=client_credentials"

# RFC 6750 §2.1 b64token: what may follow "Bearer " in an Authorization header.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6749 §5.2: the characters of an "error" code. Anything else is not quoted back.
_ERROR_CODE = re.compile(r"[\x20-\x21\x23-\x5B\x5D-\x7E]{1,64}")
_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")


class OAuthError(Exception):
    """No access token. ``reason``: short and human, without the secret or any token."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class OAuthAuth:
    """``oauth`` authentication of a rule, secret already resolved (``sidecar.rules.secrets``)."""

    token_url: str
    client_id: str
    client_secret: str = field(repr=False)


class TokenKey(NamedTuple):
    """What a cached token belongs to. Holds a hash of the secret, not the secret."""

    token_url: str
    client_id: str
    secret_sha256: str

    @classmethod
    def of(cls, auth: OAuthAuth) -> TokenKey:
        digest = hashlib.sha256(auth.client_secret.encode("utf-8")).hexdigest()
        return cls(auth.token_url, auth.client_id, digest)


class TokenRequest(NamedTuple):
    """The token request of the grant, ready to send (not following redirects)."""

    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An access token and how many seconds to consider it valid (``token_lifetime``)."""

    access_token: str = field(repr=False)
    lifetime: float


TokenFetch = Callable[[OAuthAuth], Awaitable[IssuedToken]]
"""Sends the token request for a client and parses the answer (``parse_token_response``);
raises ``OAuthError`` when there is no token. ``sidecar.rules.client.WebhookClient`` provides it."""


def client_authorization(client_id: str, client_secret: str) -> str:
    """The ``Authorization`` header value authenticating a client (RFC 6749 §2.3.1)."""
    credentials = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(credentials.encode("ascii")).decode("ascii")


def token_request(auth: OAuthAuth) -> TokenRequest:
    """The client-credentials token request for ``auth``."""
    headers = (
        ("Authorization", client_authorization(auth.client_id, auth.client_secret)),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Accept", "application/json"),
    )
    return TokenRequest(auth.token_url, headers, TOKEN_REQUEST_BODY)


def token_lifetime(expires_in: Any) -> float:
    """Seconds to keep a token whose response said ``expires_in`` (table: module docstring)."""
    if isinstance(expires_in, bool) or expires_in is None:
        return DEFAULT_LIFETIME
    if isinstance(expires_in, int | float):
        value = float(expires_in)
    elif isinstance(expires_in, str) and _NUMBER.fullmatch(expires_in):
        value = float(expires_in)
    else:
        return DEFAULT_LIFETIME
    if math.isnan(value):
        return DEFAULT_LIFETIME
    return min(max(value, MIN_LIFETIME), MAX_LIFETIME)


def refresh_margin(lifetime: float) -> float:
    """How long before the end of ``lifetime`` a token stops being used."""
    return min(MAX_MARGIN, lifetime / 10)


def parse_token_response(status: int, body: bytes) -> IssuedToken:
    """The token in a token endpoint's answer; ``OAuthError`` naming the problem otherwise.

    A non-2xx answer's reason carries the status and the RFC 6749 ``error`` code when the body
    has a well-formed one (never ``error_description``, which is free text).
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not 200 <= status < 300:
        error = document.get("error") if isinstance(document, dict) else None
        detail = f" ({error})" if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else ""
        raise OAuthError(f"OAuth token endpoint answered HTTP {status}{detail}")
    if not isinstance(document, dict):
        what = "a JSON object" if document is not None or body.strip() == b"null" else "JSON"
        raise OAuthError(f"OAuth token response is not {what}")
    access_token = document.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise OAuthError("OAuth token response has no access_token")
    if not _B64TOKEN.fullmatch(access_token):
        raise OAuthError("OAuth access_token holds characters a bearer token cannot have")
    token_type = document.get("token_type")
    if token_type is not None and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
        shown = json.dumps(token_type)[:40] if isinstance(token_type, str) else "not a string"
        raise OAuthError(f"OAuth token_type is {shown}, expected Bearer")
    return IssuedToken(access_token, token_lifetime(document.get("expires_in")))


@dataclass(slots=True)
class _Token:
    value: str
    fresh_until: float


@dataclass(slots=True)
class _Failure:
    reason: str
    until: float


class TokenCache:
    """Access tokens per client: cached, shared, fetched once at a time (module docstring).

    ``fetch`` sends a token request (``TokenFetch``). ``clock`` is monotonic seconds
    (injectable for tests). ``close()`` cancels the requests in flight.
    """

    def __init__(
        self,
        fetch: TokenFetch,
        *,
        clock: Callable[[], float] = time.monotonic,
        fetch_timeout: float = FETCH_TIMEOUT,
        failure_ttl: float = FAILURE_TTL,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._fetch_timeout = fetch_timeout
        self._failure_ttl = failure_ttl
        self._tokens: dict[TokenKey, _Token] = {}
        self._failures: dict[TokenKey, _Failure] = {}
        # When a refused token was last dropped, per key: refusals replace tokens at most
        # once per failure_ttl (module docstring).
        self._refused_at: dict[TokenKey, float] = {}
        self._in_flight: dict[TokenKey, asyncio.Task[str | OAuthError]] = {}
        self.fetches = 0  # token requests sent, and how many failed (for metrics)
        self.fetch_failures = 0

    async def token(self, auth: OAuthAuth, key: TokenKey | None = None) -> str:
        """A valid access token for ``auth``: the cached one, the one being fetched, or a new one.

        Raises ``OAuthError`` when the request fails (or failed less than ``failure_ttl`` ago).
        Cancelling the caller does not cancel a shared request.
        """
        if key is None:
            key = TokenKey.of(auth)
        now = self._clock()
        cached = self._tokens.get(key)
        if cached is not None and now < cached.fresh_until:
            return cached.value
        failure = self._failures.get(key)
        if failure is not None and now < failure.until:
            raise OAuthError(failure.reason)
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh(key, auth))
            self._in_flight[key] = task
        outcome = await asyncio.shield(task)
        if isinstance(outcome, OAuthError):
            raise OAuthError(outcome.reason)  # a new exception per waiter: no shared traceback
        return outcome

    def invalidate(self, key: TokenKey, token: str) -> bool:
        """Stop using ``token`` (the webhook refused it), unless it was already replaced: a
        token fetched meanwhile by another check is kept.

        Returns whether ``token()`` may now bring another token, so that a retry makes
        sense. False when ``token`` is the current token and a refusal already replaced the
        token less than ``failure_ttl`` ago: the webhook refuses fresh tokens, and the token
        is kept (without this, a webhook refusing every token makes one token request per
        check).
        """
        cached = self._tokens.get(key)
        if cached is None or cached.value != token:
            return True  # already replaced, or being fetched: the retry gets the newer one
        now = self._clock()
        refused_at = self._refused_at.get(key)
        if refused_at is not None and now - refused_at < self._failure_ttl:
            return False
        self._refused_at[key] = now
        del self._tokens[key]
        return True

    async def close(self) -> None:
        """Cancel the token requests in flight and forget every token."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        self._tokens.clear()
        self._failures.clear()
        self._refused_at.clear()

    async def _refresh(self, key: TokenKey, auth: OAuthAuth) -> str | OAuthError:
        """Fetch a token and record the outcome. Returns the failure instead of raising it,
        so that a request nobody waits for any more leaves no unretrieved exception."""
        sent_at = self._clock()
        self.fetches += 1
        try:
            async with asyncio.timeout(self._fetch_timeout):
                issued = await self._fetch(auth)
        except OAuthError as exc:
            outcome: str | OAuthError = exc
        except TimeoutError:
            outcome = OAuthError(
                f"OAuth token endpoint did not answer within {round(self._fetch_timeout * 1000)} ms"
            )
        except Exception as exc:  # fail closed, but keep the cache consistent
            log.exception("OAuth token request for client %r failed unexpectedly", auth.client_id)
            outcome = OAuthError(f"OAuth token request failed ({type(exc).__name__})")
        else:
            fresh_until = sent_at + issued.lifetime - refresh_margin(issued.lifetime)
            self._tokens[key] = _Token(issued.access_token, fresh_until)
            self._failures.pop(key, None)
            outcome = issued.access_token
            log.debug("OAuth token for client %r, used for %.0f s",
                      auth.client_id, fresh_until - sent_at)
        finally:
            self._in_flight.pop(key, None)
        if isinstance(outcome, OAuthError):
            self.fetch_failures += 1
            self._tokens.pop(key, None)
            self._failures[key] = _Failure(outcome.reason, self._clock() + self._failure_ttl)
            log.warning("OAuth token request for client %r failed: %s", auth.client_id, outcome.reason)
        return outcome

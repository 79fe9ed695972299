"""OAuth client credentials: the grant's pure parts, and the token cache through real servers
on loopback (a token endpoint and a webhook that checks the bearer token)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import pytest
from aiohttp import web

from sidecar.decision import Code
from sidecar.rules.client import WebhookClient
from sidecar.rules.oauth import (
    DEFAULT_LIFETIME,
    MAX_LIFETIME,
    OAuthAuth,
    OAuthError,
    TokenKey,
    client_authorization,
    parse_token_response,
    refresh_margin,
    token_lifetime,
)
from tests.helpers import FakeClock, eventually
from tests.webhook_servers import Api, Serve, failure, get

SECRET = "s3cr:et/+&% é"
CLIENT_ID = "my client:1"


# --- the grant, pure ---------------------------------------------------------------------

@pytest.mark.parametrize(("expires_in", "lifetime"), [
    (3600, 3600.0),
    (2.5, 2.5),
    ("3599", 3599.0),          # some providers send a string
    (" 60 ", 60.0),
    (None, DEFAULT_LIFETIME),  # missing
    ("soon", DEFAULT_LIFETIME),
    ("", DEFAULT_LIFETIME),
    (True, DEFAULT_LIFETIME),
    ([60], DEFAULT_LIFETIME),
    (math.nan, DEFAULT_LIFETIME),
    (0, 1.0),                  # already expired: kept 1 s, bounding token requests to ~1/s
    (-5, 1.0),
    ("-5", 1.0),
    (10**9, MAX_LIFETIME),     # at most a day
    (math.inf, MAX_LIFETIME),
    ("1e9", MAX_LIFETIME),
])
def test_token_lifetime(expires_in: Any, lifetime: float) -> None:
    assert token_lifetime(expires_in) == lifetime


@pytest.mark.parametrize(("lifetime", "margin"), [(3600, 30), (300, 30), (100, 10), (2, 0.2),
                                                  (1, 0.1)])
def test_refresh_margin(lifetime: float, margin: float) -> None:
    assert refresh_margin(lifetime) == pytest.approx(margin)


def test_client_authentication_form_encodes_before_base64() -> None:
    value = client_authorization(CLIENT_ID, SECRET)
    expected = base64.b64encode(b"my+client%3A1:s3cr%3Aet%2F%2B%26%25+%C3%A9").decode()
    assert value == f"Basic {expected}"


@pytest.mark.parametrize(("status", "body", "reason"), [
    (400, b'{"error": "invalid_client", "error_description": "bad secret s3cr"}',
     "OAuth token endpoint answered HTTP 400 (invalid_client)"),
    (401, b"<html>nope</html>", "OAuth token endpoint answered HTTP 401"),
    (500, b'{"error": "bad\\r\\nX-Injected: 1"}', "OAuth token endpoint answered HTTP 500"),
    (302, b"", "OAuth token endpoint answered HTTP 302"),
    (200, b"<html>", "OAuth token response is not JSON"),
    (200, b"\xff\xfe", "OAuth token response is not JSON"),
    (200, b'["tok"]', "OAuth token response is not a JSON object"),
    (200, b"null", "OAuth token response is not a JSON object"),
    (200, b'{"token_type": "Bearer"}', "OAuth token response has no access_token"),
    (200, b'{"access_token": ""}', "OAuth token response has no access_token"),
    (200, b'{"access_token": 12}', "OAuth token response has no access_token"),
    (200, b'{"access_token": "a b"}',
     "OAuth access_token holds characters a bearer token cannot have"),
    (200, b'{"access_token": "t\\r\\nX: 1"}',
     "OAuth access_token holds characters a bearer token cannot have"),
    (200, b'{"access_token": "t", "token_type": "mac"}',
     'OAuth token_type is "mac", expected Bearer'),
    (200, b'{"access_token": "t", "token_type": 1}',
     "OAuth token_type is not a string, expected Bearer"),
])
def test_unusable_token_responses(status: int, body: bytes, reason: str) -> None:
    with pytest.raises(OAuthError) as info:
        parse_token_response(status, body)
    assert info.value.reason == reason


def test_a_usable_token_response() -> None:
    issued = parse_token_response(
        200, b'{"access_token": "eyJ.a-b_c~d+e/f==", "token_type": "bearer", "expires_in": 60}')
    assert (issued.access_token, issued.lifetime) == ("eyJ.a-b_c~d+e/f==", 60.0)
    assert "eyJ" not in repr(issued)
    assert SECRET not in repr(OAuthAuth("https://idp/token", CLIENT_ID, SECRET))


# --- through real servers ----------------------------------------------------------------

@dataclass
class TokenEndpoint:
    """A token endpoint: answers ``answer(n)`` to its request number n (from 0), after ``delay``
    seconds, or once ``held`` is set if it is given."""

    api: Api
    answer: Callable[[int], tuple[int, Any]]
    delay: float = 0.0
    held: asyncio.Event | None = None
    answered: int = 0

    @property
    def requests(self) -> int:
        return len(self.api.seen)


def tokens(expires_in: Any = 3600) -> Callable[[int], tuple[int, Any]]:
    """Token n is ``tok-n``."""
    def answer(n: int) -> tuple[int, Any]:
        document: dict[str, Any] = {"access_token": f"tok-{n}", "token_type": "Bearer"}
        if expires_in is not None:
            document["expires_in"] = expires_in
        return 200, document
    return answer


@pytest.fixture
async def idp(serve: Serve) -> TokenEndpoint:
    endpoint: TokenEndpoint

    async def handler(request: web.Request) -> web.StreamResponse:
        n = endpoint.requests - 1  # this request is already recorded
        if endpoint.delay:
            await asyncio.sleep(endpoint.delay)  # a slow endpoint: what the test is about
        if endpoint.held is not None:
            await asyncio.wait_for(endpoint.held.wait(), 10)
        status, document = endpoint.answer(n)
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        endpoint.answered += 1
        return web.Response(status=status, body=body, content_type="application/json")

    endpoint = TokenEndpoint(await serve(handler), tokens())
    return endpoint


def accepts(*good: str) -> Callable[[web.Request], Any]:
    """A webhook handler: 200 for ``Bearer <one of good>``, 401 otherwise."""
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") in {f"Bearer {t}" for t in good}:
            return web.json_response({"status": "active"})
        return web.json_response({"error": "invalid_token"}, status=401)
    return handler


def bearers(api: Api) -> list[str]:
    return [s.values("Authorization")[0] for s in api.seen]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[WebhookClient]:
    async with WebhookClient(clock=clock) as webhook_client:
        yield webhook_client


def auth(endpoint: TokenEndpoint) -> OAuthAuth:
    return OAuthAuth(endpoint.api.url + "/oauth2/token?tenant=t1", CLIENT_ID, SECRET)


async def test_the_token_request_and_the_bearer_header(serve: Serve, idp: TokenEndpoint,
                                                       client: WebhookClient) -> None:
    api = await serve(accepts("tok-0"))
    response = await client.call(get(api.url + "/check", ("Authorization", "rule's own")),
                                 timeout=2, auth=auth(idp))

    assert response.status == 200
    [token_request] = idp.api.seen
    assert (token_request.method, token_request.raw_path) == ("POST", "/oauth2/token?tenant=t1")
    assert token_request.body == b"grant_type=client_credentials"
    assert token_request.values("Content-Type") == ["application/x-www-form-urlencoded"]
    assert token_request.values("Accept") == ["application/json"]
    [basic] = token_request.values("Authorization")
    scheme, _, credentials = basic.partition(" ")
    user, _, password = base64.b64decode(credentials).decode("ascii").partition(":")
    assert (scheme, unquote_plus(user), unquote_plus(password)) == ("Basic", CLIENT_ID, SECRET)
    assert bearers(api) == ["Bearer tok-0"]  # replaces the rule's Authorization header


async def test_concurrent_calls_share_one_token_request(serve: Serve, idp: TokenEndpoint,
                                                        client: WebhookClient) -> None:
    idp.delay = 0.05
    api = await serve(accepts("tok-0"))

    responses = await asyncio.gather(
        *(client.call(get(api.url + "/"), timeout=2, auth=auth(idp)) for _ in range(50)))

    assert [r.status for r in responses] == [200] * 50
    assert idp.requests == 1
    assert set(bearers(api)) == {"Bearer tok-0"}


@pytest.mark.parametrize(("expires_in", "kept"), [(100, 90.0), (3600, 3570.0),
                                                  (None, 270.0), (0, 0.9)])
async def test_a_token_is_reused_until_shortly_before_it_expires(
        serve: Serve, idp: TokenEndpoint, client: WebhookClient, clock: FakeClock,
        expires_in: Any, kept: float) -> None:
    idp.answer = tokens(expires_in)
    api = await serve(accepts("tok-0", "tok-1"))
    start = clock.now

    await client.call(get(api.url + "/"), timeout=2, auth=auth(idp))
    clock.now = start + kept - 0.01
    await client.call(get(api.url + "/"), timeout=2, auth=auth(idp))
    assert idp.requests == 1
    clock.now = start + kept
    await client.call(get(api.url + "/"), timeout=2, auth=auth(idp))

    assert idp.requests == 2
    assert bearers(api) == ["Bearer tok-0", "Bearer tok-0", "Bearer tok-1"]


async def test_two_rules_with_the_same_client_share_a_token_but_not_across_secrets(
        serve: Serve, idp: TokenEndpoint, client: WebhookClient) -> None:
    api = await serve(accepts("tok-0", "tok-1"))
    same = auth(idp)
    await client.call(get(api.url + "/a"), timeout=2, auth=same)
    await client.call(get(api.url + "/b"), timeout=2, auth=OAuthAuth(same.token_url,
                                                                      CLIENT_ID, SECRET))
    assert idp.requests == 1
    await client.call(get(api.url + "/c"), timeout=2, auth=OAuthAuth(same.token_url,
                                                                      CLIENT_ID, "rotated"))
    assert idp.requests == 2


async def test_a_401_refreshes_the_token_once_and_retries_once(
        serve: Serve, idp: TokenEndpoint, client: WebhookClient) -> None:
    api = await serve(accepts("tok-1"))  # tok-0 was revoked

    response = await client.call(get(api.url + "/"), timeout=2, auth=auth(idp))

    assert response.status == 200
    assert idp.requests == 2
    assert bearers(api) == ["Bearer tok-0", "Bearer tok-1"]
    await client.call(get(api.url + "/"), timeout=2, auth=auth(idp))
    assert idp.requests == 2  # the new token is cached


async def test_a_webhook_that_always_answers_401_is_tried_twice(
        serve: Serve, idp: TokenEndpoint, client: WebhookClient) -> None:
    api = await serve(accepts())

    response = await client.call(get(api.url + "/"), timeout=2, auth=auth(idp))

    assert response.status == 401  # the caller fails it as webhook_status
    assert idp.requests == 2
    assert bearers(api) == ["Bearer tok-0", "Bearer tok-1"]


async def test_concurrent_401s_share_one_refresh(serve: Serve, idp: TokenEndpoint,
                                                 client: WebhookClient) -> None:
    idp.delay = 0.02
    api = await serve(accepts("tok-1"))

    responses = await asyncio.gather(
        *(client.call(get(api.url + "/"), timeout=2, auth=auth(idp)) for _ in range(10)))

    assert [r.status for r in responses] == [200] * 10
    assert idp.requests == 2  # invalidating tok-0 does not throw tok-1 away


async def test_invalidate_keeps_a_token_that_already_replaced_the_refused_one(
        serve: Serve, idp: TokenEndpoint, client: WebhookClient) -> None:
    api = await serve(accepts("tok-0", "tok-1"))
    credentials = auth(idp)
    key = TokenKey.of(credentials)
    await client.call(get(api.url + "/"), timeout=2, auth=credentials)

    client.tokens.invalidate(key, "tok-older")
    await client.call(get(api.url + "/"), timeout=2, auth=credentials)
    assert idp.requests == 1
    client.tokens.invalidate(key, "tok-0")
    await client.call(get(api.url + "/"), timeout=2, auth=credentials)
    assert idp.requests == 2
    assert SECRET not in repr(key)


# --- failures ----------------------------------------------------------------------------

@pytest.mark.parametrize(("answer", "reason"), [
    ((400, {"error": "invalid_client", "error_description": f"wrong secret {SECRET}"}),
     "OAuth token endpoint answered HTTP 400 (invalid_client)"),
    ((503, b"down for maintenance"), "OAuth token endpoint answered HTTP 503"),
    ((200, {"token_type": "Bearer", "expires_in": 60}), "OAuth token response has no access_token"),
    ((200, b"<html>login</html>"), "OAuth token response is not JSON"),
    ((200, {"access_token": "t", "token_type": "MAC"}), 'OAuth token_type is "MAC", expected Bearer'),
])
async def test_an_unusable_token_endpoint_fails_the_call(
        serve: Serve, idp: TokenEndpoint, client: WebhookClient,
        caplog: pytest.LogCaptureFixture, answer: tuple[int, Any], reason: str) -> None:
    caplog.set_level(logging.DEBUG)
    idp.answer = lambda n: answer
    api = await serve(accepts("t"))

    failed = await failure(client.call(get(api.url + "/"), timeout=2, auth=auth(idp)))

    assert (failed.code, failed.reason) == (Code.OAUTH_FAILED, reason)
    assert SECRET not in str(failed) and SECRET not in caplog.text
    assert api.seen == []


async def test_an_unreachable_token_endpoint_fails_the_call(serve: Serve,
                                                            client: WebhookClient,
                                                            refused_port: int) -> None:
    api = await serve(accepts("t"))
    credentials = OAuthAuth(f"http://127.0.0.1:{refused_port}/token", CLIENT_ID, SECRET)

    failed = await failure(client.call(get(api.url + "/"), timeout=2, auth=credentials))

    assert (failed.code, failed.reason) == (Code.OAUTH_FAILED,
                                            "OAuth token endpoint unreachable: connection refused")
    assert api.seen == []


async def test_an_outage_costs_one_token_request_per_second(
        serve: Serve, idp: TokenEndpoint, client: WebhookClient, clock: FakeClock) -> None:
    idp.delay = 0.05
    idp.answer = lambda n: (503, {"error": "temporarily_unavailable"})
    api = await serve(accepts("tok-1"))
    call = lambda: client.call(get(api.url + "/"), timeout=2, auth=auth(idp))  # noqa: E731

    results = await asyncio.gather(*(call() for _ in range(20)), return_exceptions=True)
    assert {(r.code, r.reason) for r in results} == {  # type: ignore[union-attr]
        (Code.OAUTH_FAILED, "OAuth token endpoint answered HTTP 503 (temporarily_unavailable)")}
    assert idp.requests == 1

    clock.now += 0.9
    assert (await failure(call())).code is Code.OAUTH_FAILED
    assert idp.requests == 1  # the failure is remembered for a second

    idp.answer = tokens()
    clock.now += 0.2
    assert (await call()).status == 200  # a failure is never taken for a token
    assert idp.requests == 2


async def test_a_slow_token_endpoint_times_the_call_out_but_its_token_is_kept(
        serve: Serve, idp: TokenEndpoint, client: WebhookClient) -> None:
    idp.held = asyncio.Event()  # answers only once the call has timed out
    api = await serve(accepts("tok-0"))

    failed = await failure(client.call(get(api.url + "/"), timeout=0.1, auth=auth(idp)))
    assert (failed.code, failed.reason) == (
        Code.WEBHOOK_TIMEOUT, "OAuth token endpoint did not answer within 100 ms")

    idp.held.set()
    await eventually(lambda: idp.answered == 1, what="the token answer")
    assert (await client.call(get(api.url + "/"), timeout=2, auth=auth(idp))).status == 200
    assert idp.requests == 1  # the token request outlived its call, and its token is used


async def test_closing_the_client_cancels_a_token_request_cleanly(
        serve: Serve, idp: TokenEndpoint, caplog: pytest.LogCaptureFixture) -> None:
    idp.delay = 5
    api = await serve(accepts("tok-0"))
    client = WebhookClient()
    await client.start()
    call = asyncio.create_task(client.call(get(api.url + "/"), timeout=5, auth=auth(idp)))
    await eventually(lambda: idp.requests == 1, what="the token request")

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

"""Webhook and OAuth faults through the real sidecar (gRPC on port 0), against servers on
loopback that misbehave on purpose.

``RawServer`` speaks HTTP/1.1 with asyncio streams, so that a fault can happen at any byte:
a reset after the headers, a body that trickles in, 50 MiB streamed, a status line that never
ends. Every fault must be a deny with its stable code and a reason naming the rule, within
the rule's timeout, and the sidecar must answer the next good check as if nothing happened.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from sidecar.policies import Policy
from sidecar.rules.model import AuthType, Rule
from tests.conftest import ACTIVE, check_request, denial_reason, seed
from tests.helpers import OK, PERMISSION_DENIED, FakeClock, code_of, eventually, webhook_evaluator
from tests.webhook_servers import PASSING, Behaviour, RawRequest, RawServer, head, respond

MiB = 1 << 20
TIMEOUT_MS = 400
TIMEOUT = TIMEOUT_MS / 1000
MARGIN = 0.3
"""Scheduling slack on top of a rule's timeout: a deny may come this much later, no more."""


def reset(after: bytes = b"") -> Behaviour:
    """Write ``after``, then reset the connection (RST: SO_LINGER 0, then close)."""
    async def behaviour(request: RawRequest, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        if after:
            writer.write(after)
            await writer.drain()
            await asyncio.sleep(0.1)  # let the client read what was sent before the RST
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    return behaviour


def close_after(data: bytes) -> Behaviour:
    """Write ``data``, then close the connection cleanly (FIN)."""
    async def behaviour(request: RawRequest, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
    return behaviour


async def silent(request: RawRequest, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    """Read the request, answer nothing, until the client hangs up."""
    await asyncio.wait_for(reader.read(), 30)


def trickle(first: bytes, then: bytes, interval: float = 0.05) -> Behaviour:
    """Write ``first`` at once, then ``then`` one byte every ``interval`` seconds."""
    async def behaviour(request: RawRequest, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        await writer.drain()
        for byte in then:
            await asyncio.sleep(interval)
            writer.write(bytes([byte]))
            await writer.drain()
    return behaviour


def stream(size: int, *, announce: bool) -> Behaviour:
    """``size`` bytes of spaces, sent 64 KiB at a time (never held in memory), chunked or
    announced by Content-Length; records in ``STREAMED`` what the client let through."""
    chunk = b" " * 65536

    async def behaviour(request: RawRequest, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        if announce:
            writer.write(head(200, length=size))
            frame = chunk
        else:
            writer.write(head(200, extra=("Transfer-Encoding: chunked",)))
            frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        sent = 0
        try:
            while sent < size:
                writer.write(frame)
                await writer.drain()
                sent += len(chunk)
        finally:
            STREAMED[request.path] = sent
    return behaviour


STREAMED: dict[str, int] = {}
"""Body bytes each streaming route got into the socket before the client hung up."""


def nested(depth: int, opening: bytes, closing: bytes, inner: bytes = b"") -> bytes:
    return opening * depth + inner + closing * depth


# --- the table of webhook faults --------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    """A misbehaving webhook: where the rule points (``{raw}``: the RawServer, ``{refused}``:
    a closed port, ``{backlog}``: a listener that never accepts), what it does, and what the
    client must see: the code and the reason after ``rule "faulty": ``."""

    url: str
    behaviour: Behaviour | None
    code: str
    reason: str
    verification: str = "json"

    @property
    def waits_for_the_timeout(self) -> bool:
        return self.code == "webhook_timeout"


UNREACHABLE, TIMEOUT_CODE = "webhook_unreachable", "webhook_timeout"
IN_TIME = f"webhook did not answer within {TIMEOUT_MS} ms"
MALFORMED = "webhook sent a malformed HTTP response"
NOT_JSON = "response is not JSON"
NO_STATUS = "key status missing from the response"
TOO_DEEP = "response is nested too deeply"
TOO_LARGE = "webhook response exceeds 1 MiB"
HTML_PAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>"

FAULTS: dict[str, Fault] = {
    "connection-refused": Fault("{refused}/check", None, UNREACHABLE,
                                "webhook unreachable: connection refused"),
    "dns-failure": Fault("http://webhook.invalid/check", None, UNREACHABLE,
                         "webhook unreachable: cannot resolve host webhook.invalid"),
    "reset-before-answering": Fault("{raw}/rst", reset(), UNREACHABLE,
                                    "webhook unreachable: connection reset by peer"),
    "reset-mid-response": Fault("{raw}/rst-mid", reset(head(200, length=100) + b'{"stat'),
                                UNREACHABLE, MALFORMED),
    "closed-after-headers": Fault("{raw}/fin-mid", close_after(head(200, length=100)),
                                  UNREACHABLE, MALFORMED),
    "closed-mid-chunk": Fault("{raw}/fin-chunk", close_after(
        head(200, extra=("Transfer-Encoding: chunked",)) + b"14\r\n" + PASSING[:8]),
        UNREACHABLE, MALFORMED),
    "closed-without-answer": Fault("{raw}/fin", close_after(b""), UNREACHABLE,
                                   "webhook closed the connection before answering"),
    "not-http": Fault("{raw}/garbage", close_after(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), UNREACHABLE,
                      MALFORMED),
    "never-accepted": Fault("{backlog}/check", None, TIMEOUT_CODE, IN_TIME),
    "never-answers": Fault("{raw}/silent", silent, TIMEOUT_CODE, IN_TIME),
    "slow-headers": Fault("{raw}/slow-headers", trickle(b"HTTP/1.1 200 OK\r\n",
                                                        b"Content-Type: application/json\r\n" * 8),
                          TIMEOUT_CODE, IN_TIME),
    "slow-body": Fault("{raw}/slow-body", trickle(head(200, length=len(PASSING)), PASSING),
                       TIMEOUT_CODE, IN_TIME),
    "http-500-with-a-passing-body": Fault("{raw}/500", respond(500), "webhook_status",
                                          "webhook answered HTTP 500, expected 2xx"),
    "http-503": Fault("{raw}/503", respond(503, HTML_PAGE, content_type="text/html"),
                      "webhook_status", "webhook answered HTTP 503, expected 2xx"),
    "http-302-to-a-passing-url": Fault("{raw}/302", respond(302, b"", extra=("Location: /ok",)),
                                       "webhook_status", "webhook answered HTTP 302, expected 2xx"),
    "http-307": Fault("{raw}/307", respond(307, b"", extra=("Location: /ok",)),
                      "webhook_status", "webhook answered HTTP 307, expected 2xx"),
    "html-error-page-with-200": Fault("{raw}/html", respond(200, HTML_PAGE, content_type="text/html"),
                                      "response_invalid", NOT_JSON),
    "empty-body": Fault("{raw}/empty", respond(200, b""), "response_invalid", NOT_JSON),
    "truncated-json": Fault("{raw}/truncated", respond(200, PASSING[:-3]), "response_invalid",
                            NOT_JSON),
    "nan-is-not-json": Fault("{raw}/nan", respond(200, b'{"status": NaN}'), "response_invalid",
                             NOT_JSON),
    "not-utf-8": Fault("{raw}/latin1", respond(200, '{"status": "activé"}'.encode("latin-1")),
                       "response_invalid", "response is not UTF-8 text"),
    "jsonp-around-non-json": Fault("{raw}/jsonp-js", respond(200, b"cb(alert(document.cookie));",
                                                             content_type="application/javascript"),
                                   "response_invalid",
                                   "response is not JSONP: the callback's argument is not JSON",
                                   verification="jsonp"),
    "jsonp-rule-gets-html": Fault("{raw}/jsonp-html", respond(200, HTML_PAGE, content_type="text/html"),
                                  "response_invalid",
                                  "response is not JSONP: no callback(...) around it",
                                  verification="jsonp"),
    "50-mib-chunked": Fault("{raw}/big-chunked", stream(50 * MiB, announce=False),
                            "response_too_large", TOO_LARGE),
    "50-mib-content-length": Fault("{raw}/big-announced", stream(50 * MiB, announce=True),
                                   "response_too_large", TOO_LARGE),
    "100000-nested-arrays": Fault("{raw}/deep-arrays", respond(200, nested(100_000, b"[", b"]")),
                                  "response_invalid", TOO_DEEP),
    "100000-nested-objects": Fault("{raw}/deep-objects",
                                   respond(200, nested(100_000, b'{"a":', b"}", b"1")),
                                   "response_invalid", TOO_DEEP),
    "json-string": Fault("{raw}/string", respond(200, b'"active"'), "key_missing", NO_STATUS),
    "json-number": Fault("{raw}/number", respond(200, b"42"), "key_missing", NO_STATUS),
    "json-empty-list": Fault("{raw}/list", respond(200, b"[]"), "key_missing", NO_STATUS),
    "json-null": Fault("{raw}/null", respond(200, b"null"), "key_missing", NO_STATUS),
}


@dataclass
class Faults:
    """Everything a fault's URL can point at."""

    raw: RawServer
    refused: int
    backlog: socket.socket

    def url(self, fault: Fault, query: str = "") -> str:
        return fault.url.format(
            raw=self.raw.url, refused=f"http://127.0.0.1:{self.refused}",
            backlog=f"http://127.0.0.1:{self.backlog.getsockname()[1]}") + query


@pytest.fixture
async def faults(raw: RawServer, refused_port: int) -> AsyncIterator[Faults]:
    for fault in FAULTS.values():
        if fault.behaviour is not None:
            raw.routes[fault.url.removeprefix("{raw}")] = fault.behaviour
    raw.routes["/ok"] = respond(200, PASSING)
    with socket.socket() as backlog:  # listens, never accepts: connects, then nothing
        backlog.bind(("127.0.0.1", 0))
        backlog.listen(64)
        yield Faults(raw, refused_port, backlog)






def assert_denied(response: Any, code: str, reason: str) -> None:
    """What Envoy gets for a deny: PERMISSION_DENIED, 403, the reason header, the JSON body."""
    assert response.status.code == PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    body = json.loads(response.denied_response.body)
    assert (body["code"], body["reason"]) == (code, reason)
    assert denial_reason(response) == reason


async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = await call
    return result, time.monotonic() - started


def dns_fails_at_once() -> bool:
    started = time.monotonic()
    try:
        socket.getaddrinfo("webhook.invalid", 80)
    except OSError:
        return time.monotonic() - started < 0.2
    return False


def good_rule(raw: RawServer) -> Rule:
    return Rule(name="good", url=raw.url + "/ok?u=%username%", actions=ACTIVE)


# --- webhook faults, one at a time ------------------------------------------------------

@pytest.mark.parametrize("name", list(FAULTS))
async def test_a_webhook_fault_denies_in_time_and_the_sidecar_keeps_serving(
        name: str, db: Path, start_sidecar: Any, authz: Any, faults: Faults) -> None:
    fault = FAULTS[name]
    if name == "dns-failure" and not dns_fails_at_once():
        pytest.skip("this machine's resolver does not fail .invalid names at once")
    faulty = Rule(name="faulty", url=faults.url(fault), verification=fault.verification,
                  timeout_ms=TIMEOUT_MS, actions=ACTIVE)
    seed(db, [faulty, good_rule(faults.raw)], [
        Policy(name="faulty", path_prefix="/faulty", rules=("faulty",)),
        Policy(name="good", path_prefix="/good", rules=("good",))])
    stub = authz((await start_sidecar()).port)

    response, elapsed = await timed(stub.Check(check_request("/faulty")))

    assert_denied(response, fault.code, f'rule "faulty": {fault.reason}')
    if fault.waits_for_the_timeout:
        assert TIMEOUT <= elapsed < TIMEOUT + MARGIN
    else:
        assert elapsed < TIMEOUT  # a fault that is not a timeout does not wait for it
    assert faults.raw.seen("/ok") == []  # a redirect is not followed
    good = await stub.Check(check_request("/good", headers={"x-safous-username": "u1"}))
    assert good.status.code == OK
    assert len(faults.raw.seen("/ok")) == 1


async def test_every_fault_at_once_keeps_each_its_own_code(
        db: Path, start_sidecar: Any, authz: Any, faults: Faults) -> None:
    """Five concurrent checks on each fault, all in flight together (155): the pool of
    connections is shared, the faults must not leak into each other's decisions."""
    names = [n for n in FAULTS if n != "dns-failure" or dns_fails_at_once()]
    rules = [Rule(name=n, url=faults.url(FAULTS[n], "?u=%username%"), timeout_ms=TIMEOUT_MS,
                  verification=FAULTS[n].verification, actions=ACTIVE) for n in names]
    policies = [Policy(name=n, path_prefix=f"/{n}", rules=(n,)) for n in names]
    seed(db, [*rules, good_rule(faults.raw)],
         [*policies, Policy(name="good", path_prefix="/good", rules=("good",))])
    stub = authz((await start_sidecar()).port)
    checks = [(n, i) for n in names for i in range(5)]

    responses, elapsed = await timed(asyncio.gather(*(
        stub.Check(check_request(f"/{n}", headers={"x-safous-username": f"user-{i}"}))
        for n, i in checks)))

    for (name, _), response in zip(checks, responses, strict=True):
        assert_denied(response, FAULTS[name].code, f'rule "{name}": {FAULTS[name].reason}')
    # 155 checks and their webhooks share this process's CPU: a looser bound than one check
    # gets, still far below what a fault that escaped its timeout would take (10 s, 30 s).
    assert elapsed < TIMEOUT + 1.5
    goods = await asyncio.gather(*(
        stub.Check(check_request("/good", headers={"x-safous-username": f"after-{i}"}))
        for i in range(20)))
    assert [g.status.code for g in goods] == [OK] * 20


@pytest.mark.parametrize("content_type", ["text/html", "text/plain", None,
                                          "application/octet-stream"])
async def test_json_under_another_content_type_is_judged_by_its_body(
        content_type: str | None, db: Path, start_sidecar: Any, authz: Any,
        raw: RawServer) -> None:
    """The Content-Type header is not checked, the body is: the JSON decides, and an error
    page under the same header is denied (``html-error-page-with-200`` above)."""
    raw.routes["/active"] = respond(200, PASSING, content_type=content_type)
    raw.routes["/blocked"] = respond(200, b'{"status": "blocked"}', content_type=content_type)
    rules = [Rule(name=n, url=f"{raw.url}/{n}", timeout_ms=TIMEOUT_MS, actions=ACTIVE)
             for n in ("active", "blocked")]
    seed(db, rules, [Policy(name=n, path_prefix=f"/{n}", rules=(n,)) for n in ("active", "blocked")])
    stub = authz((await start_sidecar()).port)

    assert (await stub.Check(check_request("/active"))).status.code == OK
    assert_denied(await stub.Check(check_request("/blocked")), "value_mismatch",
                  'rule "blocked": status is "blocked", expected "active"')


# --- 50 MiB -------------------------------------------------------------------------------

class PeakRss:
    """The peak resident set size of this process while the block runs, in bytes above the
    RSS at its start. Linux: resets the kernel's high-water mark (``/proc/self/clear_refs``)
    or, where that is not allowed, samples VmRSS every millisecond."""

    def __init__(self) -> None:
        self.growth = 0
        self._start = 0
        self._peak = 0
        self._sampler: asyncio.Task[None] | None = None

    @staticmethod
    def _status(field_name: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise LookupError(field_name)

    @staticmethod
    def _reset_high_water_mark() -> None:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := the current RSS

    async def _sample(self) -> None:
        while True:
            self._peak = max(self._peak, self._status("VmRSS"))
            await asyncio.sleep(0.001)  # the sampling period

    async def __aenter__(self) -> Self:
        self._start = self._peak = self._status("VmRSS")
        try:
            self._reset_high_water_mark()
        except OSError:
            self._sampler = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        else:
            self._peak = self._status("VmHWM")
        self.growth = self._peak - self._start


@pytest.mark.parametrize("announce", [False, True], ids=["chunked", "content-length"])
async def test_a_50_mib_body_is_dropped_at_1_mib_fast_and_without_buffering(
        announce: bool, db: Path, start_sidecar: Any, authz: Any, raw: RawServer) -> None:
    raw.routes["/big"] = stream(50 * MiB, announce=announce)
    rule = Rule(name="big", url=raw.url + "/big", timeout_ms=10_000, actions=ACTIVE)
    seed(db, [rule], [Policy(name="big", rules=("big",))])
    stub = authz((await start_sidecar()).port)
    await stub.Check(check_request("/warm-up"))  # first-call costs out of the measurement
    await eventually(lambda: "/big" in STREAMED, what="the server noticing the hang-up")
    del STREAMED["/big"]

    async with PeakRss() as rss:
        response, elapsed = await timed(stub.Check(check_request("/")))
        await eventually(lambda: "/big" in STREAMED, what="the server noticing the hang-up")

    assert_denied(response, "response_too_large", f'rule "big": {TOO_LARGE}')
    print(f"50 MiB: denied in {elapsed * 1000:.1f} ms, server got {STREAMED['/big'] / MiB:.1f} MiB "
          f"into the socket, peak RSS growth {rss.growth / MiB:.2f} MiB")  # shown with -s
    assert elapsed < 1.0  # far from the rule's 10 s: it stopped reading, it did not time out
    assert STREAMED["/big"] < 16 * MiB  # the connection was dropped, not drained
    assert rss.growth < 16 * MiB  # never held 50 MiB (nor the 1 MiB it read, many times)


# --- OAuth faults -------------------------------------------------------------------------

def token(access_token: str = "tok", **extra: Any) -> bytes:
    return json.dumps({"access_token": access_token, "token_type": "Bearer", **extra}).encode()


def client_of(request: RawRequest) -> str:
    """The client id of a token request (HTTP Basic, form-urlencoded before base64)."""
    [authorization] = request.values("authorization")
    credentials = base64.b64decode(authorization.removeprefix(b"Basic ")).decode()
    return credentials.partition(":")[0]


def bearer_api(*good_prefixes: str) -> Behaviour:
    """The webhook: 200 with a passing body for a bearer token starting with one of
    ``good_prefixes``, 401 otherwise."""
    async def behaviour(request: RawRequest, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        [authorization] = request.values("authorization") or [b""]
        value = authorization.decode("latin-1")
        good = any(value.startswith(f"Bearer {p}") for p in good_prefixes)
        await respond(200 if good else 401, PASSING if good else b'{"error": "invalid_token"}')(
            request, reader, writer)
    return behaviour


def oauth_rule(raw: RawServer, *, name: str = "o", client_id: str = "cid",
               token_url: str | None = None, timeout_ms: int = TIMEOUT_MS) -> Rule:
    return Rule(name=name, url=raw.url + "/api?u=%username%", auth=AuthType.OAUTH,
                token_url=token_url or raw.url + "/token", client_id=client_id,
                client_secret="csecret", timeout_ms=timeout_ms, actions=ACTIVE)


async def start_oauth(db: Path, start_sidecar: Any, authz: Any, raw: RawServer,
                      rule: Rule | None = None, clock: FakeClock | None = None) -> Any:
    """The sidecar with the OAuth rule at /o and a good rule at /good; its OAuth tokens (and
    remembered failures) on ``clock`` when given."""
    rule = rule or oauth_rule(raw)
    raw.routes["/ok"] = respond(200, PASSING)
    seed(db, [rule, good_rule(raw)], [Policy(name="o", path_prefix="/o", rules=(rule.name,)),
                                      Policy(name="good", path_prefix="/good", rules=("good",))])
    return authz((await start_sidecar(webhook_evaluator(clock) if clock else None)).port)


def user(n: int | str) -> dict[str, str]:
    """A distinct user per check: distinct webhook calls, which the sidecar does not merge."""
    return {"x-safous-username": f"user-{n}"}


TOKEN_FAULTS = {
    "endpoint-down": (None, "OAuth token endpoint unreachable: connection refused"),
    "endpoint-resets": (reset(), "OAuth token endpoint unreachable: connection reset by peer"),
    "http-400": (respond(400, b'{"error": "invalid_client", "error_description": "csecret?"}'),
                 "OAuth token endpoint answered HTTP 400 (invalid_client)"),
    "http-401": (respond(401, b'{"error": "invalid_client"}'),
                 "OAuth token endpoint answered HTTP 401 (invalid_client)"),
    "redirect-to-a-token": (respond(302, b"", extra=("Location: /token-ok",)),
                            "OAuth token endpoint answered HTTP 302"),
    "no-access-token": (respond(200, b'{"token_type": "Bearer", "expires_in": 3600}'),
                        "OAuth token response has no access_token"),
    "empty-access-token": (respond(200, token("")), "OAuth token response has no access_token"),
    "html-login-page": (respond(200, HTML_PAGE, content_type="text/html"),
                        "OAuth token response is not JSON"),
    "token-with-crlf": (respond(200, token("t\r\nX-Injected: 1")),
                        "OAuth access_token holds characters a bearer token cannot have"),
}


@pytest.mark.parametrize("name", list(TOKEN_FAULTS))
async def test_no_token_is_an_oauth_failed_deny(name: str, db: Path, start_sidecar: Any,
                                                authz: Any, raw: RawServer, refused_port: int) -> None:
    behaviour, reason = TOKEN_FAULTS[name]
    token_url = f"http://127.0.0.1:{refused_port}/token" if behaviour is None else None
    if behaviour is not None:
        raw.routes["/token"] = behaviour
    raw.routes["/token-ok"] = respond(200, token())
    raw.routes["/api"] = bearer_api("tok")
    stub = await start_oauth(db, start_sidecar, authz, raw, oauth_rule(raw, token_url=token_url))

    response, elapsed = await timed(stub.Check(check_request("/o", headers=user(1))))

    assert_denied(response, "oauth_failed", f'rule "o": {reason}')
    assert elapsed < TIMEOUT
    assert raw.seen("/api") == [] and raw.seen("/token-ok") == []
    assert (await stub.Check(check_request("/good", headers=user(2)))).status.code == OK


async def test_absurd_expires_in_still_gives_a_token_kept_a_sane_time(
        db: Path, start_sidecar: Any, authz: Any, raw: RawServer) -> None:
    """expires_in 0 or below: the token is kept about a second (not zero: no request per
    check); missing, not a number or huge: a usable lifetime (300 s, at most a day), never
    forever and never an overflow. One client per case, one sidecar for all, its tokens on a
    clock that moves only when the test moves it."""
    cases = {  # client id: (the token response, token requests after a second)
        "minus-5": (token(expires_in=-5), 2),
        "zero": (token(expires_in=0), 2),
        "missing": (token(), 1),
        "abc": (token(expires_in="abc"), 1),
        "1e12": (token(expires_in=1e12), 1),
        "1e400": (b'{"access_token": "tok", "expires_in": 1e400}', 1),  # parses as infinity
        "nan": (b'{"access_token": "tok", "expires_in": NaN}', 1),
        "null": (token(expires_in=None), 1),
    }

    async def token_endpoint(request: RawRequest, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await respond(200, cases[client_of(request)][0])(request, reader, writer)

    raw.routes["/token"] = token_endpoint
    raw.routes["/api"] = bearer_api("tok")
    raw.routes["/ok"] = respond(200, PASSING)
    rules = [oauth_rule(raw, name=c, client_id=c) for c in cases]
    seed(db, rules, [Policy(name=c, path_prefix=f"/{c}", rules=(c,)) for c in cases])
    clock = FakeClock()
    stub = authz((await start_sidecar(webhook_evaluator(clock))).port)

    def fetches() -> dict[str, int]:
        return {c: sum(client_of(r) == c for r in raw.seen("/token")) for c in cases}

    for n in range(3):
        responses = await asyncio.gather(*(stub.Check(check_request(f"/{c}", headers=user(n)))
                                           for c in cases))
        assert [r.status.code for r in responses] == [OK] * len(cases)
        clock.advance(0.25)
    assert fetches() == dict.fromkeys(cases, 1)  # 0.75 s: every token still in use
    clock.advance(0.25)
    responses = await asyncio.gather(*(stub.Check(check_request(f"/{c}", headers=user("later")))
                                       for c in cases))
    assert [r.status.code for r in responses] == [OK] * len(cases)
    assert fetches() == {c: after for c, (_, after) in cases.items()}


async def test_a_token_refused_twice_denies_with_the_webhook_status(
        db: Path, start_sidecar: Any, authz: Any, raw: RawServer) -> None:
    issued = iter(range(100))

    async def token_endpoint(request: RawRequest, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await respond(200, token(f"tok-{next(issued)}", expires_in=3600))(request, reader, writer)

    raw.routes["/token"] = token_endpoint
    raw.routes["/api"] = bearer_api()  # refuses every token
    clock = FakeClock()
    stub = await start_oauth(db, start_sidecar, authz, raw, oauth_rule(raw, timeout_ms=3000), clock)

    response, elapsed = await timed(stub.Check(check_request("/o", headers=user(1))))

    assert_denied(response, "webhook_status", 'rule "o": webhook answered HTTP 401, expected 2xx')
    assert elapsed < 1.0
    assert len(raw.seen("/token")) == 2
    assert [r.values("authorization") for r in raw.seen("/api")] == [[b"Bearer tok-0"],
                                                                     [b"Bearer tok-1"]]

    # The webhook refuses fresh tokens: for a second, 100 more checks get its 401 at once,
    # without a token request each (nor a retry).
    raw.requests.clear()
    clock.advance(0.95)
    responses = await asyncio.gather(*(stub.Check(check_request("/o", headers=user(f"b{i}")))
                                       for i in range(100)))
    assert {code_of(r) for r in responses} == {"webhook_status"}
    assert len(raw.seen("/api")) == 100
    assert raw.seen("/token") == []

    # A second later the token is replaced again, once: a token revoked later is recovered.
    clock.advance(0.1)
    raw.routes["/api"] = bearer_api("tok-2")  # the token it will get
    responses = await asyncio.gather(*(stub.Check(check_request("/o", headers=user(f"c{i}")))
                                       for i in range(100)))
    assert {code_of(r) for r in responses} == {"allowed"}
    assert len(raw.seen("/token")) == 1


def slow(behaviour: Behaviour, delay: float) -> Behaviour:
    async def delayed(request: RawRequest, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay)
        await behaviour(request, reader, writer)
    return delayed


def held_until(release: asyncio.Event, behaviour: Behaviour) -> Behaviour:
    async def held(request: RawRequest, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        await asyncio.wait_for(release.wait(), 30)
        await behaviour(request, reader, writer)
    return held


@dataclass
class Outage:
    """A token endpoint failing for a while: ``make(release)`` is its behaviour during the
    outage; it comes back when ``release`` is set."""

    make: Callable[[asyncio.Event], Behaviour]
    code: str
    reason: str
    recovery_requests: int
    """Token requests it takes to get a token once the endpoint is back."""


OUTAGES = {
    "http-503": Outage(lambda _: slow(respond(503, b'{"error": "temporarily_unavailable"}'), 0.1),
                       "oauth_failed",
                       "OAuth token endpoint answered HTTP 503 (temporarily_unavailable)", 1),
    "connection-reset": Outage(lambda _: slow(reset(), 0.1), "oauth_failed",
                               "OAuth token endpoint unreachable: connection reset by peer", 1),
    # The token request outlives the checks that gave up on it (up to 10 s): the checks in
    # the meantime wait on it, none sends another, and its token serves the next check.
    "hangs": Outage(lambda release: held_until(release, respond(200, token("tok-held"))),
                    TIMEOUT_CODE, f"OAuth token endpoint did not answer within {TIMEOUT_MS} ms", 0),
}


@pytest.mark.parametrize("name", list(OUTAGES))
async def test_an_outage_of_the_token_endpoint_causes_no_request_storm(
        name: str, db: Path, start_sidecar: Any, authz: Any, raw: RawServer) -> None:
    outage = OUTAGES[name]
    release = asyncio.Event()
    raw.routes["/token"] = outage.make(release)
    raw.routes["/api"] = bearer_api("tok")
    clock = FakeClock()  # the token cache's: it remembers a failure for a second of it
    stub = await start_oauth(db, start_sidecar, authz, raw, clock=clock)

    async def burst(tag: str) -> float:
        responses, elapsed = await timed(asyncio.gather(*(
            stub.Check(check_request("/o", headers=user(f"{tag}{i}"))) for i in range(100))))
        for response in responses:
            assert_denied(response, outage.code, f'rule "o": {outage.reason}')
        return elapsed

    first_elapsed = await burst("a")
    first = len(raw.seen("/token"))
    print(f"{name}: {first} token request(s) for 100 concurrent checks")  # shown with -s
    assert 1 <= first <= 3
    assert first_elapsed < TIMEOUT + MARGIN
    clock.advance(0.95)  # within the second a failure is remembered
    await burst("b")
    assert len(raw.seen("/token")) == first  # the second burst sent none
    assert raw.seen("/api") == []

    # The endpoint is back: once the failure is forgotten, the next check gets a token.
    release.set()
    raw.routes["/token"] = respond(200, token("tok-new"))
    clock.advance(0.1)
    assert (await stub.Check(check_request("/o", headers=user("c")))).status.code == OK
    assert len(raw.seen("/token")) == first + outage.recovery_requests

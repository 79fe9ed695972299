"""The HTTP authorization endpoint (``--authz-http``) on a real sidecar: the same decisions,
codes, reasons and activity rows as the gRPC listener beside it, fail closed, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar import authz_http
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from sidecar.server import Sidecar
from tests.conftest import ACTIVE, ExplodingEvaluator, answer, check_request, seed
from tests.helpers import code_of, eventually

STORE_TIER = (*ACTIVE, ResponseAction(type=ActionType.STORE, key="tier", value="tier"))
FORWARD_AUTH = {"authz_http": "127.0.0.1:0", "authz_http_profile": "forward-auth"}


def rows(db: Path) -> list[tuple[str, str, str, int, str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT username, host, path, allowed, code, status FROM activity_log ORDER BY id"
                            ).fetchall()


async def ask(sidecar: Sidecar, headers: dict[str, str], *, session: aiohttp.ClientSession | None = None,
              method: str = "GET", target: str = "/auth", data: Any = None) -> tuple[int, dict[str, str], str]:
    assert sidecar.authz_http is not None
    url = f"http://127.0.0.1:{sidecar.authz_http.port}{target}"
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        async with session.request(method, url, headers=headers, data=data) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.text()


def forwarded(path: str, host: str = "app.example.com", **extra: str) -> dict[str, str]:
    return {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": path, "X-Forwarded-Host": host,
            "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7", **extra}


@pytest.fixture
async def posture(db: Path, serve) -> Any:
    api = await serve(answer({"status": "active", "tier": "gold"}))
    seed(db, [Rule(name="posture", url=f"{api.url}/check?u=%username%&ip=%remote_ip%", actions=STORE_TIER)],
         [Policy(name="app", hosts=("app.example.com",), path_prefix="/app", rules=("posture",))])
    return api


async def test_the_http_endpoint_decides_as_the_grpc_listener_does(
        db: Path, start_sidecar, authz, posture) -> None:
    sidecar = await start_sidecar(**FORWARD_AUTH)
    stub = authz(sidecar.port)
    async with aiohttp.ClientSession() as session:  # one keep-alive connection for all
        status, headers, body = await ask(sidecar, forwarded("/app/x", **{"x-safous-username": "alice"}),
                                          session=session)
        assert (status, headers["x-safous-tier"], body) == (200, "gold", "")
        grpc_answer = await stub.Check(check_request("/app/x", headers={"x-safous-username": "alice"}))
        assert code_of(grpc_answer) == "allowed"
        # The webhook saw the same parameters from both edges.
        assert [s.raw_path for s in posture.seen] == ["/check?u=alice&ip=203.0.113.7"] * 2
        status, headers, body = await ask(sidecar, forwarded("/other"), session=session)
        assert status == 403 and headers["x-safous-denial-reason"] == "no policy matches this request"
        assert json.loads(body)["code"] == "no_matching_policy"
        assert headers["content-type"].startswith("application/json")
    await eventually(lambda: len(rows(db)) == 3)
    assert [(user, host, path, allowed, code) for user, host, path, allowed, code, _ in rows(db)] == [
        ("alice", "app.example.com", "/app/x", 1, "rules_passed"), ("alice", "app.example.com", "/app/x", 1,
                                                                  "rules_passed"),
        ("", "app.example.com", "/other", 0, "no_matching_policy")]


async def test_anything_that_goes_wrong_is_a_403_never_a_2xx(db: Path, start_sidecar, posture) -> None:
    sidecar = await start_sidecar(ExplodingEvaluator(), **FORWARD_AUTH)
    status, headers, body = await ask(sidecar, forwarded("/app/x"))
    assert (status, json.loads(body)["code"]) == (403, "internal_error")
    assert headers["x-safous-denial-reason"] == "internal error in the authorization sidecar"
    sidecar.checker.snapshot = None  # rules not loaded
    status, _, body = await ask(sidecar, forwarded("/app/x"))
    assert (status, json.loads(body)["code"]) == (403, "not_ready")


def raw_exchange(port: int, request: bytes, *, heads: tuple[bool, ...] = (False,)
                 ) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``request`` (one or more requests, pipelined) and read an answer for each of
    ``heads`` (True: the answer to a HEAD, without its body); then whether the connection
    closed after the last one, as a final (0, {}, b"closed" | b"open")."""
    answers: list[tuple[int, dict[str, str], bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        for head_only in heads:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk, (answers, data)
                data += chunk
            top, _, data = data.partition(b"\r\n\r\n")
            status_line, *lines = top.decode().split("\r\n")
            headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
            length = 0 if head_only else int(headers.get("content-length", "0"))
            while len(data) < length:
                data += sock.recv(65536)
            answers.append((int(status_line.split()[1]), headers, data[:length]))
            data = data[length:]
        sock.settimeout(0.5)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        answers.append((0, {}, b"closed" if closed else b"open"))
    return answers


def forwarded_request(path: str, method: str = "GET", extra: bytes = b"") -> bytes:
    return (b"%s /auth HTTP/1.1\r\nHost: sidecar\r\nX-Forwarded-Method: %s\r\nX-Forwarded-Uri: %s\r\n"
            b"X-Forwarded-Host: app.example.com\r\nX-Forwarded-For: 203.0.113.7\r\n%s\r\n"
            % (method.encode(), method.encode(), path.encode(), extra))


@pytest.mark.parametrize(("what", "sent"), [
    ("request line", b"GET /" + b"a" * 17_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("header", b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 33_000 + b"\r\n\r\n"),
    ("header count", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
     + b"\r\n"),
    ("malformed", b"GET / HTTP/1.1\r\nHost x\r\n\r\n"),
])
async def test_requests_past_the_bounds_are_refused_not_decided(
        what: str, sent: bytes, db: Path, start_sidecar, caplog: pytest.LogCaptureFixture) -> None:
    seed(db, [], [Policy(name="any", integration=False)])  # would allow anything it decided
    sidecar = await start_sidecar(**FORWARD_AUTH)
    assert sidecar.authz_http is not None
    [(status, headers, _), closed] = await asyncio.to_thread(raw_exchange, sidecar.authz_http.port, sent)
    assert (status, closed[2]) == (400, b"closed"), what
    assert headers["x-safous-denial-reason"].startswith("the authorization request could not be read: "), headers
    # The writer keeps the order of decisions: once the next one is written, none came before it.
    assert (await ask(sidecar, forwarded("/after")))[0] == 200
    await eventually(lambda: rows(db))
    assert [path for _, _, path, _, _, _ in rows(db)] == ["/after"]
    # No log line per bad client: a client could fill the log.
    assert [r.message for r in caplog.records if r.name.startswith(("aiohttp", "sidecar.authz_http", "asyncio"))
            ] == []


async def test_a_body_is_ignored_and_the_connection_goes_on(db: Path, start_sidecar) -> None:
    seed(db, [], [Policy(name="any", integration=False)])
    sidecar = await start_sidecar(**FORWARD_AUTH)
    async with aiohttp.ClientSession() as session:
        status, _, _ = await ask(sidecar, forwarded("/upload"), session=session, method="POST",
                                 data=io.BytesIO(b"x" * (4 << 20)))
        assert status == 200
        status, _, _ = await ask(sidecar, forwarded("/next"), session=session)  # the connection goes on
        assert status == 200


async def test_a_proxy_that_stops_waiting_leaves_a_caller_gone_row(db: Path, start_sidecar, serve) -> None:
    api = await serve(answer({"status": "active"}, delay=5))
    seed(db, [Rule(name="slow", url=f"{api.url}/check", actions=ACTIVE, timeout_ms=8000)],
         [Policy(name="app", hosts=("app.example.com",), rules=("slow",))])
    sidecar = await start_sidecar(**FORWARD_AUTH)
    with pytest.raises(asyncio.TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
            await ask(sidecar, forwarded("/slow", **{"x-safous-username": "bob"}), session=session)
    [(user, _, path, allowed, code, status)] = await eventually(lambda: rows(db))
    assert (user, path, allowed, code) == ("bob", "/slow", 0, "caller_gone")
    assert "(it cancelled the call)" in status


async def test_checks_in_progress_are_bounded_across_both_listeners(
        db: Path, start_sidecar, authz, serve) -> None:
    api = await serve(answer({"status": "active"}, delay=0.5))
    seed(db, [Rule(name="slow", url=f"{api.url}/check?u=%headers.x-unique%", actions=ACTIVE)],
         [Policy(name="app", hosts=("app.example.com",), rules=("slow",))])
    sidecar = await start_sidecar(max_checks_in_progress=2, **FORWARD_AUTH)
    stub = authz(sidecar.port)
    busy = [asyncio.ensure_future(stub.Check(check_request(f"/g{i}", headers={"x-unique": str(i)})))
            for i in range(2)]
    await eventually(lambda: len(api.seen) == 2)
    status, headers, body = await ask(sidecar, forwarded("/h", **{"x-unique": "h"}))
    assert (status, json.loads(body)["code"]) == (403, "overloaded")
    assert headers["x-safous-denial-reason"].startswith("the authorization sidecar is overloaded: 2 checks")
    assert [code_of(r) for r in await asyncio.gather(*busy)] == ["allowed", "allowed"]
    assert (await ask(sidecar, forwarded("/h2", **{"x-unique": "h2"})))[0] == 200


async def test_pipelined_requests_are_answered_in_order_even_past_a_webhook_call(
        db: Path, start_sidecar, serve) -> None:
    api = await serve(answer({"status": "active"}, delay=0.2))
    seed(db, [Rule(name="slow", url=f"{api.url}/check", actions=ACTIVE)],
         [Policy(name="slow", hosts=("app.example.com",), path_prefix="/slow", rules=("slow",)),
          Policy(name="open", hosts=("app.example.com",), path_prefix="/open", integration=False)])
    sidecar = await start_sidecar(**FORWARD_AUTH)
    assert sidecar.authz_http is not None
    paths = ["/open/1", "/slow/2", "/closed/3", "/open/4"] + [f"/open/{n}" for n in range(5, 105)]
    sent = b"".join(forwarded_request(path) for path in paths)
    *answers, (_, _, state) = await asyncio.to_thread(raw_exchange, sidecar.authz_http.port, sent,
                                                      heads=(False,) * len(paths))
    assert [status for status, _, _ in answers] == [200, 200, 403] + [200] * 101
    assert json.loads(answers[2][2])["code"] == "no_matching_policy"
    assert state == b"open"  # keep-alive: the connection goes on
    await eventually(lambda: len(rows(db)) == len(paths))
    assert [path for _, _, path, _, _, _ in rows(db)][:4] == paths[:4]


async def test_a_head_request_is_answered_without_a_body(db: Path, start_sidecar) -> None:
    seed(db, [], [Policy(name="open", hosts=("app.example.com",), path_prefix="/open", integration=False)])
    sidecar = await start_sidecar(**FORWARD_AUTH)
    assert sidecar.authz_http is not None
    # Were the denial's JSON body sent after a HEAD, the proxy would read it as its next answer.
    sent = forwarded_request("/closed", "HEAD") + forwarded_request("/open/next")
    [(denied, headers, _), (allowed, _, _), _] = await asyncio.to_thread(
        raw_exchange, sidecar.authz_http.port, sent, heads=(True, False))
    assert (denied, headers["x-safous-denial-code"], allowed) == (403, "no_matching_policy", 200)
    assert int(headers["content-length"]) > 0  # the length a GET's body would have had


async def test_a_request_that_waits_for_100_continue_closes_the_connection(db: Path, start_sidecar) -> None:
    seed(db, [], [Policy(name="any", integration=False)])
    sidecar = await start_sidecar(**FORWARD_AUTH)
    assert sidecar.authz_http is not None
    # The client may send its body, or not: what follows on the connection is unknown.
    sent = forwarded_request("/upload", "POST", b"Content-Length: 5\r\nExpect: 100-continue\r\n")
    [(status, headers, _), (_, _, state)] = await asyncio.to_thread(raw_exchange, sidecar.authz_http.port, sent)
    assert (status, headers["connection"], state) == (200, "close", b"closed")


async def test_an_idle_connection_is_closed(db: Path, start_sidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authz_http, "IDLE_SECONDS", 0.3)
    monkeypatch.setattr(authz_http, "_SWEEP_SECONDS", 0.1)
    seed(db, [], [Policy(name="any", integration=False)])
    sidecar = await start_sidecar(**FORWARD_AUTH)
    assert sidecar.authz_http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.authz_http.port)
    writer.write(b"GET /auth HTTP/1.1\r\n")  # and nothing more: a slow client, or a stuck one
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert sidecar.authz_http.connections == set()


@pytest.mark.parametrize(("grace", "delay"), [(3.0, 0.3), (0.1, 5.0)])
async def test_on_stop_a_check_in_progress_gets_the_grace_period(
        grace: float, delay: float, db: Path, start_sidecar, serve) -> None:
    api = await serve(answer({"status": "active"}, delay=delay))
    seed(db, [Rule(name="slow", url=f"{api.url}/check", actions=ACTIVE, timeout_ms=8000)],
         [Policy(name="app", hosts=("app.example.com",), rules=("slow",))])
    sidecar = await start_sidecar(**FORWARD_AUTH)
    asked = asyncio.ensure_future(ask(sidecar, forwarded("/draining")))
    await eventually(lambda: len(api.seen) == 1)
    await sidecar.stop(grace=grace)
    [(_, _, path, allowed, code, _)] = await eventually(lambda: rows(db))
    if delay < grace:  # answered, then the connection closed
        assert ((await asked)[0], path, allowed, code) == (200, "/draining", 1, "rules_passed")
    else:  # the proxy sees the connection closed, never an allow
        with pytest.raises(aiohttp.ClientError):
            await asked
        assert (path, allowed, code) == ("/draining", 0, "caller_gone")

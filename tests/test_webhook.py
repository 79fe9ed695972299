"""The webhook caller against real HTTP(S) servers on loopback, port 0.

Each test runs an aiohttp.web application as the third-party API and looks at what arrived
there (method, raw path and query, headers with duplicates, body, the client's address).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import gzip
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.decision import Code
from sidecar.rules.client import BasicAuth, WebhookClient, WebhookResponse
from sidecar.rules.templates import WebhookRequest
from tests.certs import make_ca, make_server_cert
from tests.webhook_servers import Handler, Serve, failure, get

MiB = 1 << 20
SLACK = 0.5
"""How much later than its timeout a call may fail on a loaded machine: far below the slow
server's 5 s, so a timeout that does not fire, or restarts with each byte, still fails."""


@pytest.fixture
async def client() -> AsyncIterator[WebhookClient]:
    async with WebhookClient() as webhook_client:
        yield webhook_client


def json_ok(body: bytes = b'{"status": "active"}') -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json", charset="utf-8")
    return handler


# --- what arrives ------------------------------------------------------------------------

async def test_get_arrives_with_the_encoded_url_and_every_header(serve: Serve,
                                                                client: WebhookClient) -> None:
    api = await serve(json_ok())
    request = get(f"{api.url}/users/a%2Fb%41/check?u=a%2Fb%26c&q=%25x&t=%7E&e=",
                  ("X-Device", "d-1"), ("X-Group", "admins"), ("X-Group", "ops"))

    response = await client.call(request, timeout=2)

    assert response == WebhookResponse(200, b'{"status": "active"}',
                                       "application/json; charset=utf-8")
    [seen] = api.seen
    assert seen.method == "GET"
    assert seen.raw_path == "/users/a%2Fb%41/check?u=a%2Fb%26c&q=%25x&t=%7E&e="  # not re-quoted
    assert seen.values("X-Group") == ["admins", "ops"]
    assert seen.values("X-Device") == ["d-1"]
    assert seen.values("Authorization") == []
    assert seen.values("User-Agent") == ["safous-sidecar"]
    assert seen.body == b""


async def test_post_sends_the_body_and_its_content_type(serve: Serve,
                                                        client: WebhookClient) -> None:
    api = await serve(json_ok(b"{}"))
    body = b'{"user": "b\\u00f6b", "ip": "203.0.113.7"}'
    request = WebhookRequest("POST", f"{api.url}/posture?v=2",
                             (("Content-Type", "application/json"), ("X-Trace", "1")), body)

    response = await client.call(request, timeout=2)

    assert response.status == 200
    [seen] = api.seen
    assert (seen.method, seen.raw_path, seen.body) == ("POST", "/posture?v=2", body)
    assert seen.values("Content-Type") == ["application/json"]
    assert seen.values("Content-Length") == [str(len(body))]


async def test_connections_are_kept_alive_and_reused(serve: Serve, client: WebhookClient) -> None:
    api = await serve(json_ok())

    for _ in range(30):
        await client.call(get(api.url + "/seq"), timeout=2)
    assert len(api.seen) == 30
    assert len(api.peers) == 1  # one connection for 30 sequential calls

    for _ in range(3):
        await asyncio.gather(*(client.call(get(api.url + "/burst"), timeout=2) for _ in range(10)))
    assert len(api.seen) == 60
    assert len(api.peers) <= 10  # the later bursts reuse the first burst's connections


# --- authentication ----------------------------------------------------------------------

async def test_basic_auth_replaces_the_rules_authorization_header(serve: Serve,
                                                                  client: WebhookClient) -> None:
    api = await serve(json_ok())
    request = get(api.url + "/", ("Authorization", "Bearer from-the-rule"), ("X-A", "1"))

    await client.call(request, timeout=2, auth=BasicAuth("alice", "pä:ss wörd"))

    [seen] = api.seen
    [authorization] = seen.values("Authorization")
    assert authorization == "Basic " + base64.b64encode("alice:pä:ss wörd".encode()).decode()
    assert base64.b64decode(authorization.removeprefix("Basic ")).decode() == "alice:pä:ss wörd"
    assert seen.values("X-A") == ["1"]


async def test_without_auth_the_rules_own_authorization_header_is_sent(
        serve: Serve, client: WebhookClient) -> None:
    api = await serve(json_ok())
    await client.call(get(api.url + "/", ("Authorization", "ApiKey k-1")), timeout=2)
    assert api.seen[0].values("Authorization") == ["ApiKey k-1"]


def test_basic_auth_does_not_show_the_password() -> None:
    assert "s3cret" not in repr(BasicAuth("alice", "s3cret"))


# --- time ----------------------------------------------------------------------------------

async def test_a_webhook_slower_than_the_timeout_fails_in_time(serve: Serve,
                                                               client: WebhookClient) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)  # the slow server the test is about
        return web.Response(text="late")

    api = await serve(slow)
    started = time.monotonic()
    failed = await failure(client.call(get(api.url + "/"), timeout=0.3))
    elapsed = time.monotonic() - started

    assert failed.code is Code.WEBHOOK_TIMEOUT
    assert failed.reason == "webhook did not answer within 300 ms"
    assert 0.3 <= elapsed < 0.3 + SLACK


async def test_a_body_trickling_in_counts_against_the_same_timeout(serve: Serve,
                                                                   client: WebhookClient) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(100):  # 5 s in all, a byte every 50 ms
            await response.write(b" ")
            await asyncio.sleep(0.05)
        await response.write(b"{}")
        return response

    api = await serve(trickle)
    started = time.monotonic()
    failed = await failure(client.call(get(api.url + "/"), timeout=0.4))
    elapsed = time.monotonic() - started

    assert failed.code is Code.WEBHOOK_TIMEOUT
    assert failed.reason == "webhook did not answer within 400 ms"
    assert 0.4 <= elapsed < 0.4 + SLACK


# --- unreachable -------------------------------------------------------------------------

async def test_a_closed_port_is_unreachable(client: WebhookClient, refused_port: int) -> None:
    failed = await failure(client.call(get(f"http://127.0.0.1:{refused_port}/x"), timeout=2))
    assert failed.code is Code.WEBHOOK_UNREACHABLE
    assert failed.reason == "webhook unreachable: connection refused"
    assert isinstance(failed.__cause__, OSError)


async def raw_server(reply: bytes) -> tuple[asyncio.Server, str]:
    """A TCP server that reads the request head, writes ``reply`` and closes."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


@pytest.mark.parametrize(("reply", "reason"), [
    (b"", "webhook closed the connection before answering"),
    (b"this is not HTTP\r\n\r\n", "webhook sent a malformed HTTP response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "webhook sent a malformed HTTP response"),
])
async def test_a_broken_http_answer_is_unreachable(client: WebhookClient, reply: bytes,
                                                   reason: str) -> None:
    server, url = await raw_server(reply)
    async with server:
        failed = await failure(client.call(get(url), timeout=2))
    assert (failed.code, failed.reason) == (Code.WEBHOOK_UNREACHABLE, reason)


async def test_a_response_without_content_type_has_an_empty_one(client: WebhookClient) -> None:
    server, url = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with server:
        response = await client.call(get(url), timeout=2)
    assert response == WebhookResponse(200, b"ok", "")


async def test_a_url_that_cannot_be_parsed_fails_closed(client: WebhookClient) -> None:
    failed = await failure(client.call(get("http://[::1/x"), timeout=2))
    assert (failed.code, failed.reason) == (Code.WEBHOOK_UNREACHABLE,
                                            "webhook URL cannot be requested")


# --- redirects and size ------------------------------------------------------------------

async def test_redirects_are_not_followed(serve: Serve, client: WebhookClient) -> None:
    async def moved(request: web.Request) -> web.StreamResponse:
        if request.path == "/old":
            return web.Response(status=302, headers={"Location": "/new"})
        return web.json_response({"status": "active"})

    api = await serve(moved)
    response = await client.call(get(api.url + "/old"), timeout=2)

    assert response.status == 302
    assert [s.raw_path for s in api.seen] == ["/old"]


def big(size: int, *, announce: bool) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if announce:
            return web.Response(body=b"x" * size, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < size:
                await response.write(chunk[: size - sent])
                sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            return response  # the client hung up: expected when it refuses the body
        await response.write_eof()
        return response
    return handler


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "chunked"])
async def test_a_response_over_1_mib_fails(serve: Serve, client: WebhookClient,
                                           announce: bool) -> None:
    api = await serve(big(2 * MiB, announce=announce))

    failed = await failure(client.call(get(api.url + "/big"), timeout=5))

    assert failed.code is Code.RESPONSE_TOO_LARGE
    assert failed.reason == "webhook response exceeds 1 MiB"
    # The connection was dropped, the client still works.
    small = await serve(json_ok())
    assert (await client.call(get(small.url + "/"), timeout=2)).status == 200


async def test_a_compressed_body_is_measured_decompressed(serve: Serve,
                                                          client: WebhookClient) -> None:
    bomb = gzip.compress(b"0" * (2 * MiB))

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip",
                                                "Content-Type": "application/json"})

    api = await serve(handler)
    failed = await failure(client.call(get(api.url + "/"), timeout=5))
    assert failed.code is Code.RESPONSE_TOO_LARGE


@pytest.mark.parametrize(("size", "fits"), [(1000, True), (1001, False)])
async def test_the_limit_is_inclusive(serve: Serve, size: int, fits: bool) -> None:
    api = await serve(big(size, announce=False))
    async with WebhookClient(max_response_bytes=1000) as client:
        if fits:
            assert len((await client.call(get(api.url + "/"), timeout=2)).body) == 1000
        else:
            failed = await failure(client.call(get(api.url + "/"), timeout=2))
            assert failed.reason == "webhook response exceeds 1000 bytes"


# --- TLS ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext,
                                                                  ssl.SSLContext]:
    """A private CA's file, a server context for 127.0.0.1 it signed, and one for a host name
    that is not 127.0.0.1."""
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory)
    contexts = []
    for stem, hosts in (("right", ["127.0.0.1"]), ("wrong", ["other.example"])):
        cert = make_server_cert(directory, ca, hosts=hosts, stem=stem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert.cert_path, cert.key_path)
        contexts.append(context)
    return ca.cert_path, contexts[0], contexts[1]


async def test_tls_needs_the_private_ca(serve: Serve, client: WebhookClient,
                                        private_ca: tuple[Path, ssl.SSLContext, ssl.SSLContext]
                                        ) -> None:
    ca_path, server_context, _ = private_ca
    api = await serve(json_ok(), ssl_context=server_context)
    assert api.url.startswith("https://")

    failed = await failure(client.call(get(api.url + "/"), timeout=2))
    assert failed.code is Code.WEBHOOK_UNREACHABLE
    assert failed.reason.startswith("webhook TLS verification failed")
    assert api.seen == []

    async with WebhookClient(ca_bundle=str(ca_path)) as trusting:
        response = await trusting.call(get(api.url + "/"), timeout=2)
    assert response.status == 200


async def test_tls_checks_the_host_name(serve: Serve,
                                        private_ca: tuple[Path, ssl.SSLContext, ssl.SSLContext]
                                        ) -> None:
    ca_path, _, wrong_host_context = private_ca
    api = await serve(json_ok(), ssl_context=wrong_host_context)
    async with WebhookClient(ca_bundle=str(ca_path)) as client:
        failed = await failure(client.call(get(api.url + "/"), timeout=2))
    assert failed.code is Code.WEBHOOK_UNREACHABLE
    assert failed.reason.startswith("webhook TLS verification failed")
    assert "127.0.0.1" in failed.reason


async def test_a_missing_ca_bundle_fails_at_start(tmp_path: Path) -> None:
    client = WebhookClient(ca_bundle=str(tmp_path / "nope.pem"))
    with pytest.raises(ValueError, match="CA bundle"):
        await client.start()
    await client.close()


async def test_a_call_before_start_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        await WebhookClient().call(get("http://127.0.0.1/"), timeout=1)


# --- cancellation ------------------------------------------------------------------------

async def test_a_cancelled_call_releases_its_connection_cleanly(
        serve: Serve, client: WebhookClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    arrived = asyncio.Event()
    hung_up = asyncio.Event()

    async def waits(request: web.Request) -> web.StreamResponse:
        if request.path == "/fast":
            return web.json_response({})
        arrived.set()
        try:
            await asyncio.sleep(10)  # answers nothing, until the client leaves
        except asyncio.CancelledError:
            hung_up.set()  # the client closed the connection
            raise
        return web.json_response({})

    api = await serve(waits)
    call = asyncio.create_task(client.call(get(api.url + "/slow"), timeout=10))
    await asyncio.wait_for(arrived.wait(), 2)

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(hung_up.wait(), 2)

    assert (await client.call(get(api.url + "/fast"), timeout=2)).status == 200
    gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

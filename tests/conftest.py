"""Shared fixtures: real rules.db files, a real sidecar on port 0, a real gRPC client, and
third-party APIs on loopback (``serve``, ``raw``: see tests/webhook_servers.py)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.db import connect, ensure_database, save_policy, save_rule, transaction
from sidecar.decision import Decision
from sidecar.parameters import Parameters
from sidecar.policies import Policy
from sidecar.rules import UnavailableEvaluator
from sidecar.rules.model import ActionType, ResponseAction, Rule
from sidecar.server import Sidecar
from sidecar.settings import Settings
from tests.certs import TlsDir, make_tls_dir
from tests.helpers import closed_port, serving
from tests.packaging_build import release
from tests.webhook_servers import Api, Handler, RawServer, Seen, Serve


def seed(db: Path, rules: Iterable[Rule] = (), policies: Iterable[Policy] = ()) -> None:
    """Write rules and policies into rules.db (creating it), in one transaction."""
    ensure_database(db)
    conn = connect(db)
    try:
        with transaction(conn, immediate=True):
            for rule in rules:
                save_rule(conn, rule)
            for policy in policies:
                save_policy(conn, policy)
    finally:
        conn.close()


ACTIVE = (ResponseAction(type=ActionType.STRING, key="status", value="active"),)
"""A rule's response actions for the webhooks of the tests that answer ``{"status": "active"}``."""


class ExplodingEvaluator(UnavailableEvaluator):
    """An evaluator with a bug: every evaluation raises."""

    async def evaluate(self, policy: Policy, rules: Sequence[Any], params: Parameters) -> Decision:
        raise RuntimeError("boom")


def check_request(path: str = "/", *, host: str = "app.example.com", method: str = "GET",
                  headers: dict[str, str] | None = None, source_ip: str = "203.0.113.7",
                  certificate: str = "") -> pb.CheckRequest:
    """A CheckRequest shaped like the ones Envoy sends."""
    request = pb.CheckRequest()
    attrs = request.attributes
    attrs.source.address.socket_address.address = source_ip
    attrs.source.address.socket_address.port_value = 51000
    attrs.source.certificate = certificate
    attrs.destination.address.socket_address.address = "10.0.0.5"
    attrs.destination.address.socket_address.port_value = 8080
    http = attrs.request.http
    http.id = "1234"
    http.method = method
    http.host = host
    http.path = path
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    all_headers = {":authority": host, ":path": path, ":method": method,
                   "x-request-id": "req-" + path.strip("/").replace("/", "-")}
    all_headers.update({k.lower(): v for k, v in (headers or {}).items()})
    http.headers.update(all_headers)
    return request


def denial_reason(response: pb.CheckResponse) -> str | None:
    for option in response.denied_response.headers:
        if option.header.key == "x-safous-denial-reason":
            return option.header.value
    return None


@pytest.fixture(scope="session", autouse=True)
def _release_in_background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """When the session holds packaging tests, their build and install start with it, at the
    lowest priority (tests/packaging_build.py)."""
    if any(item.get_closest_marker("packaging") for item in request.session.items):
        release(tmp_path_factory)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "rules.db"
    ensure_database(path)
    return path


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def start_sidecar(db: Path) -> AsyncIterator[StartSidecar]:
    """Start a real sidecar on a free port; stopped at teardown."""
    started: list[Sidecar] = []

    async def start(evaluator: Any = None, **settings: Any) -> Sidecar:
        settings.setdefault("db", db)
        settings.setdefault("listen", "127.0.0.1:0")
        settings.setdefault("reload_interval", 0.05)
        sidecar = Sidecar(Settings(**settings), evaluator)
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        await sidecar.stop(grace=0)


@pytest.fixture
async def authz() -> AsyncIterator[Callable[[int], pb_grpc.AuthorizationStub]]:
    """gRPC client stubs for the Authorization service on a port; channels closed at teardown."""
    channels: list[grpc.aio.Channel] = []

    def connect(port: int) -> pb_grpc.AuthorizationStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return pb_grpc.AuthorizationStub(channel)

    yield connect
    for channel in channels:
        await channel.close()


@dataclass
class Upstream:
    """The protected app: echoes what reached it (method, path, headers) as JSON."""

    port: int
    requests: list[dict] = field(default_factory=list)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    seen: list[dict] = []

    async def echo(request: web.Request) -> web.Response:
        record = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.lower(), v] for k, v in request.headers.items()],
        }
        seen.append(record)
        return web.json_response(record)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    async with serving(app) as port:
        yield Upstream(port, seen)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test (``helpers.closed_port``)."""
    with closed_port() as port:
        yield port


@pytest.fixture
def tls(tmp_path: Path) -> TlsDir:
    """A CA and a server certificate for 127.0.0.1/localhost, as envoy-mtls.yaml expects."""
    return make_tls_dir(tmp_path / "tls")


@dataclass
class Webhook:
    """A third-party API on loopback. ``routes`` maps a path to a handler; every request is
    recorded (method, raw path with query, headers, body) in ``requests``."""

    url: str
    requests: list[dict] = field(default_factory=list)
    routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(default_factory=dict)

    def seen(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"].split("?")[0] == path]


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        hook.requests.append({
            "method": request.method,
            "path": request.raw_path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": await request.read(),
        })
        handler = hook.routes.get(request.path)
        if handler is None:
            return web.json_response({"error": "no such route"}, status=404)
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serving(app) as port:
        hook.url = f"http://127.0.0.1:{port}"
        yield hook


def answer(payload: object, status: int = 200, *, delay: float = 0, jsonp: str | None = None
           ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A webhook handler answering ``payload`` as JSON (or JSONP with callback ``jsonp``)."""
    import asyncio
    import json as _json

    async def handler(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        text = _json.dumps(payload)
        if jsonp:
            return web.Response(text=f"/**/ {jsonp}({text});", status=status,
                                content_type="application/javascript")
        return web.Response(text=text, status=status, content_type="application/json")

    return handler


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp app on 127.0.0.1:0 whose every route is ``handler`` (recorded first)."""
    apps = contextlib.AsyncExitStack()

    async def start(handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> Api:
        api = Api("")

        async def record(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
            peer = request.transport.get_extra_info("peername") if request.transport else None
            api.seen.append(Seen(request.method, request.raw_path, headers, body, tuple(peer[:2])))
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        # handler_cancellation: a handler still sleeping when the client leaves is cancelled,
        # so teardown does not wait for it.
        port = await apps.enter_async_context(serving(app, ssl_context=ssl_context, handler_cancellation=True,
                                                      shutdown_timeout=0.5))
        api.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        return api

    async with apps:
        yield start


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    """A ``RawServer`` on 127.0.0.1:0, closed with whatever it is still answering."""
    server = await RawServer().start()
    try:
        yield server
    finally:
        await server.close()

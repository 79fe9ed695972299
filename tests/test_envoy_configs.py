"""The shipped Envoy configs (envoy/envoy.yaml, envoy/envoy-mtls.yaml) with a real Envoy.

Each test runs a real Envoy (tests/envoy_harness.py) on loopback between
- a bare ext_authz servicer written here (grpc.aio) that records every CheckRequest and answers
  by path: ``/deny...`` -> PERMISSION_DENIED + 403 + ``x-safous-denial-reason``;
  ``/slow/SECONDS`` -> OK after sleeping; anything else -> OK, adding a header to the upstream;
- an aiohttp upstream app that echoes the request it got as JSON,
and asserts what a client sees. The sidecar itself is not involved: these tests pin the Envoy
side of the contract (what the sidecar receives, and how Envoy acts on its answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import urllib.parse
from dataclasses import dataclass

import aiohttp
import grpc
import pytest

from sidecar._pb.envoy.config.core.v3 import base_pb2
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from sidecar._pb.envoy.type.v3 import http_status_pb2
from sidecar._pb.google.rpc import status_pb2
from tests.certs import (
    client_ssl_context,
    make_client_cert,
    make_foreign_client_cert,
)
from tests.envoy_harness import (
    ENVOY_MTLS_YAML,
    ENVOY_YAML,
    EnvoyError,
    render_config,
    run_envoy,
)
from tests.helpers import OK, PERMISSION_DENIED

pytestmark = pytest.mark.timeout(30)

REASON_HEADER = "x-safous-denial-reason"
ADDED_HEADER = "x-safous-authorized-by"  # set by the servicer on allow (ok_response.headers)


# --------------------------------------------------------------------------- fixtures


class RecordingAuthz(external_auth_pb2_grpc.AuthorizationServicer):
    """A bare Check servicer: records requests, decides by path."""

    def __init__(self) -> None:
        self.requests: list[external_auth_pb2.CheckRequest] = []

    async def Check(self, request, context):  # noqa: N802 (gRPC method name)
        self.requests.append(request)
        path = request.attributes.request.http.path
        if path.startswith("/slow/"):
            await asyncio.sleep(float(path.split("/")[2].split("?")[0]))
        if path.startswith("/deny"):
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=PERMISSION_DENIED, message="denied by test"),
                denied_response=external_auth_pb2.DeniedHttpResponse(
                    status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
                    headers=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(key=REASON_HEADER, value="test: path denied")
                        ),
                        # Without it Envoy labels the body text/plain.
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                        ),
                    ],
                    body=json.dumps({"allowed": False, "reason": "test: path denied"}),
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=ADDED_HEADER, value="test-servicer"),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ]
            ),
        )

    def headers(self, i: int = -1) -> dict[str, str]:
        return dict(self.requests[i].attributes.request.http.headers)


@dataclass
class Authz:
    servicer: RecordingAuthz
    port: int


@pytest.fixture
async def authz():
    """Overrides conftest's client factory: here the servicer is the test double."""
    servicer = RecordingAuthz()
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Authz(servicer, port)
    finally:
        await server.stop(0)


@pytest.fixture
async def envoy(authz, upstream, tmp_path):
    text = render_config(ENVOY_YAML, sidecar_port=authz.port, upstream_port=upstream.port)
    async with run_envoy(text, tmp_path) as proc:
        yield proc


@pytest.fixture
async def envoy_mtls(authz, upstream, tls, tmp_path):
    text = render_config(
        ENVOY_MTLS_YAML, sidecar_port=authz.port, upstream_port=upstream.port, tls_dir=tls.directory
    )
    async with run_envoy(text, tmp_path) as proc:
        yield proc


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=8))


async def raw_get(port: int, target: str, headers: dict[str, str] | None = None):
    """An HTTP/1.1 GET with the request target sent byte for byte (no client-side path
    normalization). Returns (status, {lower-case header: value}, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"GET {target} HTTP/1.1", "Host: app.example", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 8)
        status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        got = {}
        for line in header_lines:
            k, _, v = line.partition(":")
            got[k.strip().lower()] = v.strip()
        if "content-length" in got:
            body = await asyncio.wait_for(reader.readexactly(int(got["content-length"])), 8)
        else:
            body = await asyncio.wait_for(reader.read(), 8)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return int(status_line.split()[1]), got, body


# --------------------------------------------------------------------------- plain HTTP


async def test_allow_reaches_upstream(envoy, authz, upstream):
    async with _session() as s:
        async with s.get(f"{envoy.url}/hello?x=1", headers={"User-Agent": "ua-test/1"}) as r:
            assert r.status == 200
            echoed = await r.json()
    assert echoed["path"] == "/hello?x=1"
    up = dict(echoed["headers"])
    assert up[ADDED_HEADER] == "test-servicer"

    assert len(authz.servicer.requests) == 1
    req = authz.servicer.requests[0]
    http = req.attributes.request.http
    assert http.path == "/hello?x=1" and http.method == "GET" and http.protocol == "HTTP/1.1"
    headers = authz.servicer.headers()
    assert headers[":path"] == "/hello?x=1" and headers["user-agent"] == "ua-test/1"
    # generate_request_id: the sidecar and the app see the same request id.
    assert headers["x-request-id"] and headers["x-request-id"] == up["x-request-id"]
    # use_remote_address: the peer address is the client's.
    assert req.attributes.source.address.socket_address.address == "127.0.0.1"
    assert req.attributes.destination.address.socket_address.port_value == envoy.port
    assert req.attributes.source.certificate == ""  # plain HTTP: no peer certificate
    stats = await envoy.stats()
    assert stats["http.ingress_http.ext_authz.ok"] == 1


async def test_deny_is_403_with_reason(envoy, authz, upstream):
    async with _session() as s:
        async with s.get(f"{envoy.url}/deny/secret") as r:
            assert r.status == 403
            assert r.headers[REASON_HEADER] == "test: path denied"
            assert (await r.json())["reason"] == "test: path denied"
    assert len(authz.servicer.requests) == 1
    assert upstream.requests == []
    assert (await envoy.stats())["http.ingress_http.ext_authz.denied"] == 1


async def test_client_identity_headers_never_reach_sidecar_or_app(envoy, authz, upstream):
    sent = {
        "X-Safous-Username": "admin",
        "x-safous-device-id": "dev-1",
        "x-safous-groups": "g1,g2",
        "x-safous-group-names": "Admins",
        "x-safous-foo": "bar",
        "X-SAFOUS-AUTHORIZED-BY": "the-client",  # the servicer's own header name
        "x-other": "kept",
    }
    async with _session() as s:
        async with s.get(f"{envoy.url}/page", headers=sent) as r:
            assert r.status == 200
            up = await r.json()
    checked = authz.servicer.headers()
    assert not [k for k in checked if k.startswith("x-safous-")], checked
    assert checked["x-other"] == "kept"
    up_safous = [(k, v) for k, v in up["headers"] if k.startswith("x-safous-")]
    # Only what the sidecar set on allow (ext_authz runs after the stripping) reaches the app.
    assert up_safous == [(ADDED_HEADER, "test-servicer")]
    assert dict(up["headers"])["x-other"] == "kept"


@pytest.mark.parametrize(
    ("target", "canonical"),
    [
        ("/a/../b", "/b"),
        ("//b", "/b"),
        ("/a/./c/../../b", "/b"),
        ("/a/b/..//c", "/a/c"),
        # RFC 3986: `..` removes the empty segment first, then slashes are merged.
        ("/a//..//b", "/a/b"),
    ],
)
async def test_paths_reach_sidecar_and_app_canonical(envoy, authz, upstream, target, canonical):
    status, _, body = await raw_get(envoy.port, target)
    assert status == 200, body
    # The sidecar matches policies on exactly the path the app gets.
    assert authz.servicer.requests[0].attributes.request.http.path == canonical
    assert authz.servicer.headers()[":path"] == canonical
    assert json.loads(body)["path"] == canonical


async def test_escaped_slash_is_redirected_before_the_check(envoy, authz, upstream):
    # `%2F` hides a slash from prefix matching: Envoy unescapes, normalizes, and redirects
    # the client to the canonical path without calling the sidecar or the app.
    status, headers, _ = await raw_get(envoy.port, "/public%2F..%2Fadmin")
    assert status == 307
    assert headers["location"] == "/admin"
    assert authz.servicer.requests == [] and upstream.requests == []
    status, _, _ = await raw_get(envoy.port, headers["location"])
    assert status == 200
    assert authz.servicer.requests[0].attributes.request.http.path == "/admin"


async def test_sidecar_down_is_a_fast_403(upstream, tmp_path, refused_port):
    text = render_config(ENVOY_YAML, sidecar_port=refused_port, upstream_port=upstream.port)
    async with run_envoy(text, tmp_path) as envoy:
        async with _session() as s:
            t0 = time.monotonic()
            async with s.get(f"{envoy.url}/anything") as r:
                elapsed = time.monotonic() - t0
                assert r.status == 403
                assert REASON_HEADER not in r.headers
                assert await r.read() == b""
        stats = await envoy.stats()
    assert elapsed < 1.0, elapsed
    assert upstream.requests == []
    assert stats["http.ingress_http.ext_authz.error"] >= 1
    assert stats.get("http.ingress_http.ext_authz.ok", 0) == 0


async def test_timeout_leaves_room_for_rule_timeout_and_fails_closed(envoy, authz, upstream):
    async with _session() as s:
        # A check taking a bit more than the default rule timeout (1000 ms) still gets through.
        async with s.get(f"{envoy.url}/slow/1.1") as r:
            assert r.status == 200
        # A sidecar slower than the ext_authz timeout (1500 ms): 403 at the timeout.
        t0 = time.monotonic()
        async with s.get(f"{envoy.url}/slow/4") as r:
            elapsed = time.monotonic() - t0
            assert r.status == 403
    assert 1.4 <= elapsed < 2.5, elapsed
    assert [rq["path"] for rq in upstream.requests] == ["/slow/1.1"]


# --------------------------------------------------------------------------- mTLS


async def test_mtls_client_certificate_reaches_sidecar(envoy_mtls, authz, upstream, tls):
    bob = make_client_cert(
        tls.directory,
        tls.ca,
        "bob",
        organization="Example",
        dns_names=["bob.example.com"],
        uris=["spiffe://example.com/user/bob"],
        emails=["bob@example.com"],
    )
    ctx = client_ssl_context(tls.ca.cert_path, bob)
    async with _session() as s:
        url = f"https://127.0.0.1:{envoy_mtls.port}/hello"
        async with s.get(url, ssl=ctx, server_hostname="localhost") as r:
            assert r.status == 200
            assert dict((await r.json())["headers"])[ADDED_HEADER] == "test-servicer"

    req = authz.servicer.requests[0]
    source = req.attributes.source
    assert "%0A" in source.certificate  # URL-encoded
    assert urllib.parse.unquote(source.certificate) == bob.pem
    assert source.principal == "spiffe://example.com/user/bob"  # URI SAN wins over the subject
    assert req.attributes.destination.principal  # from the server certificate
    assert req.attributes.tls_session.sni == "localhost"  # include_tls_session
    assert req.attributes.request.http.scheme == "https"


async def test_mtls_listener_negotiates_h2(envoy_mtls, tls):
    bob = make_client_cert(tls.directory, tls.ca, "bob")
    ctx = client_ssl_context(tls.ca.cert_path, bob, alpn=["h2", "http/1.1"])
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", envoy_mtls.port, ssl=ctx, server_hostname="localhost"
        ),
        5,
    )
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.parametrize("client", ["no-certificate", "foreign-ca"])
async def test_mtls_rejects_clients_without_a_trusted_certificate(
    envoy_mtls, authz, upstream, tls, client
):
    if client == "no-certificate":
        ctx = client_ssl_context(tls.ca.cert_path)
    else:
        mallory = make_foreign_client_cert(tls.directory, "mallory")
        ctx = client_ssl_context(tls.ca.cert_path, mallory)
    async with _session() as s:
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with s.get(f"https://127.0.0.1:{envoy_mtls.port}/hello", ssl=ctx) as r:
                await r.read()
    assert authz.servicer.requests == [] and upstream.requests == []
    stats = await envoy_mtls.stats()
    counter = "ssl.fail_verify_no_cert" if client == "no-certificate" else "ssl.fail_verify_error"
    assert sum(v for k, v in stats.items() if k.endswith(counter)) >= 1, {
        k: v for k, v in stats.items() if ".ssl." in k and v
    }


# --------------------------------------------------------------------------- the harness itself


async def test_identity_stripping_is_what_removes_the_headers(authz, upstream, tmp_path):
    """Control for the stripping test, and the documented opt-out for a trusted front proxy:
    with the matcher narrowed, a client-sent identity header does reach the sidecar."""
    text = render_config(
        ENVOY_YAML,
        sidecar_port=authz.port,
        upstream_port=upstream.port,
        extra={'prefix: "x-safous-"': 'prefix: "x-not-a-safous-header-"'},
    )
    async with run_envoy(text, tmp_path) as envoy:
        async with _session() as s:
            async with s.get(f"{envoy.url}/page", headers={"x-safous-username": "alice"}) as r:
                assert r.status == 200
    assert authz.servicer.headers()["x-safous-username"] == "alice"


def test_render_config_fails_on_drift(tmp_path):
    good = ENVOY_YAML.read_text()
    rendered = render_config(ENVOY_YAML, sidecar_port=1111, upstream_port=2222)
    for literal in ("9191", "8081", "8080", "9901"):
        assert f"port_value: {literal}" not in rendered
    assert "port_value: 1111" in rendered and "port_value: 2222" in rendered
    for literal in ("port_value: 9191", "port_value: 8081", "port_value: 8080", "port_value: 9901"):
        drifted = tmp_path / "drifted.yaml"
        drifted.write_text(good.replace(literal, "port_value: 1234"))
        with pytest.raises(EnvoyError, match=literal.split()[-1]):
            render_config(drifted, sidecar_port=1, upstream_port=2)
    with pytest.raises(EnvoyError, match="tls_dir"):
        render_config(ENVOY_MTLS_YAML, sidecar_port=1, upstream_port=2)
    with pytest.raises(EnvoyError, match="TLS path"):
        render_config(ENVOY_YAML, sidecar_port=1, upstream_port=2, tls_dir=tmp_path)
    with pytest.raises(EnvoyError, match="extra"):
        render_config(ENVOY_YAML, sidecar_port=1, upstream_port=2, extra={"no such text": "x"})


async def test_run_envoy_reports_a_bad_config(tmp_path):
    with pytest.raises(EnvoyError, match="exited"):
        async with run_envoy("static_resources: {listeners: [{name: 1}]}\n", tmp_path):
            pass  # pragma: no cover

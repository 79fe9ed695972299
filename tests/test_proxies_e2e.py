"""End to end through the shipped nginx, Caddy and Traefik configurations (proxies/): a client,
the real proxy, the real sidecar (``--authz-http``, profile forward-auth) with a rules.db and
webhooks, and the app.

Each proxy runs once for the module (the tests are grouped by proxy), in front of one sidecar:
the three configurations pass the client certificate in the same header, so the same sidecar
command line serves them all. Every request carries an ``x-probe`` header of its own, which
the rules pass to their webhooks (``%headers.x-probe%``) and the app echoes, so that a test
finds what the webhook and the app saw of its request.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import ssl
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yarl
from aiohttp import web
from cryptography import x509

from sidecar import http_edge
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.certs import CertKey, TlsDir, client_ssl_context, make_ca, make_client_cert, make_tls_dir
from tests.conftest import seed
from tests.helpers import ServerLog, closed_port, eventually, free_port, serving, start_server
from tests.proxy_harness import (
    CLIENT_CERT_HEADER,
    PROXIES,
    ProxyError,
    ProxyKind,
    ProxyProcess,
    proxy_binary,
    run_proxy,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

# ------------------------------------------------------------------------------- the world

POSTURE_DENIED = 'rule "posture": status is "unknown", expected "compliant"'
NO_POLICY = "no policy matches this request"


@dataclass
class Recorder:
    """A server on loopback that records what reached it, by the request's ``x-probe``."""

    port: int = 0
    seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def of(self, probe: str) -> list[dict[str, Any]]:
        return self.seen.get(probe, [])


@dataclass(frozen=True)
class Certs:
    """The proxies' server certificate (``tls``) and the client certificates, from a CA of
    their own (``clients``), as often deployed."""

    tls: TlsDir
    clients: CertKey
    bob: CertKey
    alice: CertKey

    def client(self, who: CertKey, *, chain: bool = False) -> ssl.SSLContext:
        """A client presenting ``who``; with ``chain``, its CA as well (OpenSSL sends the chain
        it can build from the certificates it trusts)."""
        context = client_ssl_context(self.tls.ca.cert_path, who)
        if chain:
            context.load_verify_locations(self.clients.cert_path)
        return context


@dataclass(frozen=True)
class Sidecar:
    log: ServerLog
    authz_port: int
    db: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("tls")
    clients = make_ca(directory, common_name="Safous Test Client CA", stem="client-ca")
    return Certs(make_tls_dir(directory), clients, make_client_cert(directory, clients, "bob"),
                 make_client_cert(directory, clients, "alice"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def webhooks(certs: Certs) -> AsyncIterator[Recorder]:
    """The third parties the rules ask, answering from the parameters they were sent."""
    recorder = Recorder()

    async def handle(request: web.Request) -> web.Response:
        query = dict(request.query)
        recorder.seen.setdefault(query.get("probe", ""), []).append({"path": request.path, **query})
        answers = {
            "/posture": {"status": "compliant" if query.get("device") == "laptop-42" else "unknown", "tier": "gold"},
            "/admins": {"role": "admin" if query.get("user") == "admin" else "user"},
            "/office": {"network": "inside" if query.get("ip") == "203.0.113.9" else "outside"},
            "/device": {"device": "known" if query.get("sha1") == certs.bob.sha1 else "unknown"},
        }
        return web.json_response(answers.get(request.path, {}))

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    async with serving(app) as recorder.port:
        yield recorder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[Recorder]:
    """The protected app: echoes the request (method, raw path, headers in order, body)."""
    recorder = Recorder()

    async def echo(request: web.Request) -> web.Response:
        record = {"method": request.method, "path": request.raw_path,
                  "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
                  "body": (await request.read()).decode("latin-1")}
        recorder.seen.setdefault(request.headers.get("x-probe", ""), []).append(record)
        return web.json_response(record)

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", echo)
    async with serving(application) as recorder.port:
        yield recorder


def _string(key: str, value: str) -> ResponseAction:
    return ResponseAction(type=ActionType.STRING, key=key, value=value)


# Rule name → the webhook's path and query (each also gets the probe), and its response actions.
RULES = {
    "posture": ("posture?device=%headers.x-device%&user=%username%&ip=%remote_ip%",
                (_string("status", "compliant"), ResponseAction(type=ActionType.STORE, key="tier", value="tier"))),
    "admins-only": ("admins?user=%username%", (_string("role", "admin"),)),
    "office-network": ("office?ip=%remote_ip%", (_string("network", "inside"),)),
    "known-device": ("device?sha1=%cert_thumbprint%&sha256=%cert_thumbprint_256%&cn=%cert_name%",
                     (_string("device", "known"),)),
    "audited-posture": ("posture?device=%headers.x-device%", (_string("status", "compliant"),)),
}
POLICIES = [
    Policy(name="public", path_prefix="/public", integration=False),
    Policy(name="app", path_prefix="/app", rules=("posture",)),
    Policy(name="admin", path_prefix="/admin", rules=("admins-only",)),
    Policy(name="office", path_prefix="/office", rules=("office-network",)),
    Policy(name="device", path_prefix="/device", rules=("known-device",)),
    Policy(name="audit", path_prefix="/audit", rules=("audited-posture",), mode="audit"),
    Policy(name="readonly", path_prefix="/readonly", methods=("GET",), integration=False),
    Policy(name="intranet", hosts=("intranet.example.com",), integration=False),
]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory, webhooks: Recorder) -> Iterator[Sidecar]:
    db = tmp_path_factory.mktemp("sidecar") / "rules.db"
    seed(db, [Rule(name=name, url=f"{webhooks.url}/{query}&probe=%headers.x-probe%", actions=actions)
              for name, (query, actions) in RULES.items()], POLICIES)
    log, _ = start_server(db, "--authz-http", "127.0.0.1:0", "--authz-http-profile", "forward-auth",
                          "--authz-http-client-cert-header", CLIENT_CERT_HEADER)
    try:
        [listening] = log.entries("listening")
        yield Sidecar(log, int(listening["authz_http_port"]), db)
    finally:
        log.close()


def start(kind: ProxyKind, workdir: Path, certs: Certs, *, sidecar_port: int, app_port: int
          ) -> contextlib.AbstractAsyncContextManager[ProxyProcess]:
    """The proxy on its shipped configuration; skipped where it is not installed, except under
    CI (`make test` installs it), where that fails."""
    try:
        proxy_binary(kind)
    except ProxyError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    return run_proxy(kind, workdir, sidecar_port=sidecar_port, upstream_port=app_port, tls_dir=certs.tls.directory,
                     client_ca=certs.clients.cert_path, client_tls=certs.client(certs.bob), port=free_port(),
                     tls_port=free_port())


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROXIES)
async def proxy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: Certs,
                sidecar: Sidecar, app: Recorder) -> AsyncIterator[ProxyProcess]:
    kind: ProxyKind = request.param
    async with start(kind, tmp_path_factory.mktemp(kind), certs, sidecar_port=sidecar.authz_port,
                     app_port=app.port) as running:
        yield running


# ------------------------------------------------------------------------------- a client

@dataclass
class Seen:
    """What the client got back."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send(url: str, method: str = "GET", *, headers: dict[str, str] | None = None, probe: str = "",
               data: bytes | None = None, tls: ssl.SSLContext | None = None, server_name: str | None = None,
               host: str | None = None) -> Seen:
    """``method url`` (the path's bytes as written: not normalised), with ``headers``, the
    ``x-probe`` header, the body ``data``; over TLS with ``tls``, ``server_name`` the name the
    handshake asks for, ``host`` the Host header."""
    headers = {"x-probe": probe, **({"Host": host} if host else {}), **(headers or {})}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.request(method, yarl.URL(url, encoded=True), headers=headers, data=data, ssl=tls or True,
                                   server_hostname=server_name, allow_redirects=False) as response:
            return Seen(response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read())


def new_probe() -> str:
    return uuid.uuid4().hex


def folded(name: str) -> str:
    """A header name as CGI, WSGI and PHP apps read it (HTTP_X_SAFOUS_TIER), in our spelling."""
    return name.lower().replace("_", "-").replace(".", "-")


def header_values(record: dict[str, Any], name: str) -> list[str]:
    """Every value the app got under ``name``, however spelt (case, `_` or `.` for `-`)."""
    return [v for k, v in record["headers"] if folded(k) == folded(name)]


def safous_headers(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The app's x-safous-* headers, however spelt, in the order received."""
    return [(folded(k), v) for k, v in record["headers"] if folded(k).startswith("x-safous-")]


def activity_row(db: Path, request_id: str) -> tuple[str, str, int, str] | None:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT path, method, allowed, code FROM activity_log WHERE request_id = ?",
                            (request_id,)).fetchone()


def url_encoded_pem(cert: CertKey) -> str:
    """A certificate as nginx's $ssl_client_escaped_cert spells it (the sidecar reads it)."""
    return urllib.parse.quote(cert.pem, safe="")


def openssl_sha1(cert: CertKey) -> str:
    """``openssl x509 -fingerprint -sha1`` of the certificate: lower-case hex, no colons."""
    done = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha1", "-in", str(cert.cert_path)],
                          capture_output=True, text=True, check=True, timeout=10)
    return done.stdout.strip().split("=", 1)[1].replace(":", "").lower()


# ------------------------------------------------------------------------------- allowed, denied

async def test_an_allowed_request_reaches_the_app_with_the_stored_values(
        proxy: ProxyProcess, app: Recorder, webhooks: Recorder) -> None:
    probe = new_probe()
    seen = await send(f"{proxy.url}/app/home?page=2", "POST", probe=probe, data=b"the request body",
                      headers={"x-device": "laptop-42"})
    assert seen.status == 200, seen
    [record] = app.of(probe)
    assert (record["method"], record["path"], record["body"]) == ("POST", "/app/home?page=2", "the request body")
    assert header_values(record, "x-safous-tier") == ["gold"]
    [call] = webhooks.of(probe)
    assert (call["device"], call["user"], call["ip"]) == ("laptop-42", "", "127.0.0.1")


async def test_a_denied_request_shows_the_client_403_and_the_reason(
        proxy: ProxyProcess, app: Recorder, sidecar: Sidecar) -> None:
    probe = new_probe()
    seen = await send(f"{proxy.url}/app/home", probe=probe, headers={"x-device": "phone-1"})
    assert seen.status == 403
    assert seen.headers["x-safous-denial-reason"] == POSTURE_DENIED
    assert seen.headers["x-safous-denial-code"] == "value_mismatch"
    assert seen.headers["content-type"].startswith("application/json")
    body = seen.json()
    request_id = body["request_id"]
    if proxy.kind == "nginx":
        # auth_request drops the answer's body: the denial page has the reason in its header.
        assert body == {"error": "access_denied", "code": "value_mismatch", "request_id": request_id}
    else:
        assert body == {"error": "access_denied", "code": "value_mismatch", "reason": POSTURE_DENIED,
                        "request_id": request_id}
    assert app.of(probe) == []
    # The id the client is shown is the activity log's.
    row = await eventually(lambda: activity_row(sidecar.db, request_id), what="the activity log row")
    assert row == ("/app/home", "GET", 0, "value_mismatch")


async def test_a_policy_in_audit_mode_tells_the_app(proxy: ProxyProcess, app: Recorder) -> None:
    probe = new_probe()
    seen = await send(f"{proxy.url}/audit/report", probe=probe, headers={"x-device": "phone-1"})
    assert seen.status == 200
    [record] = app.of(probe)
    assert header_values(record, "x-safous-audit-deny") == ["value_mismatch"]


async def test_a_request_no_policy_matches_is_denied(proxy: ProxyProcess, app: Recorder) -> None:
    probe = new_probe()
    seen = await send(f"{proxy.url}/elsewhere", probe=probe)
    assert (seen.status, seen.headers["x-safous-denial-reason"]) == (403, NO_POLICY)
    assert app.of(probe) == []


# ------------------------------------------------------------------------------- forgeries

BOB_CERT = "<bob's certificate>"


@dataclass(frozen=True)
class Forgery:
    """A client writing what only the proxy may say, to be let in: ``method path`` with
    ``headers`` must be denied through a proxy with ``reason``, the webhook (if any) having seen
    ``webhook_saw`` of its parameters; straight to the sidecar (which believes its proxy), it
    is allowed."""

    name: str
    method: str
    path: str
    headers: dict[str, str]
    reason: str
    webhook_saw: dict[str, str] = field(default_factory=dict)


FORGERIES = [
    Forgery("username", "GET", "/admin/users", {"X-Safous-Username": "admin"},
            'rule "admins-only": role is "user", expected "admin"', {"user": ""}),
    Forgery("x-forwarded-for", "GET", "/office/printer", {"X-Forwarded-For": "203.0.113.9"},
            'rule "office-network": network is "outside", expected "inside"', {"ip": "127.0.0.1"}),
    Forgery("x-forwarded-host", "GET", "/elsewhere", {"X-Forwarded-Host": "intranet.example.com"}, NO_POLICY),
    Forgery("x-forwarded-uri", "GET", "/admin/users", {"X-Forwarded-Uri": "/public/page"},
            'rule "admins-only": role is "user", expected "admin"', {"user": ""}),
    Forgery("x-forwarded-method", "DELETE", "/readonly/report", {"X-Forwarded-Method": "GET"}, NO_POLICY),
    Forgery("client-certificate", "GET", "/device/laptop", {CLIENT_CERT_HEADER: BOB_CERT},
            'rule "known-device": device is "unknown", expected "known"', {"sha1": "", "cn": ""}),
]


def forged_headers(forgery: Forgery, certs: Certs) -> dict[str, str]:
    return {k: url_encoded_pem(certs.bob) if v == BOB_CERT else v for k, v in forgery.headers.items()}


Listener = str
LISTENERS = ["plain", "mtls"]


def through(proxy: ProxyProcess, listener: Listener, certs: Certs) -> tuple[str, dict[str, Any]]:
    """The base URL of ``listener``, and what ``send`` needs to reach it: on the mTLS listener,
    the client is alice (bob's certificate is what the client-certificate forgery claims)."""
    if listener == "plain":
        return proxy.url, {}
    return proxy.tls_url, {"tls": certs.client(certs.alice), "server_name": proxy.tls_name,
                           "host": f"{proxy.tls_name}:{proxy.tls_port}"}


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("forgery", FORGERIES, ids=lambda f: f.name)
async def test_a_forged_header_changes_no_decision(proxy: ProxyProcess, forgery: Forgery, listener: Listener,
                                                   certs: Certs, app: Recorder, webhooks: Recorder) -> None:
    base, options = through(proxy, listener, certs)
    probe = new_probe()
    seen = await send(f"{base}{forgery.path}", forgery.method, probe=probe, headers=forged_headers(forgery, certs),
                      **options)
    assert (seen.status, seen.headers.get("x-safous-denial-reason")) == (403, forgery.reason)
    assert app.of(probe) == []
    expected = dict(forgery.webhook_saw)
    if listener == "mtls" and "sha1" in expected:  # the certificate of the connection
        expected.update(sha1=certs.alice.sha1, cn="alice")
    assert [{k: call[k] for k in expected} for call in webhooks.of(probe)] == ([expected] if expected else [])


@pytest.mark.parametrize("forgery", FORGERIES, ids=lambda f: f.name)
async def test_control_each_forgery_straight_to_the_sidecar_is_allowed(
        forgery: Forgery, certs: Certs, sidecar: Sidecar) -> None:
    """What the proxies must prevent: the sidecar believes these headers from its proxy."""
    seen = await send(f"http://127.0.0.1:{sidecar.authz_port}/authz", probe=new_probe(), headers={
        "X-Forwarded-Method": forgery.method, "X-Forwarded-Uri": forgery.path, "X-Forwarded-Host": "127.0.0.1",
        "X-Forwarded-For": "127.0.0.1", **forged_headers(forgery, certs)})
    assert (seen.status, seen.headers.get("x-safous-denial-reason")) == (200, None)


@pytest.mark.parametrize("listener", LISTENERS)
async def test_what_the_client_forges_never_reaches_the_app(proxy: ProxyProcess, listener: Listener, certs: Certs,
                                                           app: Recorder) -> None:
    base, options = through(proxy, listener, certs)
    # The spellings of x-safous-tier that CGI, WSGI and PHP apps read as it.
    forged = {"X-Safous-Username": "admin", "X-Safous-Tier": "platinum", "X_Safous_Tier": "platinum",
              "X-Safous_Tier": "platinum", "X.Safous.Tier": "platinum", "X_Safous-Tier": "platinum",
              "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "intranet.example.com",
              "X-Forwarded-Uri": "/public/page", "X-Forwarded-Method": "DELETE",
              CLIENT_CERT_HEADER: url_encoded_pem(certs.bob), "X-Request-Id": "forged-request-id"}
    for path in ("/app/home", "/public/page"):  # stored values, and none
        probe = new_probe()
        seen = await send(f"{base}{path}", probe=probe, headers={"x-device": "laptop-42", **forged}, **options)
        assert seen.status == 200, (path, seen)
        [record] = app.of(probe)
        for name, value in forged.items():
            assert value not in header_values(record, name), (path, name, record["headers"])
        # Of the namespace, only what the decision stored.
        assert safous_headers(record) == ([("x-safous-tier", "gold")] if path == "/app/home" else [])
        assert header_values(record, "x-forwarded-for") == ["127.0.0.1"]


# ------------------------------------------------------------------------------- paths

# Each is /app/home to an app that normalises paths, and /public/... to a prefix match on its
# raw bytes. nginx and Caddy refuse them all (400); Traefik refuses encoded separators, and
# normalises the others before routing, so that the sidecar and the app get /app/home (the
# client is then denied as for /app/home), or the status given here.
NOT_CANONICAL = {
    "/public/../app/home": 403, "//app/home": 403, "/app/./home": 403, "/public/%2e%2e/app/home": 403,
    "/public/.%2E/app/home": 403, "/%61pp/home": 403,
    "/public%2F..%2Fapp/home": 400, "/public/..%5Capp/home": 400, "/public\\..\\app/home": 400,
}


@pytest.mark.parametrize("path", NOT_CANONICAL)
async def test_a_path_that_normalises_elsewhere_is_never_judged_as_written(
        proxy: ProxyProcess, path: str, app: Recorder) -> None:
    probe = new_probe()
    seen = await send(f"{proxy.url}{path}", probe=probe)
    expected = NOT_CANONICAL[path] if proxy.kind == "traefik" else 400
    assert seen.status == expected, seen
    if expected == 403:
        assert seen.headers["x-safous-denial-reason"] == POSTURE_DENIED
    assert app.of(probe) == []


async def test_the_sidecar_itself_never_judges_a_path_as_written(sidecar: Sidecar) -> None:
    seen = await send(f"http://127.0.0.1:{sidecar.authz_port}/authz", probe=new_probe(), headers={
        "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/public/../app/home", "X-Forwarded-Host": "127.0.0.1",
        "X-Forwarded-For": "127.0.0.1"})
    assert seen.status == 403, seen  # refused as not canonical, or judged as /app/home


# ------------------------------------------------------------------------------- mTLS


@pytest.mark.parametrize("chain", [False, True], ids=["leaf", "chain"])
async def test_the_client_certificate_reaches_the_rules(proxy: ProxyProcess, chain: bool, certs: Certs,
                                                        app: Recorder, webhooks: Recorder) -> None:
    host = f"{proxy.tls_name}:{proxy.tls_port}"
    probe = new_probe()
    # A forged certificate header beside the real certificate: the real one counts.
    forged = {CLIENT_CERT_HEADER: url_encoded_pem(certs.alice)}
    seen = await send(f"{proxy.tls_url}/device/laptop", probe=probe, tls=certs.client(certs.bob, chain=chain),
                      server_name=proxy.tls_name, host=host, headers=forged)
    assert seen.status == 200, (seen, webhooks.of(probe))
    [call] = webhooks.of(probe)
    assert (call["sha1"], call["sha256"], call["cn"]) == (openssl_sha1(certs.bob), certs.bob.sha256, "bob")
    [record] = app.of(probe)
    assert url_encoded_pem(certs.alice) not in header_values(record, CLIENT_CERT_HEADER)

    probe = new_probe()
    seen = await send(f"{proxy.tls_url}/device/laptop", probe=probe, tls=certs.client(certs.alice, chain=chain),
                      server_name=proxy.tls_name, host=host)
    assert (seen.status, seen.headers["x-safous-denial-reason"]) == (
        403, 'rule "known-device": device is "unknown", expected "known"')
    [call] = webhooks.of(probe)
    assert (call["sha1"], call["cn"]) == (openssl_sha1(certs.alice), "alice")


async def test_a_certificate_chain_header_reads_as_its_first_certificate(certs: Certs) -> None:
    """The header Traefik sends for a client that presented its CA too (measured above)."""
    chain = ",".join(base64.b64encode(cert.der).decode() for cert in (certs.bob, certs.clients))
    pem = urllib.parse.unquote(http_edge.client_certificate(chain))
    assert pem and x509.load_pem_x509_certificate(pem.encode()) == certs.bob.cert


# ------------------------------------------------------------------------------- sidecar down

async def test_the_sidecar_down_is_an_error_never_the_app(proxy: ProxyProcess, tmp_path: Path, certs: Certs,
                                                         app: Recorder) -> None:
    with closed_port() as refused:
        async with start(proxy.kind, tmp_path, certs, sidecar_port=refused, app_port=app.port) as down:
            probe = new_probe()
            started = time.monotonic()
            seen = await send(f"{down.url}/public/page", probe=probe)
            elapsed = time.monotonic() - started
    # auth_request turns the failed subrequest into 500; Caddy's proxy answers 502; Traefik 500.
    assert seen.status == {"nginx": 500, "caddy": 502, "traefik": 500}[proxy.kind], seen
    assert "x-safous-denial-reason" not in seen.headers
    assert app.of(probe) == []
    assert elapsed < 2, elapsed  # a refused connection fails at once, not at a timeout

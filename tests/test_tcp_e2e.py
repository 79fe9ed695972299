"""A TCP application behind a real Envoy (envoy/envoy-tcp.yaml: mTLS and the network ext_authz
filter): an allowed client's connection echoes through, a denied client's is closed, and both
decisions are recorded with their reasons."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from aiohttp import web

from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.certs import TlsDir, client_ssl_context, make_client_cert, make_tls_dir
from tests.conftest import seed
from tests.envoy_harness import ENVOY_TCP_YAML, access_log, render_config, run_envoy
from tests.helpers import eventually

SERVER_NAME = "db.example.com"


@pytest.fixture
def tcp_tls(tmp_path: Path) -> TlsDir:
    return make_tls_dir(tmp_path / "tls", hosts=("127.0.0.1", "localhost", SERVER_NAME))


@pytest.fixture
async def echo_app() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP application that echoes; records every byte it received."""
    received: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                received.append(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], received
    server.close()
    await server.wait_closed()


async def who(request: web.Request) -> web.Response:
    """The webhook: active for alice only."""
    return web.json_response({"status": "active" if request.query.get("u") == "alice" else "inactive"})


async def exchange(port: int, tls: TlsDir, client: Any, server_name: str) -> bytes:
    """Connect through Envoy with ``client``'s certificate, send a line, return what comes back
    before the connection ends (b"" when Envoy closes it). A connection that is neither answered
    nor closed within 5 s fails the test."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ssl_context(tls.ca.cert_path, client), server_hostname=server_name), 5)
    try:
        writer.write(b"ping\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(1024), 5)
    except TimeoutError:
        # TimeoutError is an OSError: caught below, a connection Envoy held open would read as
        # one it closed.
        raise AssertionError(f"{server_name}: the connection was neither answered nor closed within 5 s") from None
    except (ConnectionError, OSError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def test_tcp_connections_are_allowed_and_denied_by_webhook_rules(
        db: Path, start_sidecar: Any, webhook: Any, echo_app: tuple[int, list[bytes]], tcp_tls: TlsDir,
        tmp_path: Path) -> None:
    webhook.routes["/who"] = who
    rule = Rule(name="who", url=webhook.url + "/who?u=%username%&ip=%remote_ip%&cn=%cert_name%",
                actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),))
    seed(db, [rule], [
        Policy(name="db", sni=(SERVER_NAME,), rules=("who",)),
        Policy(name="web", path_prefix="/", integration=False),  # HTTP only: never a connection's
    ])
    sidecar = await start_sidecar()
    app_port, received = echo_app
    alice = make_client_cert(tmp_path, tcp_tls.ca, "alice")
    bob = make_client_cert(tmp_path, tcp_tls.ca, "bob")
    config = render_config(ENVOY_TCP_YAML, sidecar_port=sidecar.port, upstream_port=app_port,
                           tls_dir=tcp_tls.directory)
    async with run_envoy(config, tmp_path) as envoy:
        allowed = await exchange(envoy.port, tcp_tls, alice, SERVER_NAME)
        denied = await exchange(envoy.port, tcp_tls, bob, SERVER_NAME)
        unmatched = await exchange(envoy.port, tcp_tls, alice, "localhost")
        lines = await access_log(envoy, 3)

    assert allowed == b"ping\n"
    assert (denied, unmatched) == (b"", b"")
    # Only alice's bytes reached the app. (tcp_proxy may open the upstream connection before the
    # decision; nothing is forwarded on it until the sidecar allows.)
    assert received == [b"ping\n"]
    # %username% is the certificate's CN on a connection; %remote_ip% is the client's address.
    queries = [dict(parse_qsl(urlsplit(r["path"]).query)) for r in webhook.seen("/who")]
    assert [(q["u"], q["cn"], q["ip"]) for q in queries] == [
        ("alice", "alice", "127.0.0.1"), ("bob", "bob", "127.0.0.1")]

    def rows() -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return conn.execute("SELECT request_id, username, host, path, policy, allowed, code, status "
                                "FROM activity_log ORDER BY id").fetchall()

    recorded = await eventually(lambda: len(rows()) == 3 and rows())
    assert [row[1:] for row in recorded] == [
        ("alice", SERVER_NAME, "", "db", 1, "rules_passed", 'policy "db": all 1 rules met'),
        ("bob", SERVER_NAME, "", "db", 0, "value_mismatch",
         'rule "who": status is "inactive", expected "active"'),
        ("alice", "localhost", "", None, 0, "no_matching_policy", "no policy matches this request"),
    ]

    # Envoy's own access log (tcp_proxy's) has one line per connection with the network
    # filter's metadata, allowed and denied alike; its request id is the activity log's.
    request_ids = [row[0] for row in recorded]
    by_client = {(line["client_cert_subject"], line["server_name"]): line for line in lines}
    fields = ("authz_decision", "authz_code", "authz_policy", "authz_policy_source", "authz_reason",
              "authz_request_id", "flags", "bytes_sent")
    assert {key: {k: line[k] for k in fields} for key, line in by_client.items()} == {
        ("CN=alice", SERVER_NAME): {
            "authz_decision": "allow", "authz_code": "rules_passed", "authz_policy": "db",
            "authz_policy_source": "match", "authz_reason": 'policy "db": all 1 rules met',
            "authz_request_id": request_ids[0], "flags": "-", "bytes_sent": 5},
        ("CN=bob", SERVER_NAME): {
            "authz_decision": "deny", "authz_code": "value_mismatch", "authz_policy": "db",
            "authz_policy_source": "match", "authz_reason": 'rule "who": status is "inactive", expected "active"',
            "authz_request_id": request_ids[1], "flags": "UAEX", "bytes_sent": 0},
        ("CN=alice", "localhost"): {
            "authz_decision": "deny", "authz_code": "no_matching_policy", "authz_policy": "",
            "authz_policy_source": "match", "authz_reason": "no policy matches this request",
            "authz_request_id": request_ids[2], "flags": "UAEX", "bytes_sent": 0},
    }

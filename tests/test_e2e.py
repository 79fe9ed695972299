"""End to end: a client, a real Envoy (the shipped configs), the real sidecar, the app."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.parameters import PARAMETERS
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.certs import client_ssl_context, make_client_cert, make_foreign_client_cert, openssl_fingerprint
from tests.conftest import answer, seed
from tests.envoy_harness import (
    ENVOY_MTLS_YAML,
    ENVOY_YAML,
    WITHOUT_ENVOY_STRIP,
    render_config,
    run_envoy,
    safous_headers,
)
from tests.helpers import http_get

pytestmark = pytest.mark.timeout(60)

POLICIES = [
    Policy(name="public", path_prefix="/public", integration=False),
    Policy(name="app", path_prefix="/app", rules=("device-posture",)),
]


def posture_rule(webhook_url: str) -> Rule:
    return Rule(
        name="device-posture",
        url=webhook_url + "/posture?device=%headers.x-device%&ip=%remote_ip%",
        actions=(ResponseAction(type=ActionType.STRING, key="status", value="compliant"),
                 ResponseAction(type=ActionType.STORE, key="tier", value="tier")),
    )


async def posture(request: web.Request) -> web.Response:
    compliant = request.query.get("device") == "laptop-42"
    return web.json_response({"status": "compliant" if compliant else "unknown", "tier": "gold"})


async def test_allow_and_deny_through_envoy(db: Path, start_sidecar, upstream, webhook, tmp_path: Path) -> None:
    webhook.routes["/posture"] = posture
    seed(db, [posture_rule(webhook.url)], POLICIES)
    sidecar = await start_sidecar()
    config = render_config(ENVOY_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        status, _, body = await http_get(f"{envoy.url}/public/page?x=1")
        assert status == 200
        assert json.loads(body)["path"] == "/public/page?x=1"

        # The webhook's criteria are met: the app gets the request, with the stored value,
        # and not the client's forged copy of it.
        status, _, body = await http_get(f"{envoy.url}/app/home",
                                    headers={"x-device": "laptop-42", "x-safous-tier": "forged"})
        assert status == 200
        assert ["x-safous-tier", "gold"] in json.loads(body)["headers"]
        assert ["x-safous-tier", "forged"] not in json.loads(body)["headers"]

        status, headers, body = await http_get(f"{envoy.url}/app/home",
                                          headers={"x-device": "phone-1", "x-safous-username": "mallory"})
        assert status == 403
        assert headers["x-safous-denial-reason"] == (
            'rule "device-posture": status is "unknown", expected "compliant"')
        assert headers["content-type"] == "application/json"
        denial = json.loads(body)
        assert denial["code"] == "value_mismatch" and denial["error"] == "access_denied"

        status, headers, _ = await http_get(f"{envoy.url}/admin")
        assert status == 403
        assert headers["x-safous-denial-reason"] == "no policy matches this request"

        # Envoy normalises the path before the sidecar matches it.
        status, _, _ = await http_get(f"{envoy.url}/public/../app/home", allow_redirects=False)
        assert status == 403
    assert len(upstream.requests) == 2
    assert webhook.seen("/posture")[0]["path"] == "/posture?device=laptop-42&ip=127.0.0.1"
    await sidecar.stop(grace=1)
    rows = sqlite3.connect(db).execute(
        "SELECT request_id, username, source_ip, path, allowed, code FROM activity_log ORDER BY id").fetchall()
    assert [(r[3], r[4], r[5]) for r in rows] == [
        ("/public/page", 1, "integration_off"),
        ("/app/home", 1, "rules_passed"),
        ("/app/home", 0, "value_mismatch"),
        ("/admin", 0, "no_matching_policy"),
        ("/app/home", 0, "value_mismatch"),
    ]
    # The client's identity header was stripped by Envoy; the request id is Envoy's x-request-id.
    assert rows[2][1] == "" and rows[2][2] == "127.0.0.1"
    assert rows[2][0] == denial["request_id"] and len(rows[2][0]) == 36


async def test_forged_safous_headers_are_removed_even_if_envoy_does_not_strip_them(
        db: Path, start_sidecar, upstream, webhook, tmp_path: Path) -> None:
    webhook.routes["/token"] = answer({"token": "from-webhook"})
    rule = Rule(name="token", url=webhook.url + "/token",
                actions=(ResponseAction(type=ActionType.STORE, key="token", value="token"),))
    seed(db, [rule], [Policy(name="app", path_prefix="/app", rules=("token",)),
                      Policy(name="public", path_prefix="/public", integration=False)])
    sidecar = await start_sidecar(default_action="allow")
    config = render_config(ENVOY_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port,
                           extra=WITHOUT_ENVOY_STRIP)
    forged = {"x-safous-role": "admin", "X-Safous-Token": "forged", "X-Safous-Denial-Reason": "none",
              "x-safous-username": "alice", "x_safous_token": "forged", "X_Safous_Username": "admin"}
    seen = {}
    async with run_envoy(config, tmp_path) as envoy:
        for path in ("/app/home", "/public/page", "/no-policy"):
            status, _, body = await http_get(f"{envoy.url}{path}", headers=forged)
            assert status == 200, path
            seen[path] = safous_headers(body)
    assert len(webhook.seen("/token")) == 1
    # The stored value wins over the forged copy, and nothing the decision did not set gets
    # through; the identity header the decision was made on does (this config lets the client
    # choose it: stripping it is Envoy's job, see envoy/envoy.yaml).
    assert seen["/app/home"] == {"x-safous-token": "from-webhook", "x-safous-username": "alice"}
    # Integration off, and the default action allow: no stored values, so nothing but identity.
    assert seen["/public/page"] == {"x-safous-username": "alice"}
    assert seen["/no-policy"] == {"x-safous-username": "alice"}


async def test_sidecar_down_is_a_fast_403(upstream, tmp_path: Path, refused_port: int) -> None:
    config = render_config(ENVOY_YAML, sidecar_port=refused_port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        started = time.monotonic()
        status, headers, body = await http_get(f"{envoy.url}/public/page")
        elapsed = time.monotonic() - started
    assert status == 403 and body == b"" and "x-safous-denial-reason" not in headers
    # Envoy fails fast on a refused connection instead of waiting for its 1.5 s check timeout.
    assert elapsed < 1.4
    assert upstream.requests == []


ALL_PARAMETERS = {name: f"%{name}%" for name in PARAMETERS}


async def test_mtls_certificate_parameters_reach_the_webhook(db: Path, start_sidecar, upstream, webhook, tls,
                                                             tmp_path: Path) -> None:
    webhook.routes["/params"] = answer({"ok": "yes"})
    rule = Rule(name="echo", method="POST", url=webhook.url + "/params", body=json.dumps(ALL_PARAMETERS),
                actions=(ResponseAction(type=ActionType.STRING, key="ok", value="yes"),))
    seed(db, [rule], [Policy(name="app", rules=("echo",))])
    sidecar = await start_sidecar()
    client = make_client_cert(tmp_path, tls.ca, "bob", dns_names=("bob.example.com",),
                              uris=("spiffe://example.com/bob",))
    config = render_config(ENVOY_MTLS_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port,
                           tls_dir=tls.directory)
    async with run_envoy(config, tmp_path) as envoy:
        url = f"https://localhost:{envoy.port}"
        for path in ("/app/x", "/app/y"):
            status, _, _ = await http_get(f"{url}{path}", ssl=client_ssl_context(tls.ca.cert_path, client),
                                     headers={"user-agent": "e2e-agent"})
            assert status == 200
        foreign = make_foreign_client_cert(tmp_path)
        with pytest.raises(aiohttp.ClientError):
            await http_get(f"{url}/app/z", ssl=client_ssl_context(tls.ca.cert_path, foreign))
    first, second = (json.loads(r["body"]) for r in webhook.seen("/params"))
    sha1 = openssl_fingerprint(client.cert_path, "sha1")
    sha256 = openssl_fingerprint(client.cert_path, "sha256")
    assert first == {
        "username": "", "internal_addr": f"127.0.0.1:{envoy.port}", "user_agent": "e2e-agent",
        "remote_ip": "127.0.0.1",
        "cert_thumbprint": sha1.lower(), "cert_thumbprint_upper": sha1.upper(),
        "cert_thumbprint_256": sha256.lower(), "cert_thumbprint_256_upper": sha256.upper(),
        "cert_name": "bob", "cert_alt_name": "bob.example.com,spiffe://example.com/bob",
        "device_id": "", "groups": "", "group_names": "",
    }
    assert second == first

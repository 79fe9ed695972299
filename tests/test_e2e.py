"""End to end: a client, a real Envoy (the shipped configs), the real sidecar, the app."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from sidecar.decision import Code, Decision
from sidecar.evaluation import UnavailableEvaluator
from sidecar.policies import Policy
from sidecar.rules import Rule
from tests.certs import client_ssl_context, make_client_cert, make_foreign_client_cert
from tests.conftest import seed
from tests.envoy_harness import ENVOY_MTLS_YAML, ENVOY_YAML, render_config, run_envoy

pytestmark = pytest.mark.timeout(60)

RULE = Rule(name="posture", url="http://127.0.0.1:9/posture")
POLICIES = [
    Policy(name="public", path_prefix="/public", integration=False),
    Policy(name="app", path_prefix="/app", rules=("posture",)),
]


async def get(url: str, **kwargs) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url, **kwargs) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def test_allow_and_deny_through_envoy(db: Path, start_sidecar, upstream, tmp_path: Path) -> None:
    seed(db, [RULE], POLICIES)
    sidecar = await start_sidecar()
    config = render_config(ENVOY_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        status, _, body = await get(f"{envoy.url}/public/page?x=1")
        assert status == 200
        assert json.loads(body)["path"] == "/public/page?x=1"

        status, headers, body = await get(f"{envoy.url}/app/home",
                                          headers={"x-safous-username": "mallory"})
        assert status == 403
        assert headers["x-safous-denial-reason"] == 'policy "app" needs rule evaluation, which is unavailable'
        assert headers["content-type"] == "application/json"
        denial = json.loads(body)
        assert denial["code"] == "rule_unavailable" and denial["error"] == "access_denied"

        status, headers, _ = await get(f"{envoy.url}/admin")
        assert status == 403
        assert headers["x-safous-denial-reason"] == "no policy matches this request"

        # Envoy normalises the path before the sidecar matches it.
        status, _, _ = await get(f"{envoy.url}/public/../app/home", allow_redirects=False)
        assert status == 403
    assert len(upstream.requests) == 1
    await sidecar.stop(grace=1)
    rows = sqlite3.connect(db).execute(
        "SELECT request_id, username, source_ip, path, allowed, code FROM activity_log ORDER BY id").fetchall()
    assert [(r[3], r[4], r[5]) for r in rows] == [
        ("/public/page", 1, "integration_off"),
        ("/app/home", 0, "rule_unavailable"),
        ("/admin", 0, "no_matching_policy"),
        ("/app/home", 0, "rule_unavailable"),
    ]
    # The client's identity header was stripped by Envoy; the request id is Envoy's x-request-id.
    assert rows[1][1] == "" and rows[1][2] == "127.0.0.1"
    assert rows[1][0] == denial["request_id"] and len(rows[1][0]) == 36


async def test_sidecar_down_is_a_fast_403(upstream, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    config = render_config(ENVOY_YAML, sidecar_port=closed_port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        started = time.monotonic()
        status, headers, body = await get(f"{envoy.url}/public/page")
        elapsed = time.monotonic() - started
    assert status == 403 and body == b"" and "x-safous-denial-reason" not in headers
    # Envoy fails fast on a refused connection instead of waiting for its 1.5 s check timeout.
    assert elapsed < 1.4
    assert upstream.requests == []


class RecordingEvaluator(UnavailableEvaluator):
    """Stands in for webhook rules here: allows, and keeps the parameters it was given."""

    def __init__(self) -> None:
        self.seen = []

    async def evaluate(self, policy, rules, params) -> Decision:
        self.seen.append(params)
        return Decision.allow(Code.RULES_PASSED, "ok", policy.name)


def openssl_fingerprint(cert_path: Path, digest: str) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", f"-{digest}", "-in", str(cert_path)],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1].replace(":", "")


async def test_mtls_client_certificate_reaches_the_parameters(db: Path, start_sidecar, upstream, tls,
                                                              tmp_path: Path) -> None:
    seed(db, [RULE], POLICIES)
    evaluator = RecordingEvaluator()
    sidecar = await start_sidecar(evaluator)
    client = make_client_cert(tmp_path, tls.ca, "bob", dns_names=("bob.example.com",),
                              uris=("spiffe://example.com/bob",))
    config = render_config(ENVOY_MTLS_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port,
                           tls_dir=tls.directory)
    async with run_envoy(config, tmp_path) as envoy:
        url = f"https://localhost:{envoy.port}"
        status, _, _ = await get(f"{url}/app/x", ssl=client_ssl_context(tls.ca.cert_path, client))
        assert status == 200
        # Same certificate again: parsed once, same parameters.
        status, _, _ = await get(f"{url}/app/y", ssl=client_ssl_context(tls.ca.cert_path, client))
        assert status == 200
        foreign = make_foreign_client_cert(tmp_path)
        with pytest.raises(aiohttp.ClientError):
            await get(f"{url}/app/z", ssl=client_ssl_context(tls.ca.cert_path, foreign))
    params = evaluator.seen[0].values
    assert params["cert_thumbprint"] == openssl_fingerprint(client.cert_path, "sha1").lower()
    assert params["cert_thumbprint_upper"] == openssl_fingerprint(client.cert_path, "sha1").upper()
    assert params["cert_thumbprint_256"] == openssl_fingerprint(client.cert_path, "sha256").lower()
    assert params["cert_thumbprint_256_upper"] == openssl_fingerprint(client.cert_path, "sha256").upper()
    assert params["cert_name"] == "bob"
    assert params["cert_alt_name"] == "bob.example.com,spiffe://example.com/bob"
    assert params["remote_ip"] == "127.0.0.1"
    assert params["internal_addr"] == f"127.0.0.1:{envoy.port}"
    assert evaluator.seen[1].values == params
    assert len(evaluator.seen) == 2

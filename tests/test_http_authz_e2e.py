"""End to end over HTTP: a client, a real Envoy on the shipped http_service configs
(envoy/envoy-http-authz.yaml and its mTLS variant), the sidecar's --authz-http, the app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.parameters import PARAMETERS
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.certs import client_ssl_context, make_client_cert, openssl_fingerprint
from tests.conftest import answer, seed
from tests.envoy_harness import (
    ENVOY_HTTP_AUTHZ_MTLS_YAML,
    ENVOY_HTTP_AUTHZ_YAML,
    access_log,
    render_config,
    run_envoy,
    safous_headers,
)
from tests.helpers import http_get

pytestmark = pytest.mark.timeout(60)

ENVOY_PROFILE = {"authz_http": "127.0.0.1:0", "authz_http_profile": "envoy"}
ALL_PARAMETERS = {name: f"%{name}%" for name in PARAMETERS}


def echo(url: str) -> Rule:
    """A rule that posts every parameter to the webhook (which records it) and stores its tier."""
    return Rule(name="echo", method="POST", url=f"{url}/params", body=json.dumps(ALL_PARAMETERS),
                actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),
                         ResponseAction(type=ActionType.STORE, key="tier", value="tier")))


async def test_allow_and_deny_through_envoys_http_service(
        db: Path, start_sidecar, upstream, serve, tmp_path: Path) -> None:
    api = await serve(answer({"status": "active", "tier": "gold"}))
    seed(db, [echo(api.url)],
         [Policy(name="app", path_prefix="/app", rules=("echo",)), Policy(name="public", path_prefix="/public",
                                                                        integration=False)])
    sidecar = await start_sidecar(**ENVOY_PROFILE)
    assert sidecar.authz_http is not None
    config = render_config(ENVOY_HTTP_AUTHZ_YAML, sidecar_port=sidecar.authz_http.port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        # A client forges everything it can: its identity, a stored value, Envoy's own facts.
        forged = {"x-safous-username": "mallory", "x-safous-tier": "forged", "x-forwarded-for": "6.6.6.6",
                  "x-safous-authz-source": "6.6.6.6:1", "x-safous-authz-destination": "10.0.0.1:1",
                  "user-agent": "e2e-agent"}
        status, _, body = await http_get(f"{envoy.url}/app/home?x=1", headers=forged)
        assert status == 200
        echoed = json.loads(body)
        assert echoed["path"] == "/app/home?x=1"
        assert safous_headers(body) == {"x-safous-tier": "gold"}  # the stored value, none of the forgeries

        status, headers, body = await http_get(f"{envoy.url}/admin")
        assert status == 403
        assert headers["x-safous-denial-reason"] == "no policy matches this request"
        assert headers["content-type"].startswith("application/json")
        denial = json.loads(body)
        assert denial == {"error": "access_denied", "code": "no_matching_policy",
                          "reason": "no policy matches this request", "request_id": denial["request_id"]}
        assert not [name for name in headers if name.startswith("safous-")]  # the policy stays inside

        status, _, _ = await http_get(f"{envoy.url}/public/page")
        assert status == 200
        lines = await access_log(envoy, 3)
    assert len(upstream.requests) == 2
    # What the webhook saw: Envoy's view of the client, not the forgeries.
    [seen] = [json.loads(s.body) for s in api.seen]
    assert seen["remote_ip"] == "127.0.0.1" and seen["internal_addr"] == f"127.0.0.1:{envoy.port}"
    assert (seen["username"], seen["user_agent"]) == ("", "e2e-agent")
    # The decision in Envoy's access log, as the gRPC configs log it, under the request's id.
    assert [(line["status"], line["authz_decision"], line["authz_code"], line["authz_policy"])
            for line in lines] == [(200, "allow", "rules_passed", "app"), (403, "deny", "no_matching_policy", ""),
                                   (200, "allow", "integration_off", "public")]
    assert [line["authz_request_id"] for line in lines] == [line["request_id"] for line in lines]
    assert lines[1]["request_id"] == denial["request_id"]


async def test_sidecar_down_is_a_403_never_the_app(upstream, tmp_path: Path, refused_port: int) -> None:
    config = render_config(ENVOY_HTTP_AUTHZ_YAML, sidecar_port=refused_port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        status, headers, _ = await http_get(f"{envoy.url}/app/home")
    assert status == 403 and "x-safous-denial-reason" not in headers
    assert upstream.requests == []


async def test_certificate_parameters_over_http_match_openssl(
        db: Path, start_sidecar, upstream, serve, tls, tmp_path: Path) -> None:
    api = await serve(answer({"status": "active", "tier": "gold"}))
    seed(db, [echo(api.url)], [Policy(name="app", rules=("echo",))])
    sidecar = await start_sidecar(**ENVOY_PROFILE)
    assert sidecar.authz_http is not None
    client = make_client_cert(tmp_path, tls.ca, "bob", dns_names=("bob.example.com",),
                              uris=("spiffe://example.com/bob",))
    config = render_config(ENVOY_HTTP_AUTHZ_MTLS_YAML, sidecar_port=sidecar.authz_http.port,
                           upstream_port=upstream.port, tls_dir=tls.directory)
    async with run_envoy(config, tmp_path) as envoy:
        status, _, _ = await http_get(f"https://localhost:{envoy.port}/app/x",
                                      ssl=client_ssl_context(tls.ca.cert_path, client),
                                      headers={"x-safous-authz-certificate": "forged"})
    assert status == 200
    [seen] = [json.loads(s.body) for s in api.seen]
    sha1, sha256 = openssl_fingerprint(client.cert_path, "sha1"), openssl_fingerprint(client.cert_path, "sha256")
    assert {k: v for k, v in seen.items() if k.startswith("cert_")} == {
        "cert_thumbprint": sha1.lower(), "cert_thumbprint_upper": sha1, "cert_thumbprint_256": sha256.lower(),
        "cert_thumbprint_256_upper": sha256, "cert_name": "bob",
        "cert_alt_name": "bob.example.com,spiffe://example.com/bob"}
    assert seen["internal_addr"] == f"127.0.0.1:{envoy.port}" and seen["remote_ip"] == "127.0.0.1"

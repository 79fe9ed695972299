"""End to end with JWT identity: a client with a bearer token, a real Envoy running the shipped
envoy/envoy-jwt.yaml (jwt_authn with a local JWKS, then ext_authz), the real sidecar, a webhook
that receives %username%, %groups% and %group_names%, and the app.

Keys and tokens are made in the test, signed by hand (tests/jwt_tokens.py): no JWT library is
involved and every token is exactly what the test says it is.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.conftest import answer, seed
from tests.envoy_harness import ENVOY_JWT_YAML, JWKS_PATH_LITERAL, EnvoyProcess, render_config, run_envoy
from tests.helpers import http_get
from tests.jwt_tokens import SigningKey, b64url, bearer, claims

pytestmark = pytest.mark.timeout(60)


# The webhook gets the identity parameters in a JSON body, and (as a header) whatever
# Authorization header the sidecar saw: jwt_authn's `forward: false` means none.
IDENTITY_BODY = '{"user": "%username%", "groups": "%groups%", "names": "%group_names%"}'


@dataclass
class Stack:
    envoy: EnvoyProcess
    sidecar: Any
    key: SigningKey


@contextlib.asynccontextmanager
async def jwt_stack(db: Path, start_sidecar, upstream, webhook, tmp_path: Path,
                    **settings: Any) -> AsyncIterator[Stack]:
    """The sidecar (``settings`` as its keyword settings) with one policy whose rule POSTs the
    identity parameters to the webhook, and Envoy on envoy-jwt.yaml trusting one fresh key."""
    webhook.routes["/identity"] = answer({"ok": "yes"})
    rule = Rule(name="identity", method="POST", url=webhook.url + "/identity", body=IDENTITY_BODY,
                headers=(("x-seen-authorization", "%headers.authorization%"),),
                actions=(ResponseAction(type=ActionType.STRING, key="ok", value="yes"),))
    seed(db, [rule], [Policy(name="app", rules=("identity",))])
    sidecar = await start_sidecar(**settings)
    key = SigningKey.generate("test-key-1")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.jwk()]}))
    config = render_config(ENVOY_JWT_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port,
                           extra={JWKS_PATH_LITERAL: str(jwks)})
    async with run_envoy(config, tmp_path) as envoy:
        yield Stack(envoy, sidecar, key)


def identities(webhook) -> list[dict[str, str]]:
    return [json.loads(r["body"]) for r in webhook.seen("/identity")]


def activity(db: Path) -> list[tuple[str, int, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT username, allowed, code FROM activity_log ORDER BY id").fetchall()


async def test_jwt_claims_reach_the_webhook(db: Path, start_sidecar, upstream, webhook, tmp_path: Path) -> None:
    async with jwt_stack(db, start_sidecar, upstream, webhook, tmp_path) as stack:
        token = stack.key.sign(claims())
        status, _, body = await http_get(f"{stack.envoy.url}/app/home", headers=bearer(token))
        assert status == 200, body
        app_headers = dict(json.loads(body)["headers"])
        # forward: false -- the app never gets the bearer token.
        assert "authorization" not in app_headers

        # A client-sent identity header does not override the token's identity (and is
        # stripped before it could reach the sidecar or the app).
        status, _, body = await http_get(f"{stack.envoy.url}/app/home",
                                    headers={**bearer(token), "x-safous-username": "mallory",
                                             "x-safous-groups": "admins"})
        assert status == 200, body
        app_headers = dict(json.loads(body)["headers"])
        assert "x-safous-username" not in app_headers and "x-safous-groups" not in app_headers

    expected = {"user": "alice", "groups": "eng,ops", "names": "Engineering,Operations"}
    assert identities(webhook) == [expected, expected]
    # ext_authz runs after jwt_authn removed the token: the sidecar never saw it either.
    assert [r["headers"].get("x-seen-authorization") for r in webhook.seen("/identity")] == ["", ""]
    await stack.sidecar.stop(grace=1)
    assert activity(db) == [("alice", 1, "rules_passed"), ("alice", 1, "rules_passed")]


async def test_no_valid_jwt_is_refused_by_envoy(db: Path, start_sidecar, upstream, webhook,
                                                tmp_path: Path) -> None:
    async with jwt_stack(db, start_sidecar, upstream, webhook, tmp_path) as stack:
        url = f"{stack.envoy.url}/app/home"
        other = SigningKey.generate(stack.key.kid)  # same kid, another key: a forgery
        now = int(time.time())
        valid = stack.key.sign(claims())
        head, _, signature = valid.split(".")
        forged_payload = b64url(json.dumps(claims(sub="mallory")).encode())
        # (what is wrong, path, request headers, Envoy's status and body)
        refused = [
            ("no token", "", {"x-safous-username": "alice"}, 401, b"Jwt is missing"),
            ("expired", "", bearer(stack.key.sign(claims(iat=now - 900, nbf=now - 900, exp=now - 600))),
             401, b"Jwt is expired"),
            ("signed by another key", "", bearer(other.sign(claims())), 401, b"Jwt verification fails"),
            ("unknown kid", "", bearer(other.sign(claims(), kid="test-key-2")),
             401, b"Jwks doesn't have key to match kid or alg from Jwt"),
            ("payload changed after signing", "", bearer(f"{head}.{forged_payload}.{signature}"),
             401, b"Jwt verification fails"),
            ("wrong issuer", "", bearer(stack.key.sign(claims(iss="https://evil.example.com"))),
             401, b"Jwt issuer is not configured"),
            # A well-signed token issued for another application: Envoy says 403, not 401.
            ("wrong audience", "", bearer(stack.key.sign(claims(aud="another-app"))),
             403, b"Audiences in Jwt are not allowed"),
            ("no expiry (require_expiration)", "", bearer(stack.key.sign(claims(exp=None))),
             401, b"Jwt verification fails"),
            ("not yet valid", "", bearer(stack.key.sign(claims(nbf=now + 600, exp=now + 900))),
             401, b"Jwt not yet valid"),
            ("not a bearer token", "", {"authorization": f"Basic {valid}"}, 401, b"Jwt is missing"),
            # from_headers is explicit: Envoy's default access_token query parameter is off.
            ("token in the query", f"?access_token={valid}", {}, 401, b"Jwt is missing"),
        ]
        for case, query, headers, expected_status, expected_body in refused:
            status, response_headers, body = await http_get(url + query, headers=headers)
            assert (status, body) == (expected_status, expected_body), case
            assert response_headers["www-authenticate"].startswith("Bearer realm="), case
            assert "x-safous-denial-reason" not in response_headers, case
        counters = await stack.envoy.stats("ext_authz|jwt_authn")
        assert counters["http.ingress_http.jwt_authn.denied"] == len(refused)
        # ... and Envoy never asked the sidecar about them.
        assert [counters[f"http.ingress_http.ext_authz.{name}"] for name in ("ok", "denied", "error")] == [0, 0, 0]
        # The same valid token still works: the refusals above were the tokens' fault.
        status, _, _ = await http_get(url, headers=bearer(valid))
        assert status == 200
    # Nothing refused reached the webhook or the app, nor the sidecar's activity log.
    assert len(webhook.seen("/identity")) == 1 and len(upstream.requests) == 1
    await stack.sidecar.stop(grace=1)
    assert activity(db) == [("alice", 1, "rules_passed")]


async def test_username_claim_is_configurable(db: Path, start_sidecar, upstream, webhook, tmp_path: Path) -> None:
    async with jwt_stack(db, start_sidecar, upstream, webhook, tmp_path,
                         jwt_username_claim="email") as stack:
        status, _, body = await http_get(f"{stack.envoy.url}/app/home", headers=bearer(stack.key.sign(claims())))
        assert status == 200, body
        # A token without that claim: %username% is empty (the header fallback was stripped).
        status, _, body = await http_get(f"{stack.envoy.url}/app/home",
                                    headers={**bearer(stack.key.sign(claims(email=None))),
                                             "x-safous-username": "mallory"})
        assert status == 200, body
    assert identities(webhook) == [
        {"user": "alice@example.com", "groups": "eng,ops", "names": "Engineering,Operations"},
        {"user": "", "groups": "eng,ops", "names": "Engineering,Operations"},
    ]

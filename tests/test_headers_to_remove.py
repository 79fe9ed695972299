"""Client-sent ``x-safous-*`` request headers: the sidecar has Envoy remove the ones the decision
neither sets nor decided on, so the upstream's view of that namespace never depends on the Envoy
config alone: Envoy's configuration is a second line of defence (docs/security/index.md).

The allow-path through a real Envoy whose strip is turned off is in test_e2e.py; here: the rule
on plain values, the CheckResponse, the server's answer over gRPC, and the JWT case end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.attributes import RequestAttributes
from sidecar.check import Checker
from sidecar.decision import Code, Decision
from sidecar.edge import build_response
from sidecar.parameters import IdentityConfig, map_parameters
from sidecar.policies import Policy
from sidecar.rules import UnavailableEvaluator
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.conftest import answer, check_request, seed
from tests.envoy_harness import (
    ENVOY_JWT_YAML,
    JWKS_PATH_LITERAL,
    WITHOUT_ENVOY_STRIP,
    render_config,
    run_envoy,
    safous_headers,
)
from tests.helpers import OK, PERMISSION_DENIED, http_get
from tests.jwt_tokens import SigningKey, bearer, claims

pytestmark = pytest.mark.timeout(60)

ALLOW = Decision.allow(Code.INTEGRATION_OFF, "integration is off", "public")
STORES_TOKEN = Decision.allow(Code.RULES_PASSED, "all rules met", "app", (("x-safous-token", "from-webhook"),))
DENY = Decision.deny(Code.VALUE_MISMATCH, "no", "app")
ROUTINE = {":path": "/app", ":authority": "app.example.com", "host": "app.example.com", "user-agent": "curl"}
IDENTITY = {"x-safous-username": "alice", "x-safous-device-id": "laptop-42",
            "x-safous-groups": "eng", "x-safous-group-names": "Engineering"}


def to_remove(headers: dict[str, str], decision: Decision, *, identity: IdentityConfig | None = None,
              jwt: dict[str, Any] | None = None) -> tuple[str, ...]:
    identity = identity or IdentityConfig()
    checker = Checker(identity, "deny", UnavailableEvaluator())
    attrs = RequestAttributes(request_id="r1", headers={**ROUTINE, **headers}, jwt_payload=jwt or {})
    return checker.headers_to_remove(map_parameters(attrs, identity), decision)


# (case, client headers, decision, identity config, JWT payload, headers to remove)
CASES = [
    ("nothing in the namespace", {"x-other": "1"}, ALLOW, IdentityConfig(), None, ()),
    ("allow without stored values", {"x-safous-role": "admin", "x-safous-token": "forged"}, ALLOW,
     IdentityConfig(), None, ("x-safous-role", "x-safous-token")),
    ("a stored value overwrites the client's copy", {"x-safous-role": "admin", "x-safous-token": "forged"},
     STORES_TOKEN, IdentityConfig(), None, ("x-safous-role",)),
    ("a deny lets nothing through anyway", {"x-safous-role": "admin"}, DENY, IdentityConfig(), None, ()),
    ("the denial reason header is no exception", {"x-safous-denial-reason": "x"}, ALLOW, IdentityConfig(), None,
     ("x-safous-denial-reason",)),
    ("identity headers the decision was made on", {**IDENTITY, "x-safous-role": "admin"}, ALLOW,
     IdentityConfig(), None, ("x-safous-role",)),
    ("a JWT claim won over the header: the header goes", IDENTITY, ALLOW, IdentityConfig(),
     {"sub": "bob", "groups": ["eng"]}, ("x-safous-username",)),
    ("a JWT claim equal to the header: nothing to hide", IDENTITY, ALLOW, IdentityConfig(),
     {"sub": "alice"}, ()),
    ("identity from elsewhere: the default names are ordinary", {**IDENTITY, "x-user": "alice"}, ALLOW,
     IdentityConfig(username_header="X-User", device_id_header="", groups_header="", group_names_header=""),
     None, tuple(IDENTITY)),
    ("a custom identity header in the namespace", {"x-safous-who": "alice", "x-safous-username": "bob"}, ALLOW,
     IdentityConfig(username_header="x-safous-who"), None, ("x-safous-username",)),
    ("one header read as two parameters, one of them used", {"x-safous-id": "alice"}, ALLOW,
     IdentityConfig(username_header="x-safous-id", groups_header="x-safous-id"), {"sub": "bob"}, ()),
    ("underscores: CGI/WSGI servers read x_safous_token as x-safous-token",
     {"x_safous_token": "forged", "x_safous_username": "admin", "x-safous_role": "admin", "x_other": "1"},
     STORES_TOKEN, IdentityConfig(), None, ("x_safous_token", "x_safous_username", "x-safous_role")),
    # The names are scanned joined by line breaks: a name holding one must not pass for two.
    ("a name with a line break is not split into names", {"a\nx-safous-role": "1", "x-safous-token\n": "forged"},
     ALLOW, IdentityConfig(), None, ("x-safous-token\n",)),
]


@pytest.mark.parametrize(("headers", "decision", "identity", "jwt", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_headers_to_remove(headers: dict[str, str], decision: Decision, identity: IdentityConfig,
                           jwt: dict[str, Any] | None, expected: tuple[str, ...]) -> None:
    assert to_remove(headers, decision, identity=identity, jwt=jwt) == expected


def test_an_evaluators_header_names_are_matched_case_insensitively() -> None:
    decision = Decision.allow(Code.RULES_PASSED, "ok", "app", (("X-Safous-Token", "v"),))
    assert to_remove({"x-safous-token": "forged"}, decision) == ()


def test_build_response_lists_the_headers_to_remove_on_an_allow_only() -> None:
    allowed = build_response(STORES_TOKEN, "r1", ("x-safous-role", "x-safous-denial-reason"))
    assert allowed.status.code == OK and allowed.WhichOneof("http_response") == "ok_response"
    assert list(allowed.ok_response.headers_to_remove) == ["x-safous-role", "x-safous-denial-reason"]
    assert [(h.header.key, h.header.value) for h in allowed.ok_response.headers] == [
        ("x-safous-token", "from-webhook")]

    denied = build_response(DENY, "r1", ("x-safous-role",))
    assert denied.status.code == PERMISSION_DENIED and denied.WhichOneof("http_response") == "denied_response"

    assert list(build_response(ALLOW, "r1").ok_response.headers_to_remove) == []


def test_upstream_headers_are_each_responses_own() -> None:
    """Responses with stored values are built once per decision and copied: each response gets
    its own copies, so what one response's headers become never shows in another's. Values too
    large to keep a response for are set all the same."""
    def allow(value: str) -> Decision:
        return Decision.allow(Code.RULES_PASSED, "met", "p", (("x-safous-tier", value),))

    # Built, then kept (asked for twice), then copied from what is kept.
    first, second, third = (build_response(allow("gold"), f"r{n}") for n in (1, 2, 3))
    for response in (first, third):
        response.ok_response.headers[0].header.value = "changed"
    assert [(h.header.key, h.header.value) for h in second.ok_response.headers] == [("x-safous-tier", "gold")]
    assert [h.header.value for h in build_response(allow("gold"), "r3").ok_response.headers] == ["gold"]
    assert [h.header.value for h in build_response(allow("silver"), "r4").ok_response.headers] == ["silver"]
    # Values that differ per user, more of them than responses are kept: each response has its own.
    for n in range(3000):
        response = build_response(allow(f"user-{n % 1500}"), f"u{n}")
        assert [h.header.value for h in response.ok_response.headers] == [f"user-{n % 1500}"]
        assert response.dynamic_metadata.fields["request_id"].string_value == f"u{n}"
    large = "v" * 4000
    for request_id in ("r5", "r6"):
        response = build_response(allow(large), request_id)
        assert [h.header.value for h in response.ok_response.headers] == [large]
        assert response.dynamic_metadata.fields["request_id"].string_value == request_id


async def test_the_servers_answer_names_the_forged_headers(db: Path, start_sidecar, authz) -> None:
    seed(db, [], [Policy(name="public", path_prefix="/public", integration=False)])
    stub = authz((await start_sidecar(default_action="allow")).port)
    headers = {"X-Safous-Role": "admin", "x-safous-username": "alice", "x-other": "1"}

    for path in ("/public/x", "/elsewhere"):
        response = await stub.Check(check_request(path, headers=headers))
        assert response.status.code == OK, path
        assert list(response.ok_response.headers_to_remove) == ["x-safous-role"], path


async def test_with_jwt_identity_the_app_never_sees_a_forged_username(
        db: Path, start_sidecar, upstream, webhook, tmp_path: Path) -> None:
    webhook.routes["/who"] = answer({"ok": "yes"})
    rule = Rule(name="who", method="POST", url=webhook.url + "/who", body='{"user": "%username%"}',
                actions=(ResponseAction(type=ActionType.STRING, key="ok", value="yes"),))
    seed(db, [rule], [Policy(name="app", rules=("who",))])
    sidecar = await start_sidecar()
    key = SigningKey.generate("test-key-1")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.jwk()]}))
    config = render_config(ENVOY_JWT_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port,
                           extra={JWKS_PATH_LITERAL: str(jwks), **WITHOUT_ENVOY_STRIP})
    async with run_envoy(config, tmp_path) as envoy:
        status, _, body = await http_get(f"{envoy.url}/app/home", headers={
            **bearer(key.sign(claims(groups=None))), "x-safous-username": "mallory",
            "x-safous-groups": "admins", "x-safous-device-id": "laptop-42", "x-safous-role": "admin"})
        assert status == 200, body
    # The decision was made on the token's user, so the forged username header goes. The groups
    # and device headers were what the decision used (the token has no groups claim): they stay.
    assert safous_headers(body) == {"x-safous-groups": "admins", "x-safous-device-id": "laptop-42"}
    assert [json.loads(r["body"]) for r in webhook.seen("/who")] == [{"user": "alice"}]

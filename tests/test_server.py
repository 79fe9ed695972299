"""The gRPC server on port 0: decisions, health, fail-closed paths, reload, activity log."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.attributes import RequestAttributes
from sidecar.check import ROUTE_POLICY_KEY, Checker
from sidecar.db import StoreError
from sidecar.decision import Code, Decision
from sidecar.parameters import IdentityConfig
from sidecar.policies import Policy, PolicyIndex
from sidecar.rules import UnavailableEvaluator
from sidecar.rules.model import Rule
from sidecar.snapshot import Snapshot
from tests.conftest import ExplodingEvaluator, check_request, denial_reason, seed
from tests.helpers import OK, PERMISSION_DENIED, eventually

RULE = Rule(name="posture", url="http://127.0.0.1:9/check")
POLICIES = [
    Policy(name="public", path_prefix="/public", integration=False),
    Policy(name="needs-rule", path_prefix="/app", rules=("posture",)),
    Policy(name="empty", path_prefix="/empty"),
]


async def test_decisions_for_each_kind_of_policy(db: Path, start_sidecar, authz) -> None:
    seed(db, [RULE], POLICIES)
    stub = authz((await start_sidecar(UnavailableEvaluator())).port)

    allowed = await stub.Check(check_request("/public/page"))
    assert allowed.status.code == OK
    assert allowed.HasField("ok_response")

    assert (await stub.Check(check_request("/empty/x"))).status.code == OK

    denied = await stub.Check(check_request("/app/home"))
    assert denied.status.code == PERMISSION_DENIED
    assert denied.denied_response.status.code == 403
    assert denial_reason(denied) == 'policy "needs-rule" needs rule evaluation, which is unavailable'
    body = json.loads(denied.denied_response.body)
    assert body == {"error": "access_denied", "code": "rule_unavailable",
                    "reason": denial_reason(denied), "request_id": "req-app-home"}

    unmatched = await stub.Check(check_request("/other"))
    assert unmatched.status.code == PERMISSION_DENIED
    assert json.loads(unmatched.denied_response.body)["code"] == "no_matching_policy"


async def test_default_action_allow(db: Path, start_sidecar, authz) -> None:
    stub = authz((await start_sidecar(default_action="allow")).port)
    assert (await stub.Check(check_request("/anything"))).status.code == OK


async def test_a_disabled_rule_is_skipped(db: Path, start_sidecar, authz) -> None:
    seed(db, [RULE.model_copy(update={"enabled": False})], POLICIES)
    stub = authz((await start_sidecar()).port)
    response = await stub.Check(check_request("/app/home"))
    assert response.status.code == OK  # its only rule is disabled: the policy has no rules


async def test_an_invalid_rule_denies_its_policy(db: Path, start_sidecar, authz) -> None:
    seed(db, [RULE], POLICIES)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE rules SET actions = '[{\"type\": \"regex\", \"key\": \"a\", \"value\": \"(\"}]'")
    conn.commit()
    stub = authz((await start_sidecar()).port)
    response = await stub.Check(check_request("/app/home"))
    assert response.status.code == PERMISSION_DENIED
    assert json.loads(response.denied_response.body)["code"] == "rule_invalid"
    assert denial_reason(response).startswith('rule "posture" is invalid')
    assert (await stub.Check(check_request("/public/x"))).status.code == OK


async def test_a_policy_without_a_rule_list_in_the_snapshot_denies() -> None:
    # build_snapshot gives every indexed policy an entry; a snapshot that broke that (a bug)
    # must deny, not read the miss as "no rules" and allow.
    policy = Policy(name="app", path_prefix="/app")
    checker = Checker(IdentityConfig(), "allow", UnavailableEvaluator())
    checker.snapshot = Snapshot(version=1, index=PolicyIndex([policy]), policy_rules={})
    for attrs in (RequestAttributes(request_id="r1", method="GET", host="h", path="/app/x"),
                  RequestAttributes(request_id="r2", method="GET", host="h", path="/other",
                                    context_extensions={ROUTE_POLICY_KEY: "app"})):
        decision, _ = await checker.check(attrs)
        assert (decision.allowed, decision.code, decision.policy) == (False, Code.INTERNAL_ERROR, "app")
        assert decision.reason == 'policy "app" has no rule list in the loaded snapshot'


@pytest.mark.parametrize(("path", "canonical"), [
    ("/", True), ("/app", True), ("/app/", True), ("/app/x.y/z", True), ("/a%20b/%3F", True), ("/~user", True),
    ("/public/../admin", False), ("/public/./x", False), ("/..", False), ("/.", False), ("//admin", False),
    ("/app//x", False), ("/public%2F..%2Fadmin", False), ("/a%2fb", False), ("/%61dmin", False), ("/%7Euser", False),
    ("/a%5Cb", False), ("/a\\b", False), ("/%2e%2e/admin", False), ("app", False),
])
async def test_a_path_that_normalises_to_another_is_refused_on_every_edge(path: str, canonical: bool) -> None:
    """Policies match path prefixes: a path a proxy or the app would serve as another is not
    judged as written, whatever the proxy in front did (Envoy's shipped configs normalise; a
    forward-auth proxy passes the client's own bytes)."""
    checker = Checker(IdentityConfig(), "allow", UnavailableEvaluator())
    checker.snapshot = Snapshot(version=1, index=PolicyIndex([Policy(name="public", path_prefix="/public",
                                                                     integration=False)]), policy_rules={"public": ()})
    decision, _ = await checker.check(RequestAttributes(request_id="r", method="GET", host="h", path=path))
    refused = (decision.allowed, decision.code) == (False, Code.PATH_NOT_CANONICAL)
    assert refused is not canonical


async def test_an_exception_inside_a_check_is_an_internal_error_deny(db: Path, start_sidecar, authz) -> None:
    seed(db, [RULE], POLICIES)
    stub = authz((await start_sidecar(ExplodingEvaluator())).port)
    response = await stub.Check(check_request("/app/x"))
    assert response.status.code == PERMISSION_DENIED
    assert json.loads(response.denied_response.body)["code"] == "internal_error"


async def test_garbage_on_the_wire_never_allows(db: Path, start_sidecar, authz) -> None:
    seed(db, [], [Policy(name="all", integration=False)])  # allows whatever it can read
    sidecar = await start_sidecar()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        call = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"\xff\xff\xff\xff garbage")
    # No CheckResponse at all, so no decision: gRPC's own error, which Envoy turns into a 403.
    assert err.value.code() is grpc.StatusCode.UNKNOWN
    assert "Error parsing message" in (err.value.details() or "")
    assert (await authz(sidecar.port).Check(check_request("/"))).status.code == OK  # still serving
    await sidecar.stop(grace=1)
    assert sidecar.activity.written == 1  # only the well-formed check was decided


async def test_reason_header_is_single_line_ascii(db: Path, start_sidecar, authz) -> None:
    class Nasty(UnavailableEvaluator):
        async def evaluate(self, policy, rules, params) -> Decision:
            return Decision.deny(Code.VALUE_MISMATCH, "bad\r\nx-injected: 1 ☃ " + "y" * 1000, policy.name)

    seed(db, [RULE], POLICIES)
    stub = authz((await start_sidecar(Nasty())).port)
    reason = denial_reason(await stub.Check(check_request("/app")))
    assert reason.isascii() and reason.isprintable()
    assert "\r" not in reason and "\n" not in reason and len(reason) <= 256
    assert reason.startswith("bad x-injected: 1 ")


async def test_health_is_serving_once_rules_are_loaded(db: Path, start_sidecar) -> None:
    sidecar = await start_sidecar()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_start_fails_clearly_when_rules_db_cannot_be_created(tmp_path: Path, start_sidecar) -> None:
    bad = tmp_path / "dir.db"
    bad.mkdir()  # a directory where the database should be
    with pytest.raises(StoreError, match=r"dir\.db"):
        await start_sidecar(db=bad)


async def test_rule_changes_are_picked_up_without_restart(db: Path, start_sidecar, authz) -> None:
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    assert (await stub.Check(check_request("/public/x"))).status.code == PERMISSION_DENIED
    version = sidecar.checker.snapshot.version
    seed(db, [RULE], POLICIES)
    await eventually(lambda: sidecar.checker.snapshot.version > version, what="a reload")
    assert (await stub.Check(check_request("/public/x"))).status.code == OK
    # Activity-log writes are commits too, but must not cause reloads: once they are written,
    # the watcher polls rules.db twice more (each poll sees their commits) and keeps the snapshot.
    version = sidecar.checker.snapshot.version
    polls = count_polls(sidecar)
    for _ in range(5):
        await stub.Check(check_request("/public/x"))
    await eventually(lambda: sidecar.activity.written == 2 + 5, what="the activity writes")
    after_writes = polls[0]
    await eventually(lambda: polls[0] >= after_writes + 2, what="two more polls")
    assert sidecar.checker.snapshot.version == version


def count_polls(sidecar) -> list[int]:
    """Counts the rules watcher's finished polls of rules.db (in ``[0]``) from now on."""
    polls = [0]
    load = sidecar.watcher.load

    async def counted(**options):
        try:
            return await load(**options)
        finally:
            polls[0] += 1

    sidecar.watcher.load = counted
    return polls


async def test_every_decision_reaches_the_activity_log(db: Path, start_sidecar, authz) -> None:
    seed(db, [RULE], POLICIES)
    sidecar = await start_sidecar(UnavailableEvaluator())
    stub = authz(sidecar.port)
    await stub.Check(check_request("/public/a", headers={"x-safous-username": "alice"}))
    await stub.Check(check_request("/app/b", source_ip="2001:db8::1"))
    await stub.Check(check_request("/nowhere", method="POST"))
    await sidecar.stop(grace=1)
    rows = sqlite3.connect(db).execute(
        "SELECT request_id, username, source_ip, host, path, method, policy, allowed, code, status "
        "FROM activity_log ORDER BY id").fetchall()
    assert rows == [
        ("req-public-a", "alice", "203.0.113.7", "app.example.com", "/public/a", "GET", "public", 1,
         "integration_off", 'policy "public": integration is off'),
        ("req-app-b", "", "2001:db8::1", "app.example.com", "/app/b", "GET", "needs-rule", 0,
         "rule_unavailable", 'policy "needs-rule" needs rule evaluation, which is unavailable'),
        ("req-nowhere", "", "203.0.113.7", "app.example.com", "/nowhere", "POST", None, 0,
         "no_matching_policy", "no policy matches this request"),
    ]

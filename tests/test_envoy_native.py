"""Envoy-native integration through a real Envoy on the shipped envoy/envoy.yaml: the decision
in Envoy's own access log, a policy bound by the route, a route without authorization."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.conftest import answer, seed
from tests.envoy_harness import ENVOY_YAML, access_log, render_config, run_envoy
from tests.helpers import http_get as get

# Host-agnostic policies; "reports" matches nothing by itself (another host): only the
# /reports/ route, which binds it, reaches it.
POLICIES = [
    Policy(name="app", path_prefix="/app", rules=("posture",)),
    Policy(name="reports", hosts=("reports.internal",), rules=("posture",)),
]


def posture(url: str) -> Rule:
    return Rule(name="posture", url=url + "/posture?u=%username%",
                actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),))


async def test_decisions_reach_envoys_access_log_and_routes_bind_policies(
        db: Path, start_sidecar: Any, upstream: Any, webhook: Any, tmp_path: Path) -> None:
    webhook.routes["/posture"] = answer({"status": "active"})
    seed(db, [posture(webhook.url)], POLICIES)
    sidecar = await start_sidecar()
    config = render_config(ENVOY_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        ok, _, _ = await get(f"{envoy.url}/app/a")
        webhook.routes["/posture"] = answer({"status": "inactive"})
        denied, _, denied_body = await get(f"{envoy.url}/app/b")
        bound, _, _ = await get(f"{envoy.url}/reports/q1")
        nomatch, _, _ = await get(f"{envoy.url}/other")
        calls_before = len(webhook.seen("/posture"))
        health, _, _ = await get(f"{envoy.url}/healthz")
        lines = await access_log(envoy, 5)

    assert (ok, denied, bound, nomatch, health) == (200, 403, 403, 403, 200)
    assert len(webhook.seen("/posture")) == calls_before  # /healthz: no check, no webhook call
    by_path = {line["path"]: line for line in lines}
    fields = ("status", "authz_decision", "authz_code", "authz_policy", "authz_policy_source")
    assert {k: by_path["/app/a"][k] for k in fields} == {
        "status": 200, "authz_decision": "allow", "authz_code": "rules_passed", "authz_policy": "app",
        "authz_policy_source": "match"}
    assert {k: by_path["/app/b"][k] for k in (*fields, "authz_reason", "request_id")} == {
        "status": 403, "authz_decision": "deny", "authz_code": "value_mismatch", "authz_policy": "app",
        "authz_policy_source": "match",
        "authz_reason": 'rule "posture": status is "inactive", expected "active"',
        # The request id Envoy logs is the one the client, and the activity log, see.
        "request_id": json.loads(denied_body)["request_id"]}
    # The route bound "reports" although neither host nor path match it.
    assert {k: by_path["/reports/q1"][k] for k in fields} == {
        "status": 403, "authz_decision": "deny", "authz_code": "value_mismatch", "authz_policy": "reports",
        "authz_policy_source": "route"}
    assert {k: by_path["/other"][k] for k in fields} == {
        "status": 403, "authz_decision": "deny", "authz_code": "no_matching_policy", "authz_policy": "",
        "authz_policy_source": "match"}
    # No check on a route with ext_authz disabled: no decision in the line.
    assert {k: by_path["/healthz"][k] for k in fields} == {
        "status": 200, "authz_decision": None, "authz_code": None, "authz_policy": None,
        "authz_policy_source": None}

    # The activity log says how each policy was chosen, under the request id Envoy logged.
    await sidecar.stop(grace=1)  # flushes the activity log
    with contextlib.closing(sqlite3.connect(db)) as conn:
        recorded = conn.execute("SELECT request_id, path, policy, policy_source, code FROM activity_log "
                                "ORDER BY id").fetchall()
    assert [row[1:] for row in recorded] == [
        ("/app/a", "app", "match", "rules_passed"),
        ("/app/b", "app", "match", "value_mismatch"),
        ("/reports/q1", "reports", "route", "value_mismatch"),
        ("/other", None, "match", "no_matching_policy"),
    ]
    assert [row[0] for row in recorded] == [by_path[row[1]]["authz_request_id"] for row in recorded]


async def test_a_route_bound_to_a_disabled_or_unknown_policy_denies(
        db: Path, start_sidecar: Any, upstream: Any, webhook: Any, tmp_path: Path) -> None:
    webhook.routes["/posture"] = answer({"status": "active"})
    seed(db, [posture(webhook.url)], POLICIES)
    sidecar = await start_sidecar(default_action="allow")  # never applies to a bound route
    config = render_config(ENVOY_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:

        async def reason_for(path: str, expected: str) -> str:
            deadline = time.monotonic() + 5
            while True:  # the sidecar reloads rules.db every 50 ms
                status, headers, body = await get(envoy.url + path)
                code = json.loads(body)["code"] if status == 403 else "allowed"
                if code == expected or time.monotonic() > deadline:
                    assert code == expected
                    return headers["x-safous-denial-reason"] if status == 403 else ""
                await asyncio.sleep(0.05)

        await reason_for("/reports/x", "allowed")
        conn = sqlite3.connect(db)
        conn.execute("UPDATE policies SET enabled = 0 WHERE name = 'reports'")
        conn.commit()
        assert await reason_for("/reports/x", "policy_disabled") == (
            'policy "reports", bound by the route, is disabled')
        conn.execute("DELETE FROM policies WHERE name = 'reports'")
        conn.commit()
        conn.close()
        assert await reason_for("/reports/x", "unknown_policy") == (
            'policy "reports", bound by the route, does not exist')
        # Unbound requests still get the default action.
        assert (await get(envoy.url + "/other"))[0] == 200

"""Audit-mode policies through a real Envoy: the rules run, the request is allowed whatever they
say, and the would-be denial is recorded everywhere an admin or the app looks."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.admin_cli import admin
from tests.conftest import ExplodingEvaluator, answer, check_request, seed
from tests.envoy_harness import ENVOY_YAML, access_log, render_config, run_envoy
from tests.helpers import eventually, http_get, metric, ops_get

REASON = 'rule "new-check": status is "inactive", expected "active"'


async def test_an_audit_mode_policy_allows_records_and_can_be_enforced(
        db: Path, start_sidecar: Any, upstream: Any, webhook: Any, tmp_path: Path) -> None:
    webhook.routes["/check"] = answer({"status": "inactive"})
    rule = Rule(name="new-check", url=webhook.url + "/check?u=%username%",
                actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),))
    seed(db, [rule], [Policy(name="app", path_prefix="/app", rules=("new-check",), mode="audit")])
    sidecar = await start_sidecar(http="127.0.0.1:0")
    config = render_config(ENVOY_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        status, _, body = await http_get(f"{envoy.url}/app/report")
        assert status == 200  # allowed although the rule does not hold
        seen = dict(json.loads(body)["headers"])
        assert seen["x-safous-audit-deny"] == "value_mismatch"  # the app may show a banner

        # The admin switches it to enforce: within --reload-interval (50 ms here), and so well
        # within a second, the same request is denied.
        assert admin(db, "policy", "edit", "app", "--mode", "enforce").exit_code == 0
        switched = time.monotonic()

        async def denied() -> bool:
            return (await http_get(f"{envoy.url}/app/report"))[0] == 403

        await eventually(denied, timeout=2, interval=0.02)
        assert time.monotonic() - switched < 1
        lines = await access_log(envoy, 2)

    assert [line["authz_decision"] for line in lines if line["path"] == "/app/report"][:1] == ["audit_deny"]
    assert lines[0]["authz_code"] == "value_mismatch" and lines[0]["authz_reason"] == REASON

    async def counted() -> float:
        page = (await ops_get(sidecar.ops.port, "/metrics"))[1]
        return metric(page, "safous_decisions_total", default=0, policy="app", result="audit_deny",
                      code="value_mismatch")

    await eventually(counted)  # served on /metrics
    await sidecar.stop(grace=1)
    # Read once every decision is recorded: stop() flushes the last batch into the metrics, and
    # a check may have been counted after the scrape above.
    audit_denies = metric(sidecar.metrics.exposition().decode(), "safous_decisions_total", default=0,
                          policy="app", result="audit_deny", code="value_mismatch")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT allowed, audit_deny, code, status FROM activity_log ORDER BY id").fetchall()
    # Every check before the switch took effect is an audit_deny; every one after, a deny.
    assert rows[0] == (1, 1, "value_mismatch", REASON)
    assert rows[-1] == (0, 0, "value_mismatch", REASON)
    assert set(rows) == {(1, 1, "value_mismatch", REASON), (0, 0, "value_mismatch", REASON)}
    assert sum(row[1] for row in rows) == audit_denies

    would = admin(db, "logs", "activity", "--would-deny", "--json")
    assert [json.loads(line)["audit_deny"] for line in would.stdout.splitlines()] == [True] * int(audit_denies)
    audited = [json.loads(line) for line in admin(db, "logs", "audit", "--json").stdout.splitlines()]
    change = next(entry for entry in audited if entry["action"] == "edit" and entry["object_name"] == "app")
    assert (change["before"]["mode"], change["after"]["mode"]) == ("audit", "enforce")


async def test_audit_mode_never_turns_an_internal_failure_into_an_allow(
        db: Path, start_sidecar: Any, authz: Any) -> None:
    """Only the policy's own decision is audited: an internal failure while evaluating its
    rules, or no policy at all, still deny."""
    seed(db, [Rule(name="r", url="http://127.0.0.1:9/r")],
         [Policy(name="app", path_prefix="/app", mode="audit"),
          Policy(name="ruled", path_prefix="/ruled", mode="audit", rules=("r",))])
    sidecar = await start_sidecar(ExplodingEvaluator())
    stub = authz(sidecar.port)
    nothing = await stub.Check(check_request("/other"))
    assert nothing.status.code == 7
    failed = await stub.Check(check_request("/ruled/x"))
    assert failed.status.code == 7 and json.loads(failed.denied_response.body)["code"] == "internal_error"
    allowed = await stub.Check(check_request("/app/x"))
    assert allowed.status.code == 0 and not any(
        h.header.key == "x-safous-audit-deny" for h in allowed.ok_response.headers)

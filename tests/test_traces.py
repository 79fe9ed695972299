"""The trace behind a denial: kept off the request path, bounded, pruned with the activity log,
read back by ``safous-admin explain`` — and never holding a secret."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from sidecar import db as rules_db
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, AuthType, ResponseAction, Rule
from tests.conftest import answer, check_request, seed
from tests.helpers import eventually
from tests.test_admin import admin

SECRET = "s3cr3t-static-token"
PASSWORD = "pa55-word-in-clear"
USER_TOKEN = "eyJ.user-token.sig"


def rules(url: str) -> list[Rule]:
    return [
        Rule(name="posture", url=url + "/posture?u=%username%", auth=AuthType.BASIC, username="sidecar",
             password=PASSWORD, headers=(("Authorization", f"Bearer {SECRET}"), ("X-Trace", "%username%"),
                                         ("X-Subject-Token", "%headers.authorization%")),
             actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),)),
        Rule(name="groups", url=url + "/groups", cache_ttl=60,
             actions=(ResponseAction(type=ActionType.REGEX, key="groups", value="^eng"),)),
    ]


async def test_explain_shows_the_evidence_of_a_real_denial_without_a_secret(
        db: Path, start_sidecar: Any, authz: Any, webhook: Any) -> None:
    webhook.routes["/posture"] = answer({"status": "unknown", "detail": "device not enrolled"})
    webhook.routes["/groups"] = answer({"groups": "eng,ops"})
    seed(db, rules(webhook.url), [Policy(name="app", path_prefix="/app", rules=("groups", "posture")),
                                  Policy(name="open", path_prefix="/other", integration=False)])
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    await stub.Check(check_request("/app/warm", headers={"x-request-id": "warm"}))  # fills the groups cache
    response = await stub.Check(check_request("/app/x", headers={"x-request-id": "req-alice",
                                                                "x-safous-username": "alice",
                                                                "authorization": f"Bearer {USER_TOKEN}"}))
    assert response.status.code == 7
    allowed_policy_check = await stub.Check(check_request("/other", headers={"x-request-id": "req-other"}))
    assert allowed_policy_check.status.code == 0

    def traced() -> bool:
        return rules_db.read_trace(rules_db.connect(db, readonly=True), "req-alice") is not None

    await eventually(traced)
    report = admin(db, "explain", "req-alice")
    assert report.exit_code == 0, report.output
    text = report.stdout
    assert 'decision deny (value_mismatch), policy "app"' in text
    assert 'rule 1 "groups": held (cache' in text
    assert 'rule 2 "posture": value_mismatch (call' in text
    assert "  request  GET " + webhook.url + "/posture?u=alice" in text
    assert "           X-Trace: alice" in text and "           Authorization: ••••••" in text
    # The client's own credentials a rule forwards are masked too.
    assert "           X-Subject-Token: ••••••" in text
    assert '{"status": "unknown", "detail": "device not enrolled"}' in text
    assert '  reason   rule "posture": status is "unknown", expected "active"' in text
    # Each response action's verdict: the one that failed, the ones that held.
    assert '  action   regex groups "^eng": held' in text
    assert '  action   string status "active": failed' in text
    doc = json.loads(admin(db, "explain", "req-alice", "--json").stdout)
    assert [r["outcome"] for r in doc["rules"]] == ["held", "value_mismatch"]
    assert [[a["verdict"] for a in r["actions"]] for r in doc["rules"]] == [["held"], ["failed"]]
    # No secret anywhere the traces are stored, nor in what explain shows.
    with sqlite3.connect(db) as conn:
        stored = " ".join(doc for (doc,) in conn.execute("SELECT doc FROM traces"))
    for secret in (SECRET, PASSWORD, USER_TOKEN):
        assert secret not in stored and secret not in text
    assert admin(db, "explain", "no-such-request").exit_code == 1
    # The activity log says which rows have a trace (denials, with --trace denied).
    lines = [json.loads(line) for line in admin(db, "logs", "activity", "--json").stdout.splitlines()]
    assert {line["request_id"]: line["trace"] for line in lines} == {
        "req-other": False, "req-alice": True, "warm": True}


async def test_traces_stay_bounded_and_are_pruned_with_the_activity_log(
        db: Path, start_sidecar: Any, authz: Any, webhook: Any) -> None:
    big = {"status": "inactive", "padding": "p" * 200_000}
    webhook.routes["/posture"] = answer(big)
    webhook.routes["/groups"] = answer({"groups": "eng"})
    seed(db, rules(webhook.url), [Policy(name="app", path_prefix="/app", rules=("groups", "posture"))])
    sidecar = await start_sidecar(activity_retention_rows=10)
    stub = authz(sidecar.port)
    for i in range(40):
        assert (await stub.Check(check_request("/app/x", headers={"x-request-id": f"r{i}"}))).status.code == 7

    def written() -> bool:
        return sidecar.activity.written == 40

    await eventually(written)
    with sqlite3.connect(db) as conn:
        sizes = [n for (n,) in conn.execute("SELECT length(CAST(doc AS BLOB)) FROM traces")]
    assert len(sizes) == 40 and max(sizes) <= rules_db.activity.TRACE_MAX_BYTES
    await sidecar.retention.prune_now()
    with sqlite3.connect(db) as conn:
        kept = conn.execute("SELECT count(*) FROM traces").fetchone()[0]
        orphans = conn.execute("SELECT count(*) FROM traces WHERE activity_id NOT IN "
                               "(SELECT id FROM activity_log)").fetchone()[0]
    assert (kept, orphans) == (10, 0)

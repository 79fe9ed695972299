"""The trace behind a denial: kept off the request path, bounded, pruned with the activity log,
read back by ``safous-admin explain`` — and never holding a secret."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar import db as rules_db
from sidecar.activity import ActivityLog
from sidecar.db import ActivityRecord
from sidecar.policies import Policy
from sidecar.rules import trace
from sidecar.rules.model import ActionType, AuthType, ResponseAction, Rule
from tests.admin_cli import admin
from tests.conftest import answer, check_request, seed
from tests.helpers import eventually, metric, ops_get

SECRET = "s3cr3t-static-token"
PASSWORD = "pa55-word-in-clear"
USER_TOKEN = "eyJ.user-token.sig"
# What the Basic authentication of the posture rule sends: never in a trace either.
BASIC = base64.b64encode(f"sidecar:{PASSWORD}".encode()).decode()


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
    for secret in (SECRET, PASSWORD, USER_TOKEN, BASIC):
        assert secret not in stored and secret not in text
    # The webhook did get them: the search above looked for what was really sent.
    sent = webhook.seen("/posture")[-1]  # alice's
    assert sent["headers"]["authorization"] == f"Basic {BASIC}"
    assert sent["headers"]["x-subject-token"] == f"Bearer {USER_TOKEN}"
    assert admin(db, "explain", "no-such-request").exit_code == 1
    # The activity log says which rows have a trace (denials, with --trace denied).
    lines = [json.loads(line) for line in admin(db, "logs", "activity", "--json").stdout.splitlines()]
    assert {line["request_id"]: line["trace"] for line in lines} == {
        "req-other": False, "req-alice": True, "warm": True}


async def test_traces_stay_bounded_and_are_pruned_with_the_activity_log(
        db: Path, start_sidecar: Any, authz: Any, webhook: Any) -> None:
    """Hundreds of denials at once, each with a 200 KB answer, some sharing a webhook call."""
    big = {"status": "inactive", "padding": "p" * 200_000}
    webhook.routes["/posture"] = answer(big, delay=0.05)
    webhook.routes["/groups"] = answer({"groups": "eng"})
    seed(db, rules(webhook.url), [Policy(name="app", path_prefix="/app", rules=("groups", "posture"))])
    sidecar = await start_sidecar(activity_retention_rows=10, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    checks = 300
    responses = await asyncio.gather(*(stub.Check(check_request(
        "/app/x", headers={"x-request-id": f"r{i}", "x-safous-username": f"user{i % 7}"})) for i in range(checks)))
    assert [r.status.code for r in responses] == [7] * checks

    def written() -> bool:
        return sidecar.activity.written == checks

    await eventually(written, timeout=20)
    assert sidecar.activity.trace_bytes == 0  # all written: no trace is held any more
    page = (await ops_get(sidecar.ops.port, "/metrics"))[1]
    assert metric(page, "safous_traces_dropped_total") == 0
    with sqlite3.connect(db) as conn:
        sizes = [n for (n,) in conn.execute("SELECT length(CAST(doc AS BLOB)) FROM traces")]
        # Retention's first run may come while the checks are still being written: every
        # row it left has its trace.
        untraced = conn.execute("SELECT count(*) FROM activity_log WHERE id NOT IN "
                                "(SELECT activity_id FROM traces)").fetchone()[0]
        docs = [json.loads(doc) for (doc,) in conn.execute("SELECT doc FROM traces")]
    assert sizes and untraced == 0 and max(sizes) <= rules_db.activity.TRACE_MAX_BYTES
    # Identical calls made at the same moment were made once (fewer calls than checks), and each
    # trace kept says whether its check made the call or shared another's (which rows retention
    # keeps is not fixed: tests/test_rules_review.py proves a shared rule's trace).
    sources = {r["source"] for doc in docs for r in doc["rules"] if r["rule"] == "posture"}
    assert sources <= {"call", "shared"}
    assert len(webhook.seen("/posture")) < checks
    await sidecar.retention.prune_now()
    with sqlite3.connect(db) as conn:
        kept = conn.execute("SELECT count(*) FROM traces").fetchone()[0]
        orphans = conn.execute("SELECT count(*) FROM traces WHERE activity_id NOT IN "
                               "(SELECT id FROM activity_log)").fetchone()[0]
    assert (kept, orphans) == (10, 0)


def traced_rows(db: Path) -> dict[str, bool]:
    lines = admin(db, "logs", "activity", "--json").stdout.splitlines()
    return {line["request_id"]: line["trace"] for line in map(json.loads, lines)}


@pytest.mark.parametrize("setting", ["all", "off"])
async def test_trace_all_keeps_every_decision_and_off_none(
        setting: str, db: Path, start_sidecar: Any, authz: Any, webhook: Any) -> None:
    webhook.routes["/ok"] = answer({"status": "active"})
    webhook.routes["/no"] = answer({"status": "inactive"})
    active = (ResponseAction(type=ActionType.STRING, key="status", value="active"),)
    seed(db, [Rule(name="ok", url=webhook.url + "/ok", actions=active),
              Rule(name="no", url=webhook.url + "/no", actions=active)],
         [Policy(name="open", path_prefix="/open", rules=("ok",)),
          Policy(name="closed", path_prefix="/closed", rules=("no",))])
    sidecar = await start_sidecar(trace=setting)
    stub = authz(sidecar.port)
    assert (await stub.Check(check_request("/open", headers={"x-request-id": "allowed"}))).status.code == 0
    assert (await stub.Check(check_request("/closed", headers={"x-request-id": "denied"}))).status.code == 7
    await eventually(lambda: sidecar.activity.written == 2)
    kept = setting == "all"
    assert traced_rows(db) == {"allowed": kept, "denied": kept}
    report = admin(db, "explain", "allowed")
    if kept:
        assert 'decision allow (rules_passed), policy "open"' in report.stdout
        assert 'rule 1 "ok": held (call' in report.stdout
    else:
        assert report.exit_code == 1
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM traces").fetchone()[0] == 0


async def test_a_trace_lists_the_rules_that_ran_whatever_a_reload_does_meanwhile(
        db: Path, start_sidecar: Any, authz: Any, webhook: Any) -> None:
    """The policy loses a rule while a check of it waits on a slow webhook: the check ran both
    rules, and its trace shows both."""
    slow_started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        slow_started.set()
        await release.wait()
        return web.json_response({"status": "inactive"})

    webhook.routes["/first"] = answer({"status": "active"})
    webhook.routes["/slow"] = slow
    active = (ResponseAction(type=ActionType.STRING, key="status", value="active"),)
    seed(db, [Rule(name="first", url=webhook.url + "/first", actions=active),
              Rule(name="slow", url=webhook.url + "/slow", timeout_ms=10_000, actions=active)],
         [Policy(name="app", path_prefix="/app", rules=("first", "slow"))])
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    check = asyncio.ensure_future(stub.Check(check_request("/app/x", headers={"x-request-id": "during"})))
    await asyncio.wait_for(slow_started.wait(), 5)
    assert admin(db, "policy", "edit", "app", "--rule", "slow").exit_code == 0

    def reloaded() -> bool:
        snapshot = sidecar.checker.snapshot
        policy = snapshot.index.named("app") if snapshot else None
        return policy is not None and policy.rules == ("slow",)

    await eventually(reloaded)
    release.set()
    assert (await check).status.code == 7
    await eventually(lambda: sidecar.activity.written == 1)
    doc = json.loads(admin(db, "explain", "during", "--json").stdout)
    assert [(r["rule"], r["outcome"]) for r in doc["rules"]] == [("first", "held"), ("slow", "value_mismatch")]


def traced_record(n: int) -> ActivityRecord:
    return ActivityRecord(at=1_800_000_000.0 + n, request_id=f"r{n}", username="alice", source_ip="203.0.113.7",
                          host="app.example.com", path="/app", method="GET", policy="app", allowed=False,
                          code="value_mismatch", status="denied", latency_ms=1.0,
                          trace=lambda: {"rules": [], "n": n})


async def test_traces_awaiting_the_activity_log_stay_within_their_byte_bound(
        db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Decisions keep coming while the database refuses writes: their traces, held until
    written, stay within the bound (the decisions are kept, without their traces), and the
    bound frees up once the database takes the writes again."""
    activity = ActivityLog(db, flush_interval=0.02, max_trace_bytes=100_000)
    activity.start()
    away = tmp_path / "away.db"
    db.rename(away)  # rules.db missing for a moment: every write fails
    try:
        for n in range(6):
            activity.record_traced(traced_record(n), 30_000)
        assert (activity.trace_bytes, activity.traces_dropped) == (90_000, 3)
        # The refused batch goes back to the list, its traces still held.
        await eventually(lambda: "6 decisions kept for the next try" in caplog.text, timeout=5)
        assert activity.depth == 6 and activity.written == 0
        activity.record_traced(traced_record(6), 30_000)
        assert (activity.trace_bytes, activity.traces_dropped) == (90_000, 4)
    finally:
        away.rename(db)
    await eventually(lambda: activity.written == 7, timeout=10)
    assert activity.trace_bytes == 0
    activity.record_traced(traced_record(7), 30_000)
    await activity.close()
    assert (activity.written, activity.dropped, activity.traces_dropped) == (8, 0, 4)
    with sqlite3.connect(db) as conn:
        traced = conn.execute("SELECT a.request_id FROM traces t JOIN activity_log a ON a.id = t.activity_id "
                              "ORDER BY a.id").fetchall()
    assert [r for (r,) in traced] == ["r0", "r1", "r2", "r7"]


def test_a_trace_too_large_keeps_the_rule_that_failed() -> None:
    """Rules are dropped from a trace over its bound, but the failing one, the evidence for
    the denial, goes last: it is often the last rule of the policy."""
    def rule(name: str, outcome: str) -> dict[str, Any]:
        return {"rule": name, "source": "call", "outcome": outcome,
                "request": {"method": "GET", "url": "https://hooks.example.com/" + "u" * 1500, "headers": []}}

    rules = [rule(f"r{i:02}", "held") for i in range(20)] + [rule("last", "value_mismatch")]
    stored = json.loads(rules_db.activity.trace_json({"request_id": "r1", "rules": rules}))
    kept = [r["rule"] for r in stored["rules"]]
    assert stored["cut"] is True and kept[-1] == "last" and kept[:-1] == sorted(kept[:-1])
    assert "r00" in kept and len(kept) < 21


def test_a_counting_trace_notes_cache_hits_only() -> None:
    """With traces off, a span still counts the rules answered from the cache: its trace
    notes those and nothing else, so no webhook request is masked and kept for nothing."""
    async def check() -> tuple[list[str], bool]:
        counting = trace.start(evidence=False)
        call = trace.note("posture", "call")
        trace.note("groups", "cache")
        return [r.source for r in counting.rules.values()], call is None

    assert asyncio.run(check()) == (["cache"], True)

    async def full() -> list[str]:
        kept = trace.start()
        trace.note("posture", "call")
        trace.note("groups", "cache")
        return [r.source for r in kept.rules.values()]

    assert asyncio.run(full()) == ["call", "cache"]

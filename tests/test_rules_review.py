"""The rule evaluator as a check sees it: what its trace keeps, how it reports a rule it never
ran, and that a judging process it cannot start fails the rule instead of the check.

Webhooks are real aiohttp servers on loopback (port 0), or a port that refuses connections.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sidecar.decision import Code, Decision
from sidecar.parameters import Parameters
from sidecar.policies import Policy
from sidecar.rules import judge, trace
from sidecar.rules.cache import DecisionCache
from sidecar.rules.client import WebhookClient
from sidecar.rules.evaluator import WebhookEvaluator
from sidecar.rules.judge import INLINE_BYTES
from sidecar.rules.model import Rule
from tests.conftest import ACTIVE
from tests.helpers import FakeClock, closed_port, eventually, serving


@pytest.fixture
async def evaluator() -> AsyncIterator[WebhookEvaluator]:
    evaluator = WebhookEvaluator(WebhookClient())
    await evaluator.start()
    try:
        yield evaluator
    finally:
        await evaluator.close()


def params(username: str = "alice", **headers: str) -> Parameters:
    return Parameters(values={"username": username}, headers=headers)


async def decide(evaluator: WebhookEvaluator, rules: list[Rule],
                 values: Parameters) -> tuple[Decision, trace.CheckTrace]:
    """The decision on ``rules`` (one policy, in order) and the check's trace."""
    check_trace = trace.start()
    policy = Policy(name="app", path_prefix="/app", rules=tuple(r.name for r in rules))
    decision = await evaluator.evaluate(policy, [evaluator.compile(r) for r in rules], values)
    return decision, check_trace


# --- what a trace keeps ------------------------------------------------------------------

async def test_a_trace_keeps_a_cut_copy_of_a_huge_request(evaluator: WebhookEvaluator) -> None:
    """A client's 60 KB header value rendered into the query, 70 headers and the body: the
    trace holds, and its document shows, a bounded share of each."""
    huge = "u" * 60_000
    headers = (("Authorization", "Bearer static-secret"), ("X-Subject", "%headers.authorization%"),
               *((f"X-Copy-{i}", "%username%") for i in range(70)))
    with closed_port() as port:
        rule = Rule(name="huge", method="POST", url=f"http://127.0.0.1:{port}/hook?u=%username%",
                    headers=headers, body='{"user": "%username%"}', actions=ACTIVE)
        decision, check_trace = await decide(evaluator, [rule], params(huge, authorization="Bearer user-token"))

    assert not decision.allowed and decision.code == Code.WEBHOOK_UNREACHABLE
    [document] = check_trace.document(["huge"])["rules"]
    request = document["request"]
    assert request["method"] == "POST"
    prefix = f"http://127.0.0.1:{port}/hook?u="
    assert request["url"] == prefix + "u" * (trace.URL_CHARS - len(prefix)) + "…"
    # The first 64 headers, each value cut; then how many more there were.
    names = [name for name, _ in request["headers"]]
    assert names[:3] == ["Authorization", "X-Subject", "X-Copy-0"]
    assert len(names) == trace.MAX_HEADERS + 1
    assert request["headers"][-1] == ["…", f"{len(headers) + 1 - trace.MAX_HEADERS} more headers, not kept"]
    assert request["headers"][2] == ["X-Copy-0", "u" * trace.HEADER_CHARS + "…"]
    # Secrets masked as ever: the rule's own credentials and the client's forwarded ones.
    assert request["headers"][:2] == [["Authorization", trace.MASK], ["X-Subject", trace.MASK]]
    assert request["body"] == '{"user": "' + "u" * (trace.EXCERPT_BYTES - 10) + "…"
    # And that is all the trace holds until the activity writer builds the document.
    kept = check_trace.rules["huge"].request
    assert len(kept.url) <= trace.URL_CHARS + 1 and len(kept.body) == trace.EXCERPT_BYTES + 1
    assert sum(len(name) + len(value) for name, value in kept.headers) < 64 * (trace.HEADER_CHARS + 20)


async def test_a_credential_rendered_into_the_url_or_body_is_still_masked(evaluator: WebhookEvaluator) -> None:
    with closed_port() as port:
        rule = Rule(name="intro", method="POST", url=f"http://127.0.0.1:{port}/i?t=%headers.cookie%",
                    body='{"t": "%headers.authorization%"}', actions=ACTIVE)
        _, check_trace = await decide(evaluator, [rule], params(authorization="Bearer t0k", cookie="s=1"))
    [document] = check_trace.document()["rules"]
    assert (document["request"]["url"], document["request"]["body"]) == (trace.MASK, trace.MASK)
    assert "t0k" not in json.dumps(document) and "s=1" not in json.dumps(document)


# --- a rule cancelled because an earlier one failed ---------------------------------------

async def test_a_rule_cancelled_by_an_earlier_failure_is_traced_as_not_run(evaluator: WebhookEvaluator) -> None:
    slow_started = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/slow":
            slow_started.set()
            await asyncio.sleep(10)
            return web.json_response({"status": "active"})
        await slow_started.wait()  # the slow rule's call is under way when this one fails
        return web.json_response({"status": "inactive"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving(app, handler_cancellation=True, shutdown_timeout=0.5) as port:
        url = f"http://127.0.0.1:{port}"
        rules = [Rule(name="fast", url=url + "/fast", actions=ACTIVE),
                 Rule(name="slow", url=url + "/slow", timeout_ms=10_000, actions=ACTIVE)]
        started = asyncio.get_running_loop().time()
        decision, check_trace = await decide(evaluator, rules, params())
        assert asyncio.get_running_loop().time() - started < 5

        assert decision.code == Code.VALUE_MISMATCH
        assert decision.reason == 'rule "fast": status is "inactive", expected "active"'

        def outcomes() -> list[tuple[str, str, str]]:
            return [(r["rule"], r["source"], r["outcome"]) for r in check_trace.document(["fast", "slow"])["rules"]]

        # The cancelled call ends within a loop turn or two of the decision; the activity
        # writer builds the document later still.
        await eventually(lambda: outcomes()[1][1] != "call", timeout=2, what="the slow call's end")
        assert outcomes() == [("fast", "call", "value_mismatch"), ("slow", "not run", "not run")]
        slow = check_trace.document(["fast", "slow"])["rules"][1]
        assert [a["verdict"] for a in slow["actions"]] == ["not checked"]


# --- a webhook call shared by two checks (single flight) ----------------------------------

async def test_a_shared_call_is_traced_for_each_check_as_it_was_for_that_check(
        evaluator: WebhookEvaluator) -> None:
    """Check A starts the slow rule's call, check B joins it; A is decided by a failing fast
    rule meanwhile. For A the slow rule was not run, whatever the call, which goes on for B,
    answers later; for B it was shared: the request it would have sent (masked) and how long it
    waited."""
    slow_started, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        if request.path == "/slow":
            slow_started.set()
            await release.wait()
            return web.json_response({"status": "active"})
        await slow_started.wait()
        return web.json_response({"status": "inactive"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving(app, handler_cancellation=True, shutdown_timeout=0.5) as port:
        url = f"http://127.0.0.1:{port}"
        fast = Rule(name="fast", url=url + "/fast", actions=ACTIVE)
        slow = Rule(name="slow", url=url + "/slow?u=%username%", timeout_ms=10_000, actions=ACTIVE,
                    headers=(("Authorization", "Bearer static-secret"), ("X-Subject", "%headers.authorization%")))
        values = params(authorization="Bearer user-token")
        # Each check in its own context, as each gRPC call is.
        check_a = asyncio.create_task(decide(evaluator, [fast, slow], values), context=contextvars.Context())
        await slow_started.wait()
        b_started = asyncio.get_running_loop().time()
        check_b = asyncio.create_task(decide(evaluator, [slow], values), context=contextvars.Context())
        decision_a, trace_a = await check_a
        assert decision_a.code == Code.VALUE_MISMATCH

        def slow_for_a() -> dict:
            return trace_a.document(["fast", "slow"])["rules"][1]

        at_decision = slow_for_a()
        assert (at_decision["source"], at_decision["outcome"]) == ("not run", "not run")
        assert not check_b.done()  # the call goes on for B, and answers only now
        release.set()
        decision_b, trace_b = await check_b
        waited = asyncio.get_running_loop().time() - b_started

    assert decision_b.allowed and calls.count("/slow") == 1
    # Nothing the call learnt after A stopped waiting reached A's trace.
    later = slow_for_a()
    assert later == at_decision
    assert "answer" not in later and "ms" not in later and "reason" not in later
    assert [a["verdict"] for a in later["actions"]] == ["not checked"]
    # B's entry: shared, with the request it would have sent and the time it waited.
    [shared] = trace_b.document(["slow"])["rules"]
    assert (shared["source"], shared["outcome"]) == ("shared", "held")
    assert shared["request"]["url"] == url + "/slow?u=alice"
    assert shared["request"]["headers"] == [["Authorization", trace.MASK], ["X-Subject", trace.MASK]]
    assert 0 < shared["ms"] <= waited * 1000
    assert "user-token" not in json.dumps(shared) and "static-secret" not in json.dumps(shared)


# --- a judging process that cannot be started ---------------------------------------------

def big_answer(status: str = "active") -> bytes:
    return json.dumps({"status": status, "pad": "x" * (INLINE_BYTES + 1)}).encode()


async def test_a_judging_process_that_cannot_start_fails_the_rule_not_the_check(
        evaluator: WebhookEvaluator, monkeypatch: pytest.MonkeyPatch) -> None:
    class NoProcess:
        def __init__(self) -> None:
            raise OSError(24, "Too many open files")

    monkeypatch.setattr(judge, "_Worker", NoProcess)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big_answer(), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving(app) as port:
        rule = Rule(name="big", url=f"http://127.0.0.1:{port}/big", actions=ACTIVE)
        decision, _ = await decide(evaluator, [rule], params())

    assert (decision.allowed, decision.code) == (False, Code.RESPONSE_INVALID)
    assert decision.reason == ('rule "big": the answer (16 KiB) could not be judged '
                               "(the judging process could not be started or reached)")


# --- the decision cache --------------------------------------------------------------------

def test_a_decision_not_to_be_kept_is_not_even_measured() -> None:
    """A rule without a cache (ttl 0) puts every outcome: that must cost nothing."""
    measured: list[str] = []

    def sizeof(value: str) -> int:
        measured.append(value)
        return len(value)

    cache: DecisionCache[str] = DecisionCache(10, FakeClock(), sizeof=sizeof)
    cache.put("r", b"k", "value", 0)
    cache.put("r", b"k", "value", -1)
    assert (measured, len(cache)) == ([], 0)
    cache.put("r", b"k", "value", 1)
    assert (measured, len(cache)) == (["value"], 1)

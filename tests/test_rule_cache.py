"""The decision cache and single flight: unit level, and through the real sidecar."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sidecar.policies import Policy
from sidecar.rules.cache import ENTRY_OVERHEAD, DecisionCache, SingleFlight
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.conftest import Webhook, answer, check_request, seed
from tests.helpers import (
    OK,
    PERMISSION_DENIED,
    FakeClock,
    eventually,
    free_port,
    metric,
    ops_get,
    start_server,
    webhook_evaluator,
)


def test_entries_expire_after_their_ttl() -> None:
    clock = FakeClock()
    cache: DecisionCache[str] = DecisionCache(10, clock)
    cache.put("r", "k", "v", ttl=5)
    assert cache.get("k") == "v"
    clock.now += 4.9
    assert cache.get("k") == "v"
    clock.now += 0.2
    assert cache.get("k") is None
    assert len(cache) == 0
    assert (cache.hits, cache.misses) == (2, 1)


def test_ttl_zero_caches_nothing() -> None:
    cache: DecisionCache[str] = DecisionCache(10)
    cache.put("r", "k", "v", ttl=0)
    assert cache.get("k") is None


def test_least_recently_used_entries_go_first() -> None:
    cache: DecisionCache[int] = DecisionCache(3)
    for i in range(3):
        cache.put("r", i, i, ttl=60)
    cache.get(0)  # 0 is now the most recently used
    cache.put("r", 3, 3, ttl=60)
    assert [cache.get(i) for i in range(4)] == [0, None, 2, 3]
    assert len(cache) == 3


def test_the_least_recently_used_entries_go_when_the_bytes_pass_the_bound() -> None:
    # Entries of 100-character values cost 500 bytes each: three fit in 1,500, far below the
    # count bound, so only the byte bound can make room.
    cache: DecisionCache[str] = DecisionCache(100, max_bytes=3 * (ENTRY_OVERHEAD + 100), sizeof=len)
    for key in "abc":
        cache.put("r", key, key * 100, ttl=60)
    assert (len(cache), cache.bytes, cache.evictions) == (3, 1500, 0)
    cache.get("a")  # "b" is now the least recently used
    cache.put("r", "d", "d" * 100, ttl=60)
    assert (len(cache), cache.bytes, cache.evictions) == (3, 1500, 1)
    assert [cache.get(k) is not None for k in "abcd"] == [True, False, True, True]

    cache.put("r", "huge", "h" * 1101, ttl=60)  # 1,501 bytes: more than the whole cache
    assert cache.get("huge") is None
    assert (len(cache), cache.bytes, cache.evictions) == (3, 1500, 1)  # and nothing made room for it

    cache.put("r", "big", "b" * 1000, ttl=60)  # 1,400 bytes: every other entry goes
    assert (len(cache), cache.bytes, cache.evictions) == (1, 1400, 4)
    assert cache.get("big") == "b" * 1000


@pytest.mark.parametrize("touch", ["get", "put"])
def test_expired_entries_are_dropped_when_another_key_is_used(touch: str) -> None:
    clock = FakeClock()
    cache: DecisionCache[str] = DecisionCache(100, clock, sizeof=len)
    cache.put("r", "short", "s" * 100, ttl=5)
    cache.put("r", "long", "l" * 10, ttl=60)
    assert (len(cache), cache.bytes) == (2, 2 * ENTRY_OVERHEAD + 110)
    clock.advance(5.1)
    if touch == "get":
        assert cache.get("long") == "l" * 10
    else:
        cache.put("r", "other", "o" * 10, ttl=60)
    kept = 1 if touch == "get" else 2
    assert (len(cache), cache.bytes) == (kept, kept * (ENTRY_OVERHEAD + 10))


def test_forget_rule_drops_only_that_rules_entries() -> None:
    cache: DecisionCache[str] = DecisionCache(10)
    cache.put("a", "ka", "va", ttl=60)
    cache.put("b", "kb", "vb", ttl=60)
    cache.forget_rule("a")
    assert cache.get("ka") is None and cache.get("kb") == "vb"
    cache.forget_rule("never-cached")


async def test_single_flight_makes_one_call_for_concurrent_equal_keys() -> None:
    flights: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def call() -> int:
        nonlocal calls
        calls += 1
        await release.wait()  # in flight until every caller has come
        return 42

    callers = [asyncio.create_task(flights.do("k", call)) for _ in range(50)]
    await eventually(lambda: calls == 1)  # the call task starts after the 50 callers joined
    release.set()
    assert await asyncio.gather(*callers) == [42] * 50
    assert calls == 1 and len(flights) == 0
    assert await flights.do("k", call) == 42 and calls == 2  # later calls are new calls


async def test_one_caller_giving_up_does_not_cancel_the_call_for_others() -> None:
    flights: SingleFlight[str] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "done"

    first = asyncio.create_task(flights.do("k", call))
    await started.wait()
    second = asyncio.create_task(flights.do("k", call))
    await asyncio.sleep(0)  # one turn of the loop, not a wait: the second caller joins the flight
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == "done"
    assert calls == 1  # the second caller got the first caller's call, not one of its own


async def test_the_call_is_cancelled_when_nobody_waits() -> None:
    flights: SingleFlight[str] = SingleFlight()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def call() -> str:
        started.set()
        try:
            await asyncio.Event().wait()  # never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    waiter = asyncio.create_task(flights.do("k", call))
    await started.wait()
    waiter.cancel()
    await asyncio.wait_for(cancelled.wait(), 1)
    assert len(flights) == 0


async def test_a_failure_reaches_every_waiter() -> None:
    flights: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        raise RuntimeError("boom")

    callers = [asyncio.create_task(flights.do("k", call)) for _ in range(3)]
    await eventually(lambda: calls == 1)
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert [str(r) for r in results] == ["boom"] * 3 and all(isinstance(r, RuntimeError) for r in results)
    assert calls == 1  # one failed call, shared: not one call per waiter


# ------------------------------------------------------------------- through the sidecar

def posture(url: str, **update) -> Rule:
    return Rule(name="posture", url=url + "/p?u=%username%",
                actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),), **update)


async def test_cached_decisions_skip_the_webhook(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"status": "active"})
    seed(db, [posture(webhook.url, cache_ttl=60)], [Policy(name="app", rules=("posture",))])
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    for user in ("alice", "alice", "alice", "bob", "bob"):
        response = await stub.Check(check_request("/", headers={"x-safous-username": user}))
        assert response.status.code == OK
    # Equal parameters share an entry, different ones do not.
    assert [r["path"] for r in webhook.requests] == ["/p?u=alice", "/p?u=bob"]
    assert sidecar.evaluator.cache.hits == 3


async def test_cache_entries_expire(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"status": "active"})
    seed(db, [posture(webhook.url, cache_ttl=60)], [Policy(name="app", rules=("posture",))])
    clock = FakeClock()
    stub = authz((await start_sidecar(webhook_evaluator(clock))).port)
    await stub.Check(check_request("/"))
    clock.advance(59.9)
    await stub.Check(check_request("/"))
    assert len(webhook.requests) == 1
    clock.advance(0.2)
    await stub.Check(check_request("/"))
    assert len(webhook.requests) == 2


async def test_failures_are_cached_only_for_the_failure_ttl(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"error": "down"}, status=503)
    seed(db, [posture(webhook.url, cache_ttl=60)], [Policy(name="app", rules=("posture",))])
    clock = FakeClock()
    stub = authz((await start_sidecar(webhook_evaluator(clock, failure_ttl=5))).port)
    for _ in range(3):
        assert (await stub.Check(check_request("/"))).status.code == PERMISSION_DENIED
        clock.advance(1.6)
    assert len(webhook.requests) == 1  # 4.8 s: the failure is still remembered
    webhook.routes["/p"] = answer({"status": "active"})  # the outage ends
    clock.advance(0.3)
    assert (await stub.Check(check_request("/"))).status.code == OK
    clock.advance(55)
    assert (await stub.Check(check_request("/"))).status.code == OK  # and this answer is cached
    assert len(webhook.requests) == 2


async def test_a_changed_rule_does_not_use_old_decisions(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"status": "active"})
    seed(db, [posture(webhook.url, cache_ttl=60)], [Policy(name="app", rules=("posture",))])
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    assert (await stub.Check(check_request("/"))).status.code == OK
    version = sidecar.checker.snapshot.version
    changed = posture(webhook.url, cache_ttl=60).model_copy(
        update={"actions": (ResponseAction(type=ActionType.STRING, key="status", value="gold"),)})
    seed(db, [changed])
    await eventually(lambda: sidecar.checker.snapshot.version > version, what="the reload")
    response = await stub.Check(check_request("/"))
    assert response.status.code == PERMISSION_DENIED  # judged anew against the new criterion
    assert len(webhook.requests) == 2
    assert len(sidecar.evaluator.cache) == 1  # the old rule's entry is gone, the new one is in


async def test_concurrent_equal_checks_make_one_webhook_call(db, start_sidecar, authz, webhook) -> None:
    release = asyncio.Event()

    async def held(request):
        await asyncio.wait_for(release.wait(), 10)
        return await answer({"status": "active"})(request)

    webhook.routes["/p"] = held
    seed(db, [posture(webhook.url)], [Policy(name="app", rules=("posture",))])  # cache off
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    joined = count_callers(sidecar.evaluator.flights)
    checks = [asyncio.ensure_future(stub.Check(check_request("/", headers={"x-safous-username": "eve"})))
              for _ in range(20)]
    await eventually(lambda: joined[0] == 20, what="20 checks waiting on the webhook")
    release.set()
    assert [r.status.code for r in await asyncio.gather(*checks)] == [OK] * 20
    assert len(webhook.requests) == 1
    await stub.Check(check_request("/", headers={"x-safous-username": "eve"}))
    assert len(webhook.requests) == 2  # no cache: a later check calls again


async def test_cache_max_bytes_bounds_the_running_servers_cache(
        db: Path, authz: Any, webhook: Webhook) -> None:
    """``safous-sidecar serve --cache-max-bytes``: as many decisions as fit, then the least
    recently used go (``safous_cache_evictions_total``)."""
    webhook.routes["/p"] = answer({"status": "active"})
    seed(db, [posture(webhook.url, cache_ttl=60)], [Policy(name="app", rules=("posture",))])
    bound, ops = 5000, free_port()
    log, port = await asyncio.to_thread(start_server, db, "--cache-max-bytes", str(bound),
                                        "--http", f"127.0.0.1:{ops}")
    try:
        stub = authz(port)

        async def cache_metrics() -> tuple[float, float, float]:
            page = (await ops_get(ops, "/metrics"))[1]
            return (metric(page, "safous_cache_entries"), metric(page, "safous_cache_bytes"),
                    metric(page, "safous_cache_evictions_total"))

        assert (await stub.Check(check_request("/", headers={"x-safous-username": "u0"}))).status.code == OK
        entries, entry_bytes, evictions = await cache_metrics()
        assert (entries, evictions) == (1, 0)
        fit = int(bound // entry_bytes)
        assert 2 <= fit < 10  # the bound, not the count, decides what stays
        for user in range(1, fit + 3):
            response = await stub.Check(check_request("/", headers={"x-safous-username": f"u{user}"}))
            assert response.status.code == OK
        assert await cache_metrics() == (fit, fit * entry_bytes, 3)
        await stub.Check(check_request("/", headers={"x-safous-username": "u0"}))  # evicted: called again
        assert [r["path"] for r in webhook.requests].count("/p?u=u0") == 2
    finally:
        await asyncio.to_thread(log.close)


def count_callers(flights: SingleFlight) -> list[int]:
    """Counts (in ``[0]``) the callers of ``flights.do`` from now on: checks that got as far as
    the webhook call, whether they start it or join one in flight."""
    callers = [0]
    do = flights.do

    def counted(key, call):
        callers[0] += 1
        return do(key, call)

    flights.do = counted
    return callers

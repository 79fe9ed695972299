"""The decision cache and single flight: unit level, and through the real sidecar."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.policies import Policy
from sidecar.rules.cache import DecisionCache, SingleFlight
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.conftest import answer, check_request, seed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
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


def test_forget_rule_drops_only_that_rules_entries() -> None:
    cache: DecisionCache[str] = DecisionCache(10)
    cache.put("a", "ka", "va", ttl=60)
    cache.put("b", "kb", "vb", ttl=60)
    cache.forget_rule("a")
    assert cache.get("ka") is None and cache.get("kb") == "vb"
    cache.forget_rule("never-cached")


async def test_single_flight_makes_one_call_for_concurrent_equal_keys() -> None:
    flights: SingleFlight[int] = SingleFlight()
    calls = 0

    async def call() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 42

    results = await asyncio.gather(*(flights.do("k", call) for _ in range(50)))
    assert results == [42] * 50 and calls == 1 and len(flights) == 0
    assert await flights.do("k", call) == 42 and calls == 2  # later calls are new calls


async def test_one_caller_giving_up_does_not_cancel_the_call_for_others() -> None:
    flights: SingleFlight[str] = SingleFlight()
    started = asyncio.Event()

    async def call() -> str:
        started.set()
        await asyncio.sleep(0.1)
        return "done"

    first = asyncio.create_task(flights.do("k", call))
    await started.wait()
    second = asyncio.create_task(flights.do("k", call))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == "done"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_the_call_is_cancelled_when_nobody_waits() -> None:
    flights: SingleFlight[str] = SingleFlight()
    cancelled = asyncio.Event()

    async def call() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    waiter = asyncio.create_task(flights.do("k", call))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.wait_for(cancelled.wait(), 1)
    assert len(flights) == 0


async def test_a_failure_reaches_every_waiter() -> None:
    flights: SingleFlight[str] = SingleFlight()

    async def call() -> str:
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    results = await asyncio.gather(*(flights.do("k", call) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


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
        assert response.status.code == 0
    # Equal parameters share an entry, different ones do not.
    assert [r["path"] for r in webhook.requests] == ["/p?u=alice", "/p?u=bob"]
    assert sidecar.evaluator.cache.hits == 3


async def test_cache_entries_expire(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"status": "active"})
    seed(db, [posture(webhook.url, cache_ttl=0.3)], [Policy(name="app", rules=("posture",))])
    stub = authz((await start_sidecar()).port)
    await stub.Check(check_request("/"))
    await stub.Check(check_request("/"))
    assert len(webhook.requests) == 1
    await asyncio.sleep(0.4)
    await stub.Check(check_request("/"))
    assert len(webhook.requests) == 2


async def test_failures_are_cached_only_for_the_failure_ttl(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"error": "down"}, status=503)
    seed(db, [posture(webhook.url, cache_ttl=60)], [Policy(name="app", rules=("posture",))])
    stub = authz((await start_sidecar(cache_failure_ttl=0.3)).port)
    for _ in range(3):
        assert (await stub.Check(check_request("/"))).status.code == 7
    assert len(webhook.requests) == 1
    webhook.routes["/p"] = answer({"status": "active"})  # the outage ends
    await asyncio.sleep(0.4)
    assert (await stub.Check(check_request("/"))).status.code == 0
    assert (await stub.Check(check_request("/"))).status.code == 0  # and this answer is cached
    assert len(webhook.requests) == 2


async def test_a_changed_rule_does_not_use_old_decisions(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"status": "active"})
    seed(db, [posture(webhook.url, cache_ttl=60)], [Policy(name="app", rules=("posture",))])
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    assert (await stub.Check(check_request("/"))).status.code == 0
    version = sidecar.checker.snapshot.version
    changed = posture(webhook.url, cache_ttl=60).model_copy(
        update={"actions": (ResponseAction(type=ActionType.STRING, key="status", value="gold"),)})
    seed(db, [changed])
    for _ in range(100):
        if sidecar.checker.snapshot.version > version:
            break
        await asyncio.sleep(0.02)
    response = await stub.Check(check_request("/"))
    assert response.status.code == 7  # judged anew against the new criterion
    assert len(webhook.requests) == 2
    await asyncio.sleep(0.05)
    assert len(sidecar.evaluator.cache) == 1  # the old rule's entry is gone


async def test_concurrent_equal_checks_make_one_webhook_call(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"status": "active"}, delay=0.2)
    seed(db, [posture(webhook.url)], [Policy(name="app", rules=("posture",))])  # cache off
    stub = authz((await start_sidecar()).port)
    results = await asyncio.gather(*(stub.Check(check_request("/", headers={"x-safous-username": "eve"}))
                                     for _ in range(20)))
    assert all(r.status.code == 0 for r in results)
    assert len(webhook.requests) == 1
    await stub.Check(check_request("/", headers={"x-safous-username": "eve"}))
    assert len(webhook.requests) == 2  # no cache: a later check calls again

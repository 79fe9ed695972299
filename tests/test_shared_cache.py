"""The decision cache shared by the fleet (``--shared-cache``), against real Redis servers (one
per module, emptied before each test; a 3-node Redis Cluster; a server of its own for the test
that stops it), real sidecars (in this process, or a process where one is killed) and real
webhooks on loopback. What a user sees: webhook calls, decisions, metrics, traces, and what
Redis holds."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.admin.display import trace_report
from sidecar.db import connect, read_trace
from sidecar.policies import Policy
from sidecar.rules.fleet import Found
from sidecar.rules.model import ActionType, ResponseAction, Rule
from sidecar.server import Sidecar
from sidecar.settings import Settings
from sidecar.shared_cache import Breaker, RedisStore
from sidecar.shared_cache._redis import MAX_VALUE_BYTES
from sidecar.shared_cache._redis import connect as redis_client
from sidecar.shared_cache.sealing import OVERHEAD, FleetKeys
from tests.certs import make_tls_dir
from tests.conftest import ACTIVE, StartSidecar, check_request, seed
from tests.helpers import OK, PERMISSION_DENIED, code_of, eventually, free_port, metric, ops_get, start_server
from tests.redis_servers import RedisCluster3, RedisServer
from tests.webhook_servers import Api, Serve

SECRET_VARIABLE = "SAFOUS_SECRET_FLEET_CACHE"
SECRET = "a fleet secret of more than thirty-two bytes"
ALLOWED = ("alice", "bob", "carol")
KEY = re.compile(rb"safous:\{[A-Za-z0-9_-]{22}\}(:lock)?")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer.start(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def fleet_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_VARIABLE, SECRET)
    return f"env:{SECRET_VARIABLE}"


def posture(url: str, **update: Any) -> Rule:
    """Answers who is active, and stores their tier: what the fleet shares."""
    update.setdefault("cache_ttl", 60)
    return Rule(name="posture", url=url + "/p?u=%username%",
                actions=(*ACTIVE, ResponseAction(type=ActionType.STORE, key="tier", value="tier")), **update)


def directory(release: asyncio.Event | None = None) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The webhook: the users of ALLOWED are active (tier gold), anyone else locked; with
    ``release``, the first call waits for it."""
    held = [release]

    async def handler(request: web.Request) -> web.Response:
        if held[0] is not None:
            event, held[0] = held[0], None
            await asyncio.wait_for(event.wait(), 30)
        user = request.query.get("u", "")
        status = "active" if user in ALLOWED else "locked"
        return web.json_response({"status": status, "tier": "gold"})

    return handler


def user(name: str, path: str = "/") -> Any:
    return check_request(path, headers={"x-safous-username": name})


def calls(api: Api, name: str | None = None) -> int:
    return sum(1 for seen in api.seen if name is None or seen.raw_path == f"/p?u={name}")


def shared(sidecar: Sidecar, name: str) -> float:
    """A shared cache metric of ``sidecar``, as its /metrics page shows it."""
    return metric(sidecar.metrics.exposition().decode(), name)


@pytest.fixture
async def fleet(tmp_path: Path, start_sidecar: StartSidecar, fleet_secret: str, redis_server: RedisServer
                ) -> AsyncIterator[Callable[..., Awaitable[Sidecar]]]:
    """``fleet(rules, **settings)``: one more sidecar of a fleet sharing ``redis_server``, on a
    rules.db of its own holding ``rules`` and the policy "app" using them."""
    with redis_server.client() as client:
        client.flushall()
    count = 0

    async def start(rules: list[Rule], **settings: Any) -> Sidecar:
        nonlocal count
        count += 1
        db = tmp_path / f"pod{count}.db"
        seed(db, rules, [Policy(name="app", rules=tuple(r.name for r in rules))])
        settings.setdefault("shared_cache", redis_server.url)
        settings.setdefault("shared_cache_key", fleet_secret)
        return await start_sidecar(db=db, trace="all", **settings)

    yield start


def trace_of(db: Path, request_id: str) -> dict[str, Any]:
    doc = read_trace(connect(db, readonly=True), request_id)
    assert doc is not None, f"no trace of {request_id}"
    return doc


# ----------------------------------------------------------------- one call per user, fleet-wide

async def test_two_sidecars_make_one_webhook_call_per_user(fleet, serve: Serve, authz, redis_server) -> None:
    api = await serve(directory())
    pod_a, pod_b = await fleet([posture(api.url)]), await fleet([posture(api.url)])
    a, b = authz(pod_a.port), authz(pod_b.port)
    for name in ("alice", "mallory"):
        await a.Check(user(name))
    assert calls(api) == 2
    answers = [await b.Check(user(name, f"/b{i}")) for i, name in enumerate(("alice", "mallory", "alice"))]
    assert [code_of(r) for r in answers] == ["allowed", "value_mismatch", "allowed"]
    assert calls(api) == 2  # pod B called nothing: both answers came from the fleet, then its own cache
    allowed = answers[0].ok_response.headers
    assert [(h.header.key, h.header.value) for h in allowed] == [("x-safous-tier", "gold")]  # the stored value
    assert (shared(pod_b, "safous_shared_cache_hits_total"), shared(pod_a, "safous_shared_cache_misses_total"),
            pod_b.evaluator.cache.hits) == (2, 2, 1)

    await eventually(lambda: pod_b.activity.written == 3)
    doc = trace_of(pod_b.settings.db, "req-b0")
    [rule] = doc["rules"]
    assert (rule["source"], rule["pod"], rule["outcome"]) == ("fleet", socket.gethostname(), "held")
    assert rule["request"]["url"] == f"{api.url}/p?u=alice"
    assert f"(fleet, pod {socket.gethostname()}, " in trace_report({**doc, "request_id": "req-b0"})  # explain

    # What Redis holds: names and sealed values, nothing readable, every key with a TTL.
    with redis_server.client() as client:
        keys = client.keys("*")
        assert len(keys) == 2 and all(KEY.fullmatch(key) for key in keys)
        assert all(0 < client.pttl(key) <= 60_000 for key in keys)
        held = b"".join(keys) + b"".join(client.get(key) or b"" for key in keys)
    for clear in (b"alice", b"mallory", b"gold", b"tier", b"posture", b"active", b"value_mismatch", b"127.0.0.1"):
        assert clear not in held


async def test_a_fleet_answer_names_the_pod_by_its_pod_name(fleet, serve: Serve, authz) -> None:
    api = await serve(directory())
    pod_a, pod_b = await fleet([posture(api.url)], pod_name="pod-a"), await fleet([posture(api.url)])
    await authz(pod_a.port).Check(user("alice"))
    assert code_of(await authz(pod_b.port).Check(user("alice", "/b"))) == "allowed"
    await eventually(lambda: pod_b.activity.written == 1)
    [rule] = trace_of(pod_b.settings.db, "req-b")["rules"]
    assert (rule["source"], rule["pod"]) == ("fleet", "pod-a")


async def test_a_burst_on_three_pods_makes_one_call_and_waiters_get_the_holders_answer(
        fleet, serve: Serve, authz) -> None:
    release = asyncio.Event()
    api = await serve(directory(release))
    pods = [await fleet([posture(api.url)]) for _ in range(3)]
    stubs = [authz(pod.port) for pod in pods]
    first = asyncio.ensure_future(stubs[0].Check(user("alice")))
    await eventually(lambda: calls(api) == 1, what="pod A calling the webhook")
    burst = [asyncio.ensure_future(stub.Check(user("alice"))) for stub in stubs for _ in range(5)]
    await eventually(lambda: sum(shared(p, "safous_shared_cache_waits_total") for p in pods[1:]) == 2,
                     what="pods B and C waiting for pod A's call")
    release.set()
    answers = await asyncio.gather(first, *burst)
    assert [code_of(r) for r in answers] == ["allowed"] * 16
    assert calls(api) == 1
    assert [shared(p, "safous_shared_cache_hits_total") for p in pods] == [0, 1, 1]
    assert [shared(p, "safous_shared_cache_waits_given_up_total") for p in pods] == [0, 0, 0]


async def test_a_lock_holder_killed_mid_call_lets_a_waiter_call(
        tmp_path: Path, fleet, serve: Serve, authz, redis_server: RedisServer, fleet_secret: str) -> None:
    release = asyncio.Event()  # never set: pod A's call hangs until pod A is killed
    api = await serve(directory(release))
    rule = posture(api.url, timeout_ms=1000)
    db = tmp_path / "killed.db"
    seed(db, [rule], [Policy(name="app", rules=("posture",))])
    log, port = await asyncio.to_thread(
        start_server, db, "--shared-cache", redis_server.url, "--shared-cache-key", fleet_secret,
        env={SECRET_VARIABLE: SECRET})
    try:
        doomed = asyncio.ensure_future(authz(port).Check(user("alice")))
        await eventually(lambda: calls(api) == 1, what="pod A calling the webhook")
        pod_b = await fleet([rule])
        waiting = asyncio.ensure_future(authz(pod_b.port).Check(user("alice")))
        await eventually(lambda: shared(pod_b, "safous_shared_cache_waits_total") == 1, what="pod B waiting")
        log.proc.send_signal(signal.SIGKILL)
        answer = await asyncio.wait_for(waiting, 5)
        await asyncio.gather(doomed, return_exceptions=True)  # pod A never answers
    finally:
        await asyncio.to_thread(log.close)
    assert code_of(answer) == "allowed"
    assert calls(api, "alice") == 2  # pod A's, lost with it, and pod B's own once the lock expired
    assert shared(pod_b, "safous_shared_cache_waits_given_up_total") == 1


async def test_a_rule_edit_is_never_answered_from_the_old_rules_entries(fleet, serve: Serve, authz) -> None:
    api = await serve(directory())
    pod_a = await fleet([posture(api.url)])
    assert (await authz(pod_a.port).Check(user("alice"))).status.code == OK
    stricter = posture(api.url).model_copy(
        update={"actions": (ResponseAction(type=ActionType.STRING, key="tier", value="platinum"),)})
    pod_b = await fleet([stricter])  # the edited rule, as a pod that loaded the new bundle has it
    response = await authz(pod_b.port).Check(user("alice"))
    assert code_of(response) == "value_mismatch"  # judged anew: the old rule's "allowed" was not used
    assert calls(api, "alice") == 2
    assert shared(pod_b, "safous_shared_cache_hits_total") == 0

    # Pod A loads the edit too: its own entries go, and the new rule's answer comes from pod B.
    version = pod_a.checker.snapshot.version
    seed(pod_a.settings.db, [stricter])
    await eventually(lambda: pod_a.checker.snapshot.version > version, what="pod A's reload")
    assert code_of(await authz(pod_a.port).Check(user("alice"))) == "value_mismatch"
    assert calls(api, "alice") == 2
    assert shared(pod_a, "safous_shared_cache_hits_total") == 1


async def down(request: web.Request) -> web.Response:
    """A webhook in maintenance: every call fails (``webhook_status``)."""
    return web.json_response({"error": "maintenance"}, status=503)


@pytest.mark.parametrize("failure_ttl", [1.5, 0])
async def test_a_failed_call_is_shared_for_the_failure_ttl_at_most(
        fleet, serve: Serve, authz, redis_server: RedisServer, failure_ttl: float) -> None:
    api = await serve(down)
    pods = [await fleet([posture(api.url)], cache_failure_ttl=failure_ttl) for _ in range(2)]
    assert code_of(await authz(pods[0].port).Check(user("alice"))) == "webhook_status"
    with redis_server.client() as client:
        # Written behind the check: the value (and the lock let go) in the same script.
        def written() -> list[bytes] | bool:
            keys = client.keys("*")
            if any(key.endswith(b":lock") for key in keys):
                return False
            return keys if failure_ttl else not keys

        keys = await eventually(written, what="pod A's write")
        if failure_ttl:
            [key] = keys
            assert 0 < client.pttl(key) <= 1500  # not the rule's 60 s
    assert code_of(await authz(pods[1].port).Check(user("alice"))) == "webhook_status"
    if failure_ttl:
        assert calls(api) == 1 and shared(pods[1], "safous_shared_cache_hits_total") == 1
    else:
        assert calls(api) == 2  # not shared at all


async def test_a_pod_with_failure_ttl_0_calls_rather_than_use_another_pods_failure(
        fleet, serve: Serve, authz, redis_server: RedisServer) -> None:
    api = await serve(down)
    sharing = await fleet([posture(api.url)], cache_failure_ttl=60)
    not_caching = await fleet([posture(api.url)], cache_failure_ttl=0)
    assert code_of(await authz(sharing.port).Check(user("alice"))) == "webhook_status"
    with redis_server.client() as client:
        await eventually(lambda: [k for k in client.keys("*") if not k.endswith(b":lock")], what="pod A's write")
    for path in ("/1", "/2"):
        assert code_of(await authz(not_caching.port).Check(user("alice", path))) == "webhook_status"
    assert calls(api) == 3  # pod B called each time: it kept neither pod A's failure nor its own
    assert shared(not_caching, "safous_shared_cache_hits_total") == 0


# --------------------------------------------------------------------------- untrusted storage

async def test_forged_and_replayed_values_are_rejected_and_overwritten(
        fleet, serve: Serve, authz, redis_server: RedisServer) -> None:
    api = await serve(directory())
    pod_a = await fleet([posture(api.url)])
    a = authz(pod_a.port)
    assert (await a.Check(user("alice"))).status.code == OK
    with redis_server.client() as client:
        [alice_key] = client.keys("*")
        assert (await a.Check(user("mallory"))).status.code == PERMISSION_DENIED
        [mallory_key] = [key for key in client.keys("*") if key != alice_key]
        alice_value = client.get(alice_key)
        # Replayed: alice's genuine allow moved to mallory's entry.
        client.set(mallory_key, alice_value, px=60_000)
    pod_b = await fleet([posture(api.url)])
    assert code_of(await authz(pod_b.port).Check(user("mallory"))) == "value_mismatch"
    assert calls(api, "mallory") == 2 and shared(pod_b, "safous_shared_cache_rejected_total") == 1
    with redis_server.client() as client:
        assert client.get(mallory_key) not in (None, alice_value)  # overwritten by pod B's fresh answer
        # Forged: sealed with another secret, and a genuine value with one bit flipped.
        other = FleetKeys(b"not the fleet's secret, but long enough")
        name = bytes(32)[:16]
        client.set(mallory_key, other.seal(name, b'["pod","", null, {}, null]', 2**40), px=60_000)
        flipped = bytearray(alice_value)
        flipped[-1] ^= 1
        client.set(alice_key, bytes(flipped), px=60_000)
    pod_c = await fleet([posture(api.url)])
    c = authz(pod_c.port)
    assert code_of(await c.Check(user("mallory"))) == "value_mismatch"
    assert code_of(await c.Check(user("alice"))) == "allowed"
    assert (calls(api, "mallory"), calls(api, "alice")) == (3, 2)
    assert shared(pod_c, "safous_shared_cache_rejected_total") == 2
    assert shared(pod_c, "safous_shared_cache_hits_total") == 0


async def test_an_oversized_or_mistyped_entry_is_not_read(fleet, serve: Serve, authz, redis_server) -> None:
    api = await serve(directory())
    pod_a = await fleet([posture(api.url)])
    for name in ("alice", "bob"):
        assert code_of(await authz(pod_a.port).Check(user(name))) == "allowed"
    with redis_server.client() as client:
        first, second = client.keys("*")
        client.set(first, b"x" * (300 << 10), px=60_000)  # more than a pod reads
        client.delete(second)
        client.rpush(second, b"not a string")
    pod_b = await fleet([posture(api.url)])
    for name in ("alice", "bob"):
        assert code_of(await authz(pod_b.port).Check(user(name))) == "allowed"
    assert calls(api) == 4  # neither entry was used
    assert shared(pod_b, "safous_shared_cache_rejected_total") == 1  # the oversized one, removed
    assert shared(pod_b, "safous_shared_cache_errors_total") == 1  # the list: Redis's WRONGTYPE error
    with redis_server.client() as client:
        assert client.strlen(first) < 1000  # pod B's fresh answer


async def test_a_full_redis_costs_nothing_but_its_errors(fleet, serve: Serve, authz, redis_server) -> None:
    api = await serve(directory())
    pod = await fleet([posture(api.url)])
    with redis_server.client() as client:
        client.config_set("maxmemory", 1)
        client.config_set("maxmemory-policy", "noeviction")
        try:
            answers = [await authz(pod.port).Check(user(name)) for name in ("alice", "mallory", "bob")]
        finally:
            client.config_set("maxmemory", 0)
    assert [code_of(r) for r in answers] == ["allowed", "value_mismatch", "allowed"]
    assert shared(pod, "safous_shared_cache_errors_total") >= 3


# ------------------------------------------------------------------------- what a pod writes

NOW = 1_700_000_000.0


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two pods' stores on ``redis_server`` (emptied), their clocks stopped at NOW."""
    with redis_server.client() as client:
        client.flushall()
    pods = tuple(RedisStore(redis_client(redis_server.url, cluster=False, password=None, ca_bundle=None),
                            FleetKeys(SECRET.encode()), budget=1.0, breaker=Breaker(1.0), clock=lambda: NOW)
                 for _ in range(2))
    yield pods[0], pods[1]
    for pod in pods:
        await pod.close()


async def test_a_publish_past_its_expiry_lets_go_of_the_lock(stores: tuple[RedisStore, RedisStore]) -> None:
    pod_a, pod_b = stores
    calling = pod_a.entry(b"alice")
    assert await calling.claim(60) == "held"
    assert await pod_b.entry(b"alice").claim(60) == "busy"
    await calling.publish(b"an answer", NOW - 1)  # its lifetime passed during the call: not stored
    assert await pod_b.entry(b"alice").claim(60) == "held"  # the lock let go, not held for 60 s


async def test_a_value_too_large_once_sealed_is_not_shared(
        stores: tuple[RedisStore, RedisStore], redis_server: RedisServer) -> None:
    pod_a, pod_b = stores
    largest = b"x" * (MAX_VALUE_BYTES - OVERHEAD)
    for name, value in ((b"alice", largest + b"x"), (b"bob", largest)):
        calling = pod_a.entry(name)
        assert await calling.claim(60) == "held"
        await calling.publish(value, NOW + 60)
    with redis_server.client() as client:
        assert [client.strlen(key) for key in client.keys("*")] == [MAX_VALUE_BYTES]  # bob's; alice's lock let go
    assert await pod_b.entry(b"alice").claim(60) == "held"
    assert await pod_b.entry(b"bob").claim(60) == Found(largest, NOW + 60)
    assert pod_b.rejected == 0


# ------------------------------------------------------------------------- Redis goes away

async def test_redis_stopped_mid_run_then_restarted(tmp_path: Path, fleet, serve: Serve, authz) -> None:
    api = await serve(directory())
    with RedisServer.start(tmp_path / "own-redis") as own:
        pods = [await fleet([posture(api.url)], shared_cache=own.url, shared_cache_breaker_seconds=0.3)
                for _ in range(2)]
        stubs = [authz(pod.port) for pod in pods]
        outcomes: list[tuple[str, str]] = []

        async def round_of_checks(names: list[str], pod: int) -> None:
            for i, name in enumerate(names):
                # A gRPC error (or no answer in 5 s) fails the test.
                response = await stubs[(i + pod) % 2].Check(user(name, f"/{len(outcomes)}"), timeout=5)
                outcomes.append((name, code_of(response)))

        known = [f"u{i}" for i in range(10)] + list(ALLOWED)
        await round_of_checks(known, 0)
        assert calls(api) == len(known)
        own.stop()
        await round_of_checks(known, 1)  # the other pod: its own cache misses, the fleet's is gone
        await round_of_checks([f"new{i}" for i in range(10)] + ["alice"], 0)
        wrong = [(name, code) for name, code in outcomes if (code == "allowed") != (name in ALLOWED)]
        assert wrong == [] and len(outcomes) == 2 * len(known) + 11
        assert all(code in ("allowed", "value_mismatch") for _, code in outcomes)
        assert all(shared(p, "safous_shared_cache_breaker_trips_total") >= 1 for p in pods)
        assert calls(api) == 2 * len(known) + 10  # every check decided, by the webhook while Redis was away

        own.restart()
        before = shared(pods[1], "safous_shared_cache_hits_total")
        fresh = iter(range(1000))

        async def fleet_used_again() -> bool:
            name = f"back{next(fresh)}"  # a user neither pod has cached
            await stubs[0].Check(user(name))
            await stubs[1].Check(user(name))
            return shared(pods[1], "safous_shared_cache_hits_total") > before

        await eventually(fleet_used_again, timeout=5, what="pod B answered from the restarted Redis")
        assert shared(pods[1], "safous_shared_cache_breaker_state") == 0


async def test_a_redis_that_stops_answering_costs_a_check_its_budget_at_most(
        fleet, serve: Serve, authz, redis_server: RedisServer) -> None:
    api = await serve(directory())
    pods = [await fleet([posture(api.url)], shared_cache_breaker_seconds=0.3) for _ in range(2)]
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # connected, and silent: each look waits for its budget
    try:
        slowest = 0.0
        for i in range(10):
            started = asyncio.get_running_loop().time()
            assert code_of(await authz(pods[i % 2].port).Check(user(f"u{i}"), timeout=5)) == "value_mismatch"
            slowest = max(slowest, asyncio.get_running_loop().time() - started)
        # 20 ms per look (and the breaker stops the looking), far from the 1 s a look may take
        # in the background: nobody waits for a silent Redis.
        assert slowest < 0.3, slowest
        assert all(shared(p, "safous_shared_cache_breaker_trips_total") >= 1 for p in pods)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    fresh = iter(range(1000))

    async def fleet_used_again() -> bool:
        name = f"again{next(fresh)}"
        await authz(pods[0].port).Check(user(name))
        await authz(pods[1].port).Check(user(name))
        return shared(pods[1], "safous_shared_cache_hits_total") > 0

    await eventually(fleet_used_again, timeout=5, what="the fleet's cache in use again")


# ------------------------------------------------------------------------------- Redis Cluster

async def test_a_redis_cluster_shares_one_call(tmp_path: Path, fleet, serve: Serve, authz) -> None:
    api = await serve(directory())
    with RedisCluster3.start(tmp_path / "cluster") as cluster:
        pods = [await fleet([posture(api.url)], shared_cache=cluster.url, shared_cache_cluster=True)
                for _ in range(2)]
        names = [f"user{i}" for i in range(8)] + list(ALLOWED)
        for name in names:
            await authz(pods[0].port).Check(user(name))
        answers = [await authz(pods[1].port).Check(user(name)) for name in names]
        assert [code_of(r) == "allowed" for r in answers] == [name in ALLOWED for name in names]
        assert calls(api) == len(names)
        assert shared(pods[1], "safous_shared_cache_hits_total") == len(names)
        held = []
        for node in cluster.nodes:
            with node.client() as client:
                held.append(len([key for key in client.keys("*") if not key.endswith(b":lock")]))
        assert sum(held) == len(names) and sum(1 for n in held if n) >= 2  # spread over the nodes


# ------------------------------------------------------------------------- TLS, unix sockets

async def test_rediss_with_a_private_ca_and_a_password(
        tmp_path: Path, fleet, serve: Serve, authz, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = make_tls_dir(tmp_path / "tls")
    monkeypatch.setenv("SAFOUS_SECRET_REDIS_PASSWORD", "correct horse")
    api = await serve(directory())
    with RedisServer.start(
            tmp_path / "tls-redis", "--tls-port", "{port}", "--tls-cert-file", str(tls.server.cert_path),
            "--tls-key-file", str(tls.server.key_path), "--tls-ca-cert-file", str(tls.ca.cert_path),
            "--tls-auth-clients", "no", "--requirepass", "correct horse",
            client_options={"ssl": True, "ssl_ca_certs": str(tls.ca.cert_path), "password": "correct horse"}
            ) as server:
        options = {"shared_cache": f"rediss://127.0.0.1:{server.port}", "shared_cache_ca_bundle": tls.ca.cert_path,
                   "shared_cache_password": "env:SAFOUS_SECRET_REDIS_PASSWORD"}
        pods = [await fleet([posture(api.url)], **options) for _ in range(2)]
        for pod in pods:
            assert code_of(await authz(pod.port).Check(user("alice"))) == "allowed"
        assert calls(api) == 1 and shared(pods[1], "safous_shared_cache_hits_total") == 1
        # The same server without the private CA: the certificate is not trusted, nothing shared.
        untrusting = await fleet([posture(api.url)], **{**options, "shared_cache_ca_bundle": None})
        assert code_of(await authz(untrusting.port).Check(user("alice"))) == "allowed"
        assert calls(api) == 2 and shared(untrusting, "safous_shared_cache_errors_total") >= 1


async def test_a_unix_socket(tmp_path: Path, fleet, serve: Serve, authz) -> None:
    api = await serve(directory())
    sock = tmp_path / "redis.sock"
    with RedisServer.start(tmp_path / "unix-redis", "--unixsocket", str(sock), "--unixsocketperm", "700"):
        pods = [await fleet([posture(api.url)], shared_cache=f"unix://{sock}") for _ in range(2)]
        for pod in pods:
            assert code_of(await authz(pod.port).Check(user("alice"))) == "allowed"
        assert calls(api) == 1 and shared(pods[1], "safous_shared_cache_hits_total") == 1


# ------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize(("settings", "message"), [
    ({"shared_cache": "redis://127.0.0.1:6379"}, "--shared-cache needs --shared-cache-key"),
    ({"shared_cache": "http://127.0.0.1:6379", "shared_cache_key": "env:SAFOUS_SECRET_K"},
     "is not a redis://, rediss:// or unix:// URL"),
    ({"shared_cache": "redis://:hunter2@127.0.0.1:6379", "shared_cache_key": "env:SAFOUS_SECRET_K"},
     "the URL holds a password"),
    ({"shared_cache": "redis://127.0.0.1", "shared_cache_key": "a-clear-secret"}, "not in clear"),
    ({"shared_cache": "redis://127.0.0.1", "shared_cache_key": "env:HOME"}, "only variables whose names start"),
    ({"shared_cache": "unix:///run/redis.sock", "shared_cache_key": "env:SAFOUS_SECRET_K",
      "shared_cache_cluster": True}, "needs a redis:// or rediss:// URL"),
])
def test_bad_shared_cache_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings(**settings)


def test_a_short_fleet_secret_stops_the_server(tmp_path: Path, redis_server: RedisServer) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--db", str(tmp_path / "r.db"), "--listen", "127.0.0.1:0",
         "--shared-cache", redis_server.url, "--shared-cache-key", f"env:{SECRET_VARIABLE}"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin", SECRET_VARIABLE: "short"})
    assert result.returncode == 1
    assert "the shared cache key must be at least 32 bytes (it is 5)" in result.stderr


async def test_readiness_does_not_depend_on_redis(fleet, serve: Serve) -> None:
    api = await serve(directory())
    ops = free_port()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}"
        await fleet([posture(api.url)], shared_cache=url, http=f"127.0.0.1:{ops}")
        assert await ops_get(ops, "/readyz") == (200, "ready\n")

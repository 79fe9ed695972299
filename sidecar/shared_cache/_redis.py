"""The fleet's shared cache on Redis or Valkey (standalone or Cluster), through redis-py's
asyncio client: ``sidecar.rules.fleet.SharedStore`` over an untrusted server.

Per entry, two keys in one hash slot (so that a Cluster runs each script on one node):
``safous:{NAME}`` holds the sealed value with a TTL (``PX``) equal to the value's lifetime, and
``safous:{NAME}:lock`` a random token for the rule's timeout while one pod calls the webhook.
NAME is ``sealing.FleetKeys.name`` in URL-safe base64: nothing in a key or a value is readable
without the fleet secret, and every key expires. Each look at an entry is one round trip (a
script: the value, or the lock taken, or "busy"), as is each write (the value set and this
pod's lock let go, never another pod's).

Never trusted, never waited for: every operation has ``budget`` seconds (``--shared-cache-timeout``)
after which the check goes on without it (the operation itself may finish in the background,
within ``IO_SECONDS``, so that a slow connect is not started over and over); at most
``CONNECTIONS`` run at once; a value that fails verification is counted, never returned, and
removed; an answer of an unexpected type is an error. Errors (redis-py's, the socket's, a
budget passed) are counted and translated into ``unavailable`` here, at the boundary; a
``Breaker`` stops asking for ``--shared-cache-breaker-seconds`` after 5 failures in a row.

A hostile writer is bounded by the claim script (``MAX_VALUE_BYTES``); a hostile server is not:
redis-py reads a reply whole (a bulk string, an array, however long its header says) before its
type and length are checked here, and has no limit to set. Only time bounds it: the check waits
``budget`` at most, and the read goes on in the background for ``IO_SECONDS`` at most (the
socket timeout and ``_background``'s), on ``CONNECTIONS`` connections at most. So such a server
can make a pod hold a few times what it sends in ``IO_SECONDS`` (an array of small elements
costs more as Python objects than on the wire), freed when the operation fails; after 5 such
failures in a row the breaker stops asking. redis-py's parser is used as it is, not patched.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from ..rules import EvaluatorMetric
from ..rules.fleet import Claim, Found
from ._breaker import STATE_VALUES, Breaker
from .sealing import OVERHEAD, FleetKeys, Rejected

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = "safous:"
CONNECTIONS = 8
"""Operations (so connections: redis-py's asyncio client runs one command per connection at a
time) at once per process: a fleet of 1,000 pods holds at most 8,000 connections."""
MAX_WAITING = 1024
"""Operations started and not finished, those waiting for a connection included: past it an
operation is not started (``skipped``), so a server that stops answering costs bounded memory."""
IO_SECONDS = 1.0
"""What an operation may take in the background once its caller stopped waiting (connect, read)."""
WARN_EVERY = 10.0
MAX_VALUE_BYTES = 256 << 10
"""The largest sealed value shared or read: an outcome's reason and stored values are far smaller."""

# KEYS: value, lock. ARGV: a new lock token, the lock's lifetime (ms), a value to discard ("" for
# none), the largest value returned. Answers the value, or 1 (lock taken) / 0 (another pod holds
# it), plus 2 when a value larger than the bound was found (and removed): whoever can write to
# Redis must not make a pod read megabytes.
_CLAIM = """
local size = redis.call('STRLEN', KEYS[1])
local oversized = 0
if size > tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[1])
  oversized = 2
elseif size > 0 then
  local v = redis.call('GET', KEYS[1])
  if v ~= ARGV[3] then return v end
  redis.call('DEL', KEYS[1])
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 + oversized end
return oversized
"""
# KEYS: value, lock. ARGV: the sealed value, its lifetime (ms), this pod's lock token.
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""
# KEYS: lock. ARGV: this pod's lock token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_ERRORS = (RedisError, RedisClusterException, OSError, EOFError)
"""What redis-py and the socket under it raise: translated into ``unavailable``."""

Client = Redis | RedisCluster


class RedisStore:
    """``sidecar.rules.fleet.SharedStore`` on a redis-py asyncio client (``connect`` makes one
    from a URL). ``clock``: seconds since the epoch, for the values' expiries."""

    def __init__(self, client: Client, keys: FleetKeys, *, budget: float, breaker: Breaker,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._keys = keys
        self._budget = budget
        self.breaker = breaker
        self._clock = clock
        self._slots = asyncio.Semaphore(CONNECTIONS)
        self._waiting = 0
        self._warm: asyncio.Task[bool] | None = None
        self.errors = 0
        self.rejected = 0
        self.skipped = 0
        self._unreported = 0
        self._warned_at = -WARN_EVERY

    def entry(self, material: bytes) -> RedisEntry:
        return RedisEntry(self, self._keys.name(material))

    async def start(self) -> None:
        # A first connection (and a Cluster's map of slots) before the first check needs one,
        # in the background: the server may be down, which readiness does not depend on.
        self._warm = asyncio.ensure_future(self._background(self._client.ping))
        self._warm.add_done_callback(_retrieve)

    async def close(self) -> None:
        if self._warm is not None:
            self._warm.cancel()
            await asyncio.gather(self._warm, return_exceptions=True)
        await self._client.aclose()

    def metrics(self) -> Iterator[EvaluatorMetric]:
        yield EvaluatorMetric("safous_shared_cache_errors", "Shared cache operations that failed or passed "
                              "--shared-cache-timeout (the check went on without them)", "counter", self.errors)
        yield EvaluatorMetric("safous_shared_cache_rejected", "Shared cache values that failed verification "
                              "(forged, moved from another entry, expired, malformed): not used, and overwritten",
                              "counter", self.rejected)
        yield EvaluatorMetric("safous_shared_cache_skipped", "Shared cache operations not sent: the breaker was "
                              f"open, or {MAX_WAITING} were already waiting", "counter", self.skipped)
        yield EvaluatorMetric("safous_shared_cache_breaker_state", "The shared cache's circuit breaker: 0 closed "
                              "(in use), 1 half open (one operation probes), 2 open (not asked)", "gauge",
                              STATE_VALUES[self.breaker.state])
        yield EvaluatorMetric("safous_shared_cache_breaker_trips", "Times the shared cache's breaker opened",
                              "counter", self.breaker.trips)

    async def claim(self, entry: RedisEntry, lock_seconds: float) -> Claim:
        discard = b""
        for _ in range(2):  # a value that fails is removed, and the look made again
            # Kept before the answer: a look that passed its budget may still take the lock in
            # the background, and the publish or release that follows must let go of it.
            entry.token = os.urandom(16)
            answer = await self._run(self._script, _CLAIM, entry.keys, entry.token,
                                     max(1, int(lock_seconds * 1000)), discard, MAX_VALUE_BYTES)
            if answer is None:
                return "unavailable"
            if isinstance(answer, int) and 0 <= answer <= 3:
                if answer >= 2:
                    self._rejected("oversized")
                if not answer % 2:
                    entry.token = b""
                return "held" if answer % 2 else "busy"
            entry.token = b""
            if not isinstance(answer, bytes) or len(answer) > MAX_VALUE_BYTES:  # the script bounds it
                self._failed(f"unexpected answer {type(answer).__name__}")
                return "unavailable"
            try:
                plaintext, expires_ms = self._keys.open(entry.name, answer, int(self._clock() * 1000))
            except Rejected as exc:
                self._rejected(exc.reason)
                discard = answer
                continue
            return Found(plaintext, expires_ms / 1000)
        return "unavailable"

    async def publish(self, entry: RedisEntry, value: bytes, expires_at: float) -> None:
        expires_ms = int(expires_at * 1000)
        lifetime_ms = expires_ms - int(self._clock() * 1000)
        # The claim script bounds the sealed value: one it would find oversized is not written,
        # and the lock is let go (else the others see "busy" for the lock's whole lifetime).
        if len(value) + OVERHEAD > MAX_VALUE_BYTES or lifetime_ms <= 0:
            await self.release(entry)
            return
        sealed = self._keys.seal(entry.name, value, expires_ms)
        await self._run(self._script, _PUBLISH, entry.keys, sealed, lifetime_ms, entry.token)
        entry.token = b""

    async def release(self, entry: RedisEntry) -> None:
        if entry.token:
            await self._run(self._script, _RELEASE, entry.keys[1:], entry.token)
            entry.token = b""

    def _script(self, script: str, keys: tuple[str, ...], *args: bytes | int) -> Awaitable[object]:
        # EVAL, not EVALSHA: the server caches the script by its digest anyway, and a restarted
        # server (which forgot loaded scripts) needs no second round trip.
        return self._client.eval(script, len(keys), *keys, *args)

    async def _run(self, command: Callable[..., Awaitable[T]], *args: object) -> T | None:
        """``command(*args)`` within the budget, or None (counted, and told to the breaker)."""
        if self._waiting >= MAX_WAITING or not self.breaker.allow():
            self.skipped += 1
            return None
        loop = asyncio.get_running_loop()
        # Resolved by the operation as it ends, or by the budget's timer: the check goes on one
        # turn of the loop after the answer (asyncio.wait on the task takes two, and more CPU).
        settled = loop.create_future()
        task = asyncio.ensure_future(self._background(command, *args, settled=settled))
        task.add_done_callback(_retrieve)
        started = loop.time()
        timer = loop.call_later(self._budget, _settle, settled)
        try:
            await settled
            if not task.done():
                # One more turn of the loop: after a stall of the loop (CPU, GC), the answer and
                # the timer are due together, and the answer's callbacks run after the timer's.
                # Without it a busy pod would blame Redis for its own lag and open the breaker.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.breaker.abandoned()
            raise
        finally:
            timer.cancel()
        if not task.done():
            if loop.time() - started > 2 * self._budget:
                # The timer itself ran late: this process was not running (a stall of the loop,
                # the CPU taken by others), so the wait tells nothing about Redis. Counted, and
                # the check goes on without it, but the breaker is not told.
                self.errors += 1
                self.breaker.abandoned()
                return None
            self._failed(f"no answer within {self._budget * 1000:g} ms")
            return None
        if (error := task.exception()) is not None:
            if not isinstance(error, _ERRORS):
                # Not the server's doing (a bug here or in redis-py): said loudly, yet the check
                # goes on without the shared cache, as the store's contract says.
                log.error("shared cache operation failed unexpectedly", exc_info=error)
            self._failed(f"{type(error).__name__}: {error}")
            return None
        if self.breaker.succeeded():
            log.info("shared cache answering again: in use")
        return task.result()

    async def _background(self, command: Callable[..., Awaitable[T]], *args: object,
                          settled: asyncio.Future[None] | None = None) -> T:
        """``command(*args)`` on one of the ``CONNECTIONS``, in ``IO_SECONDS`` at most; the
        caller may stop waiting before (``_run``), never cancelling it halfway through.
        ``settled`` is resolved as it ends, however it ends."""
        self._waiting += 1
        try:
            async with asyncio.timeout(IO_SECONDS), self._slots:
                return await command(*args)
        finally:
            self._waiting -= 1
            if settled is not None:
                _settle(settled)

    def _rejected(self, reason: str) -> None:
        # Whoever writes to Redis decides how often this happens: one line per WARN_EVERY
        # seconds at most, with the count since the last.
        self.rejected += 1
        self._unreported += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning("shared cache value rejected (%s): not used", reason,
                        extra={"reason": reason, "rejected": self._unreported})
            self._warned_at, self._unreported = now, 0

    def _failed(self, why: str) -> None:
        self.errors += 1
        if self.breaker.failed():
            log.warning("shared cache unavailable (%s): answering from this pod's cache and webhooks, asked again "
                        "in %g s", why, self.breaker.seconds, extra={"error": why})


def _settle(settled: asyncio.Future[None]) -> None:
    if not settled.done():
        settled.set_result(None)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # An operation its caller stopped waiting for may fail later: counted then already, or
    # never needed (the warm-up); retrieved, so asyncio does not log it as lost.
    if not task.cancelled():
        task.exception()


class RedisEntry:
    """One entry of a ``RedisStore`` (``sidecar.rules.fleet.SharedEntry``): its name, its
    keys, and the token of the lock this pod holds on it, if any."""

    __slots__ = ("keys", "name", "store", "token")

    def __init__(self, store: RedisStore, name: bytes) -> None:
        self.store = store
        self.name = name
        tag = PREFIX + "{" + base64.urlsafe_b64encode(name).rstrip(b"=").decode() + "}"
        self.keys = (tag, tag + ":lock")
        self.token = b""

    async def claim(self, lock_seconds: float) -> Claim:
        return await self.store.claim(self, lock_seconds)

    async def publish(self, value: bytes, expires_at: float) -> None:
        await self.store.publish(self, value, expires_at)

    async def release(self) -> None:
        await self.store.release(self)


def connect(url: str, *, cluster: bool, password: str | None, ca_bundle: str | None) -> Client:
    """A redis-py asyncio client for ``url`` (``redis://``, ``rediss://``, ``unix://``; with
    ``cluster``, any node of a Redis Cluster). No I/O: it connects on first use. Raises
    ValueError for a URL redis-py does not take."""
    options: dict[str, object] = {
        "socket_timeout": IO_SECONDS, "socket_connect_timeout": IO_SECONDS,
        # One try: the caller's budget is far shorter than a retry's backoff, and the breaker
        # is what decides when to try again.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "client_name": "safous-sidecar",
    }
    if password is not None:
        options["password"] = password
    if ca_bundle is not None:
        options["ssl_ca_certs"] = ca_bundle
    try:
        if cluster:
            return RedisCluster.from_url(url, max_connections=CONNECTIONS, **options)
        # Not a blocking pool: the store's own semaphore already keeps to CONNECTIONS, and a
        # blocking pool's wait costs every command a task of its own.
        return Redis.from_pool(ConnectionPool.from_url(url, max_connections=CONNECTIONS, **options))
    except (ValueError, RedisError, RedisClusterException) as exc:
        raise ValueError(f"--shared-cache {url}: {exc}") from exc

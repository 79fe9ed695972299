"""Per-rule decision cache and single flight for webhook calls.

Both are keyed by a fixed-size digest (``request_key``) of one rule and the values of the
parameters it uses, which determine its rendered webhook request (method, URL, headers,
body) exactly: equal parameters give equal requests and share an entry, while anything the
webhook could see differently gets its own. Secrets are not part of the key (authentication
is added by the HTTP client after rendering). A digest keeps a key small whatever a client
sends: a 60 KB header costs the cache 16 bytes, not 60 KB.

The cache is one LRU over all rules, bounded in bytes (what each entry holds, as its owner
measures it, plus a fixed overhead) and in entries. A rule's entries live ``cache_ttl``
seconds when the webhook gave a real answer (criteria met or not), and at most
``failure_ttl`` seconds when the call itself failed (timeout, unreachable, 5xx, unparsable
answer, OAuth), so an outage is retried promptly. Expired entries are dropped as time passes
(a heap by expiry, popped on every get and on every put that keeps something), not only when
looked up again.
``forget_rule`` drops a rule's entries when the rule changes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_MAX_BYTES = 64 << 20
ENTRY_OVERHEAD = 400
"""Bytes an entry costs besides its value: the key, the LRU and heap slots, the entry."""


def key_seed(fingerprint: bytes) -> hashlib.blake2b:
    """The digest state of a rule (its fingerprint) that its request keys start from: copying
    it costs less than starting a digest for every key."""
    return hashlib.blake2b(fingerprint, digest_size=16)


def request_key(seed: hashlib.blake2b, values: Iterable[str]) -> bytes:
    """A 16-byte digest of a rule (``key_seed``) and its parameter values, in order. Each value
    is length-prefixed, so no two different lists share an encoding."""
    digest = seed.copy()
    for value in values:
        data = value.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


@dataclass(slots=True)
class _Entry(Generic[T]):
    value: T
    expires: float
    rule: str
    size: int


class DecisionCache(Generic[T]):
    """``sizeof(value)``: the bytes a cached value holds (its strings); ``ENTRY_OVERHEAD`` is
    added to it. A value bigger than the whole cache is not kept."""

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, sizeof: Callable[[T], int] = lambda _: 0) -> None:
        self._entries: OrderedDict[Hashable, _Entry[T]] = OrderedDict()
        self._by_rule: dict[str, set[Hashable]] = {}
        self._expiry: list[tuple[float, int, Hashable]] = []
        self._sequence = itertools.count()
        self._max = max_entries
        self._max_bytes = max_bytes
        self._sizeof = sizeof
        self._clock = clock
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> T | None:
        self._purge(self._clock())
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.value

    def put(self, rule: str, key: Hashable, value: T, ttl: float) -> None:
        if ttl <= 0 or self._max <= 0:
            return  # after every call of a rule without a cache too: nothing kept, no work done
        now = self._clock()
        self._purge(now)
        size = ENTRY_OVERHEAD + self._sizeof(value)
        if size > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        expires = now + ttl
        self._entries[key] = _Entry(value, expires, rule, size)
        self.bytes += size
        self._by_rule.setdefault(rule, set()).add(key)
        heapq.heappush(self._expiry, (expires, next(self._sequence), key))
        while len(self._entries) > self._max or self.bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        if len(self._expiry) > 2 * len(self._entries) + 64:
            # Entries dropped or replaced leave their heap items behind: rebuild now and then.
            self._expiry = [(e.expires, next(self._sequence), k) for k, e in self._entries.items()]
            heapq.heapify(self._expiry)

    def forget_rule(self, rule: str) -> None:
        for key in list(self._by_rule.get(rule, ())):
            self._drop(key)

    def _purge(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            expires, _, key = heapq.heappop(expiry)
            entry = self._entries.get(key)
            if entry is not None and entry.expires == expires:
                self._drop(key)

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        keys = self._by_rule.get(entry.rule)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_rule[entry.rule]


class SingleFlight(Generic[T]):
    """Identical calls in flight at the same moment are made once and their result shared.

    The call runs in its own task so that one caller giving up (its check was decided or
    cancelled) does not cancel it for the others; it is cancelled only when no caller waits
    for it any more.
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, tuple[asyncio.Task[T], list[int]]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: Hashable) -> bool:
        """Whether a call for ``key`` is in flight now (a caller would share it)."""
        return key in self._flights

    async def do(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is None:
            task = asyncio.ensure_future(call())
            flight = (task, [0])
            self._flights[key] = flight
            task.add_done_callback(functools.partial(self._done, key, flight))
        task, waiters = flight
        waiters[0] += 1
        try:
            return await asyncio.shield(task)
        finally:
            waiters[0] -= 1
            if waiters[0] == 0 and not task.done():
                # Forget it first: a caller arriving now must start a fresh call, not join one
                # that is being cancelled.
                if self._flights.get(key) is flight:
                    del self._flights[key]
                task.cancel()

    def _done(self, key: Hashable, flight: tuple[asyncio.Task[T], list[int]], _task: object = None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        task = flight[0]
        if not task.cancelled():
            task.exception()  # retrieved: a failure is re-raised to every waiter, never "never retrieved"

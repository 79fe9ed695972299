"""Per-rule decision cache and single flight for webhook calls.

Both are keyed by one rule and the values of the parameters it uses, which determine its
rendered webhook request (method, URL, headers, body) exactly: equal parameters give equal
requests and share an entry, while anything the webhook could see differently gets its own.
Secrets are not part of the key (authentication is added by the HTTP client after rendering).

The cache is one LRU over all rules, bounded in entries. A rule's entries live ``cache_ttl``
seconds when the webhook gave a real answer (criteria met or not), and at most
``failure_ttl`` seconds when the call itself failed (timeout, unreachable, 5xx, unparsable
answer, OAuth), so an outage is retried promptly. ``forget_rule`` drops a rule's entries when the
rule changes.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Entry(Generic[T]):
    value: T
    expires: float
    rule: str


class DecisionCache(Generic[T]):
    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[Hashable, _Entry[T]] = OrderedDict()
        self._by_rule: dict[str, set[Hashable]] = {}
        self._max = max_entries
        self._clock = clock
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= self._clock():
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.value

    def put(self, rule: str, key: Hashable, value: T, ttl: float) -> None:
        if ttl <= 0 or self._max <= 0:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(value, self._clock() + ttl, rule)
        self._by_rule.setdefault(rule, set()).add(key)
        while len(self._entries) > self._max:
            self._drop(next(iter(self._entries)))

    def forget_rule(self, rule: str) -> None:
        for key in self._by_rule.pop(rule, ()):
            self._entries.pop(key, None)

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
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

    async def do(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        flight = self._flights.get(key)
        if flight is None:
            task = asyncio.ensure_future(call())
            flight = (task, [0])
            self._flights[key] = flight
            task.add_done_callback(lambda _t, key=key, flight=flight: self._done(key, flight))
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

    def _done(self, key: Hashable, flight: tuple[asyncio.Task[T], list[int]]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        task = flight[0]
        if not task.cancelled():
            task.exception()  # retrieved: a failure is re-raised to every waiter, never "never retrieved"

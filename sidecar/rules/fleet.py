"""Decisions shared by the fleet: what a rule with a cache TTL does when this pod's cache misses.

Lookup order: this pod's own cache (``cache.DecisionCache``, asked by the evaluator first, on
the check's own turn of the loop) → the fleet's store → single flight across the fleet → the
webhook. The first pod to miss takes the entry's lock for the rule's timeout and calls; the
others poll for its answer (``POLL_SECONDS``, doubling) until the rule's timeout, then call
themselves; a holder that dies lets go by the lock's expiry, and the next poll takes it. An
answer from the fleet is kept locally for the rest of its lifetime, never longer, and never
longer than this pod keeps an answer of its own call (the rule's TTL; for a failed call, this
pod's ``--cache-failure-ttl``: with 0, it calls rather than use another pod's failure). What is
shared is what the pod's cache keeps (the outcome, its code and reason, the stored values),
with the same lifetimes: a failed call lives at most ``--cache-failure-ttl``, and is not shared
at all when that is 0.

The store (``SharedStore``, implemented over Redis by ``sidecar.shared_cache``) makes an
untrusted server trustworthy: it names, seals and verifies entries, bounds every operation in
time and stops asking when the server fails (a circuit breaker). This module sees plain bytes
and one fact per operation; an unavailable store only means calling the webhook, as a pod
without one would. A rule's entries are named by its fingerprint and its rendered request
(``material``), so a changed rule never reads the old rule's answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Literal, NamedTuple, Protocol

import orjson

from ..decision import Code
from . import EvaluatorMetric, trace
from .judge import RuleOutcome
from .model import ResponseAction
from .templates import WebhookRequest

__all__ = ["POLL_SECONDS", "Claim", "FleetCache", "Found", "SharedEntry", "SharedStore", "request_material"]

POLL_SECONDS = 0.005
"""The first wait between two looks at an entry another pod is filling; doubled up to
``MAX_POLL_SECONDS``."""
MAX_POLL_SECONDS = 0.04


class Found(NamedTuple):
    """An entry's value, verified by the store, and when it expires (seconds since the epoch)."""

    value: bytes
    expires_at: float


Claim = Found | Literal["held", "busy", "unavailable"]
"""What a look at an entry found: its value; no value, and the lock is now this pod's
(``held``: call, then ``publish``); no value, another pod holds the lock (``busy``: it is
calling); or no answer from the store (``unavailable``: call, as without one)."""


class SharedEntry(Protocol):
    """One entry of the fleet's store, named by its material. No method raises: a failure of
    the store reads as ``unavailable`` (or does nothing), within the store's time budget."""

    async def claim(self, lock_seconds: float) -> Claim:
        """The entry's value if there is one (verified: a value that fails is counted and
        dropped, never returned); else take the lock for ``lock_seconds`` if nobody holds it."""
        ...

    async def publish(self, value: bytes, expires_at: float) -> None:
        """Store ``value`` until ``expires_at`` (seconds since the epoch), and let go of the
        lock if this entry holds it."""
        ...

    async def release(self) -> None:
        """Let go of the lock if this entry holds it (or may: a look that took it after its
        budget), storing nothing; nothing to do otherwise."""
        ...


class SharedStore(Protocol):
    """The fleet's store of decisions (``sidecar.shared_cache``). ``entry`` costs no I/O;
    ``start`` and ``close`` bracket the server's life and never fail for the store's server
    being down (readiness does not depend on it)."""

    def entry(self, material: bytes) -> SharedEntry: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def metrics(self) -> Iterable[EvaluatorMetric]: ...


def request_material(fingerprint: bytes, request: WebhookRequest) -> bytes:
    """What names a rule's entry in the fleet's store: its fingerprint and the rendered
    request, every part length-prefixed so that no two requests share an encoding."""
    parts = [fingerprint, request.method.encode(), request.url.encode("utf-8", "surrogatepass")]
    for name, value in request.headers:
        parts += [name.encode("utf-8", "surrogatepass"), value.encode("utf-8", "surrogatepass")]
    parts.append(b"\x00" if request.body is None else b"\x01" + request.body)
    return b"".join(len(part).to_bytes(4, "little") + part for part in parts)


def encode(outcome: RuleOutcome, pod: str) -> bytes:
    """An outcome as the fleet shares it, with the pod whose call it was."""
    code, reason = outcome.failure if outcome.failure is not None else (None, None)
    return orjson.dumps([pod, code, reason, outcome.stored, outcome.failed_action])


def decode(value: bytes) -> tuple[RuleOutcome, str] | None:
    """``encode``'s outcome and pod, or None for anything else (sealed by this fleet, yet not
    a shape this release writes)."""
    try:
        pod, code, reason, stored, failed_action = orjson.loads(value)
        failure = None if code is None else (Code(code), reason)
    except (ValueError, TypeError):
        return None
    if not (isinstance(pod, str) and (failure is None or isinstance(reason, str)) and isinstance(stored, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in stored.items())
            and (failed_action is None or isinstance(failed_action, int))):
        return None
    return RuleOutcome(failure, stored, failed_action), pod


class FleetCache:
    """Single flight and answers across the fleet, over a ``SharedStore``. ``pod`` names this
    pod in what it shares (the trace of a pod that reads it shows whose call it was);
    ``clock``: seconds since the epoch, as the fleet's entries' expiries are."""

    def __init__(self, store: SharedStore, pod: str, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.pod = pod
        self._clock = clock
        self._background: set[asyncio.Task[None]] = set()
        self.hits = 0
        self.misses = 0
        self.waits = 0
        self.waits_given_up = 0
        self.undecodable = 0

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.close()

    def metrics(self) -> Iterator[EvaluatorMetric]:
        yield EvaluatorMetric("safous_shared_cache_hits", "Rule decisions answered from the fleet's shared cache",
                              "counter", self.hits)
        yield EvaluatorMetric("safous_shared_cache_misses", "Shared cache lookups that found nothing", "counter",
                              self.misses)
        yield EvaluatorMetric("safous_shared_cache_waits", "Lookups that waited for another pod's webhook call "
                              "(single flight across the fleet)", "counter", self.waits)
        yield EvaluatorMetric("safous_shared_cache_waits_given_up", "Waits for another pod that ended in a call of "
                              "this pod's own (the other pod died, or was slower than the rule's timeout)",
                              "counter", self.waits_given_up)
        yield EvaluatorMetric("safous_shared_cache_unreadable", "Shared cache values sealed by the fleet that this "
                              "release cannot read (not used)", "counter", self.undecodable)
        yield from self.store.metrics()

    async def fetch(self, rule: str, fingerprint: bytes, request: WebhookRequest, *, timeout: float,
                    actions: tuple[ResponseAction, ...], secret_parts: frozenset[str],
                    lifetime: Callable[[RuleOutcome], float],
                    call: Callable[[], Awaitable[RuleOutcome]]) -> tuple[RuleOutcome, float]:
        """The outcome of ``request`` for the rule named ``rule`` (its ``fingerprint``,
        ``timeout``, response ``actions``), whose own cache missed, and how many seconds to keep
        it there: from the fleet (for ``lifetime(outcome)`` at most), or from ``call`` (the
        webhook), whose outcome is then shared for ``lifetime(outcome)`` seconds. ``lifetime``:
        how long this pod keeps an outcome of its own call (the rule's TTL, its failure TTL).
        ``secret_parts``: the parts of the request a trace must not show
        (``trace.RuleTrace.keep_request``). Raises only what ``call`` raises (and cancellation)."""
        entry = self.store.entry(request_material(fingerprint, request))
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline, pause, waited = started + timeout, POLL_SECONDS, False
        while True:
            claim = await entry.claim(timeout + MAX_POLL_SECONDS)
            if isinstance(claim, Found):
                kept = self._found(claim, lifetime)
                if kept is not None:
                    noted = trace.note(rule, "fleet", actions, failure=kept[0].failure,
                                       failed_action=kept[0].failed_action)
                    if noted is not None:
                        noted.keep_request(request, secret_parts)
                        noted.pod, noted.seconds = kept[2], loop.time() - started
                    return kept[0], kept[1]
                # Unreadable, or not to be kept here (a failure, and this pod's failure TTL is 0):
                # call, as without it; an answer to share overwrites it.
                claim = "unavailable"
            elif claim != "unavailable" and not waited:
                self.misses += 1
            if claim != "busy" or loop.time() + pause > deadline:
                break
            if not waited:
                waited = True
                self.waits += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_POLL_SECONDS)
        if waited:
            self.waits_given_up += 1
        try:
            outcome = await call()
        except BaseException:
            self._spawn(entry.release())  # the others take over now, not at the lock's expiry
            raise
        seconds = lifetime(outcome)
        if seconds > 0:
            self._spawn(entry.publish(encode(outcome, self.pod), self._clock() + seconds))
        else:
            self._spawn(entry.release())
        return outcome, seconds

    def _found(self, found: Found, lifetime: Callable[[RuleOutcome], float]) -> tuple[RuleOutcome, float, str] | None:
        """The outcome in ``found``, how long to keep it, and whose call it was; None when it
        cannot be used."""
        decoded = decode(found.value)
        if decoded is None:
            self.undecodable += 1
            return None
        outcome, pod = decoded
        # Never past the entry's expiry, nor longer than this pod keeps its own call's outcome:
        # the other pod's clock may run ahead, and its failure TTL may be longer.
        seconds = min(found.expires_at - self._clock(), lifetime(outcome))
        if seconds <= 0:
            return None
        self.hits += 1
        return outcome, seconds, pod

    def _spawn(self, work: Awaitable[None]) -> None:
        # The check does not wait for the store: what other pods need is written behind it.
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

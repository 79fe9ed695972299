"""Prometheus metrics (prometheus-client), one registry per sidecar.

Labels are bounded by configuration, never by traffic: policy and rule names (set by admins),
results and codes (fixed enums). No user names, IPs, hosts or paths.

Per-check metrics are recorded from the activity log's batches, in its worker thread, so a
check pays nothing for them; state (cache, queue, snapshot) is read when scraped. Event-loop lag
is sampled by a timer (``LoopLagMonitor``), also at no cost to a check.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .decision import result_name

# The *_created series double the exposition for no use here.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client

log = logging.getLogger(__name__)

NO_POLICY = "(none)"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], Iterator[Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        return self._read()


class BatchHistogram(Collector):
    """A histogram fed a batch at a time: ``observe_many`` costs a C bisection per value where
    ``Histogram.observe`` costs a lock and Python per value (a third of the record stage's
    metrics time, one value per check)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        counts = [0] * len(self._counts)
        total = 0.0
        for value in values:
            counts[bisect.bisect_left(self._bounds, value)] += 1  # buckets are upper-inclusive
            total += value
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = self._counts, self._sum
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, math.inf], counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)


class Metrics:
    def __init__(self, state: Callable[[], Iterator[Any]]) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter("safous_decisions", "Decisions by policy, result and code",
                                 ["policy", "result", "code"], registry=self.registry)
        self.check_seconds = BatchHistogram("safous_check_duration_seconds", "Time to decide one check",
                                            LATENCY_BUCKETS, self.registry)
        self.webhook_calls = Counter("safous_webhook_calls", "Webhook calls made, by rule and outcome "
                                     "(ok or the failure code)", ["rule", "outcome"], registry=self.registry)
        self.webhook_seconds = Histogram("safous_webhook_call_duration_seconds", "Webhook call time, by rule",
                                         ["rule"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.loop_lag = Histogram("safous_event_loop_lag_seconds", "How late the event loop ran a timer: "
                                  "time in which no check could be answered", buckets=LOOP_LAG_BUCKETS,
                                  registry=self.registry)
        self.registry.register(_StateCollector(state))
        # safous_build_info{version="..."} 1: which release answers, for dashboards and alerts.
        Info("safous_build", "The running sidecar's release", registry=self.registry).info({"version": __version__})

    def record_batch(self, decisions: Sequence[Any]) -> None:
        """Count a batch of activity-log decisions (``db.ActivityRecord``): one increment per
        label set, not per decision."""
        tally = Tally((d.policy or NO_POLICY, result_name(d.allowed, d.audit_deny), d.code) for d in decisions)
        for labels, count in tally.items():
            self.decisions.labels(*labels).inc(count)
        self.check_seconds.observe_many(d.latency_ms / 1000 for d in decisions)

    def record_call(self, rule: str, outcome: str, seconds: float) -> None:
        self.webhook_calls.labels(rule, outcome).inc()
        self.webhook_seconds.labels(rule).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LoopLagMonitor:
    """Watches the event loop with a timer set every ``interval`` seconds. While the loop is
    stalled no check is answered (a blocking call, a long CPU burst, the GIL held by a thread),
    and the timer cannot run either: a stall of S seconds falls between two runs of the timer,
    so the time between them (the gap) is at least S, and at most S + ``interval``.

    ``histogram`` counts every lag, how late the timer ran (the gap less ``interval``): a stall
    of S seconds shows as a lag between S - ``interval`` and S. A gap above ``threshold`` is a
    stall and is logged as a warning, at most once every ``warn_every`` seconds, with the worst
    gap and the number of stalls since the last warning: a loop that stalls again and again
    cannot flood the log. The gap, not the lag, is what is compared: the lag of a stall that
    starts just after a run of the timer is the stall less ``interval``, so with a lag test a
    timer every 250 ms missed a 200 ms stall (read as 42.6 ms). ``clock`` is a monotonic clock
    in seconds.

    The interval is short, so that the histogram's lags and the logged gaps are within 50 ms of
    the stalls they stand for, and half the threshold, so that a normal gap is never a stall.
    Its cost is one wake-up of the process per interval, nothing per check: measured here, a
    wake-up costs ~130 µs of CPU (an idle process woken 50 times a second, by a timer that does
    nothing, used 6.6 ms a second), so 20 a second cost ~0.3 % of a core, idle or not."""

    def __init__(self, histogram: Histogram, *, interval: float = 0.05, threshold: float = 0.1,
                 warn_every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._histogram = histogram
        self._interval = interval
        self._threshold = threshold
        self._warn_every = warn_every
        self._clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._stalls = 0
        self._worst = 0.0
        self._warned_at = -math.inf

    def start(self) -> None:
        """Start sampling on the running event loop (a timer, not a task: nothing to await)."""
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._last = self._clock()
        self._timer = loop.call_later(self._interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        gap = self._clock() - self._last
        self._schedule(loop)
        self.record(gap)

    def record(self, gap: float) -> None:
        """Count the time (seconds) between two runs of the timer; warn if a stall is pending
        and the last warning is at least ``warn_every`` seconds old."""
        # A timer may run a hair early (the loop's clock resolution): no lag, not a negative one.
        self._histogram.observe(max(gap - self._interval, 0.0))
        if gap > self._threshold:
            self._stalls += 1
            self._worst = max(self._worst, gap)
        now = self._clock()
        if self._stalls and now - self._warned_at >= self._warn_every:
            log.warning("event loop stalled for %.0f ms", self._worst * 1000,
                        extra={"lag_ms": round(self._worst * 1000, 1), "stalls": self._stalls})
            self._stalls, self._worst, self._warned_at = 0, 0.0, now


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)

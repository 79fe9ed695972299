"""Prometheus metrics (prometheus-client), one registry per sidecar.

Labels are bounded by configuration, never by traffic: policy and rule names (set by admins),
results and codes (fixed enums). No user names, IPs, hosts or paths.

Per-check metrics are recorded from the activity log's batches, in its worker thread, so a
check pays nothing for them; state (cache, queue, snapshot) is read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# The *_created series double the exposition for no use here.
disable_created_metrics()

NO_POLICY = "(none)"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], Iterator[Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        return self._read()


class Metrics:
    def __init__(self, state: Callable[[], Iterator[Any]]) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter("safous_decisions", "Decisions by policy, result and code",
                                 ["policy", "result", "code"], registry=self.registry)
        self.check_seconds = Histogram("safous_check_duration_seconds", "Time to decide one check",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.webhook_calls = Counter("safous_webhook_calls", "Webhook calls made, by rule and outcome "
                                     "(ok or the failure code)", ["rule", "outcome"], registry=self.registry)
        self.webhook_seconds = Histogram("safous_webhook_call_duration_seconds", "Webhook call time, by rule",
                                         ["rule"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(state))

    def record_batch(self, decisions: Sequence[Any]) -> None:
        """Count a batch of activity-log decisions (``store.ActivityRecord``)."""
        for d in decisions:
            self.decisions.labels(d.policy or NO_POLICY, "allow" if d.allowed else "deny", d.code).inc()
            self.check_seconds.observe(d.latency_ms / 1000)

    def record_call(self, rule: str, outcome: str, seconds: float) -> None:
        self.webhook_calls.labels(rule, outcome).inc()
        self.webhook_seconds.labels(rule).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)

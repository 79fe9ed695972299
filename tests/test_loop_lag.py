"""Event-loop lag: measured by the running sidecar, scraped from /metrics, stalls logged."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram

from sidecar.metrics import LOOP_LAG_BUCKETS, LoopLagMonitor
from sidecar.policies import Policy
from sidecar.server import Sidecar
from sidecar.settings import Settings
from tests.conftest import seed
from tests.helpers import FakeClock, eventually, metric, ops_get


def stall_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sidecar.metrics" and r.levelno == logging.WARNING]


def test_stall_warnings_are_rate_limited_and_report_the_worst_stall(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    histogram = Histogram("lag", "lag", buckets=LOOP_LAG_BUCKETS, registry=registry)
    clock = FakeClock()
    monitor = LoopLagMonitor(histogram, interval=0.02, threshold=0.1, warn_every=10.0, clock=clock)

    monitor.record(0.022)  # a normal tick, 2 ms late: counted, not a stall
    assert stall_warnings(caplog) == []
    monitor.record(0.3)  # the first stall is reported at once
    clock.now += 1
    monitor.record(0.5)
    clock.now += 1
    monitor.record(0.2)
    monitor.record(0.0199)  # a timer a hair early counts as no lag
    assert [(r.getMessage(), r.lag_ms, r.stalls) for r in stall_warnings(caplog)] == [
        ("event loop stalled for 300 ms", 300.0, 1)]
    clock.now += 8  # 10 s after the first warning: the pending stalls are reported on the next tick
    monitor.record(0.0205)
    clock.now += 10
    monitor.record(0.0205)  # nothing pending, nothing logged
    assert [(r.getMessage(), r.lag_ms, r.stalls) for r in stall_warnings(caplog)] == [
        ("event loop stalled for 300 ms", 300.0, 1), ("event loop stalled for 500 ms", 500.0, 2)]

    # The histogram holds the lags: each gap less the interval.
    assert registry.get_sample_value("lag_count") == 7
    assert registry.get_sample_value("lag_bucket", {"le": "0.001"}) == 3
    assert registry.get_sample_value("lag_bucket", {"le": "0.1"}) == 4
    assert registry.get_sample_value("lag_bucket", {"le": "0.25"}) == 5
    assert registry.get_sample_value("lag_sum") == pytest.approx(0.943)


async def test_a_stall_just_after_a_tick_is_seen_with_the_default_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    """The stall least favourable to a timer: it starts as the timer has just run, so the next
    run is due long before the stall ends and a lag (how late that run is) understates it by
    the whole interval."""
    loop = asyncio.get_running_loop()
    stalled_at: list[float] = []

    class StallAfterFirstTick(LoopLagMonitor):
        def record(self, gap: float) -> None:
            super().record(gap)
            if not stalled_at:  # on the loop, right after this run of the timer
                stalled_at.append(time.monotonic())
                loop.call_soon(time.sleep, 0.15)

    histogram = Histogram("lag", "lag", buckets=LOOP_LAG_BUCKETS, registry=CollectorRegistry())
    monitor = StallAfterFirstTick(histogram)
    monitor.start()
    try:
        await eventually(lambda: stalled_at and time.monotonic() - stalled_at[0] > 0.3, what="the stall")
    finally:
        monitor.stop()
    warnings = [r for r in stall_warnings(caplog) if r.lag_ms >= 150]
    assert len(warnings) == 1, [r.getMessage() for r in stall_warnings(caplog)]
    assert warnings[0].lag_ms < 1000


async def test_a_blocked_event_loop_shows_in_metrics_and_logs(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    seed(db, [], [Policy(name="open", integration=False)])
    sidecar = Sidecar(Settings(db=db, listen="127.0.0.1:0", http="127.0.0.1:0", reload_interval=0.05))
    # The default interval; every stall logged, so a slow start cannot hide the one made here.
    sidecar.loop_lag = LoopLagMonitor(sidecar.metrics.loop_lag, warn_every=0)
    await sidecar.start()
    try:
        def lag_counts(text: str) -> tuple[float, float]:
            return (metric(text, "safous_event_loop_lag_seconds_count"),
                    metric(text, "safous_event_loop_lag_seconds_bucket", le="0.25"))

        async def ticked() -> bool:
            return lag_counts((await ops_get(sidecar.ops.port, "/metrics"))[1])[0] > 0

        await eventually(ticked)
        assert stall_warnings(caplog) == [] or all(r.lag_ms < 250 for r in stall_warnings(caplog))

        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # a blocking call on the loop

        async def stalled() -> bool:
            count, up_to_250ms = lag_counts((await ops_get(sidecar.ops.port, "/metrics"))[1])
            return count - up_to_250ms >= 1

        await eventually(stalled)
        warnings = [r for r in stall_warnings(caplog) if r.lag_ms >= 250]
        assert len(warnings) == 1
        assert re.fullmatch(r"event loop stalled for \d+ ms", warnings[0].getMessage())
        assert 300 <= warnings[0].lag_ms < 2000  # the time between two runs of the timer
        assert abs(warnings[0].lag_ms - int(warnings[0].getMessage().split()[-2])) <= 1
    finally:
        await sidecar.stop(grace=0)

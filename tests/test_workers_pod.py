"""``--workers``: one truthful /metrics and /readyz for the pod, and workers started again when
they die. The real program, checks spread over the workers (a new connection per check)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.pod_metrics import PodTotals, merge_expositions, parse_exposition
from tests.conftest import check_request
from tests.helpers import OK, eventually, free_port, metric, ops_get, start_server

WORKERS = 2
FRESH = [("grpc.use_local_subchannel_pool", 1)]


def decisions(text: str) -> float:
    """Every decision counted on a metrics page (all policies, results and codes)."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "safous_decisions_total")


async def send_checks(port: int, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FRESH) as channel:
            response = await pb_grpc.AuthorizationStub(channel).Check(check_request(f"/c{i}"))
            assert response.status.code == OK


def worker_pids(supervisor: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(pid) for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}


@pytest.mark.timeout(90)
async def test_the_pods_metrics_and_readiness_under_workers(tmp_path: Path) -> None:
    port, http = free_port(), free_port()
    log, _ = await asyncio.to_thread(
        start_server, tmp_path / "rules.db", "--listen", f"127.0.0.1:{port}", "--workers", str(WORKERS),
        "--http", f"127.0.0.1:{http}", "--default-action", "allow")
    proc = log.proc
    try:
        async def ready() -> bool:
            return (await ops_get(http, "/readyz"))[0] == 200

        await eventually(ready, timeout=15)
        await send_checks(port, 40)

        async def counted() -> float:
            return decisions((await ops_get(http, "/metrics"))[1]) == 40

        await eventually(counted, what="the pod's metrics counting the 40 checks")
        served = {r["worker"] for r in log.records() if r.get("logger") == "sidecar.decision"}
        # Whichever worker a scrape would have reached, the pod's page says the same.
        pages = [(await ops_get(http, "/metrics"))[1] for _ in range(6)]
        assert [decisions(page) for page in pages] == [40] * 6
        assert served == set(range(WORKERS))  # both workers answered some
        assert metric(pages[0], "safous_workers") == WORKERS
        assert metric(pages[0], "safous_worker_restarts_total") == 0
        # Gauges stay per worker: a sum of two snapshot versions means nothing.
        assert {metric(pages[0], "safous_ready", worker=str(w)) for w in range(WORKERS)} == {1}

        victim = min(worker_pids(proc.pid))
        os.kill(victim, signal.SIGKILL)

        async def reported_down() -> str:
            status, body = await ops_get(http, "/readyz")
            return body if status == 503 else ""

        assert "not running or not answering" in await eventually(reported_down, timeout=5)
        await eventually(ready, timeout=15)
        assert victim not in worker_pids(proc.pid) and len(worker_pids(proc.pid)) == WORKERS
        page = (await ops_get(http, "/metrics"))[1]
        assert metric(page, "safous_worker_restarts_total") == 1
        assert decisions(page) == 40  # the dead worker's counts are kept: no counter reset
        await send_checks(port, 10, start=40)

        async def counted_more() -> bool:
            return decisions((await ops_get(http, "/metrics"))[1]) == 50

        await eventually(counted_more)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        await asyncio.to_thread(log.close)


def test_summed_families_and_per_worker_gauges() -> None:
    page = ('# HELP x_total Things\n# TYPE x_total counter\nx_total{p="a"} 3\n'
            '# HELP g A gauge\n# TYPE g gauge\ng 7\n'
            '# HELP h Time\n# TYPE h histogram\nh_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 3\nh_count 3\nh_sum 1.5\n')
    other = page.replace('x_total{p="a"} 3', 'x_total{p="a"} 4').replace("g 7", "g 9")
    totals = PodTotals()
    totals.retire(parse_exposition(page))  # a worker that died after counting as much
    merged = merge_expositions({0: parse_exposition(page), 1: parse_exposition(other)}, totals).decode()
    assert metric(merged, "x_total", p="a") == 3 + 4 + 3
    assert metric(merged, "h_bucket", le="+Inf") == 9 and metric(merged, "h_sum") == 4.5
    assert (metric(merged, "g", worker="0"), metric(merged, "g", worker="1")) == (7, 9)

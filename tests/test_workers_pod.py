"""``--workers``: one truthful /metrics and /readyz for the pod, and workers started again when
they die. The real program, checks spread over the workers (a new connection per check)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar import workers
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.pod_metrics import PodTotals, merge_expositions, parse_exposition
from sidecar.settings import Settings
from sidecar.workers import SOCKET_PATH_MAX_BYTES, AnswerTooLarge, Supervisor, read_answer, sockets_dir
from tests.conftest import check_request
from tests.helpers import FRESH, OK, ServerLog, eventually, free_port, metric, ops_get, start_server
from tests.signed_bundles import ALLOW_ALL, Keys, bundle_of

WORKERS = 2
REFRESH = 1.0  # --workers-refresh where a test waits for a read between scrapes


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


@contextlib.asynccontextmanager
async def pod(tmp_path: Path, *args: str) -> AsyncIterator[tuple[ServerLog, int, int]]:
    """``serve --workers WORKERS --http`` on fixed ports, ready: its log, gRPC and HTTP ports.
    Stopped (and its log closed) on the way out."""
    port, http = free_port(), free_port()
    log, _ = await asyncio.to_thread(
        start_server, tmp_path / "rules.db", "--listen", f"127.0.0.1:{port}", "--workers", str(WORKERS),
        "--http", f"127.0.0.1:{http}", *args)
    try:
        await eventually(lambda: ready(http), timeout=15)
        yield log, port, http
    finally:
        await asyncio.to_thread(log.close)


async def ready(http: int) -> bool:
    return (await ops_get(http, "/readyz"))[0] == 200


async def stop(log: ServerLog) -> None:
    log.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(log.proc.wait, 15) == 0


@pytest.mark.timeout(90)
async def test_the_pods_metrics_and_readiness_under_workers(tmp_path: Path) -> None:
    async with pod(tmp_path, "--default-action", "allow") as (log, port, http):
        proc = log.proc
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
        started = log.entry("workers started")
        assert started is not None and set(started["pids"]) == worker_pids(proc.pid)
        index = started["pids"].index(victim)  # the supervisor's slots, in order
        os.kill(victim, signal.SIGKILL)

        async def reported_down() -> str:
            status, body = await ops_get(http, "/readyz")
            return body if status == 503 else ""

        assert f"worker {index}: not running or not answering" in await eventually(reported_down, timeout=5)
        await eventually(lambda: ready(http), timeout=15)
        assert victim not in worker_pids(proc.pid) and len(worker_pids(proc.pid)) == WORKERS
        page = (await ops_get(http, "/metrics"))[1]
        assert metric(page, "safous_worker_restarts_total") == 1
        assert decisions(page) == 40  # the dead worker's counts are kept: no counter reset
        await send_checks(port, 10, start=40)

        async def counted_more() -> bool:
            return decisions((await ops_get(http, "/metrics"))[1]) == 50

        await eventually(counted_more)
        await stop(log)


@pytest.mark.timeout(60)
async def test_the_pods_readiness_shows_each_workers_bundle_revision(tmp_path: Path) -> None:
    """With --bundle, the pod's /readyz says which revision each worker answers by (a worker's
    own page does; the supervisor's must not hide it)."""
    private, public, _ = Keys(tmp_path).make("signing")
    source = tmp_path / "bundle.jws"
    source.write_bytes(bundle_of(ALLOW_ALL, private, 7))
    async with pod(tmp_path, "--bundle", str(source), "--bundle-verification-key", str(public),
                   "--bundle-poll-interval", "0.2") as (log, _, http):
        status, body = await ops_get(http, "/readyz")
        assert status == 200 and body.startswith(f"ready ({WORKERS} workers)\n"), body
        for index in range(WORKERS):
            assert f"worker {index}: bundle: revision 7-" in body, body
        await stop(log)


@pytest.mark.timeout(60)
async def test_a_worker_that_dies_between_scrapes_keeps_its_counts(tmp_path: Path) -> None:
    """The supervisor reads the workers' pages between scrapes too (every --workers-refresh
    seconds): checks a worker counted seconds before it died, with no scrape since, still count."""
    async with pod(tmp_path, "--default-action", "allow", "--workers-refresh", str(REFRESH)) as (log, port, http):
        proc = log.proc
        await send_checks(port, 20)

        def served() -> set[int]:
            return {r["worker"] for r in log.records() if r.get("logger") == "sidecar.decision"}

        started = log.entry("workers started")
        assert started is not None
        victim = started["pids"][min(await eventually(served))]  # a worker that counted some
        # Counted by the workers (their activity log's batches), then read by the supervisor.
        await asyncio.sleep(REFRESH + 1.5)
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: victim not in worker_pids(proc.pid), timeout=5)

        async def restarted() -> float | bool:
            page = (await ops_get(http, "/metrics"))[1]
            return metric(page, "safous_worker_restarts_total") == 1 and decisions(page)

        assert await eventually(restarted, timeout=15) == 20
        await eventually(lambda: ready(http), timeout=15)
        await stop(log)


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


def test_a_scrape_parses_again_only_series_it_has_not_read() -> None:
    """A worker's series seen in its previous scrape are summed as written; anything else is
    parsed in full, and what is not an exposition is refused either way."""
    page = ('# HELP x_total Things\n# TYPE x_total counter\nx_total{p="a"} 3.0\nx_total{p="b c"} 1.0\n'
            '# HELP h Time\n# TYPE h histogram\nh_bucket{le="1.0"} 2.0\nh_bucket{le="+Inf"} 3.0\nh_count 3.0\n'
            'h_sum 1.5\n# HELP g A gauge\n# TYPE g gauge\ng 7.0\n')
    previous = parse_exposition(page)
    later = [
        page.replace('x_total{p="a"} 3.0', 'x_total{p="a"} 5.0').replace("g 7.0", "g 8.0"),  # counts moved
        page.replace('x_total{p="b c"} 1.0', 'x_total{p="b c"} 1.0\nx_total{p="d"} 2.0'),  # a new series
        page.replace('x_total{p="b c"} 1.0\n', ""),  # one gone
    ]
    for text in later:
        assert merge_expositions({0: parse_exposition(text, previous)}, PodTotals()) == \
            merge_expositions({0: parse_exposition(text)}, PodTotals())
    refused = [
        page.replace('x_total{p="a"} 3.0', 'x_total{p="a"} 3.0 1700000000000'),  # a timestamp
        page.replace('x_total{p="a"} 3.0', 'x_total{p="a"} three'),
        page.replace('x_total{p="a"} 3.0', 'y_total{p="a"} 3.0'),  # not of its family
        page.replace("# HELP h Time\n", ""),
        'x_total{p="a"} 3.0\n' + page,  # before any family
    ]
    for text in refused:
        with pytest.raises(ValueError):
            parse_exposition(text, previous)


# --- where the workers' sockets go ------------------------------------------------------------


def test_sockets_go_to_the_temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # as TMPDIR would
    made = Path(sockets_dir(tmp_path / "db" / "rules.db", 4))
    assert made.parent == temporary and made.name.startswith("safous-workers-")
    assert made.stat().st_mode & 0o777 == 0o700


def test_sockets_go_beside_rules_db_without_a_usable_temporary_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "db").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    assert Path(sockets_dir(tmp_path / "db" / "rules.db", 4)).parent == tmp_path / "db"


def deep(base: Path, length: int) -> Path:
    """A directory under ``base`` whose path is ``length`` bytes long."""
    path = base
    while len(os.fsencode(path)) < length - 11:
        path /= "d" * min(10, length - 11 - len(os.fsencode(path)))
    path /= "e" * (length - len(os.fsencode(path)) - 1)
    path.mkdir(parents=True)
    assert len(os.fsencode(path)) == length
    return path


def test_a_directory_too_deep_for_a_socket_path_is_passed_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sun_path holds 108 bytes: a socket path longer than that cannot be bound."""
    # "/safous-workers-XXXXXXXX/3.sock": 31 bytes after the directory.
    too_deep, deepest_that_fits = deep(tmp_path, SOCKET_PATH_MAX_BYTES - 30), deep(tmp_path, SOCKET_PATH_MAX_BYTES - 31)
    monkeypatch.setattr(tempfile, "tempdir", str(too_deep))
    assert Path(sockets_dir(deepest_that_fits / "rules.db", 4)).parent == deepest_that_fits
    assert not list(too_deep.iterdir())  # tried, and removed
    monkeypatch.setattr(tempfile, "tempdir", str(deepest_that_fits))
    assert Path(sockets_dir(too_deep / "rules.db", 4)).parent == deepest_that_fits
    monkeypatch.setattr(tempfile, "tempdir", str(too_deep))
    with pytest.raises(OSError, match=r"too deep for a Unix socket path .*set TMPDIR to a short writable directory"):
        sockets_dir(too_deep / "rules.db", 4)


@pytest.mark.timeout(30)
def test_a_pod_without_a_directory_for_its_sockets_does_not_start(tmp_path: Path) -> None:
    too_deep = deep(tmp_path, SOCKET_PATH_MAX_BYTES)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--db", str(too_deep / "rules.db"), "--listen",
         f"127.0.0.1:{free_port()}", "--workers", "2"],
        env={**os.environ, "TMPDIR": str(too_deep)}, cwd=too_deep, capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert "cannot start: no directory for the workers' sockets" in result.stderr
    assert "Traceback" not in result.stderr


# --- the supervisor alone, with stand-in workers ----------------------------------------------


class Alive:
    """A worker process as ``Supervisor`` sees it, without running one."""

    pid = 0
    exitcode = None

    def is_alive(self) -> bool:
        return True


def replying(answer: Callable[[], str | bytes]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        text = answer()
        return web.Response(body=text.encode() if isinstance(text, str) else text)

    return handler


@contextlib.asynccontextmanager
async def stand_in_workers(supervisor: Supervisor,
                           answers: list[Callable[[], str]]) -> AsyncIterator[None]:
    """Serve ``answers[i]()`` as worker i's /metrics on its ops socket."""
    runners = []
    try:
        for slot, answer in zip(supervisor._slots, answers, strict=True):
            app = web.Application()
            app.router.add_get("/metrics", replying(answer))
            runner = web.AppRunner(app)
            await runner.setup()
            await web.UnixSite(runner, slot.socket_path).start()
            runners.append(runner)
            slot.process = Alive()  # type: ignore[assignment]
        yield
    finally:
        for runner in runners:
            await runner.cleanup()
        shutil.rmtree(supervisor._dir, ignore_errors=True)


def counted(total: int) -> str:
    return f"# HELP x_total Things\n# TYPE x_total counter\nx_total {total}\n"


async def pod_page(supervisor: Supervisor) -> str:
    response = await supervisor._metrics(None)  # type: ignore[arg-type]
    assert response.body is not None
    return bytes(response.body).decode()  # type: ignore[arg-type]


async def test_a_worker_answering_too_much_is_refused_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(workers, "ANSWER_MAX_BYTES", 1000)
    supervisor = Supervisor(Settings(db=tmp_path / "rules.db", workers=2))
    huge = counted(5) + "# " + "x" * 1000 + "\n"
    async with stand_in_workers(supervisor, [lambda: counted(3), lambda: huge]):
        page = await pod_page(supervisor)
    assert metric(page, "x_total") == 3  # worker 1's answer was not taken
    assert metric(page, "safous_workers_answering") == 1
    assert any("worker 1 answered /metrics with more than 1000 bytes" in r.getMessage() for r in caplog.records)


def probe_while(port: int, busy: threading.Event) -> list[float]:
    """Seconds each ``/healthz`` took, asked every 10 ms from this thread while ``busy`` is set."""
    seconds = []
    while busy.is_set():
        start = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            assert answer.status == 200
        seconds.append(time.monotonic() - start)
        time.sleep(0.01)
    return seconds


@pytest.mark.timeout(60)
async def test_healthz_answers_while_a_scrape_is_parsed(tmp_path: Path) -> None:
    """Four workers' large pages, new to the supervisor (parsed in full): the scrape takes a
    while, and the probes do not wait for it."""
    http = free_port()
    supervisor = Supervisor(Settings(db=tmp_path / "rules.db", workers=4, http=f"127.0.0.1:{http}"))
    pages = ["# HELP x_total Things\n# TYPE x_total counter\n" +
             "".join(f'x_total{{rule="rule-{n:05d}",source="{w}"}} {n}.0\n' for n in range(20_000)) for w in range(4)]
    runner = await supervisor._serve_http()
    busy = threading.Event()
    busy.set()
    try:
        async with stand_in_workers(supervisor, [lambda page=page: page for page in pages]):
            probing = asyncio.create_task(asyncio.to_thread(probe_while, http, busy))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            status, page = await ops_get(http, "/metrics")
            scrape = time.monotonic() - start
            busy.clear()
            probes = await probing
    finally:
        busy.clear()
        await runner.cleanup()
    assert status == 200 and metric(page, "x_total", rule="rule-00007", source="2") == 7
    assert scrape > 0.2, f"a scrape of {scrape:.3f} s proves nothing: larger pages needed"
    assert len(probes) >= 3 and max(probes) < scrape / 2, (scrape, probes)


async def test_answers_are_read_up_to_the_limit_even_without_a_length() -> None:
    """Chunked answers have no Content-Length: an endless one is cut at the limit, at once."""
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while True:
            await response.write(b"x" * 4096)

    app = web.Application()
    app.router.add_get("/endless", endless)
    app.router.add_get("/exact", replying(lambda: b"y" * 10_000))
    app.router.add_get("/over", replying(lambda: b"y" * 10_001))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(f"http://127.0.0.1:{port}/exact") as response:
                assert await read_answer(response, 10_000) == "y" * 10_000
            for path in ("/over", "/endless"):
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    with pytest.raises(AnswerTooLarge):
                        await read_answer(response, 10_000)
    finally:
        await runner.cleanup()


async def test_an_answer_from_a_worker_that_died_meanwhile_is_not_its_successors(tmp_path: Path) -> None:
    """Worker 0 answers, then dies and is started again before the scrape ends: its answer
    must not stand for the new worker, or its counts would be added twice (once retired, once
    as the new worker's) and the pod's counter would go down at the next scrape."""
    supervisor = Supervisor(Settings(db=tmp_path / "rules.db", workers=1))
    slot = supervisor._slots[0]
    restarted = False

    def answer() -> str:
        nonlocal restarted
        if restarted:
            return counted(0)  # the new worker, counting from zero
        # What Supervisor._watch does when the worker dies, before the answer is read.
        supervisor._totals.retire(slot.last)
        slot.last = None
        slot.process = Alive()  # type: ignore[assignment]
        restarted = True
        return counted(12)

    async with stand_in_workers(supervisor, [answer]):
        slot.last = parse_exposition(counted(10))  # its scrape before
        pages = [metric(await pod_page(supervisor), "x_total") for _ in range(3)]
    assert pages == sorted(pages), f"the pod's counter went down: {pages}"
    assert pages[-1] == 10


class FlakyContext:
    """multiprocessing's spawn context, whose Process.start fails as ``plan`` says: "exit" (a
    worker that exits at once), "fail" (start raises ENOMEM), "run" (a worker that runs)."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan
        self.spawn = multiprocessing.get_context("spawn")

    def Process(self, **_: Any) -> Any:  # noqa: N802  (multiprocessing's name)
        step = self.plan.pop(0)
        if step == "fail":
            return Unstartable()
        if step == "exit":
            return self.spawn.Process(target=sys.exit, args=(3,))
        return self.spawn.Process(target=time.sleep, args=(60,))


class Unstartable:
    def start(self) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")


async def test_a_worker_that_cannot_be_started_again_is_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(workers, "START_RETRY_SECONDS", 0.01)
    supervisor = Supervisor(Settings(db=tmp_path / "rules.db", workers=1))
    supervisor._context = FlakyContext(["exit", "fail", "fail", "run"])  # type: ignore[assignment]
    running = asyncio.create_task(supervisor.run())
    slot = supervisor._slots[0]
    try:
        await eventually(lambda: supervisor.restarts == 1 and slot.process is not None and slot.process.is_alive(),
                         timeout=15, what="the worker running again")
        failures = [r for r in caplog.records if "worker 0 could not be started" in r.getMessage()]
        assert len(failures) == 2 and all(r.levelno == logging.ERROR for r in failures)
    finally:
        supervisor._stopping.set()
        await asyncio.wait_for(running, 20)

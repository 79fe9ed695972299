"""``safous-admin ui``: the portal served over HTTP (uvicorn, as ``datasette serve`` does).

Loopback by default. The portal has no login and no TLS: whoever reaches the port reads the
activity and audit logs (user names, addresses; never a secret), so another address needs
``--insecure-listen``, and is warned about even then. On loopback a
request must name the portal's own address in its Host header: a web page the admin opens
elsewhere cannot point a name of its own at 127.0.0.1 (DNS rebinding) and read the portal
through the admin's browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator

import click
import uvicorn

from sidecar.settings import is_loopback, split_host_port

from ..access import Admin
from ..display import warn
from ..listening import bind
from ..validation import AdminError
from .app import Portal
from .asgi import host_guard

__all__ = ["allowed_hosts", "serve"]


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host headers a portal listening on ``host``:``port`` answers: the loopback names
    with that port when ``host`` is a loopback address, else any (None)."""
    if not is_loopback(host):
        return None
    names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
    return frozenset({f"{n}:{port}" for n in names} | (names if port == 80 else set()))


def serve(admin: Admin, listen: str, *, insecure_listen: bool = False) -> None:
    """Serve ``admin.db`` read-only on ``listen`` (HOST:PORT, port 0 picks one) until SIGINT or
    SIGTERM, then clean up and return. Prints the portal's address once it accepts connections.
    Raises ``AdminError`` (exit 2): a bad address, a network address without ``insecure_listen``,
    one that cannot be listened on, a missing rules.db."""
    try:
        host, port = split_host_port(listen)
    except ValueError as exc:
        raise AdminError(f"--listen: {exc}", 2) from None
    if not is_loopback(host):
        if not insecure_listen:
            raise AdminError(f"--listen {listen} is reachable from the network, and the portal has no login and no "
                             "TLS; listen on loopback (127.0.0.1, the default), or accept it on purpose with "
                             "--insecure-listen", 2)
        warn(f"the portal has no login: anyone who reaches {listen} reads the activity and audit logs "
             "(secrets stay out); the default, 127.0.0.1, keeps it to this machine")
    sock = bind(host, port)
    try:
        with Portal(admin) as portal:
            port = sock.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            app = host_guard(portal.datasette.app(), allowed_hosts(host, port))
            server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
            click.echo(f"portal on http://{shown}:{port}/ serving {admin.db} read-only (Ctrl-C stops)")
            asyncio.run(_serve(portal, server, sock))
    finally:
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server, stopping on SIGINT and SIGTERM as it does, without raising the signal
    again once stopped (uvicorn does, for its own command): the portal then removes its
    temporary files and the command exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def _serve(portal: Portal, server: uvicorn.Server, sock: socket.socket) -> None:
    await portal.datasette.invoke_startup()
    await server.serve(sockets=[sock])

"""A listening socket for the admin script's servers (``ui``, ``collect``), bound before the
server starts, so that its address can be printed and used at once."""

from __future__ import annotations

import socket

from .validation import AdminError

__all__ = ["bind"]


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` (port 0: any free one). Raises ``AdminError``
    (exit 2) when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A server restarted at once binds its port again, whatever connections of its last run wait.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening now: connections wait in the backlog until the server accepts them, so the
        # address printed can be used at once.
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise AdminError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 2) from None
    return sock

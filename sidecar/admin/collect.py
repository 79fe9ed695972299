"""``safous-admin collect``: the fleet's collector, writing the decisions the sidecars ship into
one activity log (``--db fleet.db``), which ``logs activity``, ``explain`` and ``ui`` then read
as they read a pod's rules.db. The server itself is ``sidecar.fleet.Collector``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .validation import AdminError

if TYPE_CHECKING:  # loaded by the command, not by the command line (a Tab must stay fast)
    import socket
    import ssl

    from sidecar.fleet import Collector

    from .access import Admin

__all__ = ["collect"]

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("collect")
@click.option("--listen", default="127.0.0.1:9300", show_default=True, metavar="HOST:PORT",
              help="Where the sidecars POST their batches (port 0: any free port). Beyond loopback, serve TLS "
              "(--tls-cert, --tls-key).")
@click.option("--token", "tokens", multiple=True, metavar="env:NAME|file:PATH",
              help="The bearer token the sidecars send (their --decision-log-bearer-token), as a reference within "
              "--secret-dir / --secret-env-prefix; repeat to accept two while one is rotated.  [required]")
@click.option("--tls-cert", type=_FILE, help="PEM certificate to serve HTTPS with.")
@click.option("--tls-key", type=_FILE, help="PEM private key of --tls-cert.")
@click.option("--insecure-listen", is_flag=True,
              help="Allow a --listen address the network reaches without TLS (refused otherwise: the token and "
              "the decisions would cross the network in clear).")
@click.option("--retention-days", type=click.FloatRange(min=0, min_open=True), metavar="DAYS",
              help="Delete decisions older than this many days (as the sidecar's --activity-retention-days).")
@click.option("--retention-rows", type=click.IntRange(min=1), metavar="N",
              help="Keep at most this many decisions, the newest (as --activity-retention-rows).")
@click.option("--keep-traces", type=click.IntRange(min=0), default=65_536, show_default=True, metavar="N",
              help="Traces kept at most, the newest (16 KiB each at most).")
@click.pass_obj
def collect(admin: Admin, listen: str, tokens: tuple[str, ...], tls_cert: Path | None, tls_key: Path | None,
            insecure_listen: bool, retention_days: float | None, retention_rows: int | None,
            keep_traces: int) -> None:
    """Collect the fleet's decisions into one activity log.

    Each sidecar started with --decision-log-url https://HOST:PORT/v1/decisions ships its
    decisions, with their traces and its pod's name, to this collector, which writes them into
    the activity log of --db (created if absent; give it a file of its own, e.g. fleet.db). A
    batch sent again after a lost answer is written once. Then `safous-admin --db fleet.db
    logs activity`, `explain REQUEST_ID` and `ui` show the whole fleet.

    Every batch needs a --token; batches without it, malformed, or past the bounds (4 MiB on
    the wire, 8 MiB decompressed, 5,000 records) are refused with an HTTP status that says
    why, and change nothing. Only the activity log and its traces are written, never rules or
    policies. GET /healthz and /metrics serve the probes. Ctrl-C or SIGTERM stops it.
    """
    import asyncio

    from sidecar import logs
    from sidecar.fleet import Collector
    from sidecar.settings import is_loopback, split_host_port

    from .display import warn
    from .listening import bind

    try:
        host, port = split_host_port(listen)
    except ValueError as exc:
        raise AdminError(f"--listen: {exc}", 2) from None
    context = _tls(tls_cert, tls_key)
    if context is None and not is_loopback(host):
        if not insecure_listen:
            raise AdminError(f"--listen {listen} is reachable from the network without TLS; listen on loopback "
                             "(127.0.0.1, the default), serve TLS (--tls-cert, --tls-key), or accept it on purpose "
                             "with --insecure-listen", 2)
        warn(f"the token and the decisions cross the network in clear to {listen}")
    collector = Collector(admin.db, _tokens(admin, tokens), keep_traces=keep_traces, retention_days=retention_days,
                          retention_rows=retention_rows)
    logs.configure("json", "info")
    sock = bind(host, port)
    try:
        asyncio.run(_serve(collector, sock, context, admin.db))
    finally:
        sock.close()


def _tokens(admin: Admin, references: tuple[str, ...]) -> list[str]:
    from sidecar.rules.secrets import SecretError, is_reference, resolve_secret

    if not references:
        raise AdminError("give the sidecars' token: --token env:NAME or --token file:PATH", 2)
    tokens = []
    for reference in references:
        if not is_reference(reference):
            raise AdminError("give the token as env:NAME or file:PATH, not in clear (it would show in process "
                             "lists and manifests)", 2)
        try:
            token = (resolve_secret(reference, admin.secrets) or "").strip()
        except SecretError as exc:
            raise AdminError(f"--token: {exc}", 2) from None
        if not token:
            raise AdminError(f"--token {reference} is empty", 2)
        tokens.append(token)
    return tokens


def _tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    import ssl

    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise AdminError("--tls-cert and --tls-key go together", 2)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise AdminError(f"cannot use --tls-cert {cert} and --tls-key {key}: {exc}", 2) from None
    return context


async def _serve(collector: Collector, sock: socket.socket, context: ssl.SSLContext | None, path: Path) -> None:
    import asyncio
    import signal

    from sidecar.fleet import PATH

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await collector.start(sock, context)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"collecting decisions on {'https' if context else 'http'}://{shown}:{port}{PATH} into {path} "
                   "(Ctrl-C stops)")
        await stop.wait()
    finally:
        await collector.stop()

"""``--workers N``: N server processes sharing the port (SO_REUSEPORT), supervised together."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys

from . import logs, store
from .server import run_loop, serve
from .settings import Settings, split_host_port

log = logging.getLogger(__name__)


def _worker(settings: Settings, index: int) -> None:
    logs.configure(settings.log_format, settings.log_level, worker=index)
    sys.exit(run_loop(settings, serve(settings, reuse_port=True)))


def _port_is_free(listen: str) -> bool:
    host, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def run_workers(settings: Settings) -> int:
    """``--workers N``: N server processes sharing the port (SO_REUSEPORT), each with its own
    event loop, rules snapshot and watcher. SIGTERM/SIGINT are passed on and the workers drain
    as a single server would; if one worker dies, the others are stopped too and the exit status
    is 1, so a supervisor restarts the whole sidecar rather than run it half-sized."""
    if split_host_port(settings.listen)[1] == 0:
        log.error("cannot start: --workers needs a fixed port, not 0")
        return 2
    if not _port_is_free(settings.listen):
        log.error("cannot start: cannot listen on %s: address in use", settings.listen)
        return 1
    try:
        store.ensure_database(settings.db)  # once, before the workers race to migrate
    except store.StoreError as exc:
        log.error("cannot start: %s", exc)
        return 1
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(settings, i), name=f"sidecar-worker-{i}")
               for i in range(settings.workers)]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.is_alive() and worker.pid:
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.start()
    log.info("workers started", extra={"workers": settings.workers, "pids": [w.pid for w in workers]})
    failed = False
    while any(w.is_alive() for w in workers):
        multiprocessing.connection.wait([w.sentinel for w in workers if w.is_alive()], timeout=1)
        if not stopping and any(not w.is_alive() and w.exitcode != 0 for w in workers):
            log.error("a worker exited unexpectedly; stopping the others",
                      extra={"exit_codes": [w.exitcode for w in workers]})
            failed = True
            forward(signal.SIGTERM, None)
    for worker in workers:
        worker.join()
    return 1 if failed or any(w.exitcode != 0 for w in workers) else 0

"""Real Redis servers for the shared cache's tests and benchmark: Debian's ``redis-server``,
started on loopback ports in a directory of their own, nothing persisted (``--save ""
--appendonly no``), never the system's service.

    with RedisServer.start(tmp) as server: ...     # redis://127.0.0.1:PORT; stop(), restart()
    with RedisCluster3.start(tmp) as cluster: ...  # three masters, every slot covered
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.helpers import free_port, needed_program

CLUSTER_SLOTS = 16384


def redis_binary() -> str:
    """``redis-server``'s path (``needed_program``)."""
    return needed_program("redis-server", "redis-server")


@dataclass
class RedisServer:
    """One redis-server process on ``port`` (kept across ``stop``/``restart``)."""

    binary: str
    directory: Path
    port: int
    extra: tuple[str, ...] = ()
    client_options: dict[str, Any] = field(default_factory=dict)
    """What a client needs beside the port (a TLS server's CA, a password)."""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    @contextlib.contextmanager
    def start(cls, directory: Path, *extra: str, binary: str | None = None, port: int | None = None,
              client_options: dict[str, Any] | None = None) -> Iterator[RedisServer]:
        """``extra``: more redis-server options; with ``{port}`` in one, the server's port goes
        there and the plain port is off (``--port 0 --tls-port {port}``)."""
        directory.mkdir(parents=True, exist_ok=True)
        server = cls(binary or redis_binary(), directory, port or free_port(), extra, client_options or {})
        server.restart()
        try:
            yield server
        finally:
            server.stop()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        """A plain client, as someone with access to the server (the test, an attacker)."""
        return redis.Redis(port=self.port, socket_timeout=5, **self.client_options)

    def restart(self, timeout: float = 10.0) -> None:
        """Start the process (again, on the same port) and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None
        extra = [arg.replace("{port}", str(self.port)) for arg in self.extra]
        port = "0" if any("{port}" in arg for arg in self.extra) else str(self.port)
        self.proc = subprocess.Popen(
            [self.binary, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / f"redis-{self.port}.log"),
             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"redis-server on {self.port} did not start: "
                                             f"{self.log()[-2000:]}") from None
                    time.sleep(0.01)  # a process starting: no event to wait on

    def stop(self) -> None:
        """Kill the process (as a crash or an OOM kill would) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        path = self.directory / f"redis-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _cluster_port() -> int:
    """A loopback port for a cluster node: at most 55535, and its bus port (10,000 higher) free too."""
    for _ in range(100):
        with socket.socket() as sock, socket.socket() as bus:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port > 55535:
                continue
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise AssertionError("no loopback port for a cluster node")


@dataclass
class RedisCluster3:
    """Three redis-server processes in cluster mode, joined by CLUSTER MEET, each master of a
    third of the slots."""

    nodes: list[RedisServer]

    @classmethod
    @contextlib.contextmanager
    def start(cls, directory: Path) -> Iterator[RedisCluster3]:
        binary = redis_binary()
        with contextlib.ExitStack() as stack:
            nodes = [stack.enter_context(RedisServer.start(
                directory / f"node{i}", "--cluster-enabled", "yes", "--cluster-config-file",
                str(directory / f"node{i}" / "nodes.conf"), "--cluster-node-timeout", "2000", binary=binary,
                port=_cluster_port()))
                for i in range(3)]
            cluster = cls(nodes)
            cluster._form()
            yield cluster

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def _form(self, timeout: float = 15.0) -> None:
        third = CLUSTER_SLOTS // 3
        bounds = [(0, third - 1), (third, 2 * third - 1), (2 * third, CLUSTER_SLOTS - 1)]
        for node, (low, high) in zip(self.nodes, bounds, strict=True):
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
                for other in self.nodes:
                    if other is not node:
                        client.execute_command("CLUSTER", "MEET", "127.0.0.1", other.port)
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for node in self.nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    states.append("cluster_state:ok" in info and "cluster_known_nodes:3" in info)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise AssertionError("the 3-node cluster did not form")
            time.sleep(0.05)  # gossip between processes: no event to wait on

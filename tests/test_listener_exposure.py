"""No listener open to the network by accident: a plaintext listener on anything but loopback
(gRPC, ``--http``, the portal) refuses to start unless ``--insecure-listen`` names it; TLS on the
gRPC listener is enough on its own. One that was named is warned about and counted."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.admin import cli
from sidecar.db import ensure_database
from sidecar.settings import Settings
from tests.certs import make_tls_dir
from tests.conftest import check_request
from tests.helpers import OK, ROOT, free_port, http_get, metric, ops_get, start_server

GRPC_REFUSED = ("is reachable from the network without TLS; listen on loopback (127.0.0.1) or serve it over TLS "
                "(--tls-cert, --tls-key, --tls-client-ca), or accept it on purpose with --insecure-listen grpc")
HTTP_REFUSED = ("is reachable from the network without TLS; listen on loopback (127.0.0.1), or accept it on "
                "purpose with --insecure-listen http")


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env=env)


@pytest.mark.parametrize(("args", "refused"), [
    (["--listen", "0.0.0.0:9191"], f"--listen 0.0.0.0:9191 {GRPC_REFUSED}"),
    (["--listen", "[::]:9191"], f"--listen [::]:9191 {GRPC_REFUSED}"),
    (["--listen", "10.1.2.3:9191"], f"--listen 10.1.2.3:9191 {GRPC_REFUSED}"),
    # A name may resolve to any address: only localhost counts as loopback.
    (["--listen", "sidecar.internal:9191"], f"--listen sidecar.internal:9191 {GRPC_REFUSED}"),
    (["--http", "0.0.0.0:9192"], f"--http 0.0.0.0:9192 {HTTP_REFUSED}"),
    # Naming one listener allows that one only.
    (["--http", "0.0.0.0:9192", "--listen", "0.0.0.0:9191", "--insecure-listen", "http"],
     f"--listen 0.0.0.0:9191 {GRPC_REFUSED}"),
    (["--insecure-listen", "metrics"], "--insecure-listen: Input should be 'grpc', 'http' or 'authz-http'"),
])
def test_a_network_listener_without_tls_refuses_to_start(args: list[str], refused: str, tmp_path: Path) -> None:
    result = serve("--db", str(tmp_path / "rules.db"), *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"safous-sidecar: {refused}"]
    assert not (tmp_path / "rules.db").exists()  # refused before anything was created


def test_the_variable_names_listeners_too(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "SAFOUS_LISTEN": "0.0.0.0:9191", "SAFOUS_HTTP": "0.0.0.0:9192",
           "SAFOUS_INSECURE_LISTEN": "http"}
    result = serve("--db", str(tmp_path / "rules.db"), env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"safous-sidecar: --listen 0.0.0.0:9191 {GRPC_REFUSED}"]
    assert Settings(listen="0.0.0.0:9191", http="0.0.0.0:9192", insecure_listen="grpc, http").insecure_listen == (
        "grpc", "http")


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:0", "[::1]:0", "127.8.9.10:0"])
def test_loopback_needs_nothing(listen: str) -> None:
    assert Settings(listen=listen, http=listen).exposed_listeners() == []


async def test_a_named_listener_starts_with_a_warning_and_a_metric(tmp_path: Path) -> None:
    http = free_port()
    log, port = start_server(tmp_path / "rules.db", "--listen", "0.0.0.0:0", "--http", f"0.0.0.0:{http}",
                             "--insecure-listen", "grpc", "--insecure-listen", "http", "--default-action", "allow")
    try:
        warnings = log.entries("listening on the network without TLS (--insecure-listen)")
        assert [(w["levelname"] if "levelname" in w else w.get("level"), w["listener"], w["flag"], w["listen"])
                for w in warnings] == [("warning", "grpc", "--listen", "0.0.0.0:0"),
                                       ("warning", "http", "--http", f"0.0.0.0:{http}")]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert (await pb_grpc.AuthorizationStub(channel).Check(check_request("/"))).status.code == OK
        status, page = await ops_get(http, "/metrics")
        assert status == 200
        assert metric(page, "safous_insecure_listeners") == 2
        log.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(log.proc.wait, 10) == 0
    finally:
        log.close()


async def test_tls_on_grpc_needs_no_flag(tmp_path: Path) -> None:
    tls = make_tls_dir(tmp_path / "tls")
    http = free_port()
    log, _ = start_server(tmp_path / "rules.db", "--listen", "0.0.0.0:0", "--tls-cert", str(tls.server.cert_path),
                          "--tls-key", str(tls.server.key_path), "--tls-client-ca", str(tls.ca.cert_path),
                          "--http", f"127.0.0.1:{http}")
    try:
        assert log.entries("listening on the network without TLS (--insecure-listen)") == []
        _, page = await ops_get(http, "/metrics")
        assert metric(page, "safous_insecure_listeners") == 0
    finally:
        log.close()


def test_the_portal_refuses_a_network_address_without_the_flag(tmp_path: Path) -> None:
    ensure_database(tmp_path / "rules.db")
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "rules.db"), "ui", "--listen", "0.0.0.0:0"])
    assert result.exit_code == 2
    assert result.output == (
        "Error: --listen 0.0.0.0:0 is reachable from the network, and the portal has no login and no TLS; listen "
        "on loopback (127.0.0.1, the default), or accept it on purpose with --insecure-listen\n")


def test_the_portal_listens_on_the_network_when_told_and_warns(tmp_path: Path) -> None:
    ensure_database(tmp_path / "rules.db")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.admin", "--db", str(tmp_path / "rules.db"), "ui",
                             "--listen", "0.0.0.0:0", "--insecure-listen"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it accepts connections
        address = re.fullmatch(r"portal on http://0\.0\.0\.0:(\d+)/ serving .*rules\.db read-only \(Ctrl-C stops\)\n",
                               line)
        assert address
        # Any Host is answered off loopback (no DNS-rebinding guard to apply there).
        status, _, _ = asyncio.run(http_get(f"http://127.0.0.1:{address[1]}/", headers={"Host": "portal.example"}))
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert "the portal has no login: anyone who reaches 0.0.0.0:0 reads the activity and audit logs" in err
    finally:
        proc.kill()
        proc.wait()

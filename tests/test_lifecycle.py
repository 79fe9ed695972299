"""The real program: `python -m sidecar serve`, its settings, and SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from tests.conftest import check_request
from tests.helpers import OK, ROOT, activity_paths, free_port, start_server


def test_serve_answers_then_drains_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"  # absent: the server creates it
    log, port = start_server(db, "--default-action", "allow")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            for i in range(20):
                assert stub.Check(check_request(f"/r{i}")).status.code == OK
        log.proc.send_signal(signal.SIGTERM)
        assert log.proc.wait(timeout=10) == 0
    finally:
        log.close()
    assert [e["activity_written"] for e in log.entries("stopped")] == [20]
    assert len(activity_paths(db)) == 20


def test_environment_variables_configure_the_server(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"
    log, port = start_server(db, env={"SAFOUS_DEFAULT_ACTION": "allow", "SAFOUS_LOG_FORMAT": "json"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            # No policy at all: only the environment's default action can allow this.
            assert pb_grpc.AuthorizationStub(channel).Check(check_request("/")).status.code == OK
        log.proc.send_signal(signal.SIGINT)
        assert log.proc.wait(timeout=10) == 0
    finally:
        log.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--default-action", "maybe"], "--default-action: Input should be 'allow' or 'deny'"),
        (["--listen", "nowhere"], "--listen: Value error, 'nowhere' is not HOST:PORT"),
        (["--grace-period", "-1"], "--grace-period: Input should be greater than or equal to 0"),
        # Which proxy calls decides which of its headers are believed: never guessed.
        (["--authz-http", "127.0.0.1:0"], "safous-sidecar: --authz-http needs --authz-http-profile "
                                          "envoy|forward-auth"),
        (["--authz-http", "127.0.0.1:0", "--authz-http-profile", "envoy", "--authz-http-client-cert-header", "X-C"],
         "--authz-http-client-cert-header is for --authz-http-profile forward-auth"),
    ],
)
def test_bad_settings_stop_the_server_with_a_clear_message(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    log, port = start_server(tmp_path / "a.db")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "serve", "--db", str(tmp_path / "b.db"), "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    finally:
        log.close()


def test_help_lists_every_setting() -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--db", "--listen", "--default-action", "--workers", "--log-format", "--log-level"):
        assert flag in result.stdout
    assert "SAFOUS_DEFAULT_ACTION" in result.stdout


def test_the_settings_page_holds_the_table_generated_from_the_model() -> None:
    from sidecar.settings import settings_reference

    assert settings_reference() in (ROOT / "docs" / "platform" / "settings-and-lifecycle.md").read_text()


def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"
    port = free_port()  # --workers needs a fixed port
    log, _ = start_server(db, "--listen", f"127.0.0.1:{port}", "--workers", "2", "--default-action", "allow")
    try:
        assert {e["worker"] for e in log.wait_for("listening", count=2)} == {0, 1}
        # Each new connection lands on one worker; with enough of them both get some.
        for i in range(40):
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                assert pb_grpc.AuthorizationStub(ch).Check(check_request(f"/c{i}")).status.code == OK
        log.proc.send_signal(signal.SIGTERM)
        assert log.proc.wait(timeout=15) == 0, log.tail(60)
    finally:
        log.close()
    served = {e["worker"] for e in log.records() if e.get("logger") == "sidecar.decision"}
    assert served == {0, 1}
    assert len(activity_paths(db)) == 40


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--db", str(tmp_path / "r.db"),
                             "--listen", "127.0.0.1:0", "--workers", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--workers needs a fixed port" in result.stderr

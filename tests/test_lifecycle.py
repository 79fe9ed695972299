"""The real program: `python -m sidecar serve`, its settings, and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from tests.conftest import check_request

ROOT = Path(__file__).resolve().parent.parent


def start_server(db: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--db", str(db), "--listen", "127.0.0.1:0", *args],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        entry = json.loads(line)
        if entry["message"] == "listening":
            return proc, entry["port"]
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()}")


def reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stderr.close()


def test_serve_answers_then_drains_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"  # absent: the server creates it
    proc, port = start_server(db, "--default-action", "allow")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            for i in range(20):
                assert stub.Check(check_request(f"/r{i}")).status.code == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        logged = [json.loads(line) for line in proc.stderr.read().splitlines()]
        assert any(e["message"] == "stopped" and e["activity_written"] == 20 for e in logged)
    finally:
        reap(proc)
    assert sqlite3.connect(db).execute("SELECT count(*) FROM activity_log").fetchone()[0] == 20


def test_environment_variables_configure_the_server(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"
    proc, port = start_server(db, env={"SAFOUS_DEFAULT_ACTION": "allow", "SAFOUS_LOG_FORMAT": "json"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            # No policy at all: only the environment's default action can allow this.
            assert pb_grpc.AuthorizationStub(channel).Check(check_request("/")).status.code == 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        reap(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--default-action", "maybe"], "--default-action: Input should be 'allow' or 'deny'"),
        (["--listen", "nowhere"], "--listen: Value error, 'nowhere' is not HOST:PORT"),
        (["--grace-period", "-1"], "--grace-period: Input should be greater than or equal to 0"),
    ],
)
def test_bad_settings_stop_the_server_with_a_clear_message(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    proc, port = start_server(tmp_path / "a.db")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "serve", "--db", str(tmp_path / "b.db"), "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    finally:
        reap(proc)


def test_help_lists_every_setting() -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--db", "--listen", "--default-action", "--workers", "--log-format", "--log-level"):
        assert flag in result.stdout
    assert "SAFOUS_DEFAULT_ACTION" in result.stdout


def test_readme_settings_table_is_generated_from_the_model() -> None:
    from sidecar.settings import settings_reference

    assert settings_reference() in (ROOT / "README.md").read_text()


def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "rules.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--db", str(db), "--listen", f"127.0.0.1:{port}",
         "--workers", "2", "--default-action", "allow"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        listening: set[int] = set()
        while len(listening) < 2:
            entry = json.loads(proc.stderr.readline())
            if entry["message"] == "listening":
                listening.add(entry["worker"])
        # Each new connection lands on one worker; with enough of them both get some.
        for i in range(40):
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                assert pb_grpc.AuthorizationStub(ch).Check(check_request(f"/c{i}")).status.code == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        entries = [json.loads(line) for line in proc.stderr.read().splitlines()]
        served = {e["worker"] for e in entries if e["logger"] == "sidecar.decision"}
        assert served == {0, 1}
    finally:
        reap(proc)
    assert sqlite3.connect(db).execute("SELECT count(*) FROM activity_log").fetchone()[0] == 40


def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--db", str(tmp_path / "r.db"),
                             "--listen", "127.0.0.1:0", "--workers", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--workers needs a fixed port" in result.stderr

"""The fleet's activity is the sidecars' JSON decision log lines: ``safous-admin logs activity
--from-log`` shows them with the same filters and the same table as the database view."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.policies import Policy
from sidecar.rules.model import Rule
from tests.admin_cli import admin
from tests.conftest import check_request, seed
from tests.helpers import start_server


async def run_sidecar(db: Path, paths: list[tuple[str, str]]) -> list[str]:
    """A real sidecar on ``db``; one check per (path, user); its stderr lines once stopped."""
    log, port = await asyncio.to_thread(start_server, db)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            for i, (path, user) in enumerate(paths):
                await stub.Check(check_request(path, headers={"x-safous-username": user,
                                                              "x-request-id": f"{db.parent.name}-{i}"}))
        log.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(log.proc.wait, 15) == 0
    finally:
        await asyncio.to_thread(log.close)
    return log.lines


async def test_the_fleets_log_lines_make_the_same_table_as_rules_db(tmp_path: Path, refused_port: int) -> None:
    policies = [Policy(name="open", path_prefix="/open", integration=False),
                Policy(name="audit", path_prefix="/audit", mode="audit", rules=("down",))]
    down = Rule(name="down", url=f"http://127.0.0.1:{refused_port}/check")
    pods = []
    for name in ("pod-a", "pod-b"):
        (tmp_path / name).mkdir()
        db = tmp_path / name / "rules.db"
        seed(db, [down], policies)
        pods.append(db)
    lines_a = await run_sidecar(pods[0], [("/open/x", "alice"), ("/closed", "bob"), ("/audit/y", "carol")])
    lines_b = await run_sidecar(pods[1], [("/closed/2", "alice")])
    feed = "".join(f"[pod/{db.parent.name}] {line}" for db, lines in zip(pods, (lines_a, lines_b), strict=True)
                   for line in lines)

    for flags in ([], ["--denied"], ["--would-deny"], ["--user", "alice"]):
        from_log = admin(pods[0], "logs", "activity", "--from-log", "-", *flags, input=feed)
        assert from_log.exit_code == 0, from_log.output
        # The same rows, the same columns, as each rules.db shows its own part (the widths of
        # the columns follow the widest value of the table).
        def cells(text: str) -> list[str]:
            return sorted(" ".join(line.split()) for line in text.splitlines()[1:])

        from_db = [row for db in pods for row in cells(admin(db, "logs", "activity", *flags).stdout)]
        assert cells(from_log.stdout) == sorted(from_db) and from_db, flags
    denied = admin(pods[0], "logs", "activity", "--from-log", "-", "--denied", input=feed).stdout
    assert "pod-a-1" in denied and "pod-b-0" in denied and "no policy matches this request" in denied


def test_a_deeply_nested_line_in_the_feed_is_skipped_not_a_crash(tmp_path: Path) -> None:
    """A log feed is anyone's text: a line nested deeper than Python's recursion limit is not a
    decision, and the decisions around it are still shown."""
    decision = json.dumps({"time": "2026-03-01T10:00:00.000Z", "level": "info", "logger": "sidecar.decision",
                           "message": "deny", "request_id": "kept-1", "policy": "app", "code": "value_mismatch",
                           "latency_ms": 1.0, "reason": "no", "username": "alice", "source_ip": "203.0.113.7",
                           "method": "GET", "host": "app.example.com", "path": "/x", "policy_source": "match"})
    nested = '{"logger": "sidecar.decision", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    feed = f"{decision}\n[pod/a] {nested}\n{decision.replace('kept-1', 'kept-2')}\n"
    shown = admin(tmp_path / "rules.db", "logs", "activity", "--from-log", "-", input=feed)
    assert shown.exit_code == 0, shown.output
    assert "kept-1" in shown.stdout and "kept-2" in shown.stdout

"""Text log lines: one record, one line, whatever a client sent (JSON lines are json.dumps')."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.db import iso_time, parse_iso_time
from sidecar.logs import TextFormatter, text_message, text_value
from sidecar.policies import Policy
from tests.conftest import check_request, seed
from tests.helpers import OK, ROOT

FORGED = "2026-11-29T00:00:00Z INFO sidecar.decision: allow request_id=forged policy=app code=rules_passed"
# Every character that str.splitlines (and so many log viewers) takes for the end of a line.
LINE_BREAKS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^ ]+')


def fields(line: str) -> dict[str, str]:
    """The ``key=value`` pairs of a text line, quoted values decoded as JSON strings."""
    found = {}
    for match in re.finditer(r" ([a-z_]+)=(" + TOKEN.pattern + ")", line):
        raw = match.group(2)
        found[match.group(1)] = json.loads(raw) if raw.startswith('"') else raw
    return found


@pytest.mark.parametrize(("value", "expected"), [
    ("req-42", "req-42"),
    ("a/b:c.d@e,f", "a/b:c.d@e,f"),
    ("café", "café"),  # printable non-ASCII stays readable
    (3, "3"),
    (1.5, "1.5"),
    ("", '""'),
    ("two words", '"two words"'),
    ("k=v", '"k=v"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("tab\there", '"tab\\there"'),
    ("a\nb", '"a\\nb"'),
    ("a\rb", '"a\\rb"'),
    ("a\x00b\x1bc\x7fd", '"a\\u0000b\\u001bc\\u007fd"'),
    ("a\x85b", '"a\\u0085b"'),
    ("a\u2028b\u2029c", '"a\\u2028b\\u2029c"'),
    ("nb\u00a0sp", '"nb\\u00a0sp"'),
    ("rtl\u202eoverride", '"rtl\\u202eoverride"'),
    ("tag\U000e0001", '"tag\\udb40\\udc01"'),
    ([1, 2], '"[1, 2]"'),
])
def test_text_values_are_logfmt_tokens(value: object, expected: str) -> None:
    assert text_value(value) == expected
    if expected.startswith('"'):
        assert json.loads(expected) == str(value)  # quoted values are JSON strings: nothing lost


@pytest.mark.parametrize("separator", LINE_BREAKS)
def test_a_text_record_is_one_line_whatever_its_message_and_fields(separator: str) -> None:
    record = logging.makeLogRecord({
        "name": "sidecar.check", "levelname": "WARNING", "levelno": logging.WARNING,
        "msg": "token request for client %r failed: %s", "args": ("cid", "bad" + separator + FORGED),
        "request_id": "abc" + separator + FORGED, "policy": "open app",
    })
    line = TextFormatter().format(record)
    assert line.splitlines() == [line]
    assert line.endswith(' policy="open app"')
    assert fields(line)["request_id"] == "abc" + separator + FORGED
    assert text_message("bad" + separator + FORGED) in line


def test_a_traceback_is_indented_so_no_line_of_it_passes_for_a_record() -> None:
    try:
        raise ValueError("client sent\n" + FORGED + "\u2028" + FORGED)
    except ValueError:
        record = logging.makeLogRecord({"name": "sidecar.server", "levelname": "ERROR",
                                        "levelno": logging.ERROR, "msg": "check failed at the edge",
                                        "exc_info": sys.exc_info(), "request_id": "r1"})
    lines = TextFormatter().format(record).splitlines()
    assert lines[0].endswith("ERROR sidecar.server: check failed at the edge request_id=r1")
    assert lines[1] == "  Traceback (most recent call last):"
    assert lines[-2:] == ["  ValueError: client sent", "  " + FORGED + "\\u2028" + FORGED]
    assert all(line.startswith("  ") for line in lines[1:])


def test_forged_request_ids_write_no_forged_lines(tmp_path: Path) -> None:
    """A real ``serve --log-format text``: request ids (kept by Envoy from the client) and a
    policy name holding line breaks and fake records. Each check writes exactly one decision
    line, whose policy reads back as sent (and the request id too, unless it held a line break:
    then a fresh one), and no line starts with a forged time."""
    db = tmp_path / "rules.db"
    policy = 'open "app"=1\n' + FORGED
    seed(db, [], [Policy(name=policy, integration=False)])
    request_ids = ["abc" + separator + FORGED for separator in LINE_BREAKS] + ["id with spaces request_id=x"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--db", str(db), "--listen", "127.0.0.1:0",
         "--log-format", "text"], cwd=ROOT, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        # Bytes, not text mode: universal newlines would hide a bare CR.
        while b" listening " not in (line := proc.stderr.readline()):
            assert line, "the sidecar exited before listening"
        port = int(fields(line.decode())["port"])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            for request_id in request_ids:
                response = stub.Check(check_request("/", headers={"x-request-id": request_id}))
                assert response.status.code == OK
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        output = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    lines = output.splitlines()
    decisions = [line for line in lines if re.match(r"\S+ INFO sidecar\.decision: ", line)]
    # An id that could break a line is never logged: the sidecar gives the check a fresh one.
    logged = [fields(line)["request_id"] for line in decisions]
    assert len(logged) == len(request_ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", got) for got in logged[:-1]), logged
    assert logged[-1] == request_ids[-1]
    assert {fields(line)["policy"] for line in decisions} == {policy}
    assert {fields(line)["code"] for line in decisions} == {"integration_off"}
    # Real lines carry milliseconds (…T00:00:00.123Z): this prefix can only be a forged one.
    assert not [line for line in lines if line.startswith("2026-11-29T00:00:00Z ")]


@given(st.integers(min_value=-(10**12), max_value=4 * 10**12), st.integers(min_value=0, max_value=999))
def test_times_are_written_to_the_millisecond_and_read_back(milliseconds: int, micros: int) -> None:
    # The activity log's and the log lines' time: truncated to the millisecond, never rounded
    # up into the next one, and an exact millisecond (which a float may hold a hair below)
    # read back as itself.
    exact = milliseconds / 1000
    assert parse_iso_time(iso_time(exact)) == exact
    expected = datetime.fromtimestamp(milliseconds // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + \
        f".{milliseconds % 1000:03d}Z"
    assert iso_time(exact) == expected
    assert iso_time((milliseconds * 1000 + micros) / 1_000_000) == expected

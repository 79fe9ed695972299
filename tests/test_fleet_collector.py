"""The fleet's collector (``safous-admin collect``), a real process on loopback: a batch is
written once however often it is sent, with its pod; what is not a sidecar's batch — no token,
a wrong token under a forged pod name, a gzip bomb, a 100 MB body, malformed JSON — is refused
with a status that says why, changes nothing, and the collector goes on serving within bounded
memory. Then what the admin reads of the fleet's log: ``logs activity`` and ``explain`` name
the pod; and the wire format's bounds, table-driven."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.fleet import MalformedBatch, batch_body, encode_record, read_batch
from sidecar.fleet._collector import _inflated, _Refused
from tests.admin_cli import admin
from tests.fleet_support import (
    TOKEN,
    TOKEN_VARIABLE,
    RunningCollector,
    batch,
    collector,
    fleet_rows,
    headers,
    post,
    record,
)
from tests.helpers import eventually, http_get

TRACE = {"request_id": "t-1", "method": "GET", "host": "app.example.com", "path": "/app", "policy": "app",
         "decision": "deny", "code": "value_mismatch", "reason": 'rule "posture": status is "unknown"',
         "rules": [{"rule": "posture", "source": "call", "outcome": "value_mismatch",
                    "request": {"method": "GET", "url": "https://posture.example.com/check?u=alice",
                                "headers": [["Authorization", "••••••"]], "body": None},
                    "answer": {"status": 200, "content_type": "application/json", "bytes": 21,
                               "body": '{"status": "unknown"}'},
                    "actions": [{"type": "string", "key": "status", "value": "active", "verdict": "failed"}],
                    "reason": 'rule "posture": status is "unknown", expected "active"', "ms": 3.2}]}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCollector]:
    fleet = tmp_path_factory.mktemp("collector") / "fleet.db"
    with collector(fleet) as served:
        served.extra["db"] = fleet
        yield served


def fleet_db(running: RunningCollector) -> Path:
    return Path(running.extra["db"])


async def test_a_batch_is_written_once_however_often_it_is_sent(running: RunningCollector) -> None:
    body = batch(record("once-1", trace=TRACE), record("once-2", allowed=True), record("once-3", path="/other"),
                 pod="pod-b", ids="once")
    assert await post(running.url, body) == (200, {"accepted": 3, "new": 3, "duplicates": 0})
    # The answer was lost, say: the sidecar sends the same records again.
    assert await post(running.url, body) == (200, {"accepted": 3, "new": 0, "duplicates": 3})
    rows = [row for row in fleet_rows(fleet_db(running)) if row[1].startswith("once-")]
    assert rows == [("pod-b", "once-1", 0, "value_mismatch", 'rule "posture": status is "unknown", expected "active"'),
                    ("pod-b", "once-2", 1, "rules_passed", ""),
                    ("pod-b", "once-3", 0, "value_mismatch", 'rule "posture": status is "unknown", expected "active"')]
    report = admin(fleet_db(running), "explain", "once-1")
    assert report.exit_code == 0, report.output
    assert report.stdout.splitlines()[:2] == ["request t-1: GET app.example.com/app", "decided by pod pod-b"]
    assert '  request  GET https://posture.example.com/check?u=alice' in report.stdout
    assert '  action   string status "active": failed' in report.stdout


async def test_the_log_says_which_pod_decided_and_can_show_one_pod(running: RunningCollector) -> None:
    await post(running.url, batch(record("pods-1", at=1_790_000_001.0, trace=TRACE), pod="pod-x", ids="pods-x"))
    await post(running.url, batch(record("pods-1", at=1_790_000_002.0, trace={**TRACE, "rules": []}),
                                  record("pods-2", at=1_790_000_003.0, allowed=True), pod="pod-y", ids="pods-y"))
    shown = admin(fleet_db(running), "logs", "activity", "--pod", "pod-y")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines() == [
        "AT                        POD    REQUEST ID  USER   SOURCE IP    METHOD  HOST             PATH  POLICY  "
        "POLICY SOURCE  DECISION  CODE            STATUS",
        "2026-09-21T14:13:23.000Z  pod-y  pods-2      alice  203.0.113.7  GET     app.example.com  /app  app     "
        "match          allow     rules_passed",
        "2026-09-21T14:13:22.000Z  pod-y  pods-1      alice  203.0.113.7  GET     app.example.com  /app  app     "
        "match          deny      value_mismatch  rule \"posture\": status is \"unknown\", expected \"active\""]
    from_log = admin(fleet_db(running), "logs", "activity", "--from-log", "-", "--pod", "pod-x", input="")
    assert from_log.exit_code == 2 and "--pod reads a fleet's activity log" in from_log.stderr
    line = json.loads(admin(fleet_db(running), "logs", "activity", "--pod", "pod-x", "--json").stdout)
    assert (line["pod"], line["request_id"], line["trace"]) == ("pod-x", "pods-1", True)
    # One request through two sidecars (a gateway's, then a service's): the newest trace, and
    # the other pods named on stderr; --pod picks one.
    newest = admin(fleet_db(running), "explain", "pods-1")
    assert "decided by pod pod-y" in newest.stdout and "rule 1" not in newest.stdout
    assert newest.stderr == "warning: pod pod-x decided request 'pods-1' too: explain --pod NAME shows theirs\n"
    assert "decided by pod pod-x" in admin(fleet_db(running), "explain", "pods-1", "--pod", "pod-x").stdout
    missing = admin(fleet_db(running), "explain", "pods-1", "--pod", "pod-z")
    assert missing.exit_code == 1
    assert "no trace of request 'pods-1' decided by pod 'pod-z'" in missing.stderr


def _one(**changes: Any) -> bytes:
    """A batch of one record changed as a sidecar would never send it (``batch`` cuts values)."""
    entry = json.loads(batch(record("r-1", trace=TRACE)))
    entry["records"][0].update(changes)
    return json.dumps(entry).encode()


async def _body(size: int, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    block = b"x" * chunk
    for _ in range(size // chunk):
        yield block


def _bomb(decompressed: int) -> bytes:
    """gzip of ``decompressed`` zero bytes (a thousandth of it on the wire), made a slice at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(decompressed >> 20)) + packer.flush()


async def _send(url: str, data: Any, sent_headers: dict[str, str], **options: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(url, data=data, headers=sent_headers, **options) as resp:
            return resp.status, await resp.json(content_type=None)


HUNDRED_MB = 100 << 20
# (what is sent, the status and error expected): each changes nothing.
REFUSALS: list[tuple[str, int, str]] = [
    ("no token", 401, "unauthenticated"),
    ("a forged pod name with a wrong token", 401, "unauthenticated"),
    ("the token as Basic credentials", 401, "unauthenticated"),
    ("not JSON", 415, "unsupported_media_type"),
    ("brotli", 415, "unsupported_encoding"),
    ("gzip announced, not sent", 400, "malformed"),
    ("gzip of text", 400, "malformed"),
    ("another format", 400, "malformed"),
    ("a path past the activity log's bound", 400, "malformed"),
    ("5,001 records", 400, "malformed"),
    ("a trace past the stored trace's bound", 400, "malformed"),
    ("a gzip bomb: 100 KB to 100 MB", 413, "too_large"),
    ("100 MB announced", 413, "too_large"),
    ("100 MB announced, Expect: 100-continue", 413, "too_large"),
    ("100 MB chunked", 413, "too_large"),
]


async def _refused(url: str, case: str) -> tuple[int, dict[str, Any]]:
    good = batch(record("forged-1"), pod="pod-1", ids="forged")
    if case == "no token":
        return await post(url, good, token=None)
    if case == "a forged pod name with a wrong token":
        return await post(url, good, token=TOKEN[:-1] + "x")
    if case == "the token as Basic credentials":
        return await _send(url, gzip.compress(good), {**headers(None), "Authorization": f"Basic {TOKEN}"})
    if case == "not JSON":
        return await _send(url, gzip.compress(good), headers(**{"Content-Type": "text/plain"}))
    if case == "brotli":
        return await _send(url, gzip.compress(good), headers(**{"Content-Encoding": "br"}))
    if case == "gzip announced, not sent":
        return await post(url, good, compress=False)
    if case == "gzip of text":
        return await post(url, b"hello")
    if case == "another format":
        return await post(url, good.replace(b"safous-decisions/1", b"opa-decisions/1"))
    if case == "a path past the activity log's bound":
        return await post(url, _one(path="/" * 1025))
    if case == "a trace past the stored trace's bound":
        # Cut rule by rule when written, in time quadratic in its rules (a million empty rules
        # gzip to some 3 KB and took the writer hours): refused whole instead.
        return await post(url, _one(trace={"rules": [{}] * 6000}))
    if case == "5,001 records":
        return await post(url, batch(*(record(f"many-{n}") for n in range(5001)), ids="many"))
    if case == "a gzip bomb: 100 KB to 100 MB":
        return await _send(url, _bomb(HUNDRED_MB), headers())
    if case == "100 MB announced":
        return await _send(url, _body(HUNDRED_MB), headers(**{"Content-Length": str(HUNDRED_MB)}))
    if case == "100 MB announced, Expect: 100-continue":
        return await _send(url, _body(HUNDRED_MB), headers(**{"Content-Length": str(HUNDRED_MB)}), expect100=True)
    assert case == "100 MB chunked"
    return await _send(url, _body(HUNDRED_MB), headers(), chunked=True)


async def test_what_is_not_a_sidecars_batch_is_refused_and_the_collector_goes_on(running: RunningCollector) -> None:
    before = fleet_rows(fleet_db(running))
    peak = running.peak_rss_mb()
    for case, status, error in REFUSALS:
        answer = await _refused(running.url, case)
        assert (answer[0], answer[1].get("error")) == (status, error), (case, answer)
    assert fleet_rows(fleet_db(running)) == before
    assert admin(fleet_db(running), "explain", "forged-1").exit_code == 1
    # Still serving, within bounded memory (a 100 MB body was never held, nor a bomb inflated).
    assert (await http_get(running.url.replace("/v1/decisions", "/healthz")))[0] == 200
    assert await post(running.url, batch(record("after-1"), ids="after")) == (
        200, {"accepted": 1, "new": 1, "duplicates": 0})
    # The most it held at once grew by what one batch of 5,001 records parses into (~15 MB),
    # not by 100 MB.
    assert running.peak_rss_mb() - peak < 40, (peak, running.peak_rss_mb())
    status, _, page = await http_get(running.url.replace("/v1/decisions", "/metrics"))
    assert 'safous_collector_batches_total{status="401"} 3.0' in page.decode()
    assert 'safous_collector_batches_total{status="413"} 4.0' in page.decode()
    # Each refusal is logged (at most one line per status every 10 s), with why and who.
    refusals = running.log.entries("batch refused")
    assert {(r["error"], r["peer"]) for r in refusals} >= {
        (error, "127.0.0.1") for error in ("unauthenticated", "unsupported_media_type", "unsupported_encoding",
                                           "malformed", "too_large")}


async def test_a_client_that_leaves_mid_body_is_a_refusal_not_a_server_error(running: RunningCollector) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(f"POST /v1/decisions HTTP/1.1\r\nHost: collector\r\nAuthorization: Bearer {TOKEN}\r\n"
                 "Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 1000\r\n\r\n"
                 "0123456789".encode())
    await writer.drain()
    writer.close()
    [line] = await eventually(lambda: [r for r in running.log.entries("batch refused") if r["error"] == "incomplete"])
    assert line["reason"] == "the body was cut short: Connection lost" and line["status"] == 400
    assert not running.log.entries("Error handling request from 127.0.0.1")
    assert (await http_get(running.url.replace("/v1/decisions", "/healthz")))[0] == 200


async def test_batches_past_the_bound_in_progress_wait_their_turn(running: RunningCollector) -> None:
    """Many pods at once: none is refused for being one too many as long as each sends one
    batch at a time, as a sidecar does; the records all land."""
    bodies = [batch(*(record(f"burst-{pod}-{n}") for n in range(200)), pod=f"burst-{pod}", ids=f"burst-{pod}")
              for pod in range(8)]
    answers = await asyncio.gather(*(post(running.url, body) for body in bodies))
    assert [status for status, _ in answers] == [200] * 8
    assert sum(1 for row in fleet_rows(fleet_db(running)) if row[1].startswith("burst-")) == 1600


def test_collect_refuses_what_would_expose_the_log(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.db"
    env = {TOKEN_VARIABLE: TOKEN}
    refused = admin(fleet, "collect", "--listen", "0.0.0.0:0", "--token", f"env:{TOKEN_VARIABLE}", env=env)
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1] == (
        "Error: --listen 0.0.0.0:0 is reachable from the network without TLS; listen on loopback (127.0.0.1, the "
        "default), serve TLS (--tls-cert, --tls-key), or accept it on purpose with --insecure-listen")
    assert admin(fleet, "collect", env=env).stderr.splitlines()[-1] == (
        "Error: give the sidecars' token: --token env:NAME or --token file:PATH")
    assert admin(fleet, "collect", "--token", TOKEN, env=env).stderr.splitlines()[-1] == (
        "Error: give the token as env:NAME or file:PATH, not in clear (it would show in process lists and manifests)")
    assert admin(fleet, "collect", "--token", "env:SAFOUS_SECRET_UNSET", env=env).stderr.splitlines()[-1] == (
        "Error: --token: secret env:SAFOUS_SECRET_UNSET: environment variable SAFOUS_SECRET_UNSET is not set")
    assert not fleet.exists()


# ------------------------------------------------------------------ the format, table-driven

@pytest.mark.parametrize(("changes", "problem"), [
    ({"id": "a b"}, "record 1: id: 1 to 64 letters, digits, _ or - is expected"),
    ({"id": "x" * 65}, "record 1: id: 1 to 64 letters, digits, _ or - is expected"),
    ({"pod": ""}, "record 1: pod: a DNS name"),
    ({"pod": "pod/../x"}, "record 1: pod: a DNS name"),
    ({"pod": "p" * 254}, "record 1: pod: a DNS name"),
    ({"time": "yesterday"}, "record 1: time: 'yesterday' is not an ISO 8601 time"),
    ({"time": "1969-12-31T23:59:59Z"}, "record 1: time: '1969-12-31T23:59:59Z' is out of range"),
    ({"request_id": 7}, "record 1: request_id: a string is expected"),
    ({"request_id": "r" * 257}, "record 1: request_id: longer than 256 characters"),
    ({"username": "u" * 257}, "record 1: username: longer than 256 characters"),
    ({"source_ip": "1" * 65}, "record 1: source_ip: longer than 64 characters"),
    ({"host": "h" * 257}, "record 1: host: longer than 256 characters"),
    ({"path": "/" * 1025}, "record 1: path: longer than 1024 characters"),
    ({"method": "M" * 33}, "record 1: method: longer than 32 characters"),
    ({"reason": "r" * 2049}, "record 1: reason: longer than 2048 characters"),
    ({"policy": "p" * 1025}, "record 1: policy: null or a string of at most 1024 characters is expected"),
    ({"decision": "maybe"}, "record 1: decision: one of allow, deny, audit_deny is expected"),
    ({"code": "DROP TABLE"}, "record 1: code: a decision code"),
    ({"policy_source": "header"}, "record 1: policy_source: match or route is expected"),
    ({"latency_ms": -1}, "record 1: latency_ms: a number of milliseconds is expected"),
    ({"latency_ms": True}, "record 1: latency_ms: a number of milliseconds is expected"),
    ({"trace": []}, "record 1: trace: null or a JSON object is expected"),
    ({"trace": {"rules": [1]}}, "record 1: trace: rules: a list of objects is expected"),
    ({"trace": {"rules": [{"request": {"headers": [["a"]]}}]}}, "record 1: trace: a rule's request"),
    ({"trace": {"rules": [{"actions": "none"}]}}, "record 1: trace: a rule's answer"),
    ({"trace": {"rules": [{}] * 5462}}, "record 1: trace: larger than 16384 bytes"),
    ({"trace": {"reason": "r" * 16372}}, "record 1: trace: larger than 16384 bytes"),
    ({"trace": {"reason": json.loads("[" * 300 + "]" * 300)}}, "record 1: trace: nested too deeply"),
])
def test_a_record_past_the_activity_logs_bounds_is_refused(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(MalformedBatch) as refused:
        read_batch(_one(**changes))
    assert str(refused.value).startswith(problem), str(refused.value)


def test_a_record_at_every_bound_is_taken_as_sent() -> None:
    at_bounds = {"id": "x" * 64, "pod": "p" * 253, "request_id": "r" * 256, "username": "ü" * 256,
                 "source_ip": "1" * 64, "host": "h" * 256, "path": "/" * 1024, "method": "M" * 32,
                 "reason": "r" * 2048, "policy": "p" * 1024, "decision": "audit_deny", "policy_source": "route"}
    [read] = read_batch(_one(**at_bounds))
    assert (read.record_id, read.pod, read.request_id, read.username, read.path, read.status, read.policy) == (
        "x" * 64, "p" * 253, "r" * 256, "ü" * 256, "/" * 1024, "r" * 2048, "p" * 1024)
    assert (read.allowed, read.audit_deny, read.policy_source, read.trace and read.trace()) == (
        True, True, "route", TRACE)


def test_a_sidecar_never_ships_what_a_collector_refuses() -> None:
    """Values past the bounds (a policy name is not bounded by the admin script) are cut when
    shipped; a lone surrogate (a client's header may carry one) is replaced, not a lost batch."""
    long = record("\ud800" + "r" * 300, policy="p" * 2000, path="/" + "p" * 2000, username="\udcff",
                  trace={"reason": "ok"})
    [read] = read_batch(batch(long))
    assert (read.request_id, read.policy, read.path, read.username) == (
        "\ufffd" + "r" * 255, "p" * 1024, "/" + "p" * 1023, "\ufffd")
    assert read.trace is not None and read.trace() == {"reason": "ok"}
    # A trace as rules.db would store one holding a lone surrogate.
    [read] = read_batch(batch_body([encode_record(record("s-1"), '{"reason": "\ud83d"}', pod="p", record_id="s-1")]))
    assert read.trace is not None and read.trace() == {"reason": "\ufffd"}
    # A trace cut to the stored trace's bound (two bytes a character) is within the collector's.
    big = {"reason": "é" * 16384, "rules": [{"rule": "r", "outcome": "held", "answer": {"body": "b" * 50_000}}]}
    [read] = read_batch(batch(record("big-1", trace=big)))
    assert read.trace is not None and read.trace()["cut"] is True
    [read] = read_batch(_one(trace={"reason": "r" * 16371}))  # 16,384 bytes as JSON
    assert read.trace is not None and read.trace() == {"reason": "r" * 16371}


@pytest.mark.parametrize(("body", "status"), [
    (gzip.compress(b"x" * 1000), None),
    (gzip.compress(b"x" * 1001), 413),
    (gzip.compress(b"x" * 10)[:-4], 400),  # cut short
    (gzip.compress(b"x") + b"tail", 400),
    (b"not gzip at all", 400),
])
def test_inflating_stops_at_its_bound(body: bytes, status: int | None) -> None:
    if status is None:
        assert _inflated(body, 1000) == b"x" * 1000
        return
    with pytest.raises(_Refused) as refused:
        _inflated(body, 1000)
    assert refused.value.status == status

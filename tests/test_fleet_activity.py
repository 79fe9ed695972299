"""One activity log for the fleet, against real processes on loopback: three sidecars ship
their decisions to one collector, which is killed mid-run and started again, and every decision
arrives exactly once; the portal on fleet.db shows each pod's denial and ``explain`` the trace
of a request decided on the second pod; a fourth sidecar, not shipping, decides every request
the same. Then the sidecar's side alone: the buffer's bound with the collector down (metrics,
memory, which records go), TLS, the OpenTelemetry logs route, the settings, and a rules.db from
before the fleet's migration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from sidecar import cli as sidecar_cli
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.db import migrations
from sidecar.fleet import DecisionShipper
from sidecar.fleet._shipper import RECORD_OVERHEAD
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from sidecar.urls import scrubbed, shown_url
from tests.admin_cli import admin
from tests.certs import TlsDir
from tests.conftest import check_request, denial_reason, seed
from tests.fleet_support import TOKEN_ENV, TOKEN_VARIABLE, collector, fleet_rows, record
from tests.helpers import ServerLog, code_of, eventually, free_port, http_get, metric, ops_get, start_server
from tests.portal_support import portal

PODS = ("pod-0", "pod-1", "pod-2")


def rules_db(directory: Path, webhook: str) -> Path:
    """A pod's rules.db: /app runs the posture rule (alice passes, anyone else is denied with a
    trace), nothing matches /closed."""
    directory.mkdir()
    db = directory / "rules.db"
    seed(db, [Rule(name="posture", url=f"{webhook}/posture?u=%username%",
                   actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),))],
         [Policy(name="app", path_prefix="/app", rules=("posture",))])
    return db


async def posture(request: web.Request) -> web.Response:
    return web.json_response({"status": "active" if request.query.get("u") == "alice" else "suspended"})


def shipping(url: str, pod: str, *extra: str) -> tuple[str, ...]:
    return ("--pod-name", pod, "--decision-log-url", url, "--decision-log-bearer-token", f"env:{TOKEN_VARIABLE}",
            "--decision-log-interval", "0.2", *extra)


def local_rows(db: Path) -> list[tuple[str, int, str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT request_id, allowed, code, status FROM activity_log ORDER BY id").fetchall()


@contextlib.contextmanager
def stopping(logs: list[ServerLog]) -> Iterator[None]:
    try:
        yield
    finally:
        for log in logs:
            log.close()


async def test_three_pods_ship_to_one_collector_which_dies_and_comes_back(tmp_path: Path, serve: Any) -> None:
    webhook = await serve(posture)
    fleet = tmp_path / "fleet.db"
    port = free_port()  # the collector comes back where the sidecars send
    url = f"http://127.0.0.1:{port}/v1/decisions"
    ops = [free_port() for _ in PODS]
    first = contextlib.ExitStack()
    running = first.enter_context(collector(fleet, listen=f"127.0.0.1:{port}"))
    started = await asyncio.gather(
        *(asyncio.to_thread(start_server, rules_db(tmp_path / pod, webhook.url), *shipping(url, pod),
                            "--http", f"127.0.0.1:{ops[k]}", env=TOKEN_ENV) for k, pod in enumerate(PODS)),
        asyncio.to_thread(start_server, rules_db(tmp_path / "off", webhook.url)))
    logs = [log for log, _ in started]
    with stopping(logs), first:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") for _, grpc_port in started]
        stubs = [pb_grpc.AuthorizationStub(channel) for channel in channels]
        *pods, off = stubs
        codes: set[str] = set()

        async def rounds(numbers: range) -> None:
            """Each pod decides one request a round, and the pod that does not ship decides the
            same request: its answer must be the same, byte for byte."""
            for n in numbers:
                for k, stub in enumerate(pods):
                    request = check_request("/closed/x" if n % 5 == 4 else "/app/x", headers={
                        "x-safous-username": "alice" if n % 3 else "mallory", "x-request-id": f"pod-{k}-{n}"})
                    shipped, alone = await stub.Check(request), await off.Check(request)
                    assert shipped.SerializeToString(deterministic=True) == alone.SerializeToString(deterministic=True)
                    codes.add(code_of(shipped))

        async def failed_posts(k: int) -> float:
            return metric((await ops_get(ops[k], "/metrics"))[1], "safous_decision_log_failed_posts_total")

        await rounds(range(10))
        await eventually(lambda: {row[0] for row in fleet_rows(fleet)} == set(PODS), timeout=10,
                         what="every pod shipping")
        running.kill()  # mid-run, without a goodbye; the checks go on meanwhile
        await rounds(range(10, 20))
        for k in range(len(PODS)):  # each sidecar has found it down, and tried again after a backoff
            await eventually(lambda k=k: _at_least(failed_posts(k), 2), timeout=10, what=f"{PODS[k]} retrying")
        await rounds(range(20, 25))
        first.close()
        with collector(fleet, listen=f"127.0.0.1:{port}"):
            await rounds(range(25, 35))
            await eventually(lambda: len(fleet_rows(fleet)) >= 3 * 35, timeout=20, what="every decision collected")
            assert codes == {"allowed", "value_mismatch", "no_matching_policy"}

            # Exactly once each, as each pod's own activity log holds it.
            rows = fleet_rows(fleet)
            assert len(rows) == len({(pod, request_id) for pod, request_id, *_ in rows}) == 3 * 35
            for k, pod in enumerate(PODS):
                local = await eventually(lambda k=k: len(local_rows(tmp_path / PODS[k] / "rules.db")) == 35
                                         and local_rows(tmp_path / PODS[k] / "rules.db"))
                assert sorted(row[1:] for row in rows if row[0] == pod) == sorted(local)
                page = (await ops_get(ops[k], "/metrics"))[1]
                assert (metric(page, "safous_decision_log_shipped_total"),
                        metric(page, "safous_decision_log_dropped_total"),
                        metric(page, "safous_decision_log_buffer_records")) == (35, 0, 0)

            # One portal: each pod's denials (a facet per pod), one explain for the second pod's.
            with portal(fleet) as served:
                status, _, body = await http_get(f"{served.url}/safous/activity_log")
                text = body.decode()
                assert status == 200
                facet = re.search(r'id="facet-pod".*?</ul>', text, re.S)
                assert facet and all(re.search(f">{pod}</a> 35\\b", facet[0]) for pod in PODS), facet
                for pod in PODS:
                    status, _, body = await http_get(f"{served.url}/safous/activity_log?pod={pod}&allowed=0")
                    denied = body.decode()
                    assert f"{pod}-0</a>" in denied and "suspended" in denied and "no policy matches" in denied
                    assert all(other not in denied for other in PODS if other != pod)
            report = admin(fleet, "explain", "pod-1-3")
            assert report.exit_code == 0, report.output
            assert report.stdout.splitlines()[:3] == [
                "request pod-1-3: GET app.example.com/app/x", "decided by pod pod-1",
                'decision deny (value_mismatch), policy "app"']
            assert f'  request  GET {webhook.url}/posture?u=mallory' in report.stdout
            assert '  answer   HTTP 200 application/json' in report.stdout
        for channel in channels:
            await channel.close()


async def _at_least(value: Any, threshold: float) -> bool:
    return await value >= threshold


# -------------------------------------------------------------------- the sidecar's side alone

async def test_with_the_collector_down_the_buffer_keeps_the_newest_within_its_bound(
        tmp_path: Path, serve: Any) -> None:
    webhook = await serve(posture)
    db = rules_db(tmp_path / "pod", webhook.url)
    port, ops = free_port(), free_port()  # nothing listens there yet
    bound = 64 << 10
    log, grpc_port = await asyncio.to_thread(
        start_server, db, *shipping(f"http://127.0.0.1:{port}/v1/decisions", "pod-0"), "--http", f"127.0.0.1:{ops}",
        "--decision-log-buffer-bytes", str(bound), env=TOKEN_ENV)
    with stopping([log]):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            for wave in range(15):  # some 400 bytes each as shipped: six times the bound
                await asyncio.gather(*(stub.Check(check_request("/app/x", headers={
                    "x-safous-username": "alice", "x-request-id": f"bound-{wave * 100 + n:04d}"})) for n in range(100)))
        await eventually(lambda: len(local_rows(db)) == 1500, what="this pod's activity log complete")
        page = (await ops_get(ops, "/metrics"))[1]
        held = metric(page, "safous_decision_log_buffer_records")
        size = metric(page, "safous_decision_log_buffer_bytes")
        assert 0 < size <= bound and metric(page, "safous_decision_log_failed_posts_total") >= 1
        assert metric(page, "safous_decision_log_dropped_total") == 1500 - held
        assert metric(page, "safous_decision_log_shipped_total") == 0
        # The collector comes: what the buffer kept arrives, and it is the newest decisions.
        with collector(tmp_path / "fleet.db", listen=f"127.0.0.1:{port}"):
            await eventually(lambda: len(fleet_rows(tmp_path / "fleet.db")) >= held, timeout=40,
                             what="the buffer delivered")
            shipped = [request_id for _, request_id, *_ in fleet_rows(tmp_path / "fleet.db")]
            assert shipped == [row[0] for row in local_rows(db)][-int(held):]


def test_the_buffer_holds_no_more_memory_than_its_bound() -> None:
    """What the buffer counts for a record (its bytes and ``RECORD_OVERHEAD``) is at least what
    Python holds for it: the bound is on memory, not just on bytes."""
    bound = 256 << 10
    shipper = DecisionShipper("http://127.0.0.1:9/v1/decisions", pod="pod-0", bearer=lambda: "t", max_bytes=bound)
    records = [record(f"mem-{n:05d}", path=f"/app/{n}") for n in range(5000)]
    # Warm: the caches of what makes a record (orjson's keys, the times' seconds) are not the buffer's.
    DecisionShipper(shipper.url, pod="pod-0", bearer=lambda: "t").add(records[:64], [None] * 64)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(records), 64):  # as the activity writer hands them over
            shipper.add(records[start:start + 64], [None] * len(records[start:start + 64]))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    count, size = shipper.buffered
    assert size <= bound and held <= size, (held, size)
    assert shipper.dropped == 5000 - count and 0 < count < 5000
    assert held >= count * 200  # it did measure the records: some 300 bytes each
    assert RECORD_OVERHEAD >= 100


async def test_tls_to_the_collector_is_verified(tmp_path: Path, tls: TlsDir, start_sidecar: Any, authz: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN_ENV[TOKEN_VARIABLE])
    fleet = tmp_path / "fleet.db"
    with collector(fleet, "--tls-cert", str(tls.server.cert_path), "--tls-key", str(tls.server.key_path)) as running:
        assert running.url.startswith("https://")
        trusted = await start_sidecar(decision_log_url=running.url, decision_log_ca_bundle=tls.ca.cert_path,
                                      decision_log_bearer_token=f"env:{TOKEN_VARIABLE}", pod_name="pod-tls",
                                      decision_log_interval=0.1, default_action="allow")
        untrusted = await start_sidecar(decision_log_url=running.url, db=tmp_path / "other.db",
                                        decision_log_bearer_token=f"env:{TOKEN_VARIABLE}", pod_name="pod-system",
                                        decision_log_interval=0.1, default_action="allow")
        for sidecar in (trusted, untrusted):
            await authz(sidecar.port).Check(check_request("/tls", headers={"x-request-id": f"tls-{sidecar.port}"}))
        await eventually(lambda: fleet_rows(fleet) and untrusted.shipper and untrusted.shipper.failed_posts,
                         what="one delivered, the other refused")
        assert [row[:2] for row in fleet_rows(fleet)] == [("pod-tls", f"tls-{trusted.port}")]
        assert untrusted.shipper is not None and untrusted.shipper.shipped == 0


async def test_the_decisions_as_opentelemetry_log_records(start_sidecar: Any, authz: Any, serve: Any, db: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    exported: list[ExportLogsServiceRequest] = []

    async def otlp(request: web.Request) -> web.Response:
        exported.append(ExportLogsServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    sink = await serve(otlp)
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", f"{sink.url}/v1/logs")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "50")
    webhook = await serve(posture)
    seed(db, [Rule(name="posture", url=f"{webhook.url}/posture?u=%username%",
                   actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),))],
         [Policy(name="app", path_prefix="/app", rules=("posture",))])
    sidecar = await start_sidecar(decision_log_otlp=True, pod_name="pod-otlp")
    response = await authz(sidecar.port).Check(check_request("/app/x", headers={
        "x-safous-username": "mallory", "x-request-id": "otlp-1"}))
    assert code_of(response) == "value_mismatch"

    def records() -> list[Any]:
        return [r for e in exported for rl in e.resource_logs for sl in rl.scope_logs for r in sl.log_records]

    [found] = await eventually(records, what="the decision exported")
    attributes = {a.key: a.value.string_value or a.value.double_value for a in found.attributes}
    assert (found.body.string_value, found.severity_text, found.event_name) == ("deny", "INFO", "safous.decision")
    assert (attributes["pod"], attributes["request_id"], attributes["code"], attributes["reason"]) == (
        "pod-otlp", "otlp-1", "value_mismatch", denial_reason(response))
    assert '"rule": "posture"' in attributes["trace"]
    resource = {a.key: a.value.string_value for a in exported[0].resource_logs[0].resource.attributes}
    assert (resource["service.name"], resource["service.instance.id"]) == ("safous-sidecar", "pod-otlp")


@pytest.mark.parametrize(("args", "message"), [
    (["--decision-log-url", "https://collector.example.com/v1/decisions"],
     "safous-sidecar: --decision-log-url needs --decision-log-bearer-token env:NAME|file:PATH (the collector takes "
     "nothing without its token)"),
    (["--decision-log-url", "http://10.0.0.8:9300/v1/decisions", "--decision-log-bearer-token", "env:SAFOUS_SECRET_T"],
     "safous-sidecar: --decision-log-url: Value error, http:// would send the token and the decisions in clear over "
     "the network: use https:// (--decision-log-ca-bundle for a private CA), or a loopback address"),
    (["--decision-log-url", "https://ship:pa55@c.example.com/v1/decisions", "--decision-log-bearer-token",
      "env:SAFOUS_SECRET_T"],
     "safous-sidecar: --decision-log-url: Value error, the URL holds a user part: the collector takes "
     "--decision-log-bearer-token alone"),
    (["--decision-log-url", "https://c.example.com/v1/decisions", "--decision-log-bearer-token", "t0ken"],
     "safous-sidecar: --decision-log-bearer-token: Value error, give it as env:NAME or file:PATH, not in "
     "clear (it would show in process lists and manifests)"),
    (["--decision-log-url", "https://c.example.com/v1/decisions", "--decision-log-bearer-token", "env:HOME"],
     "safous-sidecar: secret env:HOME: only variables whose names start with SAFOUS_SECRET_ may be read"),
    (["--pod-name", "pod 1"], "safous-sidecar: --pod-name: Value error, 'pod 1' is not a pod name"),
    (["--decision-log-buffer-bytes", "1024"], "safous-sidecar: --decision-log-buffer-bytes: Input should be greater"),
])
def test_shipping_settings_that_cannot_work_stop_the_sidecar(args: list[str], message: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert sidecar_cli.main(["serve", *args]) == 2
    assert capsys.readouterr().err.startswith(message)


def test_a_rules_db_from_before_the_fleet_reads_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rules.db at migration 0009, read by this admin script without migrating it: the same
    table, no POD column, explain as before; a sidecar then brings it up to date."""
    db = tmp_path / "rules.db"
    with monkeypatch.context() as old:
        old.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:9])
        migrations.ensure_database(db)
    from sidecar.db import connect, insert_activity

    conn = connect(db)
    insert_activity(conn, [record("old-1", trace={"request_id": "old-1", "decision": "deny", "rules": []}),
                           record("old-2", allowed=True)])
    conn.close()
    shown = admin(db, "logs", "activity")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0].startswith("AT                        REQUEST ID  USER ")
    assert "0010_fleet_activity not applied" in shown.stderr
    assert admin(db, "logs", "activity", "--pod", "pod-0").stdout == "no activity log entries\n"
    explained = admin(db, "explain", "old-1")
    assert explained.exit_code == 0 and "decided by pod" not in explained.stdout
    migrations.ensure_database(db)
    assert admin(db, "logs", "activity").stdout == shown.stdout


async def test_a_header_that_is_not_utf8_takes_no_decision_out_of_either_log(
        tmp_path: Path, db: Path, start_sidecar: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HTTP endpoint's parser keeps a header's bytes that are not UTF-8 as lone surrogates,
    which SQLite cannot store: the activity writer's whole batch was dropped with them (every
    other client's decisions of those 200 ms). Now the value is kept with U+FFFD, here and in
    the fleet's log."""
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN_ENV[TOKEN_VARIABLE])
    fleet = tmp_path / "fleet.db"
    with collector(fleet) as running:
        sidecar = await start_sidecar(authz_http="127.0.0.1:0", authz_http_profile="forward-auth",
                                      default_action="allow", decision_log_url=running.url, pod_name="pod-h",
                                      decision_log_bearer_token=f"env:{TOKEN_VARIABLE}", decision_log_interval=0.1)
        assert sidecar.authz_http is not None
        for n, user in enumerate((b"alice", b"\xff\xfe", b"bob")):
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.authz_http.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: sidecar\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Host: app\r\n"
                         b"X-Forwarded-Uri: /u\r\nX-Request-Id: utf8-%d\r\nx-safous-username: %s\r\n"
                         b"Connection: close\r\n\r\n" % (n, user))
            assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
            writer.close()
        rows = await eventually(lambda: len(local_rows(db)) == 3 and local_rows(db), what="three rows")
        assert [row[0] for row in rows] == ["utf8-0", "utf8-1", "utf8-2"]
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert [u for (u,) in conn.execute("SELECT username FROM activity_log ORDER BY id")] == [
                "alice", "\ufffd\ufffd", "bob"]
        await eventually(lambda: len(fleet_rows(fleet)) == 3, what="three shipped")
        assert sidecar.activity.dropped == 0 and sidecar.shipper is not None and sidecar.shipper.dropped == 0


async def _shipper_against(serve: Any, answer: Any, count: int, **options: Any) -> tuple[DecisionShipper, list[int]]:
    """A shipper with ``count`` decisions buffered, POSTing to a server that answers with
    ``answer(request, records in the batch)``; the batches' sizes as received."""
    import json

    received: list[int] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        # aiohttp's server has inflated the gzip'd body already.
        records = len(json.loads(await request.read())["records"])
        received.append(records)
        return await answer(request, records)

    server = await serve(handle)
    shipper = DecisionShipper(f"{server.url}/v1/decisions", pod="pod-0", bearer=lambda: "t", interval=0.05,
                              **options)
    shipper.add([record(f"s-{n}") for n in range(count)], [None] * count)
    shipper.start()
    return shipper, received


async def test_the_collector_refusing_a_batch_drops_it_once_and_shipping_goes_on(serve: Any) -> None:
    answered: list[int] = []

    async def answer(request: web.Request, records: int) -> web.Response:
        answered.append(400 if not answered else 200)
        return web.json_response({"error": "malformed"}, status=answered[-1])

    shipper, received = await _shipper_against(serve, answer, 30, batch_records=10)
    await eventually(lambda: shipper.shipped == 20, what="the rest delivered")
    assert (received, answered, shipper.dropped, shipper.failed_posts) == ([10, 10, 10], [400, 200, 200], 10, 0)
    await shipper.close(1)


async def test_a_batch_too_large_for_the_collector_goes_again_in_halves(serve: Any) -> None:
    async def answer(request: web.Request, records: int) -> web.Response:
        return web.json_response({}, status=413 if records > 8 else 200)

    shipper, received = await _shipper_against(serve, answer, 30, batch_records=30)
    await eventually(lambda: shipper.shipped == 30, what="all delivered")
    # Refused whole, then half, then taken in batches of a quarter.
    assert (received[:2], sum(received[2:]), max(received[2:]), shipper.dropped) == ([30, 15], 30, 7, 0)
    await shipper.close(1)


async def test_a_collector_that_does_not_answer_gets_the_stop_s_budget_and_no_more(serve: Any) -> None:
    async def answer(request: web.Request, records: int) -> web.Response:
        await asyncio.sleep(60)
        return web.json_response({})

    shipper, received = await _shipper_against(serve, answer, 12)
    await eventually(lambda: received, what="a POST under way")
    started = asyncio.get_running_loop().time()
    await shipper.close(0.5)
    assert asyncio.get_running_loop().time() - started < 2
    assert (shipper.shipped, shipper.dropped, shipper.buffered) == (0, 12, (0, 0))


async def test_a_collector_urls_credentials_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp quotes the URL in the error of an answer it cannot parse, as yarl re-encoded it
    (``p w`` as ``p%20w``): the log line shows it without its query all the same."""
    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
        await writer.drain()
        writer.close()

    caplog.set_level(logging.DEBUG)
    server = await asyncio.start_server(garbled, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/p w?X-Amz-Signature=S1gn4ture"
    shipper = DecisionShipper(url, pod="pod-0", bearer=lambda: "t", interval=0.05)
    shipper.add([record("secret-1")], [None])
    shipper.start()
    try:
        await eventually(lambda: shipper.failed_posts, what="a POST failed")
    finally:
        await shipper.close(0)
        server.close()
    [warning] = [r for r in caplog.records if r.getMessage().startswith("cannot ship decisions")]
    assert warning.error.startswith(f"cannot reach {shown_url(url)}: 400, message=")  # type: ignore[attr-defined]
    assert warning.error.endswith(f"url='{shown_url(url)}'")  # type: ignore[attr-defined]
    logged = "\n".join(str(vars(r)) for r in caplog.records)  # messages and every field
    assert "X-Amz" not in logged and "S1gn4ture" not in logged


@pytest.mark.parametrize(("text", "shown"), [
    ("url='http://reader:Pa55 w0rd@h/b p?X-Amz-Signature=S 1'", "url='http://h/b p'"),  # as given
    ("url='http://reader:Pa55%20w0rd@h/b%20p?X-Amz-Signature=S+1'", "url='http://h/b p'"),  # as yarl re-encoded it
    ("url='http://h/b%20p?X-Amz-Signature=S+1'", "url='http://h/b p'"),  # without the user part (basic auth)
    ("x" * 600, "x" * 500),
])
def test_an_errors_text_is_scrubbed_of_every_form_of_the_url(text: str, shown: str) -> None:
    url = "http://reader:Pa55 w0rd@h/b p?X-Amz-Signature=S 1"
    assert scrubbed(text, url, shown_url(url)) == shown

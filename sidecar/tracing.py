"""OpenTelemetry traces of checks (off unless configured; then one span per check, one child
span per webhook or token call, and ``traceparent`` on the webhook requests).

On when an OTLP endpoint is configured the standard way — ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (OTLP over HTTP/protobuf) — unless
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. Every other ``OTEL_*`` variable
(service name, headers, sampler, batch sizes) works as the SDK documents it.

A check's span joins the request's trace: the W3C ``traceparent`` Envoy sends with its gRPC
call (Envoy's own span for the ext_authz call), else the one in the request's headers. Only
``traceparent`` is read and sent on: a client's ``tracestate`` never reaches a webhook.
Attributes are the decision, its code, the policy and how many rules came from the cache
(counted whatever ``--trace`` says: with ``--trace off`` the check still notes its rules, in a
trace it does not record); webhook spans carry the method, host, status and duration — never a
parameter value, a secret or an answer.

Off, the check path pays one test per check and one per webhook or token call (``enabled()``):
nothing is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableSequence
from contextlib import contextmanager
from typing import Any

__all__ = ["check_span", "configure", "enabled", "outgoing_span", "shutdown"]

_tracer: Any = None
_provider: Any = None
_propagator: Any = None


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure() -> bool:
    """Set up the tracer when the environment asks for it; True when tracing is on. Raises
    ValueError for a configuration the SDK refuses."""
    global _tracer, _provider, _propagator
    if _tracer is not None or not wanted():
        return _tracer is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from . import __version__

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "safous-sidecar"),
                                "service.version": __version__}).merge(OTELResourceDetector().detect())
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("sidecar")
    _propagator = TraceContextTextMapPropagator()
    return True


def shutdown() -> None:
    """Export what is buffered and stop (at server stop)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


@contextmanager
def check_span(carriers: tuple[Mapping[str, str], ...]) -> Iterator[Any]:
    """The span of one check, child of the first carrier that holds a ``traceparent`` (gRPC
    metadata, then the request's headers). Yields the span (set attributes on it) or None."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    # traceparent alone: a client's tracestate would otherwise ride on every webhook request.
    parent = next((_propagator.extract({"traceparent": carrier["traceparent"]})
                   for carrier in carriers if "traceparent" in carrier), None)
    with _tracer.start_as_current_span("ext_authz check", context=parent, kind=SpanKind.SERVER) as span:
        yield span


@contextmanager
def outgoing_span(name: str, method: str, host: str, headers: MutableSequence[tuple[str, str]]) -> Iterator[Any]:
    """A child span of the current check for an outgoing call; appends ``traceparent`` to
    ``headers`` so the server joins the trace. Yields the span or None."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    with _tracer.start_as_current_span(name, kind=SpanKind.CLIENT,
                                       attributes={"http.request.method": method, "server.address": host}) as span:
        carrier: dict[str, str] = {}
        _propagator.inject(carrier)
        if "traceparent" in carrier:
            headers.append(("traceparent", carrier["traceparent"]))
        yield span

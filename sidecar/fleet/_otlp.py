"""The decisions as OpenTelemetry log records over OTLP/HTTP, for fleets whose log engine (Loki,
Elasticsearch, ClickHouse…) takes them through an OpenTelemetry Collector.

The SDK the project already uses for traces (``sidecar.tracing``), configured the standard way:
``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``
and the other ``OTEL_*`` variables as the SDK documents them. One record per decision, emitted
in the activity writer's thread: the body is the result (``allow``, ``deny``, ``audit_deny``, as
the decision log line's message), the attributes the shipped record's fields (the trace as JSON
text). The SDK's batch processor holds them (2,048 at most: past that it drops, and logs it) and
exports from a thread of its own, retrying as the SDK does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .. import __version__
from ..db import ActivityRecord, iso_time
from ..decision import result_name

__all__ = ["OtlpDecisionLogs", "otlp_logs_endpoint"]


def otlp_logs_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where the OTEL_* variables send logs, or None when they name no endpoint."""
    return environ.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


class OtlpDecisionLogs:
    """Decisions to OTLP log records, from ``pod``. Raises ValueError when no endpoint is
    configured, or for a configuration the SDK refuses."""

    def __init__(self, pod: str) -> None:
        if otlp_logs_endpoint() is None:
            raise ValueError("--decision-log-otlp needs OTEL_EXPORTER_OTLP_LOGS_ENDPOINT or "
                             "OTEL_EXPORTER_OTLP_ENDPOINT (OTLP over HTTP/protobuf)")
        from opentelemetry._logs import SeverityNumber
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "safous-sidecar"),
                                    "service.version": __version__, "service.instance.id": pod,
                                    }).merge(OTELResourceDetector().detect())
        self._provider = LoggerProvider(resource=resource)
        self._provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
        self._logger = self._provider.get_logger("sidecar.decision", __version__)
        self._info = SeverityNumber.INFO
        self.pod = pod

    def add(self, records: Sequence[ActivityRecord], traces: Sequence[str | None]) -> None:
        """Emit ``records`` with their stored traces (in the activity writer's thread)."""
        for record, trace in zip(records, traces, strict=True):
            attributes: dict[str, Any] = {
                "pod": self.pod, "time": iso_time(record.at), "request_id": record.request_id,
                "username": record.username, "source_ip": record.source_ip, "method": record.method,
                "host": record.host, "path": record.path, "policy": record.policy or "",
                "policy_source": record.policy_source, "code": str(record.code), "reason": record.status,
                "latency_ms": round(record.latency_ms, 3)}
            if trace is not None:
                attributes["trace"] = trace
            self._logger.emit(timestamp=int(record.at * 1e9), severity_number=self._info, severity_text="INFO",
                              body=result_name(record.allowed, record.audit_deny), attributes=attributes,
                              event_name="safous.decision")

    def close(self) -> None:
        """Export what is buffered and stop (blocks: call it in a thread)."""
        self._provider.shutdown()

"""The gRPC server: Envoy's ``Authorization/Check`` service, gRPC health, lifecycle.

Lifecycle: NOT_SERVING until rules.db is loaded, then SERVING. On SIGTERM or SIGINT:
NOT_SERVING, stop accepting, let in-flight checks finish within the grace period, flush the
activity log, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.core import CounterMetricFamily

from . import __version__, db, edge, logs, tracing
from ._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from ._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from .activity import ActivityLog
from .activity_retention import ActivityRetention
from .admission import CAUSES, Admission
from .attributes import RequestAttributes
from .authz_http import AuthzHttpServer
from .bundles import BundleSync
from .check import Checker
from .db import ActivityRecord
from .fleet import DecisionShipper, OtlpDecisionLogs
from .http_edge import HttpEdgeConfig
from .metrics import LoopLagMonitor, Metrics, counter, gauge
from .ops_http import OpsServer
from .pipeline import INTERNAL, Pipeline
from .rules import RuleEvaluator
from .rules.client import WebhookClient
from .rules.evaluator import WebhookEvaluator
from .rules.fleet import FleetCache
from .rules.secrets import resolve_secret
from .settings import Settings
from .snapshot import RulesWatcher, Snapshot

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Authorization"].full_name
# Seconds a stopping sidecar gives the collector to take the decisions still buffered, once the
# activity log has written its last ones (what it does not take stays in this pod's log only).
SHIPPING_STOP_SECONDS = 5.0
# Built once at import so the last-resort answer cannot itself fail.
_INTERNAL_RESPONSE = edge.build_response(INTERNAL, "")
# Calls the gRPC core holds until the event loop picks them up (one per loop turn: under load
# this is where checks queue, before any Python runs). By default it cancels a random share of
# new calls once 1,000 wait, all past 3,000: RST_STREAM, which a caller sees as CANCELLED and
# Envoy as a reasonless 403 (measured: 4-6 of 20 probes at 1,600 calls in flight). One bound
# for both keeps every call up to it (about 13 KB each while queued: 8,192 is ~110 MB); a
# call beyond it is still cancelled by the core, the only bound on its memory.
QUEUED_CALLS = 8192


def _internal_response() -> pb.CheckResponse:
    return _INTERNAL_RESPONSE


class AuthorizationService(pb_grpc.AuthorizationServicer):
    """The gRPC edge of the ``Pipeline``: a CheckRequest in, a CheckResponse out."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self._pipeline = pipeline
        self._jwt_namespace = settings.jwt_metadata_namespace
        self._jwt_key = settings.jwt_payload_key

    async def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:  # noqa: N802
        def read() -> RequestAttributes:
            return edge.read_request(request, jwt_namespace=self._jwt_namespace, jwt_payload_key=self._jwt_key)

        def carriers() -> tuple[Mapping[str, str], ...]:
            metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
            # The protobuf map itself: the span needs one key, not a copy of every header.
            return metadata, request.attributes.request.http.headers

        response: pb.CheckResponse = await self._pipeline.answer(
            read, edge.build_response, _internal_response, time_remaining=context.time_remaining, carriers=carriers)
        return response


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC listener when ``--tls-cert`` is set; with ``--tls-client-ca`` only
    clients (Envoy) holding a certificate from that CA may connect. Raises ValueError."""
    if settings.tls_cert is None:
        return None
    if settings.tls_key is None:
        raise ValueError("--tls-cert needs --tls-key")
    try:
        cert, key = settings.tls_cert.read_bytes(), settings.tls_key.read_bytes()
        ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ValueError(f"cannot read TLS files: {exc}") from exc
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _fleet_cache(settings: Settings) -> FleetCache | None:
    if settings.shared_cache is None:
        return None
    # Only then: redis-py and what it loads cost ~100 ms and megabytes a process that never uses them.
    from .shared_cache import fleet_cache

    return fleet_cache(settings)


class Sidecar:
    """The running service: gRPC server, rules watcher and activity log, started and stopped
    together. ``port`` is the bound gRPC port (useful with port 0). ``freeze``: the process is
    the sidecar's own (``serve``), see ``RulesWatcher``."""

    def __init__(self, settings: Settings, evaluator: RuleEvaluator | None = None, *,
                 reuse_port: bool = False, ops_socket: str | None = None, freeze: bool = False) -> None:
        self.settings = settings
        ca_bundle = str(settings.webhook_ca_bundle) if settings.webhook_ca_bundle else None
        self.evaluator = evaluator or WebhookEvaluator(
            WebhookClient(ca_bundle=ca_bundle), cache_size=settings.cache_size,
            cache_max_bytes=settings.cache_max_bytes,
            failure_ttl=settings.cache_failure_ttl, secret_policy=settings.secret_policy,
            fleet=_fleet_cache(settings))
        self.checker = Checker(settings.identity, settings.default_action, self.evaluator)
        self.admission = Admission(settings.max_checks_in_progress)
        self.metrics = Metrics(self._state_metrics)
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag)
        # --decision-log-url: the decisions shipped to the fleet's collector (sidecar.fleet).
        self.shipper = self._shipper(settings) if settings.decision_log_url else None
        self.otlp_logs: OtlpDecisionLogs | None = None  # --decision-log-otlp, set up by start()
        shipping = settings.decision_log_url is not None or settings.decision_log_otlp
        self.activity = ActivityLog(settings.db, settings.activity_queue, on_batch=self._on_batch,
                                    ship=self._ship if shipping else None)
        self.pipeline = Pipeline(self.checker, self.activity, self.admission, settings.trace)
        self.retention = ActivityRetention(settings.db, days=settings.activity_retention_days,
                                           rows=settings.activity_retention_rows)
        self.watcher = RulesWatcher(settings.db, self.evaluator, settings.reload_interval, self._on_snapshot,
                                    self._on_rules_health, freeze=freeze)
        self.evaluator.on_call = self.metrics.record_call
        # --bundle: the bundle owns rules and policies (sidecar.bundles).
        self.bundles = BundleSync(settings, self._bundle_applied) if settings.bundle else None
        # A --workers worker serves its pages on a private socket; the supervisor serves --http.
        ops_listen = f"unix:{ops_socket}" if ops_socket else settings.http
        self.ops = OpsServer(ops_listen, self.metrics, self.not_ready,
                             detail=self.bundles.detail if self.bundles else None) if ops_listen else None
        self.health = health.aio.HealthServicer()
        self.draining = False
        # SO_REUSEPORT only for --workers: otherwise a second sidecar on the same port would
        # silently share it instead of failing to start.
        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", int(reuse_port)),
            ("grpc.server.max_pending_requests", QUEUED_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", QUEUED_CALLS),
        ])
        self.port = 0
        # --authz-http: the same pipeline behind an HTTP listener (sidecar.authz_http).
        self.authz_http = AuthzHttpServer(
            settings.authz_http, self.pipeline,
            HttpEdgeConfig(settings.authz_http_profile or "envoy", settings.authz_http_trusted_hops,
                           settings.authz_http_client_cert_header or "", settings.authz_http_path_prefix),
            reuse_port=reuse_port) if settings.authz_http else None

    def not_ready(self) -> str | None:
        """Why the sidecar should not get traffic, or None when it is ready (for /readyz and
        the gRPC health service alike)."""
        if self.draining:
            return "draining"
        if self.bundles is not None and (waiting := self.bundles.not_ready()) is not None:
            return waiting
        if self.checker.snapshot is None:
            return f"rules.db not loaded: {self.watcher.last_error or 'loading'}"
        if self.watcher.last_error is not None:
            return f"rules.db reload failed: {self.watcher.last_error}"
        return None

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        # Fail closed: with --bundle, whatever rules.db held before a first revision is not served.
        if self.bundles is None or self.bundles.applied is not None:
            self.checker.snapshot = snapshot
        self._update_health()

    async def _bundle_applied(self) -> None:
        try:
            await self.watcher.load(force=True)
        except db.StoreError:
            pass  # logged by the watcher, which retries on its next tick

    def _on_rules_health(self, error: str | None) -> None:
        self._update_health()

    def _update_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.not_ready() is None \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self._set_health(status))

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def _on_batch(self, batch: list[ActivityRecord]) -> None:
        logs.write_decisions(batch)
        self.metrics.record_batch(batch)

    @staticmethod
    def _shipper(settings: Settings) -> DecisionShipper:
        assert settings.decision_log_url is not None
        reference, policy = settings.decision_log_bearer_token, settings.secret_policy
        ca_bundle = settings.decision_log_ca_bundle

        def bearer() -> str:
            return resolve_secret(reference, policy) or ""

        return DecisionShipper(settings.decision_log_url, pod=settings.pod, bearer=bearer,
                               ca_bundle=str(ca_bundle) if ca_bundle else None,
                               interval=settings.decision_log_interval,
                               batch_records=settings.decision_log_batch_records,
                               max_bytes=settings.decision_log_buffer_bytes)

    def _ship(self, batch: Sequence[ActivityRecord], traces: Sequence[str | None]) -> None:
        if self.shipper is not None:
            self.shipper.add(batch, traces)
        if self.otlp_logs is not None:
            self.otlp_logs.add(batch, traces)

    def _state_metrics(self) -> Iterator[Any]:
        yield gauge("safous_ready", "1 when ready to serve (see /readyz)", float(self.not_ready() is None))
        yield gauge("safous_checks_in_progress", "Checks being decided (--max-checks-in-progress bounds them)",
                    self.admission.in_progress)
        refused = CounterMetricFamily("safous_checks_refused", "Checks answered overloaded without running a rule, "
                                      "by cause: in_progress (at --max-checks-in-progress) or deadline (the caller "
                                      "had stopped waiting)", labels=["cause"])
        for cause in CAUSES:
            refused.add_metric([cause], self.admission.refused[cause])
        yield refused
        yield gauge("safous_insecure_listeners", "Listeners open to the network without TLS (--insecure-listen)",
                    len(self.settings.exposed_listeners()))
        snapshot = self.checker.snapshot
        yield gauge("safous_rules_snapshot_version", "Rules snapshots loaded since start",
                    snapshot.version if snapshot else 0)
        yield gauge("safous_rules_last_reload_timestamp_seconds", "When rules.db was last loaded",
                    self.watcher.last_reload or 0)
        yield gauge("safous_rules_last_reload_ok", "1 when the last reload attempt worked",
                    float(self.watcher.last_error is None))
        yield counter("safous_rules_reload_failures", "Failed reload attempts", self.watcher.reloads_failed)
        yield gauge("safous_rules_unusable", "Rules and policies in rules.db that do not validate",
                    len(snapshot.problems) if snapshot else 0)
        yield gauge("safous_activity_queue_depth", "Decisions waiting for the activity log", self.activity.depth)
        yield counter("safous_activity_written", "Decisions written to the activity log", self.activity.written)
        yield counter("safous_activity_dropped", "Decisions the activity log had to drop", self.activity.dropped)
        yield counter("safous_traces_dropped", "Traces not kept: those awaiting the activity log were at their "
                      "byte bound", self.activity.traces_dropped)
        yield counter("safous_activity_pruned", "Activity log rows deleted by retention", self.retention.deleted_total)
        if self.shipper is not None:
            records, size = self.shipper.buffered
            yield counter("safous_decision_log_shipped", "Decisions the collector took (--decision-log-url)",
                          self.shipper.shipped)
            yield counter("safous_decision_log_dropped", "Decisions not shipped: the oldest, past "
                          "--decision-log-buffer-bytes while the collector did not take them, or refused by it "
                          "(this pod's activity log keeps them)", self.shipper.dropped)
            yield counter("safous_decision_log_failed_posts", "Batches the collector did not take (down, an error, "
                          "a timeout): sent again later", self.shipper.failed_posts)
            yield gauge("safous_decision_log_buffer_records", "Decisions waiting for the collector", records)
            yield gauge("safous_decision_log_buffer_bytes", "Bytes of decisions waiting for the collector "
                        "(--decision-log-buffer-bytes bounds them)", size)
            yield gauge("safous_decision_log_last_delivery_timestamp_seconds", "When the collector last took a "
                        "batch (0: never)", self.shipper.last_delivery or 0)
        if self.bundles is not None:
            yield from self.bundles.metrics()
        for metric in self.evaluator.metrics():
            family = counter if metric.kind == "counter" else gauge
            yield family(metric.name, metric.documentation, metric.value)

    async def start(self) -> int:
        """Create/migrate rules.db, bind, load the rules. Raises StoreError, RuntimeError (cannot
        listen) or ValueError (TLS or CA files)."""
        self.loop_lag.start()
        applied = await asyncio.to_thread(db.ensure_database, self.settings.db)
        if applied:
            log.info("rules.db migrated", extra={"db": str(self.settings.db), "applied": applied})
        if await asyncio.to_thread(tracing.configure):
            log.info("OpenTelemetry traces on (OTLP/HTTP)")
        if self.settings.decision_log_otlp:
            self.otlp_logs = await asyncio.to_thread(OtlpDecisionLogs, self.settings.pod)
            log.info("decisions as OpenTelemetry logs on (OTLP/HTTP)")
        pb_grpc.add_AuthorizationServicer_to_server(  # type: ignore[no-untyped-call]  # generated, untyped
            AuthorizationService(self.pipeline, self.settings), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            credentials = server_credentials(self.settings)
            if credentials is None:
                self.port = self.server.add_insecure_port(self.settings.listen)
            else:
                self.port = self.server.add_secure_port(self.settings.listen, credentials)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {self.settings.listen}: {exc}") from exc
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.settings.listen}")
        if self.ops is not None:
            await self.ops.start()
        if self.authz_http is not None:
            await self.authz_http.start()
        self.activity.start()
        if self.shipper is not None:
            self.shipper.start()
        self.retention.start()
        await self.evaluator.start()
        if self.bundles is not None:
            await self.bundles.start()
        try:
            await self.watcher.load(force=True)
        except db.StoreError:
            pass  # NOT_SERVING until the watcher manages a load; checks deny with not_ready.
        self.watcher.start()
        await self.server.start()
        log.info("listening", extra={"listen": self.settings.listen, "port": self.port, "db": str(self.settings.db),
                                     **({"authz_http_port": self.authz_http.port} if self.authz_http else {}),
                                     "version": __version__})
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, finish in-flight checks within ``grace``, flush the activity log."""
        self.draining = self.pipeline.stopping = True
        await self.health.enter_graceful_shutdown()
        grace = self.settings.grace_period if grace is None else grace
        await asyncio.gather(self.server.stop(grace), *([self.authz_http.stop(grace)] if self.authz_http else []))
        if self.ops is not None:
            await self.ops.stop()
        if self.bundles is not None:
            await self.bundles.stop()
        await self.watcher.stop()
        await self.retention.stop()
        await self.evaluator.close()
        await self.activity.close()
        if self.shipper is not None:
            await self.shipper.close(SHIPPING_STOP_SECONDS)
        if self.otlp_logs is not None:
            await asyncio.to_thread(self.otlp_logs.close)  # exports the records still buffered
        await asyncio.to_thread(tracing.shutdown)  # exports the spans still buffered
        self.loop_lag.stop()
        log.info("stopped", extra={"activity_written": self.activity.written,
                                   "activity_dropped": self.activity.dropped})


async def serve(settings: Settings, evaluator: RuleEvaluator | None = None, *, reuse_port: bool = False,
                ops_socket: str | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    try:
        sidecar = Sidecar(settings, evaluator, reuse_port=reuse_port, ops_socket=ops_socket, freeze=True)
    except ValueError as exc:
        # E.g. a --shared-cache-key that cannot be read or is too short.
        log.error("cannot start: %s", exc)
        return 1
    try:
        await sidecar.start()
    except (db.StoreError, RuntimeError, ValueError) as exc:
        # ValueError: e.g. a --webhook-ca-bundle that holds no certificate.
        log.error("cannot start: %s", exc)
        await sidecar.stop(grace=0)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_period": settings.grace_period})
    await sidecar.stop()
    return 0


# How long a thread may hold the interpreter while another waits (Python's default: 5 ms).
# The rules loader and activity threads run Python beside the event loop; each check
# needs the interpreter a few times, and with 5 ms turns a 10,000-rule reload put checks at
# 35 ms, with 1 ms at 16 ms (measured by `make bench` during such a reload). Costs nothing
# while no thread competes.
SWITCH_INTERVAL = 0.001


def run_loop(settings: Settings, main: Coroutine[Any, Any, int]) -> int:
    """Run the server's coroutine on the configured event loop."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)

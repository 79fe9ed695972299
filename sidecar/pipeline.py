"""What every edge does with a request: admit it, decide it (map → match → evaluate: the
``Checker``), answer it, record it.

An edge — gRPC (``server.AuthorizationService`` with ``edge``) or HTTP (``authz_http`` with
``http_edge``) — brings how to read its request into ``RequestAttributes`` and how to turn a
``Decision`` into its answer; the ``Pipeline`` owns the rest, so that both edges decide, trace
and record alike and the checker never learns which one called it.

Fail closed: a request that cannot be read, a check that fails, an answer that cannot be built
all end as the edge's ``internal`` answer (an ``internal_error`` deny built in advance), never
an exception out of the pipeline, and every one is recorded. ``internal`` makes that answer
without fail (the gRPC edge returns one built at import).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from . import tracing
from .activity import ActivityLog
from .admission import Admission
from .attributes import RequestAttributes
from .check import Checker
from .db import ActivityRecord
from .db.activity import (
    HOST_CHARS,
    METHOD_CHARS,
    PATH_CHARS,
    REQUEST_ID_CHARS,
    SOURCE_IP_CHARS,
    STATUS_CHARS,
    USERNAME_CHARS,
)
from .decision import Code, Decision, result_name
from .parameters import Parameters, map_parameters
from .rules import trace

log = logging.getLogger(__name__)

INTERNAL = Decision.deny(Code.INTERNAL_ERROR, "internal error in the authorization sidecar")
_UNREAD = RequestAttributes(request_id="", path="")
# What a trace's summary holds at most (the request's fields as ``_record`` cuts them), about.
_SUMMARY_BYTES = 4096

Answer = TypeVar("Answer")
Read = Callable[[], RequestAttributes]
"""Reads the edge's request; may raise (the request is then answered and recorded ``internal``)."""
Respond = Callable[[Decision, str, tuple[str, ...]], Answer]
"""The edge's answer for (a decision, the request id, the client-sent headers the upstream
must not see: ``Checker.headers_to_remove``); may raise."""
Internal = Callable[[], Answer]
"""Makes the edge's ``internal_error`` deny, without fail."""
Carriers = Callable[[], tuple[Mapping[str, str], ...]]
"""Where a ``traceparent`` the check's span should join may be, first found wins."""


def caller_gone(time_remaining: float | None, started: float, *, stopping: bool = False) -> Decision:
    """The deny recorded for a check whose call ended before it was decided."""
    waited = (time.perf_counter() - started) * 1000
    if stopping:
        return Decision.deny(Code.CALLER_GONE, f"the sidecar stopped after {waited:.0f} ms, its --grace-period over, "
                             "before the rules were decided; the client got the proxy's own answer, not this one")
    why = "its deadline passed" if time_remaining is not None and time_remaining <= 0 else "it cancelled the call"
    return Decision.deny(Code.CALLER_GONE, f"the proxy stopped waiting after {waited:.0f} ms ({why}) before the "
                         "rules were decided; the client got the proxy's own answer, not this one")


def _no_deadline() -> float | None:
    return None


class Pipeline:
    def __init__(self, checker: Checker, activity: ActivityLog, admission: Admission,
                 trace_mode: trace.TraceMode) -> None:
        self._checker = checker
        self._activity = activity
        self._admission = admission
        self._trace = trace_mode
        self.stopping = False  # set once the servers' grace period has begun

    async def answer(self, read: Read, respond: Respond[Answer], internal: Internal[Answer], *,
                     time_remaining: Callable[[], float | None] = _no_deadline,
                     carriers: Carriers | None = None) -> Answer:
        """Decide the request ``read`` gives and answer it with ``respond``. ``time_remaining``:
        seconds before the caller stops waiting, None when it did not say. Never raises but
        ``CancelledError`` (the caller's call was cancelled: the check is recorded first)."""
        started = time.perf_counter()
        refused = self._admission.admit(time_remaining())
        if refused is not None:
            return self._undecided(read, respond, internal, refused, started)
        try:
            if carriers is not None and tracing.enabled():
                return await self._traced(read, respond, internal, carriers)
            return await self._decide(read, respond, internal)
        except asyncio.CancelledError:
            # The caller stopped waiting (its deadline passed, or it cancelled the call) and the
            # check was cancelled with it: no answer reaches it, but the check is recorded as
            # any other, so that a timeout in the proxy has its row in the activity log.
            self._undecided(read, respond, internal, caller_gone(time_remaining(), started, stopping=self.stopping),
                            started)
            raise
        finally:
            self._admission.leave()

    def _undecided(self, read: Read, respond: Respond[Answer], internal: Internal[Answer], decision: Decision,
                   started: float) -> Answer:
        """Answer and record ``decision``, reached without running the rules (``overloaded``,
        ``caller_gone``): no trace is kept, but the request is read so that the activity log
        says whose check it was."""
        attrs: RequestAttributes | None = None
        params: Parameters | None = None
        try:
            attrs = read()
            params = map_parameters(attrs, self._checker.identity)
            answer = respond(decision, attrs.request_id, ())
        except Exception:
            log.exception("check failed at the edge")
            decision, answer = INTERNAL, internal()
        try:
            self._record(attrs, params, decision, (time.perf_counter() - started) * 1000)
        except Exception:
            log.exception("could not record a decision")
        return answer

    async def _traced(self, read: Read, respond: Respond[Answer], internal: Internal[Answer],
                      carriers: Carriers) -> Answer:
        """``_decide`` in a span that joins the proxy's trace (the ``traceparent`` of its call,
        else the request's)."""
        if self._trace == "off":
            # The span counts the rules answered from the cache: the check notes them (and
            # nothing else) in a trace that is never recorded.
            trace.start(evidence=False)
        stack = contextlib.ExitStack()
        try:
            span = stack.enter_context(tracing.check_span(carriers()))
        except Exception:
            # Fail closed here too: a tracing failure must not cost the check its answer; it
            # goes on without its span.
            log.exception("could not start the check's span")
            return await self._decide(read, respond, internal)
        answer: Answer | None = None
        try:
            with stack:
                answer = await self._decide(read, respond, internal, span)
        except Exception:
            log.exception("could not end the check's span")
        return internal() if answer is None else answer

    async def _decide(self, read: Read, respond: Respond[Answer], internal: Internal[Answer],
                      span: Any = None) -> Answer:
        started = time.perf_counter()
        attrs: RequestAttributes | None = None
        params: Parameters | None = None
        # The snapshot the checker decides on (it reads it before its first await): the trace
        # lists the rules it ran, whatever a reload does meanwhile.
        check_trace = (trace.start(snapshot.policy_rules if (snapshot := self._checker.snapshot) else None)
                       if self._trace != "off" else None)
        try:
            attrs = read()
            decision, params = await self._checker.check(attrs)
            answer = respond(decision, attrs.request_id,
                             self._checker.headers_to_remove(params, decision) if params else ())
        except Exception:
            # Fail closed: never an error out of the edge (the proxy's failure mode would decide
            # those) nor an answer that could read as an allow.
            log.exception("check failed at the edge")
            decision, answer = INTERNAL, internal()
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            if span is not None:
                noted = check_trace or trace.current()
                cached = sum(1 for r in noted.rules.values() if r.source == "cache") if noted else 0
                span.set_attributes({"safous.decision": result_name(decision.allowed, decision.audit_deny),
                                     "safous.code": str(decision.code), "safous.policy": decision.policy or "",
                                     "safous.rules_from_cache": cached})
            self._record(attrs, params, decision, latency_ms, check_trace)
        except Exception:
            log.exception("could not record a decision")
        return answer

    def _record(self, attrs: RequestAttributes | None, params: Parameters | None,
                decision: Decision, latency_ms: float, check_trace: trace.CheckTrace | None = None) -> None:
        seen = attrs or _UNREAD  # the request could not be read: the decision is recorded anyway
        # Client values as the activity log, the decision log line and the trace keep them:
        # bounded once here, whatever a client sent (Envoy lets headers reach 60 KiB).
        # Positional, in ActivityRecord's field order (half the cost of keywords, on every check):
        # at, request_id, username, source_ip, host, path, method, policy, allowed, code, status,
        # latency_ms, policy_source, audit_deny.
        record = ActivityRecord(
            time.time(), seen.request_id[:REQUEST_ID_CHARS],
            params.values["username"][:USERNAME_CHARS] if params else "", seen.source.ip[:SOURCE_IP_CHARS],
            seen.host[:HOST_CHARS], seen.path[:PATH_CHARS], seen.method[:METHOD_CHARS], decision.policy,
            decision.allowed, decision.code, decision.reason[:STATUS_CHARS], latency_ms, decision.policy_source,
            decision.audit_deny,
        )
        if attrs is not None and check_trace is not None and (
                document := self._trace_of(record, decision, check_trace)) is not None:
            self._activity.record_traced(record._replace(trace=document), check_trace.size() + _SUMMARY_BYTES)
            return
        self._activity.record(record)

    def _trace_of(self, record: ActivityRecord, decision: Decision,
                  check_trace: trace.CheckTrace) -> Callable[[], dict[str, Any]] | None:
        """What builds the check's trace document in the activity writer (off the request
        path): for denials and audit denials, or every decision with ``--trace all``."""
        if self._trace == "denied" and decision.allowed and not decision.audit_deny:
            return None
        summary = {"request_id": record.request_id, "method": record.method, "host": record.host,
                   "path": record.path, "policy": decision.policy,
                   "decision": result_name(decision.allowed, decision.audit_deny),
                   "code": str(decision.code), "reason": record.status}

        def document() -> dict[str, Any]:
            return {**summary, **check_trace.document(check_trace.order(decision.policy))}

        return document

"""The evidence behind a decision: what each rule of the policy sent, got back and made of it.

While a check runs, the evaluator notes each rule in the check's ``CheckTrace`` (found through a
context variable, so the evaluator's signature and its tasks need nothing more: a task inherits
its creator's context, and a shared webhook call runs in the context of the check that started
it). Noting is a few attribute writes; the document is built later, off the request path, by
the activity log's writer (``CheckTrace.document``). A check that stops waiting for a rule
(decided without it, or cancelled) closes the rule's entry (``abandon``): a call it shared
with other checks goes on for them, and what that call learns later is not written into this
check's trace.

Masked in every document: the values of ``Authorization`` and ``Proxy-Authorization`` headers
of the rule (the authentication the HTTP client adds is never part of the rendered request),
and every part of the request (URL, body, a header) rendered from the client's credentials
(``%headers.authorization%``, ``%headers.proxy-authorization%``, ``%headers.cookie%``).
Masked and cut when noted, so that a trace, which lives until the activity writer builds its
document, holds neither those values nor more than a bounded share of what a client sent: the
URL is kept to ``URL_CHARS`` characters, the first ``MAX_HEADERS`` headers with their names and
values to ``HEADER_CHARS`` characters each, a request body and an answer to their first
``EXCERPT_BYTES`` bytes, an answer's content type to ``HEADER_CHARS`` characters.
Answers may hold personal data: traces live as long as their activity log rows.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .model import ResponseAction
from .secrets import MASK, SECRET_HEADERS
from .templates import CompiledRequest, Template, WebhookRequest

__all__ = ["EXCERPT_BYTES", "HEADER_CHARS", "MASK", "MAX_HEADERS", "URL_CHARS", "CheckTrace", "RuleTrace",
           "abandon", "current", "note", "start"]

EXCERPT_BYTES = 4096
URL_CHARS = 2048
HEADER_CHARS = 256
MAX_HEADERS = 64
CREDENTIAL_PARAMETERS = frozenset({"headers.authorization", "headers.proxy-authorization", "headers.cookie"})
"""Parameters holding the client's own credentials (a token a rule forwards for introspection,
a session cookie): a part of the request rendered from one is masked in traces."""


def secret_parts(request: CompiledRequest) -> frozenset[str]:
    """The parts of ``request`` (``url``, ``body``, lower-case header names) rendered from a
    credential parameter."""
    def credential(template: Template | None) -> bool:
        return template is not None and any(p.lower() in CREDENTIAL_PARAMETERS for p in template.parameters)

    parts = {name.lower() for name, template in request.headers if credential(template)}
    parts.update(part for part, template in (("url", request.url), ("body", request.body)) if credential(template))
    # Most rules have none: one shared empty set rather than 216 bytes per rule loaded.
    return frozenset(parts) if parts else _NO_PARTS


_NO_PARTS: frozenset[str] = frozenset()

TraceMode = Literal["denied", "all", "off"]
"""Which decisions keep their trace (``--trace``): denials and audit denials, all, none."""
Source = Literal["call", "shared", "cache", "fleet", "not sent", "not run"]
"""How a rule's outcome came about: its own webhook call; a call another check was already
making for an identical request (single flight: the request this check would have sent, and
the time it waited); the decision cache; the fleet's shared cache (``--shared-cache``: the
request this check would have sent, the pod whose call answered, and the time it took, waiting
for that call included); refused before sending (an unsafe parameter); not run
(an earlier rule already decided, or a rule it depends on failed), which includes a call
cancelled under way or shared with a check still waiting for it: its request, shown, may have
reached the webhook, but no answer was judged for this check."""

# What a kept entry costs beyond its texts (the objects, a header's tuple and strings), about:
# enough for a bound on what traces hold, not an exact count.
_ENTRY_BYTES = 400
_HEADER_BYTES = 120


@dataclass(slots=True)
class RuleTrace:
    """One rule of a check. ``request`` is what the trace keeps of the request sent, masked
    and cut (``keep_request``), never the request itself."""

    rule: str
    source: Source = "not run"
    request: WebhookRequest | None = None
    status: int | None = None
    content_type: str = ""
    answer: bytes = b""
    answer_bytes: int = 0
    failure: tuple[str, str] | None = None
    seconds: float | None = None
    actions: tuple[ResponseAction, ...] = ()
    failed_action: int | None = None
    # source "fleet": the pod whose webhook call this is (``sidecar.rules.fleet``).
    pod: str | None = None
    # The check no longer waits for this rule (``abandon``): nothing more is written to it.
    closed: bool = False

    def keep_request(self, request: WebhookRequest, secret_parts: frozenset[str]) -> None:
        """Keep ``request`` masked (the rule's ``SECRET_HEADERS``, and ``secret_parts``: the
        parts rendered from a credential, as the module's ``secret_parts`` lists them) and cut
        (module docstring)."""
        def hidden(name: str) -> bool:
            return name.lower() in SECRET_HEADERS or name.lower() in secret_parts

        headers = [(_cut(name, HEADER_CHARS), MASK if hidden(name) else _cut(value, HEADER_CHARS))
                   for name, value in request.headers[:MAX_HEADERS]]
        if len(request.headers) > MAX_HEADERS:
            headers.append(("…", f"{len(request.headers) - MAX_HEADERS} more headers, not kept"))
        body = request.body
        if body is not None:
            # One byte past the excerpt: the document still shows that the body was cut.
            body = MASK.encode() if "body" in secret_parts else body[:EXCERPT_BYTES + 1]
        url = MASK if "url" in secret_parts else _cut(request.url, URL_CHARS)
        self.request = WebhookRequest(request.method, url, tuple(headers), body)

    def keep_answer(self, status: int, content_type: str, body: bytes) -> None:
        if self.closed:
            return
        self.status, self.content_type = status, _cut(content_type, HEADER_CHARS)
        self.answer, self.answer_bytes = body[:EXCERPT_BYTES], len(body)

    def size(self) -> int:
        """Bytes the entry holds, about (texts counted by length)."""
        size = _ENTRY_BYTES + len(self.answer) + len(self.content_type)
        if self.failure is not None:
            size += len(self.failure[1])
        request = self.request
        if request is not None:
            size += len(request.url) + len(request.body or b"") + sum(
                _HEADER_BYTES + len(name) + len(value) for name, value in request.headers)
        return size


@dataclass(slots=True)
class CheckTrace:
    """The rules of one check, in the order they were noted (policy order is restored by
    ``document``). ``planned``: each policy's rules as the check was given them (the rules
    snapshot's compiled rules by policy name, whatever a reload does meanwhile), or None.
    ``evidence``: False for a trace that only counts the rules answered from the cache (a
    span's, with traces off): nothing else is noted, so no request is masked and kept."""

    rules: dict[str, RuleTrace] = field(default_factory=dict)
    planned: Mapping[str, Any] | None = None
    evidence: bool = True

    def rule(self, name: str) -> RuleTrace:
        entry = self.rules.get(name)
        if entry is None:
            entry = self.rules[name] = RuleTrace(name)
        return entry

    def size(self) -> int:
        """Bytes the trace holds, about: a bound on what pending traces hold can be kept."""
        return sum(entry.size() for entry in self.rules.values())

    def order(self, policy: str | None) -> list[str] | None:
        """The names of the rules ``policy`` was to run in this check, in order; None when not
        known (no such policy, or one decided without its rules: an invalid rule)."""
        rules = self.planned.get(policy) if self.planned is not None and policy is not None else None
        if not isinstance(rules, tuple):
            return None
        return [str(getattr(rule, "name", rule)) for rule in rules]

    def document(self, order: list[str] | None = None) -> dict[str, Any]:
        """The trace as JSON-ready data, rules in ``order`` (the policy's) when given."""
        names = order or list(self.rules)
        return {"rules": [_rule_document(self.rules.get(name) or RuleTrace(name)) for name in names]}


_current: contextvars.ContextVar[CheckTrace | None] = contextvars.ContextVar("safous_trace", default=None)


def start(planned: Mapping[str, Any] | None = None, *, evidence: bool = True) -> CheckTrace:
    """A new trace for the check running in this context (``CheckTrace.planned``,
    ``CheckTrace.evidence``)."""
    trace = CheckTrace(planned=planned, evidence=evidence)
    _current.set(trace)
    return trace


def current() -> CheckTrace | None:
    """The trace of the check running in this context, if any."""
    return _current.get()


def note(rule: str, source: Source, actions: tuple[ResponseAction, ...] = (), *,
         failure: tuple[str, str] | None = None, failed_action: int | None = None) -> RuleTrace | None:
    """Note how ``rule`` was decided in the current check's trace (None when not tracing, or
    when the check no longer waits for the rule): ``failed_action`` is the index in
    ``actions`` of the response action that did not hold."""
    trace = _current.get()
    if trace is None or not (trace.evidence or source == "cache"):
        return None
    entry = trace.rule(rule)
    if entry.closed:
        return None
    entry.source, entry.actions = source, actions
    entry.failure, entry.failed_action = failure, failed_action
    return entry


def abandon(rule: str) -> None:
    """The current check stops waiting for ``rule`` (an earlier rule decided, or the check was
    cancelled): the rule is not run for it, whatever a call it shares with other checks
    answers later. Its request, if noted, is kept."""
    trace = _current.get()
    if trace is None:
        return
    entry = trace.rule(rule)
    entry.source, entry.closed = "not run", True
    entry.failure = entry.failed_action = entry.seconds = entry.status = None
    entry.answer, entry.answer_bytes, entry.content_type = b"", 0, ""


def _rule_document(entry: RuleTrace) -> dict[str, Any]:
    # A call that never finished for this check (still under way when the document is built)
    # decided nothing for it.
    source: Source = "not run" if entry.source == "call" and entry.seconds is None else entry.source
    doc: dict[str, Any] = {"rule": entry.rule, "source": source}
    if source == "fleet" and entry.pod is not None:
        doc["pod"] = entry.pod
    if entry.request is not None:  # masked and cut by keep_request
        request = entry.request
        doc["request"] = {
            "method": request.method,
            "url": request.url,
            "headers": [[name, value] for name, value in request.headers],
            "body": _excerpt(request.body) if request.body is not None else None,
        }
    if entry.status is not None and source != "not run":
        doc["answer"] = {"status": entry.status, "content_type": entry.content_type,
                         "bytes": entry.answer_bytes, "body": _excerpt(entry.answer)}
    failure = entry.failure if source != "not run" else None
    doc["outcome"] = failure[0] if failure else "held" if source != "not run" else "not run"
    if failure is not None:
        doc["reason"] = failure[1]
    if entry.actions:
        doc["actions"] = [{"type": str(a.type), "key": a.key, "value": a.value,
                           "verdict": _verdict(entry, source, i)} for i, a in enumerate(entry.actions)]
    if entry.seconds is not None:
        doc["ms"] = round(entry.seconds * 1000, 3)
    return doc


def _verdict(entry: RuleTrace, source: Source, index: int) -> str:
    """``held``, ``failed`` or ``not checked``: the actions before the one that failed held,
    those after it were not checked; all held when the rule did; none were checked when the
    call or the answer failed first."""
    if source == "not run":
        return "not checked"
    if entry.failure is None:
        return "held"
    if entry.failed_action is None or index > entry.failed_action:
        return "not checked"
    return "failed" if index == entry.failed_action else "held"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _excerpt(data: bytes) -> str:
    text = data[:EXCERPT_BYTES].decode("utf-8", "replace")
    return text + ("…" if len(data) > EXCERPT_BYTES else "")

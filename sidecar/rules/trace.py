"""The evidence behind a decision: what each rule of the policy sent, got back and made of it.

While a check runs, the evaluator notes each rule in the check's ``CheckTrace`` (found through a
context variable, so the evaluator's signature and its tasks need nothing more: a task inherits
its creator's context, and a shared webhook call runs in the context of the check that started
it). Noting is a few attribute writes; the document is built later, off the request path, by
the activity log's writer (``CheckTrace.document``).

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
from dataclasses import dataclass, field
from typing import Any, Literal

from .model import ResponseAction
from .secrets import MASK, SECRET_HEADERS
from .templates import CompiledRequest, Template, WebhookRequest

__all__ = ["EXCERPT_BYTES", "HEADER_CHARS", "MASK", "MAX_HEADERS", "URL_CHARS", "CheckTrace", "RuleTrace",
           "note", "start"]

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
    return frozenset(parts)

Source = Literal["call", "shared", "cache", "not sent", "not run"]
"""How a rule's outcome came about: its own webhook call; a call made at the same moment for an
identical request (single flight); the decision cache; refused before sending (an unsafe
parameter); not run (an earlier rule already decided, or a rule it depends on failed), which
includes a call cancelled under way: its request, shown, may have reached the webhook, but no
answer was judged."""


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
        self.status, self.content_type = status, _cut(content_type, HEADER_CHARS)
        self.answer, self.answer_bytes = body[:EXCERPT_BYTES], len(body)


@dataclass(slots=True)
class CheckTrace:
    """The rules of one check, in the order they were noted (policy order is restored by
    ``document``)."""

    rules: dict[str, RuleTrace] = field(default_factory=dict)

    def rule(self, name: str) -> RuleTrace:
        entry = self.rules.get(name)
        if entry is None:
            entry = self.rules[name] = RuleTrace(name)
        return entry

    def document(self, order: list[str] | None = None) -> dict[str, Any]:
        """The trace as JSON-ready data, rules in ``order`` (the policy's) when given."""
        names = order or list(self.rules)
        return {"rules": [_rule_document(self.rules.get(name) or RuleTrace(name)) for name in names]}


_current: contextvars.ContextVar[CheckTrace | None] = contextvars.ContextVar("safous_trace", default=None)


def start() -> CheckTrace:
    """A new trace for the check running in this context."""
    trace = CheckTrace()
    _current.set(trace)
    return trace


def note(rule: str, source: Source, actions: tuple[ResponseAction, ...] = (), *,
         failure: tuple[str, str] | None = None, failed_action: int | None = None) -> RuleTrace | None:
    """Note how ``rule`` was decided in the current check's trace (None when not tracing):
    ``failed_action`` is the index in ``actions`` of the response action that did not hold."""
    trace = _current.get()
    if trace is None:
        return None
    entry = trace.rule(rule)
    entry.source, entry.actions = source, actions
    entry.failure, entry.failed_action = failure, failed_action
    return entry


def _rule_document(entry: RuleTrace) -> dict[str, Any]:
    doc: dict[str, Any] = {"rule": entry.rule, "source": entry.source}
    if entry.request is not None:  # masked and cut by keep_request
        request = entry.request
        doc["request"] = {
            "method": request.method,
            "url": request.url,
            "headers": [[name, value] for name, value in request.headers],
            "body": _excerpt(request.body) if request.body is not None else None,
        }
    if entry.status is not None:
        doc["answer"] = {"status": entry.status, "content_type": entry.content_type,
                         "bytes": entry.answer_bytes, "body": _excerpt(entry.answer)}
    doc["outcome"] = "held" if entry.failure is None and entry.source != "not run" else (
        entry.failure[0] if entry.failure else "not run")
    if entry.failure is not None:
        doc["reason"] = entry.failure[1]
    if entry.actions:
        doc["actions"] = [{"type": str(a.type), "key": a.key, "value": a.value, "verdict": _verdict(entry, i)}
                          for i, a in enumerate(entry.actions)]
    if entry.seconds is not None:
        doc["ms"] = round(entry.seconds * 1000, 3)
    return doc


def _verdict(entry: RuleTrace, index: int) -> str:
    """``held``, ``failed`` or ``not checked``: the actions before the one that failed held,
    those after it were not checked; all held when the rule did; none were checked when the
    call or the answer failed first."""
    if entry.failure is None:
        return "held" if entry.source != "not run" else "not checked"
    if entry.failed_action is None or index > entry.failed_action:
        return "not checked"
    return "failed" if index == entry.failed_action else "held"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _excerpt(data: bytes) -> str:
    text = data[:EXCERPT_BYTES].decode("utf-8", "replace")
    return text + ("…" if len(data) > EXCERPT_BYTES else "")

"""``safous-admin test``: run one rule once, as the sidecar would, and say why it holds or not.

``dry_run`` renders the compiled rule's request from a parameter lookup, sends it through a
``WebhookClient`` (same client, authentication, timeout and size limit as the sidecar) and
judges the answer with ``evaluator.judge_response``, the sidecar's own judgement: the
``failure`` it returns is the code and reason the sidecar would deny with. On top of that it
keeps what an admin needs to see: the request as sent (to be shown masked), the response, and a
verdict for *every* response action, where the sidecar stops at the first that fails; each
verdict too is the sidecar's code (``CompiledActions.apply``) judging that action alone, so a
regex is matched by RE2 exactly as in the sidecar, never by a second implementation.

It takes the evaluator's steps for one rule (render, call, judge), minus the decision cache and
call coalescing: a dry run always calls.

``run_stored`` runs a rule of rules.db (read-only) with a lookup that ``parameter_lookup``
makes of ``--param`` and ``--header``; ``report`` is what ``test`` prints.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar import db
from sidecar.decision import Code
from sidecar.exchange import quoted
from sidecar.parameters import HEADER_PREFIX, PARAMETERS, UnknownParameter, check_parameter_name
from sidecar.rules.client import BasicAuth, OAuthAuth, WebhookClient, WebhookFailure, WebhookResponse
from sidecar.rules.evaluator import CompiledRule, WebhookEvaluator, judge_response
from sidecar.rules.model import ActionType, ResponseAction
from sidecar.rules.responses import (
    ResponseInvalid,
    as_text,
    compile_actions,
    parse_response,
    quote_value,
    shown_value,
    status_failure,
    value_at,
)
from sidecar.rules.secrets import MASK
from sidecar.rules.templates import Lookup, UnsafeParameter, WebhookRequest

from . import display
from .access import Admin, one_rule
from .validation import AdminError

__all__ = ["ActionVerdict", "DryRun", "dry_run", "parameter_lookup", "report", "run_stored", "shown_headers"]

REQUEST_BODY_LIMIT = 4096
RESPONSE_BODY_LIMIT = 2048


@dataclass(frozen=True, slots=True)
class ActionVerdict:
    """One response action against the response: ``verdict`` is ``met``, ``not met``,
    ``stored``, ``missing`` (no value at the key) or ``not checked`` (no response to check);
    ``detail`` says what the response held."""

    action: ResponseAction
    verdict: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DryRun:
    """What one run of a rule did. ``request`` is None when it could not be rendered,
    ``response`` None when the webhook gave none; ``failure`` is the sidecar's
    ``(code, reason)`` for the rule, None when the rule holds."""

    rule: CompiledRule
    request: WebhookRequest | None
    response: WebhookResponse | None
    verdicts: tuple[ActionVerdict, ...]
    failure: tuple[Code, str] | None
    stored: dict[str, str] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return self.failure is None


def shown_headers(request: WebhookRequest, rule: CompiledRule) -> list[tuple[str, str]]:
    """The headers ``WebhookClient`` sends for ``request``, in order, as they may be shown: the
    authentication's Authorization header (in place of any the rule has) as its scheme and the
    mask, the rule's own credential headers masked."""
    headers = [(k, display.redact_header(k, v)) for k, v in request.headers]
    if isinstance(rule.auth, (BasicAuth, OAuthAuth)):
        scheme = "Basic" if isinstance(rule.auth, BasicAuth) else "Bearer"
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        headers.append(("Authorization", f"{scheme} {MASK}"))
    return headers


def _verdict(rule_name: str, action: ResponseAction, document: Any) -> ActionVerdict:
    # Held or not as the sidecar's own code judges this one action alone: a regex in RE2, so
    # in linear time, with RE2's syntax (\z, \p{L}) and RE2's meaning (\d is ASCII).
    failure = compile_actions((action,)).apply(rule_name, document).failure
    code = failure[0] if failure else None
    if code is Code.KEY_MISSING:
        return ActionVerdict(action, "missing", f"{action.key} missing from the response")
    if code is Code.RESPONSE_INVALID:
        return ActionVerdict(action, "not checked", "response is nested too deeply")
    value = value_at(document, action.key)  # there, and as_text of it fits: apply read it
    text = as_text(value)
    shown = shown_value(value, text)
    if action.type is ActionType.STRING:
        if code is None:
            return ActionVerdict(action, "met", f"{action.key} is {shown}")
        return ActionVerdict(action, "not met", f"{action.key} is {shown}, expected {quote_value(action.value)}")
    if action.type is ActionType.REGEX:
        if code is None:
            return ActionVerdict(action, "met", f"{action.key} {shown} matches /{action.value}/")
        return ActionVerdict(action, "not met", f"{action.key} {shown} does not match /{action.value}/")
    return ActionVerdict(action, "stored", f"%stored.{action.value}% = {shown}")


def _verdicts(rule: CompiledRule, response: WebhookResponse) -> tuple[ActionVerdict, ...]:
    actions = rule.actions.actions
    if status_failure(rule.name, response.status) is not None:
        return tuple(ActionVerdict(a, "not checked", "the webhook's status is not 2xx") for a in actions)
    try:
        document = parse_response(response.body, rule.rule.verification)
    except ResponseInvalid as exc:
        return tuple(ActionVerdict(a, "not checked", str(exc)) for a in actions)
    return tuple(_verdict(rule.name, a, document) for a in actions)


async def dry_run(client: WebhookClient, rule: CompiledRule, lookup: Lookup) -> DryRun:
    """Run ``rule`` once with parameter values from ``lookup``; ``client`` must be started.
    Never raises for the rule's failure (it is in ``failure``); cancellation propagates."""
    name = f'"{rule.name}"'  # as the sidecar words it
    try:
        request = rule.request.render(lookup)
    except UnsafeParameter as exc:
        return DryRun(rule, None, None, (), (Code.UNSAFE_PARAMETER, f"rule {name}: {exc}"))
    try:
        response = await client.call(request, timeout=rule.timeout, auth=rule.auth)
    except WebhookFailure as exc:
        not_checked = tuple(ActionVerdict(a, "not checked", "no response") for a in rule.actions.actions)
        return DryRun(rule, request, None, not_checked, (exc.code, f"rule {name}: {exc.reason}"))
    outcome = judge_response(rule, response)
    return DryRun(rule, request, response, _verdicts(rule, response), outcome.failure, dict(outcome.stored))


def run_stored(admin: Admin, rule_name: str, lookup: Lookup) -> DryRun:
    """Run the rule ``rule_name`` of rules.db once, compiled as the sidecar compiles it (its
    secrets read here). Raises ``AdminError`` with exit status 2 when it cannot run: no such
    rule, a broken one, a secret not set, a CA bundle not read."""
    try:
        with admin.read() as conn:
            stored = one_rule(conn, rule_name, 2)
    except db.StoreError as exc:
        raise AdminError(str(exc), 2) from None
    if stored.rule is None:
        raise AdminError(f"rule {quoted(rule_name)} does not validate: {stored.error}", 2)
    client = WebhookClient(ca_bundle=os.environ.get("SAFOUS_WEBHOOK_CA_BUNDLE") or None)
    try:
        compiled = WebhookEvaluator(client, secret_policy=admin.secrets).compile(stored.rule)
    except ValueError as exc:
        raise AdminError(f"rule {quoted(rule_name)} cannot run: {exc}", 2) from None

    async def run() -> DryRun:
        try:
            await client.start()
        except ValueError as exc:
            raise AdminError(f"SAFOUS_WEBHOOK_CA_BUNDLE: {exc}", 2) from None
        try:
            return await dry_run(client, compiled, lookup)
        finally:
            await client.close()

    return asyncio.run(run())


def parameter_lookup(given: Sequence[tuple[str, str]], headers: Sequence[tuple[str, str]]) -> Lookup:
    """The values a dry run fills in: ``given`` parameters (``%``s optional), ``headers`` for
    ``%headers.X%``; the others empty. Raises ``AdminError`` (exit 2) for an unknown parameter."""
    values: dict[str, str] = dict.fromkeys(PARAMETERS, "")
    for name, value in given:
        name = name.strip("%")
        try:
            check_parameter_name(name)
        except UnknownParameter as exc:
            raise AdminError(f"--param: {exc}", 2) from None
        values[name] = value
    request_headers = {k.lower(): v for k, v in headers}

    def lookup(name: str) -> str:
        if name in values:
            return values[name]
        if name.startswith(HEADER_PREFIX):
            return request_headers.get(name[len(HEADER_PREFIX):].lower(), "")
        return ""  # a %stored.NAME% not given: no earlier rule runs in a dry run

    return lookup


def _body_text(body: bytes, limit: int) -> list[str]:
    text = body[:limit].decode("utf-8", errors="replace")
    lines = display.clean(text, multiline=True).split("\n")
    if len(body) > limit:
        lines.append(f"... ({len(body) - limit} more bytes not shown)")
    return lines


def report(result: DryRun, lookup: Lookup) -> str:
    """What ``test`` prints: the parameters used, the request as sent (secrets masked), the
    response (long bodies cut), each action's verdict, the decision."""
    rule = result.rule
    lines = [f"rule {quoted(rule.name)}" + ("" if rule.rule.enabled else " (disabled)")]
    if rule.request.parameters:
        lines.append("parameters")
        width = max(len(n) for n in rule.request.parameters) + 2
        for name in rule.request.parameters:
            value = lookup(name)
            lines.append(f"  {f'%{name}%':<{width}}  {display.clean(value) if value else '(empty)'}".rstrip())
    lines.append("request")
    if result.request is None:
        lines.append("  not sent")
    else:
        request = result.request
        lines.append(f"  {request.method} {display.clean(request.url)}")
        for key, value in shown_headers(request, rule):
            lines.append(f"  {display.clean(key)}: {display.clean(value)}")
        if request.body is not None:
            lines.append("")
            lines += [f"  {line}" for line in _body_text(request.body, REQUEST_BODY_LIMIT)]
    lines.append("response")
    if result.response is None:
        lines.append("  none")
    else:
        response = result.response
        kind = f", {display.clean(response.content_type)}" if response.content_type else ""
        lines.append(f"  HTTP {response.status}{kind}, {len(response.body)} bytes")
        if response.body:
            lines += [f"  {line}" for line in _body_text(response.body, RESPONSE_BODY_LIMIT)]
    if result.verdicts:
        lines.append("actions")
        specs = [display.clean(f"{v.action.type.value}:{v.action.key}:{v.action.value}") for v in result.verdicts]
        width = max(map(len, specs))
        for verdict, spec in zip(result.verdicts, specs, strict=True):
            lines.append(f"  {verdict.verdict:<11}  {spec:<{width}}  {display.clean(verdict.detail)}")
    if result.failure is None:
        lines.append("decision: met")
    else:
        code, reason = result.failure
        lines.append(f"decision: not met ({code}): {display.clean(reason)}")
    return "\n".join(line.rstrip() for line in lines)

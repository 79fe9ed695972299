"""``safous-admin test``: run one rule once, as the sidecar would, and say why it holds or not.

``dry_run`` renders the compiled rule's request from a parameter lookup, sends it through a
``WebhookClient`` (same client, authentication, timeout and size limit as the sidecar) and
judges the answer with ``responses.evaluate_response``, the sidecar's own judgement: the
``failure`` it returns is the code and reason the sidecar would deny with. On top of that it
keeps what an admin needs to see: the request as sent (to be shown masked), the response, and a
verdict for *every* response action, where the sidecar stops at the first that fails.

It mirrors ``WebhookEvaluator._run_rule`` step for step (render, call, judge, refuse stored
values with CR/LF), minus the decision cache and call coalescing: a dry run always calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sidecar.decision import Code
from sidecar.rules.responses import (
    KeyMissing,
    ResponseInvalid,
    as_text,
    parse_response,
    quote_value,
    shown_value,
    status_failure,
    value_at,
)
from sidecar.rules.model import ActionType, ResponseAction
from sidecar.rules.secrets import MASK
from sidecar.rules.templates import Lookup, UnsafeParameter, WebhookRequest
from sidecar.rules.client import BasicAuth, OAuthAuth, WebhookClient, WebhookFailure, WebhookResponse
from sidecar.rules.evaluator import CompiledRule, judge_response

from .display import redact_header

__all__ = ["ActionVerdict", "DryRun", "dry_run", "shown_headers"]



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
    headers = [(k, redact_header(k, v)) for k, v in request.headers]
    if isinstance(rule.auth, (BasicAuth, OAuthAuth)):
        scheme = "Basic" if isinstance(rule.auth, BasicAuth) else "Bearer"
        headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
        headers.append(("Authorization", f"{scheme} {MASK}"))
    return headers


def _verdict(action: ResponseAction, document: Any) -> ActionVerdict:
    try:
        value = value_at(document, action.key)
        text = as_text(value)
    except KeyMissing:
        return ActionVerdict(action, "missing", f"{action.key} missing from the response")
    except RecursionError:
        return ActionVerdict(action, "not checked", "response is nested too deeply")
    shown = shown_value(value, text)
    if action.type is ActionType.STRING:
        if text == action.value:
            return ActionVerdict(action, "met", f"{action.key} is {shown}")
        return ActionVerdict(action, "not met", f"{action.key} is {shown}, expected {quote_value(action.value)}")
    if action.type is ActionType.REGEX:
        if re.search(action.value, text):
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
    return tuple(_verdict(a, document) for a in actions)


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

"""One check, stage by stage: map → match → evaluate. Plain values in, a Decision out.

Fail closed: whatever goes wrong inside becomes a deny with a stable code. The only way to an
allow is a policy that matched and whose rules (if the integration is on) all held, or an
explicit ``--default-action allow``.
"""

from __future__ import annotations

import logging

from .attributes import RequestAttributes
from .decision import Code, Decision
from .evaluation import RuleEvaluator
from .parameters import IdentityConfig, Parameters, map_parameters
from .snapshot import Snapshot
from .store import InvalidRow

log = logging.getLogger(__name__)


class Checker:
    def __init__(self, identity: IdentityConfig, default_action: str, evaluator: RuleEvaluator) -> None:
        self.identity = identity
        self.default_allow = default_action == "allow"
        self.evaluator = evaluator
        self.snapshot: Snapshot | None = None

    async def check(self, attrs: RequestAttributes) -> tuple[Decision, Parameters | None]:
        """Decide one request. Never raises: an unexpected error is an ``internal_error`` deny."""
        params: Parameters | None = None
        try:
            params = map_parameters(attrs, self.identity)
            return await self._decide(attrs, params), params
        except Exception:
            # Fail closed on purpose: a bug or an unforeseen input must never let a request in.
            log.exception("check failed", extra={"request_id": attrs.request_id})
            return Decision.deny(Code.INTERNAL_ERROR, "internal error in the authorization sidecar"), params

    async def _decide(self, attrs: RequestAttributes, params: Parameters) -> Decision:
        snapshot = self.snapshot
        if snapshot is None:
            return Decision.deny(Code.NOT_READY, "the authorization sidecar has not loaded its rules")
        policy = snapshot.index.match(attrs.host, attrs.path, attrs.method)
        if policy is None:
            if self.default_allow:
                return Decision.allow(Code.DEFAULT_ALLOW, "no policy matches; default action is allow")
            return Decision.deny(Code.NO_MATCHING_POLICY, "no policy matches this request")
        if not policy.integration:
            return Decision.allow(Code.INTEGRATION_OFF, f'policy "{policy.name}": integration is off', policy.name)
        rules = snapshot.policy_rules.get(policy.name, ())
        if not rules:
            return Decision.allow(Code.NO_RULES, f'policy "{policy.name}" has no enabled rules', policy.name)
        for rule in rules:
            # Reported before any webhook is called: a broken rule denies whatever the others say.
            if isinstance(rule, InvalidRow):
                return Decision.deny(
                    Code.RULE_INVALID, f'{rule.kind} "{rule.name}" is invalid: {rule.error}', policy.name
                )
        return await self.evaluator.evaluate(policy, rules, params)

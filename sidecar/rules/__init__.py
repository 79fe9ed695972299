"""The "evaluate" stage's seam: how a policy's rules turn into a decision.

The check pipeline depends only on the ``RuleEvaluator`` protocol defined here; the webhook
evaluator implements it, so evaluation never imports the server and the server never knows
how rules are called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..decision import Code, Decision
from ..parameters import Parameters
from ..policies import Policy
from .model import InvalidRow, Rule


class RuleEvaluator(Protocol):
    """Turns a matched policy's enabled rules into a decision.

    ``compile`` runs once per rule per rules.db load, off the request path; it raises
    ValueError for a rule that cannot be used (the policies that use it then deny with
    ``rule_invalid``). ``evaluate`` runs per check; it gets the policy's enabled rules in order,
    as compiled values or as the InvalidRow that explains why one is unusable, and must return a
    Decision: never raise for a rule's failure (the caller still turns an unexpected exception
    into ``internal_error``). ``start`` and ``close`` bracket the server's life (e.g. to open
    and close pooled connections).
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def compile(self, rule: Rule) -> Any: ...

    async def evaluate(
        self, policy: Policy, rules: Sequence[Any | InvalidRow], params: Parameters
    ) -> Decision: ...


class UnavailableEvaluator:
    """Fails closed: any policy that needs a rule is denied with ``rule_unavailable``."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def compile(self, rule: Rule) -> Rule:
        return rule

    async def evaluate(
        self, policy: Policy, rules: Sequence[Any | InvalidRow], params: Parameters
    ) -> Decision:
        return Decision.deny(
            Code.RULE_UNAVAILABLE,
            f'policy "{policy.name}" needs rule evaluation, which is unavailable',
            policy.name,
        )

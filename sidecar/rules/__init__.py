"""The "evaluate" stage's seam: how a policy's rules turn into a decision.

The check pipeline depends only on the ``RuleEvaluator`` protocol defined here; the webhook
evaluator implements it, so evaluation never imports the server and the server never knows
how rules are called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..decision import Code, Decision

if TYPE_CHECKING:  # types only: a light module of the package (choices, secrets) loads no pydantic
    from ..parameters import Parameters
    from ..policies import Policy
    from .model import Rule

CallObserver = Callable[[str, str, float], None]
"""Told of every webhook call an evaluator makes: rule name, ``"ok"`` or the failure code,
seconds."""


@dataclass(frozen=True, slots=True)
class EvaluatorMetric:
    """One value an evaluator reports about itself (its caches, calls in flight, tokens); the
    server exposes it as a Prometheus metric of that name and kind."""

    name: str
    documentation: str
    kind: Literal["counter", "gauge"]
    value: float


class RuleEvaluator(Protocol):
    """Turns a matched policy's enabled rules into a decision.

    ``compile`` runs off the request path for each enabled rule a rules.db load brings that
    the previous snapshot did not compile (an unchanged row keeps its compiled form: the
    snapshot reuses it by the identity of the row's Rule model); it raises
    ValueError for a rule that cannot be used (the policies that use it then deny with
    ``rule_invalid`` without calling ``evaluate``). ``evaluate`` runs per check with the
    policy's enabled rules in order, as ``compile`` made them, and must return a Decision: never
    raise for a rule's failure (the caller still turns an unexpected exception into
    ``internal_error``). ``start`` and ``close`` bracket the server's life (e.g. to open and
    close pooled connections). ``metrics`` reports the evaluator's own state, and
    ``on_call``, when set, is told of each webhook call.
    """

    on_call: CallObserver | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def compile(self, rule: Rule) -> Any: ...

    async def evaluate(self, policy: Policy, rules: Sequence[Any], params: Parameters) -> Decision: ...

    def metrics(self) -> Iterable[EvaluatorMetric]: ...


class UnavailableEvaluator:
    """Fails closed: any policy that needs a rule is denied with ``rule_unavailable``."""

    on_call: CallObserver | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def compile(self, rule: Rule) -> Rule:
        return rule

    async def evaluate(self, policy: Policy, rules: Sequence[Any], params: Parameters) -> Decision:
        return Decision.deny(
            Code.RULE_UNAVAILABLE,
            f'policy "{policy.name}" needs rule evaluation, which is unavailable',
            policy.name,
        )

    def metrics(self) -> Iterable[EvaluatorMetric]:
        return ()

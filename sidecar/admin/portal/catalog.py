"""The Rules and policies page: what ``safous-admin`` shows of them, for a browser.

Read with the admin script's own code, not through Datasette: ``Admin.read`` (a read-only
connection of its own, one read transaction), ``checks`` for what the sidecar will make of
each row (the problem of a rule or policy that does not validate), ``display`` for the text
(``rule show``, ``policy show``, ``rule list --json``): secrets masked there, once, for the
terminal and the browser alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sidecar import db

from .. import checks, display
from ..access import Admin

__all__ = ["Catalog", "PolicyEntry", "RuleEntry", "read_catalog"]


@dataclass(frozen=True, slots=True)
class RuleEntry:
    name: str
    enabled: bool
    policies: tuple[str, ...]  # the policies that use it, by name
    problem: str | None  # why the sidecar cannot run it, as ``rule show`` says
    details: str  # ``safous-admin rule show NAME``, secrets masked
    document: dict[str, Any]  # ``safous-admin rule list --json``, secrets masked


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    name: str
    enabled: bool
    rules: tuple[str, ...]  # its rules, in order
    problem: str | None
    details: str  # ``safous-admin policy show NAME``
    document: dict[str, Any]  # ``safous-admin policy list --json``


@dataclass(frozen=True, slots=True)
class Catalog:
    rules: tuple[RuleEntry, ...]
    policies: tuple[PolicyEntry, ...]

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        """(kind, name, problem) of each rule and policy the sidecar cannot run."""
        return [*(("rule", r.name, r.problem) for r in self.rules if r.problem),
                *(("policy", p.name, p.problem) for p in self.policies if p.problem)]

    @property
    def unused(self) -> list[str]:
        """The rules no policy uses."""
        return [r.name for r in self.rules if not r.policies]

    def json(self) -> dict[str, Any]:
        """The page as JSON: the ``rule list --json`` and ``policy list --json`` objects."""
        return {"rules": [r.document for r in self.rules], "policies": [p.document for p in self.policies]}


def read_catalog(admin: Admin) -> Catalog:
    """Every rule and policy of rules.db, as the admin script shows them. Blocking: call it off
    the event loop. Raises ``AdminError`` or ``sidecar.db.StoreError`` as ``Admin.read`` does."""
    with admin.read() as conn:
        rules = db.read_rules(conn)
        policies = db.read_policies(conn)
    by_name = {r.name: r for r in rules}
    rule_entries = []
    for stored in rules:
        problem = checks.rule_problem(stored, admin.secrets)
        rule_entries.append(RuleEntry(
            stored.name, bool(stored.fields.get("enabled")), stored.policies, problem,
            display.rule_details(stored, problem), json.loads(display.rule_line(stored, problem))))
    policy_entries = []
    for policy in policies:
        problem = checks.policy_problem(policy, by_name)
        listed = policy.fields.get("rules")
        policy_entries.append(PolicyEntry(
            policy.name, bool(policy.fields.get("enabled")),
            tuple(str(n) for n in listed) if isinstance(listed, (list, tuple)) else (), problem,
            display.policy_details(policy, problem), json.loads(display.policy_line(policy, problem))))
    return Catalog(tuple(rule_entries), tuple(policy_entries))

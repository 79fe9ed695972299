"""What the sidecar will make of what is stored: the problems ``show`` and ``list`` report, and
the warnings a change earns when it leaves something the sidecar cannot run.

``sidecar.exchange`` refuses input before it is written; these look at rows as they are (a row
written with plain SQL may not validate, a rule enabled or disabled may break the order of a
policy's stored values) and say, in the admin's words, which requests the sidecar will then
deny with ``rule_invalid``. They only read, inside the command's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from sidecar import db
from sidecar.db import ObjectKind, StoredPolicy, StoredRule
from sidecar.exchange import (
    InvalidContent,
    check_secrets,
    quoted,
    stored_problem,
    stored_problems,
    validate_policy,
)
from sidecar.policies import Policy
from sidecar.rules.model import Rule
from sidecar.rules.secrets import SecretPolicy, is_reference
from sidecar.rules.templates import TemplateError, compile_rule_request

from .options import RuleOptions
from .validation import CLI_OPTIONS

__all__ = [
    "clear_secret_warnings",
    "export_warnings",
    "new_policy_problems",
    "policy_problem",
    "rule_problem",
    "switch_warnings",
    "validated_policy",
]


def rule_problem(stored: StoredRule, secrets: SecretPolicy) -> str | None:
    """Why the sidecar cannot use the rule, or None (secrets are resolved only where the
    sidecar runs, so an unset env:NAME is not a problem here; a reference the sidecar's secret
    policy refuses is)."""
    if stored.rule is None:
        return stored.error
    try:
        compile_rule_request(stored.rule)
        check_secrets(stored.rule, secrets)
    except (TemplateError, InvalidContent) as exc:
        return str(exc)
    return None


def policy_problem(stored: StoredPolicy, rules: Mapping[str, StoredRule]) -> str | None:
    """Why the sidecar cannot run the policy, or None. ``rules``: every stored rule, by name."""
    if stored.policy is None:
        return stored.error
    broken = [n for n in stored.policy.rules if n in rules and rules[n].rule is None]
    if broken:
        return f"rule {quoted(broken[0])} does not validate: the policy denies with rule_invalid"
    return stored_problem(stored.policy, {n: r.rule for n, r in rules.items()})


def new_policy_problems(conn: sqlite3.Connection, rule: Rule) -> list[str]:
    """Problems that changing ``rule`` as given would cause to the policies using it (not those
    they already had)."""
    rules: dict[str, Rule | None] = {r.name: r.rule for r in db.read_rules(conn)}
    using = [p.policy for p in db.read_policies(conn) if p.policy and rule.name in p.policy.rules]
    before = set(stored_problems(using, rules))
    rules[rule.name] = rule
    return [p for p in stored_problems(using, rules) if p not in before]


def switch_warnings(conn: sqlite3.Connection, kind: ObjectKind, name: str, secrets: SecretPolicy) -> list[str]:
    """What the sidecar will make of enabling or disabling ``name``: a broken rule enabled, or
    a policy whose rules no longer run in order (a disabled rule stored a value a later one
    uses)."""
    rules = {r.name: r for r in db.read_rules(conn)}
    warnings = []
    if kind == "rule":
        stored = rules[name]
        problem = rule_problem(stored, secrets)
        if problem and stored.fields["enabled"]:
            warnings.append(f"rule {quoted(name)} does not validate ({problem}): the policies "
                            "that use it deny with rule_invalid until it is repaired")
        affected = [p for p in db.read_policies(conn) if p.name in stored.policies]
    else:
        affected = db.read_policies(conn, name)
    models = {n: r.rule for n, r in rules.items()}
    for policy in affected:
        if not policy.fields["enabled"]:
            continue
        if kind == "rule":
            problem = stored_problem(policy.policy, models) if policy.policy else None
        else:
            problem = policy_problem(policy, rules)
            problem = problem and f"policy {quoted(policy.name)}: {problem}"
        if problem:
            warnings.append(problem)
    return warnings


def validated_policy(conn: sqlite3.Connection, fields: Mapping[str, Any]) -> tuple[Policy, list[str]]:
    """The policy ``fields`` describe, checked against the stored rules (``InvalidContent``), and a
    warning for each of its rules stored broken, for which it will deny."""
    rules = {r.name: r for r in db.read_rules(conn)}
    policy = validate_policy(fields, {n: r.rule for n, r in rules.items()}, names=CLI_OPTIONS)
    return policy, [f"rule {quoted(name)} does not validate ({rules[name].error}): policy "
                    f"{quoted(policy.name)} denies with rule_invalid until it is repaired"
                    for name in policy.rules if rules[name].rule is None]


def export_warnings(rules: Sequence[StoredRule], policies: Sequence[StoredPolicy]) -> list[str]:
    """For each row that does not validate: it is exported as stored, and import refuses it."""
    rows: list[tuple[ObjectKind, StoredRule | StoredPolicy]] = [*(("rule", r) for r in rules),
                                                          *(("policy", p) for p in policies)]
    return [f"{kind} {quoted(row.name)} does not validate ({row.error}): exported as stored; import "
            "refuses it until repaired" for kind, row in rows if row.error]


def clear_secret_warnings(rule: Rule, opts: RuleOptions) -> list[str]:
    """For each secret the command gave in clear: it is stored so, and how to keep it out."""
    given = {"--password": (opts.password, rule.password),
             "--client-secret": (opts.client_secret, rule.client_secret)}
    return [f"{option} is stored in clear in rules.db; env:NAME or file:PATH keeps it out"
            for option, (option_value, value) in given.items()
            if option_value is not None and value is not None and not is_reference(value)]

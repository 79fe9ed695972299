"""An import: the document checked whole against rules.db, then written in the caller's
transaction.

``plan_import`` checks the whole document before anything is written and says what importing
it writes; ``apply_import`` writes that. Objects equal to the stored ones are not written, so
importing the same document twice changes nothing and audits nothing. Objects in rules.db and
not in the document are kept, or deleted with ``replace``. The admin script's ``import`` and
``bundle build`` and the sidecar applying a bundle all go through here: what one refuses, the
others refuse.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sidecar import db
from sidecar.db import ObjectKind, StoredPolicy, StoredRule
from sidecar.policies import Policy
from sidecar.rules.model import Rule
from sidecar.rules.secrets import MASK, SECRET_HEADERS, SecretPolicy, is_reference

from ._document import FORMAT_VERSION
from ._validation import InvalidContent, check_secrets, quoted, stored_problems, validate_policy, validate_rule

__all__ = ["ImportPlan", "apply_import", "plan_import"]

Change = Literal["created", "updated", "deleted"]
_Model = TypeVar("_Model", Rule, Policy)


@dataclass
class ImportPlan:
    """What an import will write: objects to save (new or changed), to delete, and the
    ``(verb, kind, name)`` of each change, in the order they are applied."""

    rules: list[Rule] = field(default_factory=list)
    policies: list[Policy] = field(default_factory=list)
    delete_rules: list[str] = field(default_factory=list)
    delete_policies: list[str] = field(default_factory=list)
    changes: list[tuple[Change, ObjectKind, str]] = field(default_factory=list)
    unchanged: int = 0

    def count(self, verb: Change) -> int:
        return sum(1 for v, _, _ in self.changes if v == verb)

    def _save(self, kind: ObjectKind, models: Sequence[_Model], current: dict[str, _Model | None],
              out: list[_Model]) -> None:
        """Plan to save those of ``models`` that differ from the ``current`` ones, into ``out``."""
        for model in models:
            if model.name in current and current[model.name] == model:
                self.unchanged += 1
                continue
            out.append(model)
            self.changes.append(("updated" if model.name in current else "created", kind, model.name))


def _entries(document: dict[str, Any], key: str, kind: ObjectKind) -> list[dict[str, Any]]:
    entries = document.get(key, [])
    if not isinstance(entries, list):
        raise InvalidContent(f'"{key}" must be a list')
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidContent(f"{key}[{index}]: a {kind} must be an object with a \"name\"")
        if entry["name"] in seen:
            raise InvalidContent(f"{kind} {quoted(entry['name'])} appears twice")
        seen.add(entry["name"])
    return entries


def _unmasked(entry: dict[str, Any], current: StoredRule | None) -> dict[str, Any]:
    """``entry`` with each masked secret replaced by the one stored for the rule."""
    entry = dict(entry)
    advice = "is masked in the file and rules.db holds no secret to keep for it: export with --with-secrets"
    stored = current.fields if current else {}
    for name in ("password", "client_secret"):
        if entry.get(name) == MASK:
            kept = stored.get(name)
            if not isinstance(kept, str) or is_reference(kept):
                raise InvalidContent(f"rule {quoted(entry['name'])}: {name} {advice}, "
                                     "or give it as env:NAME or file:PATH")
            entry[name] = kept
    headers = entry.get("headers")
    if isinstance(headers, list):
        stored_headers = [h for h in stored.get("headers") or [] if isinstance(h, list) and len(h) == 2]
        out: list[Any] = []
        for pair in headers:
            if (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                    and pair[0].lower() in SECRET_HEADERS and pair[1] == MASK):
                # The n-th header of that name keeps the n-th stored one's value.
                nth = sum(1 for h in out if isinstance(h, list) and str(h[0]).lower() == pair[0].lower())
                same = [h for h in stored_headers if str(h[0]).lower() == pair[0].lower()]
                if nth >= len(same):
                    raise InvalidContent(f"rule {quoted(entry['name'])}: header {pair[0]} {advice}, "
                                         "or write its value")
                pair = [pair[0], same[nth][1]]
            out.append(pair)
        entry["headers"] = out
    return entry


def plan_import(document: Any, current_rules: list[StoredRule], current_policies: list[StoredPolicy],
                *, replace: bool = False, secrets: SecretPolicy | None = None) -> ImportPlan:
    """Check ``document`` against the current rules.db and say what importing it writes.
    ``secrets``: the sidecar's secret policy, which the rules written must keep to (None: only
    the syntax of their secret references is checked). Raises ``InvalidContent`` at the first
    problem; nothing has been written then."""
    if not isinstance(document, dict):
        raise InvalidContent("the document must be a JSON object with \"rules\" and \"policies\"")
    unknown = sorted(set(document) - {"version", "rules", "policies"})
    if unknown:
        raise InvalidContent(f"unknown key {quoted(unknown[0])}: expected \"version\", \"rules\" and \"policies\"")
    if document.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise InvalidContent(f"version {document['version']!r} is not supported (this script reads "
                             f"{FORMAT_VERSION})")
    rule_entries = _entries(document, "rules", "rule")
    policy_entries = _entries(document, "policies", "policy")

    stored_rules = {r.name: r for r in current_rules}
    stored_policies = {p.name: p for p in current_policies}
    rules = [validate_rule(_unmasked(e, stored_rules.get(e["name"]))) for e in rule_entries]
    final_rules: dict[str, Rule | None] = {} if replace else {r.name: r.rule for r in current_rules}
    final_rules.update((r.name, r) for r in rules)
    policies = [validate_policy(e, final_rules) for e in policy_entries]

    # A changed rule can break the order of a stored policy that the document does not touch.
    imported = {p.name for p in policies}
    touched = {r.name for r in rules}
    kept = [] if replace else [
        p.policy for p in current_policies
        if p.policy and p.name not in imported and touched.intersection(p.policy.rules)
    ]
    problems = stored_problems([*policies, *kept], final_rules)
    if problems:
        raise InvalidContent(problems[0])

    plan = ImportPlan()
    if replace:
        plan.delete_policies = sorted(set(stored_policies) - imported)
        plan.delete_rules = sorted(set(stored_rules) - touched)
        plan.changes += [("deleted", "policy", n) for n in plan.delete_policies]
    plan._save("rule", rules, {n: r.rule for n, r in stored_rules.items()}, plan.rules)
    plan._save("policy", policies, {n: p.policy for n, p in stored_policies.items()}, plan.policies)
    plan.changes += [("deleted", "rule", n) for n in plan.delete_rules]
    for rule in plan.rules if secrets is not None else []:  # a rule kept as stored is not refused
        try:
            check_secrets(rule, secrets)
        except InvalidContent as exc:
            raise InvalidContent(f"rule {quoted(rule.name)}: {exc}") from None
    return plan


def apply_import(conn: sqlite3.Connection, plan: ImportPlan) -> None:
    """Write ``plan`` inside the caller's ``db.admin_transaction``. Raises ``StoreError``."""
    for name in plan.delete_policies:
        db.delete_policy(conn, name)
    if plan.delete_policies:
        db.flush_audit(conn)  # a policy created next may reuse a deleted one's id
    for rule in plan.rules:
        db.save_rule(conn, rule)
    for policy in plan.policies:
        db.save_policy(conn, policy)
    for name in plan.delete_rules:  # last: no policy left uses them
        db.delete_rule(conn, name)

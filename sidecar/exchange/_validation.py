"""Everything checked before a rule or policy is written: one clear line per refusal.

A rule is checked as the sidecar will use it: the pydantic model (method, URL, auth fields, body
only with POST, regexes, action types), its templates compiled (unknown parameters refused with
the closest known name), its secret references (their syntax and, with the ``SecretPolicy``
the sidecar is configured with, that they point under a secret directory or at a variable with
the secret prefix: else the sidecar would deny with ``rule_invalid``). A policy: the model,
that its rules exist, and that each ``%stored.NAME%`` a rule uses is stored by an earlier
enabled rule of the policy (``sidecar.rules.order``; else the sidecar would deny every request with
``rule_invalid``).

A message says where a problem is by field name (``actions.1``), or in the caller's words: the
admin script passes its option names (``names``: ``--action #2``).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sidecar.db import ObjectKind
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, Rule
from sidecar.rules.order import Unstored, stored_dependencies
from sidecar.rules.secrets import SecretError, SecretPolicy, check_syntax
from sidecar.rules.templates import TemplateError, compile_rule_request

__all__ = [
    "InvalidContent",
    "check_name",
    "check_secrets",
    "closest",
    "quoted",
    "stored_problem",
    "stored_problems",
    "validate_policy",
    "validate_rule",
]

_SECRET_FIELDS = ("password", "client_secret")
_LOOKS_LIKE_REFERENCE = re.compile(r"(?i)(env|file):")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_Model = TypeVar("_Model", bound=BaseModel)


class InvalidContent(Exception):
    """A rule, policy or document that is refused. The message is one line, naming the object
    and the problem."""


def quoted(name: str) -> str:
    """A name as shown in messages: double-quoted, JSON-escaped (never a raw control character)."""
    return json.dumps(name, ensure_ascii=False)


def closest(name: str, known: Iterable[str]) -> str:
    """`` — did you mean "x"?`` for the closest known name, or ``""``."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" — did you mean {quoted(match[0])}?" if match else ""


def check_name(kind: ObjectKind, name: str) -> None:
    """Refuse a rule or policy name that would not read as one line."""
    if _CONTROL.search(name):
        raise InvalidContent(f"{kind} name {quoted(name)} holds control characters")
    if name != name.strip():
        raise InvalidContent(f"{kind} name {quoted(name)} starts or ends with spaces")


def describe(exc: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """A pydantic error as one line: ``where: what`` for each problem, ``; ``-separated.

    ``names``: say where with the caller's name of a field (``--action #2``) rather than the
    field's (``actions.1``)."""
    parts = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = list(error["loc"])
        if names and loc and loc[0] in names:
            where = names[str(loc[0])]
            if len(loc) > 1 and isinstance(loc[1], int):
                where += f" #{loc[1] + 1}"
                loc = loc[2:]
            else:
                loc = loc[1:]
            where = " ".join([where, *map(str, loc)])
        else:
            where = ".".join(map(str, loc))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def check_secrets(rule: Rule, secrets: SecretPolicy | None, *, names: Mapping[str, str] | None = None) -> None:
    """Refuse a secret reference of ``rule`` that is malformed or, with ``secrets``, that the
    sidecar would refuse: one ``where: secret REF: problem`` line, naming the setting to change.
    Raises ``InvalidContent``. No I/O: the files and variables are where the sidecar runs."""
    for field in _SECRET_FIELDS:
        value = getattr(rule, field)
        if value is None:
            continue
        where = (names or {}).get(field, field)
        try:
            if secrets is None:
                check_syntax(value)
            else:
                secrets.check(value)
        except SecretError as exc:
            raise InvalidContent(f"{where}: {exc}") from None
        if _LOOKS_LIKE_REFERENCE.match(value) and not value.startswith(("env:", "file:")):
            raise InvalidContent(f"{where}: {value[:value.index(':') + 1]!r} looks like a secret reference, "
                                 "but references are written env:NAME or file:PATH, in lower case")


def validate_rule(fields: Mapping[str, Any], *, names: Mapping[str, str] | None = None,
                  secrets: SecretPolicy | None = None) -> Rule:
    """The rule ``fields`` describe, checked as the sidecar will use it. ``secrets``: the
    sidecar's secret policy; None checks only the syntax of secret references (the caller then
    checks them with ``check_secrets``). Raises ``InvalidContent`` naming the rule and the
    problem."""
    name = str(fields.get("name", ""))
    rule = _validated("rule", Rule, fields, names)
    try:
        check_secrets(rule, secrets, names=names)
    except InvalidContent as exc:
        raise InvalidContent(f"rule {quoted(name)}: {exc}") from None
    try:
        compile_rule_request(rule)
    except TemplateError as exc:
        raise InvalidContent(f"rule {quoted(name)}: {exc}") from None
    return rule


def validate_policy(fields: Mapping[str, Any], rules: Mapping[str, Rule | None], *,
                    names: Mapping[str, str] | None = None) -> Policy:
    """The policy ``fields`` describe. ``rules``: every rule that will exist, by name (None for
    a stored rule that does not validate: it exists, and the sidecar will deny with
    ``rule_invalid`` until it is repaired). Raises ``InvalidContent``."""
    name = str(fields.get("name", ""))
    policy = _validated("policy", Policy, fields, names)
    for rule_name in policy.rules:
        if rule_name not in rules:
            raise InvalidContent(f"policy {quoted(name)}: rule {quoted(rule_name)} does not exist"
                                 + closest(rule_name, rules))
    problem = stored_problem(policy, rules) if policy.enabled else None
    if problem:
        raise InvalidContent(problem)
    return policy


def _validated(kind: ObjectKind, model: type[_Model], fields: Mapping[str, Any],
               names: Mapping[str, str] | None) -> _Model:
    try:
        validated = model.model_validate(dict(fields))
    except ValidationError as exc:
        raise InvalidContent(f"{kind} {quoted(str(fields.get('name', '')))}: {describe(exc, names)}") from None
    check_name(kind, str(fields["name"]))
    return validated


def stored_problem(policy: Policy, rules: Mapping[str, Rule | None]) -> str | None:
    """Why ``policy`` cannot run its rules in order, or None: a rule uses ``%stored.NAME%`` and
    no earlier enabled rule of the policy stores NAME. Disabled rules are skipped, as the
    sidecar skips them."""
    names: list[str] = []
    steps: list[tuple[tuple[str, ...], list[str]]] = []
    for rule_name in policy.rules:
        rule = rules.get(rule_name)
        if rule is None or not rule.enabled:
            continue
        try:
            uses = compile_rule_request(rule).stored_names
        except TemplateError:
            continue  # reported as the rule's own problem
        names.append(rule_name)
        steps.append((uses, [a.value for a in rule.actions if a.type is ActionType.STORE]))
    unstored = stored_dependencies(steps)
    if not isinstance(unstored, Unstored):
        return None
    return (f"rule {quoted(names[unstored.index])} uses %stored.{unstored.name}%, which no earlier "
            f"enabled rule of policy {quoted(policy.name)} stores")


def stored_problems(policies: Iterable[Policy], rules: Mapping[str, Rule | None]) -> list[str]:
    """``stored_problem`` of each policy that has one."""
    return [p for p in (stored_problem(policy, rules) for policy in policies) if p]


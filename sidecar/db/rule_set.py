"""Loading the rule set: every rule and policy in one read transaction, and the cheap checks
that tell whether it changed since.

A row that does not make a valid rule or policy does not fail the load: it is returned as an
``InvalidRow`` so the sidecar can fail closed for the policies that depend on it and still
serve the others.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..policies import Policy
from ..rules.model import InvalidRow, Rule
from .columns import BROKEN_ROW, Row, policy_from_row, row_error, rule_from_row
from .connection import transaction, translated


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything the request path needs from rules.db, read in one transaction."""

    rules: dict[str, Rule | InvalidRow]
    policies: tuple[Policy, ...]
    invalid_policies: tuple[InvalidRow, ...]


class RowMemo:
    """The models made by the previous ``load_rule_set``, by row: a reload validates only the
    rows that changed and hands back the very same objects for the others, so a reload of
    10,000 rules after one edit costs one rule's validation (and compilation, downstream).

    Rows are remembered by a 128-bit BLAKE2b digest of their values' ``repr``, not by the
    values, which would keep a second copy of every rule's text in memory (13 MB for 10,000
    rules). Not by ``hash()``: in CPython hash(-1) == hash(-2), and 1, 1.0 and True hash alike,
    so a priority changed from -1 to -2 would hand back the old policy. ``repr`` tells those
    apart (and a string from its bytes), and two rows with equal digests are not a practical
    concern."""

    def __init__(self) -> None:
        self.rules: dict[bytes, Rule | InvalidRow] = {}
        self.policies: dict[bytes, Policy | InvalidRow] = {}


def _row_key(values: tuple[Any, ...]) -> bytes:
    return hashlib.blake2b(repr(values).encode(), digest_size=16).digest()


def _fallback_policy(row: Row) -> Policy | None:
    """What a policy row that does not validate must still match, so that it denies instead of
    vanishing: were it left out, its requests would fall through to a broader policy (say, a
    public one with the integration off) and be allowed. Every field that does not parse is
    widened — any host, any method, path ``/``, first priority — so the broken policy denies at
    least everything it covered, and possibly more (fail closed). None for a disabled row."""
    if row["enabled"] == 0:
        return None

    def parsed(column: str, validate: Callable[[Any], tuple[str, ...]]) -> tuple[str, ...]:
        try:
            value = validate(json.loads(row[column]))
            Policy.model_validate({"name": "fallback", column: value})
            return value
        except BROKEN_ROW:
            return ()

    path = row["path_prefix"]
    priority = row["priority"]
    return Policy(
        name=str(row["name"]),
        hosts=parsed("hosts", tuple),
        methods=parsed("methods", tuple),
        path_prefix=path if isinstance(path, str) and path.startswith("/") else "/",
        priority=priority if isinstance(priority, int) else -(2**31),
    )


def load_rule_set(conn: sqlite3.Connection, memo: RowMemo | None = None,
                  pace: Callable[[], None] | None = None) -> RuleSet:
    """Read every rule and policy in one read transaction (a consistent snapshot). With
    ``memo``, unchanged rows give back the models of the previous load, and ``memo`` is
    updated to this one. ``pace`` is called before each row (it may pause the reading).
    Raises ``StoreError``."""
    old = memo or RowMemo()
    new = RowMemo()
    rules: dict[str, Rule | InvalidRow] = {}
    policies: list[Policy] = []
    invalid: list[InvalidRow] = []
    with translated("cannot read rules.db"):
        conn.row_factory = sqlite3.Row
        try:
            with transaction(conn):
                # Rows are turned into models as they are read, never all held at once.
                for row in conn.execute("SELECT * FROM rules ORDER BY id"):
                    if pace is not None:
                        pace()
                    key = _row_key(tuple(row))
                    rule = old.rules.get(key)
                    if rule is None:
                        try:
                            rule = rule_from_row(row)
                        except BROKEN_ROW as exc:
                            rule = InvalidRow("rule", row["name"], row_error(exc))
                    rules[row["name"]] = new.rules[key] = rule
                by_policy: dict[int, list[str]] = {}
                for policy_id, rule_name in conn.execute(
                    "SELECT pr.policy_id, r.name FROM policy_rules pr "
                    "JOIN rules r ON r.id = pr.rule_id ORDER BY pr.policy_id, pr.position"
                ):
                    by_policy.setdefault(policy_id, []).append(rule_name)
                for row in conn.execute("SELECT * FROM policies ORDER BY id"):
                    if pace is not None:
                        pace()
                    linked = tuple(by_policy.get(row["id"], ()))
                    key = _row_key((*row, linked))
                    policy = old.policies.get(key)
                    if policy is None:
                        try:
                            policy = policy_from_row(row, linked)
                        except BROKEN_ROW as exc:
                            policy = InvalidRow("policy", row["name"], row_error(exc), _fallback_policy(row))
                    new.policies[key] = policy
                    if isinstance(policy, InvalidRow):
                        invalid.append(policy)
                    else:
                        policies.append(policy)
        finally:
            conn.row_factory = None
    if memo is not None:
        memo.rules, memo.policies = new.rules, new.policies
    return RuleSet(rules, tuple(policies), tuple(invalid))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when another connection commits anything to the database (cheap to poll).
    Raises ``StoreError``."""
    with translated("cannot poll rules.db"):
        return int(conn.execute("PRAGMA data_version").fetchone()[0])


def rules_version(conn: sqlite3.Connection) -> tuple[int, bytes]:
    """Changes when rules, policies or their links change (maintained by triggers): a counter
    and a random token drawn at each change. Raises ``StoreError``."""
    with translated("cannot read rules.db"):
        version, token = conn.execute("SELECT version, token FROM rules_version WHERE id = 1").fetchone()
        return int(version), token

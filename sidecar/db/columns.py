"""Which rules.db column holds which model field, and how: one table per object.

``RULE_COLUMNS`` and ``POLICY_COLUMNS`` are the only place that says so. Every direction is
derived from them: a row to a model (loading the rule set), a model to a row (saving), a row to
the fields the admin script shows, repairs and exports when the row does not validate. A field's
name is also its key in the export and in the audit log's documents: the audit triggers (SQL
in a released migration, which no Python may generate) build their documents from the same
columns in the same order, and a test holds them to these tables.

A policy's ``rules`` field is not a column: it is the policy's links in ``policy_rules``, in
order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from ..policies import Policy
from ..rules.model import Rule

Storage = Literal["value", "flag", "list", "pairs"]
"""How a field is stored: ``value`` as it is (text, number, an enum's value, NULL); ``flag`` a
bool as 0 or 1; ``list`` a tuple as a JSON array; ``pairs`` a tuple of pairs as a JSON array
of two-item arrays."""


@dataclass(frozen=True, slots=True)
class Column:
    """The model field ``field`` is stored in the column ``name`` as ``storage`` says."""

    field: str
    name: str
    storage: Storage = "value"


RULE_COLUMNS: tuple[Column, ...] = (
    Column("name", "name"),
    Column("enabled", "enabled", "flag"),
    Column("method", "method"),
    Column("url", "url"),
    Column("headers", "headers", "pairs"),
    Column("body", "body"),
    Column("auth", "auth_type"),
    Column("username", "auth_username"),
    Column("password", "auth_password"),
    Column("token_url", "oauth_token_url"),
    Column("client_id", "oauth_client_id"),
    Column("client_secret", "oauth_client_secret"),
    Column("verification", "verification"),
    Column("actions", "actions", "list"),
    Column("timeout_ms", "timeout_ms"),
    Column("cache_ttl", "cache_ttl"),
)

POLICY_COLUMNS: tuple[Column, ...] = (
    Column("name", "name"),
    Column("enabled", "enabled", "flag"),
    Column("hosts", "hosts", "list"),
    Column("path_prefix", "path_prefix"),
    Column("methods", "methods", "list"),
    Column("integration", "integration", "flag"),
    Column("priority", "priority"),
    Column("ports", "ports", "list"),
    Column("sni", "sni", "list"),
    Column("mode", "mode"),
)


class Row(Protocol):
    """A row by column name: ``sqlite3.Row`` or a dict."""

    def __getitem__(self, key: str, /) -> Any: ...


# ------------------------------------------------------------------------- model → row


def _stored(column: Column, value: Any) -> Any:
    if column.storage == "flag":
        return int(value)
    if column.storage in ("list", "pairs"):
        return json.dumps(value)
    return value


def _row(columns: tuple[Column, ...], model: BaseModel) -> dict[str, Any]:
    # The JSON dump holds enums as their values and tuples (also of pairs, of actions) as lists.
    dumped = model.model_dump(mode="json")
    return {c.name: _stored(c, dumped[c.field]) for c in columns}


def rule_row(rule: Rule) -> dict[str, Any]:
    """The rules row of ``rule``, by column."""
    return _row(RULE_COLUMNS, rule)


def policy_row(policy: Policy) -> dict[str, Any]:
    """The policies row of ``policy``, by column (its rules are links: not in the row)."""
    return _row(POLICY_COLUMNS, policy)


# ------------------------------------------------------------------------- row → model


def _model_value(column: Column, value: Any) -> Any:
    # Strict: broken JSON or a wrong shape raises (ValueError, TypeError), as validation does.
    if column.storage == "flag":
        return bool(value)
    if column.storage == "list":
        return tuple(json.loads(value))
    if column.storage == "pairs":
        return tuple(tuple(pair) for pair in json.loads(value))
    return value


def _model_args(columns: tuple[Column, ...], row: Row) -> dict[str, Any]:
    # In column order, so that the first problem of a row is always the one reported.
    return {c.field: row[c.name] if c.storage == "value" else _model_value(c, row[c.name]) for c in columns}


# What making a model of a row raises when the row holds none (broken JSON, a wrong shape, a
# value the model refuses); ``row_error`` says it in one line.
BROKEN_ROW: tuple[type[Exception], ...] = (ValueError, TypeError, ValidationError)


def rule_from_row(row: Row) -> Rule:
    """The rule a rules row holds. Raises one of ``BROKEN_ROW`` when it holds none."""
    return Rule(**_model_args(RULE_COLUMNS, row))


def policy_from_row(row: Row, rule_names: tuple[str, ...]) -> Policy:
    """The policy a policies row holds, with its linked rules in order. Raises as
    ``rule_from_row``."""
    return Policy(**_model_args(POLICY_COLUMNS, row), rules=rule_names)


def row_error(exc: BaseException) -> str:
    """Why a row holds no model, in one line (as the sidecar and the admin script say it)."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------ row → fields


def decoded(text: Any) -> Any:
    """A JSON column's value, or its text when it does not decode."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _field_value(column: Column, value: Any) -> Any:
    # Lenient: a row that does not validate must still be shown and repaired.
    if column.storage == "flag":
        return bool(value)
    if column.storage in ("list", "pairs"):
        return decoded(value)
    return value


def rule_fields(row: Row) -> dict[str, Any]:
    """The model's fields as a rules row stores them, valid or not (JSON decoded when it
    decodes, the text otherwise)."""
    return {c.field: _field_value(c, row[c.name]) for c in RULE_COLUMNS}


def policy_fields(row: Row, rule_names: tuple[str, ...]) -> dict[str, Any]:
    """As ``rule_fields``, for a policies row and its linked rules in order."""
    return {**{c.field: _field_value(c, row[c.name]) for c in POLICY_COLUMNS}, "rules": list(rule_names)}

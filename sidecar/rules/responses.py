"""A webhook's answer judged against its rule: verification and API Response Actions.

Pure: bytes and a status in, an ``ActionResult`` out. Semantics: docs/admins/rules.md.
The order is ``evaluate_response``'s: the status must be 2xx, the body must parse
as the rule's verification says (``parse_response``), then each action holds, in order
(``CompiledActions.apply``).

A value at a key is compared as text (``as_text``): a JSON string as is, a number as it is
spelt in the response (``1.50`` stays ``1.50``; one with an exponent in decimal form),
``true``/``false``/``null``, an object or
list as compact JSON. Reasons name the rule and the criterion, quote values JSON-style
(so a CR or LF from the response never reaches a header) and cut them at 60 characters.

Exceptions (turned into failures by ``evaluate_response``)::

    ValueError
     └── ResponseInvalid   the body is not JSON / not JSONP (response_invalid)
    LookupError
     └── KeyMissing        no value at a key (key_missing)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sidecar.decision import Code
from sidecar.rules.model import ActionType, ResponseAction, Verification
from sidecar.rules.safe_regex import Pattern, compile_regex

__all__ = [
    "ActionResult",
    "CompiledActions",
    "KeyMissing",
    "ResponseInvalid",
    "apply_actions",
    "as_text",
    "compile_actions",
    "evaluate_response",
    "parse_response",
    "quote_value",
    "shown_value",
    "status_failure",
    "value_at",
]

QUOTE_LIMIT = 60
"""Characters of a value quoted in a reason; longer values are cut and end with ``...``."""

# The callback and its "(": possessive quantifiers, so a long run of spaces or identifier
# characters that leads nowhere fails in one pass. The tail is stripped without a regex.
_JSONP_HEAD = re.compile(
    r"\s*+(?:/\*\*/\s*+)?[A-Za-z_$][\w$]*+(?:\.[A-Za-z_$][\w$]*+)*+\s*+\(", re.ASCII
)
_WHITESPACE = " \t\n\r\f\v"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_INDEX = re.compile(r"[0-9]+")


class ResponseInvalid(ValueError):
    """The webhook's body does not parse as the rule's verification says. The message is a
    short reason (``response is not JSON``)."""


class KeyMissing(LookupError):
    """No value at ``key`` in the response."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"key {key} missing from the response")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    # Decimal, a C type, keeps a number's digits as spelt ("1.50") while the whole parse stays
    # in C: no Python runs per value, so 1 MiB of numbers costs tens of milliseconds, not
    # hundreds.
    return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)


def parse_response(body: bytes, verification: Verification) -> Any:
    """The JSON document in ``body``: UTF-8 (a BOM is skipped) JSON, or for ``jsonp`` a
    ``callback( … )`` call (optional leading ``/**/``, optional trailing ``;``) around JSON.

    Any JSON value is returned, objects and lists as dicts and lists. Raises
    ``ResponseInvalid``: not UTF-8, not JSON (``NaN``/``Infinity`` included), not JSONP,
    nested too deeply, a number too long to read, or a string holding a lone surrogate.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ResponseInvalid("response is not UTF-8 text") from None
    jsonp = verification is Verification.JSONP
    if jsonp:
        text = _jsonp_argument(text)
    try:
        document = _loads(text)
    except RecursionError:
        raise ResponseInvalid("response is nested too deeply") from None
    except ValueError:  # JSONDecodeError, NaN, a number past int's digit limit
        if jsonp:
            raise ResponseInvalid("response is not JSONP: the callback's argument is not JSON") from None
        raise ResponseInvalid("response is not JSON") from None
    if _SURROGATE_ESCAPE.search(text):
        # JSON lets "\ud800" stand alone; such a string is not text (it cannot be encoded, so
        # it could be neither matched, nor logged, nor sent on). Checked in C: dumps + encode.
        try:
            json.dumps(document, ensure_ascii=False, default=float).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            raise ResponseInvalid("response holds a lone surrogate (\\uD800-\\uDFFF): not Unicode text") from None
    return document


def _jsonp_argument(text: str) -> str:
    head = _JSONP_HEAD.match(text)
    tail = text.rstrip(_WHITESPACE)
    if tail.endswith(";"):
        tail = tail[:-1].rstrip(_WHITESPACE)
    if head is None or not tail.endswith(")") or len(tail) - 1 < head.end():
        raise ResponseInvalid("response is not JSONP: no callback(...) around it")
    return text[head.end():len(tail) - 1]


def value_at(document: Any, key: str) -> Any:
    """The value at dot path ``key`` (``data.user.status``, ``items.0.id``): each segment is a
    key of an object, or a 0-based index (decimal digits) of a list. Raises ``KeyMissing``."""
    node = document
    for segment in key.split("."):
        if isinstance(node, dict):
            if segment not in node:
                raise KeyMissing(key)
            node = node[segment]
        elif isinstance(node, list) and _INDEX.fullmatch(segment) and int(segment) < len(node):
            node = node[int(segment)]
        else:
            raise KeyMissing(key)
    return node


def as_text(value: Any) -> str:
    """``value`` as the text actions compare: a string as is; ``true``, ``false``, ``null``;
    a number written without an exponent as the response spelt it (``1.50``, ``-0.0``), one
    written with an exponent in decimal form (``1.5e-3`` -> ``0.0015``, ``1e2`` -> ``1E+2``);
    objects and lists as compact JSON (non-ASCII kept; numbers inside take Python's shortest
    spelling: ``1.50`` -> ``1.5``).
    Raises ``RecursionError`` only for values deeper than
    ``parse_response`` returns."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=float)


def _decimal_text(number: Decimal) -> str:
    exponent = number.as_tuple().exponent
    # Plain notation is the spelling of a number written without an exponent; bounded, so
    # that 1e-999999999 does not become a billion zeros.
    if isinstance(exponent, int) and -64 <= exponent <= 0:
        return format(number, "f")
    return str(number)


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What a rule's response actions made of the response.

    ``failure`` is ``(code, reason)`` of the first action that did not hold, or None;
    ``stored`` maps each ``store`` name to its value — empty when the rule failed (a failed
    rule passes nothing on); ``failed_action`` the index of the action that did not hold
    (None when none did, or the answer failed before any was checked).
    """

    failure: tuple[Code, str] | None = None
    stored: dict[str, str] = field(default_factory=dict)
    failed_action: int | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None


@dataclass(frozen=True, slots=True, eq=False)
class CompiledActions:
    """A rule's response actions with their regular expressions compiled (once, at load)."""

    actions: tuple[ResponseAction, ...]
    _patterns: tuple[Pattern | None, ...] = field(repr=False)
    regex_size: int = 0
    """The RE2 program sizes of the regexes, added up (0 without one): each regex matches the
    text at its key, which may be the whole answer, so judging costs up to about this many
    steps a byte of the answer in all."""

    @property
    def stored_names(self) -> tuple[str, ...]:
        """The names this rule's ``store`` actions keep, in order."""
        return tuple(a.value for a in self.actions if a.type is ActionType.STORE)

    def apply(self, rule_name: str, document: Any) -> ActionResult:
        """Apply every action to ``document`` in order; the first that does not hold fails
        the rule: ``key_missing``, ``value_mismatch`` (string) or ``regex_mismatch``."""
        stored: dict[str, str] = {}
        for index, (action, pattern) in enumerate(zip(self.actions, self._patterns, strict=True)):
            try:
                value = value_at(document, action.key)
                text = as_text(value)
            except KeyMissing as exc:
                return ActionResult((Code.KEY_MISSING, f"{_rule(rule_name)}: {exc}"), failed_action=index)
            except RecursionError:
                return ActionResult((Code.RESPONSE_INVALID,
                                     f"{_rule(rule_name)}: response is nested too deeply"), failed_action=index)
            if action.type is ActionType.STRING:
                if text != action.value:
                    return ActionResult((Code.VALUE_MISMATCH, (
                        f"{_rule(rule_name)}: {action.key} is {shown_value(value, text)}, "
                        f"expected {quote_value(action.value)}"
                    )), failed_action=index)
            elif action.type is ActionType.REGEX:
                assert pattern is not None
                if pattern.search(text) is None:
                    return ActionResult((Code.REGEX_MISMATCH, (
                        f"{_rule(rule_name)}: {action.key} {shown_value(value, text)} "
                        f"does not match /{action.value}/"
                    )), failed_action=index)
            else:
                stored[action.value] = text
        return ActionResult(None, stored)


def compile_actions(actions: Sequence[ResponseAction]) -> CompiledActions:
    """``actions`` ready to apply. Raises ``RegexError`` for a regex RE2 refuses
    (``ResponseAction`` already refuses those)."""
    patterns = tuple(
        compile_regex(a.value) if a.type is ActionType.REGEX else None for a in actions
    )
    size = sum(p.programsize for p in patterns if p is not None)
    return CompiledActions(tuple(actions), patterns, size)


def apply_actions(
    rule_name: str, actions: Sequence[ResponseAction] | CompiledActions, document: Any
) -> ActionResult:
    """``compile_actions(actions).apply(rule_name, document)``; pass ``CompiledActions`` to
    compile once."""
    if not isinstance(actions, CompiledActions):
        actions = compile_actions(actions)
    return actions.apply(rule_name, document)


def status_failure(rule_name: str, status: int) -> tuple[Code, str] | None:
    """``webhook_status`` for a status outside 2xx, else None."""
    if 200 <= status <= 299:
        return None
    return (Code.WEBHOOK_STATUS, f"{_rule(rule_name)}: webhook answered HTTP {status}, expected 2xx")


def evaluate_response(
    rule_name: str,
    status: int,
    body: bytes,
    verification: Verification,
    actions: CompiledActions,
) -> ActionResult:
    """Judge one webhook answer: status (``webhook_status``), body (``response_invalid``),
    then the actions. Never raises."""
    failure = status_failure(rule_name, status)
    if failure:
        return ActionResult(failure)
    try:
        document = parse_response(body, verification)
    except ResponseInvalid as exc:
        return ActionResult((Code.RESPONSE_INVALID, f"{_rule(rule_name)}: {exc}"))
    return actions.apply(rule_name, document)


def _rule(name: str) -> str:
    return f"rule {quote_value(name, limit=128)}"


def quote_value(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` in double quotes, JSON-escaped (no raw control characters), cut at ``limit``."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def shown_value(value: Any, text: str) -> str:
    """A response value in a reason: strings quoted, other JSON values as spelt."""
    if isinstance(value, str):
        return quote_value(text)
    # Number spellings and compact JSON hold no raw control characters: shown unquoted.
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."

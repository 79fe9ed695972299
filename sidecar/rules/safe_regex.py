"""Regular expressions of response actions, in RE2: matching time is linear in the text.

A webhook's answer is third-party data (up to 1 MiB), and an admin's pattern such as
``^(a+)+$`` would make a backtracking engine (Python's ``re``) run for ever on ``aaa…a!``,
stalling every check of the sidecar. RE2 — the engine of Envoy's ``safe_regex`` and Go's
``regexp`` — has no backtracking, so it refuses the constructs that need it: backreferences
(``\\1``), lookaround (``(?=``, ``(?!``, ``(?<=``, ``(?<!``), possessive quantifiers and
atomic groups. Its memory per pattern is capped (``max_mem``), so a huge repetition
(``a{1000}{1000}``) is refused when the rule is saved rather than at check time.

Syntax differences from Python's ``re`` that an admin may meet: ``\\d``, ``\\w`` and ``\\s``
are ASCII; ``\\Z`` is written ``\\z``; Unicode classes are ``\\p{L}``.

Exceptions::

    ValueError
     └── RegexError   a pattern RE2 does not accept; the message says why in the admin's
                      words (``backreferences (\\1) are not supported…``)
"""

from __future__ import annotations

from typing import Protocol

import re2

__all__ = ["Pattern", "RegexError", "compile_regex"]

_MAX_MEM = 8 << 20
"""Bytes RE2 may use for one compiled pattern (its own default); a bigger one is refused."""

# RE2's message prefix → what the admin did that RE2 has no linear-time way to do.
_UNSUPPORTED = (
    ("invalid perl operator: (?=", "lookahead (?=…) is not supported"),
    ("invalid perl operator: (?!", "negative lookahead (?!…) is not supported"),
    ("invalid perl operator: (?<=", "lookbehind (?<=…) is not supported"),
    ("invalid perl operator: (?<!", "negative lookbehind (?<!…) is not supported"),
    ("invalid perl operator: (?>", "atomic groups (?>…) are not supported"),
    ("invalid perl operator: (?P", "named backreferences (?P=name) are not supported"),
    ("bad repetition operator: ++", "possessive quantifiers (++, *+, ?+) are not supported"),
    ("bad repetition operator: *+", "possessive quantifiers (++, *+, ?+) are not supported"),
    ("bad repetition operator: ?+", "possessive quantifiers (++, *+, ?+) are not supported"),
    ("pattern too large", "the pattern is too large (RE2 memory limit)"),
)


class Pattern(Protocol):
    """The part of a compiled pattern the sidecar uses."""

    @property
    def programsize(self) -> int: ...

    def search(self, text: str) -> object | None: ...


class RegexError(ValueError):
    """A pattern that RE2 refuses. ``pattern`` as given; the message explains."""

    def __init__(self, pattern: str, problem: str) -> None:
        self.pattern = pattern
        super().__init__(f"regex {pattern!r} {problem} (RE2 syntax, matched in linear time)")


def compile_regex(pattern: str) -> Pattern:
    """``pattern`` compiled by RE2. Raises ``RegexError`` for a pattern RE2 refuses, naming
    the unsupported construct when that is the cause."""
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern on stderr
    options.max_mem = _MAX_MEM
    try:
        return re2.compile(pattern, options)  # type: ignore[no-any-return]
    except re2.error as exc:
        detail = exc.args[0] if exc.args else ""
        message = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
        for prefix, problem in _UNSUPPORTED:
            if message.startswith(prefix):
                raise RegexError(pattern, f"is refused: {problem}") from None
        if message.startswith("invalid escape sequence: \\") and message[-1:].isdigit():
            raise RegexError(pattern, "is refused: backreferences (\\1…\\9) are not supported") from None
        raise RegexError(pattern, f"does not compile: {message}") from None

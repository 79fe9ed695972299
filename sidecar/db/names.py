"""Names in rules.db for the admin script's shell completion: rules, policies, the values rules
store, the names their templates use, the users of recent decisions.

A Tab must never change rules.db nor wait for it, and the whole answer takes at most 100 ms,
so a completion reads it as no other reader does (``reading``):

- read-only by URI, so a missing file is never created and an older schema never migrated;
  ``immutable`` (no locks, no ``-wal``/``-shm`` files left behind) when no ``-wal`` or
  ``-journal`` file is there, i.e. no change is pending and no connection has it open; else
  ``mode=ro``, since ``immutable`` would skip the -wal, where a WAL database keeps its latest
  changes until a checkpoint, and would read pages a writer is changing;
- no busy timeout: a locked rules.db answers SQLITE_BUSY at once;
- a deadline over every statement (a progress handler), so that a huge activity log or a slow
  disk costs a missing completion, never a hanging shell;
- sqlite3 alone: this module and ``connection`` import neither pydantic nor sqlite-utils.

Every function raises ``StoreError`` (an unreadable file, not a database, busy, too slow, a
schema without these tables); the completion then offers nothing.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from .connection import translated

__all__ = [
    "RECENT_DECISIONS",
    "policy_names",
    "reading",
    "recent_users",
    "rule_names",
    "stored_names",
    "template_names",
]

RECENT_DECISIONS = 10_000
"""How many of the newest activity log rows ``recent_users`` reads."""

# The deadline is looked at every this many SQLite VM instructions (a few microseconds).
_PROGRESS_STEPS = 1000

# A store action's name, as json_each gives a rule's actions: anything else (broken JSON, an
# action that is not an object, one without a value) is skipped, as the sidecar refuses it.
_STORED_BY = """
    CASE WHEN a.type = 'object' AND json_extract(a.value, '$.type') = 'store'
         THEN json_extract(a.value, '$.value') END"""
_ACTIONS_OF = "json_each(CASE WHEN json_valid(r.actions) THEN r.actions ELSE '[]' END) AS a"


@contextmanager
def reading(path: str | os.PathLike[str], *, within: float) -> Iterator[sqlite3.Connection]:
    """rules.db at ``path``, read-only, no busy wait, every statement interrupted once
    ``within`` seconds have passed since the call. Raises ``StoreError``."""
    deadline = time.monotonic() + within
    file = Path(path).absolute()
    quiet = not any(os.path.lexists(f"{file}-{suffix}") for suffix in ("wal", "journal"))
    uri = file.as_uri() + ("?mode=ro&immutable=1" if quiet else "?mode=ro")
    with translated(f"cannot open {path}"):
        conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        conn.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)
        yield conn
    finally:
        conn.close()


def rule_names(conn: sqlite3.Connection, prefix: str = "") -> list[str]:
    """The names of the rules that start with ``prefix``, sorted. Raises ``StoreError``."""
    return _names(conn, "rules", prefix)


def policy_names(conn: sqlite3.Connection, prefix: str = "") -> list[str]:
    """The names of the policies that start with ``prefix``, sorted. Raises ``StoreError``."""
    return _names(conn, "policies", prefix)


def _names(conn: sqlite3.Connection, table: Literal["rules", "policies"], prefix: str) -> list[str]:
    # A range on the name's unique index: only the rows that start with the prefix are read.
    # Text compares by its UTF-8 bytes, in code point order, so [prefix, prefix with its last
    # character the next one) holds exactly the names that start with it.
    last = ord(prefix[-1]) + 1 if prefix else 0
    args: tuple[str, ...]
    where, args = "", ()
    if prefix and last <= 0x10FFFF and not 0xD800 <= last <= 0xDFFF:  # else no next character: all rows
        where, args = "WHERE name >= ? AND name < ?", (prefix, prefix[:-1] + chr(last))
    with translated(f"cannot read {table} names"):
        rows = conn.execute(f"SELECT name FROM {table} {where} ORDER BY name", args)
        return [name for (name,) in rows if isinstance(name, str) and name.startswith(prefix)]


def stored_names(conn: sqlite3.Connection, rule: str | None) -> list[str]:
    """The names the rule ``rule`` can use as ``%stored.NAME%``, sorted: those stored by an
    earlier enabled rule in every policy that uses it (``rule edit`` refuses any other; a
    disabled rule never runs, so stores nothing). For a rule
    that no policy uses yet, or ``None`` (a rule being added), those that any rule stores: a
    policy may list it after that rule. Raises ``StoreError``."""
    with translated("cannot read stored value names"):
        places = conn.execute(
            "SELECT pr.policy_id, pr.position FROM policy_rules pr JOIN rules r ON r.id = pr.rule_id "
            "WHERE r.name = ?", (rule,)).fetchall() if rule is not None else []
        if not places:
            return [name for (name,) in conn.execute(
                f"SELECT DISTINCT {_STORED_BY} AS name FROM rules r, {_ACTIONS_OF} "
                # Most rules store nothing: LIKE skips them before their JSON is parsed.
                "WHERE r.enabled AND r.actions LIKE '%store%' ORDER BY name") if isinstance(name, str)]
        usable: set[str] | None = None
        for policy_id, position in places:
            earlier = {name for (name,) in conn.execute(
                f"SELECT {_STORED_BY} AS name FROM policy_rules pr JOIN rules r ON r.id = pr.rule_id, "
                f"{_ACTIONS_OF} WHERE pr.policy_id = ? AND pr.position < ? AND r.enabled",
                (policy_id, position))}
            usable = earlier if usable is None else usable & earlier
        return sorted(name for name in usable or () if isinstance(name, str))


def recent_users(conn: sqlite3.Connection) -> list[str]:
    """The users (``%username%``) of the newest ``RECENT_DECISIONS`` activity log rows, but
    the empty one, sorted. Raises ``StoreError``."""
    with translated("cannot read the activity log"):
        rows = conn.execute(
            "SELECT DISTINCT username FROM (SELECT username FROM activity_log ORDER BY at DESC LIMIT ?) "
            "WHERE username <> '' ORDER BY username", (RECENT_DECISIONS,))
        return [name for (name,) in rows if isinstance(name, str)]


def template_names(conn: sqlite3.Connection, prefix: str) -> list[str]:
    """The names after ``prefix`` (``headers.``, ``stored.``) in the ``%prefix.NAME%``
    placeholders of every rule's URL, headers and body, sorted. Raises ``StoreError``."""
    placeholder = re.compile("%" + re.escape(prefix) + r"([\w!#$&'*+.^`|~-]+)%", re.ASCII)
    with translated("cannot read the rules' templates"):
        # instr() skips the templates without such a placeholder; Python then reads each text
        # once (rules often share their headers or body), all in one search: a name cannot
        # span the line break between two texts.
        texts = {text for (text,) in conn.execute(
            " UNION ALL ".join(f"SELECT {column} FROM rules WHERE instr({column}, :p)"
                               for column in ("url", "headers", "body")), {"p": "%" + prefix})
                 if isinstance(text, str)}
    return sorted(set(placeholder.findall("\n".join(texts))))

"""Shell completion: ``safous-admin completion bash|zsh|fish`` prints the script, and what a Tab
offers beyond click's own commands, options and choices.

click's shell completion underneath: the script is click's for that shell, made for the
``safous-admin`` console script; on a Tab the shell runs ``safous-admin`` with
``_SAFOUS_ADMIN_COMPLETE`` set, click parses the words typed so far (running no command) and
asks the parameter being typed for its completions, which come from here:

- rule names (``rule show|edit|delete|enable|disable``, ``test``, ``policy add|edit --rule``),
  policy names (``policy show|edit|delete|enable|disable``), the users of recent decisions
  (``logs activity --user``), all from the rules.db of ``--db`` (or its default);
- ``%parameters%`` at the end of a ``--url``, ``--header`` or ``--body`` value, the rest of
  the value kept: the fixed names, ``%headers.NAME%`` (and the header names the rule set
  already uses), ``%stored.NAME%`` for the names ``sidecar.db.names.stored_names`` says the
  rule can use;
- ``--action`` types (``string:``, ``regex:``, ``store:``), and after ``store:KEY:`` the
  names rules use as ``%stored.NAME%``.

A completion never changes, creates or waits for rules.db (``sidecar.db.names.reading``) and
prints nothing when it cannot read it: a missing, unreadable, busy or foreign file completes
nothing. It answers within 100 ms on a rules.db of 10,000 rules, so the command line loads
only click and its declarations (see ``cli``); nothing is cached.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

import click
from click.shell_completion import CompletionItem, get_completion_class

from sidecar.db import names
from sidecar.db.connection import StoreError
from sidecar.parameter_names import HEADER_PREFIX, PARAMETERS, STORED_PREFIX
from sidecar.rules.choices import ActionType

__all__ = [
    "DEADLINE",
    "SHELLS",
    "completion",
    "parameter_values",
    "policy_names",
    "recent_users",
    "response_actions",
    "rule_names",
]

SHELLS = ("bash", "zsh", "fish")
"""The shells ``safous-admin completion`` writes a script for (click's own)."""

DEADLINE = 0.25
"""Seconds a completion may spend on one read of rules.db; past them it offers nothing rather
than keep the shell waiting. A read takes a few milliseconds on 10,000 rules; this bounds a
far larger rules.db, a slow disk or a machine too busy to answer a Tab in time."""

Completer = Callable[[click.Context, click.Parameter, str], list[CompletionItem]]

# A %parameter% still being typed at the end of a value (its closing % not typed yet), and a
# complete one: what template syntax allows in a name (sidecar.rules.templates).
_TYPING = re.compile(r"%[\w.-]*", re.ASCII)
_COMPLETE = re.compile(r"%[A-Za-z_][\w.-]*%", re.ASCII)

_HEADER_FORM = f"{HEADER_PREFIX}NAME"
_FAMILY_HELP = {
    HEADER_PREFIX: "the value of request header NAME (any case); empty if absent",
    STORED_PREFIX: "the value an earlier rule of the policy keeps with a store response action",
}


# ------------------------------------------------------------------------ the command


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL.

    With it, Tab completes commands and options, rule and policy names, %parameters% in
    --url, --header and --body values, --action types and users in logs activity --user, from
    the rules.db of --db (read-only, never created). Install it once:

    \b
      bash:  echo 'eval "$(safous-admin completion bash)"' >> ~/.bashrc
      zsh:   echo 'eval "$(safous-admin completion zsh)"' >> ~/.zshrc   (after compinit)
      fish:  safous-admin completion fish > ~/.config/fish/completions/safous-admin.fish
    """
    root = ctx.find_root()
    prog = root.info_name or "safous-admin"
    shell_class = get_completion_class(shell)
    assert shell_class is not None  # click.Choice(SHELLS): each is one of click's
    # The variable click's main() reads (Command._main_shell_completion derives it the same way).
    variable = "_{}_COMPLETE".format(prog.replace("-", "_").replace(".", "_").upper())
    click.echo(shell_class(root.command, {}, prog, variable).source(), nl=False)


# ------------------------------------------------------------------------ from rules.db


def _from_db(ctx: click.Context, read: Callable[[sqlite3.Connection], list[str]]) -> list[str]:
    """``read`` over the rules.db of ``--db``, or nothing if it cannot be read."""
    path = ctx.find_root().params.get("db")
    if not isinstance(path, Path):
        return []
    try:
        with names.reading(path, within=DEADLINE) as conn:
            return read(conn)
    except (StoreError, OSError, ValueError):  # and a path no file can have: a Tab prints no traceback
        return []


def _starting(candidates: Iterable[str], incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(c) for c in candidates if c.startswith(incomplete)]


def rule_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The rules whose names start with ``incomplete``."""
    return [CompletionItem(name) for name in _from_db(ctx, lambda conn: names.rule_names(conn, incomplete))]


def policy_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The policies whose names start with ``incomplete``."""
    return [CompletionItem(name) for name in _from_db(ctx, lambda conn: names.policy_names(conn, incomplete))]


def recent_users(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The users of recent decisions in the activity log whose names start with ``incomplete``."""
    return _starting(_from_db(ctx, names.recent_users), incomplete)


# ----------------------------------------------------------------------- %parameters%


def open_parameter(value: str) -> int | None:
    """Where the ``%parameter%`` still being typed at the end of ``value`` starts (its ``%``),
    or None: ``%%`` is a literal percent sign, and a placeholder closed by its ``%`` is done."""
    at = value.find("%")
    while at != -1:
        done = _COMPLETE.match(value, at)
        if done:
            at = done.end()
        elif value.startswith("%%", at):
            at += 2
        elif _TYPING.fullmatch(value, at):
            return at
        else:
            at += 1
        at = value.find("%", at)
    return None


def parameter_values(*, edit: bool) -> Completer:
    """The completion of a ``--url``, ``--header`` or ``--body`` value of ``rule add`` or (with
    ``edit``) ``rule edit``: the value as typed, with the ``%parameter%`` at its end completed.
    ``%stored.`` offers the names the edited rule can use, or for a new rule any stored name."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        start = open_parameter(incomplete)
        if start is None:
            return []
        head, typed = incomplete[:start], incomplete[start + 1:]
        offered = dict(PARAMETERS)
        if _may_become(typed, HEADER_PREFIX):
            headers = _from_db(ctx, lambda conn: names.template_names(conn, HEADER_PREFIX))
            offered |= dict.fromkeys([HEADER_PREFIX + h for h in headers] + [_HEADER_FORM],
                                     _FAMILY_HELP[HEADER_PREFIX])
        if _may_become(typed, STORED_PREFIX):
            rule = _edited_rule(ctx) if edit else None
            stored = _from_db(ctx, lambda conn: names.stored_names(conn, rule))
            offered |= dict.fromkeys([STORED_PREFIX + name for name in stored], _FAMILY_HELP[STORED_PREFIX])
        # Names are matched in any case (%UserN completes to %username%): header names are.
        return [CompletionItem(f"{head}%{name}%", help=offered[name])
                for name in sorted(offered) if name.lower().startswith(typed.lower())]

    return complete


def _edited_rule(ctx: click.Context) -> str | None:
    """The NAME of ``rule edit NAME``. While an option's value is being typed, click stops
    parsing there and leaves the arguments unassigned, NAME first among them."""
    name = ctx.params.get("name")
    if name is None and ctx.args:
        name = ctx.args[0]
    return name if isinstance(name, str) else None


def _may_become(typed: str, prefix: str) -> bool:
    """Whether ``typed``, a parameter's name so far, may become a name of ``prefix``'s family
    (``headers.``, ``stored.``): only then is rules.db read."""
    return typed.lower().startswith(prefix) or prefix.startswith(typed.lower())


# --------------------------------------------------------------------------- --action


def response_actions(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The completion of ``--action TYPE:KEY:VALUE``: the types, then for ``store:KEY:`` the
    names that rules use as ``%stored.NAME%`` (the name a value is stored under)."""
    parts = incomplete.split(":", 2)
    if len(parts) == 1:
        return _starting((f"{kind.value}:" for kind in ActionType), incomplete.lower())
    if len(parts) == 3 and parts[0] == ActionType.STORE.value:
        used = _from_db(ctx, lambda conn: names.template_names(conn, STORED_PREFIX))
        return _starting((f"{parts[0]}:{parts[1]}:{name}" for name in used), incomplete)
    return []

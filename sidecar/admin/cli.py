"""The ``safous-admin`` command line (a contract: scripts depend on its names; see the README).

A thin shell over the store, in the manner of sqlite-utils: each command's docstring is its
``--help``; it validates (``validation``), then reads or writes rules.db in one transaction
(``store.admin_transaction`` records the actor for the audit triggers), then prints.
Domain errors (``AdminError``, ``StoreError``) become one ``Error: ...`` line on stderr and
exit status 1 here, at the edge; usage errors exit 2, as click makes them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from sidecar import store
from sidecar.parameters import HEADER_PREFIX, PARAMETERS, STORED_PREFIX, UnknownParameter, check_parameter_name
from sidecar.policies import Policy
from sidecar.rules.model import Rule
from sidecar.rules.secrets import (
    DEFAULT_ENV_PREFIX,
    DEFAULT_SECRET_DIRS,
    SecretPolicy,
    is_reference,
    parse_secret_dirs,
)
from sidecar.store import StoredPolicy, StoredRule
from sidecar.rules.templates import TemplateError, compile_rule_request

from . import display
from .validation import (
    AdminError,
    check_name,
    check_secrets,
    closest,
    quoted,
    stored_problem,
    stored_problems,
    validate_policy,
    validate_rule,
)

if TYPE_CHECKING:  # aiohttp and the webhook client load only for `test`
    from .dryrun import DryRun

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_LIMIT = 50
REQUEST_BODY_LIMIT = 4096
RESPONSE_BODY_LIMIT = 2048

_BASIC_FIELDS = ("username", "password")
_OAUTH_FIELDS = ("token_url", "client_id", "client_secret")


class _UpperChoice(click.Choice):
    """A choice of upper-case words, typed in any case (``--method post``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(value.upper() if isinstance(value, str) else value, param, ctx)


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _AdminGroup(click.Group):
    """Translates domain errors into click's one-line errors, for every command below it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdminError as exc:
            raise _Failure(str(exc), exc.exit_code) from None
        except store.StoreError as exc:
            raise _Failure(str(exc)) from None
        except sqlite3.Error as exc:  # a BEGIN or COMMIT the store did not word
            raise _Failure(f"rules.db: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Admin:
    db: Path
    actor: str
    secrets: SecretPolicy

    def _open(self) -> sqlite3.Connection:
        conn = store.connect(self.db)
        try:
            if store.pending_migrations(conn):
                store.migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """rules.db (created or migrated if needed) in one read transaction."""
        conn = self._open()
        try:
            with store.transaction(conn):
                yield conn
        finally:
            conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """rules.db in one admin transaction: all of the command's writes, or none."""
        conn = self._open()
        try:
            with store.admin_transaction(conn, self.actor):
                yield conn
        finally:
            conn.close()


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name, no passwd entry (containers)
        return f"uid {os.getuid()}"


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


# ----------------------------------------------------------------------------- root

_EPILOG = """\b
Example: a webhook rule, tried, then enforced on app.example.com:
  safous-admin rule add posture --method POST \\
      --url https://posture.example.com/check --body '{"user": "%username%"}' \\
      --auth basic --username sidecar --password env:SAFOUS_SECRET_POSTURE_PW \\
      --action string:status:active --disabled
  safous-admin test posture --param username=alice
  safous-admin rule enable posture
  safous-admin policy add app --host app.example.com --rule posture
  safous-admin logs activity --denied      # who was denied, and why
  safous-admin logs audit                  # who changed what

Run any command with --help for its options."""


@click.group("safous-admin", cls=_AdminGroup, epilog=_EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), envvar="SAFOUS_DB",
              default="rules.db", show_default=True, show_envvar=True,
              help="The rules database the sidecar serves (created if absent).")
@click.option("--actor", envvar="SAFOUS_ACTOR", show_envvar=True, metavar="NAME",
              help="Who makes the changes, as the audit log records it.  [default: the OS user]")
# Read by hand rather than with click's envvar: the sidecar's settings read these variables, and
# the two must agree on every value, "" (no directory) included, which click would skip.
@click.option("--secret-dir", "secret_dirs", multiple=True, metavar="DIR",
              help="Directory whose files file:PATH secret references may read, as the sidecar's "
              "--secret-dir; repeat for more.  [env var: SAFOUS_SECRET_DIR, :-separated; "
              f"default: {':'.join(DEFAULT_SECRET_DIRS)}]")
@click.option("--secret-env-prefix", metavar="PREFIX",
              help="env:NAME secret references may only read variables whose names start with this, "
              "as the sidecar's --secret-env-prefix.  [env var: SAFOUS_SECRET_ENV_PREFIX; "
              f"default: {DEFAULT_ENV_PREFIX}]")
@click.pass_context
def cli(ctx: click.Context, db: Path, actor: str | None, secret_dirs: tuple[str, ...],
        secret_env_prefix: str | None) -> None:
    """Manage the rules and policies of the Safous sidecar (Envoy ext_authz) in rules.db.

    A rule is a webhook call plus the criteria its answer must meet; a policy matches requests
    (host, path prefix, methods) and lists the rules that must all pass. A running sidecar picks
    every change up within a second, without a restart. Every change is checked before anything
    is written, and recorded in the audit log with its actor.

    Secret references are checked against the sidecar's settings: give --secret-dir and
    --secret-env-prefix (or their variables) as the sidecar has them.
    """
    actor = _os_user() if actor is None else actor
    if not actor.strip() or any(not c.isprintable() for c in actor):
        raise click.BadParameter("must be a non-empty name without control characters",
                                 param_hint="--actor")
    ctx.obj = _Admin(db, actor, _secret_policy(secret_dirs, secret_env_prefix))


def _secret_policy(dir_options: tuple[str, ...], prefix_option: str | None) -> SecretPolicy:
    """The sidecar's secret policy, from the same settings read the same way: a flag wins over
    its variable, which wins over the default."""
    dirs_variable = os.environ.get("SAFOUS_SECRET_DIR")
    try:
        if dir_options:
            dirs = parse_secret_dirs(dir_options)
        else:
            dirs = DEFAULT_SECRET_DIRS if dirs_variable is None else parse_secret_dirs(dirs_variable)
    except ValueError as exc:
        hint = "--secret-dir" if dir_options else "SAFOUS_SECRET_DIR"
        raise click.BadParameter(str(exc), param_hint=hint) from None
    if prefix_option is not None:
        prefix, hint = prefix_option, "--secret-env-prefix"
    else:
        hint = "SAFOUS_SECRET_ENV_PREFIX"
        prefix = os.environ.get(hint, DEFAULT_ENV_PREFIX)
    try:
        return SecretPolicy(dirs, prefix)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


# ------------------------------------------------------------------- option parsing


def _pairs(separator: str, form: str) -> Callable[[click.Context, click.Parameter, tuple[str, ...]],
                                                   list[tuple[str, str]]]:
    def parse(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
        out = []
        for value in values:
            key, sep, rest = value.partition(separator)
            if not sep or not key:
                raise click.BadParameter(f"{value!r} is not {form}")
            out.append((key, rest))
        return out

    return parse


def _actions(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[dict[str, str]]:
    out = []
    for value in values:
        parts = value.split(":", 2)  # only the first two colons: a regex may hold more
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise click.BadParameter(f"{value!r} is not TYPE:KEY:VALUE (string, regex or store)")
        out.append({"type": parts[0], "key": parts[1], "value": parts[2]})
    return out


def _apply(decorators: Sequence[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(function: F) -> F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return decorate


def _rule_options(edit: bool) -> Callable[[F], F]:
    options: list[Callable[[F], F]] = [
        click.option("--method", type=_UpperChoice(["GET", "POST"]),
                     help="HTTP method of the webhook call." + ("" if edit else "  [default: GET]")),
        click.option("--url", required=not edit,
                     help="Webhook URL, http:// or https://; %parameters% allowed after the host."),
        click.option("--header", "headers", multiple=True, metavar="KEY=VALUE",
                     callback=_pairs("=", "KEY=VALUE"),
                     help="Request header; repeat for more; %parameters% allowed in the value."
                     + (" Replaces all the rule's headers." if edit else "")),
        click.option("--body", help="POST body template, %parameters% allowed (JSON unless a "
                     "Content-Type header says otherwise)."),
        click.option("--body-file", type=click.File("r", encoding="utf-8"), metavar="PATH",
                     help="Read the body template from PATH (- for stdin)."),
        click.option("--auth", type=click.Choice(["none", "basic", "oauth"]),
                     help="Authentication of the webhook call." + ("" if edit else "  [default: none]")
                     + (" Changing it drops the other type's settings." if edit else "")),
        click.option("--username", help="Basic auth user name."),
        click.option("--password", help="Basic auth password: env:NAME or file:PATH keeps it out of "
                     "rules.db (a clear value is stored as given, and only ever shown masked)."),
        click.option("--token-url", help="OAuth 2.0 token endpoint (client credentials grant)."),
        click.option("--client-id", help="OAuth client ID."),
        click.option("--client-secret", help="OAuth client secret: env:NAME or file:PATH, or clear."),
        click.option("--verify", type=click.Choice(["json", "jsonp"]),
                     help="Content type of the webhook's answer." + ("" if edit else "  [default: json]")),
        click.option("--action", "actions", multiple=True, metavar="TYPE:KEY:VALUE", callback=_actions,
                     help="API Response Action; repeat for more; all must hold. string: the value at "
                     "KEY (a dot path: data.user.status, items.0.id) equals VALUE; regex: it matches "
                     "the regular expression VALUE; store: keep it as VALUE for the upstream "
                     "(x-safous-VALUE header) and later rules (%stored.VALUE%)."
                     + (" Replaces all the rule's actions." if edit else "")),
        click.option("--timeout-ms", type=int, metavar="N",
                     help="Time the webhook has to answer, 1-60000 ms." + ("" if edit else "  [default: 1000]")),
        click.option("--cache-ttl", type=float, metavar="SECONDS",
                     help="Seconds a decision is reused for the same parameters; 0 never."
                     + ("" if edit else "  [default: 0]")),
    ]
    if edit:
        options += [
            click.option("--enabled/--disabled", default=None, help="Enable or disable the rule."),
            click.option("--clear-headers", is_flag=True, help="Remove every header."),
            click.option("--clear-actions", is_flag=True, help="Remove every response action."),
            click.option("--clear-body", is_flag=True, help="Remove the body (needed to switch to GET)."),
        ]
    else:
        options.append(click.option("--disabled", is_flag=True,
                                    help="Create it disabled: skipped by every policy until enabled."))
    return _apply(options)


def _rule_fields(base: Mapping[str, Any], opts: Mapping[str, Any], *, edit: bool) -> dict[str, Any]:
    """The rule's fields after applying the command's options to ``base``. Raises
    ``click.UsageError`` for options that contradict each other."""
    fields = dict(base)
    auth = opts["auth"]
    if auth is not None and auth != fields.get("auth", "none"):
        dropped = {"none": _BASIC_FIELDS + _OAUTH_FIELDS, "basic": _OAUTH_FIELDS, "oauth": _BASIC_FIELDS}[auth]
        fields.update(dict.fromkeys(dropped))
    for option, field in (("method", "method"), ("url", "url"), ("auth", "auth"),
                          ("username", "username"), ("password", "password"),
                          ("token_url", "token_url"), ("client_id", "client_id"),
                          ("client_secret", "client_secret"), ("verify", "verification"),
                          ("timeout_ms", "timeout_ms"), ("cache_ttl", "cache_ttl")):
        if opts[option] is not None:
            fields[field] = opts[option].upper() if option == "method" else opts[option]

    given_body = [o for o in ("body", "body_file", "clear_body") if opts.get(o) not in (None, False)]
    if len(given_body) > 1:
        raise click.UsageError("give one of " + ", ".join("--" + o.replace("_", "-") for o in given_body))
    if opts["body"] is not None:
        fields["body"] = opts["body"]
    elif opts["body_file"] is not None:
        fields["body"] = opts["body_file"].read()
    elif opts.get("clear_body"):
        fields["body"] = None

    for option, clear, field in (("headers", "clear_headers", "headers"), ("actions", "clear_actions", "actions")):
        if opts[option] and opts.get(clear):
            raise click.UsageError(f"give --{option[:-1]} or --{clear.replace('_', '-')}, not both")
        if opts[option]:
            fields[field] = [list(h) for h in opts[option]] if field == "headers" else list(opts[option])
        elif opts.get(clear):
            fields[field] = []

    if edit:
        if opts["enabled"] is not None:
            fields["enabled"] = opts["enabled"]
    else:
        fields["enabled"] = not opts["disabled"]

    final_auth = fields.get("auth", "none")
    if final_auth != "basic" and any(opts[f] is not None for f in _BASIC_FIELDS):
        raise click.UsageError("--username and --password go with --auth basic")
    if final_auth != "oauth" and any(opts[f] is not None for f in _OAUTH_FIELDS):
        raise click.UsageError("--token-url, --client-id and --client-secret go with --auth oauth")
    if edit and fields.get("body") is not None and fields.get("method") == "GET" and not given_body:
        raise click.UsageError("a body is only allowed with POST: add --clear-body to remove it")
    return fields


def _warn_clear_secrets(rule: Rule, opts: Mapping[str, Any]) -> None:
    for field, option in (("password", "--password"), ("client_secret", "--client-secret")):
        value = getattr(rule, field)
        if opts.get(field) is not None and value is not None and not is_reference(value):
            _warn(f"{option} is stored in clear in rules.db; env:NAME or file:PATH keeps it out")


# ---------------------------------------------------------------------------- rules


def _not_found(kind: str, name: str, known: Sequence[str], exit_code: int = 1) -> NoReturn:
    raise AdminError(f"{kind} {quoted(name)} does not exist" + closest(name, known), exit_code)


def _one_rule(conn: sqlite3.Connection, name: str) -> StoredRule:
    found = store.read_rules(conn, name)
    if not found:
        _not_found("rule", name, [r.name for r in store.read_rules(conn)])
    return found[0]


def _one_policy(conn: sqlite3.Connection, name: str) -> StoredPolicy:
    found = store.read_policies(conn, name)
    if not found:
        _not_found("policy", name, [p.name for p in store.read_policies(conn)])
    return found[0]


def _rule_problem(stored: StoredRule, secrets: SecretPolicy) -> str | None:
    """Why the sidecar cannot use the rule, or None (secrets are resolved only where the
    sidecar runs, so an unset env:NAME is not a problem here; a reference the sidecar's secret
    policy refuses is)."""
    if stored.rule is None:
        return stored.error
    try:
        compile_rule_request(stored.rule)
        check_secrets(stored.rule, secrets)
    except (TemplateError, AdminError) as exc:
        return str(exc)
    return None


def _policy_problem(stored: StoredPolicy, rules: Mapping[str, StoredRule]) -> str | None:
    if stored.policy is None:
        return stored.error
    broken = [n for n in stored.policy.rules if n in rules and rules[n].rule is None]
    if broken:
        return f"rule {quoted(broken[0])} does not validate: the policy denies with rule_invalid"
    return stored_problem(stored.policy, {n: r.rule for n, r in rules.items()})


def _check_policies_of(conn: sqlite3.Connection, rule: Rule) -> list[str]:
    """Problems that changing ``rule`` as given would cause to the policies using it (not those
    they already had)."""
    rules: dict[str, Rule | None] = {r.name: r.rule for r in store.read_rules(conn)}
    using = [p.policy for p in store.read_policies(conn) if p.policy and rule.name in p.policy.rules]
    before = set(stored_problems(using, rules))
    rules[rule.name] = rule
    return [p for p in stored_problems(using, rules) if p not in before]


@cli.group(cls=_AdminGroup)
def rule() -> None:
    """Manage rules: webhook calls and their criteria."""


@rule.command("add")
@click.argument("name")
@_rule_options(edit=False)
@click.pass_obj
def rule_add(admin: _Admin, name: str, **opts: Any) -> None:
    """Create a rule.

    The rule NAME is a webhook call and the criteria its answer must meet.

    Parameters (%username%, %headers.X%... see `safous-admin params`) are filled in per request
    in the URL, header values and body; an unknown one is refused with a suggestion. Try the
    rule with `safous-admin test NAME` before a policy uses it.
    """
    check_name("rule", name)
    rule = validate_rule(_rule_fields({"name": name}, opts, edit=False), option_names=True,
                         secrets=admin.secrets)
    with admin.write() as conn:
        if store.read_rules(conn, name):
            raise AdminError(f"rule {quoted(name)} already exists: change it with `rule edit`")
        store.save_rule(conn, rule)
    _warn_clear_secrets(rule, opts)
    click.echo(f"rule {quoted(name)} created" + ("" if rule.enabled else " (disabled)"))


@rule.command("edit")
@click.argument("name")
@_rule_options(edit=True)
@click.pass_obj
def rule_edit(admin: _Admin, name: str, **opts: Any) -> None:
    """Change a rule.

    Options given replace those settings of the rule NAME; the others are kept.

    A list option (--header, --action) replaces the whole list; --clear-headers and
    --clear-actions empty it. A rule stored broken (e.g. edited with plain SQL) can be repaired
    this way.
    """
    with admin.write() as conn:
        stored = _one_rule(conn, name)
        rule = validate_rule(_rule_fields(stored.fields, opts, edit=True), option_names=True,
                             secrets=admin.secrets)
        if stored.rule == rule:
            click.echo(f"rule {quoted(name)} unchanged")
            return
        problems = _check_policies_of(conn, rule)
        if problems:
            raise AdminError(problems[0])
        store.save_rule(conn, rule)
    _warn_clear_secrets(rule, opts)
    click.echo(f"rule {quoted(name)} updated")


@rule.command("show")
@click.argument("name")
@click.pass_obj
def rule_show(admin: _Admin, name: str) -> None:
    """Show a rule.

    Every setting of the rule NAME (secrets masked), the policies that use it, and what is
    wrong with it, if anything.
    """
    with admin.read() as conn:
        stored = _one_rule(conn, name)
    click.echo(display.rule_details(stored, _rule_problem(stored, admin.secrets)))


@rule.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (the export's fields).")
@click.pass_obj
def rule_list(admin: _Admin, as_json: bool) -> None:
    """List the rules.

    With the policies that use each, and what is wrong with it, if anything.
    """
    with admin.read() as conn:
        rules = store.read_rules(conn)
    problems = [_rule_problem(r, admin.secrets) for r in rules]
    if as_json:
        for stored, problem in zip(rules, problems, strict=True):
            doc = {**display.rule_document(stored), "policies": list(stored.policies), "problem": problem}
            click.echo(json.dumps(doc, ensure_ascii=False))
        return
    if not rules:
        click.echo("no rules")
        return
    headers = ["NAME", "ENABLED", "METHOD", "URL", "POLICIES"]
    rows = [display.rule_row(r) for r in rules]
    if any(problems):
        headers.append("PROBLEM")
        rows = [[*row, p or ""] for row, p in zip(rows, problems, strict=True)]
    click.echo(display.table(headers, rows))


@rule.command("delete")
@click.argument("name")
@click.pass_obj
def rule_delete(admin: _Admin, name: str) -> None:
    """Delete a rule.

    A rule that a policy uses is not deleted: remove it from the policy first
    (policy edit NAME --rule ...).
    """
    with admin.write() as conn:
        stored = _one_rule(conn, name)
        if stored.policies:
            which, them = ("policy", "it") if len(stored.policies) == 1 else ("policies", "them")
            raise AdminError(f"rule {quoted(name)} is used by {which} "
                             f"{', '.join(map(quoted, stored.policies))}: remove it from {them} first")
        store.delete_rule(conn, name)
    click.echo(f"rule {quoted(name)} deleted")


def _switch(admin: _Admin, kind: str, name: str, enabled: bool) -> None:
    word = "enabled" if enabled else "disabled"
    with admin.write() as conn:
        changed = store.set_enabled(conn, kind, name, enabled)
        if changed is None:
            reader = store.read_rules if kind == "rule" else store.read_policies
            _not_found(kind, name, [o.name for o in reader(conn)])
        warnings = _switch_warnings(conn, kind, name, admin.secrets) if changed else []
    for warning in warnings:
        _warn(warning)
    click.echo(f"{kind} {quoted(name)} {word}" if changed else f"{kind} {quoted(name)} was already {word}")


def _switch_warnings(conn: sqlite3.Connection, kind: str, name: str, secrets: SecretPolicy) -> list[str]:
    """What the sidecar will make of the change: a broken rule enabled, or a policy whose
    rules no longer run in order (a disabled rule stored a value a later one uses)."""
    rules = {r.name: r for r in store.read_rules(conn)}
    warnings = []
    if kind == "rule":
        stored = rules[name]
        problem = _rule_problem(stored, secrets)
        if problem and stored.fields["enabled"]:
            warnings.append(f"rule {quoted(name)} does not validate ({problem}): the policies "
                            "that use it deny with rule_invalid until it is repaired")
        affected = [p for p in store.read_policies(conn) if p.name in stored.policies]
    else:
        affected = store.read_policies(conn, name)
    models = {n: r.rule for n, r in rules.items()}
    for policy in affected:
        if not policy.fields["enabled"]:
            continue
        if kind == "rule":
            problem = stored_problem(policy.policy, models) if policy.policy else None
        else:
            problem = _policy_problem(policy, rules)
            problem = problem and f"policy {quoted(policy.name)}: {problem}"
        if problem:
            warnings.append(problem)
    return warnings


@rule.command("enable")
@click.argument("name")
@click.pass_obj
def rule_enable(admin: _Admin, name: str) -> None:
    """Enable a rule.

    The policies that list the rule NAME run it again.
    """
    _switch(admin, "rule", name, True)


@rule.command("disable")
@click.argument("name")
@click.pass_obj
def rule_disable(admin: _Admin, name: str) -> None:
    """Disable a rule.

    Every policy skips the rule NAME; a policy left with no enabled rule allows.
    """
    _switch(admin, "rule", name, False)


# ------------------------------------------------------------------------- policies


def _policy_options(edit: bool) -> Callable[[F], F]:
    replaces = " Replaces the whole list." if edit else ""
    options: list[Callable[[F], F]] = [
        click.option("--host", "hosts", multiple=True, metavar="PATTERN",
                     help="Host matched: app.example.com, or *.example.com for any name below it; "
                     "repeat for more; none = any host." + replaces),
        click.option("--path-prefix", metavar="P",
                     help="Path prefix matched on whole segments (/api matches /api/x, not /apix)."
                     + ("" if edit else "  [default: /]")),
        click.option("--method", "methods", multiple=True, metavar="M",
                     help="HTTP method matched; repeat for more; none = any method." + replaces),
        click.option("--rule", "rules", multiple=True, metavar="RULE",
                     help="Rule the request must pass, in order; repeat for more; all must pass."
                     + replaces),
        click.option("--integration", type=click.Choice(["on", "off"]),
                     help="The integration switch: off allows matching requests without running the "
                     "rules." + ("" if edit else "  [default: on]")),
        click.option("--priority", type=int, metavar="N",
                     help="Lowest number wins when several policies match." + ("" if edit else "  [default: 100]")),
    ]
    if edit:
        options += [
            click.option("--enabled/--disabled", default=None, help="Enable or disable the policy."),
            click.option("--clear-hosts", is_flag=True, help="Match any host."),
            click.option("--clear-methods", is_flag=True, help="Match any method."),
            click.option("--clear-rules", is_flag=True, help="Run no rules (the policy then allows)."),
        ]
    else:
        options.append(click.option("--disabled", is_flag=True, help="Create it disabled (matches nothing)."))
    return _apply(options)


def _policy_fields(base: Mapping[str, Any], opts: Mapping[str, Any], *, edit: bool) -> dict[str, Any]:
    fields = dict(base)
    for option in ("hosts", "methods", "rules"):
        clear = f"clear_{option}"
        if opts[option] and opts.get(clear):
            raise click.UsageError(f"give --{option[:-1]} or --{clear.replace('_', '-')}, not both")
        if opts[option]:
            fields[option] = list(opts[option])
        elif opts.get(clear):
            fields[option] = []
    if opts["path_prefix"] is not None:
        fields["path_prefix"] = opts["path_prefix"]
    if opts["integration"] is not None:
        fields["integration"] = opts["integration"] == "on"
    if opts["priority"] is not None:
        fields["priority"] = opts["priority"]
    if edit:
        if opts["enabled"] is not None:
            fields["enabled"] = opts["enabled"]
    else:
        fields["enabled"] = not opts["disabled"]
    return fields


def _validated_policy(conn: sqlite3.Connection, fields: Mapping[str, Any]) -> Policy:
    """The policy ``fields`` describe, checked against the stored rules (``AdminError``)."""
    stored_rules = {r.name: r for r in store.read_rules(conn)}
    policy = validate_policy(fields, {n: r.rule for n, r in stored_rules.items()}, option_names=True)
    for name in policy.rules:
        if stored_rules[name].rule is None:
            _warn(f"rule {quoted(name)} does not validate ({stored_rules[name].error}): policy "
                  f"{quoted(policy.name)} denies with rule_invalid until it is repaired")
    return policy


@cli.group(cls=_AdminGroup)
def policy() -> None:
    """Manage policies: which requests run which rules."""


@policy.command("add")
@click.argument("name")
@_policy_options(edit=False)
@click.pass_obj
def policy_add(admin: _Admin, name: str, **opts: Any) -> None:
    """Create a policy.

    Requests the policy NAME matches (host, path prefix, methods) must pass all its rules.
    A request that no policy matches is denied (the sidecar's default action).
    """
    check_name("policy", name)
    fields = _policy_fields({"name": name}, opts, edit=False)
    with admin.write() as conn:
        if store.read_policies(conn, name):
            raise AdminError(f"policy {quoted(name)} already exists: change it with `policy edit`")
        policy = _validated_policy(conn, fields)
        store.save_policy(conn, policy)
    click.echo(f"policy {quoted(name)} created" + ("" if policy.enabled else " (disabled)"))


@policy.command("edit")
@click.argument("name")
@_policy_options(edit=True)
@click.pass_obj
def policy_edit(admin: _Admin, name: str, **opts: Any) -> None:
    """Change a policy.

    Options given replace those settings of the policy NAME; the others are kept.

    A list option (--host, --method, --rule) replaces the whole list; --clear-hosts,
    --clear-methods and --clear-rules empty it.
    """
    with admin.write() as conn:
        stored = _one_policy(conn, name)
        policy = _validated_policy(conn, _policy_fields(stored.fields, opts, edit=True))
        if stored.policy == policy:
            click.echo(f"policy {quoted(name)} unchanged")
            return
        store.save_policy(conn, policy)
    click.echo(f"policy {quoted(name)} updated")


@policy.command("show")
@click.argument("name")
@click.pass_obj
def policy_show(admin: _Admin, name: str) -> None:
    """Show a policy.

    Every setting of the policy NAME, its rules in order, and what is wrong with it, if
    anything.
    """
    with admin.read() as conn:
        stored = _one_policy(conn, name)
        rules = {r.name: r for r in store.read_rules(conn)}
    click.echo(display.policy_details(stored, _policy_problem(stored, rules)))


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (the export's fields).")
@click.pass_obj
def policy_list(admin: _Admin, as_json: bool) -> None:
    """List the policies.

    What each matches and the rules it runs.
    """
    with admin.read() as conn:
        policies = store.read_policies(conn)
        rules = {r.name: r for r in store.read_rules(conn)}
    problems = [_policy_problem(p, rules) for p in policies]
    if as_json:
        for stored, problem in zip(policies, problems, strict=True):
            click.echo(json.dumps({**display.policy_document(stored), "problem": problem}, ensure_ascii=False))
        return
    if not policies:
        click.echo("no policies")
        return
    headers = ["NAME", "ENABLED", "PRIORITY", "HOSTS", "PATH", "METHODS", "INTEGRATION", "RULES"]
    rows = [display.policy_row(p) for p in policies]
    if any(problems):
        headers.append("PROBLEM")
        rows = [[*row, p or ""] for row, p in zip(rows, problems, strict=True)]
    click.echo(display.table(headers, rows))


@policy.command("delete")
@click.argument("name")
@click.pass_obj
def policy_delete(admin: _Admin, name: str) -> None:
    """Delete a policy.

    Its rules are kept. Requests it matched go to the next matching policy, or get the
    default action (deny).
    """
    with admin.write() as conn:
        if not store.delete_policy(conn, name):
            _not_found("policy", name, [p.name for p in store.read_policies(conn)])
    click.echo(f"policy {quoted(name)} deleted")


@policy.command("enable")
@click.argument("name")
@click.pass_obj
def policy_enable(admin: _Admin, name: str) -> None:
    """Enable a policy.

    The policy NAME matches requests again.
    """
    _switch(admin, "policy", name, True)


@policy.command("disable")
@click.argument("name")
@click.pass_obj
def policy_disable(admin: _Admin, name: str) -> None:
    """Disable a policy.

    The policy NAME matches nothing until it is enabled.
    """
    _switch(admin, "policy", name, False)


# ----------------------------------------------------------------------------- logs


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An ISO 8601 date or time as the logs write times (UTC); a time without zone is UTC."""
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time "
                                 "(2026-01-31, 2026-01-31T09:00, 2026-01-31T09:00:00+01:00)") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _log_options(function: F) -> F:
    return _apply([
        click.option("--limit", type=click.IntRange(min=0), default=DEFAULT_LIMIT, show_default=True,
                     metavar="N", help="Show the newest N entries; 0 for all."),
        click.option("--since", callback=_since, metavar="ISO8601",
                     help="Only entries at or after this time (UTC unless it says otherwise)."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per line, newest first."),
    ])(function)


@cli.group(cls=_AdminGroup)
def logs() -> None:
    """Read the audit log and the activity log.

    The audit log says who changed which rule or policy; the activity log, which request
    was allowed or denied, and why.
    """


def _changes(before: Any, after: Any) -> str:
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    return ", ".join(k for k in after if k != "enabled" and before.get(k) != after.get(k))


@logs.command("audit")
@_log_options
@click.pass_obj
def logs_audit(admin: _Admin, limit: int, since: str | None, as_json: bool) -> None:
    """Show who changed what.

    The audit log, newest first: every create, edit, enable, disable and delete of a rule or
    policy, with time (UTC), actor (`sql` for a change made with plain SQL) and, for an edit,
    the settings changed. --json gives the whole before and after (secrets redacted).
    """
    with admin.read() as conn:
        entries = store.read_audit(conn, limit=limit or None, since=since)
    if as_json:
        for e in entries:
            click.echo(json.dumps({"id": e.id, "at": e.at, "actor": e.actor, "action": e.action,
                                   "object_type": e.object_type, "object_name": e.object_name,
                                   "before": e.before, "after": e.after}, ensure_ascii=False))
        return
    if not entries:
        click.echo("no audit log entries")
        return
    click.echo(display.table(
        ["AT", "ACTOR", "ACTION", "OBJECT", "CHANGES"],
        [[e.at, e.actor, e.action, f"{e.object_type} {quoted(e.object_name)}",
          _changes(e.before, e.after) if e.action == "edit" else ""] for e in entries],
    ))


@logs.command("activity")
@click.option("--denied", is_flag=True, help="Only denied requests, with the reason (STATUS).")
@click.option("--user", metavar="U", help="Only requests of this %username%.")
@_log_options
@click.pass_obj
def logs_activity(admin: _Admin, denied: bool, user: str | None, limit: int, since: str | None,
                  as_json: bool) -> None:
    """Show who was allowed or denied, and why.

    The activity log, newest first: each decision of the sidecar with its time (UTC), request
    id, user, source IP, request, policy, decision, code and status (why: for a denial, the
    reason the client also got in the x-safous-denial-reason header).
    """
    with admin.read() as conn:
        records = store.read_activity(conn, denied=denied, user=user, limit=limit or None, since=since)
    if as_json:
        for r in records:
            click.echo(json.dumps({
                "at": r.at, "request_id": r.request_id, "username": r.username, "source_ip": r.source_ip,
                "method": r.method, "host": r.host, "path": r.path, "policy": r.policy,
                "allowed": r.allowed, "code": r.code, "status": r.status, "latency_ms": r.latency_ms,
            }, ensure_ascii=False))
        return
    if not records:
        click.echo("no activity log entries")
        return
    headers = ["AT", "REQUEST ID", "USER", "SOURCE IP", "METHOD", "HOST", "PATH", "POLICY"]
    headers += ["CODE", "STATUS"] if denied else ["DECISION", "CODE", "STATUS"]
    rows = []
    for r in records:
        row = [r.at, r.request_id or "-", r.username or "-", r.source_ip or "-", r.method, r.host,
               r.path, r.policy or "-"]
        row += [r.code, r.status] if denied else ["allow" if r.allowed else "deny", r.code, r.status]
        rows.append(row)
    click.echo(display.table(headers, rows))


# ------------------------------------------------------------------------- params


@cli.command("params")
def params() -> None:
    """List the %parameters% a rule can use.

    Where each value comes from. A rule's URL, header values and body use them between
    percent signs (%username%); %% is a literal %.
    """
    rows = [[f"%{name}%", source] for name, source in PARAMETERS.items()]
    rows.append([f"%{HEADER_PREFIX}XYZ%", "request header XYZ (name case-insensitive); empty if absent"])
    rows.append([f"%{STORED_PREFIX}NAME%", "value kept by a store response action of an earlier rule "
                 "of the same policy"])
    click.echo(display.table(["PARAMETER", "SOURCE"], rows))


# --------------------------------------------------------------------------- test


def _test_lookup(given: Sequence[tuple[str, str]], headers: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    values: dict[str, str] = dict.fromkeys(PARAMETERS, "")
    for name, value in given:
        name = name.strip("%")
        try:
            check_parameter_name(name)
        except UnknownParameter as exc:
            raise AdminError(f"--param: {exc}", 2) from None
        values[name] = value
    request_headers = {k.lower(): v for k, v in headers}

    def lookup(name: str) -> str:
        if name in values:
            return values[name]
        if name.startswith(HEADER_PREFIX):
            return request_headers.get(name[len(HEADER_PREFIX):].lower(), "")
        return ""  # a %stored.NAME% not given: no earlier rule runs in a dry run

    return lookup


def _body_text(body: bytes, limit: int) -> list[str]:
    text = body[:limit].decode("utf-8", errors="replace")
    lines = display.clean(text, multiline=True).split("\n")
    if len(body) > limit:
        lines.append(f"... ({len(body) - limit} more bytes not shown)")
    return lines


@cli.command("test")
@click.argument("rule_name", metavar="RULE")
@click.option("--param", "given", multiple=True, metavar="NAME=VALUE", callback=_pairs("=", "NAME=VALUE"),
              help="A parameter's value, e.g. --param username=alice; repeat for more; unset ones are empty.")
@click.option("--header", "headers", multiple=True, metavar="KEY=VALUE", callback=_pairs("=", "KEY=VALUE"),
              help="A request header, for %headers.KEY%; repeat for more.")
@click.pass_obj
def test(admin: _Admin, rule_name: str, given: list[tuple[str, str]], headers: list[tuple[str, str]]) -> None:
    """Dry-run a rule against given parameters.

    Runs RULE once, as the sidecar would: calls its webhook and judges the answer.

    Prints the request as sent (secrets masked), the response, each response action's verdict
    and the decision. Exit status: 0 the criteria are met, 1 they are not, 2 a usage or
    configuration error (unknown rule or parameter, broken rule, unset env: secret). Works on a
    disabled rule; writes nothing. Secrets given as env:NAME or file:PATH are read here, so set
    them as the sidecar has them, within --secret-dir and --secret-env-prefix as the sidecar
    has those. SAFOUS_WEBHOOK_CA_BUNDLE is honoured as by the sidecar.
    """
    from sidecar.rules.client import WebhookClient  # aiohttp: loaded only for this command
    from sidecar.rules.evaluator import WebhookEvaluator

    from .dryrun import dry_run

    lookup = _test_lookup(given, headers)
    if not admin.db.exists():
        raise AdminError(f"{admin.db} does not exist", 2)
    try:
        conn = store.connect(admin.db, readonly=True)
        try:
            found = store.read_rules(conn, rule_name)
            names = [r.name for r in store.read_rules(conn)] if not found else []
        finally:
            conn.close()
    except store.StoreError as exc:
        raise AdminError(str(exc), 2) from None
    if not found:
        _not_found("rule", rule_name, names, 2)
    stored = found[0]
    if stored.rule is None:
        raise AdminError(f"rule {quoted(rule_name)} does not validate: {stored.error}", 2)
    client = WebhookClient(ca_bundle=os.environ.get("SAFOUS_WEBHOOK_CA_BUNDLE") or None)
    try:
        compiled = WebhookEvaluator(client, secret_policy=admin.secrets).compile(stored.rule)
    except ValueError as exc:
        raise AdminError(f"rule {quoted(rule_name)} cannot run: {exc}", 2) from None

    async def run() -> DryRun:
        try:
            await client.start()
        except ValueError as exc:
            raise AdminError(f"SAFOUS_WEBHOOK_CA_BUNDLE: {exc}", 2) from None
        try:
            return await dry_run(client, compiled, lookup)
        finally:
            await client.close()

    result = asyncio.run(run())
    click.echo(_dry_run_report(result, lookup))
    if not result.met:
        click.get_current_context().exit(1)


def _dry_run_report(result: DryRun, lookup: Callable[[str], str]) -> str:
    from .dryrun import shown_headers

    rule = result.rule
    lines = [f"rule {quoted(rule.name)}" + ("" if rule.rule.enabled else " (disabled)")]
    if rule.request.parameters:
        lines.append("parameters")
        width = max(len(n) for n in rule.request.parameters) + 2
        for name in rule.request.parameters:
            value = lookup(name)
            lines.append(f"  {f'%{name}%':<{width}}  {display.clean(value) if value else '(empty)'}".rstrip())
    lines.append("request")
    if result.request is None:
        lines.append("  not sent")
    else:
        request = result.request
        lines.append(f"  {request.method} {display.clean(request.url)}")
        for key, value in shown_headers(request, rule):
            lines.append(f"  {display.clean(key)}: {display.clean(value)}")
        if request.body is not None:
            lines.append("")
            lines += [f"  {line}" for line in _body_text(request.body, REQUEST_BODY_LIMIT)]
    lines.append("response")
    if result.response is None:
        lines.append("  none")
    else:
        response = result.response
        kind = f", {display.clean(response.content_type)}" if response.content_type else ""
        lines.append(f"  HTTP {response.status}{kind}, {len(response.body)} bytes")
        if response.body:
            lines += [f"  {line}" for line in _body_text(response.body, RESPONSE_BODY_LIMIT)]
    if result.verdicts:
        lines.append("actions")
        specs = [display.clean(f"{v.action.type.value}:{v.action.key}:{v.action.value}") for v in result.verdicts]
        width = max(map(len, specs))
        for verdict, spec in zip(result.verdicts, specs, strict=True):
            lines.append(f"  {verdict.verdict:<11}  {spec:<{width}}  {display.clean(verdict.detail)}")
    if result.failure is None:
        lines.append("decision: met")
    else:
        code, reason = result.failure
        lines.append(f"decision: not met ({code}): {display.clean(reason)}")
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------- export/import


@cli.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--with-secrets", is_flag=True,
              help="Write secrets stored in clear as they are (the file is then created readable by "
              "you only). Without it they are masked, and importing into the same rules.db keeps them.")
@click.pass_obj
def export(admin: _Admin, file: str | None, with_secrets: bool) -> None:
    """Export every rule and policy as JSON.

    Writes one JSON document to FILE (default: standard output).

    Secrets are masked unless --with-secrets; references (env:NAME, file:PATH) are written as
    they are. `safous-admin import FILE` reads it back.
    """
    from .exchange import export_document

    with admin.read() as conn:
        rules = store.read_rules(conn)
        policies = store.read_policies(conn)
    for stored in [*rules, *policies]:
        if stored.error:
            _warn(f"{'rule' if isinstance(stored, StoredRule) else 'policy'} {quoted(stored.name)} "
                  f"does not validate ({stored.error}): exported as stored; import refuses it until repaired")
    text = json.dumps(export_document(rules, policies, with_secrets=with_secrets),
                      indent=2, ensure_ascii=False) + "\n"
    if file is None or file == "-":
        click.echo(text, nl=False)
        return
    mode = 0o600 if with_secrets else 0o666
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise AdminError(f"cannot write {file}: {exc.strerror}") from None
    click.echo(f"exported {_count(len(rules), 'rule')} and {_count(len(policies), 'policy')} to {file}")


def _count(n: int, kind: str) -> str:
    plural = "policies" if kind == "policy" else kind + "s"
    return f"{n} {kind if n == 1 else plural}"


@cli.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--replace", is_flag=True,
              help="Also delete the rules and policies that FILE does not hold.")
@click.pass_obj
def import_(admin: _Admin, file: Any, replace: bool) -> None:
    """Import rules and policies from an export.

    Creates and updates rules and policies from FILE (- for standard input).

    Everything is checked first and applied in one transaction: all of it, or nothing. Rules and
    policies equal to the stored ones are left alone, so importing a file twice changes nothing.
    A masked secret keeps the one stored for that rule. Without --replace, rules and policies
    that FILE does not hold are kept.
    """
    from .exchange import apply_import, plan_import

    source = "standard input" if file.name == "<stdin>" else file.name
    try:
        document = json.load(file)
    except json.JSONDecodeError as exc:
        raise AdminError(f"{source}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError:
        raise AdminError(f"{source}: not UTF-8 text") from None
    with admin.write() as conn:
        try:
            plan = plan_import(document, store.read_rules(conn), store.read_policies(conn), replace=replace)
            for rule in plan.rules:  # those written: a rule kept as stored is not refused here
                try:
                    check_secrets(rule, admin.secrets)
                except AdminError as exc:
                    raise AdminError(f"rule {quoted(rule.name)}: {exc}") from None
        except AdminError as exc:
            raise AdminError(f"{source}: {exc}") from None
        apply_import(conn, plan)
    for verb, kind, name in plan.changes:
        click.echo(f"{verb} {kind} {quoted(name)}")
    click.echo(f"imported {source}: {plan.count('created')} created, {plan.count('updated')} updated, "
               f"{plan.count('deleted')} deleted, {plan.unchanged} unchanged")


def main(argv: Sequence[str] | None = None) -> None:
    """The ``safous-admin`` console script. Exits with the command's status."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="safous-admin")

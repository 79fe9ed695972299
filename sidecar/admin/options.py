"""The options of ``safous-admin``'s commands: declared once, parsed into typed values, merged.

A rule's and a policy's options are declared here for both ``add`` and ``edit`` (``edit``
adds its ``--enabled/--disabled`` and ``--clear-*`` flags), collected as ``RuleOptions`` and
``PolicyOptions``, and applied to the object's fields by ``rule_fields`` and ``policy_fields``,
which refuse options that contradict each other with ``click.UsageError`` (exit 2). A word
that stands for a typed value (``--auth basic``, ``--integration off``) becomes that value
here, by ``Words``: an ``AuthType``, a bool. What the fields then mean is checked by
``validation``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import click

from sidecar.rules.choices import AuthType, Verification
from sidecar.rules.secrets import DEFAULT_ENV_PREFIX, DEFAULT_SECRET_DIRS, SecretPolicy, parse_secret_dirs

from .completion import parameter_values, response_actions, rule_names

__all__ = [
    "DEFAULT_LIMIT",
    "Method",
    "PolicyOptions",
    "RuleOptions",
    "Words",
    "actor_name",
    "apply",
    "log_options",
    "pairs",
    "policy_fields",
    "policy_options",
    "root_options",
    "rule_fields",
    "rule_options",
    "secret_policy",
    "test_options",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)

Method = Literal["GET", "POST"]
"""A rule's webhook method (``sidecar.rules.model.Rule.method``)."""

DEFAULT_LIMIT = 50
"""How many log entries ``logs`` shows unless told."""

_BASIC_FIELDS = ("username", "password")
_OAUTH_FIELDS = ("token_url", "client_id", "client_secret")


class Words(click.Choice[T]):
    """A choice of typed values (enum members, Literal strings, booleans), each typed on the
    command line as its word, and shown so in help and errors. ``upper``: words in upper case,
    typed in any case (``--method post``)."""

    def __init__(self, words: Mapping[T, str], *, upper: bool = False) -> None:
        super().__init__(words)
        self._words = dict(words)
        self._upper = upper

    def normalize_choice(self, choice: object, ctx: click.Context | None) -> str:
        # By identity: True == 1, and a StrEnum member equals its word, so == would mix them.
        word = next((w for value, w in self._words.items() if value is choice), choice)
        return super().normalize_choice(word, ctx)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> T:
        return super().convert(value.upper() if self._upper and isinstance(value, str) else value, param, ctx)


_METHODS: dict[Method, str] = {"GET": "GET", "POST": "POST"}


def _enum_words(enum: type[E]) -> dict[E, str]:
    return {member: member.value for member in enum}


# ---------------------------------------------------------------------------- the root


def root_options(function: F) -> F:
    """``safous-admin``'s own options: ``db``, ``actor``, ``secret_dirs``, ``secret_env_prefix``
    (the last two read with ``secret_policy``), ``force``."""
    return apply([
        click.option("--db", type=click.Path(dir_okay=False, path_type=Path), envvar="SAFOUS_DB",
                     default="rules.db", show_default=True, show_envvar=True,
                     help="The rules database the sidecar serves (rule add, policy add and import create "
                     "it if absent; no other command does)."),
        click.option("--actor", envvar="SAFOUS_ACTOR", show_envvar=True, metavar="NAME",
                     help="Who makes the changes, as the audit log records it.  [default: the OS user]"),
        # Read by hand rather than with click's envvar: the sidecar's settings read these
        # variables, and the two must agree on every value, "" (no directory) included, which
        # click would skip.
        click.option("--secret-dir", "secret_dirs", multiple=True, metavar="DIR",
                     help="Directory whose files file:PATH secret references may read, as the sidecar's "
                     "--secret-dir; repeat for more.  [env var: SAFOUS_SECRET_DIR, :-separated; "
                     f"default: {':'.join(DEFAULT_SECRET_DIRS)}]"),
        click.option("--secret-env-prefix", metavar="PREFIX",
                     help="env:NAME secret references may only read variables whose names start with "
                     "this, as the sidecar's --secret-env-prefix.  [env var: SAFOUS_SECRET_ENV_PREFIX; "
                     f"default: {DEFAULT_ENV_PREFIX}]"),
        click.option("--force", is_flag=True,
                     help="Change a rules.db that a sidecar's --bundle manages (the audit log marks it; the "
                     "next bundle undoes it)."),
    ])(function)


def actor_name(actor: str | None) -> str:
    """The actor the audit log records: ``--actor``, else the OS user. Raises
    ``click.BadParameter`` for a name that would not read as one."""
    if actor is None:
        try:
            actor = getpass.getuser()
        except (OSError, KeyError):  # no login name, no passwd entry (containers)
            actor = f"uid {os.getuid()}"
    if not actor.strip() or any(not c.isprintable() for c in actor):
        raise click.BadParameter("must be a non-empty name without control characters", param_hint="--actor")
    return actor


def secret_policy(dir_options: tuple[str, ...], prefix_option: str | None) -> SecretPolicy:
    """The sidecar's secret policy, from the same settings read the same way: a flag wins over
    its variable, which wins over the default. Raises ``click.BadParameter``."""
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


# ---------------------------------------------------------------------------- parsing


def pairs(separator: str, form: str) -> Callable[[click.Context, click.Parameter, tuple[str, ...]],
                                                  list[tuple[str, str]]]:
    """A callback splitting each value of a repeated option at its first ``separator``."""
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


def apply(decorators: Sequence[Callable[[F], F]]) -> Callable[[F], F]:
    """One decorator applying ``decorators`` in order, the first outermost (as stacked)."""
    def decorate(function: F) -> F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return decorate


def _set_list(fields: dict[str, Any], field: str, given: Sequence[Any], clear: bool) -> None:
    """A list option (``--header`` for ``headers``) replaces the whole list; ``--clear-headers``
    empties it."""
    if given and clear:
        option = "--sni" if field == "sni" else f"--{field[:-1]}"
        raise click.UsageError(f"give {option} or --clear-{field}, not both")
    if given:
        fields[field] = list(given)
    elif clear:
        fields[field] = []


def _set_enabled(fields: dict[str, Any], enabled: bool | None, disabled: bool, *, edit: bool) -> None:
    if edit:
        if enabled is not None:
            fields["enabled"] = enabled
    else:
        fields["enabled"] = not disabled


# ------------------------------------------------------------------------------ rules


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleOptions:
    """``rule add`` or ``rule edit`` as click parsed it: None, empty or False is not given.
    ``disabled`` is add's; ``enabled`` and the ``clear_*`` flags are edit's."""

    method: Method | None
    url: str | None
    headers: list[tuple[str, str]]
    body: str | None
    body_file: IO[str] | None
    auth: AuthType | None
    username: str | None
    password: str | None
    token_url: str | None
    client_id: str | None
    client_secret: str | None
    verify: Verification | None
    actions: list[dict[str, str]]
    timeout_ms: int | None
    cache_ttl: float | None
    disabled: bool = False
    enabled: bool | None = None
    clear_headers: bool = False
    clear_actions: bool = False
    clear_body: bool = False


def rule_options(edit: bool) -> Callable[[F], F]:
    """The options of ``rule add`` (``edit`` False) or ``rule edit``, which become ``RuleOptions``."""
    parameters = parameter_values(edit=edit)
    options: list[Callable[[F], F]] = [
        click.option("--method", type=Words(_METHODS, upper=True),
                     help="HTTP method of the webhook call." + ("" if edit else "  [default: GET]")),
        click.option("--url", required=not edit, shell_complete=parameters,
                     help="Webhook URL, http:// or https://; %parameters% allowed after the host."),
        click.option("--header", "headers", multiple=True, metavar="KEY=VALUE",
                     callback=pairs("=", "KEY=VALUE"), shell_complete=parameters,
                     help="Request header; repeat for more; %parameters% allowed in the value."
                     + (" Replaces all the rule's headers." if edit else "")),
        click.option("--body", shell_complete=parameters, help="POST body template, %parameters% allowed "
                     "(JSON unless a Content-Type header says otherwise)."),
        click.option("--body-file", type=click.File("r", encoding="utf-8"), metavar="PATH",
                     help="Read the body template from PATH (- for stdin)."),
        click.option("--auth", type=Words(_enum_words(AuthType)),
                     help="Authentication of the webhook call." + ("" if edit else "  [default: none]")
                     + (" Changing it drops the other type's settings." if edit else "")),
        click.option("--username", help="Basic auth user name."),
        click.option("--password", help="Basic auth password: env:NAME or file:PATH keeps it out of "
                     "rules.db (a clear value is stored as given, and only ever shown masked)."),
        click.option("--token-url", help="OAuth 2.0 token endpoint (client credentials grant)."),
        click.option("--client-id", help="OAuth client ID."),
        click.option("--client-secret", help="OAuth client secret: env:NAME or file:PATH, or clear."),
        click.option("--verify", type=Words(_enum_words(Verification)),
                     help="Content type of the webhook's answer." + ("" if edit else "  [default: json]")),
        click.option("--action", "actions", multiple=True, metavar="TYPE:KEY:VALUE", callback=_actions,
                     shell_complete=response_actions,
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
    return apply(options)


def rule_fields(base: Mapping[str, Any], opts: RuleOptions, *, edit: bool) -> dict[str, Any]:
    """The rule's fields after applying the command's options to ``base``. Raises
    ``click.UsageError`` for options that contradict each other."""
    fields = dict(base)
    if opts.auth is not None and opts.auth != fields.get("auth", AuthType.NONE):
        dropped = {AuthType.NONE: _BASIC_FIELDS + _OAUTH_FIELDS, AuthType.BASIC: _OAUTH_FIELDS,
                   AuthType.OAUTH: _BASIC_FIELDS}[opts.auth]
        fields.update(dict.fromkeys(dropped))
    given: dict[str, object] = {
        "method": opts.method, "url": opts.url, "auth": opts.auth, "username": opts.username,
        "password": opts.password, "token_url": opts.token_url, "client_id": opts.client_id,
        "client_secret": opts.client_secret, "verification": opts.verify, "timeout_ms": opts.timeout_ms,
        "cache_ttl": opts.cache_ttl,
    }
    fields.update((field, value) for field, value in given.items() if value is not None)

    body_options = {"body": opts.body is not None, "body_file": opts.body_file is not None,
                    "clear_body": opts.clear_body}
    given_body = [option for option, is_given in body_options.items() if is_given]
    if len(given_body) > 1:
        raise click.UsageError("give one of " + ", ".join("--" + o.replace("_", "-") for o in given_body))
    if opts.body is not None:
        fields["body"] = opts.body
    elif opts.body_file is not None:
        fields["body"] = opts.body_file.read()
    elif opts.clear_body:
        fields["body"] = None

    _set_list(fields, "headers", [list(h) for h in opts.headers], opts.clear_headers)
    _set_list(fields, "actions", opts.actions, opts.clear_actions)
    _set_enabled(fields, opts.enabled, opts.disabled, edit=edit)

    final_auth = fields.get("auth", AuthType.NONE)
    if final_auth != AuthType.BASIC and any(given[f] is not None for f in _BASIC_FIELDS):
        raise click.UsageError("--username and --password go with --auth basic")
    if final_auth != AuthType.OAUTH and any(given[f] is not None for f in _OAUTH_FIELDS):
        raise click.UsageError("--token-url, --client-id and --client-secret go with --auth oauth")
    if edit and fields.get("body") is not None and fields.get("method") == "GET" and not given_body:
        raise click.UsageError("a body is only allowed with POST: add --clear-body to remove it")
    return fields


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyOptions:
    """``policy add`` or ``policy edit`` as click parsed it (see ``RuleOptions``)."""

    hosts: tuple[str, ...]
    path_prefix: str | None
    methods: tuple[str, ...]
    rules: tuple[str, ...]
    integration: bool | None
    priority: int | None
    ports: tuple[int, ...] = ()
    sni: tuple[str, ...] = ()
    mode: str | None = None
    disabled: bool = False
    enabled: bool | None = None
    clear_hosts: bool = False
    clear_methods: bool = False
    clear_rules: bool = False
    clear_ports: bool = False
    clear_sni: bool = False


def policy_options(edit: bool) -> Callable[[F], F]:
    """The options of ``policy add`` (``edit`` False) or ``policy edit``, which become
    ``PolicyOptions``."""
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
        click.option("--rule", "rules", multiple=True, metavar="RULE", shell_complete=rule_names,
                     help="Rule the request must pass, in order; repeat for more; all must pass."
                     + replaces),
        click.option("--integration", type=Words({True: "on", False: "off"}),
                     help="The integration switch: off allows matching requests without running the "
                     "rules." + ("" if edit else "  [default: on]")),
        click.option("--priority", type=int, metavar="N",
                     help="Lowest number wins when several policies match." + ("" if edit else "  [default: 100]")),
        click.option("--port", "ports", multiple=True, type=click.IntRange(1, 65535), metavar="PORT",
                     help="Destination port matched; repeat for more. A policy with ports or server "
                     "names also governs TCP connections (Envoy's network ext_authz)." + replaces),
        click.option("--sni", multiple=True, metavar="NAME",
                     help="TLS server name matched: db.example.com, or *.example.com; repeat for more."
                     + replaces),
        click.option("--mode", type=click.Choice(["enforce", "audit"]),
                     help="audit: run the rules but allow whatever they say, recording what enforcement "
                     "would have denied (logs activity --would-deny)." + ("" if edit else "  [default: enforce]")),
    ]
    if edit:
        options += [
            click.option("--enabled/--disabled", default=None, help="Enable or disable the policy."),
            click.option("--clear-hosts", is_flag=True, help="Match any host."),
            click.option("--clear-methods", is_flag=True, help="Match any method."),
            click.option("--clear-rules", is_flag=True, help="Run no rules (the policy then allows)."),
            click.option("--clear-ports", is_flag=True, help="Match any destination port."),
            click.option("--clear-sni", is_flag=True, help="Match any TLS server name."),
        ]
    else:
        options.append(click.option("--disabled", is_flag=True, help="Create it disabled (matches nothing)."))
    return apply(options)


def policy_fields(base: Mapping[str, Any], opts: PolicyOptions, *, edit: bool) -> dict[str, Any]:
    """The policy's fields after applying the command's options to ``base``. Raises
    ``click.UsageError`` for options that contradict each other."""
    fields = dict(base)
    _set_list(fields, "hosts", opts.hosts, opts.clear_hosts)
    _set_list(fields, "methods", opts.methods, opts.clear_methods)
    _set_list(fields, "rules", opts.rules, opts.clear_rules)
    _set_list(fields, "ports", opts.ports, opts.clear_ports)
    _set_list(fields, "sni", opts.sni, opts.clear_sni)
    given = {"path_prefix": opts.path_prefix, "integration": opts.integration, "priority": opts.priority,
             "mode": opts.mode}
    fields.update((field, value) for field, value in given.items() if value is not None)
    _set_enabled(fields, opts.enabled, opts.disabled, edit=edit)
    return fields


# ------------------------------------------------------------------------------- test


def test_options(function: F) -> F:
    """``test``'s ``--param`` and ``--header``, as ``(name, value)`` pairs."""
    return apply([
        click.option("--param", "given", multiple=True, metavar="NAME=VALUE", callback=pairs("=", "NAME=VALUE"),
                     help="A parameter's value, e.g. --param username=alice; repeat for more; unset ones "
                     "are empty."),
        click.option("--header", "headers", multiple=True, metavar="KEY=VALUE", callback=pairs("=", "KEY=VALUE"),
                     help="A request header, for %headers.KEY%; repeat for more."),
    ])(function)


# ------------------------------------------------------------------------------- logs


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


def log_options(function: F) -> F:
    """``--limit``, ``--since`` and ``--json``, as both ``logs`` commands take them."""
    return apply([
        click.option("--limit", type=click.IntRange(min=0), default=DEFAULT_LIMIT, show_default=True,
                     metavar="N", help="Show the newest N entries; 0 for all."),
        click.option("--since", callback=_since, metavar="ISO8601",
                     help="Only entries at or after this time (UTC unless it says otherwise)."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per line, newest first."),
    ])(function)

"""The ``safous-admin`` command line (a contract: scripts depend on its names; docs/admins/admin-script.md).

A thin shell over the database API (``sidecar.db``), in the manner of sqlite-utils: each command's docstring is its
``--help``; it parses its options (``options``), validates (``sidecar.exchange``), then reads or
writes rules.db (``access``: readers never create it, writers do all or nothing, the actor
recorded for the audit triggers), says what the sidecar will make of the result (``checks``)
and prints (``display``). Domain errors (``AdminError``, ``InvalidContent``, ``StoreError``)
become one ``Error: ...`` line on stderr and exit status 1 here, at the edge, or 2 for an
``AdminError`` that says so; usage errors exit 2, as click makes them.

The module level imports click and the declarations of the command line only; each command
imports what it runs. Shell completion (``completion``) builds the whole command line on every
Tab, and answers within 100 ms only without pydantic, sqlite-utils, cryptography or aiohttp
(tests/test_completion.py holds what it loads).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from sidecar import __version__, db

from .backup import backup, restore
from .bundle import bundle
from .collect import collect
from .completion import completion, policy_names, rule_names
from .logs import explain, logs
from .options import (
    PolicyOptions,
    RuleOptions,
    actor_name,
    policy_fields,
    policy_options,
    root_options,
    rule_fields,
    rule_options,
    secret_policy,
    test_options,
)
from .validation import CLI_OPTIONS, AdminError, not_found

if TYPE_CHECKING:
    from sidecar.db import ObjectKind

    from .access import Admin


class _ConfigurationFailure(click.ClickException):
    exit_code = 2


class _AdminGroup(click.Group):
    """Translates domain errors into click's one-line errors, for every command below it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdminError as exc:
            raise (_ConfigurationFailure if exc.exit_code == 2 else click.ClickException)(str(exc)) from None
        except sqlite3.Error as exc:  # a BEGIN or COMMIT the store did not word
            raise click.ClickException(f"rules.db: {exc}") from None
        except Exception as exc:
            # Loaded only once a command failed: `completion`, a Tab and --help never pay for
            # sidecar.exchange (pydantic, cryptography: ~160 ms).
            from sidecar.exchange import InvalidContent

            if isinstance(exc, InvalidContent | db.StoreError):
                raise click.ClickException(str(exc)) from None
            raise


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
@click.version_option(__version__, prog_name="safous-admin", message="%(prog)s %(version)s")
@root_options
@click.pass_context
def cli(ctx: click.Context, db: Path, actor: str | None, secret_dirs: tuple[str, ...],
        secret_env_prefix: str | None, force: bool) -> None:
    """Manage the rules and policies of the Safous sidecar (Envoy ext_authz) in rules.db.

    A rule is a webhook call plus the criteria its answer must meet; a policy matches requests
    (host, path prefix, methods) and lists the rules that must all pass. A running sidecar picks
    every change up within a second, without a restart. Every change is checked before anything
    is written, and recorded in the audit log with its actor.

    Secret references are checked against the sidecar's settings: give --secret-dir and
    --secret-env-prefix (or their variables) as the sidecar has them.
    """
    from .access import Admin

    ctx.obj = Admin(db, actor_name(actor), secret_policy(secret_dirs, secret_env_prefix), force)


def _switch(admin: Admin, kind: ObjectKind, name: str, enabled: bool) -> None:
    from sidecar.exchange import quoted

    from . import checks, display

    word = "enabled" if enabled else "disabled"
    with admin.write() as conn:
        changed = db.set_enabled(conn, kind, name, enabled)
        if changed is None:
            reader = db.read_rules if kind == "rule" else db.read_policies
            not_found(kind, name, [o.name for o in reader(conn)])
        warnings = checks.switch_warnings(conn, kind, name, admin.secrets) if changed else []
    display.warn(*warnings)
    click.echo(f"{kind} {quoted(name)} {word}" if changed else f"{kind} {quoted(name)} was already {word}")


# ---------------------------------------------------------------------------- rules


@cli.group(cls=_AdminGroup)
def rule() -> None:
    """Manage rules: webhook calls and their criteria."""


@rule.command("add")
@click.argument("name")
@rule_options(edit=False)
@click.pass_obj
def rule_add(admin: Admin, /, name: str, **opts: Any) -> None:
    """Create a rule.

    The rule NAME is a webhook call and the criteria its answer must meet.

    Parameters (%username%, %headers.X%... see `safous-admin params`) are filled in per request
    in the URL, header values and body; an unknown one is refused with a suggestion. Try the
    rule with `safous-admin test NAME` before a policy uses it.
    """
    from sidecar.exchange import check_name, quoted, validate_rule

    from . import checks, display

    options = RuleOptions(**opts)
    check_name("rule", name)
    rule = validate_rule(rule_fields({"name": name}, options, edit=False), names=CLI_OPTIONS,
                         secrets=admin.secrets)
    with admin.write(create=True) as conn:
        if db.read_rules(conn, name):
            raise AdminError(f"rule {quoted(name)} already exists: change it with `rule edit`")
        db.save_rule(conn, rule)
    display.warn(*checks.clear_secret_warnings(rule, options))
    click.echo(f"rule {quoted(name)} created" + ("" if rule.enabled else " (disabled)"))


@rule.command("edit")
@click.argument("name", shell_complete=rule_names)
@rule_options(edit=True)
@click.pass_obj
def rule_edit(admin: Admin, /, name: str, **opts: Any) -> None:
    """Change a rule.

    Options given replace those settings of the rule NAME; the others are kept.

    A list option (--header, --action) replaces the whole list; --clear-headers and
    --clear-actions empty it. A rule stored broken (e.g. edited with plain SQL) can be repaired
    this way.
    """
    from sidecar.exchange import quoted, validate_rule

    from . import checks, display
    from .access import one_rule

    options = RuleOptions(**opts)
    with admin.write() as conn:
        stored = one_rule(conn, name)
        rule = validate_rule(rule_fields(stored.fields, options, edit=True), names=CLI_OPTIONS,
                             secrets=admin.secrets)
        if stored.rule == rule:
            click.echo(f"rule {quoted(name)} unchanged")
            return
        problems = checks.new_policy_problems(conn, rule)
        if problems:
            raise AdminError(problems[0])
        db.save_rule(conn, rule)
    display.warn(*checks.clear_secret_warnings(rule, options))
    click.echo(f"rule {quoted(name)} updated")


@rule.command("show")
@click.argument("name", shell_complete=rule_names)
@click.pass_obj
def rule_show(admin: Admin, name: str) -> None:
    """Show a rule.

    Every setting of the rule NAME (secrets masked), the policies that use it, and what is
    wrong with it, if anything.
    """
    from . import checks, display
    from .access import one_rule

    with admin.read() as conn:
        stored = one_rule(conn, name)
    click.echo(display.rule_details(stored, checks.rule_problem(stored, admin.secrets)))


@rule.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (the export's fields).")
@click.pass_obj
def rule_list(admin: Admin, as_json: bool) -> None:
    """List the rules.

    With the policies that use each, and what is wrong with it, if anything.
    """
    from . import checks, display

    with admin.read() as conn:
        rules = db.read_rules(conn)
    problems = [checks.rule_problem(r, admin.secrets) for r in rules]
    if as_json:
        for stored, problem in zip(rules, problems, strict=True):
            click.echo(display.rule_line(stored, problem))
    else:
        click.echo(display.rule_table(rules, problems) if rules else "no rules")


@rule.command("delete")
@click.argument("name", shell_complete=rule_names)
@click.pass_obj
def rule_delete(admin: Admin, name: str) -> None:
    """Delete a rule.

    A rule that a policy uses is not deleted: remove it from the policy first
    (policy edit NAME --rule ...).
    """
    from sidecar.exchange import quoted

    from .access import one_rule

    with admin.write() as conn:
        stored = one_rule(conn, name)
        if stored.policies:
            which, them = ("policy", "it") if len(stored.policies) == 1 else ("policies", "them")
            raise AdminError(f"rule {quoted(name)} is used by {which} "
                             f"{', '.join(map(quoted, stored.policies))}: remove it from {them} first")
        db.delete_rule(conn, name)
    click.echo(f"rule {quoted(name)} deleted")


@rule.command("enable")
@click.argument("name", shell_complete=rule_names)
@click.pass_obj
def rule_enable(admin: Admin, name: str) -> None:
    """Enable a rule.

    The policies that list the rule NAME run it again.
    """
    _switch(admin, "rule", name, True)


@rule.command("disable")
@click.argument("name", shell_complete=rule_names)
@click.pass_obj
def rule_disable(admin: Admin, name: str) -> None:
    """Disable a rule.

    Every policy skips the rule NAME; a policy left with no enabled rule allows.
    """
    _switch(admin, "rule", name, False)


# ------------------------------------------------------------------------- policies


@cli.group(cls=_AdminGroup)
def policy() -> None:
    """Manage policies: which requests run which rules."""


@policy.command("add")
@click.argument("name")
@policy_options(edit=False)
@click.pass_obj
def policy_add(admin: Admin, /, name: str, **opts: Any) -> None:
    """Create a policy.

    Requests the policy NAME matches (host, path prefix, methods) must pass all its rules.
    A request that no policy matches is denied (the sidecar's default action).
    """
    from sidecar.exchange import check_name, quoted

    from . import checks, display

    check_name("policy", name)
    fields = policy_fields({"name": name}, PolicyOptions(**opts), edit=False)
    with admin.write(create=True) as conn:
        if db.read_policies(conn, name):
            raise AdminError(f"policy {quoted(name)} already exists: change it with `policy edit`")
        policy, warnings = checks.validated_policy(conn, fields)
        display.warn(*warnings)
        db.save_policy(conn, policy)
    click.echo(f"policy {quoted(name)} created" + ("" if policy.enabled else " (disabled)"))


@policy.command("edit")
@click.argument("name", shell_complete=policy_names)
@policy_options(edit=True)
@click.pass_obj
def policy_edit(admin: Admin, /, name: str, **opts: Any) -> None:
    """Change a policy.

    Options given replace those settings of the policy NAME; the others are kept.

    A list option (--host, --method, --rule) replaces the whole list; --clear-hosts,
    --clear-methods and --clear-rules empty it.
    """
    from sidecar.exchange import quoted

    from . import checks, display
    from .access import one_policy

    options = PolicyOptions(**opts)
    with admin.write() as conn:
        stored = one_policy(conn, name)
        policy, warnings = checks.validated_policy(conn, policy_fields(stored.fields, options, edit=True))
        display.warn(*warnings)
        if stored.policy == policy:
            click.echo(f"policy {quoted(name)} unchanged")
            return
        db.save_policy(conn, policy)
    click.echo(f"policy {quoted(name)} updated")


@policy.command("show")
@click.argument("name", shell_complete=policy_names)
@click.pass_obj
def policy_show(admin: Admin, name: str) -> None:
    """Show a policy.

    Every setting of the policy NAME, its rules in order, and what is wrong with it, if
    anything.
    """
    from . import checks, display
    from .access import one_policy

    with admin.read() as conn:
        stored = one_policy(conn, name)
        rules = {r.name: r for r in db.read_rules(conn)}
    click.echo(display.policy_details(stored, checks.policy_problem(stored, rules)))


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (the export's fields).")
@click.pass_obj
def policy_list(admin: Admin, as_json: bool) -> None:
    """List the policies.

    What each matches and the rules it runs.
    """
    from . import checks, display

    with admin.read() as conn:
        policies = db.read_policies(conn)
        rules = {r.name: r for r in db.read_rules(conn)}
    problems = [checks.policy_problem(p, rules) for p in policies]
    if as_json:
        for stored, problem in zip(policies, problems, strict=True):
            click.echo(display.policy_line(stored, problem))
    else:
        click.echo(display.policy_table(policies, problems) if policies else "no policies")


@policy.command("delete")
@click.argument("name", shell_complete=policy_names)
@click.pass_obj
def policy_delete(admin: Admin, name: str) -> None:
    """Delete a policy.

    Its rules are kept. Requests it matched go to the next matching policy, or get the
    default action (deny).
    """
    from sidecar.exchange import quoted

    with admin.write() as conn:
        if not db.delete_policy(conn, name):
            not_found("policy", name, [p.name for p in db.read_policies(conn)])
    click.echo(f"policy {quoted(name)} deleted")


@policy.command("enable")
@click.argument("name", shell_complete=policy_names)
@click.pass_obj
def policy_enable(admin: Admin, name: str) -> None:
    """Enable a policy.

    The policy NAME matches requests again.
    """
    _switch(admin, "policy", name, True)


@policy.command("disable")
@click.argument("name", shell_complete=policy_names)
@click.pass_obj
def policy_disable(admin: Admin, name: str) -> None:
    """Disable a policy.

    The policy NAME matches nothing until it is enabled.
    """
    _switch(admin, "policy", name, False)


# ------------------------------------------------------------------------- params


@cli.command("params")
def params() -> None:
    """List the %parameters% a rule can use.

    Where each value comes from. A rule's URL, header values and body use them between
    percent signs (%username%); %% is a literal %.
    """
    from . import display

    click.echo(display.parameter_table())


# --------------------------------------------------------------------------- test


@cli.command("test")
@click.argument("rule_name", metavar="RULE", shell_complete=rule_names)
@test_options
@click.pass_obj
def test(admin: Admin, rule_name: str, given: list[tuple[str, str]], headers: list[tuple[str, str]]) -> None:
    """Dry-run a rule against given parameters.

    Runs RULE once, as the sidecar would: calls its webhook and judges the answer.

    Prints the request as sent (secrets masked), the response, each response action's verdict
    and the decision. Exit status: 0 the criteria are met, 1 they are not, 2 a usage or
    configuration error (unknown rule or parameter, broken rule, unset env: secret). Works on a
    disabled rule; writes nothing. Secrets given as env:NAME or file:PATH are read here, so set
    them as the sidecar has them, within --secret-dir and --secret-env-prefix as the sidecar
    has those. SAFOUS_WEBHOOK_CA_BUNDLE is honoured as by the sidecar.
    """
    from .dryrun import parameter_lookup, report, run_stored  # aiohttp: loaded only for this command

    lookup = parameter_lookup(given, headers)
    result = run_stored(admin, rule_name, lookup)
    click.echo(report(result, lookup))
    if not result.met:
        click.get_current_context().exit(1)


# ---------------------------------------------------------------------- export/import


@cli.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--with-secrets", is_flag=True,
              help="Write secrets stored in clear as they are (the file is then created readable by "
              "you only). Without it they are masked, and importing into the same rules.db keeps them.")
@click.pass_obj
def export(admin: Admin, file: str | None, with_secrets: bool) -> None:
    """Export every rule and policy as JSON.

    Writes one JSON document to FILE (default: standard output).

    Secrets are masked unless --with-secrets; references (env:NAME, file:PATH) are written as
    they are. `safous-admin import FILE` reads it back.
    """
    import json

    from sidecar.exchange import export_document

    from . import checks, display
    from .exchange import write_export

    with admin.read() as conn:
        rules = db.read_rules(conn)
        policies = db.read_policies(conn)
    display.warn(*checks.export_warnings(rules, policies))
    text = json.dumps(export_document(rules, policies, with_secrets=with_secrets),
                      indent=2, ensure_ascii=False) + "\n"
    if file is None or file == "-":
        click.echo(text, nl=False)
        return
    write_export(file, text, with_secrets=with_secrets)
    click.echo(f"exported {display.counted(len(rules), 'rule')} and "
               f"{display.counted(len(policies), 'policy')} to {file}")


@cli.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--replace", is_flag=True,
              help="Also delete the rules and policies that FILE does not hold.")
@click.pass_obj
def import_(admin: Admin, file: IO[str], replace: bool) -> None:
    """Import rules and policies from an export.

    Creates and updates rules and policies from FILE (- for standard input).

    Everything is checked first and applied in one transaction: all of it, or nothing. Rules and
    policies equal to the stored ones are left alone, so importing a file twice changes nothing.
    A masked secret keeps the one stored for that rule. Without --replace, rules and policies
    that FILE does not hold are kept.
    """
    from sidecar.exchange import InvalidContent, apply_import, plan_import, quoted

    from .exchange import read_document

    source, document = read_document(file)
    with admin.write(create=True) as conn:
        try:
            plan = plan_import(document, db.read_rules(conn), db.read_policies(conn), replace=replace,
                               secrets=admin.secrets)
        except InvalidContent as exc:
            raise InvalidContent(f"{source}: {exc}") from None
        apply_import(conn, plan)
    for verb, kind, name in plan.changes:
        click.echo(f"{verb} {kind} {quoted(name)}")
    click.echo(f"imported {source}: {plan.count('created')} created, {plan.count('updated')} updated, "
               f"{plan.count('deleted')} deleted, {plan.unchanged} unchanged")


# ------------------------------------------------------------------------------ ui


@cli.command("ui")
@click.option("--listen", default="127.0.0.1:8001", show_default=True, metavar="HOST:PORT",
              help="Where the portal listens (port 0: any free port). It has no login: keep it on loopback.")
@click.option("--insecure-listen", is_flag=True,
              help="Allow a --listen address the network reaches (refused otherwise: no login, no TLS).")
@click.pass_obj
def ui(admin: Admin, listen: str, insecure_listen: bool) -> None:
    """Browse rules.db in a web browser, read-only.

    The admins' portal (Datasette): the activity log (who was denied and why, with facets, a
    time range, search on the reason and charts), the audit log (who changed what, before and
    after), the rules and policies as this script shows them, and canned queries. Secrets
    never reach it, and it never writes rules.db: a running sidecar writes on meanwhile.
    Ctrl-C stops it.
    """
    from .portal import serve  # datasette: loaded only for this command

    serve(admin, listen, insecure_listen=insecure_listen)


cli.add_command(backup)
cli.add_command(restore)
cli.add_command(bundle)
cli.add_command(collect)
cli.add_command(logs)
cli.add_command(explain)
cli.add_command(completion)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``safous-admin`` console script. Exits with the command's status."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="safous-admin")

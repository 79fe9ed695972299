"""``safous-admin``: what an admin types and sees, exactly, with the exit status."""

from __future__ import annotations

import getpass
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sidecar.admin import cli
from sidecar.db import ActivityRecord, connect, insert_activity, parse_iso_time, read_policies
from sidecar.rules.model import ActionType, ResponseAction
from sidecar.rules.secrets import MASK
from tests.admin_cli import admin, count, ok, refused, stored_rules

_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TIME = "YYYY-MM-DDTHH:MM:SS.mmmZ"


def times(text: str) -> str:
    """``text`` with every log time replaced by ``TIME`` (same width, so columns still align)."""
    return _TIME.sub(TIME, text)



# ------------------------------------------------------------------------------ help


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize("path", [p for p, _ in _commands(cli)], ids=" ".join)
def test_every_command_says_what_it_does(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: safous-admin {' '.join(path)} ")
    command = cli
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    summary = command.help.split("\n")[0]
    assert summary and summary in result.stdout


def test_the_top_help_shows_a_whole_workflow() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for line in ("safous-admin rule add posture --method POST", "safous-admin test posture --param username=alice",
                 "safous-admin policy add app --host app.example.com --rule posture",
                 "safous-admin logs activity --denied", "safous-admin logs audit", "SAFOUS_DB", "SAFOUS_ACTOR"):
        assert line in result.stdout


# The command line is a contract (docs/admins/admin-script.md): scripts depend on these names.
CONTRACT = {
    (): ["--db", "--actor"],
    ("rule", "add"): ["--method", "--url", "--header", "--body", "--body-file", "--auth", "--username",
                      "--password", "--token-url", "--client-id", "--client-secret", "--verify", "--action",
                      "--timeout-ms", "--cache-ttl", "--disabled"],
    ("rule", "edit"): ["--method", "--url", "--header", "--body", "--body-file", "--auth", "--username",
                       "--password", "--token-url", "--client-id", "--client-secret", "--verify", "--action",
                       "--timeout-ms", "--cache-ttl", "--disabled", "--clear-headers", "--clear-actions"],
    ("rule", "show"): [], ("rule", "list"): ["--json"], ("rule", "delete"): [], ("rule", "enable"): [],
    ("rule", "disable"): [],
    ("policy", "add"): ["--host", "--path-prefix", "--method", "--rule", "--integration", "--priority"],
    ("policy", "edit"): ["--host", "--path-prefix", "--method", "--rule", "--integration", "--priority"],
    ("policy", "show"): [], ("policy", "list"): ["--json"], ("policy", "delete"): [],
    ("logs", "audit"): ["--limit", "--since", "--json"],
    ("logs", "activity"): ["--denied", "--user", "--limit", "--since", "--json"],
    ("params",): [], ("test",): ["--param", "--header"], ("export",): [], ("import",): [],
}


@pytest.mark.parametrize("path", list(CONTRACT), ids=lambda p: " ".join(p) or "safous-admin")
def test_the_command_line_contract(path: tuple[str, ...]) -> None:
    command: click.Command = cli
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    options = {o for param in command.params for o in param.opts + param.secondary_opts}
    assert set(CONTRACT[path]) <= options


# ----------------------------------------------------------------------------- rules

POSTURE = ["rule", "add", "posture", "--method", "post", "--url", "https://api.example.com/check?u=%username%",
           "--header", "X-Device=%device_id%", "--header", "Authorization=Bearer static-token",
           "--body", '{"user": "%username%"}', "--auth", "basic", "--username", "svc",
           "--password", "env:SAFOUS_SECRET_POSTURE_PW", "--verify", "jsonp",
           "--action", "string:data.status:active",
           "--action", "regex:data.role:^(admin|ops):[0-9]+$", "--action", "store:data.tier:tier",
           "--timeout-ms", "750", "--cache-ttl", "30"]


def test_rule_add_then_show(db: Path) -> None:
    ok(admin(db, *POSTURE), 'rule "posture" created\n')
    ok(admin(db, "rule", "show", "posture"), f"""\
rule "posture"
  enabled    yes
  method     POST
  url        https://api.example.com/check?u=%username%
  headers    X-Device=%device_id%
             Authorization={MASK}
  body       {{"user": "%username%"}}
  auth       basic
  username   svc
  password   env:SAFOUS_SECRET_POSTURE_PW
  verify     jsonp
  actions    string:data.status:active
             regex:data.role:^(admin|ops):[0-9]+$
             store:data.tier:tier
  timeout    750 ms
  cache ttl  30 s
  policies   none
""")
    rule = stored_rules(db)["posture"]
    # Only the first two colons of --action separate: the regex keeps its own.
    assert rule.actions[1] == ResponseAction(type=ActionType.REGEX, key="data.role", value="^(admin|ops):[0-9]+$")
    assert rule.headers == (("X-Device", "%device_id%"), ("Authorization", "Bearer static-token"))


def test_a_clear_secret_is_stored_with_a_warning_and_shown_masked(db: Path) -> None:
    result = admin(db, "rule", "add", "r", "--url", "http://x/", "--auth", "oauth", "--token-url",
                   "https://idp/token", "--client-id", "cid", "--client-secret", "s3cret")
    assert (result.exit_code, result.stdout) == (0, 'rule "r" created\n')
    assert result.stderr == ("warning: --client-secret is stored in clear in rules.db; "
                             "env:NAME or file:PATH keeps it out\n")
    shown = admin(db, "rule", "show", "r").stdout
    assert f"client secret  {MASK}\n" in shown and "s3cret" not in shown
    assert "s3cret" not in admin(db, "rule", "list", "--json").stdout
    assert stored_rules(db)["r"].client_secret == "s3cret"


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "https://api.example.com/?u=%user_name%"],
     'rule "r": url: unknown parameter %user_name% — did you mean %username%? (at character 28)'),
    (["--url", "http://x/", "--header", "X-Device=%devce_id%"],
     'rule "r": header X-Device: unknown parameter %devce_id% — did you mean %device_id%? (at character 1)'),
    (["--url", "http://x/", "--method", "POST", "--body", '{"u": %username%}'],
     'rule "r": JSON body: parameter %username% at character 7 must be inside a JSON string'),
    (["--url", "ftp://x/"], "rule \"r\": --url: 'ftp://x/' is not an http:// or https:// URL"),
    (["--url", "http://x/", "--body", "{}"], 'rule "r": a body is only allowed with POST'),
    (["--url", "http://x/", "--action", "regex:a.b:("],
     "rule \"r\": --action #1: regex '(' does not compile: missing ): ( (RE2 syntax, matched in linear time)"),
    (["--url", "http://x/", "--action", "regex:a.b:^(\\w+)-\\1$"],
     ("rule \"r\": --action #1: regex '^(\\\\w+)-\\\\1$' is refused: backreferences (\\1…\\9) are not supported "
      "(RE2 syntax, matched in linear time)")),
    (["--url", "http://x/", "--action", "regex:a.b:^(?!admin)"],
     ("rule \"r\": --action #1: regex '^(?!admin)' is refused: negative lookahead (?!…) is not supported "
      "(RE2 syntax, matched in linear time)")),
    (["--url", "http://x/", "--action", "string:a:b", "--action", "equals:a:b"],
     "rule \"r\": --action #2 type: Input should be 'string', 'regex' or 'store'"),
    (["--url", "http://x/", "--action", "store:a:bad name"],
     "rule \"r\": --action #1: store name 'bad name' must be 1-64 letters, digits, '_' or '-'"),
    (["--url", "http://x/", "--auth", "basic", "--username", "u"],
     'rule "r": basic authentication needs a username and a password'),
    (["--url", "http://x/", "--auth", "oauth", "--token-url", "https://idp/t", "--client-id", "c"],
     'rule "r": oauth authentication needs a token URL, a client ID and a client secret'),
    (["--url", "http://x/", "--auth", "basic", "--username", "u", "--password", "env:1X"],
     ("rule \"r\": --password: secret env:1X: env:NAME needs an environment variable name "
      "(letters, digits and _, not first a digit)")),
    (["--url", "http://x/", "--auth", "basic", "--username", "u", "--password", "file:"],
     'rule "r": --password: secret file:: the file path is missing'),
    (["--url", "http://x/", "--auth", "basic", "--username", "u", "--password", "ENV:PW"],
     ("rule \"r\": --password: 'ENV:' looks like a secret reference, but references are written "
      "env:NAME or file:PATH, in lower case")),
    (["--url", "http://x/", "--timeout-ms", "0"], 'rule "r": --timeout-ms: Input should be greater than or equal to 1'),
    (["--url", "http://x/", "--header", "Bad Name=1"],
     "rule \"r\": --header: header name 'Bad Name' is not a valid HTTP header name"),
    (["--url", "http://svc:hunter2@x/check"],
     ("rule \"r\": --url: the URL holds a user name or password (before '@'), which would be stored and shown "
      "in clear: give the URL without it and use --auth basic with --username and --password env:NAME "
      "(or file:PATH)")),
    (["--url", "http://x/", "--auth", "oauth", "--token-url", "https://cid:hunter2@idp/t", "--client-id", "cid",
      "--client-secret", "env:SAFOUS_SECRET_CS"],
     ("rule \"r\": --token-url: the URL holds a user name or password (before '@'), which would be stored and "
      "shown in clear: give the URL without it and use --auth oauth with --client-id and --client-secret "
      "env:NAME (or file:PATH)")),
])
def test_an_invalid_rule_is_refused_in_one_line_and_nothing_is_written(db: Path, args: list[str], message: str) -> None:
    refused(admin(db, "rule", "add", "r", *args), message)
    assert count(db, "rules") == count(db, "audit_log") == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "http://x/", "--action", "string:key"],
     "Invalid value for '--action': 'string:key' is not TYPE:KEY:VALUE (string, regex or store)"),
    (["--url", "http://x/", "--header", "X-A"], "Invalid value for '--header': 'X-A' is not KEY=VALUE"),
    (["--url", "http://x/", "--password", "p"], "--username and --password go with --auth basic"),
    (["--url", "http://x/", "--auth", "basic", "--client-id", "c"],
     "--token-url, --client-id and --client-secret go with --auth oauth"),
    (["--url", "http://x/", "--method", "PUT"], "Invalid value for '--method': 'PUT' is not one of 'GET', 'POST'."),
    (["--method", "GET"], "Missing option '--url'."),
])
def test_a_usage_error_exits_2(db: Path, args: list[str], message: str) -> None:
    refused(admin(db, "rule", "add", "r", *args), message, exit_code=2)
    assert count(db, "rules") == 0


def test_a_rule_name_is_one_line(db: Path) -> None:
    refused(admin(db, "rule", "add", "bad\x1b[31mname", "--url", "http://x/"),
            'rule name "bad\\u001b[31mname" holds control characters')


def test_rule_add_refuses_an_existing_name(db: Path) -> None:
    ok(admin(db, "rule", "add", "r", "--url", "http://x/"), 'rule "r" created\n')
    refused(admin(db, "rule", "add", "r", "--url", "http://y/"), 'rule "r" already exists: change it with `rule edit`')


def test_rule_edit_replaces_what_is_given_and_keeps_the_rest(db: Path) -> None:
    ok(admin(db, "rule", "add", "r", "--method", "POST", "--url", "http://x/", "--body", "{}",
             "--header", "A=1", "--header", "B=2", "--action", "string:a:1", "--action", "string:b:2",
             "--auth", "basic", "--username", "u", "--password", "env:SAFOUS_SECRET_PW"), 'rule "r" created\n')
    ok(admin(db, "rule", "edit", "r", "--header", "C=3", "--action", "store:c:c", "--timeout-ms", "300"),
       'rule "r" updated\n')
    rule = stored_rules(db)["r"]
    assert (rule.headers, rule.actions, rule.timeout_ms, rule.body, rule.password) == (
        (("C", "3"),), (ResponseAction(type=ActionType.STORE, key="c", value="c"),), 300, "{}",
        "env:SAFOUS_SECRET_PW")
    ok(admin(db, "rule", "edit", "r", "--clear-headers", "--clear-actions"), 'rule "r" updated\n')
    assert (stored_rules(db)["r"].headers, stored_rules(db)["r"].actions) == ((), ())
    # Switching the auth type drops the other type's settings.
    ok(admin(db, "rule", "edit", "r", "--auth", "oauth", "--token-url", "https://idp/t", "--client-id", "c",
             "--client-secret", "file:/var/run/secrets/safous/c"), 'rule "r" updated\n')
    rule = stored_rules(db)["r"]
    assert (rule.auth, rule.username, rule.password, rule.client_secret) == (
        "oauth", None, None, "file:/var/run/secrets/safous/c")
    refused(admin(db, "rule", "edit", "r", "--method", "GET"),
            "a body is only allowed with POST: add --clear-body to remove it", exit_code=2)
    ok(admin(db, "rule", "edit", "r", "--method", "GET", "--clear-body"), 'rule "r" updated\n')
    refused(admin(db, "rule", "edit", "r", "--header", "A=1", "--clear-headers"),
            "give --header or --clear-headers, not both", exit_code=2)


def test_a_body_from_a_file_or_standard_input(db: Path, tmp_path: Path) -> None:
    template = '{\n  "user": "%username%",\n  "device": "%device_id%"\n}\n'
    ok(admin(db, "rule", "add", "r", "--method", "POST", "--url", "http://x/", "--body-file", "-", input=template),
       'rule "r" created\n')
    (tmp_path / "body.json").write_text('{"user": "%username%"}')
    ok(admin(db, "rule", "add", "s", "--method", "POST", "--url", "http://x/", "--body-file",
             str(tmp_path / "body.json")), 'rule "s" created\n')
    assert (stored_rules(db)["r"].body, stored_rules(db)["s"].body) == (template, '{"user": "%username%"}')
    assert ('  body       {\n'
            '               "user": "%username%",\n'
            '               "device": "%device_id%"\n'
            '             }\n'
            '  auth       none\n') in admin(db, "rule", "show", "r").stdout
    refused(admin(db, "rule", "edit", "r", "--body", "{}", "--clear-body"), "give one of --body, --clear-body",
            exit_code=2)


def test_an_edit_that_changes_nothing_writes_nothing(db: Path) -> None:
    admin(db, "rule", "add", "r", "--url", "http://x/", "--timeout-ms", "300")
    audited = count(db, "audit_log")
    ok(admin(db, "rule", "edit", "r", "--timeout-ms", "300"), 'rule "r" unchanged\n')
    assert count(db, "audit_log") == audited


def test_an_unknown_name_gets_a_suggestion(db: Path) -> None:
    admin(db, "rule", "add", "posture", "--url", "http://x/")
    refused(admin(db, "rule", "show", "postur"), 'rule "postur" does not exist — did you mean "posture"?')
    refused(admin(db, "rule", "edit", "postur", "--url", "http://y/"),
            'rule "postur" does not exist — did you mean "posture"?')
    refused(admin(db, "rule", "delete", "nothing-like-it"), 'rule "nothing-like-it" does not exist')
    refused(admin(db, "policy", "show", "web"), 'policy "web" does not exist')


def test_rule_list_shows_problems_of_rows_written_with_sql(db: Path) -> None:
    admin(db, "rule", "add", "good", "--url", "http://x/?u=%username%")
    admin(db, "rule", "add", "off", "--url", "http://y/", "--disabled")
    conn = sqlite3.connect(db)
    conn.execute("""INSERT INTO rules (name, url, actions) VALUES ('bad-regex', 'http://z/',
                    '[{"type": "regex", "key": "a", "value": "("}]')""")
    conn.execute("INSERT INTO rules (name, url) VALUES ('bad-param', 'http://z/%user_name%')")
    conn.commit()
    conn.close()
    admin(db, "policy", "add", "web", "--rule", "good", "--rule", "off")
    ok(admin(db, "rule", "list"), """\
NAME       ENABLED  METHOD  URL                     POLICIES  PROBLEM
bad-param  yes      GET     http://z/%user_name%    none      url: unknown parameter %user_name% — did you mean %username%? (at character 10)
bad-regex  yes      GET     http://z/               none      actions.0: regex '(' does not compile: missing ): ( (RE2 syntax, matched in linear time)
good       yes      GET     http://x/?u=%username%  web
off        no       GET     http://y/               web
""")  # noqa: E501
    lines = admin(db, "rule", "list", "--json").stdout.splitlines()
    assert json.loads(lines[2]) == {
        "name": "good", "enabled": True, "method": "GET", "url": "http://x/?u=%username%", "headers": [],
        "body": None, "auth": "none", "username": None, "password": None, "token_url": None,
        "client_id": None, "client_secret": None, "verification": "json", "actions": [],
        "timeout_ms": 1000, "cache_ttl": 0.0, "policies": ["web"], "problem": None}
    # A broken rule can be repaired with the admin script.
    ok(admin(db, "rule", "edit", "bad-regex", "--action", "regex:a:^ok$"), 'rule "bad-regex" updated\n')
    assert stored_rules(db)["bad-regex"] is not None


def test_headers_written_with_sql_in_any_shape_are_shown_masked(db: Path) -> None:
    """The admin script writes headers as [name, value] pairs; plain SQL may write anything.
    Values under Authorization and Proxy-Authorization stay masked in every shape, and a shape
    that names nothing is masked whole."""
    conn = sqlite3.connect(db)
    for name, headers in (("obj", {"Authorization": "Bearer obj-TOKEN", "X-Api": "visible"}),
                          ("pairs", [["proxy-authorization", "Basic", "pairs-TOKEN"], ["X-Api", "visible"]])):
        conn.execute("INSERT INTO rules (name, url, headers) VALUES (?, 'http://x/', ?)", (name, json.dumps(headers)))
    conn.execute("INSERT INTO rules (name, url, headers) VALUES ('text', 'http://x/', 'Authorization: text-TOKEN')")
    conn.commit()
    conn.close()
    shown = {name: admin(db, "rule", "show", name).stdout for name in ("obj", "pairs", "text")}
    assert f"  headers    Authorization={MASK}\n             X-Api=visible\n" in shown["obj"]
    assert f"  headers    proxy-authorization={MASK}\n             X-Api=visible\n" in shown["pairs"]
    assert f"  headers    {MASK}\n" in shown["text"]
    listed = [json.loads(line) for line in admin(db, "rule", "list", "--json").stdout.splitlines()]
    exported = json.loads(admin(db, "export").stdout)["rules"]
    for document in (listed, exported):
        assert [r["headers"] for r in document] == [
            {"Authorization": MASK, "X-Api": "visible"}, [["proxy-authorization", MASK], ["X-Api", "visible"]], MASK]
    audited = admin(db, "logs", "audit", "--json").stdout
    assert "-TOKEN" not in " ".join([*shown.values(), json.dumps(listed), json.dumps(exported), audited])
    # Asked for, the secrets are exported as stored.
    assert "obj-TOKEN" in admin(db, "export", "--with-secrets").stdout


def test_no_rules_and_no_policies(db: Path) -> None:
    ok(admin(db, "rule", "list"), "no rules\n")
    ok(admin(db, "policy", "list"), "no policies\n")
    ok(admin(db, "rule", "list", "--json"), "")


def test_rule_enable_and_disable(db: Path) -> None:
    admin(db, "rule", "add", "r", "--url", "http://x/", "--disabled")
    ok(admin(db, "rule", "enable", "r"), 'rule "r" enabled\n')
    ok(admin(db, "rule", "enable", "r"), 'rule "r" was already enabled\n')
    ok(admin(db, "rule", "disable", "r"), 'rule "r" disabled\n')
    assert stored_rules(db)["r"].enabled is False
    refused(admin(db, "rule", "enable", "q"), 'rule "q" does not exist')


def test_disabling_a_rule_that_stores_a_value_warns_for_the_policies_it_breaks(db: Path) -> None:
    admin(db, "rule", "add", "login", "--url", "http://x/", "--action", "store:token:token")
    admin(db, "rule", "add", "use", "--url", "http://x/", "--header", "X-Token=%stored.token%")
    admin(db, "policy", "add", "web", "--rule", "login", "--rule", "use")
    result = admin(db, "rule", "disable", "login")
    assert (result.exit_code, result.stdout) == (0, 'rule "login" disabled\n')
    assert result.stderr == ('warning: rule "use" uses %stored.token%, which no earlier enabled rule of '
                             'policy "web" stores\n')


def test_a_rule_used_by_policies_is_not_deleted(db: Path) -> None:
    admin(db, "rule", "add", "r", "--url", "http://x/")
    admin(db, "policy", "add", "web", "--rule", "r")
    admin(db, "policy", "add", "api", "--rule", "r")
    refused(admin(db, "rule", "delete", "r"),
            'rule "r" is used by policies "api", "web": remove it from them first')
    admin(db, "policy", "delete", "api")
    refused(admin(db, "rule", "delete", "r"), 'rule "r" is used by policy "web": remove it from it first')
    admin(db, "policy", "edit", "web", "--clear-rules")
    ok(admin(db, "rule", "delete", "r"), 'rule "r" deleted\n')
    assert count(db, "rules") == 0


# -------------------------------------------------------------------------- policies


def test_policy_add_show_list(db: Path) -> None:
    admin(db, "rule", "add", "posture", "--url", "http://x/")
    admin(db, "rule", "add", "device", "--url", "http://y/")
    ok(admin(db, "policy", "add", "web", "--host", "App.Example.com", "--host", "*.example.com",
             "--path-prefix", "/app", "--method", "get", "--method", "POST", "--rule", "posture",
             "--rule", "device", "--priority", "10"), 'policy "web" created\n')
    ok(admin(db, "policy", "add", "open", "--integration", "off", "--disabled"), 'policy "open" created (disabled)\n')
    ok(admin(db, "policy", "show", "web"), """\
policy "web"
  enabled      yes
  hosts        app.example.com, *.example.com
  path prefix  /app
  methods      GET, POST
  integration  on
  priority     10
  ports        any
  sni          any
  mode         enforce
  rules        posture, device
""")
    # A TCP policy in audit mode: not a catch-all (PORTS, SNI), and allowing whatever its rule says (MODE).
    ok(admin(db, "policy", "add", "db", "--port", "5432", "--port", "6432", "--sni", "db.example.com",
             "--rule", "posture", "--mode", "audit"), 'policy "db" created\n')
    ok(admin(db, "policy", "list"), """\
NAME  ENABLED  MODE     PRIORITY  HOSTS                           PATH  METHODS    PORTS       SNI             INTEGRATION  RULES
db    yes      audit    100       any                             /     any        5432, 6432  db.example.com  on           posture
open  no       enforce  100       any                             /     any        any         any             off          none
web   yes      enforce  10        app.example.com, *.example.com  /app  GET, POST  any         any             on           posture, device
""")  # noqa: E501
    assert json.loads(admin(db, "policy", "list", "--json").stdout.splitlines()[1]) == {
        "name": "open", "enabled": False, "hosts": [], "path_prefix": "/", "methods": [],
        "integration": False, "priority": 100, "ports": [], "sni": [], "mode": "enforce", "rules": [],
        "problem": None}


def test_a_policy_naming_an_unknown_rule_is_refused(db: Path) -> None:
    admin(db, "rule", "add", "posture", "--url", "http://x/")
    audited = count(db, "audit_log")
    refused(admin(db, "policy", "add", "web", "--rule", "postur"),
            'policy "web": rule "postur" does not exist — did you mean "posture"?')
    refused(admin(db, "policy", "add", "web", "--host", "bad host"),
            "policy \"web\": --host: host 'bad host' must be a name (app.example.com), a wildcard "
            "(*.example.com) or an IP literal, without port")
    refused(admin(db, "policy", "add", "web", "--rule", "posture", "--rule", "posture"),
            'policy "web": --rule: a rule may appear only once in a policy')
    assert (count(db, "policies"), count(db, "audit_log")) == (0, audited)


def test_rules_that_store_and_use_values_must_be_in_order(db: Path) -> None:
    admin(db, "rule", "add", "login", "--url", "http://x/", "--action", "store:data.token:token")
    admin(db, "rule", "add", "use", "--url", "http://x/%stored.token%")
    refused(admin(db, "policy", "add", "web", "--rule", "use", "--rule", "login"),
            'rule "use" uses %stored.token%, which no earlier enabled rule of policy "web" stores')
    ok(admin(db, "policy", "add", "web", "--rule", "login", "--rule", "use"), 'policy "web" created\n')
    # Editing the rule that stores the value must not break the policy either.
    refused(admin(db, "rule", "edit", "login", "--clear-actions"),
            'rule "use" uses %stored.token%, which no earlier enabled rule of policy "web" stores')
    # A problem made with plain SQL is reported, and does not block unrelated edits.
    conn = sqlite3.connect(db)
    conn.execute("UPDATE policy_rules SET position = 2 - position")
    conn.commit()
    conn.close()
    assert admin(db, "policy", "show", "web").stdout.endswith(
        '  problem      rule "use" uses %stored.token%, which no earlier enabled rule of policy "web" stores\n')
    ok(admin(db, "rule", "edit", "login", "--timeout-ms", "200"), 'rule "login" updated\n')


def test_policy_edit_enable_disable_delete(db: Path) -> None:
    admin(db, "rule", "add", "a", "--url", "http://x/")
    admin(db, "rule", "add", "b", "--url", "http://x/")
    admin(db, "policy", "add", "web", "--host", "app.example.com", "--method", "GET", "--rule", "a")
    ok(admin(db, "policy", "edit", "web", "--rule", "b", "--rule", "a", "--clear-methods", "--integration", "off"),
       'policy "web" updated\n')
    ok(admin(db, "policy", "edit", "web", "--integration", "off"), 'policy "web" unchanged\n')
    ok(admin(db, "policy", "disable", "web"), 'policy "web" disabled\n')
    ok(admin(db, "policy", "enable", "web"), 'policy "web" enabled\n')
    assert "  methods      any\n" in admin(db, "policy", "show", "web").stdout
    assert "  rules        b, a\n" in admin(db, "policy", "show", "web").stdout
    ok(admin(db, "policy", "delete", "web"), 'policy "web" deleted\n')
    refused(admin(db, "policy", "delete", "web"), 'policy "web" does not exist')
    assert count(db, "policies") == count(db, "policy_rules") == 0


# ------------------------------------------------------------------------------ logs


def test_logs_audit_shows_who_changed_what(db: Path) -> None:
    admin(db, "rule", "add", "r", "--url", "http://x/")
    admin(db, "rule", "edit", "r", "--url", "http://y/", "--timeout-ms", "500", actor="bob")
    conn = sqlite3.connect(db)
    conn.execute("UPDATE rules SET cache_ttl = 5")
    conn.commit()
    conn.close()
    admin(db, "rule", "disable", "r")
    admin(db, "policy", "add", "web", "--rule", "r")
    admin(db, "policy", "delete", "web")
    result = admin(db, "logs", "audit")
    assert result.exit_code == 0
    assert times(result.stdout) == f"""\
AT{' ' * 24}ACTOR  ACTION   OBJECT        CHANGES
{TIME}  alice  delete   policy "web"
{TIME}  alice  create   policy "web"
{TIME}  alice  disable  rule "r"
{TIME}  sql    edit     rule "r"      cache_ttl
{TIME}  bob    edit     rule "r"      url, timeout_ms
{TIME}  alice  create   rule "r"
"""
    assert times(admin(db, "logs", "audit", "--limit", "2").stdout).count(TIME) == 2
    first, *_ = admin(db, "logs", "audit", "--json", "--limit", "1").stdout.splitlines()
    entry = json.loads(first)
    assert (entry["actor"], entry["action"], entry["object_type"], entry["object_name"], entry["after"]) == (
        "alice", "delete", "policy", "web", None)
    assert entry["before"]["rules"] == ["r"]
    ok(admin(db, "logs", "audit", "--since", "2999-01-01"), "no audit log entries\n")


def test_the_actor_defaults_to_safous_actor_then_the_os_user(db: Path) -> None:
    admin(db, "rule", "add", "a", "--url", "http://x/", actor="", env={"SAFOUS_ACTOR": "ci-bot"})
    admin(db, "rule", "add", "b", "--url", "http://x/", actor="")
    actors = [json.loads(line)["actor"] for line in admin(db, "logs", "audit", "--json").stdout.splitlines()]
    assert actors == [getpass.getuser(), "ci-bot"]
    refused(CliRunner().invoke(cli, ["--db", str(db), "--actor", " ", "rule", "list"]),
            "Invalid value for --actor: must be a non-empty name without control characters", exit_code=2)


ACTIVITY = [
    ActivityRecord(at=parse_iso_time("2026-03-01T10:00:00.000Z"), request_id="req-1", username="alice",
                   source_ip="203.0.113.7", host="app.example.com", path="/app/x", method="GET", policy="web",
                   allowed=True, code="rules_passed", status='policy "web": all 1 rules met', latency_ms=3.2),
    ActivityRecord(at=parse_iso_time("2026-03-01T10:05:00.000Z"), request_id="req-2", username="bob",
                   source_ip="203.0.113.8", host="app.example.com", path="/app/y", method="POST", policy="web",
                   allowed=False, code="value_mismatch",
                   status='rule "posture": data.status is "inactive", expected "active"', latency_ms=8.1,
                   policy_source="route"),
    ActivityRecord(at=parse_iso_time("2026-03-01T10:09:00.000Z"), request_id="req-3", username="",
                   source_ip="198.51.100.1", host="other.example.com", path="/\x1b[2J", method="GET", policy=None,
                   allowed=False, code="no_matching_policy", status="no policy matches this request",
                   latency_ms=0.4),
]


def test_logs_activity(db: Path) -> None:
    insert_activity(connect(db), ACTIVITY)
    ok(admin(db, "logs", "activity"), """\
AT                        REQUEST ID  USER   SOURCE IP     METHOD  HOST               PATH      POLICY  POLICY SOURCE  DECISION  CODE                STATUS
2026-03-01T10:09:00.000Z  req-3       -      198.51.100.1  GET     other.example.com  /\\x1b[2J  -       match          deny      no_matching_policy  no policy matches this request
2026-03-01T10:05:00.000Z  req-2       bob    203.0.113.8   POST    app.example.com    /app/y    web     route          deny      value_mismatch      rule "posture": data.status is "inactive", expected "active"
2026-03-01T10:00:00.000Z  req-1       alice  203.0.113.7   GET     app.example.com    /app/x    web     match          allow     rules_passed        policy "web": all 1 rules met
""")  # noqa: E501
    # --since 11:00+01:00 is 10:00 UTC: the first request is at 10:00:00, the limit keeps the newest.
    ok(admin(db, "logs", "activity", "--denied", "--since", "2026-03-01T11:00+01:00", "--limit", "1"), """\
AT                        REQUEST ID  USER  SOURCE IP     METHOD  HOST               PATH      POLICY  POLICY SOURCE  CODE                STATUS
2026-03-01T10:09:00.000Z  req-3       -     198.51.100.1  GET     other.example.com  /\\x1b[2J  -       match          no_matching_policy  no policy matches this request
""")  # noqa: E501
    ok(admin(db, "logs", "activity", "--denied", "--user", "bob"), """\
AT                        REQUEST ID  USER  SOURCE IP    METHOD  HOST             PATH    POLICY  POLICY SOURCE  CODE            STATUS
2026-03-01T10:05:00.000Z  req-2       bob   203.0.113.8  POST    app.example.com  /app/y  web     route          value_mismatch  rule "posture": data.status is "inactive", expected "active"
""")  # noqa: E501
    assert times(admin(db, "logs", "activity", "--since", "2026-03-01T10:05:00Z").stdout).count("req-") == 2
    lines = admin(db, "logs", "activity", "--json", "--user", "alice").stdout.splitlines()
    assert [json.loads(line) for line in lines] == [{
        "at": "2026-03-01T10:00:00.000Z", "request_id": "req-1", "username": "alice", "source_ip": "203.0.113.7",
        "method": "GET", "host": "app.example.com", "path": "/app/x", "policy": "web", "allowed": True,
        "audit_deny": False, "code": "rules_passed", "status": 'policy "web": all 1 rules met', "latency_ms": 3.2,
        "policy_source": "match", "trace": False}]
    ok(admin(db, "logs", "activity", "--user", "carol"), "no activity log entries\n")
    refused(admin(db, "logs", "activity", "--since", "last week"),
            "Invalid value for '--since': 'last week' is not an ISO 8601 date or time "
            "(2026-01-31, 2026-01-31T09:00, 2026-01-31T09:00:00+01:00)", exit_code=2)


def test_params_lists_every_parameter_and_its_source() -> None:
    result = CliRunner().invoke(cli, ["params"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0
    assert lines[0] == "PARAMETER                    SOURCE"
    assert lines[1] == ("%username%                   JWT claim (default sub) if the request has one, "
                        "else identity header (default x-safous-username); for a TCP connection, the "
                        "client certificate's CN (--connection-username)")
    assert [line.split()[0] for line in lines[1:]] == [
        "%username%", "%internal_addr%", "%user_agent%", "%remote_ip%", "%cert_thumbprint%",
        "%cert_thumbprint_upper%", "%cert_thumbprint_256%", "%cert_thumbprint_256_upper%", "%cert_name%",
        "%cert_alt_name%", "%device_id%", "%groups%", "%group_names%", "%headers.XYZ%", "%stored.NAME%"]


# --------------------------------------------------------------------- export/import


def make_rule_set(db: Path) -> None:
    for args in (
        POSTURE,
        ["rule", "add", "oauth", "--url", "https://api.example.com/o", "--auth", "oauth", "--token-url",
         "https://idp.example.com/token", "--client-id", "cid", "--client-secret", "clear-secret",
         "--header", "Authorization=Bearer rule-token", "--header", "Authorization=Bearer second"],
        ["rule", "add", "off", "--url", "http://x/%stored.tier%", "--disabled", "--cache-ttl", "2.5"],
        ["policy", "add", "web", "--host", "app.example.com", "--rule", "posture", "--rule", "oauth", "--rule", "off"],
        ["policy", "add", "any", "--integration", "off", "--priority", "1000"],
    ):
        assert admin(db, *args).exit_code == 0


def test_export_import_round_trip_is_lossless(db: Path, tmp_path: Path) -> None:
    make_rule_set(db)
    exported = tmp_path / "all.json"
    ok(admin(db, "export", "--with-secrets", str(exported)), f"exported 3 rules and 2 policies to {exported}\n")
    assert os.stat(exported).st_mode & 0o777 == 0o600
    other = tmp_path / "other.db"
    ok(admin(other, "import", str(exported)), f"""\
created rule "oauth"
created rule "off"
created rule "posture"
created policy "any"
created policy "web"
imported {exported}: 5 created, 0 updated, 0 deleted, 0 unchanged
""")
    assert stored_rules(other) == stored_rules(db)
    conn, other_conn = connect(db, readonly=True), connect(other, readonly=True)
    assert read_policies(conn) == read_policies(other_conn)
    conn.close()
    other_conn.close()
    assert admin(other, "export").stdout == admin(db, "export").stdout


def test_an_export_masks_secrets_and_reimporting_it_keeps_them(db: Path, tmp_path: Path) -> None:
    make_rule_set(db)
    text = admin(db, "export").stdout
    assert "clear-secret" not in text and "rule-token" not in text
    document = json.loads(text)
    oauth = next(r for r in document["rules"] if r["name"] == "oauth")
    assert (oauth["client_secret"], oauth["headers"]) == (MASK, [["Authorization", MASK], ["Authorization", MASK]])
    posture = next(r for r in document["rules"] if r["name"] == "posture")
    assert posture["password"] == "env:SAFOUS_SECRET_POSTURE_PW"  # a reference is exported as written
    path = tmp_path / "masked.json"
    path.write_text(text)
    # Idempotent: the same rules.db, the same file: nothing written, nothing audited.
    audited, before = count(db, "audit_log"), stored_rules(db)
    ok(admin(db, "import", str(path)), f"imported {path}: 0 created, 0 updated, 0 deleted, 5 unchanged\n")
    ok(admin(db, "import", str(path)), f"imported {path}: 0 created, 0 updated, 0 deleted, 5 unchanged\n")
    assert (count(db, "audit_log"), stored_rules(db)) == (audited, before)
    # A masked secret can only be kept where there is one.
    other = tmp_path / "other.db"
    refused(admin(other, "import", str(path)),
            f'{path}: rule "oauth": client_secret is masked in the file and rules.db holds no secret to keep '
            "for it: export with --with-secrets, or give it as env:NAME or file:PATH")
    assert count(other, "rules") == 0


def test_an_import_is_checked_whole_before_anything_is_written(db: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": 1, "rules": [
        {"name": "fine", "url": "http://x/"},
        {"name": "broken", "url": "http://x/?u=%usrname%"},
    ], "policies": []}))
    refused(admin(db, "import", str(path)),
            f'{path}: rule "broken": url: unknown parameter %usrname% — did you mean %username%? (at character 13)')
    path.write_text(json.dumps({"rules": [{"name": "a", "url": "http://x/"}],
                                "policies": [{"name": "p", "rules": ["a", "b"]}]}))
    refused(admin(db, "import", str(path)), f'{path}: policy "p": rule "b" does not exist')
    path.write_text(json.dumps({"rules": [{"name": "a", "url": "http://x/", "colour": "red"}]}))
    refused(admin(db, "import", str(path)), f'{path}: rule "a": colour: Extra inputs are not permitted')
    path.write_text('{"rules": [}')
    refused(admin(db, "import", str(path)), f"{path}: not JSON: Expecting value at line 1 column 12")
    path.write_text(json.dumps({"version": 2}))
    refused(admin(db, "import", str(path)), f"{path}: version 2 is not supported (this script reads 1)")
    assert count(db, "rules") == count(db, "audit_log") == 0


def test_import_updates_changed_objects_and_replace_deletes_the_rest(db: Path, tmp_path: Path) -> None:
    make_rule_set(db)
    document = json.loads(admin(db, "export").stdout)
    document["rules"] = [r for r in document["rules"] if r["name"] != "oauth"]
    next(r for r in document["rules"] if r["name"] == "posture")["timeout_ms"] = 900
    document["policies"] = [p for p in document["policies"] if p["name"] == "any"]
    path = tmp_path / "fewer.json"
    path.write_text(json.dumps(document))
    ok(admin(db, "import", str(path)), f"""\
updated rule "posture"
imported {path}: 0 created, 1 updated, 0 deleted, 2 unchanged
""")
    ok(admin(db, "import", "--replace", str(path)), f"""\
deleted policy "web"
deleted rule "oauth"
imported {path}: 0 created, 0 updated, 2 deleted, 3 unchanged
""")
    assert sorted(stored_rules(db)) == ["off", "posture"]
    ok(admin(db, "import", "-", input=json.dumps(document)),
       "imported standard input: 0 created, 0 updated, 0 deleted, 3 unchanged\n")


def test_export_warns_about_rows_that_do_not_validate(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO rules (name, url, method) VALUES ('odd', 'http://x/', 'PATCH')")
    conn.commit()
    conn.close()
    result = admin(db, "export")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["rules"][0]["method"] == "PATCH"
    assert result.stderr == ("warning: rule \"odd\" does not validate (method: Input should be 'GET' or 'POST'): "
                             "exported as stored; import refuses it until repaired\n")


# ------------------------------------------------- rules.db: reading never creates or migrates


def _missing(path: Path) -> str:
    return (f"rules.db {path} does not exist (`rule add`, `policy add` and `import` create one; "
            "other commands never do)")


# Every command but those that add, each with what it needs to get as far as opening rules.db.
NOT_CREATING = [
    ["rule", "show", "r"], ["rule", "list"], ["rule", "list", "--json"], ["policy", "show", "p"],
    ["policy", "list"], ["policy", "list", "--json"], ["logs", "audit"], ["logs", "audit", "--json"],
    ["logs", "activity"], ["logs", "activity", "--denied", "--json"], ["export"], ["export", "out.json"],
    ["export", "--with-secrets", "out.json"], ["test", "r"],
    ["rule", "edit", "r", "--url", "http://x/"], ["rule", "delete", "r"], ["rule", "enable", "r"],
    ["rule", "disable", "r"], ["policy", "edit", "p", "--priority", "1"], ["policy", "delete", "p"],
    ["policy", "enable", "p"], ["policy", "disable", "p"], ["explain", "req-1"], ["explain", "req-1", "--json"],
    ["bundle", "status"], ["bundle", "build", "out.jws", "--signing-key", "key.pem"],
]


@pytest.mark.parametrize("args", NOT_CREATING, ids=" ".join)
def test_a_missing_rules_db_is_refused_and_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)  # where `export out.json` would write
    refused(admin(tmp_path / "typo.db", *args), _missing(tmp_path / "typo.db"), exit_code=2)
    assert sorted(os.listdir(tmp_path)) == []  # no typo.db, -wal, -shm, nor export file


def test_params_needs_no_rules_db(tmp_path: Path) -> None:
    assert admin(tmp_path / "typo.db", "params").exit_code == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [
    ["rule", "add", "r", "--url", "http://x/"], ["policy", "add", "p"],
], ids=" ".join)
def test_adding_creates_a_missing_rules_db(tmp_path: Path, args: list[str]) -> None:
    ok(admin(tmp_path / "new.db", *args), f'{args[0]} "{args[2]}" created\n')
    assert count(tmp_path / "new.db", "audit_log") == 1


def test_an_older_rules_db_is_read_as_it_is_and_left_alone(db: Path) -> None:
    admin(db, "rule", "add", "r", "--url", "http://x/")
    conn = sqlite3.connect(db)
    (latest,) = conn.execute("SELECT max(name) FROM schema_migrations").fetchone()
    conn.execute("DELETE FROM schema_migrations WHERE name = ?", (latest,))  # as if released later
    conn.commit()
    conn.close()
    before = db.read_bytes()  # every connection closed: nothing waits in a -wal
    warning = (f"warning: rules.db {db} has an older schema ({latest} not applied): shown as it is; the "
               "sidecar or a writing command of this version brings it up to date\n")
    listing = "NAME  ENABLED  METHOD  URL        POLICIES\nr     yes      GET     http://x/  none\n"
    result = admin(db, "rule", "list")
    assert (result.exit_code, result.stdout, result.stderr) == (0, listing, warning)
    for args in (["rule", "show", "r"], ["policy", "list"], ["logs", "audit"], ["logs", "activity"], ["export"],
                 ["test", "nothing"]):
        assert admin(db, *args).stderr.startswith(warning) == (args[0] != "test"), args
    assert db.read_bytes() == before  # not migrated, not written (a writing command migrates: test_admin_audit)


def test_a_rules_db_that_cannot_be_read_as_it_is_says_how_to_bring_it_up_to_date(db: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(db)
    names = ", ".join(name for (name,) in conn.execute("SELECT name FROM schema_migrations ORDER BY name"))
    conn.close()
    empty = tmp_path / "empty.db"
    empty.touch()  # an SQLite database with no tables at all
    result = admin(empty, "rule", "list")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith(f"Error: rules.db {empty} cannot be read without {names} (cannot read "
                                    "rules.db: no such table: ")
    assert result.stderr.endswith("): start the sidecar of this version, or run a writing command, to bring it "
                                  "up to date\n")
    assert empty.stat().st_size == 0
    ok(admin(empty, "rule", "add", "r", "--url", "http://x/"), 'rule "r" created\n')
    ok(admin(empty, "policy", "list"), "no policies\n")


# ----------------------------------------------------------------- the real program


def test_the_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "safous-admin"
    db = tmp_path / "rules.db"
    env = {**os.environ, "SAFOUS_DB": str(db), "SAFOUS_ACTOR": "ops"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=30, check=False)

    created = run("rule", "add", "r", "--url", "http://x/?u=%username%")
    assert (created.returncode, created.stdout, created.stderr) == (0, 'rule "r" created\n', "")
    bad = run("rule", "add", "s", "--url", "http://x/?u=%user_name%")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == ('Error: rule "s": url: unknown parameter %user_name% — did you mean %username%? '
                          "(at character 13)\n")
    audit = run("logs", "audit", "--json")
    assert [(e["actor"], e["action"], e["object_name"]) for e in map(json.loads, audit.stdout.splitlines())] == [
        ("ops", "create", "r")]

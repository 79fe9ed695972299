"""Shell completion of ``safous-admin``, through click's completion entry point: what a Tab offers,
from real rules.db files that it never changes, and how fast.

``tab`` runs the admin script as a shell's completion function does (``_SAFOUS_ADMIN_COMPLETE``,
``COMP_WORDS``, ``COMP_CWORD``: bash's protocol) and returns the values offered, in order. A
real bash and zsh typing Tab: tests/test_completion_shells.py.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from sidecar.admin import cli
from sidecar.db import ActivityRecord, connect, insert_activity, transaction
from sidecar.parameter_names import PARAMETERS
from sidecar.policies import Policy
from tests.admin_cli import admin, rule
from tests.conftest import seed
from tests.helpers import ROOT

ENV_CLEAN = {"SAFOUS_DB": None, "SAFOUS_ACTOR": None, "SAFOUS_SECRET_DIR": None, "SAFOUS_SECRET_ENV_PREFIX": None}


def tab(db: Path | None, *words: str, shell: str = "bash", env: dict[str, str | None] | None = None) -> list[str]:
    """The values ``safous-admin [--db DB] WORDS...`` offers for its last word (``""``: a Tab
    after a space), through click's completion entry point. Asserts the answer is clean: exit
    status 0, nothing on stderr."""
    line = ["safous-admin", *(["--db", str(db)] if db is not None else []), *words]
    variables = {**ENV_CLEAN, "_SAFOUS_ADMIN_COMPLETE": f"{shell}_complete",
                 "COMP_WORDS": shlex.join(line), "COMP_CWORD": str(len(line) - 1), **(env or {})}
    result = CliRunner(env=variables).invoke(cli, prog_name="safous-admin", catch_exceptions=False)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    lines = result.stdout.splitlines()
    if shell == "zsh":  # type, value, help: three lines each
        return [f"{value} -- {help_}" for value, help_ in zip(lines[1::3], lines[2::3], strict=True)]
    return [line.removeprefix("plain,") for line in lines if line]  # nothing offered: one empty line


def five_rules(path: Path) -> Path:
    """Three policies over five rules: ``score`` runs after ``identity`` (stores tier, token)
    in ``web``, and after ``identity`` and ``device`` (stores posture, tier) in ``api``; ``audit``
    runs first in ``ops``; ``orphan`` no policy uses."""
    seed(path, [
        rule("identity", stores=("tier", "token")),
        rule("device", url="https://hooks.example.com/d?id=%device_id%", stores=("posture", "tier")),
        rule("score", url="https://hooks.example.com/s?t=%stored.tier%",
             headers=(("X-Tenant", "%headers.x-tenant%"), ("X-Trace", "%headers.traceparent%"))),
        rule("audit", stores=("verdict",)),
        rule("orphan", headers=(("X-Key", "%stored.api_key%"),)),
    ], [
        Policy(name="web", hosts=("web.example.com",), rules=("identity", "score")),
        Policy(name="api", hosts=("api.example.com",), rules=("identity", "device", "score")),
        Policy(name="ops", hosts=("ops.example.com",), rules=("audit", "identity")),
    ])
    return path


@pytest.fixture(scope="module")
def rules_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``five_rules``, shared by the tests that only complete (tests that write get ``own_db``)."""
    return five_rules(tmp_path_factory.mktemp("shared") / "rules.db")


@pytest.fixture
def own_db(tmp_path: Path) -> Path:
    """``five_rules``, for one test."""
    return five_rules(tmp_path / "rules.db")


# ------------------------------------------------------------ commands, options, choices


def test_commands_subcommands_and_options(rules_db: Path) -> None:
    assert tab(rules_db, "") == ["backup", "bundle", "collect", "completion", "explain", "export", "import", "logs",
                                 "params", "policy", "restore", "rule", "test", "ui"]
    assert tab(rules_db, "rule", "") == ["add", "delete", "disable", "edit", "enable", "list", "show"]
    assert tab(rules_db, "rule", "add", "new", "--he") == ["--header", "--help"]
    assert tab(rules_db, "logs", "activity", "--d") == ["--denied"]
    assert tab(rules_db, "completion", "") == ["bash", "zsh", "fish"]


@pytest.mark.parametrize(("words", "offered"), [
    (("rule", "add", "new", "--verify", ""), ["json", "jsonp"]),
    (("rule", "edit", "score", "--auth", ""), ["none", "basic", "oauth"]),
    (("rule", "add", "new", "--auth", "o"), ["oauth"]),
    (("policy", "add", "new", "--mode", ""), ["enforce", "audit"]),
    (("policy", "edit", "web", "--integration", ""), ["on", "off"]),
], ids=["verify", "auth", "auth-prefix", "mode", "integration"])
def test_choices_are_offered_as_typed(rules_db: Path, words: tuple[str, ...], offered: list[str]) -> None:
    assert tab(rules_db, *words) == offered


# ----------------------------------------------------------------- rule and policy names


@pytest.mark.parametrize("words", [
    ("rule", "show"), ("rule", "edit"), ("rule", "delete"), ("rule", "enable"), ("rule", "disable"), ("test",),
    ("policy", "add", "new", "--rule"), ("policy", "edit", "web", "--rule", "identity", "--rule"),
], ids=" ".join)
def test_rule_names(rules_db: Path, words: tuple[str, ...]) -> None:
    assert tab(rules_db, *words, "") == ["audit", "device", "identity", "orphan", "score"]
    assert tab(rules_db, *words, "s") == ["score"]
    assert tab(rules_db, *words, "x") == []


@pytest.mark.parametrize("command", ["show", "edit", "delete", "enable", "disable"])
def test_policy_names(rules_db: Path, command: str) -> None:
    assert tab(rules_db, "policy", command, "") == ["api", "ops", "web"]
    assert tab(rules_db, "policy", command, "w") == ["web"]


def test_a_new_name_is_not_completed(rules_db: Path) -> None:
    assert tab(rules_db, "rule", "add", "") == []
    assert tab(rules_db, "policy", "add", "") == []


def test_names_come_from_the_db_the_command_line_names(rules_db: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    seed(other, [rule("elsewhere")])
    assert tab(other, "rule", "show", "") == ["elsewhere"]
    # No --db: $SAFOUS_DB, as for every command.
    assert tab(None, "rule", "show", "", env={"SAFOUS_DB": str(other)}) == ["elsewhere"]
    assert tab(None, "rule", "show", "", env={"SAFOUS_DB": str(rules_db)})[0] == "audit"


# --------------------------------------------------------------------------- %parameters%


@pytest.mark.parametrize(("typed", "offered"), [
    ("X-User=%us", ["X-User=%user_agent%", "X-User=%username%"]),
    ("X-User=%usern", ["X-User=%username%"]),
    ("X-User=%UserN", ["X-User=%username%"]),
    ("X-Cert=%cert_t", ["X-Cert=%cert_thumbprint%", "X-Cert=%cert_thumbprint_256%",
                        "X-Cert=%cert_thumbprint_256_upper%", "X-Cert=%cert_thumbprint_upper%"]),
    ("X-Both=%username%,%dev", ["X-Both=%username%,%device_id%"]),
    ("X-Fwd=%hea", ["X-Fwd=%headers.NAME%", "X-Fwd=%headers.traceparent%", "X-Fwd=%headers.x-tenant%"]),
    ("X-Fwd=%headers.x", ["X-Fwd=%headers.x-tenant%"]),
    ("X-Fwd=%headers.X-T", ["X-Fwd=%headers.x-tenant%"]),
    ("X-All=%", [f"X-All=%{name}%" for name in sorted([*PARAMETERS, "headers.NAME", "headers.traceparent",
                                                        "headers.x-tenant", "stored.posture", "stored.tier",
                                                        "stored.token", "stored.verdict"])]),
    ("X-Rate=100%%us", []),
    ("X-Done=%username%", []),
    ("X-None=", []),
    ("X-Odd=%us er", []),
], ids=lambda v: v if isinstance(v, str) else None)
def test_parameters_in_a_header_value(rules_db: Path, typed: str, offered: list[str]) -> None:
    assert tab(rules_db, "rule", "add", "new", "--url", "https://x.example.com/", "--header", typed) == offered


def test_parameters_in_a_url_and_a_body_keep_the_rest_of_the_value(rules_db: Path) -> None:
    assert tab(rules_db, "rule", "add", "new", "--url", "https://x.example.com/a%2Fb?u=%username%&d=%dev") == [
        "https://x.example.com/a%2Fb?u=%username%&d=%device_id%"]
    assert tab(rules_db, "rule", "edit", "score", "--method", "POST", "--body", '{"user": "%us') == [
        '{"user": "%user_agent%', '{"user": "%username%']


def test_stored_values_of_a_new_rule_are_those_any_rule_stores(rules_db: Path) -> None:
    assert tab(rules_db, "rule", "add", "new", "--header", "X-Tier=%stored.") == [
        "X-Tier=%stored.posture%", "X-Tier=%stored.tier%", "X-Tier=%stored.token%", "X-Tier=%stored.verdict%"]
    assert tab(rules_db, "rule", "add", "new", "--url", "https://x.example.com/?t=%stored.t") == [
        "https://x.example.com/?t=%stored.tier%", "https://x.example.com/?t=%stored.token%"]


def test_stored_values_of_an_edited_rule_are_those_every_policy_using_it_stores_before_it(rules_db: Path) -> None:
    # score: after identity in web (tier, token), after identity and device in api (+ posture).
    assert tab(rules_db, "rule", "edit", "score", "--header", "X-Tier=%stored.") == [
        "X-Tier=%stored.tier%", "X-Tier=%stored.token%"]
    # The name may come after the options, as click allows.
    assert tab(rules_db, "rule", "edit", "--clear-actions", "score", "--url", "https://x.example.com/%stored.") == [
        "https://x.example.com/%stored.tier%", "https://x.example.com/%stored.token%"]
    # audit runs first in ops: no rule stores before it. orphan: no policy uses it yet.
    assert tab(rules_db, "rule", "edit", "audit", "--header", "X-Tier=%stored.") == []
    assert tab(rules_db, "rule", "edit", "orphan", "--header", "X=%stored.v") == ["X=%stored.verdict%"]


def test_zsh_and_fish_show_where_a_parameter_comes_from(rules_db: Path) -> None:
    assert tab(rules_db, "rule", "add", "new", "--header", "X-User=%usern", shell="zsh") == [
        f"X-User=%username% -- {PARAMETERS['username']}"]
    fish = {"_SAFOUS_ADMIN_COMPLETE": "fish_complete",
            "COMP_WORDS": f"safous-admin --db {rules_db} rule add new --header X-Device=%dev",
            "COMP_CWORD": "X-Device=%dev"}
    result = CliRunner(env={**ENV_CLEAN, **fish}).invoke(cli, prog_name="safous-admin", catch_exceptions=False)
    assert result.stdout == f"plain,X-Device=%device_id%\t{PARAMETERS['device_id']}\n"


# ------------------------------------------------------------------------------- --action


def test_action_types_then_the_names_rules_use_as_stored_values(rules_db: Path) -> None:
    assert tab(rules_db, "rule", "add", "new", "--action", "") == ["string:", "regex:", "store:"]
    assert tab(rules_db, "rule", "add", "new", "--action", "st") == ["string:", "store:"]
    assert tab(rules_db, "rule", "edit", "identity", "--action", "store:data.key:") == [
        "store:data.key:api_key", "store:data.key:tier"]
    assert tab(rules_db, "rule", "edit", "identity", "--action", "store:data.key:a") == ["store:data.key:api_key"]
    assert tab(rules_db, "rule", "add", "new", "--action", "string:status:") == []


# ------------------------------------------------------------------- users in the activity log


def decisions(db: Path, *users: str) -> None:
    conn = connect(db)
    try:
        insert_activity(conn, [
            ActivityRecord(at=time.time() + i, request_id=f"r{i}", username=user, source_ip="203.0.113.7",
                           host="web.example.com", path="/", method="GET", policy="web", allowed=False,
                           code="webhook_denied", status="no", latency_ms=1.0)
            for i, user in enumerate(users)])
    finally:
        conn.close()


def test_users_of_recent_decisions(own_db: Path) -> None:
    decisions(own_db, "alice", "bob", "", "alice", "albert")
    assert tab(own_db, "logs", "activity", "--user", "") == ["albert", "alice", "bob"]
    assert tab(own_db, "logs", "activity", "--denied", "--user", "al") == ["albert", "alice"]


def test_only_the_newest_decisions_count(own_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.db import names

    monkeypatch.setattr(names, "RECENT_DECISIONS", 2)
    decisions(own_db, "old", "alice", "bob")
    assert tab(own_db, "logs", "activity", "--user", "") == ["alice", "bob"]


# ------------------------------------------------------- a rules.db it cannot or must not read


def files(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_a_missing_db_completes_nothing_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    assert tab(missing, "rule", "show", "") == []
    assert tab(missing, "rule", "add", "new", "--header", "X=%stored.") == []
    assert tab(missing, "rule", "add", "new", "--header", "X=%usern") == ["X=%username%"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not a database" * 100, b"SQLite format 3\x00" + b"\xff" * 1000],
                         ids=["empty", "text", "bad-header"])
def test_a_file_that_is_no_rules_db_completes_nothing(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "rules.db"
    path.write_bytes(content)
    before = files(tmp_path)
    for words in (("rule", "show", ""), ("policy", "show", ""), ("logs", "activity", "--user", ""),
                  ("rule", "add", "new", "--header", "X=%stored."), ("rule", "add", "new", "--action", "store:k:")):
        assert tab(path, *words) == []
    assert files(tmp_path) == before


def test_a_directory_completes_nothing(tmp_path: Path) -> None:
    assert tab(tmp_path, "rule", "show", "") == []


def test_an_old_schema_is_read_as_it_is_never_migrated(tmp_path: Path) -> None:
    path = tmp_path / "rules.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE rules (id INTEGER PRIMARY KEY, name TEXT UNIQUE); "
                       "INSERT INTO rules (name) VALUES ('legacy');")
    conn.close()
    before = (files(tmp_path), path.read_bytes())
    assert tab(path, "rule", "show", "") == ["legacy"]
    assert tab(path, "policy", "show", "") == []  # no policies table yet
    assert tab(path, "rule", "add", "new", "--header", "X=%stored.") == []
    assert (files(tmp_path), path.read_bytes()) == before


def test_a_disabled_rule_stores_nothing_to_complete(own_db: Path) -> None:
    """A disabled rule never runs: ``rule edit`` refuses its stored names, so Tab offers none."""
    assert admin(own_db, "rule", "disable", "identity").exit_code == 0
    assert tab(own_db, "rule", "edit", "score", "--header", "X=%stored.") == []  # web: identity alone stored
    assert tab(own_db, "rule", "add", "new", "--header", "X=%stored.") == [
        "X=%stored.posture%", "X=%stored.tier%", "X=%stored.verdict%"]
    refused = admin(own_db, "rule", "edit", "score", "--header", "X=%stored.token%")
    assert refused.exit_code == 1


def test_a_closed_db_is_read_without_leaving_a_file_or_a_change(own_db: Path) -> None:
    before = (files(own_db.parent), own_db.read_bytes())
    assert tab(own_db, "rule", "show", "") != []
    assert tab(own_db, "rule", "edit", "score", "--header", "X=%stored.") != []
    assert (files(own_db.parent), own_db.read_bytes()) == before


@pytest.fixture
def writer(own_db: Path) -> Iterator[sqlite3.Connection]:
    """A connection of the sidecar's kind (WAL) holding rules.db open, as a running sidecar does."""
    conn = connect(own_db)
    try:
        yield conn
    finally:
        conn.close()


def test_changes_still_in_the_wal_are_seen(own_db: Path, writer: sqlite3.Connection) -> None:
    seed(own_db, [rule("added")])  # committed, not checkpointed: the rows sit in rules.db-wal
    assert (own_db.parent / "rules.db-wal").stat().st_size > 0
    assert tab(own_db, "rule", "show", "a") == ["added", "audit"]


def test_a_locked_db_completes_nothing_at_once(own_db: Path, writer: sqlite3.Connection) -> None:
    writer.execute("PRAGMA locking_mode = EXCLUSIVE")
    with transaction(writer, immediate=True):
        writer.execute("UPDATE rules SET enabled = 0")  # the lock is taken: readers get SQLITE_BUSY
        started = time.monotonic()
        assert tab(own_db, "rule", "show", "") == []
        # The admin script's readers would wait 5 s (BUSY_TIMEOUT_MS); a Tab never waits.
        assert time.monotonic() - started < 1


def test_a_slow_read_is_cut_at_the_deadline(own_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.admin import completion

    # Enough rows that reading them takes more than the few VM steps between two looks at the clock.
    decisions(own_db, *["alice"] * 5000)
    monkeypatch.setattr(completion, "DEADLINE", 0.0)
    assert tab(own_db, "logs", "activity", "--user", "") == []
    monkeypatch.setattr(completion, "DEADLINE", 5.0)
    assert tab(own_db, "logs", "activity", "--user", "") == ["alice"]


# ------------------------------------------------------------------------ the scripts


@pytest.mark.parametrize(("shell", "registers"), [
    ("bash", "complete -o nosort -F _safous_admin_completion safous-admin"),
    ("zsh", "compdef _safous_admin_completion safous-admin"),
    ("fish", "complete --no-files --command safous-admin"),
])
def test_completion_prints_clicks_script_for_the_console_script(tmp_path: Path, shell: str, registers: str) -> None:
    script = CliRunner(env=ENV_CLEAN).invoke(cli, ["completion", shell], prog_name="safous-admin")
    assert (script.exit_code, script.stderr) == (0, ""), script.output
    assert registers in script.stdout
    assert "_SAFOUS_ADMIN_COMPLETE=" in script.stdout
    # The same as click's own source instruction gives.
    source = CliRunner(env={**ENV_CLEAN, "_SAFOUS_ADMIN_COMPLETE": f"{shell}_source"}).invoke(
        cli, prog_name="safous-admin")
    assert source.stdout == script.stdout
    assert list(tmp_path.iterdir()) == []


def test_completion_refuses_another_shell() -> None:
    result = CliRunner(env=ENV_CLEAN).invoke(cli, ["completion", "tcsh"], prog_name="safous-admin")
    assert result.exit_code == 2
    assert "'tcsh' is not one of 'bash', 'zsh', 'fish'" in result.stderr


# ------------------------------------------------------------------------------ speed

HEAVY = ("pydantic", "sqlite_utils", "aiohttp", "grpc", "datasette", "cryptography", "jwt", "re2", "orjson",
         "sidecar.server", "sidecar.exchange", "sidecar.policies", "sidecar.rules.model")

# The admin script's completion in a fresh interpreter, as the shell runs it, then what it loaded.
_LOADED = """
import json, sys
from sidecar.admin import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def completion_command(db: Path, line: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of ``safous-admin --db DB`` answering bash's Tab at the end
    of ``line``, as the shell runs it."""
    words = shlex.split(line)
    env = {k: v for k, v in os.environ.items() if k not in ENV_CLEAN and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(_SAFOUS_ADMIN_COMPLETE="bash_complete", COMP_WORDS=shlex.join(["safous-admin", "--db", str(db), *words]),
               COMP_CWORD=str(len(words) + 2 + line.endswith(" ")))
    return [str(Path(sys.executable).parent / "safous-admin")], env


def completion_process(db: Path, line: str, *, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """``completion_command`` run (or ``python -c code`` in its place, in the same environment)."""
    command, env = completion_command(db, line)
    return subprocess.run([sys.executable, "-c", code] if code else command, env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)


@pytest.mark.parametrize("line", ["rule show ", "rule add new --header X=%stored.", "logs activity --user ",
                                  "bundle keygen k --algorithm ", "ui --l"])
def test_completing_loads_no_heavy_module(rules_db: Path, line: str) -> None:
    done = completion_process(rules_db, line, code=_LOADED)
    loaded = json.loads(done.stderr)
    assert done.stdout
    assert [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)] == []


def many_rules(path: Path, count: int) -> None:
    """``count`` rules, one in ten storing a value, and 200 policies of five rules each."""
    seed(path, [rule(f"rule-{i:05d}", url=f"https://hook{i}.example.com/c?u=%username%&t=%stored.tier{i % 50}%",
                     headers=(("X-Tenant", "%headers.x-tenant%"),), stores=(f"tier{i % 50}",) * (i % 10 == 0))
                for i in range(count)],
         [Policy(name=f"policy-{p:03d}", hosts=(f"app{p}.example.com",),
                 rules=tuple(f"rule-{p * 50 + k:05d}" for k in range(5))) for p in range(200)])


def least_cpu(command: list[str], env: dict[str, str], runs: int) -> float:
    """The least CPU time (user and system) of ``runs`` runs of ``command``, in seconds."""
    spent = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, env=env, cwd=ROOT, capture_output=True, check=True, timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return min(spent)


def test_a_completion_answers_within_100_ms_on_10000_rules(tmp_path: Path) -> None:
    """The whole process, as the shell runs it, in CPU time (what it spends, whoever else the
    machine runs; on an idle core its wall time is the same): 100 ms, or, where even a bare
    completion costs more, at most 2.1 times it (50 ms over its usual 45 ms): a Python process
    that imports click and sqlite3. Each is the least of a few runs taken in turns."""
    path = tmp_path / "rules.db"
    many_rules(path, 10_000)
    floor = [sys.executable, "-c", "import click, click.shell_completion, sqlite3"]
    for line, first in [("rule show rule-0001", "rule-00010"), ("policy add p --rule ", "rule-00000"),
                        ("rule edit rule-00051 --header X=%stored.", "X=%stored.tier0%")]:
        done = completion_process(path, line)  # also writes the bytecode, as installing the wheel does
        assert done.stdout.splitlines()[0] == f"plain,{first}"
        command, env = completion_command(path, line)
        least = ours = math.inf
        for _ in range(4):
            least = min(least, least_cpu(floor, env, runs=1))
            ours = min(ours, least_cpu(command, env, runs=1))
        # The margin grows with the floor: a machine slowed down as a whole (seen: the floor at
        # 77 ms against its usual 45) slows both alike.
        assert ours <= max(0.1, least * 2.1), f"{line!r}: {ours * 1000:.0f} ms, the floor {least * 1000:.0f} ms"

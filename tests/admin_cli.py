"""The admin script run in-process, as the admin test files drive it, and what they assert of
its answers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from click.testing import CliRunner, Result

from sidecar.admin import cli
from sidecar.db import connect, read_rules
from sidecar.rules.model import ActionType, ResponseAction, Rule


def admin(db: Path, *args: str, actor: str = "alice", input: str | None = None,
          env: dict[str, str | None] | None = None) -> Result:
    """``safous-admin --db DB --actor ACTOR ARGS...`` in-process. An exception other than the
    command's exit propagates: a crash fails the test instead of being an exit status."""
    runner = CliRunner(env={"SAFOUS_DB": None, "SAFOUS_ACTOR": None, "SAFOUS_SECRET_DIR": None,
                            "SAFOUS_SECRET_ENV_PREFIX": None, **(env or {})})
    prefix = ["--db", str(db)] + (["--actor", actor] if actor else [])
    return runner.invoke(cli, [*prefix, *args], input=input, catch_exceptions=False)


def count(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def stored_rules(db: Path) -> dict[str, Rule]:
    conn = connect(db, readonly=True)
    try:
        return {r.name: r.rule for r in read_rules(conn)}
    finally:
        conn.close()


def ok(result: Result, stdout: str) -> None:
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert result.stdout == stdout


def refused(result: Result, message: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"Error: {message}"


def store(key: str, name: str) -> ResponseAction:
    """A ``store`` response action: keep the answer's value at ``key`` as ``%stored.NAME%``."""
    return ResponseAction(type=ActionType.STORE, key=key, value=name)


def rule(name: str, *, url: str = "https://hooks.example.com/check", headers: tuple[tuple[str, str], ...] = (),
         stores: tuple[str, ...] = ()) -> Rule:
    """A rule storing ``data.NAME`` as each of ``stores``."""
    return Rule(name=name, url=url, headers=headers, actions=tuple(store(f"data.{s}", s) for s in stores))

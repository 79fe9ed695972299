"""``safous-admin backup`` and ``restore``: copy a live rules.db, and put a copy back, while a
sidecar uses it. SQLite's online backup API does the copying (``sidecar.db.backup``); here, the
commands: the file checks, the refusal of a bundle-managed rules.db, and what is printed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from sidecar import db

if TYPE_CHECKING:
    from .access import Admin

__all__ = ["backup", "restore"]

_DONE = {"create": "created", "edit": "updated", "enable": "enabled", "disable": "disabled", "delete": "deleted"}


@click.command("backup")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_obj
def backup(admin: Admin, out: Path, overwrite: bool) -> None:
    """Copy rules.db to OUT, consistently, while the sidecar runs.

    SQLite's online backup API copies the database as of one instant, however the sidecar
    writes meanwhile (rules, policies, the audit and activity logs). OUT appears only once
    whole and checked, readable by its owner only (rules.db may hold secrets in clear); an
    existing OUT is kept unless --overwrite. `safous-admin restore OUT` puts it back.
    """
    from . import display
    from .validation import AdminError

    if not admin.db.exists():
        raise AdminError(f"rules.db {admin.db} does not exist: nothing to back up", 2)
    try:
        contents = db.backup_database(admin.db, out, overwrite=overwrite)
    except FileExistsError:  # before anything is copied, or if OUT appeared meanwhile
        raise AdminError(f"{out} exists: choose another name, or give --overwrite", 2) from None
    click.echo(f"backed up {admin.db} to {out}: {display.counted(contents.rules, 'rule')} and "
               f"{display.counted(contents.policies, 'policy')}")


@click.command("restore")
@click.argument("source", metavar="IN", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def restore(admin: Admin, source: Path) -> None:
    """Put a backup back into rules.db, while the sidecar runs.

    IN (from `safous-admin backup`, or any rules.db) is checked first: a SQLite database that
    passes its integrity check and that this version can bring up to date, to exactly the
    schema its migrations make (no trigger of the audit log dropped). Its pages are then
    written into rules.db through SQLite, in one transaction: the sidecar serves its rules
    within --reload-interval, and nothing is corrupted, as a cp over the live file would be.
    A bundle-managed rules.db is refused unless --force.

    Rules, policies and bundle state become IN's. Nothing is lost from the logs: the audit log
    keeps the rows of both files, plus one row per rule or policy the restore changed and one
    for the restore; the activity log keeps the decisions of both.
    """
    from sidecar.exchange import quoted

    from . import display

    done = db.restore_database(admin.db, source, admin.actor_over)
    for change in done.changes:
        click.echo(f"{_DONE.get(change.action, change.action)} {change.object_type} {quoted(change.object_name)}")
    click.echo(f"restored {admin.db} from {source}: {display.counted(done.contents.rules, 'rule')} and "
               f"{display.counted(done.contents.policies, 'policy')}, "
               f"{display.counted(len(done.changes), 'change')} audited as {quoted(done.actor)}")

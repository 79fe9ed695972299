"""``safous-admin``: the admins' script for rules.db (PRODUCT.md, "Who uses it and how").

    cli.py         the command line (click): a thin shell, one transaction per command
    validation.py  what is checked before anything is written (AdminError)
    display.py     tables and details, secrets masked, terminal-safe text
    exchange.py    export / import of the whole rule and policy set
    dryrun.py      `test`: one rule run once, as the sidecar runs it

SQL stays in ``sidecar.store``; the audit log is written by triggers there, so the script only
says who the actor is.
"""

from .cli import cli, main

__all__ = ["cli", "main"]

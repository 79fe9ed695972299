"""``safous-admin``: the admins' script for rules.db (docs/admins/admin-script.md).

    cli.py         the commands (click), each docstring its --help: a thin shell
    options.py     the commands' options, parsed into typed values and merged into fields
    access.py      how a command opens rules.db: readers never create or migrate it
    validation.py  how a refusal is worded (AdminError, option names); the checks themselves,
                   the export document and the import plan are ``sidecar.exchange``'s, which
                   the sidecar's bundles use too
    checks.py      what the sidecar will make of what is stored: problems and warnings
    display.py     tables, details and log entries, secrets masked, terminal-safe text
    exchange.py    the files export writes and import reads
    dryrun.py      `test`: one rule run once, as the sidecar runs it, and its report
    portal/        `ui`: the admins' portal, rules.db read-only in a browser (Datasette)
    completion.py  `completion` and what Tab offers: names from rules.db (``sidecar.db.names``),
                   %parameters%, response action types

SQL stays in ``sidecar.db`` (but for the portal's own read-only queries: ``portal``); the audit
log is written by triggers there, so the script only says who the actor is.
"""

from .cli import cli, main

__all__ = ["cli", "main"]

"""What the portal may read of rules.db: two independent gates, each enough on its own.

1. **Datasette's permissions** (``permitted``): an allow list. The browser can open the home
   page, the ``safous`` database page, the Activity and Audit tables and the canned queries;
   nothing else — no other table or view (``rules`` holds passwords and client secrets, the
   audit views and ``audit_pending`` hold unredacted documents), no arbitrary SQL, no database
   download, no debug pages, no writes. The query-string arguments with which a request would
   choose SQL or another table (``SQL_ARGUMENTS``) are refused before Datasette sees them.
2. **SQLite's authorizer** (``authorize``), installed on every connection Datasette reads
   rules.db with: a statement that reads any column of any table other than the activity log,
   the audit log, the schema and the portal's reason index is refused by SQLite itself, before
   it runs — in the selected columns, a WHERE clause, a view, a facet. Counting a table's rows
   (``count(*)``, which reads no value) stays possible. So a gap in the first gate (a
   Datasette page that forgets a permission check, a plugin) still cannot read a secret, nor
   a column a later migration adds.

The rules and policies page reads through the admin script's own code (``catalog``), on a
connection of its own, and shows what ``safous-admin rule show`` shows: secrets masked.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Collection

__all__ = ["DATABASE", "INDEX_SCHEMA", "READABLE_TABLES", "SQL_ARGUMENTS", "authorize", "permitted",
           "refused_argument"]

DATABASE = "safous"
"""rules.db's name in the portal's URLs (``/safous/activity_log``)."""

INDEX_SCHEMA = "portal"
"""The schema name the portal's own reason index is attached under (``search``)."""

READABLE_TABLES = frozenset({"activity_log", "audit_log"})
"""The rules.db tables whose values the portal shows. The audit log's documents have their
secrets redacted by the triggers that write them (``sidecar.db.audit``)."""

SQL_ARGUMENTS = frozenset({"sql", "_where", "_through", "_fts_table", "_fts_pk"})
"""Datasette's query-string arguments that carry SQL (``sql``, ``_where``) or name a table to
join or search (``_through``, ``_fts_table``, ``_fts_pk``): the pages' SQL is the portal's own."""

_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"})

# Introspection Datasette runs (columns, keys, indexes, schema version); none changes anything.
_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list",
    "schema_version", "data_version", "database_list", "compile_options", "function_list",
    "module_list", "pragma_list", "collation_list", "page_count", "page_size", "freelist_count",
})

# Functions that reach outside the database: never from the portal.
_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})


def authorize(action: int, arg1: str | None, arg2: str | None, schema: str | None,
              _source: str | None) -> int:
    """The SQLite authorizer of the portal's rules.db connections (``set_authorizer``): OK for
    reading the readable tables, the schema and the reason index; DENY for every other read,
    every write, ATTACH, and anything else."""
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_READ:
        table = (arg1 or "").lower()
        if schema == INDEX_SCHEMA or table in READABLE_TABLES or table in _SCHEMA_TABLES:
            return sqlite3.SQLITE_OK
        # SQLite reports a table read for no column (count(*)) with an empty column name.
        return sqlite3.SQLITE_OK if arg2 == "" else sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _FUNCTIONS else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        return sqlite3.SQLITE_OK if (arg1 or "").lower() in _PRAGMAS else sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_UPDATE and (arg1 or "").lower() in _SCHEMA_TABLES:
        # Asked when a connection first opens the reason index (FTS5 declares its virtual
        # table); SQLite never lets a statement change the schema table, and the connection
        # is read-only anyway.
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def permitted(action: str, resource: object, queries: Collection[str]) -> bool:
    """Whether anyone (the portal has no login) may do ``action`` on ``resource``, as
    Datasette's ``permission_allowed`` asks it. ``queries``: the canned queries' names.
    Every action not named here is refused."""
    if action == "view-instance":
        return True
    if action == "view-database":
        return resource == DATABASE
    if action == "view-table":
        return isinstance(resource, tuple) and resource[0] == DATABASE and resource[1] in READABLE_TABLES
    if action == "view-query":
        return isinstance(resource, tuple) and resource[0] == DATABASE and resource[1] in queries
    return False


def refused_argument(query_string: bytes) -> str | None:
    """The first of ``SQL_ARGUMENTS`` a request's query string holds, or None."""
    for name, _ in urllib.parse.parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name in SQL_ARGUMENTS:
            return name
    return None

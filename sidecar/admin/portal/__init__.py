"""The admins' portal (``safous-admin ui``): rules.db in a browser, read-only, with Datasette.

Pages: Activity (the activity log: facets, time range, search on the reason, charts), Audit
(who changed what, before and after), Rules and policies (as the admin script shows them),
and canned queries (denials in the last hour by reason, top denied users, webhook failures
by rule). docs/admins/portal.md.

Contract:

- **Read-only, never in the way**: rules.db is opened ``mode=ro`` and ``query_only``, the
  pages' queries bounded by Datasette's time limits (the search index's catch-up and the rules
  page read outside them); under WAL the sidecar and the admin script write
  meanwhile and never wait for it. Nothing the portal builds (the search index) goes into
  rules.db.
- **No secret leaves rules.db through it**: two gates, each enough alone (``guard``):
  Datasette's permissions let through an allow list of pages and no arbitrary SQL, and
  SQLite's authorizer refuses, on every connection, any read of a column outside the activity
  and audit logs. The rules page shows the admin script's masked text.

Where things are::

    server.py      listening (loopback by default), uvicorn
    app.py         the Datasette instance, rules.db's connections, the plugin hooks
    guard.py       what may be read: permissions, SQL arguments, SQLite authorizer
    asgi.py        requests refused before Datasette: another Host, SQL arguments
    search.py      the reason index, in the portal's own database
    charts.py      the Activity page's charts (inline SVG, drawn on the server)
    catalog.py     the Rules and policies page, from the admin script's own code
    metadata.yaml  titles, facets, sort orders, the canned queries
    templates/     Datasette template overrides and the portal's own pages
"""

from .app import Portal
from .server import serve

__all__ = ["Portal", "serve"]

"""The portal's Datasette: rules.db read-only, the pages' metadata and templates, the hooks.

``Portal`` owns everything one portal needs and gives it back on ``close``: a Datasette with
one database (rules.db as ``safous``, through ``_RulesDatabase``), the reason index and its
temporary directory, and ``_Hooks``, the plugin that shapes the pages. Datasette's plugin
registry is global to the process, so each hook answers for its own portal only.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import markupsafe
import pluggy
import yaml
from datasette.app import Datasette
from datasette.database import Database
from datasette.filters import Filters
from datasette.plugins import DEFAULT_PLUGINS, pm
from datasette.utils import await_me_maybe
from datasette.utils.asgi import Response
from datasette.views.base import DatasetteError

from sidecar import db
from sidecar.db import iso_time

from ..access import Admin
from ..display import warn
from ..validation import AdminError
from . import guard
from .asgi import ASGIApp, refusing_sql_arguments
from .catalog import read_catalog
from .charts import Charts, activity_charts, link
from .search import ReasonIndex

__all__ = ["SETTINGS", "Portal"]

TEMPLATES = Path(__file__).with_name("templates")

SETTINGS: Mapping[str, object] = {
    "default_allow_sql": False,  # guard.permitted refuses it too
    "allow_download": False,
    "suggest_facets": False,  # a scan of the whole log per column, for each page
    "default_page_size": 50,
    # A facet over a million rows takes about 0.4 s; the default (0.2 s) would time out.
    "facet_time_limit_ms": 1000,
    "sql_time_limit_ms": 3000,
}

# Datasette's own marker (``datasette.hookimpl``), made here for its types.
hookimpl = pluggy.HookimplMarker("datasette")

# What the Activity page shows unless asked for all (Datasette's column menu; a request id's
# link shows its decisions whole): the reason, and what it is about, fit a screen.
ACTIVITY_COLUMNS = ("at", "request_id", "username", "method", "path", "policy", "allowed", "audit_deny", "code",
                    "status")
# A fleet's activity log (``safous-admin collect``) also names the pod that decided.
FLEET_ACTIVITY_COLUMNS = ("at", "pod", *ACTIVITY_COLUMNS[1:])

# The canned queries' columns that name what a decision was about (metadata.yaml), and the
# Activity page filter that shows those decisions: a user's or a reason's denials; a rule's
# webhook failures, those that audit mode let through included, as the query counts them (a
# webhook code is never an allow otherwise).
_WEBHOOK_CODES = "webhook_timeout,webhook_unreachable,webhook_status"
_QUERY_LINKS: dict[str, Callable[[str], list[tuple[str, str]]]] = {
    "user": lambda user: [("allowed", "0"), ("username", user)],
    "reason": lambda reason: [("allowed", "0"), ("status", reason)],
    "rule": lambda rule: [("code__in", _WEBHOOK_CODES), ("status__startswith", f'rule "{rule}": ')],
}

_TIME_RANGES = (("last 15 minutes", 900), ("last hour", 3600), ("last 24 hours", 86400),
                ("last 7 days", 7 * 86400))


def load_metadata(*, fleet: bool = False) -> dict[str, Any]:
    """``metadata.yaml``, checked to describe the database ``guard`` lets through; for a
    ``fleet``'s activity log, with a facet on the pod that decided."""
    metadata = yaml.safe_load(resources.files(__package__).joinpath("metadata.yaml").read_text("utf-8"))
    tables = metadata["databases"][guard.DATABASE]["tables"]
    if set(tables) != guard.READABLE_TABLES:
        raise RuntimeError(f"metadata.yaml describes {sorted(tables)}, guard.py lets {sorted(guard.READABLE_TABLES)}"
                           " through")
    if fleet:
        tables["activity_log"]["facets"].insert(0, "pod")
    return dict(metadata)


class _RulesDatabase(Database):  # type: ignore[misc]  # Datasette has no type information
    """rules.db as the portal reads it: ``mode=ro`` (the file is never opened for writing, and
    WAL lets the sidecar write meanwhile), ``query_only``, the reason index attached as
    ``portal``, and ``guard.authorize`` on every connection."""

    def __init__(self, datasette: Datasette, path: Path, index: ReasonIndex) -> None:
        super().__init__(datasette, path=str(path), is_mutable=True)
        self._uri = path.absolute().as_uri() + "?mode=ro"
        self._index = index

    def connect(self, write: bool = False) -> sqlite3.Connection:
        if write:
            raise PermissionError("the portal never writes rules.db")
        conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False, timeout=db.BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA query_only = ON")
        conn.execute(f"ATTACH DATABASE ? AS {guard.INDEX_SCHEMA}", (self._index.uri,))
        conn.set_authorizer(guard.authorize)  # last: from here on, only what guard allows
        self._all_file_connections.append(conn)
        return conn


class Portal:
    """A Datasette serving ``admin.db`` read-only as the admins' portal (``datasette``; its ASGI
    application is ``datasette.app()``). ``close`` releases it; usable as a context manager.
    Raises ``AdminError`` (exit 2) when rules.db does not exist."""

    def __init__(self, admin: Admin) -> None:
        with admin.read() as conn:  # a missing rules.db is refused here, an older schema warned about
            # Decided once: a fleet's log holds pods from its first batch on, a pod's never.
            fleet = db.holds_pods(conn)
        self.admin = admin
        self.metadata = load_metadata(fleet=fleet)
        self.activity_columns = FLEET_ACTIVITY_COLUMNS if fleet else ACTIVITY_COLUMNS
        self.queries = frozenset(self.metadata["databases"][guard.DATABASE].get("queries", {}))
        self._workdir = Path(tempfile.mkdtemp(prefix="safous-portal-"))
        try:
            self.index = ReasonIndex(admin.db, self._workdir)
            self.datasette = Datasette(files=[], metadata=self.metadata, settings=dict(SETTINGS),
                                       template_dir=str(TEMPLATES))
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        self.datasette.remove_database("_memory")
        self.database = self.datasette.add_database(_RulesDatabase(self.datasette, admin.db, self.index),
                                                    name=guard.DATABASE)
        # Datasette loads every Datasette plugin installed beside it (entry points); one could add a
        # page, or a route around the permissions. The portal is a fixed application: only
        # Datasette's own plugins and its hooks take part.
        for name, plugin in pm.list_name_plugin():
            if name not in DEFAULT_PLUGINS and not isinstance(plugin, _Hooks):
                pm.unregister(name=name)
        self._hooks = _Hooks(self, f"safous-portal-{id(self)}")
        pm.register(self._hooks, name=self._hooks.__name__)
        # The first search would otherwise index the whole log while its user waits.
        self._indexing = threading.Thread(target=self._index_log, name="portal-index", daemon=True)
        self._indexing.start()

    def _index_log(self) -> None:
        try:
            self.index.catch_up()
        except db.StoreError as exc:
            warn(f"the search index could not be built ({exc}): searches will try again")

    def close(self) -> None:
        pm.unregister(self._hooks)
        self._indexing.join()
        self.database.close()
        self.index.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Portal:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def pages(self, current_path: str) -> list[dict[str, Any]]:
        """The navigation: each page's title, link and description, and whether it is
        ``current_path``."""
        urls = self.datasette.urls
        queries = self.metadata["databases"][guard.DATABASE]["queries"]
        tables = self.metadata["databases"][guard.DATABASE]["tables"]
        activity = urls.table(guard.DATABASE, "activity_log")
        pages = [
            (tables["activity_log"]["title"],
             f"{activity}?{urllib.parse.urlencode([('_col', c) for c in self.activity_columns])}",
             tables["activity_log"]["description"]),
            (tables["audit_log"]["title"], urls.table(guard.DATABASE, "audit_log"),
             tables["audit_log"]["description"]),
            ("Rules and policies", urls.path("rules"),
             "Every rule and policy as safous-admin shows them (secrets masked), which policy runs "
             "which rule, and what does not validate."),
            *((q["title"], urls.table(guard.DATABASE, name), q["description"]) for name, q in queries.items()),
        ]
        return [{"title": t, "href": h, "description": d, "current": h.split("?")[0] == current_path}
                for t, h, d in pages]


def _selection(request: Any) -> list[tuple[str, str]]:
    """The filter arguments of a table page's query string, as Datasette's table view reads
    them (a leading ``_`` marks a control, unless the name holds ``__``)."""
    return [(k, v) for k in request.args if not (k.startswith("_") and "__" not in k)
            for v in request.args.getlist(k)]


class _Hooks:
    """Datasette's plugin hooks for one ``Portal`` (pluggy calls them for every Datasette of
    the process: each answers None for another's)."""

    def __init__(self, portal: Portal, name: str) -> None:
        self.portal = portal
        self.__name__ = name  # Datasette's list of plugins names each by it

    def _ours(self, datasette: Datasette) -> bool:
        return datasette is self.portal.datasette

    # Called after Datasette's own permission checks, so that its answer is the one kept.
    @hookimpl(trylast=True)
    def permission_allowed(self, datasette: Datasette, action: str, resource: object) -> bool | None:
        if not self._ours(datasette):
            return None
        return guard.permitted(action, resource, self.portal.queries)

    @hookimpl
    def asgi_wrapper(self, datasette: Datasette) -> Callable[[ASGIApp], ASGIApp] | None:
        if not self._ours(datasette):
            return None
        return refusing_sql_arguments

    @hookimpl
    def filters_from_request(self, request: Any, database: str, table: str,
                             datasette: Datasette) -> Callable[[], Coroutine[Any, Any, None]] | None:
        if not (self._ours(datasette) and table == "activity_log"
                and any(k.startswith("_search") for k in request.args)):
            return None
        index = self.portal.index

        async def catch_up() -> None:
            # Before the search query runs: it then sees every decision committed until now.
            try:
                await asyncio.to_thread(index.catch_up)
            except db.StoreError as exc:
                raise DatasetteError(str(exc), status=503) from exc

        return catch_up

    @hookimpl
    def extra_template_vars(self, database: str | None, table: str | None, view_name: str, request: Any,
                            datasette: Datasette) -> dict[str, Any] | None:
        if not self._ours(datasette) or request is None:
            return None
        found: dict[str, Any] = {"safous_pages": self.portal.pages(request.path)}
        if view_name == "table" and database == guard.DATABASE and table in guard.READABLE_TABLES:
            found["safous_time_ranges"] = _time_ranges(request)
            if table == "activity_log":
                found["activity_charts"] = lambda: self._charts(datasette, request)
        return found

    async def _charts(self, datasette: Datasette, request: Any) -> Charts:
        """The charts of the rows the Activity page shows: the same where clauses, from the same
        arguments, through the same hooks as Datasette's table view."""
        where, params = Filters(sorted(_selection(request))).build_where_clauses("activity_log")
        for hook in pm.hook.filters_from_request(request=request, table="activity_log",
                                                 database=guard.DATABASE, datasette=datasette):
            found = await await_me_maybe(hook)
            if found:
                where.extend(found.where_clauses)
                params.update(found.params)
        query = [(k, v) for k in request.args for v in request.args.getlist(k)]
        return await activity_charts(self.portal.database, "activity_log", where, params,
                                     path=request.path, query=query)

    @hookimpl
    def render_cell(self, row: Any, value: Any, column: str, table: str | None, database: str | None,
                    datasette: Datasette) -> markupsafe.Markup | None:
        if not self._ours(datasette) or database != guard.DATABASE:
            return None
        if table == "activity_log" and column == "allowed" and value in (0, 1):
            if value and _value(row, "audit_deny") == 1:
                # Allowed only because the policy is in audit mode: not to be read as a plain allow.
                return markupsafe.Markup('<span class="decision decision-audit" title="{}">allow (audit)</span>'
                                         ).format(_AUDIT_DENY_TITLE)
            word = "allow" if value else "deny"
            return markupsafe.Markup('<span class="decision decision-{0}">{0}</span>').format(word)
        if table == "activity_log" and column == "audit_deny" and value in (0, 1):
            if not value:
                return markupsafe.Markup('<span class="no-audit-deny">no</span>')
            return markupsafe.Markup('<span class="decision decision-audit" title="{}">would deny</span>').format(
                _AUDIT_DENY_TITLE)
        if table == "activity_log" and column == "request_id" and isinstance(value, str) and value:
            query = urllib.parse.urlencode({"request_id": value})
            href = f"{datasette.urls.table(guard.DATABASE, 'activity_log')}?{query}"
            return markupsafe.Markup('<a href="{}" title="every decision for this request">{}</a>').format(
                href, value)
        if table == "audit_log" and column in ("before", "after") and isinstance(value, str):
            # The other side may be hidden (_nocol=after): the document is then shown unmarked.
            other = _value(row, "after" if column == "before" else "before")
            return _document(value, other if isinstance(other, str) else None)
        if table is None and column in _QUERY_LINKS and isinstance(value, str) and value:
            # A canned query's user, reason or rule: a link to those decisions on the Activity page.
            args = [("_col", c) for c in self.portal.activity_columns] + _QUERY_LINKS[column](value)
            href = f"{datasette.urls.table(guard.DATABASE, 'activity_log')}?{urllib.parse.urlencode(args)}"
            return markupsafe.Markup('<a href="{}">{}</a>').format(href, value)
        return None

    @hookimpl
    def register_routes(self, datasette: Datasette) -> list[tuple[str, Callable[..., Any]]] | None:
        if not self._ours(datasette):
            return None
        return [(r"^/rules(?P<format>\.json)?$", self._rules_page)]

    async def _rules_page(self, request: Any) -> Response:
        try:
            catalog = await asyncio.to_thread(read_catalog, self.portal.admin)
        except (AdminError, db.StoreError) as exc:
            raise DatasetteError(str(exc), status=503) from exc
        if request.url_vars.get("format") == ".json":
            return Response.json(catalog.json())
        html = await self.portal.datasette.render_template(
            "safous_rules.html", {"catalog": catalog, "json_url": request.path + ".json"}, request=request)
        return Response.html(html)


_AUDIT_DENY_TITLE = "audit mode: allowed, but enforcing the policy would have denied it (code and status say why)"


def _value(row: Any, column: str) -> Any:
    """``row[column]``, or None when the page does not select that column (``_col``, ``_nocol``)."""
    return row[column] if column in row.keys() else None


def _time_ranges(request: Any) -> list[dict[str, str]]:
    """The time-range links of a log page: each keeps the page's other filters."""
    query = [(k, v) for k in request.args for v in request.args.getlist(k)]
    clear: dict[str, str | None] = dict.fromkeys(("at__gte", "at__gt", "at__lt", "at__lte"))
    now = time.time()
    ranges = [{"label": label, "href": link(request.path, query, {**clear, "at__gte": iso_time(now - seconds)})}
              for label, seconds in _TIME_RANGES]
    ranges.append({"label": "all time", "href": link(request.path, query, clear)})
    return ranges


def _document(text: str, other: str | None) -> markupsafe.Markup:
    """An audit document, one setting a line, those that differ from ``other`` (the document on
    the other side of the change) marked."""
    try:
        doc, against = json.loads(text), json.loads(other) if other else None
    except ValueError:
        return markupsafe.Markup("<pre>{}</pre>").format(text)
    if not isinstance(doc, dict):
        return markupsafe.Markup("<pre>{}</pre>").format(json.dumps(doc, indent=2, ensure_ascii=False))
    lines = []
    for key, value in doc.items():
        line = markupsafe.Markup("  {}: {}").format(json.dumps(key, ensure_ascii=False),
                                                    json.dumps(value, ensure_ascii=False))
        changed = isinstance(against, dict) and against.get(key) != value
        lines.append(markupsafe.Markup("<mark>{}</mark>").format(line) if changed else line)
    body = markupsafe.Markup(",\n").join(lines)
    return markupsafe.Markup('<pre class="audit-document">{{\n{}\n}}</pre>').format(body)

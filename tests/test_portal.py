"""The admins' portal (`safous-admin ui`): what it lets through, what it shows, how it searches.

- Its two gates, each on its own (``guard``): Datasette's permissions (an allow list) and
  SQLite's authorizer (no column outside the activity and audit logs can be read).
- Secrets: rules.db holds a clear password, client secret and Authorization header value,
  stored through the admin script, and Authorization headers written with plain SQL as an
  object and as text; the real program is crawled page by page, with every JSON and CSV export,
  and every way around the allow list is tried: none answers with a secret.
- What an admin sees: the pages, their facets, search and charts, the canned queries, the rules
  page's problems and masked secrets.
- The pure parts, table-driven: the charts' geometry, the reason index's freshness.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import socket
import sqlite3
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from sidecar.admin import cli
from sidecar.admin.portal import charts, guard
from sidecar.admin.portal.search import FTS_TABLE, ReasonIndex
from sidecar.db import ActivityRecord, connect, ensure_database, insert_activity
from sidecar.rules.secrets import MASK
from tests.helpers import http_get

# The fixtures "demo" (the scenario's rules.db) and "running" (a portal serving it).
from tests.portal_support import (  # noqa: F401
    CLIENT_SECRET,
    HEADER_TOKEN,
    NEW_PASSWORD,
    OBJECT_HEADER_TOKEN,
    PASSWORD,
    SECRETS,
    TEXT_HEADER_TOKEN,
    Demo,
    Portal,
    admin,
    demo_fixture,
    portal,
    running_fixture,
)

# ------------------------------------------------------------------------ the two gates

AUTHORIZED = [
    "SELECT * FROM activity_log",
    "SELECT before, after FROM audit_log WHERE actor = 'x'",
    "SELECT count(*) FROM rules",  # a table's size, no value
    "SELECT name, sql FROM sqlite_master",
    "PRAGMA table_info(rules)",
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) SELECT * FROM n",
    f"SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH 'refused'",
]

REFUSED = [
    "SELECT auth_password FROM rules",
    "SELECT name FROM rules",  # any column of a table outside the allow list
    "SELECT count(*) FROM rules WHERE oauth_client_secret LIKE 'o%'",  # an oracle, one letter at a time
    "SELECT headers FROM rules",
    "SELECT * FROM policies",
    "SELECT doc FROM audit_rule_doc",  # a view reads what it reads
    "SELECT raw FROM audit_rule_doc",
    "SELECT * FROM audit_policy_doc",
    "SELECT * FROM audit_pending",
    "SELECT * FROM activity_log WHERE id IN (SELECT rule_id FROM policy_rules)",
    "ATTACH DATABASE ':memory:' AS other",
    "PRAGMA query_only = OFF",
    "SELECT load_extension('x')",
    "INSERT INTO activity_log (at) VALUES ('x')",
    "DELETE FROM audit_log",
]


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A rules.db connection as the portal opens them: read-only, the index attached, the
    authorizer on."""
    db = tmp_path / "rules.db"
    ensure_database(db)
    admin(db, "rule", "add", "r", "--url", "https://x.example/", "--auth", "basic", "--username", "u",
          "--password", PASSWORD, "--action", "string:a:b")
    index = ReasonIndex(db, tmp_path)
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    conn.execute("PRAGMA query_only = ON")
    conn.execute(f"ATTACH DATABASE ? AS {guard.INDEX_SCHEMA}", (index.uri,))
    conn.set_authorizer(guard.authorize)
    yield conn
    conn.close()
    index.close()


@pytest.mark.parametrize("sql", AUTHORIZED)
def test_the_authorizer_lets_the_logs_and_the_schema_be_read(reader: sqlite3.Connection, sql: str) -> None:
    reader.execute(sql).fetchall()


@pytest.mark.parametrize("sql", REFUSED)
def test_the_authorizer_refuses_every_other_column_and_every_change(reader: sqlite3.Connection, sql: str) -> None:
    with pytest.raises(sqlite3.DatabaseError, match=r"not authorized|prohibited"):
        reader.execute(sql).fetchall()


QUERIES = frozenset({"top_denied_users"})


@pytest.mark.parametrize(("action", "resource", "allowed"), [
    ("view-instance", None, True),
    ("view-database", "safous", True),
    ("view-database", "_internal", False),
    ("view-database", "_memory", False),
    ("view-table", ("safous", "activity_log"), True),
    ("view-table", ("safous", "audit_log"), True),
    ("view-table", ("safous", "rules"), False),
    ("view-table", ("safous", "audit_rule_doc"), False),
    ("view-table", ("safous", "audit_pending"), False),
    ("view-table", ("_internal", "activity_log"), False),
    ("view-query", ("safous", "top_denied_users"), True),
    ("view-query", ("safous", "other"), False),
    ("execute-sql", "safous", False),
    ("view-database-download", "safous", False),
    ("permissions-debug", None, False),
    ("insert-row", ("safous", "activity_log"), False),
    ("some-future-action", None, False),
])
def test_permissions_are_an_allow_list(action: str, resource: object, allowed: bool) -> None:
    assert guard.permitted(action, resource, QUERIES) is allowed


# ------------------------------------------------------------------ the real program

def test_the_secrets_are_stored_in_clear(demo: tuple[Path, Demo]) -> None:
    """The control for the leak tests: the secrets are there to leak."""
    conn = sqlite3.connect(demo[0])
    try:
        stored = " ".join(str(v) for row in conn.execute("SELECT * FROM rules") for v in row)
    finally:
        conn.close()
    assert all(s in stored for s in (NEW_PASSWORD, CLIENT_SECRET, HEADER_TOKEN, OBJECT_HEADER_TOKEN,
                                     TEXT_HEADER_TOKEN))


_LINK = re.compile(r'(?:href|src|action)="([^"]*)"')
_NUMBER = re.compile(r"\d+")


def _links(page: str, text: str) -> list[str]:
    found = []
    for raw in _LINK.findall(text):
        url = urllib.parse.urljoin(page, html.unescape(raw)).split("#")[0]
        if url.startswith("/") and not url.startswith("//"):
            found.append(url)
    return found


def _shape(url: str) -> tuple[str, tuple[str, ...]]:
    """What kind of page ``url`` is: its path with numbers blanked, the names of its controls
    (``_sort``, ``_facet``...), and whether it filters."""
    parts = urllib.parse.urlsplit(url)
    names = {k if k.startswith("_") and "__" not in k else "filter" for k, _ in urllib.parse.parse_qsl(parts.query)}
    return _NUMBER.sub("N", parts.path), tuple(sorted(names))


CRAWL_AT_ONCE = 6


async def _crawl(base: str, start: list[str], *, per_shape: int = 1, limit: int = 400) -> dict[str, tuple[int, bytes]]:
    """Every page reachable from ``start`` by the portal's own links (at most ``per_shape`` of
    each kind of page: rows, sort orders and facet values repeat), with its status and body."""
    seen: dict[str, tuple[int, bytes]] = {}
    shapes: dict[tuple[str, tuple[str, ...]], int] = {}
    queue = list(start)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def fetch(url: str) -> tuple[int, bytes, list[str]]:
            async with session.get(base + url, allow_redirects=False) as resp:
                body = await resp.read()
                if "html" in resp.headers.get("content-type", ""):
                    return resp.status, body, _links(url, body.decode("utf-8", "replace"))
                if resp.status in (301, 302) and "location" in resp.headers:
                    return resp.status, body, [resp.headers["location"]]
                return resp.status, body, []

        while queue and len(seen) < limit:
            # A few pages at once, in the order found: the portal answers them in parallel.
            batch: list[str] = []
            while queue and len(batch) < CRAWL_AT_ONCE:
                url = queue.pop(0)
                shape = _shape(url)
                if url in seen or url in batch or (shapes.get(shape, 0) >= per_shape and url not in start):
                    continue
                shapes[shape] = shapes.get(shape, 0) + 1
                batch.append(url)
            for url, (status, body, links) in zip(batch, await asyncio.gather(*map(fetch, batch)), strict=True):
                seen[url] = (status, body)
                queue.extend(links)
    assert len(seen) < limit, "the crawl did not end"
    return seen


PAGES = ["/", "/safous", "/safous/activity_log", "/safous/audit_log", "/rules", "/safous/denials_last_hour",
         "/safous/top_denied_users", "/safous/webhook_failures_by_rule"]
EXPORTS = [f"{page}{suffix}" for page in PAGES[2:] if page != "/rules"
           for suffix in (".json", ".csv", ".csv?_stream=on&_size=max", ".json?_shape=array&_size=max",
                          ".json?_shape=objects&_nl=on")]
EXPORTS += ["/rules.json", "/safous/audit_log.json?_shape=array&_size=max&_col=before&_col=after",
            "/safous/activity_log/1.json", "/safous/audit_log/10.json", "/safous/audit_log/10",
            # One side of the change hidden: each document is then shown alone.
            "/safous/audit_log?_nocol=after", "/safous/audit_log?_col=before", "/safous/audit_log?_nocol=before",
            "/safous/audit_log.json?_nocol=after", "/safous/audit_log.csv?_col=before",
            "/safous/activity_log.json?_search=refused", "/safous/activity_log?_facet=source_ip&_facet=host",
            "/-/metadata.json", "/-/databases.json", "/-/settings.json", "/-/threads.json", "/-/plugins.json",
            "/-/actor.json", "/-/versions.json", "/safous.json",
            # A filter on a column the table lacks: SQLite reads "auth_password" as a string.
            "/safous/activity_log.json?auth_password__not=1"]


async def test_no_page_or_export_shows_a_secret(running: Portal) -> None:
    found = await _crawl(running.url, PAGES + EXPORTS)
    leaks = [url for url, (_, body) in found.items() if any(s.encode() in body for s in SECRETS)]
    assert not leaks
    # What was crawled is the portal with its data: every page and export answered, with the
    # masks the admin script shows where a secret is.
    assert len(found) > 100
    assert all(found[url][0] == 200 for url in PAGES + EXPORTS), [u for u in PAGES + EXPORTS if found[u][0] != 200]
    assert MASK.encode() in found["/rules"][1] and MASK in found["/rules.json"][1].decode("unicode_escape")
    audit = json.loads(found["/safous/audit_log.json?_shape=array&_size=max&_col=before&_col=after"][1])
    assert any(f"{MASK} (changed)" in (row["after"] or "") for row in audit)
    assert b"webhook unreachable" in found["/safous/activity_log.csv?_stream=on&_size=max"][1]


AROUND_THE_ALLOW_LIST = [
    "/safous/rules", "/safous/rules.json", "/safous/rules.csv?_stream=on", "/safous/rules/1", "/safous/rules/1.json",
    "/safous/policies.json", "/safous/policy_rules.json", "/safous/audit_pending.json", "/safous/admin_context.json",
    "/safous/audit_rule_doc", "/safous/audit_rule_doc.json?_shape=array", "/safous/audit_policy_doc.csv",
    "/safous/rules_version.json", "/safous/sqlite_master.json",
    "/safous?sql=select+auth_password,oauth_client_secret,headers+from+rules",
    "/safous.json?sql=select+auth_password+from+rules", "/safous.csv?sql=select+raw+from+audit_rule_doc",
    "/safous/activity_log.json?_where=id+in+(select+id+from+rules+where+auth_password+like+'H%25')",
    "/safous/activity_log.json?_search=x&_fts_table=rules&_fts_pk=id",
    "/safous/activity_log.json?_facet=auth_password",
    '/safous/activity_log.json?_through={"table":"rules","column":"auth_password","value":"x"}',
    "/safous/top_denied_users.json?sql=select+auth_password+from+rules",
    "/safous.db", "/_internal", "/_internal.json?sql=select+*+from+columns", "/_internal/columns.json",
    "/_memory", "/_memory.json?sql=select+1", "/-/permissions", "/-/permissions.json",
]


@pytest.mark.parametrize("url", AROUND_THE_ALLOW_LIST)
async def test_raw_tables_views_and_sql_are_refused(running: Portal, url: str) -> None:
    status, _, body = await http_get(running.url + url)
    assert status in (400, 403, 404), (status, body[:300])
    assert not any(s.encode() in body for s in SECRETS)


async def test_a_request_naming_another_host_is_refused(running: Portal) -> None:
    port = urllib.parse.urlsplit(running.url).port
    url = running.url + "/safous/activity_log.json"
    assert (await http_get(url, headers={"Host": f"attacker.example:{port}"}))[0] == 421
    assert (await http_get(url, headers={"Host": f"localhost:{port}"}))[0] == 200


async def _json(url: str) -> object:
    status, _, body = await http_get(url)
    assert status == 200, body[:500]
    return json.loads(body)


async def test_the_activity_page_has_facets_search_time_range_and_charts(running: Portal, demo: tuple[Path, Demo]
                                                                           ) -> None:
    status, _, body = await http_get(running.url + "/safous/activity_log")
    text = html.unescape(body.decode())
    assert status == 200
    assert "100 rows sorted by at descending" in text
    for facet in ("decision", "audit mode", "code", "policy", "username"):
        assert re.search(f'<strong>{facet}\\s*<span class="facet-info-total">', text), facet
    assert '<span class="decision decision-deny">deny</span>' in text and demo[1].denied_reason in text
    assert '<input id="_search" type="search" name="_search"' in text
    assert "last 15 minutes" in text and "at__gte=" in text
    assert 'class="safous-time-chart"' in text and 'class="bar-denied"' in text and 'class="bar-code"' in text
    # The request id links to every decision of that request.
    assert f'href="/safous/activity_log?request_id={demo[1].denied_request_id}"' in text

    rows = await _json(running.url + "/safous/activity_log.json?_search=connection+refused&_shape=array&_size=max")
    assert isinstance(rows, list) and len(rows) == 24
    assert {r["code"] for r in rows} == {"webhook_unreachable"}
    # Allowed with a webhook failure: only where a policy in audit mode let it through.
    rows = await _json(running.url + "/safous/activity_log.json?_search=refused&allowed=1&_shape=array&_size=max")
    assert isinstance(rows, list) and len(rows) == 12
    assert {(r["policy"], r["audit_deny"]) for r in rows} == {("legacy-trial", 1)}
    rows = await _json(running.url + f"/safous/activity_log.json?request_id={demo[1].denied_request_id}&_shape=array")
    assert isinstance(rows, list) and [(r["allowed"], r["status"]) for r in rows] == [(0, demo[1].denied_reason)]


async def test_the_charts_count_the_selection(running: Portal) -> None:
    """Filtered to one code, the charts hold those decisions only, and each bar links to its
    own time range."""
    status, _, body = await http_get(running.url + "/safous/activity_log?code=webhook_unreachable")
    text = html.unescape(body.decode())
    assert status == 200
    assert "— 0 allowed, 12 denied, 12 allowed by audit mode (would deny)," in text
    assert 'class="bar-audit"' in text
    assert re.findall(r'<text x="[\d.]+" y="\d+" class="count">([\d,]+)</text>', text) == ["12"]
    assert "code=webhook_unreachable&at__gte=" in text


async def test_the_audit_page_shows_who_changed_what_with_before_and_after(running: Portal) -> None:
    status, _, body = await http_get(running.url + "/safous/audit_log?object_name=device-posture&action=edit")
    text = html.unescape(body.decode())
    assert status == 200 and "1 row where action = " in text
    assert "portal-test" in text
    assert f'<mark>  "password": "{MASK} (changed)"</mark>' in text
    rows = await _json(running.url + "/safous/audit_log.json?actor=sql&_shape=array")
    assert isinstance(rows, list)
    assert sorted((r["action"], r["object_name"]) for r in rows) == [
        ("create", "sso-object"), ("create", "sso-text"), ("edit", "geo-fence")]
    # Headers written with plain SQL in shapes the admin script never writes: masked all the same.
    after = {r["object_name"]: json.loads(r["after"]) for r in rows}
    assert (after["sso-object"]["headers"], after["sso-text"]["headers"]) == ({"Authorization": MASK}, MASK)


async def test_an_audit_document_shows_alone_when_the_other_side_is_hidden(running: Portal) -> None:
    for hidden, shown in (("after", "before"), ("before", "after")):
        status, _, body = await http_get(
            running.url + f"/safous/audit_log?object_name=device-posture&action=edit&_nocol={hidden}")
        text = html.unescape(body.decode())
        assert status == 200, text[:500]
        assert f'<td class="col-{shown} type-str"><pre class="audit-document">' in text
        assert "<mark>" not in text  # nothing to compare with


async def test_the_rules_page_is_what_the_admin_script_shows(running: Portal, demo: tuple[Path, Demo]) -> None:
    status, _, body = await http_get(running.url + "/rules")
    text = html.unescape(body.decode())
    assert status == 200
    shown = CliRunner().invoke(cli, ["--db", str(demo[0]), "rule", "show", "legacy-sso"])
    assert shown.exit_code == 0 and shown.output.strip() in text
    shown = CliRunner().invoke(cli, ["--db", str(demo[0]), "policy", "show", "app"])
    assert shown.output.strip() in text
    # What does not validate, with the admin script's words.
    problems = re.search(r'<table class="rows-and-columns safous-problems">(.*?)</table>', text, re.S)
    assert problems and "rule geo-fence" in problems[1] and "does not compile" in problems[1]
    assert "policy geo" in problems[1] and "rule_invalid" in problems[1]
    assert '<a href="#rule-device-posture' in text
    document = await _json(running.url + "/rules.json")
    assert isinstance(document, dict)
    legacy = next(r for r in document["rules"] if r["name"] == "legacy-sso")
    assert legacy["headers"] == [["Authorization", MASK]] and legacy["policies"] == ["legacy", "legacy-trial"]
    rules = {r["name"]: r for r in document["rules"]}
    assert (rules["sso-object"]["headers"], rules["sso-text"]["headers"]) == ({"Authorization": MASK}, MASK)
    shown = CliRunner().invoke(cli, ["--db", str(demo[0]), "rule", "show", "sso-object"])
    assert shown.exit_code == 0 and f"headers    Authorization={MASK}\n" in shown.output
    assert shown.output.strip() in text
    assert next(p for p in document["policies"] if p["name"] == "app")["rules"] == ["device-posture"]


async def test_the_canned_queries(running: Portal, demo: tuple[Path, Demo]) -> None:
    failures = await _json(running.url + "/safous/webhook_failures_by_rule.json?_shape=array")
    assert isinstance(failures, list)
    # legacy-sso fails behind two policies: one denies, one in audit mode allows (still a failure).
    assert [(f["rule"], f["failures"], f["timeouts"], f["unreachable"], f["bad_status"], f["audit_mode"])
            for f in failures] == [("legacy-sso", 24, 0, 24, 0, 12), ("hr-directory", 4, 4, 0, 0, 0)]
    users = await _json(running.url + "/safous/top_denied_users.json?_shape=array")
    # Denied: value_mismatch, no_matching_policy, rule_invalid, webhook_unreachable 12 each, 4 timeouts.
    assert isinstance(users, list) and sum(u["denials"] for u in users) == 52
    reasons = await _json(running.url + "/safous/denials_last_hour.json?_shape=array")
    assert isinstance(reasons, list)
    assert {(r["reason"], r["denials"]) for r in reasons} >= {(demo[1].denied_reason, 12)}
    # Each user and reason links to its denials on the Activity page, each rule to its failures.
    for query, value, count, allowed in (
            ("webhook_failures_by_rule", "legacy-sso", 24, {0, 1}), ("top_denied_users", "carol", None, {0}),
            ("denials_last_hour", demo[1].denied_reason, 12, {0})):
        _, _, body = await http_get(f"{running.url}/safous/{query}")
        href = re.search(rf'<a href="([^"]+)">{re.escape(value)}</a>', html.unescape(body.decode()))
        assert href, (query, value)
        rows = await _json(running.url + href[1].replace("/activity_log?", "/activity_log.json?")
                           + "&_shape=array&_size=max")
        assert isinstance(rows, list) and rows and {r["allowed"] for r in rows} == allowed
        expected = count if count is not None else next(u["denials"] for u in users if u["user"] == value)
        assert len(rows) == expected, (query, value)


async def test_audit_mode_would_be_denials_are_not_shown_as_plain_allows(running: Portal) -> None:
    """The audit-mode policy's rows: allowed, yet the page says enforcement would have denied
    them, with a facet of their own."""
    status, _, body = await http_get(running.url + "/safous/activity_log?policy=legacy-trial")
    text = html.unescape(body.decode())
    assert status == 200 and '12 rows where policy = "legacy-trial"' in text
    assert text.count(">allow (audit)</span>") == 12 and text.count(">would deny</span>") >= 12
    assert '<span class="decision decision-allow">allow</span>' not in text
    facet = re.search(r'<div class="facet-info[^"]*" id="facet-audit_deny[^"]*".*?</div>', text, re.S)
    assert facet and re.search(r'>would deny</a> 12\b', facet[0]), facet and facet[0]
    # The Activity page as the navigation links it shows the column.
    status, _, body = await http_get(running.url + "/")
    href = re.search(r'<a href="(/safous/activity_log\?[^"]+)">Activity</a>', html.unescape(body.decode()))
    assert href and "_col=audit_deny" in href[1]


# ----------------------------------------------------------------------- the command

def test_ui_refuses_a_missing_database_and_a_bad_address(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "nope.db"), "ui"])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (tmp_path / "nope.db").exists()
    ensure_database(tmp_path / "rules.db")
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "rules.db"), "ui", "--listen", "8001"])
    assert result.exit_code == 2 and "Error: --listen: '8001' is not HOST:PORT" in result.output
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["--db", str(tmp_path / "rules.db"), "ui", "--listen", f"127.0.0.1:{port}"])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output


def test_ui_says_what_it_does() -> None:
    result = CliRunner().invoke(cli, ["ui", "--help"])
    assert result.exit_code == 0
    assert "Browse rules.db in a web browser, read-only." in result.output
    assert "--listen HOST:PORT" in result.output and "[default: 127.0.0.1:8001]" in result.output


# --------------------------------------------------------------------------- charts

@pytest.mark.parametrize(("span", "bucket"), [
    (0, 1), (59, 1), (61, 5), (300, 5), (301, 10), (3600, 60), (3601, 300), (86400, 3600),
    (86401, 3600), (60 * 3600 + 1, 3 * 3600), (30 * 86400, 86400), (10 * 365 * 86400, 30 * 86400),
])
def test_a_bar_covers_the_smallest_width_that_fits_the_range(span: float, bucket: int) -> None:
    assert charts.choose_bucket(span) == bucket


def test_the_time_chart_stacks_denials_under_allowed_and_scales_to_the_peak() -> None:
    chart = charts.time_chart({100: (3, 1, 0), 102: (0, 2, 2)}, 100, 4, 60, path="/p",
                              query=[("code", "x"), ("_next", "5")])
    assert [(b.allowed, b.denied, b.audit) for b in chart.bars] == [(3, 1, 0), (0, 0, 0), (0, 2, 2), (0, 0, 0)]
    assert chart.peak == 4 and chart.allowed == 3 and chart.denied == 3 and chart.audit == 2
    assert chart.bucket == "minute"
    first, third = chart.bars[0], chart.bars[2]
    assert first.denied_height == charts.HEIGHT / 4 and first.allowed_y == 0
    # Audit mode's would-be denials between the denials and the allowed.
    assert third.denied_y == charts.HEIGHT / 2 and third.audit_y == 0 and third.audit_height == charts.HEIGHT / 2
    assert first.x == charts.LEFT and first.width == charts.WIDTH / 4
    assert first.href == "/p?code=x&at__gte=1970-01-01T01%3A40%3A00.000Z&at__lt=1970-01-01T01%3A41%3A00.000Z"
    assert [label for _, label in chart.ticks] == ["01:40", "01:42", "01:44"]
    assert chart.period == "1970-01-01 01:40 to 01:44 UTC"


def test_the_codes_chart_lists_the_most_frequent_first_linking_to_them() -> None:
    chart = charts.code_chart([("value_mismatch", 8), ("webhook_timeout", 2)], path="/a", query=[("allowed", "0")])
    assert [(b.code, b.count, b.width) for b in chart.bars] == [
        ("value_mismatch", 8, charts.CODE_WIDTH), ("webhook_timeout", 2, charts.CODE_WIDTH / 4)]
    assert chart.bars[1].href == "/a?allowed=0&code=webhook_timeout"


# ---------------------------------------------------------------------- reason index

def _record(i: int, status: str) -> ActivityRecord:
    return ActivityRecord(at=1_800_000_000 + i, request_id=f"r{i}", username="u", source_ip="1.2.3.4", host="h",
                          path="/", method="GET", policy="p", allowed=False, code="value_mismatch", status=status,
                          latency_ms=1.0)


def test_the_reason_index_follows_the_log_as_it_grows_and_is_pruned(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"
    ensure_database(db)
    writer = connect(db)
    index = ReasonIndex(db, tmp_path)
    reader = sqlite3.connect(db)
    reader.execute("ATTACH DATABASE ? AS portal", (index.uri,))

    def found(words: str) -> list[str]:
        return [r for (r,) in reader.execute(
            f"SELECT request_id FROM activity_log WHERE id IN (SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} "
            "MATCH ?) ORDER BY id", (words,))]

    try:
        insert_activity(writer, [_record(1, "webhook did not answer"), _record(2, "status is unknown")])
        assert index.catch_up() == 2 and index.catch_up() == 0
        assert found("answer") == ["r1"]
        insert_activity(writer, [_record(3, "webhook unreachable")])
        assert index.catch_up() == 1 and found("webhook") == ["r1", "r3"]
        # Pruning older rows leaves the index alone: their ids match nothing any more.
        writer.execute("DELETE FROM activity_log WHERE id = 1")
        assert index.catch_up() == 0 and found("webhook") == ["r3"]
        # Emptied, the log gives ids again from 1: the index is built anew.
        writer.execute("DELETE FROM activity_log")
        insert_activity(writer, [_record(4, "rule is invalid")])
        assert index.catch_up() == 1
        assert found("webhook") == [] and found("invalid") == ["r4"]
    finally:
        reader.close()
        writer.close()
        index.close()


async def test_a_search_sees_every_decision_committed_before_it(tmp_path: Path) -> None:
    """Against a log that grows while the portal runs: no wait for a background refresh."""
    db = tmp_path / "rules.db"
    ensure_database(db)
    writer = connect(db)
    try:
        with portal(db) as live:
            for i in range(3):
                insert_activity(writer, [_record(i, f"word{i} appears")])
                rows = await _json(live.url + f"/safous/activity_log.json?_search=word{i}&_shape=array")
                assert isinstance(rows, list) and [r["request_id"] for r in rows] == [f"r{i}"]
    finally:
        writer.close()

"""The Activity page's two charts: allowed vs denied over time, and denials by code.

Decisions a policy in audit mode let through although its rules failed (``audit_deny``) are a
third part of each time bar, between denied and allowed: counted as allowed, they would hide
what enforcing the policy will deny.

Drawn on the server as inline SVG by a small template (``templates/_safous_charts.html``), from
two GROUP BY queries over the rows the page selects (its filters, facets, time range and
search), so a chart always says the same thing as the table under it, needs no JavaScript
and no request of the browser's own, and loads nothing from outside. The charting plugins
were measured against that: datasette-dashboards (the maintained one) draws with ~820 kB of
Vega fetched by the browser and runs its charts' SQL through ``/db.json?sql=``, which needs the
arbitrary SQL the portal refuses; datasette-vega (2018) ships ~940 kB of JavaScript and is a
chart builder, not a chart; datasette-plot needs Datasette 1.0 alphas; datasette-chartjs loads
Chart.js from a CDN.

Without a time filter the charts cover the last 24 hours of the selection (two scans of the
whole log would cost a second on a million rows); with one, the range asked for.

``time_chart`` and ``code_chart`` are pure (counts in, geometry out); ``activity_charts`` runs
the queries through Datasette, on its read-only connections.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.db import iso_time, parse_iso_time

__all__ = [
    "BUCKETS",
    "CodeBar",
    "CodeChart",
    "TimeBar",
    "TimeChart",
    "activity_charts",
    "choose_bucket",
    "code_chart",
    "link",
    "time_chart",
]

BUCKETS = (1, 5, 10, 30, 60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)
"""The widths a bar of the time chart may cover, in seconds: the smallest that gives at most
``MAX_BARS`` bars over the range."""

MAX_BARS = 60
DEFAULT_WINDOW = 86400.0
"""What the charts cover when the page has no time filter: the last day of the selection."""

WIDTH, HEIGHT = 720, 150  # the time chart's plotting area, in SVG units
LEFT, BOTTOM = 44, 22  # room for the count axis and the time labels
CODE_WIDTH = 420  # the longest bar of the codes chart
MAX_CODES = 12

_LOWER = ("at__gte", "at__gt")
_UPPER = ("at__lt", "at__lte")


@dataclass(frozen=True, slots=True)
class TimeBar:
    """One bucket of the time chart: its counts, where it is drawn, where it links (the same
    selection within the bucket). ``allowed`` leaves out ``audit``: the would-be denials audit
    mode allowed."""

    start: str
    end: str
    allowed: int
    denied: int
    audit: int
    x: float
    width: float
    allowed_height: float
    denied_height: float
    audit_height: float
    href: str

    @property
    def denied_y(self) -> float:
        return HEIGHT - self.denied_height

    @property
    def audit_y(self) -> float:
        return HEIGHT - self.denied_height - self.audit_height

    @property
    def allowed_y(self) -> float:
        return HEIGHT - self.denied_height - self.audit_height - self.allowed_height

    @property
    def drawn_width(self) -> float:
        """The bar without the gap to the next one."""
        return self.width * 0.85


@dataclass(frozen=True, slots=True)
class TimeChart:
    bars: tuple[TimeBar, ...]
    ticks: tuple[tuple[float, str], ...]  # (x, label) under the axis
    peak: int  # the count at the top of the axis
    bucket: str  # "1 minute"
    period: str  # "2026-11-28 14:00 to 15:00 UTC", to the precision of the bars
    allowed: int
    denied: int
    audit: int

    left = LEFT
    baseline = HEIGHT  # the y of the zero line; the tallest bar reaches 0

    @property
    def total_width(self) -> int:
        return LEFT + WIDTH

    @property
    def total_height(self) -> int:
        return HEIGHT + BOTTOM + 8


@dataclass(frozen=True, slots=True)
class CodeBar:
    code: str
    count: int
    width: float
    href: str


@dataclass(frozen=True, slots=True)
class CodeChart:
    bars: tuple[CodeBar, ...]

    @property
    def total_height(self) -> int:
        return 22 * len(self.bars) + 4


def choose_bucket(span: float) -> int:
    """The smallest of ``BUCKETS`` that covers ``span`` seconds in at most ``MAX_BARS`` bars."""
    return next((b for b in BUCKETS if span / b <= MAX_BARS), BUCKETS[-1])


def _duration(seconds: int) -> str:
    """``second``, ``5 seconds``, ``minute``, ``3 hours``..."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds % size == 0:
            n = seconds // size
            return unit if n == 1 else f"{n} {unit}s"
    raise AssertionError("unreachable: every duration is whole seconds")


def link(path: str, query: Sequence[tuple[str, str]], replace: Mapping[str, str | None]) -> str:
    """``path`` with the query string ``query``, the keys of ``replace`` replaced (None drops
    one), and the page (``_next``) reset."""
    kept = [(k, v) for k, v in query if k not in replace and k != "_next"]
    kept += [(k, v) for k, v in replace.items() if v is not None]
    return path + ("?" + urllib.parse.urlencode(kept) if kept else "")


def time_chart(counts: Mapping[int, tuple[int, int, int]], first: int, bars: int, bucket: int, *,
               path: str, query: Sequence[tuple[str, str]]) -> TimeChart:
    """The time chart of ``bars`` buckets of ``bucket`` seconds from bucket number ``first``
    (epoch seconds // bucket); ``counts``: (allowed, denied, allowed by audit mode) by bucket
    number, absent = none."""
    peak = max((sum(c) for c in counts.values()), default=0)
    scale = HEIGHT / peak if peak else 0.0
    width = WIDTH / bars
    drawn = []
    for i in range(bars):
        allowed, denied, audit = counts.get(first + i, (0, 0, 0))
        start, end = iso_time((first + i) * bucket), iso_time((first + i + 1) * bucket)
        drawn.append(TimeBar(
            start=start, end=end, allowed=allowed, denied=denied, audit=audit, x=LEFT + i * width, width=width,
            allowed_height=allowed * scale, denied_height=denied * scale, audit_height=audit * scale,
            href=link(path, query, {**dict.fromkeys(_LOWER + _UPPER), "at__gte": start, "at__lt": end}),
        ))
    fmt = _tick_format(bucket, bars)
    ticks = tuple((LEFT + i * width, time.strftime(fmt, time.gmtime((first + i) * bucket)))
                  for i in sorted({0, bars // 2, bars}))
    return TimeChart(
        bars=tuple(drawn), ticks=ticks, peak=peak, bucket=_duration(bucket),
        period=_period(first * bucket, (first + bars) * bucket, bucket),
        allowed=sum(c[0] for c in counts.values()), denied=sum(c[1] for c in counts.values()),
        audit=sum(c[2] for c in counts.values()),
    )


def _period(start: int, end: int, bucket: int) -> str:
    precise = "%Y-%m-%d" if bucket >= 86400 else "%Y-%m-%d %H:%M" if bucket >= 60 else "%Y-%m-%d %H:%M:%S"
    first, last = (time.strftime(precise, time.gmtime(t)) for t in (start, end))
    if first[:10] == last[:10] and bucket < 86400:
        last = last[11:]  # the same day: its date once
    return f"{first} to {last} UTC"


def _tick_format(bucket: int, bars: int) -> str:
    if bucket >= 86400:
        return "%Y-%m-%d"
    if bucket * bars > 86400:
        return "%m-%d %H:%M"
    return "%H:%M:%S" if bucket < 60 else "%H:%M"


def code_chart(counts: Sequence[tuple[str, int]], *, path: str, query: Sequence[tuple[str, str]]) -> CodeChart:
    """Denials by code, most first: one bar per code, linking to those denials."""
    top = max((n for _, n in counts), default=0)
    return CodeChart(tuple(
        CodeBar(code, n, CODE_WIDTH * n / top if top else 0.0,
                link(path, query, {"allowed": "0", "code": code}))
        for code, n in counts[:MAX_CODES]))


@dataclass(frozen=True, slots=True)
class Charts:
    """What the Activity page draws above its table (``None`` charts: nothing selected)."""

    time: TimeChart | None
    codes: CodeChart | None
    window_note: str | None  # why the charts cover less than the selection


def _bound(query: Sequence[tuple[str, str]], keys: Sequence[str]) -> float | None:
    for key, value in query:
        if key in keys:
            try:
                return parse_iso_time(value)
            except ValueError:
                return None
    return None


async def activity_charts(database: Any, table: str, where: Sequence[str], params: Mapping[str, Any], *,
                          path: str, query: Sequence[tuple[str, str]]) -> Charts:
    """Both charts over the rows of ``table`` (the activity log) that ``where`` selects (the
    page's own clauses and ``params``), queried through ``database`` (a Datasette ``Database``).
    ``path`` and ``query``: the page's, for the bars' links."""
    clause = " AND ".join(where) or "1"
    args = dict(params)
    span = (await database.execute(f"SELECT min(at), max(at) FROM {table} WHERE {clause}", args)).first()
    if span is None or span[0] is None:
        return Charts(None, None, None)
    oldest, newest = parse_iso_time(span[0]), parse_iso_time(span[1])
    lower, upper = _bound(query, _LOWER), _bound(query, _UPPER)
    note = None
    start = lower if lower is not None else oldest
    if lower is None and upper is None and newest - oldest > DEFAULT_WINDOW:
        start = newest - DEFAULT_WINDOW
        note = "the last 24 hours of the selection: choose a time range to see earlier decisions"
    end = upper if upper is not None else newest
    end = max(end, start + 1)
    bucket = choose_bucket(end - start)
    first = math.floor(start / bucket)
    # An upper bound is exclusive; without one, the newest decision's bar is the last.
    bars = max(1, (math.ceil(end / bucket) if upper is not None else math.floor(end / bucket) + 1) - first)
    args.update(chart_start=iso_time(first * bucket), chart_end=iso_time((first + bars) * bucket))
    window = f"({clause}) AND at >= :chart_start AND at < :chart_end"
    rows = await database.execute(
        f"SELECT CAST(strftime('%s', at) AS INTEGER) / {bucket} AS b, sum(allowed = 1 AND audit_deny = 0), "
        f"sum(allowed = 0), sum(allowed = 1 AND audit_deny = 1) FROM {table} WHERE {window} GROUP BY b", args)
    counts = {int(b): (int(a or 0), int(d or 0), int(w or 0)) for b, a, d, w in rows if b is not None}
    codes = await database.execute(
        f"SELECT code, count(*) AS n FROM {table} WHERE {window} AND allowed = 0 "
        "GROUP BY code ORDER BY n DESC, code", args)
    return Charts(
        time_chart(counts, first, bars, bucket, path=path, query=query),
        code_chart([(str(c), int(n)) for c, n in codes], path=path, query=query),
        note,
    )

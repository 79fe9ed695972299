"""`make soak`: the real sidecar behind a real Envoy, at a steady load with webhook faults, for a
bounded time; then a report and a verdict.

    python -m tests.soak [--duration SECONDS] [--rate N] [--in-flight N]

What runs (all on loopback):

- a webhook server process (``python -m tests.soak webhook PORT``, aiohttp) that answers by the
  kind the load chose, read from the ``x-soak`` request header that the rule forwards as
  ``%headers.x-soak%``: ``yes`` (status active), ``slow`` (active after 100 ms, inside the rule's
  500 ms timeout), ``no`` (status suspended), ``503``, ``timeout`` (active, but only after 1 s:
  past the rule's timeout, so an allow would mean the sidecar waited too long);
- the sidecar program (``python -m sidecar serve --http ...``) on a fresh rules.db holding one
  policy (``/soak``) with one rule calling that webhook; requests to ``/other`` match no policy;
- Envoy on the shipped ``envoy/envoy.yaml`` (the app replaced by a ``direct_response``);
- the load: an asyncio aiohttp client sending ``--rate`` requests per second on a fixed schedule
  (open loop: a slow sidecar does not slow the load down), at most ``--in-flight`` at once, each
  request of a kind chosen by its counter and unique (no cache, no single-flight merging).

Why not wrk with a Lua script: the verdict is per request (every ``no``/``503``/``timeout``
request must be denied, with its code read from the JSON body), which a Lua ``response()`` can
only tally coarsely, and wrk's closed loop slows down with the server instead of keeping a steady
rate. A few hundred requests per second are well within an asyncio client's reach.

PASS when nothing was lost (activity-log rows == decisions − dropped), no request of a failing
kind was allowed, the sidecar's memory and file descriptors stayed flat after warm-up, and it
never stopped answering (no client errors, no Envoy-made denials, Envoy's ``ext_authz.error`` and
``ext_authz.failure_mode_allowed`` at 0, exit 0 on SIGTERM). Exit status 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.benchmark import process, rss_mb
from tests.helpers import ROOT, eventually, free_port

# ------------------------------------------------------------------------------ load shape

RULE_TIMEOUT_MS = 500
SLOW_SECONDS = 0.1      # "slow": answers inside the rule's timeout
TIMEOUT_SECONDS = 1.0   # "timeout": answers (active!) only after the rule's timeout
CLIENT_TIMEOUT = 10.0   # Envoy answers every request within its ext_authz timeout (1.5 s)


@dataclass(frozen=True)
class Kind:
    allowed: bool
    code: str           # the decision code the client should see
    calls_webhook: bool = True


KINDS = {
    "yes": Kind(True, "rules_passed"),
    "slow": Kind(True, "rules_passed"),
    "no": Kind(False, "value_mismatch"),
    "503": Kind(False, "webhook_status"),
    "timeout": Kind(False, "webhook_timeout"),
    "nomatch": Kind(False, "no_matching_policy", calls_webhook=False),
}
# Request n has kind CYCLE[n % 20]: 45% yes, 15% slow, 15% no, 10% 503, 5% timeout, 5% nomatch.
CYCLE = ("yes", "no", "yes", "slow", "yes", "503", "yes", "no", "yes", "timeout",
         "yes", "slow", "yes", "no", "yes", "503", "yes", "slow", "nomatch", "yes")

# ------------------------------------------------------------------------- pass thresholds
# Memory: after warm-up (grpc, aiohttp and sqlite caches, pymalloc arenas filled), RSS moves by a
# few MB with the in-flight count. 20 MB over the rest of the run catches a leak of ~1.5 KB per
# request in the 30 s run (≈ 3,600 requests after warm-up at 150/s) and ~500 bytes per request
# in the 5-minute run.
RSS_GROWTH_LIMIT_MB = 20.0
# Descriptors: the webhook connection pool follows the number of calls in flight (rate × webhook
# latency ≈ 5-15 at 150/s) and a timed-out call closes its connection, so a handful come and go;
# a leak of one per request or per timeout would exceed 10 within seconds.
FD_TOLERANCE = 10
# Decisions other than the kind's own (e.g. a "slow" answer past the rule's timeout because the
# shared machine stalled for 400 ms) are fail-closed denials, not a security problem, but more
# than 1% of them would mean the sidecar cannot keep up with this load.
UNEXPECTED_LIMIT = 0.01
SAMPLE_WINDOW = 5  # one-second samples of RSS and descriptors, medians compared
ENVOY_DENY = "(empty 403: Envoy's own deny)"


def warmup_seconds(duration: float) -> float:
    return min(30.0, duration / 5)


# ------------------------------------------------------------------------ webhook process

def _webhook_main(port: int) -> None:
    """The third-party API: answers by the kind in ``?k=KIND-N``; ``/stats`` counts the calls."""
    from aiohttp import web

    calls: Counter[str] = Counter()
    active = {"status": "active", "tier": "gold"}

    async def decide(request: web.Request) -> web.Response:
        kind = request.query.get("k", "").rpartition("-")[0]
        calls[kind] += 1
        if kind == "yes":
            return web.json_response(active)
        if kind == "slow":
            await asyncio.sleep(SLOW_SECONDS)
            return web.json_response(active)
        if kind == "no":
            return web.json_response({"status": "suspended"})
        if kind == "503":
            return web.json_response({"error": "try later"}, status=503)
        if kind == "timeout":
            await asyncio.sleep(TIMEOUT_SECONDS)
            return web.json_response(active)
        return web.json_response({"error": f"unknown kind {kind!r}"}, status=400)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(dict(calls))

    app = web.Application()
    app.router.add_get("/decide", decide)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------------------- the report

@dataclass
class Sample:
    at: float   # seconds since the load started
    rss_mb: float
    fds: int


@dataclass
class Report:
    duration: float
    rate: float
    max_in_flight: int
    sent: int = 0
    skipped: int = 0                      # due while --in-flight requests were pending
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, "allow" | code)
    client_errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    rss_idle_mb: float = 0.0
    fds_idle: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    envoy: dict[str, int] = field(default_factory=dict)
    webhook_calls: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    exit_seconds: float = 0.0
    stopped: dict | None = None           # the sidecar's "stopped" log line
    rows: int = 0
    rows_allowed_by_kind: Counter[str] = field(default_factory=Counter)
    rows_by_kind: Counter[str] = field(default_factory=Counter)
    workdir: Path | None = None

    # ---------------------------------------------------------------------- derived numbers
    def count(self, *, kind: str | None = None, outcome: str | None = None) -> int:
        return sum(n for (k, o), n in self.outcomes.items()
                   if (kind is None or k == kind) and (outcome is None or o == outcome))

    @property
    def answered(self) -> int:
        return sum(self.outcomes.values())

    @property
    def allowed(self) -> int:
        return self.count(outcome="allow")

    @property
    def decisions(self) -> int:
        """Responses that carry a decision of the sidecar (200, or 403 with its JSON body)."""
        return self.answered - self.count(outcome=ENVOY_DENY)

    @property
    def dropped(self) -> int | None:
        return None if self.stopped is None else int(self.stopped.get("activity_dropped", -1))

    @property
    def wrong_allows(self) -> int:
        return sum(self.count(kind=k, outcome="allow") for k, spec in KINDS.items() if not spec.allowed)

    @property
    def unexpected(self) -> int:
        """Decisions other than the kind's expected one (wrong allows included)."""
        return sum(n for (k, o), n in self.outcomes.items()
                   if o != ("allow" if KINDS[k].allowed else KINDS[k].code))

    @staticmethod
    def _median(samples: list[Sample]) -> Sample | None:
        """The median RSS and descriptor count of a few one-second samples (one odd sample,
        e.g. taken during a burst of webhook connections, does not decide the verdict)."""
        if not samples:
            return None
        rss = sorted(s.rss_mb for s in samples)[len(samples) // 2]
        fds = sorted(s.fds for s in samples)[len(samples) // 2]
        return Sample(samples[len(samples) // 2].at, rss, fds)

    @property
    def after_warmup(self) -> Sample | None:
        """Median of the first SAMPLE_WINDOW samples after the warm-up."""
        warm = [s for s in self.samples if s.at >= warmup_seconds(self.duration)]
        return self._median(warm[:SAMPLE_WINDOW] or self.samples[-SAMPLE_WINDOW:])

    @property
    def end(self) -> Sample | None:
        """Median of the last SAMPLE_WINDOW samples of the load."""
        return self._median(self.samples[-SAMPLE_WINDOW:])

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(q * len(values)))]

    # ---------------------------------------------------------------------------- verdict
    def criteria(self) -> list[tuple[str, bool, str]]:
        warm, end = self.after_warmup, self.end
        rss_growth = (end.rss_mb - warm.rss_mb) if warm and end else float("inf")
        fd_change = (end.fds - warm.fds) if warm and end else 10**6
        dropped = self.dropped
        envoy_errors = self.envoy.get("ext_authz.error", -1)
        envoy_fma = self.envoy.get("ext_authz.failure_mode_allowed", -1)
        written_line = None if self.stopped is None else self.stopped.get("activity_written")
        per_kind_rows_ok = all(self.rows_allowed_by_kind[k] == 0 for k, s in KINDS.items() if not s.allowed)
        return [
            ("load ran: every scheduled request sent, each answered",
             self.sent > 0 and self.skipped == 0 and self.answered == self.sent - sum(self.client_errors.values()),
             f"{self.sent:,} sent, {self.skipped} skipped (in-flight bound), {self.answered:,} answered"),
            ("nothing lost: activity rows == decisions - dropped",
             dropped is not None and dropped >= 0 and self.rows == self.decisions - dropped
             and written_line == self.rows,
             (f"{self.rows:,} rows == {self.decisions:,} - {dropped} dropped; "
              f"'stopped' line: written {written_line}")),
            ("no allow where the webhook said no or failed (client)", self.wrong_allows == 0,
             (f"{self.wrong_allows} wrong allows among "
              f"{sum(self.count(kind=k) for k, s in KINDS.items() if not s.allowed):,} no/503/timeout/nomatch")),
            ("no allow where the webhook said no or failed (activity log)", per_kind_rows_ok,
             ", ".join(f"{k}: {self.rows_allowed_by_kind[k]}" for k, s in KINDS.items() if not s.allowed)),
            (f"decisions as expected by kind (fail-closed deviations <= {UNEXPECTED_LIMIT:.0%})",
             self.unexpected <= UNEXPECTED_LIMIT * max(self.answered, 1),
             f"{self.unexpected} unexpected"),
            (f"memory flat: RSS growth after warm-up < {RSS_GROWTH_LIMIT_MB:g} MB", rss_growth < RSS_GROWTH_LIMIT_MB,
             f"{rss_growth:+.1f} MB"),
            (f"descriptors flat: within ±{FD_TOLERANCE} after warm-up", abs(fd_change) <= FD_TOLERANCE,
             f"{fd_change:+d}"),
            ("never stopped answering: no client errors", not self.client_errors,
             ", ".join(f"{k}: {v}" for k, v in self.client_errors.items()) or "none"),
            ("never stopped answering: no 403 made by Envoy itself", self.count(outcome=ENVOY_DENY) == 0,
             str(self.count(outcome=ENVOY_DENY))),
            ("never stopped answering: Envoy ext_authz.error and failure_mode_allowed == 0",
             envoy_errors == 0 and envoy_fma == 0, f"error {envoy_errors}, failure_mode_allowed {envoy_fma}"),
            ("exits 0 on SIGTERM", self.exit_code == 0, f"exit {self.exit_code} after {self.exit_seconds:.1f} s"),
        ]

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.criteria())

    # ----------------------------------------------------------------------------- table
    def table(self) -> str:
        lines: list[str] = []

        def section(title: str, rows: list[tuple[str, str]]) -> None:
            width = max(len(k) for k, _ in rows)
            lines.append(f"\n{title}")
            lines.append("-" * len(title))
            lines.extend(f"  {k.ljust(width)}  {v}" for k, v in rows)

        seconds = self.duration
        section(f"Soak: {seconds:g} s at {self.rate:g} requests/s (at most {self.max_in_flight} in flight), "
                f"warm-up {warmup_seconds(seconds):g} s", [
                    ("requests sent", f"{self.sent:,}"),
                    ("answered", f"{self.answered:,}"),
                    ("allowed (200)", f"{self.allowed:,}"),
                    ("denied (403)", f"{self.answered - self.allowed:,}"),
                    ("client errors", ", ".join(f"{k}: {v}" for k, v in self.client_errors.items()) or "0"),
                    ("skipped (in-flight bound)", str(self.skipped)),
                    ("latency p50 / p99 / max", (f"{self.percentile(0.5):.1f} / {self.percentile(0.99):.1f} / "
                                                 f"{max(self.latencies_ms, default=float('nan')):.1f} ms")),
                ])
        codes = Counter()
        for (_, outcome), n in self.outcomes.items():
            if outcome != "allow":
                codes[outcome] += n
        section("Denied by code", [(code, f"{n:,}") for code, n in codes.most_common()] or [("(none)", "")])
        kind_rows = []
        for kind, spec in KINDS.items():
            got = {o: n for (k, o), n in self.outcomes.items() if k == kind}
            expected = "allow" if spec.allowed else spec.code
            text = ", ".join(f"{o} {n:,}" for o, n in sorted(got.items(), key=lambda x: -x[1])) or "-"
            calls = self.webhook_calls.get(kind, 0) if spec.calls_webhook else "-"
            kind_rows.append((f"{kind} (expect {expected})",
                              (f"{text}; activity rows {self.rows_by_kind[kind]:,} "
                               f"({self.rows_allowed_by_kind[kind]:,} allowed); webhook calls {calls}")))
        section("By kind", kind_rows)
        warm, end = self.after_warmup, self.end
        peak = max(self.samples, key=lambda s: s.rss_mb) if self.samples else None
        fds = [s.fds for s in self.samples]
        after = max(1, self.sent - int(warmup_seconds(self.duration) * self.rate))
        section(f"Sidecar resources (after warm-up and end: medians of {SAMPLE_WINDOW} one-second samples)", [
            ("RSS idle / after warm-up / end / peak",
             f"{self.rss_idle_mb:.1f} / {warm.rss_mb:.1f} / {end.rss_mb:.1f} / {peak.rss_mb:.1f} MB"
             if warm and end and peak else "-"),
            ("RSS growth after warm-up per request",
             f"{(end.rss_mb - warm.rss_mb) * 2**20 / after:+,.0f} bytes" if warm and end else "-"),
            ("open fds idle / after warm-up / end (min-max under load)",
             f"{self.fds_idle} / {warm.fds} / {end.fds} ({min(fds)}-{max(fds)})" if warm and end else "-"),
        ])
        m = self.metrics
        section("Decisions and the activity log", [
            ("decisions seen by the client", f"{self.decisions:,}"),
            ("Envoy ext_authz ok + denied", (f"{self.envoy.get('ext_authz.ok', 0):,} + "
                                             f"{self.envoy.get('ext_authz.denied', 0):,}")),
            ("sidecar safous_decisions_total", f"{m.get('decisions', 0):,.0f}"),
            ("sidecar activity written / dropped (metrics)",
             f"{m.get('written', 0):,.0f} / {m.get('dropped', 0):,.0f}"),
            ("sidecar 'stopped' line written / dropped",
             f"{self.stopped.get('activity_written')} / {self.stopped.get('activity_dropped')}"
             if self.stopped else "(no 'stopped' line)"),
            ("activity_log rows after stop", f"{self.rows:,}"),
            ("Envoy ext_authz error / failure_mode_allowed",
             f"{self.envoy.get('ext_authz.error', '?')} / {self.envoy.get('ext_authz.failure_mode_allowed', '?')}"),
        ])
        lines.append("\nCriteria")
        lines.append("--------")
        for name, ok, detail in self.criteria():
            lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        logs = f"  (logs in {self.workdir})" if self.workdir and not self.passed else ""
        lines.append(f"\n{'PASS' if self.passed else 'FAIL'}{logs}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ plumbing

def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def make_rules_db(path: Path, webhook_url: str) -> Path:
    """One policy on /soak whose rule asks the webhook, passing the load's kind along."""
    from sidecar.policies import Policy
    from sidecar.rules.model import ActionType, ResponseAction, Rule
    from tests.conftest import seed

    rule = Rule(name="soak-posture", url=f"{webhook_url}/decide?k=%headers.x-soak%", timeout_ms=RULE_TIMEOUT_MS,
                actions=(ResponseAction(type=ActionType.STRING, key="status", value="active"),))
    seed(path, [rule], [Policy(name="soak", path_prefix="/soak", rules=(rule.name,))])
    return path


def envoy_config(sidecar_port: int) -> str:
    """envoy/envoy.yaml with its ports rewritten and the app replaced by a direct response."""
    from tests.envoy_harness import ENVOY_YAML, render_config

    direct = 'direct_response: { status: 200, body: { inline_string: "ok" } }'
    return render_config(ENVOY_YAML, sidecar_port=sidecar_port, upstream_port=free_port(),
                         extra={"route: { cluster: app }": direct})


def start_sidecar(db: Path, port: int, http_port: int, log_path: Path) -> subprocess.Popen:
    """The real program, its log lines (JSON) into ``log_path``: a file, not a pipe, since a
    decision line per request would fill a pipe nobody reads and block the sidecar."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--db", str(db), "--listen", f"127.0.0.1:{port}",
             "--http", f"127.0.0.1:{http_port}", "--log-format", "json"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    """Until the sidecar's /readyz answers 200 (rules.db loaded)."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited with {proc.returncode} during startup")
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the sidecar was not ready within {timeout:g} s")


def parse_metrics(text: str) -> dict[str, float]:
    out = {"decisions": 0.0}
    for line in text.splitlines():
        if line.startswith("safous_decisions_total{"):
            out["decisions"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("safous_activity_written_total "):
            out["written"] = float(line.split()[1])
        elif line.startswith("safous_activity_dropped_total "):
            out["dropped"] = float(line.split()[1])
    return out


def stopped_line(log_path: Path) -> dict | None:
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == "stopped":
                return entry
    return None


# --------------------------------------------------------------------------------- load

async def drive(url: str, report: Report) -> None:
    """``report.rate`` requests/s for ``report.duration`` s, fixed schedule, bounded in flight."""
    import aiohttp

    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        kind = CYCLE[n % len(CYCLE)]
        path = f"/other/{kind}/{n}" if kind == "nomatch" else f"/soak/{kind}/{n}"
        started = loop.time()
        try:
            async with session.get(url + path, headers={"x-soak": f"{kind}-{n}"}) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            report.client_errors[type(exc).__name__] += 1
            return
        report.latencies_ms.append((loop.time() - started) * 1000)
        if status == 200:
            report.outcomes[kind, "allow"] += 1
        elif status == 403:
            try:
                code = json.loads(body)["code"]
            except (ValueError, KeyError, TypeError):
                code = ENVOY_DENY
            report.outcomes[kind, code] += 1
        else:
            report.client_errors[f"HTTP {status}"] += 1

    connector = aiohttp.TCPConnector(limit=report.max_in_flight)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)) as session:
        start = loop.time()
        total = int(report.duration * report.rate)
        for n in range(total):
            delay = start + n / report.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= report.max_in_flight:
                report.skipped += 1
                continue
            task = asyncio.create_task(one(session, n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            report.sent += 1
        if pending:
            await asyncio.wait(pending)


async def sample(pid: int, report: Report, started: float, stop: asyncio.Event,
                 say: Callable[[str], None]) -> None:
    """RSS and open descriptors of the sidecar every second; a progress line every 30 s."""
    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError):
            report.samples.append(Sample(time.monotonic() - started, rss_mb(pid), open_fds(pid)))
            if len(report.samples) % 30 == 0:
                last = report.samples[-1]
                say(f"  {last.at:4.0f} s: {report.sent:,} sent, {report.answered:,} answered, "
                    f"{sum(report.client_errors.values())} client errors, RSS {last.rss_mb:.1f} MB, {last.fds} fds")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


# ---------------------------------------------------------------------------------- run

async def run_soak(duration: float = 300, rate: float = 150, *, max_in_flight: int = 64,
                   workdir: Path | None = None, progress: bool = False) -> Report:
    """Run the whole soak and return its report (``report.passed``, ``report.table()``)."""
    import aiohttp

    from tests.envoy_harness import run_envoy

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="safous-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(duration, rate, max_in_flight, workdir=work)
    hook_port, side_port, http_port = free_port(), free_port(), free_port()
    webhook_url = f"http://127.0.0.1:{hook_port}"
    db = make_rules_db(work / "rules.db", webhook_url)
    say = (lambda text: print(text, flush=True)) if progress else (lambda text: None)

    with process([sys.executable, "-m", "tests.soak", "webhook", str(hook_port)], hook_port):
        log_path = work / "sidecar.log"
        side = start_sidecar(db, side_port, http_port, log_path)
        try:
            await wait_ready(f"http://127.0.0.1:{http_port}/readyz", side)
            async with run_envoy(envoy_config(side_port), work) as envoy:
                report.rss_idle_mb, report.fds_idle = rss_mb(side.pid), open_fds(side.pid)
                say(f"sidecar pid {side.pid}, Envoy {envoy.url}; {duration:g} s of load at {rate:g}/s ...")
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample(side.pid, report, time.monotonic(), stop, say))
                await drive(envoy.url, report)
                stop.set()
                await sampler
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                    async def flushed() -> bool:
                        async with session.get(f"http://127.0.0.1:{http_port}/metrics") as resp:
                            report.metrics = parse_metrics(await resp.text())
                        logged = report.metrics.get("written", 0) + report.metrics.get("dropped", 0)
                        return logged >= report.decisions

                    # The activity writer flushes every 0.2 s. Shown as they are if they never add
                    # up: the verdict reads the activity log itself, after the stop.
                    with contextlib.suppress(AssertionError):
                        await eventually(flushed, timeout=5, interval=0.05)
                    async with session.get(f"{webhook_url}/stats") as resp:
                        report.webhook_calls = await resp.json()
                stats = await envoy.stats("ext_authz")
                report.envoy = {name.removeprefix("http.ingress_http."): value for name, value in stats.items()
                                if name.startswith("http.ingress_http.ext_authz.")}
            stopping = time.monotonic()
            side.send_signal(signal.SIGTERM)
            report.exit_code = await asyncio.to_thread(side.wait, 30)
            report.exit_seconds = time.monotonic() - stopping
        finally:
            if side.poll() is None:
                side.kill()
                side.wait()
    report.stopped = stopped_line(log_path)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        report.rows = conn.execute("SELECT count(*) FROM activity_log").fetchone()[0]
        for path, allowed in conn.execute("SELECT path, allowed FROM activity_log"):
            match = re.match(r"^/(?:soak|other)/([^/]+)/", path)
            kind = match.group(1) if match else "?"
            report.rows_by_kind[kind] += 1
            report.rows_allowed_by_kind[kind] += allowed
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", nargs="?", default="soak", choices=["soak", "webhook"])
    parser.add_argument("port", nargs="?", type=int)
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    parser.add_argument("--rate", type=float, default=150, help="requests per second (default 150)")
    parser.add_argument("--in-flight", type=int, default=64, help="most requests pending at once (default 64)")
    args = parser.parse_args()
    if args.role == "webhook":
        _webhook_main(args.port)
        return 0
    if args.duration <= 0 or args.rate <= 0 or args.in_flight <= 0:
        parser.error("--duration, --rate and --in-flight must be positive")
    report = asyncio.run(run_soak(args.duration, args.rate, max_in_flight=args.in_flight, progress=True))
    print(report.table())
    if report.passed and report.workdir is not None:
        shutil.rmtree(report.workdir, ignore_errors=True)  # kept on failure, for its logs
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The rules snapshot the request path reads, and the watcher that reloads it.

A snapshot is immutable and swapped whole: a check uses the one it started with, so a reload
never shows a half-applied change. Rows are read, validated and compiled in a worker thread
(never on the event loop: compiling may read ``file:`` secrets), paced (``PACE_PAUSE``) so that
the checks keep their rate while 10,000 rules load.

When a reload fails (database locked past the busy timeout, deleted, unreadable) the last good
snapshot keeps serving and ``last_error`` says why, for health and logs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import db
from .db import RuleSet
from .policies import Policy, PolicyIndex
from .rules import RuleEvaluator
from .rules.model import InvalidRow, Rule

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    index: PolicyIndex
    # Per policy name: its enabled rules in order, compiled, or the first unusable one (a
    # broken rule denies whatever the others say, so the policy is decided without them).
    policy_rules: Mapping[str, tuple[Any, ...] | InvalidRow]
    problems: tuple[InvalidRow, ...] = ()
    # What the next build may reuse: the enabled policies, and each rule's compiled form by the
    # identity of its Rule model.
    policies: tuple[Policy, ...] = ()
    compiled: Mapping[int, tuple[Rule, Any | InvalidRow]] = field(default_factory=dict)
    # Names of the disabled policies: a route that binds one is told so.
    disabled_policies: frozenset[str] = frozenset()


PACE_WORK = 0.001
"""Seconds of loading or building at a stretch, between two pauses of ``PACE_PAUSE``."""
PACE_PAUSE = 0.002
"""A pause of a load that leaves the interpreter free. Yielding it is not enough: gRPC's
completion thread needs the interpreter for every event of every check, and a thread that
holds it hands it over only when forced, every switch interval. Loading 10,000 new rules at a
stretch (in a thread, or in slices on the loop) let 100-300 checks a second through and held
them back 100-300 ms; paced, with the pause twice the work, no check waited over 40 ms
(measured by make bench at 1,000 checks/s), for a load that takes three times as long."""


class Pacer:
    """Called in a worker thread's long loop: pauses (``time.sleep(PACE_PAUSE)``) when it last
    paused ``PACE_WORK`` ago or more."""

    def __init__(self) -> None:
        self._resumed = time.perf_counter()

    def __call__(self) -> None:
        if time.perf_counter() - self._resumed >= PACE_WORK:
            time.sleep(PACE_PAUSE)
            self._resumed = time.perf_counter()


def build_snapshot(rule_set: RuleSet, evaluator: RuleEvaluator, version: int,
                   previous: Snapshot | None = None, pace: Callable[[], None] | None = None) -> Snapshot:
    """Compile a rule set. Never raises for a bad rule: it becomes an InvalidRow. ``pace`` is
    called before each rule and policy (it may pause the build).

    With the ``previous`` snapshot, rules and policies that are the very same objects as then
    (``db.RowMemo`` hands back unchanged rows' models) reuse their compiled form and index."""
    reuse = previous.compiled if previous is not None else {}
    compiled: dict[str, Any | InvalidRow] = {}
    by_rule: dict[int, tuple[Rule, Any | InvalidRow]] = {}
    problems: list[InvalidRow] = list(rule_set.invalid_policies)
    for name, rule in rule_set.rules.items():
        if pace is not None:
            pace()
        if isinstance(rule, InvalidRow):
            compiled[name] = rule
            problems.append(rule)
            continue
        if not rule.enabled:
            continue
        kept = reuse.get(id(rule))
        if kept is not None and kept[0] is rule:
            compiled[name] = kept[1]
        else:
            try:
                compiled[name] = evaluator.compile(rule)
            except ValueError as exc:
                compiled[name] = InvalidRow("rule", name, str(exc))
        by_rule[id(rule)] = (rule, compiled[name])
        if isinstance(compiled[name], InvalidRow):
            problems.append(compiled[name])

    def enabled_rules(policy: Policy) -> tuple[Any, ...] | InvalidRow:
        out = []
        for name in policy.rules:
            entry = compiled.get(name)
            if isinstance(entry, InvalidRow):
                return entry
            if entry is not None:
                out.append(entry)
            elif name not in rule_set.rules:
                return InvalidRow("rule", name, "does not exist")
            # else: the rule is disabled, and a disabled rule is skipped everywhere.
        return tuple(out)

    policies = [p for p in rule_set.policies if p.enabled]
    # A policy row that fails validation is matched as its widened fallback and denies.
    for broken in rule_set.invalid_policies:
        if broken.fallback is not None:
            policies.append(broken.fallback)
    same_policies = previous is not None and len(policies) == len(previous.policies) and all(
        a is b for a, b in zip(policies, previous.policies, strict=True))
    policy_rules: dict[str, tuple[Any, ...] | InvalidRow] = {}
    for policy in policies:
        if pace is not None:
            pace()
        policy_rules[policy.name] = enabled_rules(policy)
    for broken in rule_set.invalid_policies:
        if broken.fallback is not None:
            policy_rules[broken.name] = broken
    if same_policies and previous is not None:
        # Keep the previous tuples where nothing changed: the evaluator's per-policy plans are
        # keyed by them.
        policy_rules = {name: previous.policy_rules[name] if previous.policy_rules.get(name) == entries
                        else entries for name, entries in policy_rules.items()}
    return Snapshot(
        version=version,
        index=previous.index if same_policies and previous is not None else PolicyIndex(policies),
        policy_rules=policy_rules,
        problems=tuple(problems),
        policies=tuple(policies),
        compiled=by_rule,
        disabled_policies=frozenset(p.name for p in rule_set.policies if not p.enabled),
    )


DAMAGED = (" (rules.db is damaged: was a file copied over it while in use? Move it aside and restore a backup "
           "with safous-admin restore)")
"""Said with a reload error when SQLite finds rules.db corrupt: overwriting a live file in place
(``cp``) is the cause SQLite's docs name first, and nothing here can undo it
(docs/platform/backup-and-upgrades.md)."""


class RulesWatcher:
    """Loads rules.db and reloads it when it changes (commits by any process, or the file
    being replaced), polling cheaply with ``PRAGMA data_version``. ``freeze``: gc.freeze()
    after each load, for the process that owns the interpreter (``serve``), not a library
    user's."""

    def __init__(self, db_path: Path, evaluator: RuleEvaluator, interval: float,
                 on_change: Callable[[Snapshot], None],
                 on_health: Callable[[str | None], None] | None = None, *, freeze: bool = False) -> None:
        self._freeze = freeze
        self._evaluator = evaluator
        self._interval = interval
        self._on_change = on_change
        self._on_health = on_health
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload: float | None = None
        self._db = db.DatabaseFile.at(db_path).connection(readonly=True)
        self._opened = 0  # the connection's openings when last read: another file, another data_version
        self._seen_data: int | None = None
        self._seen_rules: tuple[int, bytes] | None = None
        self._version = 0
        self._connection_lock = threading.Lock()
        self._loading = asyncio.Lock()  # one load at a time: each builds on the previous
        self._memo = db.RowMemo()
        self._snapshot: Snapshot | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def _load_blocking(self, force: bool) -> Snapshot | None:
        # A load cancelled on the loop (stop()) goes on in its thread: whoever closes the
        # connection waits for it, since closing under a running query crashes the process.
        with self._connection_lock:
            try:
                return self._load_locked(force)
            except db.StoreError:
                raise
            except Exception as exc:
                # A bug rather than the database: it is reported like an unreadable rules.db
                # (readiness, metrics) instead of ending the watcher, and tried again next tick.
                log.exception("rules reload failed unexpectedly")
                raise db.StoreError(f"reload failed unexpectedly: {type(exc).__name__}: {exc}"[:300]) from exc

    def _load_locked(self, force: bool) -> Snapshot | None:
        # use() follows rules.db when another file takes its name (the whole process switches).
        with self._db.use() as conn:
            if self._db.opened != self._opened:
                self._opened = self._db.opened
                self._seen_data = self._seen_rules = None
            # data_version is the cheap test (no query on a table); rules_version tells whether
            # the commit touched rules at all, as most commits are the activity log's.
            seen_data = db.data_version(conn)
            if not force and seen_data == self._seen_data:
                return None
            seen_rules = db.rules_version(conn)
            self._seen_data = seen_data
            if not force and seen_rules == self._seen_rules:
                return None
            pace = Pacer()
            rule_set = db.load_rule_set(conn, self._memo, pace)
        self._seen_rules = seen_rules
        self._version += 1
        self._snapshot = build_snapshot(rule_set, self._evaluator, self._version, self._snapshot, pace)
        return self._snapshot

    async def load(self, *, force: bool = False) -> Snapshot | None:
        """Load now if changed (or ``force``); raises StoreError when rules.db is unreadable."""
        async with self._loading:
            if not self._freeze:
                return await self._load(force)
            # A snapshot lives until the next reload, so once built it is frozen (gc.freeze:
            # the whole heap, then, leaves the collector's sight), and no full collection runs
            # while it is built. Otherwise building 10,000 rules triggers full collections that
            # walk every object of every rule while holding the interpreter: 110-160 ms pauses
            # of every check. Frozen objects are still freed when their last reference goes,
            # as a replaced snapshot's are (tests/test_snapshot.py); the young generations,
            # collected just before the freeze, take the build's cyclic garbage. What escapes
            # them (a cycle that reached the old generation since the last load) is kept for
            # good: a small price paid once per change of the rules.
            young, middle, full = gc.get_threshold()
            gc.set_threshold(young, middle, 1 << 30)
            try:
                snapshot = await self._load(force)
                if snapshot is not None:
                    gc.collect(1)
                    gc.freeze()
                return snapshot
            finally:
                gc.set_threshold(young, middle, full)

    async def _load(self, force: bool) -> Snapshot | None:
        try:
            snapshot = await asyncio.to_thread(self._load_blocking, force)
        except db.StoreError as exc:
            await asyncio.to_thread(self._drop_connection)
            self.reloads_failed += 1
            error = str(exc) + (DAMAGED if exc.damaged else "")
            if self.last_error != error:
                log.error("rules.db reload failed, serving the last good rules", extra={"error": error})
                self.last_error = error
                if self._on_health is not None:
                    self._on_health(self.last_error)
            raise
        if self.last_error is not None:
            log.info("rules.db readable again")
            self.last_error = None
            if self._on_health is not None:
                self._on_health(None)
        if snapshot is None:
            return None
        self.reloads_ok += 1
        self.last_reload = time.time()
        for problem in snapshot.problems:
            log.warning("unusable %s %r: %s", problem.kind, problem.name, problem.error)
        log.info("rules loaded", extra={"version": snapshot.version, "policies": snapshot.index.size})
        self._on_change(snapshot)
        return snapshot

    def _drop_connection(self) -> None:
        with self._connection_lock:
            self._db.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.load()
            except db.StoreError:
                pass  # logged in load(); keep the last good snapshot and retry next tick.

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rules-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await asyncio.to_thread(self._drop_connection)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop's task (None: never started) and wait until it has ended, so
    that what it uses can be closed after."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

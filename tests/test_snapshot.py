"""Reloading rules.db: unchanged rules and policies are reused, changed ones rebuilt."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from sidecar.db import RowMemo, StoreError, connect, load_rule_set
from sidecar.policies import Policy
from sidecar.rules.client import WebhookClient
from sidecar.rules.evaluator import WebhookEvaluator
from sidecar.rules.model import Rule
from sidecar.snapshot import RulesWatcher, Snapshot, build_snapshot
from tests.conftest import seed


def load(db: Path, memo: RowMemo, evaluator, previous=None, version=1):
    conn = connect(db, readonly=True)
    try:
        return build_snapshot(load_rule_set(conn, memo), evaluator, version, previous)
    finally:
        conn.close()


def test_a_reload_reuses_what_did_not_change(db: Path) -> None:
    rules = [Rule(name=f"r{i}", url=f"http://127.0.0.1:9/r{i}?u=%username%") for i in range(3)]
    seed(db, rules, [Policy(name=f"p{i}", hosts=(f"h{i}.example",), rules=(f"r{i}",)) for i in range(3)])
    memo, evaluator = RowMemo(), WebhookEvaluator(WebhookClient())
    first = load(db, memo, evaluator)
    same = load(db, memo, evaluator, first, 2)
    assert same.index is first.index
    assert all(same.policy_rules[p] is first.policy_rules[p] for p in ("p0", "p1", "p2"))

    seed(db, [rules[1].model_copy(update={"url": "http://127.0.0.1:9/changed"})])
    edited = load(db, memo, evaluator, same, 3)
    assert edited.index is same.index  # no policy changed
    assert edited.policy_rules["p0"] is same.policy_rules["p0"]
    assert edited.policy_rules["p1"][0] is not same.policy_rules["p1"][0]
    assert edited.policy_rules["p1"][0].rule.url == "http://127.0.0.1:9/changed"

    seed(db, [], [Policy(name="p2", hosts=("other.example",), rules=("r2",))])
    moved = load(db, memo, evaluator, edited, 4)
    assert moved.index is not edited.index
    assert moved.index.match("other.example", "/", "GET").name == "p2"
    assert moved.index.match("h2.example", "/", "GET") is None
    assert moved.policy_rules["p2"][0] is edited.policy_rules["p2"][0]  # the rule itself did not change


async def test_a_replaced_snapshot_is_freed_though_the_watcher_froze_it(db: Path) -> None:
    """The watcher takes each snapshot out of the collector's sight (gc.freeze: a reload of
    many rules otherwise triggers full collections that stall every check). Frozen objects are
    freed only by their reference counts, so a snapshot with a reference cycle would leak at
    every reload: once replaced, nothing of a snapshot may survive, even a full collection."""
    def publish(version: int) -> None:
        seed(db, [Rule(name=f"r{i}", url=f"http://127.0.0.1:9/v{version}/r{i}?u=%username%") for i in range(20)],
             [Policy(name=f"p{i}", hosts=(f"h{i}.example",), rules=(f"r{i}",)) for i in range(20)])

    publish(1)
    loaded: list[Snapshot] = []
    watcher = RulesWatcher(db, WebhookEvaluator(WebhookClient()), 60, loaded.append, freeze=True)
    try:
        await watcher.load(force=True)
        assert gc.get_freeze_count() > 0  # the watcher froze what it loaded
        models = [weakref.ref(rule) for rule, _ in loaded[0].compiled.values()]
        models += [weakref.ref(policy) for policy in loaded[0].policies]
        assert len(models) == 40
        loaded.clear()
        publish(2)
        await watcher.load(force=True)
        gc.collect()
        assert [m() for m in models if m() is not None] == []
    finally:
        await watcher.stop()
        gc.unfreeze()  # the test process's objects go back to the collector


async def test_a_reload_that_fails_unexpectedly_is_reported_and_retried(db: Path) -> None:
    """A bug in a reload (here the evaluator's compile raising what it never should) must not
    end the watcher, which would go on serving old rules while reporting itself healthy: it is
    reported as a failed reload (readiness, metrics) and the next load succeeds."""
    seed(db, [Rule(name="r", url="http://127.0.0.1:9/r")], [Policy(name="p", rules=("r",))])

    class Broken(WebhookEvaluator):
        fail = True

        def compile(self, rule: Rule) -> object:
            if self.fail:
                raise RuntimeError("a bug")
            return super().compile(rule)

    evaluator = Broken(WebhookClient())
    health: list[str | None] = []
    watcher = RulesWatcher(db, evaluator, 60, lambda snapshot: None, health.append)
    try:
        with pytest.raises(StoreError, match="reload failed unexpectedly: RuntimeError: a bug"):
            await watcher.load(force=True)
        assert watcher.last_error is not None and watcher.reloads_failed == 1
        assert health == [watcher.last_error]
        evaluator.fail = False
        assert (await watcher.load(force=True)) is not None
        assert watcher.last_error is None and health[-1] is None
    finally:
        await watcher.stop()

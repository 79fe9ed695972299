"""Activity log retention: days and rows limits, pruning in batches that never
keep the activity writer or an admin command waiting, the background task, failures."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from sidecar.activity_retention import ActivityRetention
from sidecar.db import (
    PRUNE_PAUSE,
    ActivityRecord,
    DatabaseFile,
    admin_transaction,
    connect,
    ensure_database,
    insert_activity,
    iso_time,
    prune_activity,
    set_enabled,
)
from sidecar.rules.model import Rule
from tests.conftest import seed
from tests.helpers import eventually

NOW = 1_800_000_000.0  # the retention clock in these tests
DAY = 86_400.0


def record(at: float, n: int = 0) -> ActivityRecord:
    return ActivityRecord(at=at, request_id=f"req-{n}", username="alice", source_ip="203.0.113.7",
                          host="app.example.com", path=f"/p/{n}", method="GET", policy="p", allowed=True,
                          code="OK", status="allowed", latency_ms=1.5)


def insert(db: Path, times: Sequence[float], start: int = 0) -> None:
    conn = connect(db)
    try:
        insert_activity(conn, [record(at, start + i) for i, at in enumerate(times)])
    finally:
        conn.close()


def rows(db: Path) -> list[tuple[int, str]]:
    """(id, at) of every activity row, by id."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id, at FROM activity_log ORDER BY id").fetchall()
    finally:
        conn.close()


def count(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM activity_log").fetchone()[0]
    finally:
        conn.close()


def prune(db: Path, **kwargs: object) -> int:
    rules_db = DatabaseFile.at(db).connection()
    try:
        return prune_activity(rules_db, **kwargs)  # type: ignore[arg-type]
    finally:
        rules_db.close()


# ------------------------------------------------------------------------- what is kept


async def test_days_keep_exactly_the_newer_rows(db: Path) -> None:
    cut = NOW - 2 * DAY
    # Hourly rows over four days, not in time order, and one exactly at the cut (kept).
    times = [NOW - h * 3600 for h in range(96)][::-1]
    times[10], times[70] = times[70], times[10]
    times.append(cut)
    insert(db, times)
    retention = ActivityRetention(db, days=2, rows=None, clock=lambda: NOW)

    deleted = await retention.prune_now()

    kept = sorted(at for _, at in rows(db))
    assert kept == sorted(iso_time(t) for t in times if t >= cut)
    assert deleted == retention.deleted_total == sum(t < cut for t in times) == 47
    assert retention.last_error is None
    assert await retention.prune_now() == 0  # nothing more to do


def test_rows_keep_the_newest_by_id(db: Path) -> None:
    # ``at`` deliberately out of step with ids: the row count goes by id.
    insert(db, [NOW - (i % 7) * DAY for i in range(100)])
    ids = [i for i, _ in rows(db)]

    assert prune(db, older_than=None, keep_rows=30, batch=7, pause=0) == 70
    assert [i for i, _ in rows(db)] == ids[-30:]
    assert prune(db, older_than=None, keep_rows=30, batch=7, pause=0) == 0
    assert prune(db, older_than=None, keep_rows=1000, pause=0) == 0
    assert len(rows(db)) == 30
    assert prune(db, older_than=None, keep_rows=0, pause=0) == 30
    assert rows(db) == []


def test_days_and_rows_together(db: Path) -> None:
    # 60 old rows then 40 recent ones.
    insert(db, [NOW - 10 * DAY + i for i in range(60)] + [NOW - 3600 + i for i in range(40)])
    ids = [i for i, _ in rows(db)]
    cut = iso_time(NOW - DAY)

    # The row limit binds: of the 40 recent rows, the newest 25.
    assert prune(db, older_than=cut, keep_rows=25, batch=10, pause=0) == 75
    assert [i for i, _ in rows(db)] == ids[-25:]
    # The age limit binds: the row limit has nothing more to remove.
    insert(db, [NOW - 5 * DAY] * 5, start=1000)
    assert prune(db, older_than=cut, keep_rows=1000, pause=0) == 5
    assert [i for i, _ in rows(db)] == ids[-25:]
    assert all(at >= cut for _, at in rows(db))


def test_nothing_to_prune_and_bad_arguments(db: Path) -> None:
    assert prune(db, older_than=iso_time(NOW), keep_rows=10) == 0
    assert prune(db, older_than=None, keep_rows=None) == 0
    with pytest.raises(ValueError):
        prune(db, older_than=None, keep_rows=-1)
    with pytest.raises(ValueError):
        prune(db, older_than=None, keep_rows=1, batch=0)
    with pytest.raises(ValueError):
        ActivityRetention(db, days=0, rows=None)
    with pytest.raises(ValueError):
        ActivityRetention(db, days=None, rows=0)


# ------------------------------------------------------------------- never blocks writers


async def test_pruning_50k_rows_keeps_writers_waiting_under_a_second(db: Path) -> None:
    """The activity writer inserts and an admin edits rules all along a 50,000-row prune: each
    write (BEGIN IMMEDIATE … COMMIT, i.e. including any wait for the lock) is timed. A busy
    timeout of 5 s would hide long waits as mere slowness, so the longest one is asserted."""
    cut = NOW - DAY
    insert(db, [NOW - 3 * DAY + i * 0.01 for i in range(50_000)])
    insert(db, [NOW - 3600 + i for i in range(1000)], start=50_000)
    seed(db, [Rule(name="posture", url="https://api.example.com/check")])
    done = threading.Event()
    writes: dict[str, list[tuple[float, float]]] = {"activity": [], "admin": []}  # (start, seconds)
    errors: list[Exception] = []
    inserted = 0

    def activity_writer() -> None:
        nonlocal inserted
        conn = connect(db)
        try:
            while not done.is_set():
                batch = [record(NOW - 60 + inserted % 60, 100_000 + inserted + k) for k in range(20)]
                started = time.monotonic()
                insert_activity(conn, batch)
                writes["activity"].append((started, time.monotonic() - started))
                inserted += len(batch)
                time.sleep(0.005)  # pacing: a write every few milliseconds, all along the prune
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            conn.close()

    def admin() -> None:
        conn = connect(db)
        enabled = False
        try:
            while not done.is_set():
                started = time.monotonic()
                with admin_transaction(conn, "alice"):
                    set_enabled(conn, "rule", "posture", enabled)
                writes["admin"].append((started, time.monotonic() - started))
                enabled = not enabled
                time.sleep(0.005)  # pacing, as above
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            conn.close()

    # The event loop (where checks run) keeps ticking meanwhile.
    lag = 0.0

    async def ticker() -> None:
        nonlocal lag
        while not done.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.01)  # the probe: a 10 ms timer, late by the loop's lag
            lag = max(lag, time.monotonic() - before - 0.01)

    threads = [threading.Thread(target=activity_writer), threading.Thread(target=admin)]
    for thread in threads:
        thread.start()
    tick = asyncio.create_task(ticker())
    retention = ActivityRetention(db, days=1, rows=None, clock=lambda: NOW)
    try:
        await eventually(lambda: writes["activity"] and writes["admin"], what="both writers writing")
        started = time.monotonic()
        deleted = await retention.prune_now()
        elapsed = time.monotonic() - started

        def both_wrote_since() -> bool:  # and they go on after it
            return all(timed[-1][0] > started + elapsed for timed in writes.values())

        await eventually(both_wrote_since)
    finally:
        done.set()
        for thread in threads:
            thread.join()
        await tick
    assert not errors

    assert retention.last_error is None
    assert deleted == 50_000
    # Batched: 10 transactions of 5,000, with pauses between them.
    assert elapsed > 9 * PRUNE_PAUSE
    during = {name: [w for s, w in timed if started <= s <= started + elapsed] for name, timed in writes.items()}
    assert len(during["activity"]) >= 20 and len(during["admin"]) >= 20
    longest = max(w for timed in writes.values() for _, w in timed)
    assert longest < 1.0, f"a writer waited {longest:.3f} s"
    assert lag < 0.25
    # Nothing newer than the cut was lost: the 1,000 recent rows and every row written meanwhile.
    left = rows(db)
    assert len(left) == 1000 + inserted
    assert min(at for _, at in left) >= iso_time(cut)
    print(f"\npruned {deleted} rows in {elapsed:.2f} s ({deleted / elapsed:,.0f} rows/s); "
          f"longest wait {longest * 1000:.0f} ms over {sum(map(len, writes.values()))} writes; "
          f"event loop lag {lag * 1000:.0f} ms")


# --------------------------------------------------------------------- background task


async def test_the_background_task_prunes_every_interval_and_stops(db: Path) -> None:
    insert(db, [NOW - 3 * DAY] * 10 + [NOW] * 5)
    retention = ActivityRetention(db, days=1, rows=None, interval=0.05, clock=lambda: NOW)
    retention.start()
    assert retention.running
    await eventually(lambda: retention.deleted_total == 10)
    insert(db, [NOW - 2 * DAY] * 7, start=100)  # the next run takes these
    await eventually(lambda: retention.deleted_total == 17)
    assert len(rows(db)) == 5 and retention.last_error is None

    await retention.stop()
    assert not retention.running
    # No task is left that could prune again: stop() waited for its end.
    assert [t for t in asyncio.all_tasks() if t.get_name() == "activity-retention"] == []
    await retention.stop()  # twice is fine


async def test_the_first_run_is_soon_after_start_and_stop_does_not_wait_the_interval(db: Path) -> None:
    insert(db, [NOW - i for i in range(20)])
    retention = ActivityRetention(db, days=None, rows=5, interval=300)
    retention.start()
    await eventually(lambda: retention.runs == 1, timeout=3)
    assert len(rows(db)) == 5
    started = time.monotonic()
    await retention.stop()
    assert time.monotonic() - started < 2  # far from the 300 s interval: it did not wait for it


async def test_stop_ends_a_long_prune_between_batches(db: Path) -> None:
    insert(db, [NOW - 3 * DAY] * 25_000)  # 5 batches
    retention = ActivityRetention(db, days=1, rows=None, interval=0.01, clock=lambda: NOW)
    retention.start()
    await eventually(lambda: count(db) < 25_000)
    await retention.stop()
    left = count(db)
    assert 0 < left < 25_000  # it stopped after a batch, before the last one
    assert retention.deleted_total == 25_000 - left
    # Stopped, not broken: pruning by hand finishes the job.
    assert await retention.prune_now() == left


async def test_disabled_without_limits(db: Path) -> None:
    insert(db, [NOW - 300 * DAY])
    retention = ActivityRetention(db, days=None, rows=None)
    assert not retention.enabled
    retention.start()
    assert not retention.running
    assert await retention.prune_now() == 0
    await retention.stop()
    assert len(rows(db)) == 1


# ------------------------------------------------------------------------------ failures


async def test_a_missing_database_is_reported_not_raised_nor_created(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for path in (tmp_path / "absent.db", tmp_path / "no-such-dir" / "rules.db"):
        retention = ActivityRetention(path, days=1, rows=None, clock=lambda: NOW)
        with caplog.at_level(logging.WARNING, logger="sidecar.activity_retention"):
            assert await retention.prune_now() == 0
        assert retention.last_error and "does not exist" in retention.last_error
        assert not path.exists()
    assert any(r.name == "sidecar.activity_retention" and r.levelno == logging.WARNING for r in caplog.records)


async def test_the_background_task_retries_after_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "rules.db"
    retention = ActivityRetention(path, days=1, rows=None, interval=0.05, clock=lambda: NOW)
    retention.start()
    await eventually(lambda: retention.runs >= 2)
    assert retention.running and retention.last_error is not None
    ensure_database(path)
    insert(path, [NOW - 2 * DAY] * 3)
    await eventually(lambda: retention.deleted_total == 3)
    assert retention.last_error is None
    await retention.stop()


async def test_a_read_only_database_is_reported_not_raised(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file opened read-only, as on a read-only volume (the tests may run as root, whom file
    modes do not stop): SQLite refuses the DELETE."""
    insert(db, [NOW - 3 * DAY] * 4)
    monkeypatch.setattr("sidecar.db.replaced.connect", lambda path, **_: connect(path, readonly=True))
    retention = ActivityRetention(db, days=1, rows=10, clock=lambda: NOW)
    assert await retention.prune_now() == 0
    assert retention.last_error and "readonly" in retention.last_error
    assert len(rows(db)) == 4
    monkeypatch.undo()
    assert await retention.prune_now() == 4
    assert retention.last_error is None


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file modes do not stop root")
async def test_a_read_only_file_is_reported_not_raised(db: Path) -> None:
    insert(db, [NOW - 3 * DAY] * 4)
    db.chmod(0o444)
    try:
        retention = ActivityRetention(db, days=1, rows=None, clock=lambda: NOW)
        assert await retention.prune_now() == 0
        assert retention.last_error
        assert len(rows(db)) == 4
    finally:
        db.chmod(0o644)


async def test_the_server_prunes_with_its_settings(db, start_sidecar) -> None:
    old = 946_684_800.0  # 2000-01-01T00:00:00.000Z
    insert_activity(connect(db), [ActivityRecord(at=old, request_id=f"r{i}", username="", source_ip="", host="",
                                                 path="/", method="GET", policy=None, allowed=False, code="x",
                                                 status="x", latency_ms=1.0) for i in range(3)])
    sidecar = await start_sidecar(activity_retention_days=30)
    await eventually(lambda: sidecar.retention.deleted_total == 3)  # its first run, a second after start
    assert sqlite3.connect(db).execute("SELECT count(*) FROM activity_log").fetchone()[0] == 0

"""The short soak (20 s) of `make soak`: the real sidecar behind a real Envoy at a steady load
with failing, timing-out and slow webhook answers. See tests/soak.py for what it checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import run_soak


@pytest.mark.timeout(120)
async def test_soak_20_seconds_passes(tmp_path: Path) -> None:
    # 150 requests/s: modest, since the load, Envoy, the webhook and the sidecar share 2 cores.
    report = await run_soak(20, rate=150, workdir=tmp_path)
    print(report.table())
    assert report.sent >= 20 * 150 * 0.99
    assert report.passed, report.table()

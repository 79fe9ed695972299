"""The portal in a real browser: Debian's headless Chromium (`make test` installs it when
missing) against the real `safous-admin ui`, on the scenario's rules.db (tests/portal_support.py).

- The Activity page, as the browser builds it, shows a denial with the reason its client got,
  and its charts are painted: the screenshot holds the bars' colours.
- Every page renders; with ``SAFOUS_PORTAL_SCREENSHOTS=DIR`` the screenshots are kept in DIR
  (``SAFOUS_PORTAL_SCREENSHOTS=docs`` refreshes the admin guide's, docs/admins/portal.md).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from sidecar.admin.portal.app import ACTIVITY_COLUMNS
from tests.helpers import ROOT

# The fixtures "demo" (the scenario's rules.db) and "running" (a portal serving it).
from tests.portal_support import Demo, Portal, demo_fixture, running_fixture  # noqa: F401

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]

# The charts' colours (templates/_safous_charts.html): denied and allowed bars.
DENIED = (0xC6, 0x28, 0x28)
ALLOWED = (0x2E, 0x7D, 0x4F)

if CHROMIUM is None:
    # CI installs it (`make test`); elsewhere, say how rather than fail.
    pytestmark = pytest.mark.skipif(not os.environ.get("CI"), reason="no chromium: `make chromium` installs it")


def chromium(tmp_path: Path, *args: str, size: tuple[int, int] = (1280, 1000)) -> str:
    """Run headless Chromium with a profile of its own under ``tmp_path``; its stdout."""
    assert CHROMIUM, "chromium is not installed: `make chromium` installs it"
    done = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={size[0]},{size[1]}", *args],
        capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def pixels(png: Path) -> tuple[int, int, Counter[tuple[int, int, int]]]:
    """Width, height and the count of each RGB colour of a PNG."""
    with Image.open(png) as image:
        rgb = image.convert("RGB")
    colours = rgb.getcolors(rgb.width * rgb.height)  # at most one per pixel: never None
    assert colours is not None
    return rgb.width, rgb.height, Counter({colour: count for count, colour in colours})


def test_the_activity_page_shows_a_denial_with_its_reason_and_draws_its_charts(
        running: Portal, demo: tuple[Path, Demo], tmp_path: Path) -> None:
    dom = html.unescape(chromium(tmp_path, "--dump-dom", running.url + "/safous/activity_log"))
    row = re.search(rf'<tr>.*?{re.escape(demo[1].denied_request_id)}.*?</tr>', dom, re.S)
    assert row, "the newest denial is not on the page"
    assert '<span class="decision decision-deny">deny</span>' in row[0]
    assert f'<td class="col-status type-str">{demo[1].denied_reason}</td>' in row[0]
    heights = [float(h) for h in re.findall(r'<rect class="bar-denied"[^>]*height="([\d.]+)"', dom)]
    assert heights and max(heights) > 0

    # Painted, not only present: without the table (_size=0), the chart's colours are on screen.
    shot = tmp_path / "charts.png"
    chromium(tmp_path, f"--screenshot={shot}", running.url + "/safous/activity_log?_size=0", size=(1280, 900))
    width, height, counts = pixels(shot)
    assert (width, height) == (1280, 900)
    assert counts[DENIED] > 3000, counts.most_common(8)
    assert counts[ALLOWED] > 1000, counts.most_common(8)


ACTIVITY = "/safous/activity_log?" + "&".join(f"_col={c}" for c in ACTIVITY_COLUMNS)  # as the menu links it
PAGES = {
    "portal-home": ("/", 760),
    "portal-activity": (ACTIVITY, 1500),
    "portal-activity-search": (ACTIVITY + "&_search=webhook", 1250),
    "portal-audit": ("/safous/audit_log", 1200),
    "portal-rules": ("/rules", 1500),
    "portal-denials-last-hour": ("/safous/denials_last_hour?_hide_sql=1", 700),
    "portal-top-denied-users": ("/safous/top_denied_users?_hide_sql=1", 700),
    "portal-webhook-failures": ("/safous/webhook_failures_by_rule?_hide_sql=1", 700),
}


@pytest.mark.parametrize("name", list(PAGES))
def test_every_page_renders(running: Portal, tmp_path: Path, name: str) -> None:
    path, height = PAGES[name]
    shot = tmp_path / f"{name}.png"
    chromium(tmp_path, f"--screenshot={shot}", running.url + path, size=(1280, height))
    _, _, counts = pixels(shot)
    assert len(counts) > 50, "a blank page"  # text and bars, not an empty page
    keep = os.environ.get("SAFOUS_PORTAL_SCREENSHOTS")
    if keep:
        target = ROOT / keep
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target / shot.name)

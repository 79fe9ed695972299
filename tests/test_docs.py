"""The documentation builds without a warning.

- docs/ is built as ``make docs`` builds it (``sphinx-build -W --keep-going``, HTML, furo) into a
  temporary directory: a broken cross-reference, a link to a heading that is not there, a page
  left out of every toctree or any other warning fails the test, which prints every warning of
  the build. About 3 s; nothing is fetched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

DOCS = ROOT / "docs"


def test_the_docs_build_without_a_warning(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, f"sphinx-build failed (make docs shows the same):\n{build.stderr}{build.stdout}"
    assert (tmp_path / "html" / "index.html").is_file()


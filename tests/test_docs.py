"""The documentation builds without a warning, and its decision records cite what exists.

- docs/ is built as ``make docs`` builds it (``sphinx-build -W --keep-going``, HTML, furo) into a
  temporary directory: a broken cross-reference, a link to a heading that is not there, a page
  left out of every toctree or any other warning fails the test, which prints every warning of
  the build. About 3 s; nothing is fetched.
- A decision record (docs/decisions/NNNN-title.md) is taken from the history, so what it cites
  must be there: every commit (a backquoted short hash) in this repository's history, every path
  of the tree it names, and every ``path::name`` defined in that file. A test or function renamed
  under a record fails here until the record follows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCS = ROOT / "docs"
RECORDS = sorted((DOCS / "decisions").glob("[0-9][0-9][0-9][0-9]-*.md"))
# What a record cites: a short commit hash; a file or directory of the tree, optionally with the
# name of something defined in it (``tests/test_x.py::test_y``).
COMMIT = re.compile(r"`([0-9a-f]{7,12})`")
CITED_PATH = re.compile(
    r"`((?:sidecar|tests|envoy|proxies|proto|docs)/[\w./-]*|setup\.py|Makefile|pyproject\.toml|Dockerfile)"
    r"(?:::(\w+))?`")
SECTIONS = ("## Context", "## Decision", "## Consequences", "## Where it lives")


def test_the_docs_build_without_a_warning(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, f"sphinx-build failed (make docs shows the same):\n{build.stderr}{build.stdout}"
    assert (tmp_path / "html" / "index.html").is_file()


def test_there_are_decision_records_and_each_is_one_page() -> None:
    assert len(RECORDS) >= 12
    numbers = [path.name[:4] for path in RECORDS]
    assert numbers == [f"{n:04d}" for n in range(1, len(RECORDS) + 1)], "records are numbered 0001, 0002, … in order"
    for path in RECORDS:
        text = path.read_text(encoding="utf-8")
        assert text.startswith(f"# {path.name[:4]} "), f"{path.name}: the title starts with the record's number"
        missing = [section for section in SECTIONS if f"\n{section}\n" not in text]
        assert not missing, f"{path.name}: no {', '.join(missing)}"


def _in_history(commit: str) -> bool:
    found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
    return found.returncode == 0


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_a_record_cites_commits_of_the_history(path: Path) -> None:
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("not a git checkout with its whole history")
    commits = COMMIT.findall(path.read_text(encoding="utf-8"))
    assert commits, f"{path.name} cites no commit"
    assert [c for c in commits if not _in_history(c)] == []


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_a_record_cites_code_and_tests_that_exist(path: Path) -> None:
    cited = CITED_PATH.findall(path.read_text(encoding="utf-8"))
    assert any(p.startswith("tests/") for p, _ in cited), f"{path.name} names no test"
    missing = [p for p, _ in cited if not (ROOT / p).exists()]
    assert missing == [], f"{path.name} names paths that do not exist"
    undefined = [f"{p}::{name}" for p, name in cited if name and not re.search(
        rf"^\s*(?:async def|def|class) {name}\b|^{name}\b\s*[:=]", (ROOT / p).read_text(encoding="utf-8"), re.M)]
    assert undefined == [], f"{path.name} names what those files do not define"

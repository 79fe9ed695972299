"""The documentation builds without a warning, and its decision records cite what exists.

- docs/ is built as ``make docs`` builds it (``sphinx-build -W --keep-going``, HTML, furo) into a
  temporary directory: a broken cross-reference, a link to a heading that is not there, a page
  left out of every toctree or any other warning fails the test, which prints every warning of
  the build. About 3 s; nothing is fetched.
- A decision record (docs/decisions/NNNN-title.md) is taken from the history, so what it cites
  must be there: every commit (a backquoted short hash) in this repository's history, every path
  of the tree it names, and every ``path::name`` defined in that file. A test or function renamed
  under a record fails here until the record follows. The guides' citations are held to the
  same: the security guide cites the test behind each guarantee.
- The reference is complete, read from the code: every flag (and variable) of
  ``safous-sidecar serve`` is on the settings page; every command, subcommand and option of
  ``safous-admin`` (its click group, walked) is in the admin reference's synopsis; every metric
  the sidecar exposes is in the metrics table; every decision code is in the codes table.
- The example Prometheus alert rules (docs/platform/prometheus-alerts.yaml) are a rule file whose
  expressions parse as PromQL and name only metrics the sidecar exposes.
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


# --------------------------------------------------------------------------- the reference pages
# The guides hold the reference: every flag of the server, every command and option of the admin
# script, every metric and decision code. Each is read from the code, so a new one fails here
# until a page says what it is.

SETTINGS_PAGE = DOCS / "platform" / "settings-and-lifecycle.md"
ADMIN_PAGE = DOCS / "admins" / "admin-script.md"
METRICS_PAGE = DOCS / "platform" / "metrics-and-alerts.md"
ALERT_RULES = DOCS / "platform" / "prometheus-alerts.yaml"
CODES_PAGE = DOCS / "admins" / "rules.md"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
# Made by the build, `make docs` and `make bench`, not kept in the tree: a page may name them.
GENERATED = ("docs/_build", "docs/bench", "sidecar/_pb")


def test_every_flag_of_serve_is_in_the_settings_page() -> None:
    import argparse

    from sidecar.cli import _parser

    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    flags = [o for a in serve._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert "--db" in flags and "--shared-cache" in flags
    page = SETTINGS_PAGE.read_text(encoding="utf-8")
    missing = [f for f in flags if f"`{f}`" not in page]
    assert missing == [], f"{SETTINGS_PAGE.name} does not document {missing}"
    variables = ["SAFOUS_" + f[2:].replace("-", "_").upper() for f in flags]
    assert [v for v in variables if f"`{v}`" not in page] == []
    top = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert [f"safous-sidecar {o}" for o in top if f"safous-sidecar {o}" not in page] == []


def _synopsis() -> dict[tuple[str, ...], str]:
    """The admin reference's synopsis block: each command path (``("rule", "add")``; ``()`` for
    ``safous-admin`` itself) → the text written for it. An entry starts on a line indented two
    spaces (or with ``safous-admin``) and goes on over the lines indented deeper; `` | `` outside
    brackets separates commands written on one line."""
    text = ADMIN_PAGE.read_text(encoding="utf-8")
    block = re.search(r"## The command line\n\n```text\n(.*?)\n```", text, re.S)
    assert block, f"{ADMIN_PAGE.name} has no synopsis block under '## The command line'"
    entries: list[str] = []
    for line in block[1].splitlines():
        if line.startswith("safous-admin") or re.match(r"  \S", line):
            entries.append(line.strip())
        else:
            entries[-1] += " " + line.strip()
    found: dict[tuple[str, ...], str] = {}
    for entry in entries:
        depth, start, pieces = 0, 0, []
        for i, char in enumerate(entry):
            depth += {"[": 1, "]": -1}.get(char, 0)
            if depth == 0 and entry.startswith(" | ", i):
                pieces.append(entry[start:i])
                start = i + 3
        pieces.append(entry[start:])
        for piece in pieces:
            words = piece.split()
            if words[0] == "safous-admin":
                path: tuple[str, ...] = ()
            else:
                path = tuple(w for w in words[:2] if re.fullmatch(r"[a-z]+", w))
            found[path] = found.get(path, "") + " " + piece
    return found


def _admin_commands() -> list[tuple[tuple[str, ...], list[str]]]:
    """Every command and subcommand of safous-admin, walked from its click group, with its options."""
    import click

    from sidecar.admin.cli import cli

    walked: list[tuple[tuple[str, ...], list[str]]] = []

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        options = [o for p in command.params if isinstance(p, click.Option) for o in p.opts if o.startswith("--")]
        walked.append((path, options))
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                walk(sub, (*path, name))

    walk(cli, ())
    return walked


def test_every_admin_command_and_option_is_in_the_admin_reference() -> None:
    commands = _admin_commands()
    assert len(commands) > 30
    synopsis = _synopsis()
    undocumented, options_missing = [], []
    for path, options in commands:
        leaves = [p for p in synopsis if p[: len(path)] == path]
        if not leaves:
            undocumented.append(" ".join(path))
            continue
        if path in synopsis:
            options_missing += [f"{' '.join(('safous-admin', *path))} {o}" for o in options
                                if not re.search(rf"{re.escape(o)}(?![\w-])", synopsis[path])]
        else:
            assert not options, f"{' '.join(path)} has options but no synopsis line of its own"
    assert undocumented == [], f"{ADMIN_PAGE.name}'s synopsis lacks the commands {undocumented}"
    assert options_missing == [], f"{ADMIN_PAGE.name}'s synopsis lacks {options_missing}"
    stale = [" ".join(p) for p in synopsis if p not in {path for path, _ in commands}]
    assert stale == [], f"{ADMIN_PAGE.name}'s synopsis names commands that do not exist: {stale}"


def _exposed_metrics() -> dict[str, str]:
    """Every metric name the sidecar and the collector expose (as Prometheus reads the page) →
    its type, from the constructors in the code: a counter ``x`` is ``x_total``, an Info ``x`` is
    ``x_info``, a histogram ``x`` has ``x_bucket``, ``x_sum`` and ``x_count``."""
    kinds = {"Counter": "counter", "CounterMetricFamily": "counter", "counter": "counter",
             "Gauge": "gauge", "GaugeMetricFamily": "gauge", "gauge": "gauge",
             "Histogram": "histogram", "BatchHistogram": "histogram", "Info": "info", "EvaluatorMetric": None}
    exposed: dict[str, str] = {}
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\b(\w+)\(\s*\"(safous_\w+)\"", source):
            if match[1] not in kinds:
                continue
            kind = kinds[match[1]]
            if kind is None:  # EvaluatorMetric(name, documentation, "counter" | "gauge", value)
                declared = re.search(r"\"(counter|gauge)\"", source[match.end(): match.end() + 400])
                assert declared, f"{path}: {match[2]} declares no kind"
                kind = declared[1]
            name = match[2]
            if kind == "counter":
                exposed[name.removesuffix("_total") + "_total"] = kind
            elif kind == "info":
                exposed[name + "_info"] = "gauge"
            else:
                exposed[name] = kind
    return exposed


def test_every_metric_the_sidecar_exposes_is_in_the_metrics_table() -> None:
    exposed = _exposed_metrics()
    assert {"safous_decisions_total", "safous_ready", "safous_build_info", "safous_check_duration_seconds",
            "safous_shared_cache_hits_total", "safous_bundle_revision_info"} <= set(exposed)
    page = METRICS_PAGE.read_text(encoding="utf-8")
    missing = [name for name in exposed if not re.search(rf"`{name}[`{{]", page)]
    assert missing == [], f"{METRICS_PAGE.name} does not list {missing}"


def test_every_decision_code_is_in_the_codes_table() -> None:
    from sidecar.decision import Code

    page = CODES_PAGE.read_text(encoding="utf-8")
    missing = [code.value for code in Code if f"| `{code.value}` |" not in page]
    assert missing == [], f"{CODES_PAGE.name}'s decision codes table lacks {missing}"


def test_the_alert_rules_are_prometheus_rules_on_metrics_the_sidecar_exposes() -> None:
    import promql_parser
    import yaml

    document = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))
    exposed = _exposed_metrics()
    series = set(exposed) | {f"{name}_{suffix}" for name, kind in exposed.items() if kind == "histogram"
                             for suffix in ("bucket", "sum", "count")}
    names, problems = set(), []
    for group in document["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule.get("alert")
            assert re.fullmatch(r"Safous[A-Za-z]+", rule["alert"]), rule["alert"]
            assert rule["alert"] not in names, f"{rule['alert']} twice"
            names.add(rule["alert"])
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            try:
                promql_parser.parse(rule["expr"])
            except ValueError as exc:  # what the parser raises for an expression that is not PromQL
                problems.append(f"{rule['alert']}: {exc}")
            unknown = {m for m in re.findall(r"\bsafous_\w+", rule["expr"]) if m not in series}
            if unknown:
                problems.append(f"{rule['alert']}: not exposed by the sidecar: {sorted(unknown)}")
    assert problems == []
    # The failure modes the sidecar reports, each watched by at least one rule.
    watched = " ".join(rule["expr"] for group in document["groups"] for rule in group["rules"])
    for metric in ("safous_ready", "safous_rules_last_reload_ok", "safous_bundle_activation_failures_total",
                   "safous_webhook_calls_total", "safous_checks_refused_total", "caller_gone",
                   "safous_decision_log_dropped_total", "safous_shared_cache_breaker_state",
                   "safous_insecure_listeners", "safous_activity_dropped_total"):
        assert metric in watched, f"no alert rule watches {metric}"


def test_every_path_and_test_the_guides_cite_exists() -> None:
    """As for the decision records: a test or function renamed under a guide fails here until the
    guide follows (the security guide cites the test behind each guarantee)."""
    problems = []
    for page in PAGES:
        for path, name in CITED_PATH.findall(page.read_text(encoding="utf-8")):
            if path.startswith(GENERATED):
                continue
            if not (ROOT / path).exists():
                problems.append(f"{page.relative_to(DOCS)}: {path}")
            elif name and not re.search(rf"^\s*(?:async def|def|class) {name}\b|^{name}\b\s*[:=]",
                                        (ROOT / path).read_text(encoding="utf-8"), re.M):
                problems.append(f"{page.relative_to(DOCS)}: {path}::{name}")
    assert problems == []

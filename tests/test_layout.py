"""The package layout holds: the evaluate stage (``sidecar.rules``) runs without the store and
the command line, so a rule can be judged, and its modules tested, without rules.db."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT

# Every module of sidecar/rules, found on disk, so that a new one is held to the same rule.
_IMPORT_THE_EVALUATE_STAGE = """
import importlib, json, pkgutil, sys
import sidecar.rules
names = [f"sidecar.rules.{m.name}" for m in pkgutil.iter_modules(sidecar.rules.__path__)]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(sys.modules)}))
"""

FORBIDDEN = ("sqlite3", "sqlite_utils", "click", "sidecar.db")


def test_the_evaluate_stage_imports_neither_the_store_nor_the_cli() -> None:
    # A fresh interpreter: this one has long imported everything.
    done = subprocess.run([sys.executable, "-c", _IMPORT_THE_EVALUATE_STAGE], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    assert {"sidecar.rules.model", "sidecar.rules.evaluator", "sidecar.rules.client"} <= set(result["imported"])
    loaded = set(result["loaded"])
    assert {"sidecar.rules.evaluator", "sidecar.rules.oauth"} <= loaded
    offending = sorted(name for name in loaded
                       if any(name == f or name.startswith(f + ".") for f in FORBIDDEN))
    assert offending == [], f"importing sidecar.rules loads {offending}"

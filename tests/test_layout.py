"""The package layout holds: the evaluate stage (``sidecar.rules``) runs without the store and
the command line, so a rule can be judged, and its modules tested, without rules.db; and only
the admin script imports the admin script (``sidecar.admin``)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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

# The store, the CLI, and the shared cache's server: the evaluator asks its cache, whose
# fleet part (sidecar.shared_cache) the server hands it.
FORBIDDEN = ("sqlite3", "sqlite_utils", "click", "sidecar.db", "redis", "sidecar.shared_cache")


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


# --- the serving process does not import the admin script ---------------------------------------

ADMIN = "sidecar.admin"
_IMPORTERS = ("importlib.import_module", "import_module", "__import__")


def _module_name(path: Path) -> tuple[str, bool]:
    """The dotted name of the module at ``path`` (under ROOT), and whether it is a package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if package else parts), package


def imported_names(source: str, module: str, package: bool) -> set[str]:
    """Every module name ``source`` may import, wherever the import statement is (at the top,
    inside a function, under ``if TYPE_CHECKING``): ``import a.b`` gives a.b; ``from a import b``
    gives a and a.b (b may be a module); relative imports resolved against ``module``;
    ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name give x."""
    names: set[str] = set()
    here = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in _IMPORTERS and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def _is_admin(name: str) -> bool:
    return name == ADMIN or name.startswith(ADMIN + ".")


@pytest.mark.parametrize(("module", "package", "source", "imports_admin"), [
    ("sidecar.bundles._sync", False, "def f():\n    from sidecar.admin.exchange import plan_import\n", True),
    ("sidecar.bundles._sync", False, "from .. import admin\n", True),
    ("sidecar.bundles._sync", False, "from ..admin import validation\n", True),
    ("sidecar.bundles", True, "from ..admin.validation import AdminError\n", True),
    ("sidecar.server", False, "from sidecar import admin\n", True),
    ("sidecar.server", False, "import sidecar.admin.cli as cli\n", True),
    ("sidecar.server", False, "if TYPE_CHECKING:\n    import sidecar.admin\n", True),
    ("sidecar.server", False, "importlib.import_module('sidecar.admin.portal')\n", True),
    ("sidecar.server", False, "from sidecar import administration, db\n", False),
    ("sidecar.bundles", True, "from .. import exchange\n", False),
    ("sidecar.server", False, "'''Not the admin script: sidecar.admin.cli is another process.'''\n", False),
])
def test_the_import_scan_sees_every_form(module: str, package: bool, source: str, imports_admin: bool) -> None:
    assert any(_is_admin(n) for n in imported_names(source, module, package)) is imports_admin


def test_only_the_admin_script_imports_the_admin_script() -> None:
    """The serving process (and every module it may load) depends on the layers below it, not
    on the admins' CLI package: a static scan of every module on disk outside ``sidecar/admin/``,
    so a new module is held to the rule and an import inside a function, which no import of the
    module runs, is seen too."""
    admin = ROOT / "sidecar" / "admin"
    scanned: dict[str, list[str]] = {}
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        if path.is_relative_to(admin):
            continue
        module, package = _module_name(path)
        names = imported_names(path.read_text(encoding="utf-8"), module, package)
        scanned[module] = sorted(name for name in names if _is_admin(name))
    assert {"sidecar.server", "sidecar.bundles", "sidecar.bundles._sync"} <= set(scanned)
    offending = {module: names for module, names in scanned.items() if names}
    assert offending == {}, f"modules outside sidecar/admin/ import the admin script: {offending}"


# --- packages whose names load on first use (sidecar._lazy) ---------------------------------------

_USE_A_LAZY_PACKAGE = """
import json, sys
from sidecar.db import names            # a light submodule, asked of the package
import sidecar.bundles
light = sorted(sys.modules)
missing = []
for package in ("sidecar.db", "sidecar.bundles"):
    try:
        getattr(sys.modules[package], "no_such_name")
    except AttributeError:
        missing.append(package)
from sidecar.db import _exports as db_exports, read_rules
from sidecar.bundles import _exports as bundle_exports
exported = all(getattr(sys.modules[p], n) is getattr(e, n)
               for p, e in (("sidecar.db", db_exports), ("sidecar.bundles", bundle_exports)) for n in e.__all__)
print(json.dumps({"light": light, "missing": missing, "exported": exported,
                  "read_rules": read_rules.__module__, "ALGORITHMS": sorted(sidecar.bundles.ALGORITHMS)}))
"""


def test_lazy_packages_load_their_names_on_first_use_only() -> None:
    done = subprocess.run([sys.executable, "-c", _USE_A_LAZY_PACKAGE], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    result = json.loads(done.stdout)
    heavy = ("pydantic", "sqlite_utils", "cryptography", "aiohttp", "jwt", "sidecar.db._exports",
             "sidecar.bundles._exports")
    assert [m for m in result["light"] if any(m == h or m.startswith(h + ".") for h in heavy)] == []
    assert {"sidecar.db.names", "sidecar.db.connection"} <= set(result["light"])
    assert result["missing"] == ["sidecar.db", "sidecar.bundles"]
    assert result["exported"] is True
    assert result["read_rules"] == "sidecar.db.objects"
    assert result["ALGORITHMS"] == ["ed25519", "es256"]


def test_the_server_loads_redis_only_for_a_shared_cache() -> None:
    """A sidecar without --shared-cache never loads redis-py (about 100 ms and 130 modules of a
    process's start and memory: the 10,000-rule RSS bound is measured on such a sidecar)."""
    done = subprocess.run([sys.executable, "-c", "import json, sys, sidecar.server, sidecar.cli; "
                           "print(json.dumps(sorted(sys.modules)))"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    loaded = json.loads(done.stdout)
    assert [name for name in loaded if name == "redis" or name.startswith(("redis.", "sidecar.shared_cache"))] == []


def test_no_test_module_imports_another() -> None:
    """What several test modules share lives in modules of its own (tests/helpers.py,
    admin_cli.py, the *_harness and *_servers modules): importing a test module runs its
    fixtures' module-level set-up and ties two modules' tests together."""
    offending = sorted(
        path.name for path in (ROOT / "tests").glob("*.py")
        if re.search(r"^\s*(from\s+tests\.test_\w+\s+import|import\s+tests\.test_)", path.read_text(), re.M))
    assert offending == []

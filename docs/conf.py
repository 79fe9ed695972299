"""Sphinx configuration of the project's documentation (``make docs``; built by ``make test``).

Markdown sources (MyST), the furo theme. The build is strict and offline:

- ``make docs`` and tests/test_docs.py run ``sphinx-build -W --keep-going``: every warning is an
  error, and all of them are reported before the build fails. A broken cross-reference, a link
  to a heading that does not exist or a page left out of every toctree is such a warning.
- ``nitpicky``: a reference whose target is missing warns even where Sphinx would stay quiet.
- Nothing is fetched at build time: no intersphinx, no remote images, no extension that
  downloads (Mermaid's JS, for one): the diagrams are text.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

project = "Safous sidecar"
author = "the Safous sidecar maintainers"
copyright = "2026, " + author
# sidecar.__version__ read as text: building the docs imports nothing of the package.
_version = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "sidecar" / "__init__.py").read_text(), re.M)
release = version = _version.group(1) if _version else "unknown"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
# The portal screenshots (docs/*.png, shown by admins/portal.md) and the bench charts
# (docs/bench/*.png) are files, not pages.
exclude_patterns = ["_build"]

nitpicky = True
# Headings down to ### get anchors (GitHub's slugs), so ``page.md#a-heading`` links resolve,
# and are checked.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "substitution"]

# The charts `make bench` draws into docs/bench/ (tests/bench_charts.py), shown where a page
# says {{ bench_charts }}: those present, so that the build needs none of them (a chart not
# drawn yet, or not committed, is no broken image).
BENCH_CHARTS = {
    "latency-grpc-through-envoy.png": "gRPC through Envoy, evenly spaced, 3 cached rules: the sidecar and the bare "
                                      "servicer",
    "latency-http-endpoint.png": "The HTTP endpoint behind Envoy and the bare gRPC servicer, integration off",
    "fleet-webhook-calls.png": "Webhook calls of a fleet of 4 sidecars, each pod's own cache against the shared cache",
    "latency-fleet-cache.png": "The sidecars' latency with the shared cache on: the pod's own cache, the fleet's, "
                               "the webhook",
}


def _bench_charts() -> str:
    drawn = sorted((ROOT / "docs" / "bench").glob("*.png"))
    if not drawn:
        return "*No chart has been drawn yet: `make bench` draws them into `docs/bench/`.*"
    return "\n\n".join(f"![{BENCH_CHARTS.get(path.name, path.stem)}](/bench/{path.name})" for path in drawn)


myst_substitutions = {"bench_charts": _bench_charts()}

html_theme = "furo"
html_title = f"Safous sidecar {release}"
html_static_path: list[str] = []
# No "view source" link to a host: the sources are in the repository, beside the code.
html_show_sourcelink = False
html_copy_source = False

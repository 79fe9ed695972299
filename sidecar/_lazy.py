"""Packages whose public names load on first use (PEP 562), so that one light submodule of
theirs can be imported alone.

``sidecar.db`` and ``sidecar.bundles`` re-export what their private modules define; loading all
of that (pydantic, sqlite-utils, cryptography, aiohttp) takes a few hundred milliseconds, which
the admin script's shell completion cannot spend on a Tab (it reads names with
``sidecar.db.names`` alone). Each such package imports its public names in an ``_exports``
module, which mypy reads as the package's own (``from ._exports import *`` under
``TYPE_CHECKING``), and hands its module ``__getattr__`` to ``exports_on_first_use``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable

__all__ = ["exports_on_first_use"]


def exports_on_first_use(package: str) -> Callable[[str], object]:
    """The module ``__getattr__`` of ``package``: the first name asked of it that it lacks
    imports ``package._exports`` and makes every name of that module's ``__all__`` the
    package's own attribute (later uses are plain attribute reads); a submodule's name imports
    that submodule alone. A name that is neither raises ``AttributeError``, as for any module."""

    def load(name: str) -> object:
        if name.startswith("__"):  # dunder probes (copy, pickle, inspect): never worth a load
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            # ``from package import submodule`` asks the package first: a light submodule
            # must not load the exports on the way.
            return importlib.import_module(f"{package}.{name}")
        exports = importlib.import_module(f"{package}._exports")
        namespace = sys.modules[package].__dict__
        namespace.update((export, getattr(exports, export)) for export in exports.__all__)
        if name not in namespace:  # importing _exports also binds the package's submodules
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return namespace[name]

    return load

"""Signed rule bundles: one rule set, authored in one rules.db, followed by every sidecar.

    _format.py   the bundle (a JWS over the export document plus a revision), keys, signing and
                 verification, the literal-secret check
    _sources.py  where a bundle comes from: a file (a mounted ConfigMap) or an http(s) URL
    _sync.py     the sidecar's side: poll, verify, apply to rules.db in one audited
                 transaction, and report (metrics, /readyz, log lines)

Exceptions::

    BundleRefused     a bundle (or its download) that changes nothing; ``reason`` is a stable
                      code (``RefusalReason``) for logs and metrics, ``str()`` says why

``ALGORITHMS`` and ``MAX_SEQUENCE`` are defined here; every other name loads when first used
(``sidecar._lazy``; the list is ``_exports``): the admin script declares its bundle options
from these two without loading cryptography and aiohttp.
"""

from typing import TYPE_CHECKING

from .._lazy import exports_on_first_use

# rules.db stores the sequence as a SQLite INTEGER (signed 64 bits): a greater one cannot be
# applied, so it is refused where the bundle is read, not where it is written.
MAX_SEQUENCE = 2**63 - 1
ALGORITHMS: dict[str, str] = {"ed25519": "EdDSA", "es256": "ES256"}
"""The kinds of signing key (``safous-admin bundle keygen --algorithm``), each with its JWS
algorithm."""

if TYPE_CHECKING:
    # The package's names, as mypy and readers see them (mypy does not follow _exports'
    # ``__all__ += _format.__all__``, hence _format's own).
    from ._exports import *  # noqa: F403
    from ._format import *  # noqa: F403

__getattr__ = exports_on_first_use(__name__)

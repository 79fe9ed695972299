"""Signed rule bundles: one rule set, authored in one rules.db, followed by every sidecar.

    _format.py   the bundle (a JWS over the export document plus a revision), keys, signing and
                 verification, the literal-secret check
    _sources.py  where a bundle comes from: a file (a mounted ConfigMap) or an http(s) URL
    _sync.py     the sidecar's side: poll, verify, apply to rules.db in one audited
                 transaction, and report (metrics, /readyz, log lines)

Exceptions::

    BundleRefused     a bundle (or its download) that changes nothing; ``reason`` is a stable
                      code (``RefusalReason``) for logs and metrics, ``str()`` says why
"""

from . import _format
from ._format import *  # noqa: F403 - _format's __all__ is the package's, whole
from ._sources import BundleSource, FileSource, HttpSource
from ._sync import BundleSync

__all__ = ["BundleSource", "BundleSync", "FileSource", "HttpSource"]
__all__ += _format.__all__

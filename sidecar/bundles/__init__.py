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

from ._format import (
    ALGORITHMS,
    MAX_SEQUENCE,
    Bundle,
    BundleRefused,
    RefusalReason,
    VerificationKey,
    build_bundle,
    content_hash,
    generate_key,
    key_id_of,
    literal_secrets,
    load_signing_key,
    load_verification_key,
    parse_bundle,
)
from ._sources import BundleSource, FileSource, HttpSource
from ._sync import BundleSync

__all__ = [
    "ALGORITHMS",
    "MAX_SEQUENCE",
    "Bundle",
    "BundleRefused",
    "BundleSource",
    "BundleSync",
    "FileSource",
    "HttpSource",
    "RefusalReason",
    "VerificationKey",
    "build_bundle",
    "content_hash",
    "generate_key",
    "key_id_of",
    "literal_secrets",
    "load_signing_key",
    "load_verification_key",
    "parse_bundle",
]

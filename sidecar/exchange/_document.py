"""The document: the whole rule and policy set as one JSON object, what ``export`` writes,
``import`` reads and a bundle signs::

    {"version": 1,
     "rules": [{"name": ..., <every field of sidecar.rules.model.Rule>}, ...],
     "policies": [{"name": ..., <every field of sidecar.policies.Policy>}, ...]}

Secrets (password, client secret, Authorization and Proxy-Authorization header values) are
written masked unless asked for (``with_secrets``); references (``env:NAME``, ``file:PATH``) are
not secrets and are written as they are. On import, a masked secret means "keep the secret
stored for that rule" (``_plan``), so exporting and importing into the same rules.db is lossless
without ever writing a secret to the file; into another rules.db it needs the secrets exported,
or given as references.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.db import StoredPolicy, StoredRule
from sidecar.rules.secrets import MASK, SECRET_HEADERS, mask

__all__ = [
    "FORMAT_VERSION",
    "export_document",
    "masked_headers",
    "policy_document",
    "redacted",
    "rule_document",
]

FORMAT_VERSION = 1


def _masked_object(headers: Mapping[Any, Any]) -> dict[Any, Any]:
    return {k: MASK if str(k).lower() in SECRET_HEADERS else v for k, v in headers.items()}


def _masked_entry(entry: Any) -> Any:
    if isinstance(entry, Mapping):
        return _masked_object(entry)
    if not isinstance(entry, (list, tuple)):
        return MASK  # text such as "Authorization: Bearer ...": no name to tell it is not secret
    if len(entry) < 2 or (isinstance(entry[0], str) and entry[0].lower() not in SECRET_HEADERS):
        return list(entry)
    return [entry[0], MASK]


def masked_headers(headers: Any) -> Any:
    """A rule's headers as they may be shown: each value under an Authorization or
    Proxy-Authorization name (any case) masked. Rows written with plain SQL may hold any shape;
    values are kept only where a name says they are no secret: ``[name, value...]`` pairs of
    any length (a secret one becomes ``[name, MASK]``), ``{name: value}`` objects (inside the
    list or instead of it); anything else is the mask (None stays None). The same choices as
    the audit documents' (migration ``0008_audit_headers_masked``)."""
    if headers is None:
        return None
    if isinstance(headers, Mapping):
        return _masked_object(headers)
    if not isinstance(headers, (list, tuple)):
        return MASK
    return [_masked_entry(entry) for entry in headers]


def redacted(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A rule's fields with its password, client secret and secret header values masked."""
    out = dict(fields)
    for field in ("password", "client_secret"):
        if isinstance(out.get(field), str):
            out[field] = mask(out[field])
    if "headers" in out:
        out["headers"] = masked_headers(out["headers"])
    return out


def rule_document(stored: StoredRule, *, with_secrets: bool = False) -> dict[str, Any]:
    """The rule as exported: the model's fields (as stored when the row does not validate),
    secrets masked unless ``with_secrets``."""
    fields = stored.rule.model_dump(mode="json") if stored.rule else dict(stored.fields)
    return fields if with_secrets else redacted(fields)


def policy_document(stored: StoredPolicy) -> dict[str, Any]:
    """The policy as exported: the model's fields (as stored when the row does not validate)."""
    return stored.policy.model_dump(mode="json") if stored.policy else dict(stored.fields)


def export_document(rules: list[StoredRule], policies: list[StoredPolicy], *,
                    with_secrets: bool = False) -> dict[str, Any]:
    """The export of ``rules`` and ``policies`` (rows that do not validate are exported as
    stored; import refuses them until they are repaired)."""
    return {
        "version": FORMAT_VERSION,
        "rules": [rule_document(r, with_secrets=with_secrets) for r in rules],
        "policies": [policy_document(p) for p in policies],
    }

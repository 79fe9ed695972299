"""The map stage: one request's attributes as Safous parameters (``%name%`` in a rule).

Pure and without I/O: ``map_parameters`` turns ``RequestAttributes`` into ``Parameters``;
``check_parameter_name`` is what a rule is validated with before it is saved. The table of
parameters and where each comes from: docs/admins/rules.md, "Parameters".

Three kinds of names (``sidecar.parameter_names``, re-exported here):

- the fixed names of ``PARAMETERS`` (``username``, ``cert_thumbprint`` ...);
- ``headers.XYZ`` (``HEADER_PREFIX``): the request header ``XYZ``, matched case-insensitively;
- ``stored.NAME`` (``STORED_PREFIX``): a value kept by a ``store`` response action of an
  earlier rule of the same policy. It only exists while the rule evaluator runs a policy, so
  ``Parameters.lookup`` does not know it; the evaluator resolves it.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from sidecar.attributes import RequestAttributes
from sidecar.certificates import certificate_info
from sidecar.parameter_names import HEADER_PREFIX as HEADER_PREFIX
from sidecar.parameter_names import PARAMETERS as PARAMETERS
from sidecar.parameter_names import STORED_PREFIX as STORED_PREFIX

_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_STORED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # as a store action's value

# Integers above this do not survive a trip through a double (protobuf Struct numbers).
_EXACT_FLOAT_INT = 2**53


class UnknownParameter(ValueError):
    """A rule names a parameter that does not exist.

    ``name`` is the name as written (without ``%``); ``suggestion`` the closest known name, or
    None when nothing is close.
    """

    def __init__(self, name: str, suggestion: str | None = None, detail: str | None = None) -> None:
        self.name = name
        self.suggestion = suggestion
        message = f"unknown parameter %{name}%"
        if detail:
            message += f" — {detail}"
        if suggestion:
            message += f" — did you mean %{suggestion}%?"
        super().__init__(message)


ConnectionUsername = Literal["cert_cn", "none"]
"""Where ``%username%`` comes from for a TCP connection, which has no headers."""


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """Where the identity parameters come from.

    Header names are compared lower-case (they are stored lower-cased). A claim is a JWT
    payload key or a dot path into nested objects and lists (``realm_access.roles``,
    ``groups.0``); a key that itself holds dots (``https://example.com/roles``) is matched
    literally first. An empty header or claim name turns that source off.
    ``connection_username``: for a TCP connection (no headers, no JWT), ``%username%`` is the
    client certificate's subject CN (``cert_cn``) or nothing (``none``).
    """

    username_header: str = "x-safous-username"
    device_id_header: str = "x-safous-device-id"
    groups_header: str = "x-safous-groups"
    group_names_header: str = "x-safous-group-names"
    jwt_username_claim: str = "sub"
    jwt_groups_claim: str = "groups"
    jwt_group_names_claim: str = "group_names"
    connection_username: ConnectionUsername = "cert_cn"

    def __post_init__(self) -> None:
        for name in ("username_header", "device_id_header", "groups_header", "group_names_header"):
            object.__setattr__(self, name, getattr(self, name).strip().lower())


class Parameters(NamedTuple):
    """The parameter values of one request. (A named tuple: one is made per check.)

    ``values`` holds every name of ``PARAMETERS`` (``""`` when the request has no value),
    each worked out when first read; ``headers`` the request headers, lower-case names.
    """

    values: Mapping[str, str]
    headers: Mapping[str, str]

    def lookup(self, name: str) -> str:
        """The value of parameter ``name``: a name of ``PARAMETERS``, or ``headers.XYZ`` (the
        header ``XYZ``, case-insensitive, ``""`` if absent).

        Raises ``KeyError`` for anything else, ``stored.NAME`` included (the rule evaluator
        owns those).
        """
        value = self.values.get(name)
        if value is not None:
            return value
        if name.startswith(HEADER_PREFIX):
            return self.headers.get(name[len(HEADER_PREFIX):].lower(), "")
        raise KeyError(name)


def map_parameters(attrs: RequestAttributes, identity: IdentityConfig) -> Parameters:
    """The parameters of the request ``attrs`` (``PARAMETERS`` says where each comes from).

    ``username``, ``groups`` and ``group_names`` come from the JWT claim when
    ``attrs.jwt_payload`` holds it (not null), else from the identity header. A list claim is
    joined with ``,``; numbers and booleans take their JSON spelling (a whole number that went
    through a double, as protobuf Struct numbers do, loses its ``.0``); an object claim is
    compact JSON. Anything missing is ``""``. Never raises on odd input: an unreadable
    certificate yields empty certificate parameters.
    """
    headers = _lower_case_names(attrs.headers)
    return Parameters(_Values(attrs, identity, headers), headers)


def _from_identity(jwt: Mapping[str, Any], headers: Mapping[str, str], claim: str, header: str) -> str:
    value = _claim_text(_claim(jwt, claim)) if claim and jwt else None
    if value is not None:
        return value
    return headers.get(header, "") if header else ""


def _username(attrs: RequestAttributes, identity: IdentityConfig, headers: Mapping[str, str]) -> str:
    username = _from_identity(attrs.jwt_payload, headers, identity.jwt_username_claim, identity.username_header)
    if attrs.connection and not username and identity.connection_username == "cert_cn":
        return certificate_info(attrs.source.certificate).common_name
    return username


def _thumbprint(attrs: RequestAttributes) -> str:
    return certificate_info(attrs.source.certificate).thumbprint


def _thumbprint_256(attrs: RequestAttributes) -> str:
    return certificate_info(attrs.source.certificate).thumbprint_256


_Source = Callable[[RequestAttributes, IdentityConfig, Mapping[str, str]], str]
_SOURCES: Mapping[str, _Source] = MappingProxyType({
    "username": _username,
    "internal_addr": lambda attrs, identity, headers: attrs.destination.address,
    "user_agent": lambda attrs, identity, headers: headers.get("user-agent", ""),
    "remote_ip": lambda attrs, identity, headers: attrs.source.ip,
    "cert_thumbprint": lambda attrs, identity, headers: _thumbprint(attrs),
    "cert_thumbprint_upper": lambda attrs, identity, headers: _thumbprint(attrs).upper(),
    "cert_thumbprint_256": lambda attrs, identity, headers: _thumbprint_256(attrs),
    "cert_thumbprint_256_upper": lambda attrs, identity, headers: _thumbprint_256(attrs).upper(),
    "cert_name": lambda attrs, identity, headers: certificate_info(attrs.source.certificate).common_name,
    "cert_alt_name": lambda attrs, identity, headers: ",".join(certificate_info(attrs.source.certificate).alt_names),
    "device_id": lambda attrs, identity, headers: (
        headers.get(identity.device_id_header, "") if identity.device_id_header else ""),
    "groups": lambda attrs, identity, headers: _from_identity(
        attrs.jwt_payload, headers, identity.jwt_groups_claim, identity.groups_header),
    "group_names": lambda attrs, identity, headers: _from_identity(
        attrs.jwt_payload, headers, identity.jwt_group_names_claim, identity.group_names_header),
})
assert _SOURCES.keys() == PARAMETERS.keys()


class _Values(Mapping[str, str]):
    """The values of every name of ``PARAMETERS``, each worked out when first read and kept: a
    check reads only those its policy's rules use (with the integration off, the username for
    the activity log), and a certificate is parsed only when a rule asks for it."""

    __slots__ = ("_attrs", "_headers", "_identity", "_known")

    def __init__(self, attrs: RequestAttributes, identity: IdentityConfig, headers: Mapping[str, str]) -> None:
        self._attrs = attrs
        self._identity = identity
        self._headers = headers
        self._known: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        value = self._known.get(name)
        if value is None:
            value = self._known[name] = _SOURCES[name](self._attrs, self._identity, self._headers)
        return value

    def get(self, name: str, default: Any = None) -> Any:  # Mapping's own goes through an exception
        value = self._known.get(name)
        if value is not None:
            return value
        return self[name] if name in _SOURCES else default

    def __contains__(self, name: object) -> bool:
        return name in _SOURCES

    def __iter__(self) -> Iterator[str]:
        return iter(_SOURCES)

    def __len__(self) -> int:
        return len(_SOURCES)

    def __repr__(self) -> str:
        return repr(dict(self))


def check_parameter_name(name: str) -> None:
    """Accept ``name`` (written ``%name%`` in a rule) or raise ``UnknownParameter``.

    Known: the names of ``PARAMETERS``, ``headers.<HTTP header token>`` and
    ``stored.<1-64 letters, digits, '_' or '-', not starting with '_' or '-'>``. The error
    carries the closest known name when one is close enough to be a likely typo.
    """
    if name in PARAMETERS:
        return
    if name.startswith(HEADER_PREFIX):
        header = name[len(HEADER_PREFIX):]
        if _HEADER_TOKEN.fullmatch(header):
            return
        detail = (f"{header!r} is not a valid HTTP header name" if header
                  else "the header name is missing")
        raise UnknownParameter(name, detail=detail)
    if name.startswith(STORED_PREFIX):
        stored = name[len(STORED_PREFIX):]
        if _STORED_NAME.fullmatch(stored):
            return
        raise UnknownParameter(name, detail=(
            f"{stored!r} is not a stored value name "
            "(1-64 letters, digits, '_' or '-', starting with a letter or digit)"
        ))
    raise UnknownParameter(name, suggestion=_closest_name(name))


def _closest_name(name: str) -> str | None:
    # Candidates keyed lower-case so that case slips (%UserName%) still find their match.
    candidates = {known: known for known in PARAMETERS}
    _, dot, rest = name.partition(".")
    if dot and rest:  # a misspelt family: %header.accept%, %store.token%
        if _HEADER_TOKEN.fullmatch(rest):
            candidates[(HEADER_PREFIX + rest).lower()] = HEADER_PREFIX + rest
        if _STORED_NAME.fullmatch(rest):
            candidates[(STORED_PREFIX + rest).lower()] = STORED_PREFIX + rest
    matches = difflib.get_close_matches(name.lower(), list(candidates), n=1, cutoff=0.6)
    return candidates[matches[0]] if matches else None


def _lower_case_names(headers: Mapping[str, str]) -> Mapping[str, str]:
    names = "".join(headers)
    if names == names.lower():
        return headers
    # Not what Envoy sends, but cheap to make right: same-name headers join as Envoy joins them.
    lowered: dict[str, str] = {}
    for key, value in headers.items():
        lower = key.lower()
        lowered[lower] = f"{lowered[lower]},{value}" if lower in lowered else value
    return MappingProxyType(lowered)


def _claim(payload: Mapping[str, Any], path: str) -> Any:
    """The value at claim ``path`` of ``payload``, or None."""
    if not isinstance(payload, Mapping):
        return None
    if path in payload:
        return payload[path]
    node: Any = payload
    for part in path.split("."):
        if isinstance(node, Mapping):
            if part not in node:
                return None
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isascii() and part.isdigit():
            index = int(part)
            if index >= len(node):
                return None
            node = node[index]
        else:
            return None
    return node


def _claim_text(value: Any) -> str | None:
    """A claim value as parameter text; None when there is no value (absent or null)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(_scalar_text(item) for item in value if item is not None)
    return _scalar_text(value)


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # past Python's int-to-text digit limit: no JWT holds such a claim
            return ""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) <= _EXACT_FLOAT_INT:
            return str(int(value))
        return json.dumps(value)
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # non-string keys, cycles: odd input, still some text
        return str(value)

"""What the sidecar knows about one request, as plain values (no protobuf past the edge)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

EMPTY: Mapping[str, Any] = MappingProxyType({})
"""The empty mapping of absent headers, claims and context extensions, shared."""

# Named tuples, not frozen dataclasses: the edge makes three of these per check, and a frozen
# dataclass's __init__ costs 2.1 µs where a named tuple's costs 0.8 µs.


class Peer(NamedTuple):
    """One end of the connection as Envoy saw it.

    ``ip`` is empty for pipe or absent addresses; ``address`` is ``ip:port`` (``[v6]:port``),
    the pipe path, or empty. ``certificate`` is the URL-encoded PEM Envoy sends, or empty.
    """

    ip: str = ""
    port: int = 0
    address: str = ""
    principal: str = ""
    certificate: str = ""


class RequestAttributes(NamedTuple):
    """The attributes of one HTTP request that the check may look at.

    ``headers`` has lower-case names; a header sent several times has its values joined with
    ``,`` (as Envoy does). ``path`` excludes the query string, ``query`` holds it.
    ``host`` is the authority as sent (port included, if any). ``jwt_payload`` is the verified
    JWT payload put in metadata by Envoy's jwt_authn filter, or empty. ``context_extensions``
    are what the Envoy route passes (``ExtAuthzPerRoute.check_settings``), e.g. the policy it
    binds. ``connection``: the check is for a TCP connection (Envoy's network ext_authz filter),
    not an HTTP request: no method, path or headers; ``host`` is the TLS server name (SNI).
    """

    request_id: str
    method: str = ""
    host: str = ""
    path: str = "/"
    query: str = ""
    scheme: str = ""
    protocol: str = ""
    headers: Mapping[str, str] = EMPTY
    source: Peer = Peer()
    destination: Peer = Peer()
    sni: str = ""
    jwt_payload: Mapping[str, Any] = EMPTY
    context_extensions: Mapping[str, str] = EMPTY
    connection: bool = False

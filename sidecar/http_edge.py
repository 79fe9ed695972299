"""The HTTP edge: an authorization request from a proxy → ``RequestAttributes``, and a
``Decision`` → the answer the proxy acts on (200 allows, 403 denies).

Which headers tell what about the client's request is decided once, by the operator, with the
profile (``--authz-http-profile``), and applied here; nothing further down looks at a proxy's
header:

- ``envoy``: Envoy's ext_authz ``http_service``. The request line is the client's method and
  path (``--authz-http-path-prefix`` removed, as the config's ``path_prefix`` added it), Host its
  authority, and the other headers those the config's ``allowed_headers`` let through. What
  only Envoy knows comes in ``x-safous-authz-*`` headers the shipped config sets with
  ``authorization_request.headers_to_add`` after removing every client-sent ``x-safous-*``
  header: the client's address (``%DOWNSTREAM_REMOTE_ADDRESS%``, as the gRPC path's
  ``source.address``), the address it reached, its certificate (``%DOWNSTREAM_PEER_CERT%``, the
  URL-encoded PEM of the gRPC path's ``source.certificate``) and the TLS server name.
- ``forward-auth``: nginx ``auth_request``, Caddy ``forward_auth``, Traefik ``forwardAuth``. The
  client's method, URI, host and scheme come in ``X-Forwarded-Method``, ``-Uri``, ``-Host``,
  ``-Proto`` (the request's own when absent), its address is the ``--authz-http-trusted-hops``-th
  address of ``X-Forwarded-For`` counted from the right (each trusted proxy appends the address
  it saw; what a client wrote further left is never read), and its certificate is read only from
  the header the operator names (``--authz-http-client-cert-header``), as URL-encoded PEM
  (nginx ``$ssl_client_escaped_cert``), PEM, or base64 DER (Caddy ``certificate_der_base64``,
  Traefik's ``X-Forwarded-Tls-Client-Cert``).

Every value is client input passed on by a proxy and is treated as hostile: odd values are
normalised or dropped, never trusted to be well formed.
"""

from __future__ import annotations

import functools
import json
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from aiohttp import web

from .attributes import Peer, RequestAttributes
from .decision import Decision, result_name
from .edge import CODE_HEADER, REASON_HEADER, REQUEST_ID_HEADER, sanitize_reason, usable_request_id

Profile = Literal["envoy", "forward-auth"]

AUTHZ_PREFIX = "x-safous-authz-"
SOURCE_HEADER = AUTHZ_PREFIX + "source"
DESTINATION_HEADER = AUTHZ_PREFIX + "destination"
CERTIFICATE_HEADER = AUTHZ_PREFIX + "certificate"
SNI_HEADER = AUTHZ_PREFIX + "sni"

HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
"""Envoy removes the request headers this answer header names before the request goes on."""

METADATA_PREFIX = "safous-"
"""Answer headers the envoy profile adds for Envoy's ``dynamic_metadata_from_headers`` (its
access log: ``%DYNAMIC_METADATA(envoy.filters.http.ext_authz:safous-code)%``): decision, code,
policy, request id. Not prefixed ``x-safous-``, so that they never reach the upstream."""


@dataclass(frozen=True, slots=True)
class HttpEdgeConfig:
    """How the HTTP edge reads requests (the settings ``--authz-http-*``)."""

    profile: Profile
    trusted_hops: int = 1
    client_cert_header: str = ""
    path_prefix: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_cert_header", self.client_cert_header.strip().lower())


def _headers(raw: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names, repeats joined with ``,`` as Envoy joins them."""
    pairs = [(name.lower(), value) for name, value in raw]
    headers = dict(pairs)
    if len(headers) == len(pairs):  # no name twice: the common case, without a loop in Python
        return headers
    headers = {}
    for key, value in pairs:
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return headers


def _taken(headers: dict[str, str], prefix: str) -> dict[str, str]:
    """The headers named ``prefix``…, removed from ``headers``."""
    return {name: headers.pop(name) for name in [name for name in headers if name.startswith(prefix)]}


def _address(text: str) -> Peer:
    """``ip:port``, ``[v6]:port`` or a bare IP → a Peer; anything else → no address."""
    text = text.strip()
    host, port = text, 0
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6 else 0
    elif text.count(":") == 1:
        host, _, tail = text.partition(":")
        port = int(tail) if tail.isdigit() and len(tail) <= 5 else 0
    ip = _ip(host)
    if not ip:
        return Peer()
    if not 0 < port <= 65535:
        return Peer(ip, 0, ip)
    return Peer(ip, port, f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")


def _ip(text: str) -> str:
    """``text`` as an IP address in its canonical spelling, or ``""``. (The socket module's
    parsers: C, a tenth of ipaddress's time, on every request.)"""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, text))
        except (OSError, ValueError):
            continue
    return ""


def forwarded_for(value: str, hops: int) -> str:
    """The address the ``hops``-th trusted proxy appended to ``X-Forwarded-For`` (counted from
    the right), or ``""`` when there are fewer entries or that one is not an IP address."""
    entries = value.rsplit(",", hops) if hops >= 1 else []
    return _address(entries[-hops]).ip if len(entries) >= hops >= 1 else ""


_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def client_certificate(value: str) -> str:
    """A client certificate header's value as the URL-encoded PEM the certificate parameters
    read: URL-encoded PEM and PEM as they are; base64 DER (possibly URL-encoded; of a chain, the
    first: the client's own) wrapped as PEM. Anything else is no certificate."""
    value = value.strip()
    if not value or len(value) > 64 * 1024:
        return ""
    if "BEGIN" in value:  # PEM, or URL-encoded PEM (-----BEGIN is %2D...%2DBEGIN)
        return value
    # Traefik passes every certificate the client sent, base64 DER joined with ",", its own first.
    body = unquote(value).partition(",")[0].strip()
    if not _BASE64.fullmatch(body):
        return ""
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def read_request(method: str, target: str, raw_headers: Iterable[tuple[str, str]],
                 config: HttpEdgeConfig) -> RequestAttributes:
    """The attributes of an authorization request: its method, request target (path and
    query) and headers as the HTTP server parsed them. Absent facts are empty values."""
    headers = _headers(raw_headers)
    if config.profile == "envoy":
        return _envoy(method, target, headers, _taken(headers, AUTHZ_PREFIX), config)
    return _forward_auth(method, target, headers, config)


def _split_target(target: str) -> tuple[str, str]:
    path, _, query = target.partition("?")
    return path.partition("#")[0] or "/", query


def _envoy(method: str, target: str, headers: dict[str, str], trusted: Mapping[str, str],
           config: HttpEdgeConfig) -> RequestAttributes:
    if config.path_prefix and target.startswith(config.path_prefix):
        target = target[len(config.path_prefix):] or "/"
    path, query = _split_target(target)
    source = _address(trusted.get(SOURCE_HEADER, ""))
    certificate = trusted.get(CERTIFICATE_HEADER, "")
    if certificate:
        source = source._replace(certificate=certificate)
    sni = trusted.get(SNI_HEADER, "")
    return RequestAttributes(
        usable_request_id(headers.get(REQUEST_ID_HEADER, "")), method, headers.get("host", ""), path, query,
        headers.get("x-forwarded-proto", ""), "", headers, source, _address(trusted.get(DESTINATION_HEADER, "")),
        sni)


def _forward_auth(method: str, target: str, headers: dict[str, str], config: HttpEdgeConfig) -> RequestAttributes:
    path, query = _split_target(headers.get("x-forwarded-uri") or target)
    ip = forwarded_for(headers.get("x-forwarded-for", ""), config.trusted_hops)
    certificate = ""
    if config.client_cert_header:
        certificate = client_certificate(headers.pop(config.client_cert_header, ""))
    return RequestAttributes(
        usable_request_id(headers.get(REQUEST_ID_HEADER, "")), headers.get("x-forwarded-method") or method,
        headers.get("x-forwarded-host") or headers.get("host", ""), path, query,
        headers.get("x-forwarded-proto", ""), "", headers, Peer(ip, 0, ip, "", certificate))


# ------------------------------------------------------------------------------- answers

@functools.lru_cache(maxsize=1024)
def _denial(decision: Decision, envoy: bool) -> tuple[tuple[tuple[str, str], ...], str]:
    """A denial's headers and the start of its JSON body (the request id follows), as the gRPC
    path's denied response has them."""
    reason = sanitize_reason(decision.reason)
    headers = [(REASON_HEADER, reason), (CODE_HEADER, str(decision.code)), ("content-type", "application/json")]
    if envoy:
        headers += _metadata(decision, reason)
    body = json.dumps({"error": "access_denied", "code": str(decision.code), "reason": reason, "request_id": ""})
    return tuple(headers), body.removesuffix('""}')


def _metadata(decision: Decision, reason: str) -> list[tuple[str, str]]:
    return [(METADATA_PREFIX + "decision", result_name(decision.allowed, decision.audit_deny)),
            (METADATA_PREFIX + "code", str(decision.code)), (METADATA_PREFIX + "policy", decision.policy or ""),
            (METADATA_PREFIX + "reason", reason)]


@functools.lru_cache(maxsize=1024)
def _allowance(decision: Decision, envoy: bool) -> tuple[tuple[str, str], ...]:
    headers = list(decision.upstream_headers)
    if envoy:
        headers += _metadata(decision, sanitize_reason(decision.reason))
    return tuple(headers)


def build_response(decision: Decision, request_id: str, headers_to_remove: tuple[str, ...] = (), *,
                   envoy: bool = False) -> web.Response:
    """200 with the upstream headers (``x-safous-*``: stored values, the audit-mode header), or
    403 with the denial reason header and the JSON body of the gRPC path's denial. ``envoy``:
    also the decision as ``safous-*`` headers (Envoy's dynamic metadata) and, on an allow, the
    client-sent headers Envoy must remove (``headers_to_remove``). The status is set
    explicitly either way: nothing else but a 200 allows."""
    if not decision.allowed:
        headers, body = _denial(decision, envoy)
        response = web.Response(status=403, headers=headers, text=f"{body}{json.dumps(request_id)}}}")
    else:
        response = web.Response(status=200, headers=_allowance(decision, envoy))
        if envoy and headers_to_remove:
            response.headers[HEADERS_TO_REMOVE] = ",".join(headers_to_remove)
    if envoy:
        response.headers[METADATA_PREFIX + "request-id"] = request_id
    return response

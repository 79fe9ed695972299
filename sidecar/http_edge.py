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
from typing import Literal, NamedTuple
from urllib.parse import unquote

from .attributes import Peer, RequestAttributes
from .decision import Code, Decision, result_name
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

class HttpAnswer(NamedTuple):
    """An answer as it goes on the wire: ``head`` is the status line and header lines (each
    ending in CRLF; no Content-Length, no blank line: the connection adds what it decides,
    ``Connection: close`` included), ``body`` the bytes after them."""

    status: int
    head: bytes
    body: bytes = b""

    def headers(self) -> dict[str, str]:
        """The header lines by lower-case name (for reading an answer, not on the request path)."""
        lines = self.head.decode().split("\r\n")[1:-1]
        return {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}

    def wire(self, *, close: bool = False, head_only: bool = False) -> bytes:
        """The whole answer, with its Content-Length (and ``Connection: close`` when ``close``);
        ``head_only``: without the body (the answer to a HEAD request)."""
        return b"%s%scontent-length: %d\r\n\r\n%s" % (self.head, _CLOSE if close else b"", len(self.body),
                                                       b"" if head_only else self.body)


_CLOSE = b"connection: close\r\n"
_STATUS_LINES = {200: b"HTTP/1.1 200 OK\r\n", 400: b"HTTP/1.1 400 Bad Request\r\n",
                 403: b"HTTP/1.1 403 Forbidden\r\n"}
_UNSAFE = re.compile(r"[\r\n\x00]")
# Decisions whose fixed part is kept encoded: a reason past this is a one-off (a webhook's own
# words), not a repeated outcome, and is encoded for its answer alone.
_CACHED_REASON = 512


def _lines(headers: Iterable[tuple[str, str]]) -> bytes:
    """Header lines; a CR, LF or NUL in a name or value (which would end a header early and
    start one of the client's choosing) raises ValueError: the pipeline answers
    ``internal_error`` instead."""
    pairs = tuple(headers)
    if any(_UNSAFE.search(name) or _UNSAFE.search(value) for name, value in pairs):
        raise ValueError("a header name or value holds a line break or NUL")
    return "".join(f"{name}: {value}\r\n" for name, value in pairs).encode()


def _fixed(decision: Decision, envoy: bool) -> tuple[bytes, bytes]:
    """What an answer to ``decision`` has whatever the request: the status line and headers
    before the per-request ones, and for a denial the start of its JSON body (the request id
    follows), as the gRPC path's denied response has it."""
    reason = sanitize_reason(decision.reason)
    metadata = [(METADATA_PREFIX + "decision", result_name(decision.allowed, decision.audit_deny)),
                (METADATA_PREFIX + "code", str(decision.code)), (METADATA_PREFIX + "policy", decision.policy or ""),
                (METADATA_PREFIX + "reason", reason)] if envoy else []
    if decision.allowed:
        return _STATUS_LINES[200] + _lines(metadata), b""
    headers = [(REASON_HEADER, reason), (CODE_HEADER, str(decision.code)), ("content-type", "application/json"),
               *metadata]
    body = json.dumps({"error": "access_denied", "code": str(decision.code), "reason": reason, "request_id": ""})
    return _STATUS_LINES[403] + _lines(headers), body.removesuffix('""}').encode()


@functools.lru_cache(maxsize=1024)
def _fixed_cached(allowed: bool, code: Code, reason: str, policy: str | None, audit_deny: bool,
                  envoy: bool) -> tuple[bytes, bytes]:
    return _fixed(Decision(allowed, code, reason, policy, audit_deny=audit_deny), envoy)


def build_response(decision: Decision, request_id: str, headers_to_remove: tuple[str, ...] = (), *,
                   envoy: bool = False) -> HttpAnswer:
    """200 with the upstream headers (``x-safous-*``: stored values, the audit-mode header), or
    403 with the denial reason and code headers and the JSON body of the gRPC path's denial.
    ``envoy``: also the decision as ``safous-*`` headers (Envoy's dynamic metadata) and, on an
    allow, the client-sent headers Envoy must remove (``headers_to_remove``). The status is set
    explicitly either way: nothing else but a 200 allows."""
    if len(decision.reason) <= _CACHED_REASON:
        head, body = _fixed_cached(decision.allowed, decision.code, decision.reason, decision.policy,
                                   decision.audit_deny, envoy)
    else:
        head, body = _fixed(decision, envoy)
    own: list[tuple[str, str]] = [(METADATA_PREFIX + "request-id", request_id)] if envoy else []
    if not decision.allowed:
        return HttpAnswer(403, head + _lines(own), body + b'%s}' % json.dumps(request_id).encode())
    if envoy and headers_to_remove:
        own.append((HEADERS_TO_REMOVE, ",".join(headers_to_remove)))
    return HttpAnswer(200, head + _lines((*decision.upstream_headers, *own)))


def bad_request(reason: str) -> HttpAnswer:
    """The answer to a request that could not be read (past a bound, malformed): 400, which
    every proxy takes as a denial, with why. No decision was made, so there is no code."""
    return HttpAnswer(400, _STATUS_LINES[400] + _lines([(REASON_HEADER, sanitize_reason(reason))]))

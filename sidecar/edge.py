"""The gRPC edge: CheckRequest → RequestAttributes, and Decision → CheckResponse.

Protobuf is read and built only here. Everything Envoy sends is treated as untrusted input:
odd values are normalised, never trusted to be well formed.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from ._pb.envoy.config.core.v3 import base_pb2
from ._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from ._pb.envoy.type.v3 import http_status_pb2
from ._pb.google.rpc import status_pb2
from .attributes import EMPTY, Peer, RequestAttributes
from .decision import Code, Decision, PolicySource, Result, result_name

# gRPC status codes (google.rpc.Code); written out to avoid depending on grpc-status protos.
OK = 0
PERMISSION_DENIED = 7

REASON_HEADER = "x-safous-denial-reason"
CODE_HEADER = "x-safous-denial-code"
"""The denial's stable code, beside its reason: a proxy that drops the JSON body (nginx's
``error_page``) can still pass it on."""
REQUEST_ID_HEADER = "x-request-id"
MAX_REASON_LENGTH = 256
MAX_REQUEST_ID_LENGTH = 128
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]+")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _peer(peer: Any) -> Peer:
    address = peer.address
    # An IP socket, as on every check Envoy sends over TCP: read without asking which kind of
    # address is set (WhichOneof costs as much as the rest), since an unset one reads empty.
    socket = address.socket_address
    ip = socket.address
    if ip:  # positional: (ip, port, address, principal, certificate)
        port = socket.port_value
        return Peer(ip, port, f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", peer.principal, peer.certificate)
    kind = address.WhichOneof("address")
    if kind == "socket_address":
        port = socket.port_value
        return Peer("", port, f":{port}", peer.principal, peer.certificate)
    text = ""
    if kind == "pipe":
        text = address.pipe.path
    elif kind == "envoy_internal_address":
        text = address.envoy_internal_address.server_listener_name
    return Peer(address=text, principal=peer.principal, certificate=peer.certificate)


def _headers(http: Any) -> dict[str, str]:
    if http.HasField("header_map") and http.header_map.headers:
        # encode_raw_headers: values are bytes and may not be UTF-8; repeated names are joined
        # the way Envoy joins them in the plain map.
        merged: dict[str, str] = {}
        for header in http.header_map.headers:
            value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
            key = header.key.lower()
            merged[key] = f"{merged[key]},{value}" if key in merged else value
        return merged
    # Not dict(map): a protobuf map's keys() is a Python-level view, 1.5x slower than this.
    map_ = http.headers
    headers = {name: map_[name] for name in map_}
    names = "".join(headers)  # one C call to see that Envoy sent lower-case names, as it does
    return headers if names == names.lower() else {k.lower(): v for k, v in headers.items()}


def _json_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _json_value(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_json_value(v) for v in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)


def _jwt_payload(attrs: Any, namespace: str, key: str) -> Mapping[str, Any]:
    if not attrs.HasField("metadata_context"):  # the common case, seen without a map lookup
        return EMPTY
    metadata = attrs.metadata_context.filter_metadata
    if namespace not in metadata:
        return EMPTY
    # Not json_format.MessageToDict: it raises ValueError on a NaN or infinite number (a Struct
    # holds doubles, so metadata may carry them) anywhere in the namespace, which would make
    # such a request an internal_error deny however good its claims. Only the payload is
    # converted; numbers stay floats.
    fields = metadata[namespace].fields
    if key not in fields:
        return EMPTY
    payload = _json_value(fields[key])
    return payload if isinstance(payload, dict) else EMPTY


def _context_extensions(attrs: Any) -> Mapping[str, str]:
    # Almost always none: the shared empty mapping rather than a new dict per check.
    return dict(attrs.context_extensions) if attrs.context_extensions else EMPTY


def usable_request_id(request_id: str) -> str:
    """``request_id``, or a fresh one when it is empty, long or not a printable ASCII line.
    Envoy keeps an internal client's own x-request-id (and a forward-auth proxy may pass any),
    and it goes on into dynamic metadata, the 403 body and the activity log. Length first, so a
    long one is refused without being scanned."""
    if 0 < len(request_id) <= MAX_REQUEST_ID_LENGTH and request_id.isascii() and request_id.isprintable():
        return request_id
    return uuid.uuid4().hex


def read_request(request: pb.CheckRequest, *, jwt_namespace: str = "envoy.filters.http.jwt_authn",
                 jwt_payload_key: str = "jwt_payload") -> RequestAttributes:
    """The attributes of a CheckRequest as plain values. Absent fields become empty values.

    A CheckRequest without an HTTP request comes from Envoy's network ext_authz filter: a TCP
    connection (``connection``), whose host is its TLS server name."""
    attrs = request.attributes
    if not attrs.HasField("request"):
        return RequestAttributes(
            request_id=uuid.uuid4().hex,
            host=attrs.tls_session.sni,
            path="",
            source=_peer(attrs.source),
            destination=_peer(attrs.destination),
            sni=attrs.tls_session.sni,
            context_extensions=_context_extensions(attrs),
            connection=True,
        )
    http = attrs.request.http
    headers = _headers(http)
    path, _, query = (http.path or headers.get(":path", "/")).partition("?")
    # x-request-id (set by Envoy, traceable in its access log and the app) rather than http.id,
    # which is only Envoy's internal stream id.
    request_id = usable_request_id(headers.get(REQUEST_ID_HEADER) or http.id)
    # Positional, in RequestAttributes' field order (half the cost of keywords, on every check):
    # request_id, method, host, path, query, scheme, protocol, headers, source, destination,
    # sni, jwt_payload, context_extensions.
    return RequestAttributes(
        request_id, http.method or headers.get(":method", ""), http.host or headers.get(":authority", ""),
        path.partition("#")[0] or "/", query or http.query, http.scheme, http.protocol, headers,
        _peer(attrs.source), _peer(attrs.destination), attrs.tls_session.sni,
        _jwt_payload(attrs, jwt_namespace, jwt_payload_key), _context_extensions(attrs),
    )


def sanitize_reason(reason: str) -> str:
    """A header-safe reason: printable ASCII on one line, at most MAX_REASON_LENGTH chars."""
    text = _NOT_PRINTABLE_ASCII.sub(" ", reason).strip()
    if len(text) > MAX_REASON_LENGTH:
        text = text[: MAX_REASON_LENGTH - 3] + "..."
    return text or "access denied"


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def result_of(decision: Decision) -> Result:
    """``allow``, ``deny``, or ``audit_deny`` (allowed by an audit-mode policy that would deny)."""
    return result_name(decision.allowed, decision.audit_deny)


def _metadata(decision: Decision, reason: str) -> struct_pb2.Struct:
    """What Envoy keeps as dynamic metadata under ``envoy.filters.http.ext_authz``, for its
    access log (``%DYNAMIC_METADATA(envoy.filters.http.ext_authz:code)%``) and later filters.
    ``request_id`` is set per request (``build_response``)."""
    metadata = struct_pb2.Struct()
    fields = metadata.fields
    fields["decision"].string_value = result_of(decision)
    fields["code"].string_value = decision.code
    fields["policy"].string_value = decision.policy or ""
    fields["policy_source"].string_value = decision.policy_source
    fields["reason"].string_value = reason
    return metadata


def _template(decision: Decision) -> tuple[pb.CheckResponse, str]:
    """The CheckResponse of ``decision`` but for what differs per request (its request id and
    the headers to remove), and for a deny the start of its JSON body."""
    reason = sanitize_reason(decision.reason)
    if decision.allowed:
        return pb.CheckResponse(
            status=status_pb2.Status(code=OK),
            ok_response=pb.OkHttpResponse(headers=[_header(key, value) for key, value in decision.upstream_headers]),
            dynamic_metadata=_metadata(decision, reason),
        ), ""
    body = json.dumps({"error": "access_denied", "code": str(decision.code), "reason": reason, "request_id": ""})
    return pb.CheckResponse(
        status=status_pb2.Status(code=PERMISSION_DENIED, message=f"{decision.code}: {reason}"),
        denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
            headers=[
                _header(REASON_HEADER, reason),
                _header(CODE_HEADER, str(decision.code)),
                _header("content-type", "application/json"),
            ],
        ),
        dynamic_metadata=_metadata(decision, reason),
    ), body.removesuffix('""}')


_TEMPLATE_MAX_REASON = 512
_TEMPLATE_MAX_HEADERS = 1024
_TEMPLATES = 1024


def _cacheable(decision: Decision) -> bool:
    if len(decision.reason) > _TEMPLATE_MAX_REASON:
        return False
    chars = 0
    for key, value in decision.upstream_headers:
        chars += len(key) + len(value)
    return chars <= _TEMPLATE_MAX_HEADERS


def _base(decision: Decision) -> tuple[pb.CheckResponse, str]:
    return _base_template(decision.allowed, decision.code, decision.reason, decision.policy,
                          decision.policy_source, decision.audit_deny)


@functools.lru_cache(maxsize=_TEMPLATES)
def _base_template(allowed: bool, code: Code, reason: str, policy: str | None, policy_source: PolicySource,
                   audit_deny: bool) -> tuple[pb.CheckResponse, str]:
    """A decision's response without its upstream headers: most checks repeat a handful of
    outcomes (a policy's allow, a denial's code and reason)."""
    return _template(Decision(allowed, code, reason, policy, (), policy_source, audit_deny))


# Stored values repeat across users more often than not (a tier, a group): their header
# messages are built once and copied (0.6 against 1.9 µs a header).
_upstream_header = functools.lru_cache(maxsize=_TEMPLATES)(_header)


def _copy(template: pb.CheckResponse) -> pb.CheckResponse:
    response = pb.CheckResponse()
    response.CopyFrom(template)
    return response


class _WithHeaders:
    """Responses of allowed decisions with upstream headers (stored values), kept whole and
    copied: with 3 stored values, a response costs 2.1 µs against 3.6 µs assembled from the
    decision's response without them and its header messages. A decision is kept from the
    second time it is asked for among the last ``size`` new ones, so that stored values that
    differ per user (an id) are assembled each time (6.2 µs) instead of pushing the shared ones
    out (keeping every decision, such values made every response be built from scratch: 14 µs).
    Small decisions only (``_cacheable``): what is kept holds about 5 MiB at most. Used on the
    event loop only."""

    def __init__(self, size: int) -> None:
        self._size = size
        # By hash, computed once (a named tuple's is computed anew at every dict operation),
        # with the decision itself to compare: two decisions of one hash share no response. A
        # collision among the seen only keeps a response one sighting early.
        self._kept: OrderedDict[int, tuple[Decision, pb.CheckResponse]] = OrderedDict()
        self._seen: OrderedDict[int, None] = OrderedDict()

    def response(self, decision: Decision) -> pb.CheckResponse:
        """A response of the caller's own for ``decision``."""
        key = hash(decision)
        kept = self._kept.get(key)
        if kept is not None and kept[0] == decision:
            self._kept.move_to_end(key)
            return _copy(kept[1])
        response = _copy(_base(decision)[0])
        response.ok_response.headers.extend([_upstream_header(k, v) for k, v in decision.upstream_headers])
        if self._seen.pop(key, 0) is None:  # asked for before: worth keeping
            self._kept[key] = (decision, _copy(response))
            if len(self._kept) > self._size:
                self._kept.popitem(last=False)
        else:
            self._seen[key] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
        return response


_with_headers = _WithHeaders(_TEMPLATES)


def build_response(decision: Decision, request_id: str,
                   headers_to_remove: Sequence[str] = ()) -> pb.CheckResponse:
    """The CheckResponse for a decision. The status is always set explicitly: Envoy reads an
    unset status as OK.

    On an allow, Envoy sets ``decision.upstream_headers`` on the request to the upstream and
    removes the request headers named in ``headers_to_remove`` (``Checker.headers_to_remove``;
    Envoy ignores pseudo-headers and Host there). Both are ignored on a deny. Every response
    carries the decision as dynamic metadata (``_metadata``); its reason is the header-safe one
    (``sanitize_reason``), since it ends up in log lines."""
    if not _cacheable(decision):
        response, body = _template(decision)
    elif decision.allowed and decision.upstream_headers:
        response, body = _with_headers.response(decision), ""
    else:
        template, body = _base(decision)
        response = _copy(template)
    response.dynamic_metadata.fields["request_id"].string_value = request_id
    if not decision.allowed:
        response.denied_response.body = f"{body}{json.dumps(request_id)}}}"
        return response
    if headers_to_remove:
        response.ok_response.headers_to_remove.extend(headers_to_remove)
    return response

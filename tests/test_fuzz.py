"""Bad CheckRequests: whatever Envoy — or anything that reaches the port —
sends, the sidecar never raises, never crashes, and never allows because it misread a request.

The messages are the generated ``CheckRequest`` type, built field by field by hypothesis:
missing attributes, empty and huge headers, non-UTF-8 raw header values, garbled, truncated
and enormous certificates, IPv6 / pipe / internal / absent addresses, odd hosts and paths, JWT
metadata of every JSON type. The rules.db of the end-to-end properties holds one policy, for
one exact host with the integration off, and the default action is deny: that host is the only
thing that may ever be allowed.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar import edge
from sidecar._pb.envoy.config.core.v3 import address_pb2, base_pb2
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2 as pb
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.check import canonical_path
from sidecar.parameters import PARAMETERS, IdentityConfig, map_parameters
from sidecar.policies import Policy
from tests.conftest import check_request, denial_reason, seed
from tests.helpers import OK, PERMISSION_DENIED

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"

# The only host the fuzzed rules.db can allow; everything else must be denied.
ALLOWED_HOST = "app.example.com"
ONLY_POLICY = Policy(name="only", hosts=(ALLOWED_HOST,), integration=False)
# How Envoy may spell that host (policies ignore case and port).
ALLOWED_SPELLINGS = (ALLOWED_HOST, "APP.Example.COM", ALLOWED_HOST + ":8080", ALLOWED_HOST + ":443")

KIB = 1024
BIG_VALUE = "v" * (64 * KIB)
THOUSAND_HEADERS = {f"x-h-{i}": f"value-{i}" for i in range(1000)}


def _certificate() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bob")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bob.example")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


PEM = _certificate()
CERTIFICATE = quote(PEM, safe="")  # as Envoy sends it


@st.composite
def certificates(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["none", "valid", "raw-pem", "truncated", "garbled", "enormous",
                                 "bad-escapes", "non-ascii", "two-begins", "text"]))
    if kind == "none":
        return ""
    if kind == "valid":
        return CERTIFICATE
    if kind == "raw-pem":
        return PEM
    if kind == "truncated":
        return CERTIFICATE[: draw(st.integers(0, len(CERTIFICATE) - 1))]
    if kind == "garbled":
        at = draw(st.integers(40, len(PEM) - 40))
        return quote(PEM[:at] + draw(st.sampled_from(["A", "!", "=", "\n", "é", ""])) + PEM[at + 1:], safe="")
    if kind == "enormous":  # 1 MiB: past what is worth parsing, must be ignored
        return draw(st.sampled_from([CERTIFICATE + "%0A" * (350 * KIB), "A" * (1024 * KIB)]))
    if kind == "bad-escapes":
        return "-----BEGIN%20CERTIFICATE-----%ZZ%0%E2%82-----END%20CERTIFICATE-----%ff%fe"
    if kind == "non-ascii":
        return "-----BEGIN CERTIFICATE-----\nMIIBé☃\n-----END CERTIFICATE-----\n"
    if kind == "two-begins":
        return "-----BEGIN CERTIFICATE-----" * 200 + CERTIFICATE
    return draw(st.text(max_size=300))


def addresses() -> st.SearchStrategy[address_pb2.Address | None]:
    socket = st.builds(
        lambda ip, port, named: address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=ip, **({"named_port": named} if named else {"port_value": port}))),
        st.sampled_from(["203.0.113.7", "2001:db8::1", "::1", "::ffff:192.0.2.1", "fe80::1%eth0",
                         "", "not-an-ip", "x" * 1000]) | st.text(max_size=40),
        st.integers(0, 2**32 - 1),
        st.none() | st.sampled_from(["https", ""]),
    )
    pipe = st.builds(lambda path, mode: address_pb2.Address(pipe=address_pb2.Pipe(path=path, mode=mode)),
                     st.sampled_from(["/run/envoy.sock", "@abstract", ""]) | st.text(max_size=40),
                     st.integers(0, 0o777))
    internal = st.builds(
        lambda listener, endpoint: address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress(
            endpoint_id=endpoint, **({"server_listener_name": listener} if listener is not None else {}))),
        st.none() | st.text(max_size=30), st.text(max_size=30))
    return st.none() | st.just(address_pb2.Address()) | socket | pipe | internal


def _not_allowed_host(host: str) -> bool:
    return ALLOWED_HOST not in host.lower()


OTHER_HOSTS = (
    st.sampled_from(["", "[::1]:x", "[::1]", "[::1", "::1", "127.0.0.1:8080", "h" * (10 * KIB),
                     "app.example.co", "app.example.com.evil", "evil-app.example.com", "*.example.com",
                     "app.example.net:80", "bad host\r\n", ":", "a:b:c"])
    | st.text(max_size=40).filter(_not_allowed_host)
)
PATHS = st.sampled_from(["", "/", "no-slash", "*", "?q=1", "/a?b=1#frag", "//x", "/%00",
                         "/" + "p" * (10 * KIB)]) | st.text(max_size=40)
METHODS = st.sampled_from(["GET", "POST", "", "get", "BREW", "M" * 100]) | st.text(max_size=10)
HEADER_NAMES = (st.sampled_from([":path", ":method", "user-agent", "x-safous-username", "X-Safous-Username",
                                 "x-request-id", "x-safous-groups", "x-safous-device-id", "", "host"])
                | st.text(max_size=30)).filter(lambda name: name.lower() != ":authority")
HEADER_VALUES = st.sampled_from(["", BIG_VALUE, "a,b", "\t x \t"]) | st.text(max_size=50)
RAW_VALUES = st.sampled_from([b"", b"\xff\xfe\x80", b"\x00nul", BIG_VALUE.encode(), "ok ☃".encode()]) \
    | st.binary(max_size=50)


def _json_values(numbers: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | numbers | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=15,
    )


# Struct numbers are doubles: NaN and infinities are representable.
JSON_VALUES = _json_values(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2**60, 2**60))
CLAIMS = st.dictionaries(
    st.sampled_from(["sub", "groups", "group_names", "exp"]) | st.text(max_size=10), JSON_VALUES, max_size=5)


def _value(python: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if isinstance(python, dict):
        for key, item in python.items():
            value.struct_value.fields[key].CopyFrom(_value(item))
    elif isinstance(python, list):
        value.list_value.values.extend([_value(item) for item in python])
        if not python:
            value.list_value.SetInParent()
    elif python is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(python, bool):
        value.bool_value = python
    elif isinstance(python, (int, float)):
        value.number_value = float(python)
    else:
        value.string_value = python
    return value


@st.composite
def metadata(draw: st.DrawFn) -> dict[str, Any] | None:
    """What Envoy's jwt_authn filter puts in metadata_context — or anything else."""
    shape = draw(st.sampled_from(["absent", "claims", "claims-and-siblings", "list", "number", "string",
                                  "null", "nested", "other-namespace"]))
    if shape == "absent":
        return None
    if shape == "claims":
        return {JWT_NAMESPACE: {"jwt_payload": draw(CLAIMS)}}
    if shape == "claims-and-siblings":
        return {JWT_NAMESPACE: {"jwt_payload": draw(CLAIMS), "other": draw(JSON_VALUES)}}
    if shape == "list":
        return {JWT_NAMESPACE: {"jwt_payload": draw(st.lists(JSON_VALUES, max_size=3))}}
    if shape == "number":
        return {JWT_NAMESPACE: {"jwt_payload": draw(st.floats() | st.integers(-100, 100))}}
    if shape == "string":
        return {JWT_NAMESPACE: {"jwt_payload": draw(st.text(max_size=20))}}
    if shape == "null":
        return {JWT_NAMESPACE: {"jwt_payload": None}}
    if shape == "nested":
        return {JWT_NAMESPACE: {"jwt_payload": {"sub": {"sub": {"sub": [[["x"]]]}},
                                                "groups": [{"a": 1}, [2, [3]], None]}}}
    return {draw(st.text(max_size=20)): {"jwt_payload": {"sub": "someone"}}}


@st.composite
def check_requests(draw: st.DrawFn) -> tuple[pb.CheckRequest, bool]:
    """A CheckRequest built field by field, and whether the seeded policy may allow it."""
    request = pb.CheckRequest()
    if draw(st.integers(0, 19)) == 0:  # no attributes at all
        return request, False
    attrs = request.attributes
    for peer, certificate in ((attrs.source, draw(certificates())), (attrs.destination, "")):
        address = draw(addresses())
        if address is not None:
            peer.address.CopyFrom(address)
        peer.principal = draw(st.sampled_from(["", "CN=bob,O=example", "spiffe://x/y"]) | st.text(max_size=20))
        peer.certificate = certificate
    if draw(st.booleans()):
        attrs.tls_session.sni = draw(st.text(max_size=30))
    for namespace, fields in (draw(metadata()) or {}).items():
        for key, item in fields.items():
            attrs.metadata_context.filter_metadata[namespace].fields[key].CopyFrom(_value(item))
    attrs.context_extensions.update(draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)))
    if draw(st.integers(0, 9)) == 0:  # attributes, but no request
        return request, False

    http = attrs.request.http
    http.id = draw(st.sampled_from(["", "1234"]) | st.text(max_size=20))
    http.method = draw(METHODS)
    http.path = draw(PATHS)
    http.scheme = draw(st.sampled_from(["", "http", "https"]))
    http.protocol = draw(st.sampled_from(["", "HTTP/1.1", "HTTP/2"]))
    http.query = draw(st.sampled_from(["", "a=1"]))
    http.fragment = draw(st.sampled_from(["", "top"]))
    http.size = draw(st.integers(-1, 2**40))
    http.body = draw(st.sampled_from(["", "{}"]))
    http.raw_body = draw(st.binary(max_size=20))

    allowed_host = draw(st.booleans())
    host = draw(st.sampled_from(ALLOWED_SPELLINGS) if allowed_host else OTHER_HOSTS)
    # The authority travels in http.host, or only in the :authority header (http.host empty).
    if host == "":  # no host field: the header decides, and it holds another host or nothing
        authority = draw(st.none() | OTHER_HOSTS)
    elif draw(st.booleans()):  # the field wins over whatever the header says
        http.host = host
        authority = draw(st.none() | st.sampled_from(ALLOWED_SPELLINGS) | OTHER_HOSTS)
    else:
        authority = host

    headers = dict(draw(st.sampled_from([{}, THOUSAND_HEADERS]) if draw(st.integers(0, 9)) == 0
                        else st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=8)))
    if authority is not None:
        headers[":authority"] = authority
    if draw(st.booleans()):
        # encode_raw_headers: header_map instead of the plain map, raw values need not be UTF-8.
        spelling = draw(st.sampled_from(["value", "raw_value", "mixed"]))
        entries = [base_pb2.HeaderValue(key=k, value=v) if spelling == "value" or (spelling == "mixed" and i % 2)
                   else base_pb2.HeaderValue(key=k, raw_value=v.encode()) for i, (k, v) in enumerate(headers.items())]
        extra = draw(st.lists(st.tuples(HEADER_NAMES, RAW_VALUES), max_size=6))
        entries += [base_pb2.HeaderValue(key=k, raw_value=v) for k, v in extra]
        http.header_map.headers.extend(entries)
        if not entries:  # an empty header_map: Envoy would then fill the plain map
            http.headers.update(draw(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3)))
    else:
        http.headers.update(headers)
    return request, allowed_host


IDENTITIES = st.builds(
    IdentityConfig,
    username_header=st.sampled_from(["x-safous-username", "X-User", ""]),
    jwt_username_claim=st.sampled_from(["sub", "a.b", "groups.0", "", "https://x/y"]),
    jwt_groups_claim=st.sampled_from(["groups", "sub.sub", ""]),
)

FUZZ = settings(database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


@settings(FUZZ, max_examples=400)
@given(case=check_requests(), identity=IDENTITIES,
       namespace=st.sampled_from([JWT_NAMESPACE, "other"]), key=st.sampled_from(["jwt_payload", "payload"]))
def test_the_map_stage_never_raises(case: tuple[pb.CheckRequest, bool], identity: IdentityConfig,
                                    namespace: str, key: str) -> None:
    request, _ = case
    # A message that went over the wire: what the server's deserializer hands to Check.
    request = pb.CheckRequest.FromString(request.SerializeToString())

    attrs = edge.read_request(request, jwt_namespace=namespace, jwt_payload_key=key)
    params = map_parameters(attrs, identity)

    assert set(params.values) == set(PARAMETERS)
    assert all(isinstance(value, str) for value in params.values.values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.headers.items())
    assert attrs.request_id  # always something to trace the decision by
    certificate = request.attributes.source.certificate
    if certificate == CERTIFICATE:
        assert params.values["cert_name"] == "bob"
        assert params.values["cert_alt_name"] == "bob.example"
    elif len(certificate) > 64 * KIB:
        assert params.values["cert_thumbprint"] == ""  # enormous: ignored, not parsed


def test_a_non_finite_number_in_jwt_metadata_does_not_break_the_request() -> None:
    """Found by the fuzzer: a NaN or infinite number anywhere in the JWT namespace (Struct
    numbers are doubles) made read_request raise, so the request became an internal_error deny
    even though its ``sub`` claim was fine."""
    request = check_request("/")
    namespace = request.attributes.metadata_context.filter_metadata[JWT_NAMESPACE]
    namespace.fields["jwt_payload"].CopyFrom(_value({"sub": "alice", "big": math.inf, "groups": ["a", math.nan]}))
    namespace.fields["sibling"].CopyFrom(_value(-math.inf))

    attrs = edge.read_request(request)
    params = map_parameters(attrs, IdentityConfig())

    assert params.values["username"] == "alice"
    assert attrs.jwt_payload["big"] == math.inf


# --- the whole Check path, through a real sidecar ------------------------------------------


def assert_well_formed(response: pb.CheckResponse) -> None:
    """What Envoy needs to act on the answer: an explicit status, and a deny it can render."""
    assert response.HasField("status"), "an unset status means allow to Envoy"
    assert response.status.code in (OK, PERMISSION_DENIED)
    if response.status.code == OK:
        assert response.HasField("ok_response") and not response.HasField("denied_response")
    else:
        assert response.HasField("denied_response") and not response.HasField("ok_response")
        assert response.denied_response.status.code == 403
        reason = denial_reason(response)
        assert reason and reason.isascii() and reason.isprintable()
        body = json.loads(response.denied_response.body)
        assert body["error"] == "access_denied" and body["code"] and body["reason"] == reason


class OneSidecar:
    """One sidecar per test function, started by the first hypothesis example (fixtures are
    function-scoped, so they are shared by all examples of one test)."""

    def __init__(self, db: Path, start_sidecar: Any, authz: Any) -> None:
        self._db, self._start, self._authz = db, start_sidecar, authz
        self.sidecar: Any = None
        self.stub: pb_grpc.AuthorizationStub | None = None
        self._raw: Any = None
        self.channel: grpc.aio.Channel | None = None

    async def get(self) -> Any:
        if self.sidecar is None:
            seed(self._db, [], [ONLY_POLICY])
            self.sidecar = await self._start(default_action="deny")
            self.stub = self._authz(self.sidecar.port)
        return self.sidecar

    async def raw_check(self, data: bytes) -> bytes:
        """Check with bytes as the request message, bypassing protobuf on the client."""
        if self._raw is None:
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.sidecar.port}")
            self._raw = self.channel.unary_unary(
                CHECK_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return await self._raw(data, timeout=10)

    async def assert_still_serving(self) -> None:
        """A normal check after the fuzzing: the process still decides correctly."""
        stub = self.stub
        assert stub is not None
        allowed = await stub.Check(check_request("/after", host=ALLOWED_HOST), timeout=5)
        assert allowed.status.code == OK
        denied = await stub.Check(check_request("/after", host="other.example.com"), timeout=5)
        assert denied.status.code == PERMISSION_DENIED


@pytest.fixture
async def one_sidecar(db: Path, start_sidecar: Any, authz: Any) -> AsyncIterator[OneSidecar]:
    one = OneSidecar(db, start_sidecar, authz)
    yield one
    if one.channel is not None:
        await one.channel.close()


@pytest.fixture
def fuzz_state() -> dict[str, int]:
    return {"examples": 0}


@settings(FUZZ, max_examples=250, suppress_health_check=list(HealthCheck))
@given(case=check_requests())
async def test_check_answers_every_parseable_request_and_only_allows_the_policy_host(
        one_sidecar: OneSidecar, fuzz_state: dict[str, int], case: tuple[pb.CheckRequest, bool]) -> None:
    request, may_allow = case
    await one_sidecar.get()
    assert one_sidecar.stub is not None

    response = await one_sidecar.stub.Check(request, timeout=10)  # a gRPC error would raise here

    assert_well_formed(response)
    fuzz_state["examples"] += 1
    if may_allow and not canonical_path(edge.read_request(request).path):
        # The policy host, but a path a proxy or the app would serve as another: refused.
        assert json.loads(response.denied_response.body)["code"] == "path_not_canonical"
    elif may_allow:
        assert response.status.code == OK, json.loads(response.denied_response.body or "{}")
    else:
        assert response.status.code == PERMISSION_DENIED, "allowed a host no policy allows"
    event("allowed" if response.status.code == OK else "denied")
    if fuzz_state["examples"] % 50 == 0:
        await one_sidecar.assert_still_serving()


async def test_requests_shaped_as_named_edge_cases(db: Path, start_sidecar, authz) -> None:
    """Named edge cases (empty and huge values, raw bytes, certificates, odd addresses, JWT
    metadata of every JSON type), each once, whatever hypothesis happens to draw."""
    seed(db, [], [ONLY_POLICY])
    stub = authz((await start_sidecar()).port)

    def with_header_map(request: pb.CheckRequest, entries: list[tuple[str, bytes]]) -> pb.CheckRequest:
        http = request.attributes.request.http
        http.ClearField("headers")
        http.header_map.headers.extend(base_pb2.HeaderValue(key=k, raw_value=v) for k, v in entries)
        return request

    def jwt(request: pb.CheckRequest, payload: Any) -> pb.CheckRequest:
        request.attributes.metadata_context.filter_metadata[JWT_NAMESPACE].fields["jwt_payload"].CopyFrom(
            _value(payload))
        return request

    def no_source(request: pb.CheckRequest) -> pb.CheckRequest:
        request.attributes.ClearField("source")
        return request

    def address(request: pb.CheckRequest, value: address_pb2.Address) -> pb.CheckRequest:
        request.attributes.source.address.CopyFrom(value)
        request.attributes.destination.address.CopyFrom(value)
        return request

    allowed = {
        "empty-header-value": check_request(headers={"x-safous-username": ""}),
        "64-KiB-values": check_request(headers={"x-a": BIG_VALUE, "user-agent": BIG_VALUE}),
        "1000-headers": check_request(headers=THOUSAND_HEADERS),
        "non-utf8-raw-values": with_header_map(check_request(), [
            (":authority", ALLOWED_HOST.encode()), ("x-safous-username", b"\xff\xfe bob"),
            ("x-bin", b"\x00\x80\xc3")]),
        "valid-certificate": check_request(certificate=CERTIFICATE),
        "truncated-certificate": check_request(certificate=CERTIFICATE[: len(CERTIFICATE) // 2]),
        "1-MiB-certificate": check_request(certificate="%41" * (350 * KIB)),
        "ipv6": check_request(source_ip="2001:db8::1"),
        "pipe": address(check_request(), address_pb2.Address(pipe=address_pb2.Pipe(path="/run/envoy.sock"))),
        "internal": address(check_request(), address_pb2.Address(
            envoy_internal_address=address_pb2.EnvoyInternalAddress(server_listener_name="l"))),
        "no-source": no_source(check_request()),
        "jwt-list": jwt(check_request(), ["a", "b"]),
        "jwt-number": jwt(check_request(), 42),
        "jwt-sub-struct": jwt(check_request(), {"sub": {"id": [1, {"x": None}]}, "groups": 7}),
        "jwt-inf": jwt(check_request(), {"sub": "bob", "n": math.inf}),
    }
    denied = {
        "empty-host": check_request(host=""),
        "ipv6-host-bad-port": check_request(host="[::1]:x"),
        "10-KiB-host": check_request(host="h" * (10 * KIB)),
        "no-attributes": pb.CheckRequest(),
    }
    for name, request in allowed.items():
        response = await stub.Check(request, timeout=10)
        assert_well_formed(response)
        assert response.status.code == OK, (name, response.denied_response.body)
    for name, request in denied.items():
        response = await stub.Check(request, timeout=10)
        assert_well_formed(response)
        assert response.status.code == PERMISSION_DENIED, name
        assert json.loads(response.denied_response.body)["code"] == "no_matching_policy", name
    response = await stub.Check(check_request("no-slash"), timeout=10)
    assert json.loads(response.denied_response.body)["code"] == "path_not_canonical"


async def test_a_message_past_grpcs_size_limit_is_refused_not_allowed(db: Path, start_sidecar, authz) -> None:
    """gRPC refuses messages over 4 MiB before our code runs (Envoy answers 403 for the error):
    the sidecar still answers everything else."""
    seed(db, [], [Policy(name="open", integration=False)])  # would allow anything it could read
    stub = authz((await start_sidecar()).port)
    near = check_request(headers={f"x-{i}": BIG_VALUE for i in range(60)})  # 3.75 MiB
    assert (await stub.Check(near, timeout=10)).status.code == OK
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(check_request(headers={f"x-{i}": BIG_VALUE for i in range(80)}), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stub.Check(check_request(), timeout=5)).status.code == OK


# --- random bytes at the port ----------------------------------------------------------------

VALID_BYTES = check_request("/x", host=ALLOWED_HOST).SerializeToString()
WIRE = (
    st.binary(max_size=2048)
    | st.builds(lambda cut: VALID_BYTES[:cut], st.integers(0, len(VALID_BYTES)))
    | st.builds(lambda tail: VALID_BYTES + tail, st.binary(min_size=1, max_size=64))
    | st.builds(lambda at, byte: VALID_BYTES[:at] + bytes([byte]) + VALID_BYTES[at + 1:],
                st.integers(0, len(VALID_BYTES) - 1), st.integers(0, 255))
)


@settings(FUZZ, max_examples=300, suppress_health_check=list(HealthCheck))
@given(data=WIRE)
async def test_random_bytes_at_the_grpc_port(one_sidecar: OneSidecar, fuzz_state: dict[str, int],
                                             data: bytes) -> None:
    await one_sidecar.get()
    try:
        parsed: pb.CheckRequest | None = pb.CheckRequest.FromString(data)
    except DecodeError:
        parsed = None
    try:
        raw = await one_sidecar.raw_check(data)
    except grpc.aio.AioRpcError as exc:
        # Only a message protobuf cannot parse may fail: gRPC's own error, no CheckResponse
        # (Envoy denies on it).
        assert parsed is None, f"parseable message answered with gRPC {exc.code()}"
        assert exc.code() is grpc.StatusCode.UNKNOWN, exc
        assert "Error parsing message" in (exc.details() or ""), exc
        event(f"unparseable: gRPC {exc.code().name}")
    else:
        assert parsed is not None
        response = pb.CheckResponse.FromString(raw)
        assert_well_formed(response)
        if response.status.code == OK:
            host = edge.read_request(parsed).host
            assert ALLOWED_HOST in host.lower(), host
        event(f"parseable: status {response.status.code}")
    fuzz_state["examples"] += 1
    if fuzz_state["examples"] % 20 == 0:
        await one_sidecar.assert_still_serving()


async def test_garbage_that_is_not_http2_does_not_hurt_the_server(db: Path, start_sidecar, authz) -> None:
    seed(db, [], [ONLY_POLICY])
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    junk = [b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01" + b"\x00" * 300,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 1000, bytes(range(256)) * 64]
    for payload in junk:
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(payload)
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(4096), 2)
        except (TimeoutError, ConnectionError):
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    assert (await stub.Check(check_request(host=ALLOWED_HOST), timeout=5)).status.code == OK
    assert (await stub.Check(check_request(host="other.example.com"), timeout=5)).status.code == PERMISSION_DENIED

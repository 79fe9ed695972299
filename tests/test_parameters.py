"""The map stage: request attributes → Safous parameters, and parameter-name validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.attributes import Peer, RequestAttributes
from sidecar.parameters import (
    HEADER_PREFIX,
    PARAMETERS,
    STORED_PREFIX,
    IdentityConfig,
    Parameters,
    UnknownParameter,
    check_parameter_name,
    map_parameters,
)
from sidecar.settings import Settings
from tests.certs import make_ca, make_client_cert

DEFAULT = IdentityConfig()


def attrs(headers: dict[str, str] | None = None, jwt: dict[str, Any] | None = None,
          **kwargs: Any) -> RequestAttributes:
    return RequestAttributes("req-1", headers=headers or {}, jwt_payload=jwt or {}, **kwargs)


def test_parameters_are_the_product_table() -> None:
    assert list(PARAMETERS) == [
        "username", "internal_addr", "user_agent", "remote_ip",
        "cert_thumbprint", "cert_thumbprint_upper", "cert_thumbprint_256",
        "cert_thumbprint_256_upper", "cert_name", "cert_alt_name", "device_id",
        "groups", "group_names",
    ]
    for name, description in PARAMETERS.items():
        assert description and "\n" not in description, name
    assert (HEADER_PREFIX, STORED_PREFIX) == ("headers.", "stored.")


def test_a_bare_request_has_every_parameter_empty() -> None:
    params = map_parameters(attrs(), DEFAULT)
    assert dict(params.values) == dict.fromkeys(PARAMETERS, "")


@dataclass(frozen=True)
class MapCase:
    id: str
    request: RequestAttributes
    expected: dict[str, str]
    identity: IdentityConfig = field(default=DEFAULT)


IDENTITY_HEADERS = {
    "x-safous-username": "header-user",
    "x-safous-groups": "g1,g2",
    "x-safous-group-names": "Admins,Ops",
    "x-safous-device-id": "dev-123",
    "user-agent": "curl/8.5.0",
}

MAP_CASES = [
    MapCase("identity-from-headers", attrs(IDENTITY_HEADERS), {
        "username": "header-user", "groups": "g1,g2", "group_names": "Admins,Ops",
        "device_id": "dev-123", "user_agent": "curl/8.5.0",
    }),
    MapCase("jwt-claims-win-over-headers", attrs(IDENTITY_HEADERS, {
        "sub": "jwt-user", "groups": ["a", "b"], "group_names": ["Alpha", "Beta"],
    }), {
        "username": "jwt-user", "groups": "a,b", "group_names": "Alpha,Beta",
        "device_id": "dev-123",  # no claim for the device: always the header
    }),
    MapCase("missing-claims-fall-back-to-headers", attrs(IDENTITY_HEADERS, {"iss": "idp"}), {
        "username": "header-user", "groups": "g1,g2", "group_names": "Admins,Ops",
    }),
    MapCase("null-claim-falls-back-to-header", attrs(IDENTITY_HEADERS, {"sub": None}), {
        "username": "header-user",
    }),
    MapCase("empty-claims-are-values", attrs(IDENTITY_HEADERS, {"sub": "", "groups": []}), {
        "username": "", "groups": "",
    }),
    MapCase("scalar-claims-in-json-spelling", attrs(jwt={
        "sub": 42, "groups": [1, 2.0, 2.5, True, False, None, "x"], "group_names": 1e100,
    }), {"username": "42", "groups": "1,2,2.5,true,false,x", "group_names": "1e+100"}),
    MapCase("whole-doubles-from-a-struct-lose-their-dot-zero", attrs(jwt={"sub": 1700000000.0}), {
        "username": "1700000000",
    }),
    MapCase("object-claim-is-compact-json", attrs(jwt={"sub": {"id": 7, "name": "Zoë"}}), {
        "username": '{"id":7,"name":"Zoë"}',
    }),
    MapCase(
        "nested-claims",
        attrs(jwt={"preferred_username": "kc-user", "realm_access": {"roles": ["admin", "dev"]},
                   "org": {"teams": [{"name": "red"}, {"name": "blue"}]}}),
        {"username": "kc-user", "groups": "admin,dev", "group_names": "blue"},
        IdentityConfig(jwt_username_claim="preferred_username", jwt_groups_claim="realm_access.roles",
                       jwt_group_names_claim="org.teams.1.name"),
    ),
    MapCase(
        "nested-path-missing-falls-back",
        attrs({"x-safous-groups": "hdr"}, {"realm_access": {"other": 1}, "list": [1]}),
        {"groups": "hdr", "username": ""},
        IdentityConfig(jwt_groups_claim="realm_access.roles", jwt_username_claim="list.5"),
    ),
    MapCase(
        "dotted-claim-name-matched-literally-first",
        attrs(jwt={"https://example.com/groups": ["x", "y"], "https://example": {"com/groups": "no"}}),
        {"groups": "x,y"},
        IdentityConfig(jwt_groups_claim="https://example.com/groups"),
    ),
    MapCase(
        "custom-header-names-any-case",
        attrs({"x-user": "u1", "x-dev": "d1", "x-grp": "g"}),
        {"username": "u1", "device_id": "d1", "groups": "g"},
        IdentityConfig(username_header="X-User", device_id_header="X-DEV", groups_header="X-Grp"),
    ),
    MapCase(
        "empty-names-turn-a-source-off",
        attrs(IDENTITY_HEADERS, {"sub": "jwt-user"}),
        {"username": "header-user", "device_id": ""},
        IdentityConfig(jwt_username_claim="", device_id_header=""),
    ),
    MapCase(
        "ipv4-addresses",
        attrs(source=Peer(ip="203.0.113.9", port=50123, address="203.0.113.9:50123"),
              destination=Peer(ip="10.0.0.5", port=8080, address="10.0.0.5:8080")),
        {"remote_ip": "203.0.113.9", "internal_addr": "10.0.0.5:8080"},
    ),
    MapCase(
        "ipv6-addresses",
        attrs(source=Peer(ip="2001:db8::9", port=50123, address="[2001:db8::9]:50123"),
              destination=Peer(ip="::1", port=9443, address="[::1]:9443")),
        {"remote_ip": "2001:db8::9", "internal_addr": "[::1]:9443"},
    ),
    MapCase(
        "pipe-addresses",
        attrs(source=Peer(address="/run/envoy/client.sock"),
              destination=Peer(address="/run/app.sock")),
        {"remote_ip": "", "internal_addr": "/run/app.sock"},
    ),
    MapCase(
        "non-lower-case-header-names-still-match",
        attrs({"User-Agent": "Mozilla/5.0", "X-Safous-Username": "bob"}),
        {"user_agent": "Mozilla/5.0", "username": "bob"},
    ),
]


@pytest.mark.parametrize("case", MAP_CASES, ids=[c.id for c in MAP_CASES])
def test_map_parameters(case: MapCase) -> None:
    params = map_parameters(case.request, case.identity)

    assert set(params.values) == set(PARAMETERS)
    assert {name: params.values[name] for name in case.expected} == case.expected
    for name in case.expected:
        assert params.lookup(name) == case.expected[name]


def test_identity_header_names_are_stored_lower_case() -> None:
    identity = IdentityConfig(username_header=" X-User ", groups_header="X-Groups")
    assert (identity.username_header, identity.groups_header) == ("x-user", "x-groups")


HEADERS = {"accept-language": "fr-CH, fr;q=0.9", "x-forwarded-for": "198.51.100.1", "x-empty": ""}


@pytest.mark.parametrize(("name", "expected"), [
    ("headers.accept-language", "fr-CH, fr;q=0.9"),
    ("headers.Accept-Language", "fr-CH, fr;q=0.9"),
    ("headers.X-FORWARDED-FOR", "198.51.100.1"),
    ("headers.x-empty", ""),
    ("headers.x-absent", ""),
    ("headers.", ""),
    ("remote_ip", "192.0.2.1"),
])
def test_lookup(name: str, expected: str) -> None:
    params = map_parameters(attrs(HEADERS, source=Peer(ip="192.0.2.1")), DEFAULT)
    assert params.lookup(name) == expected


@pytest.mark.parametrize("name", ["stored.token", "zzzz", "Username", "headers", "user_name", ""])
def test_lookup_refuses_what_it_does_not_own(name: str) -> None:
    params = map_parameters(attrs(HEADERS), DEFAULT)
    with pytest.raises(KeyError):
        params.lookup(name)


@pytest.mark.parametrize("name", [
    *PARAMETERS,
    "headers.Accept-Language",
    "headers.x-forwarded-for",
    "headers.user_agent",
    "headers.x.custom",
    "headers.~!#$%&'*+^_`|",
    "stored.x",
    "stored.session-token_2",
    "stored." + "a" * 64,
])
def test_known_parameter_names(name: str) -> None:
    check_parameter_name(name)


@pytest.mark.parametrize(("name", "suggestion", "message"), [
    ("user_name", "username", "unknown parameter %user_name% — did you mean %username%?"),
    ("cert_thumprint", "cert_thumbprint",
     "unknown parameter %cert_thumprint% — did you mean %cert_thumbprint%?"),
    ("Username", "username", None),
    ("remoteip", "remote_ip", None),
    ("cert_thumbprint256", "cert_thumbprint_256", None),
    ("groupnames", "group_names", None),
    ("header.Accept-Language", "headers.Accept-Language", None),
    ("Headers.Accept", "headers.Accept", None),
    ("store.token", "stored.token", None),
    ("zzzz", None, "unknown parameter %zzzz%"),
    ("", None, "unknown parameter %%"),
    ("headers.bad name", None,
     "unknown parameter %headers.bad name% — 'bad name' is not a valid HTTP header name"),
    ("headers.", None, "unknown parameter %headers.% — the header name is missing"),
    ("headers.:authority", None, None),
    ("headers.x\r\nevil", None, None),
    ("stored.", None, None),
    ("stored._x", None, None),
    ("stored.a.b", None, None),
    ("stored." + "a" * 65, None, None),
])
def test_unknown_parameter_names(name: str, suggestion: str | None, message: str | None) -> None:
    with pytest.raises(UnknownParameter) as caught:
        check_parameter_name(name)

    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.name, error.suggestion) == (name, suggestion)
    if message is not None:
        assert str(error) == message
    if suggestion is None:
        assert "did you mean" not in str(error)
    else:
        check_parameter_name(suggestion)  # what we suggest is itself accepted


# --- properties: odd input never breaks the map stage -------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_header_name = st.text(max_size=20) | st.sampled_from(sorted(IDENTITY_HEADERS))
_claim_path = st.text(max_size=20) | st.sampled_from(["sub", "groups", "a.b", "a.0", "groups.1", ""])


@settings(database=None, max_examples=300)
@given(
    headers=st.dictionaries(_header_name, st.text(max_size=40), max_size=8),
    jwt=st.dictionaries(st.text(max_size=10) | st.sampled_from(["sub", "groups", "a"]), _json, max_size=5),
    certificate=st.text(max_size=200) | st.just("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"),
    source=st.builds(Peer, ip=st.text(max_size=40), port=st.integers(0, 65535), address=st.text(max_size=40)),
    destination=st.builds(Peer, ip=st.text(max_size=40), address=st.text(max_size=40)),
    identity=st.builds(IdentityConfig, username_header=_header_name, device_id_header=_header_name,
                       groups_header=_header_name, jwt_username_claim=_claim_path,
                       jwt_groups_claim=_claim_path, jwt_group_names_claim=_claim_path),
    header_lookup=st.text(max_size=20),
)
def test_map_parameters_never_raises(headers: dict[str, str], jwt: dict[str, Any], certificate: str,
                                     source: Peer, destination: Peer, identity: IdentityConfig,
                                     header_lookup: str) -> None:
    source = Peer(ip=source.ip, port=source.port, address=source.address, certificate=certificate)
    request = RequestAttributes("req", headers=headers, jwt_payload=jwt, source=source,
                                destination=destination)

    params = map_parameters(request, identity)

    assert isinstance(params, Parameters)
    assert set(params.values) == set(PARAMETERS)
    assert all(isinstance(value, str) for value in params.values.values())
    assert isinstance(params.lookup(HEADER_PREFIX + header_lookup), str)
    if len({key.lower() for key in headers}) == len(headers):
        for key, value in headers.items():
            assert params.lookup(HEADER_PREFIX + key) == value


@settings(database=None, max_examples=300)
@given(st.text(max_size=40))
def test_check_parameter_name_only_raises_unknown_parameter(name: str) -> None:
    try:
        check_parameter_name(name)
    except UnknownParameter as error:
        assert error.name == name
        if error.suggestion is not None:
            check_parameter_name(error.suggestion)


def test_connection_username_none_leaves_username_empty(tmp_path: Path) -> None:
    """A TCP connection's %username% is its certificate's CN by default; with
    ``--connection-username none`` it is empty, and the other certificate parameters stay."""
    pem = make_client_cert(tmp_path, make_ca(tmp_path), "alice").pem
    connection = attrs(connection=True, source=Peer(ip="10.0.0.1", certificate=quote(pem, safe="")))
    by_cn = map_parameters(connection, Settings().identity).values
    by_none = map_parameters(connection, Settings(connection_username="none").identity).values
    assert (by_cn["username"], by_none["username"]) == ("alice", "")
    assert by_none["cert_name"] == by_cn["cert_name"] == "alice"
    # An HTTP request never takes its username from the certificate.
    assert map_parameters(connection._replace(connection=False), Settings().identity).values["username"] == ""

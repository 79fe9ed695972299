"""The HTTP edge as a pure stage: what each profile believes of an authorization request, and
the answers it builds (tables, no server)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import quote

import pytest

from sidecar.certificates import certificate_info
from sidecar.decision import Code, Decision
from sidecar.http_edge import HttpEdgeConfig, build_response, client_certificate, forwarded_for, read_request
from sidecar.parameters import IdentityConfig, map_parameters
from tests.certs import make_ca, make_client_cert

ENVOY = HttpEdgeConfig("envoy")
FORWARD = HttpEdgeConfig("forward-auth")


@pytest.mark.parametrize(("value", "hops", "expected"), [
    ("203.0.113.7", 1, "203.0.113.7"),
    ("6.6.6.6, 203.0.113.7", 1, "203.0.113.7"),  # what the client wrote, left of the proxy's entry
    ("6.6.6.6,203.0.113.7", 2, "6.6.6.6"),  # two trusted proxies: the first one's entry
    ("203.0.113.7", 2, ""),  # fewer entries than trusted hops: no address rather than a guess
    ("6.6.6.6, not-an-ip", 1, ""),
    ("6.6.6.6, 2001:db8::1", 1, "2001:db8::1"),
    ("[2001:db8::1]:4711", 1, "2001:db8::1"),
    ("198.51.100.1:4711", 1, "198.51.100.1"),
    ("", 1, ""),
    (" , ", 1, ""),
])
def test_the_client_address_is_the_one_the_trusted_proxy_appended(value: str, hops: int, expected: str) -> None:
    assert forwarded_for(value, hops) == expected


def test_a_client_certificate_header_in_every_encoding_the_proxies_use(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    bob = make_client_cert(tmp_path, ca, "bob", dns_names=["bob.example"])
    der64 = base64.b64encode(bob.der).decode()
    for value in (quote(bob.pem, safe=""),  # nginx $ssl_client_escaped_cert, Envoy %DOWNSTREAM_PEER_CERT%
                  bob.pem.replace("\n", " "),  # PEM on one header line
                  der64,  # Caddy certificate_der_base64, Traefik X-Forwarded-Tls-Client-Cert
                  quote(der64, safe="")):
        info = certificate_info(client_certificate(value))
        assert (info.thumbprint, info.common_name, info.alt_names) == (bob.sha1, "bob", ("bob.example",)), value[:40]
    for garbage in ("", "not a certificate", "%%%", base64.b64encode(b"not DER").decode(), "A" * 70_000):
        assert certificate_info(client_certificate(garbage)).thumbprint == ""


def headers(**values: str) -> list[tuple[str, str]]:
    return [(name.replace("_", "-"), value) for name, value in values.items()]


def test_forward_auth_reads_the_x_forwarded_headers() -> None:
    attrs = read_request("GET", "/auth", headers(
        Host="sidecar:9193", X_Forwarded_Method="POST", X_Forwarded_Uri="/api/v1?x=1#frag",
        X_Forwarded_Host="app.example.com", X_Forwarded_Proto="https", X_Forwarded_For="6.6.6.6, 203.0.113.7",
        X_Request_Id="req-1", X_Safous_Username="alice", User_Agent="curl/8"), FORWARD)
    assert (attrs.method, attrs.host, attrs.path, attrs.query, attrs.scheme) == (
        "POST", "app.example.com", "/api/v1", "x=1#frag", "https")
    assert (attrs.request_id, attrs.source.ip, attrs.source.certificate) == ("req-1", "203.0.113.7", "")
    params = map_parameters(attrs, IdentityConfig())
    assert (params.values["username"], params.values["remote_ip"], params.values["user_agent"]) == (
        "alice", "203.0.113.7", "curl/8")


def test_forward_auth_without_x_forwarded_headers_reads_the_request_itself() -> None:
    attrs = read_request("DELETE", "/x/y?z", headers(Host="app.example.com"), FORWARD)
    assert (attrs.method, attrs.host, attrs.path, attrs.query, attrs.source.ip) == (
        "DELETE", "app.example.com", "/x/y", "z", "")


def test_forward_auth_reads_the_certificate_only_from_the_header_it_was_told(tmp_path: Path) -> None:
    bob = make_client_cert(tmp_path, make_ca(tmp_path), "bob")
    sent = headers(X_Client_Cert=quote(bob.pem, safe=""), X_Forwarded_Tls_Client_Cert="forged")
    assert read_request("GET", "/", sent, FORWARD).source.certificate == ""
    attrs = read_request("GET", "/", sent, HttpEdgeConfig("forward-auth", client_cert_header="X-Client-Cert"))
    assert certificate_info(attrs.source.certificate).thumbprint == bob.sha1
    assert "x-client-cert" not in attrs.headers  # a fact of the connection, not a request header


def test_envoy_reads_the_request_line_and_what_its_config_added() -> None:
    attrs = read_request("PUT", "/check/api?q=1", headers(
        Host="app.example.com:8080", X_Request_Id="abc", X_Forwarded_For="6.6.6.6,192.0.2.2",
        X_Safous_Authz_Source="127.0.0.1:40336", X_Safous_Authz_Destination="127.0.0.1:8080",
        X_Safous_Authz_Sni="app.example.com"), HttpEdgeConfig("envoy", path_prefix="/check"))
    assert (attrs.method, attrs.host, attrs.path, attrs.query, attrs.request_id) == (
        "PUT", "app.example.com:8080", "/api", "q=1", "abc")
    assert (attrs.source.ip, attrs.source.port, attrs.destination.address, attrs.sni) == (
        "127.0.0.1", 40336, "127.0.0.1:8080", "app.example.com")
    # Envoy's own facts are not request headers (no %headers.x-safous-authz-source%).
    assert not [name for name in attrs.headers if name.startswith("x-safous-authz-")]
    params = map_parameters(attrs, IdentityConfig())
    assert (params.values["remote_ip"], params.values["internal_addr"]) == ("127.0.0.1", "127.0.0.1:8080")


def test_envoy_never_reads_the_forwarded_headers_a_client_can_write() -> None:
    attrs = read_request("GET", "/", headers(Host="app.example.com", X_Forwarded_For="6.6.6.6",
                                             X_Forwarded_Host="admin.example.com", X_Forwarded_Uri="/admin"), ENVOY)
    assert (attrs.host, attrs.path, attrs.source.ip) == ("app.example.com", "/", "")


@pytest.mark.parametrize("request_id", ["", "x" * 129, "two\nlines", "caf\u00e9"])
def test_an_odd_request_id_is_replaced(request_id: str) -> None:
    attrs = read_request("GET", "/", headers(X_Request_Id=request_id), FORWARD)
    assert attrs.request_id != request_id and len(attrs.request_id) == 32


def test_an_allow_carries_the_upstream_headers_and_a_deny_the_reason() -> None:
    allow = Decision.allow(Code.RULES_PASSED, "ok", "app", (("x-safous-tier", "gold"),))
    response = build_response(allow, "r1")
    assert (response.status, response.headers()["x-safous-tier"], response.body) == (200, "gold", b"")
    assert "safous-code" not in response.headers()  # the metadata headers are Envoy's only
    deny = Decision.deny(Code.VALUE_MISMATCH, 'rule "posture": status is "inactive"\r\nX-Evil: 1', "app")
    response = build_response(deny, 'r"2')
    assert response.status == 403
    assert response.headers()["x-safous-denial-reason"] == 'rule "posture": status is "inactive" X-Evil: 1'
    assert json.loads(response.body) == {"error": "access_denied", "code": "value_mismatch",
                                               "reason": 'rule "posture": status is "inactive" X-Evil: 1',
                                               "request_id": 'r"2'}


def test_for_envoy_the_answer_also_says_what_to_remove_and_the_decision() -> None:
    allow = Decision.allow(Code.RULES_PASSED, "ok", "app", (("x-safous-tier", "gold"),))
    response = build_response(allow, "r1", ("x-safous-forged", "x_safous_x"), envoy=True)
    assert response.headers()["x-envoy-auth-headers-to-remove"] == "x-safous-forged,x_safous_x"
    assert {k: v for k, v in response.headers().items() if k.startswith("safous-")} == {
        "safous-decision": "allow", "safous-code": "rules_passed", "safous-policy": "app", "safous-reason": "ok",
        "safous-request-id": "r1"}
    audit = build_response(Decision.deny(Code.VALUE_MISMATCH, "no", "app").audited(), "r3", envoy=True)
    assert (audit.status, audit.headers()["safous-decision"], audit.headers()["x-safous-audit-deny"]) == (
        200, "audit_deny", "value_mismatch")


@pytest.mark.parametrize("value", ["gold\r\nx-injected: 1", "gold\nx-injected: 1", "gold\r", "go\x00ld"])
def test_a_header_value_that_would_start_another_header_is_never_written(value: str) -> None:
    allow = Decision.allow(Code.RULES_PASSED, "ok", "app", (("x-safous-tier", value),))
    with pytest.raises(ValueError, match="line break or NUL"):
        build_response(allow, "r1")

"""The peer certificate as Envoy forwards it (URL-encoded PEM) → the certificate parameters.

Certificates are made here with cryptography; thumbprints are checked against what
``openssl x509 -fingerprint`` prints, which is what an admin would paste into a webhook.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from sidecar.attributes import Peer, RequestAttributes
from sidecar.certificates import (
    DEFAULT_CACHE_SIZE,
    EMPTY_CERTIFICATE,
    MAX_CERTIFICATE_CHARS,
    CertificateInfo,
    certificate_info,
)
from sidecar.parameters import IdentityConfig, map_parameters

OPENSSL = shutil.which("openssl")

_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC_KEY = ec.generate_private_key(ec.SECP256R1())
_ISSUER_KEY = ec.generate_private_key(ec.SECP384R1())
_NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def make_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    subject: list[x509.NameAttribute],
    alt_names: list[x509.GeneralName] | None = None,
    *,
    serial: int = 1000,
) -> str:
    """A certificate for ``key``, signed by a throw-away CA, as PEM text."""
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_NOW)
        .not_valid_after(_NOW + datetime.timedelta(days=365))
    )
    if alt_names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(_ISSUER_KEY, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def openssl_fingerprint(pem: str, digest: str) -> str:
    """``openssl x509 -noout -fingerprint -<digest>``, without its label and colons."""
    assert OPENSSL is not None
    out = subprocess.run(
        [OPENSSL, "x509", "-noout", "-fingerprint", f"-{digest}"],
        input=pem, capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()
    label, _, value = out.partition("=")  # "SHA1 Fingerprint=AB:CD:..."
    assert label.lower() == f"{digest} fingerprint", out
    return value.replace(":", "")


def envoy_encode(pem: str) -> str:
    """What Envoy puts in ``source.certificate``: every reserved character escaped."""
    return quote(pem, safe="")


def lax_encode(pem: str) -> str:
    """An encoder that leaves ``/``, ``+`` and ``=`` (base64's own characters) alone."""
    return quote(pem, safe="/+=")


def cn(name: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, name)


def org(name: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)


@dataclass(frozen=True)
class Case:
    id: str
    pem: str
    common_name: str
    alt_names: tuple[str, ...]


CASES = [
    Case(
        "rsa-cn-dns",
        make_pem(_RSA_KEY, [cn("alice"), org("Example")],
                 [x509.DNSName("alice.example.com"), x509.DNSName("*.alice.example.com")]),
        "alice", ("alice.example.com", "*.alice.example.com"),
    ),
    Case(
        "ec-no-cn-all-san-kinds",
        make_pem(_EC_KEY, [org("Example"), x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ops")], [
            x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::7")),
            x509.UniformResourceIdentifier("spiffe://example.org/ns/prod/sa/web"),
            x509.RFC822Name("bob@example.com"),
            x509.DNSName("bob.example.com"),
        ]),
        "", ("10.0.0.7", "2001:db8::7", "spiffe://example.org/ns/prod/sa/web",
             "bob@example.com", "bob.example.com"),
    ),
    Case("ec-cn-no-san", make_pem(_EC_KEY, [cn("device-42")]), "device-42", ()),
    Case("rsa-no-cn-no-san", make_pem(_RSA_KEY, [org("Example")]), "", ()),
    Case("empty-subject", make_pem(_EC_KEY, [], [x509.DNSName("only.example")]), "", ("only.example",)),
    Case(
        "two-cns-first-wins-unicode",
        make_pem(_RSA_KEY, [cn("Zoë Ünïcode"), cn("second")]),
        "Zoë Ünïcode", (),
    ),
    Case(
        "non-text-sans-skipped",
        make_pem(_EC_KEY, [cn("carol")], [
            x509.DirectoryName(x509.Name([cn("dir")])),
            x509.DNSName("carol.example"),
            x509.RegisteredID(ObjectIdentifier("1.2.3.4")),
            x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x03upn"),
            x509.RFC822Name("carol@example.com"),
        ]),
        "carol", ("carol.example", "carol@example.com"),
    ),
]

ENCODINGS: list[tuple[str, Callable[[str], str]]] = [
    ("envoy", envoy_encode),
    ("lax", lax_encode),
    ("plain", lambda pem: pem),
]


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    certificate_info.cache_clear()


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
@pytest.mark.parametrize("encode", [e for _, e in ENCODINGS], ids=[n for n, _ in ENCODINGS])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_certificate_matches_openssl(case: Case, encode: Callable[[str], str]) -> None:
    sha1 = openssl_fingerprint(case.pem, "sha1")
    sha256 = openssl_fingerprint(case.pem, "sha256")

    info = certificate_info(encode(case.pem))

    assert info == CertificateInfo(
        thumbprint=sha1.lower(),
        thumbprint_256=sha256.lower(),
        common_name=case.common_name,
        alt_names=case.alt_names,
    )


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_certificate_parameters(case: Case) -> None:
    attrs = RequestAttributes("req-1", source=Peer(ip="10.0.0.1", certificate=envoy_encode(case.pem)))

    values = map_parameters(attrs, IdentityConfig()).values

    sha1 = openssl_fingerprint(case.pem, "sha1")
    sha256 = openssl_fingerprint(case.pem, "sha256")
    assert values["cert_thumbprint"] == sha1.lower()
    assert values["cert_thumbprint_upper"] == sha1.upper()
    assert values["cert_thumbprint_256"] == sha256.lower()
    assert values["cert_thumbprint_256_upper"] == sha256.upper()
    assert values["cert_name"] == case.common_name
    assert values["cert_alt_name"] == ",".join(case.alt_names)


def test_envoy_encoding_escapes_what_envoy_escapes() -> None:
    # The sample is only meaningful if it looks like what Envoy sends: with
    # include_peer_certificate, source.certificate is the PEM URL-encoded, spaces as %20 and
    # newlines as %0A.
    encoded = envoy_encode(CASES[0].pem)
    assert encoded.startswith("-----BEGIN%20CERTIFICATE-----%0A")
    assert "\n" not in encoded and " " not in encoded


def test_first_certificate_of_a_chain_is_used() -> None:
    leaf, issuer = CASES[0], CASES[2]
    chain = "subject=CN = alice\nissuer=CN = Test CA\n" + leaf.pem + issuer.pem

    assert certificate_info(envoy_encode(chain)).common_name == leaf.common_name


def _garble_header(pem: str) -> str:
    # Still valid base64, but the first characters hold the outer DER SEQUENCE tag and length:
    # the structure, not just a signature byte, is broken.
    head, _, rest = pem.partition("\n")
    return f"{head}\nAAAA{rest[4:]}"


_VALID = CASES[0].pem
_LINES = _VALID.splitlines(keepends=True)
_KEY_PEM = _EC_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode("ascii")
_PUBLIC_KEY_PEM = _EC_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
).decode("ascii")
_CSR_PEM = (
    x509.CertificateSigningRequestBuilder()
    .subject_name(x509.Name([cn("csr")]))
    .sign(_EC_KEY, hashes.SHA256())
    .public_bytes(serialization.Encoding.PEM)
    .decode("ascii")
)

BAD_INPUTS = {
    "empty": "",
    "whitespace": "%0A%20",
    "not-pem": "hello world",
    "base64-without-armor": "".join(_LINES[1:-1]),
    "truncated-body": "".join(_LINES[: len(_LINES) // 2]) + "-----END CERTIFICATE-----\n",
    "truncated-no-end": _VALID[: len(_VALID) // 2],
    "cut-in-escape": envoy_encode(_VALID)[:40] + "%0" + envoy_encode(_VALID)[43:],
    "garbled-der": _garble_header(_VALID),
    "garbled-base64": _VALID.replace("M", "*", 3),
    "empty-armor": "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
    "private-key": _KEY_PEM,
    "public-key": _PUBLIC_KEY_PEM,
    "csr": _CSR_PEM,
    "bad-utf8-escapes": "%FF%FE%C3" + envoy_encode(_VALID)[:60],
    "nul-bytes": "\x00" * 100,
    "huge": "x" * (MAX_CERTIFICATE_CHARS - len(_VALID) + 1) + _VALID,
}


@pytest.mark.parametrize("raw", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_unreadable_input_gives_empty_certificate(raw: str) -> None:
    assert certificate_info(raw) is EMPTY_CERTIFICATE
    attrs = RequestAttributes("req-1", source=Peer(certificate=raw))
    values = map_parameters(attrs, IdentityConfig()).values
    assert {k: v for k, v in values.items() if k.startswith("cert_")} == {
        "cert_thumbprint": "", "cert_thumbprint_upper": "",
        "cert_thumbprint_256": "", "cert_thumbprint_256_upper": "",
        "cert_name": "", "cert_alt_name": "",
    }


def test_size_limit_is_inclusive() -> None:
    at_limit = "x" * (MAX_CERTIFICATE_CHARS - len(_VALID)) + _VALID
    assert len(at_limit) == MAX_CERTIFICATE_CHARS
    assert certificate_info(at_limit).common_name == "alice"
    assert certificate_info(at_limit + "x") is EMPTY_CERTIFICATE


def test_certificate_is_parsed_once_for_many_requests() -> None:
    encoded = envoy_encode(_VALID)
    first = certificate_info(encoded)

    for _ in range(500):
        assert certificate_info(encoded) is first
    # A second, equal string object (as each CheckRequest brings) is the same cache entry.
    assert certificate_info("".join(list(encoded))) is first

    stats = certificate_info.cache_info()
    assert (stats.misses, stats.hits, stats.currsize) == (1, 501, 1)
    assert stats.maxsize == DEFAULT_CACHE_SIZE


def test_garbage_is_cached_too_but_oversized_and_empty_input_is_not() -> None:
    for _ in range(3):
        certificate_info("garbage")
        certificate_info(BAD_INPUTS["huge"])
        certificate_info("")

    stats = certificate_info.cache_info()
    assert (stats.misses, stats.hits, stats.currsize) == (1, 2, 1)


def test_cache_is_bounded() -> None:
    try:
        certificate_info.resize(2)
        pems = [envoy_encode(c.pem) for c in CASES[:3]]
        for pem in pems:
            certificate_info(pem)
        assert certificate_info.cache_info().currsize == 2
        certificate_info(pems[0])  # evicted: parsed again, same answer
        assert certificate_info.cache_info().misses == 4
    finally:
        certificate_info.resize(DEFAULT_CACHE_SIZE)

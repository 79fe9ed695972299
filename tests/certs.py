"""Test certificates: a CA, a server certificate for 127.0.0.1/localhost, client certificates.

Everything is written as PEM files into a directory the caller owns (a pytest ``tmp_path``).
Keys are ECDSA P-256 (fast to generate; accepted by Envoy/BoringSSL and by Python's ssl).

The file names used by :func:`make_tls_dir` (``ca.crt``, ``server.crt``, ``server.key``) are the
ones ``envoy/envoy-mtls.yaml`` expects under ``/etc/safous/tls``, so the directory can be passed
as ``tls_dir`` to :func:`tests.envoy_harness.render_config`.

    tls = make_tls_dir(tmp_path / "tls")
    bob = make_client_cert(tmp_path / "tls", tls.ca, "bob", dns_names=["bob.example"])
    ctx = client_ssl_context(tls.ca.cert_path, bob)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import re
import ssl
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA",
    "CertKey",
    "TlsDir",
    "client_ssl_context",
    "make_ca",
    "make_client_cert",
    "make_foreign_client_cert",
    "make_server_cert",
    "make_tls_dir",
    "openssl_fingerprint",
]

_VALIDITY = _dt.timedelta(days=2)
_BACKDATE = _dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertKey:
    """A certificate and its key, in memory and as PEM files."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        """The certificate PEM, exactly as written to ``cert_path``."""
        return self.cert_path.read_text()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def sha1(self) -> str:
        """SHA-1 of the DER, lower-case hex (what %cert_thumbprint% renders to)."""
        return hashlib.sha1(self.der).hexdigest()

    @property
    def sha256(self) -> str:
        """SHA-256 of the DER, lower-case hex (what %cert_thumbprint_256% renders to)."""
        return hashlib.sha256(self.der).hexdigest()


# A CA is a certificate/key pair that signs others.
CA = CertKey


@dataclass(frozen=True)
class TlsDir:
    """A directory laid out like /etc/safous/tls: ca.crt, server.crt, server.key (+ ca.key)."""

    directory: Path
    ca: CA
    server: CertKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "cert"


def _write(directory: Path | str, stem: str, cert: x509.Certificate, key) -> CertKey:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return CertKey(cert_path, key_path, cert, key)


def _name(common_name: str, organization: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _leaf(
    ca: CA,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = _dt.datetime.now(_dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def make_ca(
    directory: Path | str, *, common_name: str = "Safous Test CA", stem: str = "ca"
) -> CA:
    """Create a self-signed CA; writes ``<stem>.crt`` and ``<stem>.key`` into ``directory``."""
    key = _new_key()
    now = _dt.datetime.now(_dt.UTC)
    name = _name(common_name, "Safous tests")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, stem, cert, key)


def make_server_cert(
    directory: Path | str,
    ca: CA,
    *,
    hosts: Iterable[str] = ("127.0.0.1", "localhost"),
    common_name: str | None = None,
    stem: str = "server",
) -> CertKey:
    """Create a server certificate signed by ``ca`` for ``hosts`` (IP addresses become IP SANs,
    other names DNS SANs); writes ``<stem>.crt`` / ``<stem>.key``."""
    hosts = list(hosts)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cn = common_name or (hosts[0] if hosts else "server")
    cert, key = _leaf(ca, _name(cn, None), sans, ExtendedKeyUsageOID.SERVER_AUTH)
    return _write(directory, stem, cert, key)


def make_client_cert(
    directory: Path | str,
    ca: CA,
    common_name: str,
    *,
    dns_names: Iterable[str] = (),
    uris: Iterable[str] = (),
    emails: Iterable[str] = (),
    organization: str | None = None,
    stem: str | None = None,
) -> CertKey:
    """Create a client certificate signed by ``ca`` with subject ``CN=common_name[,O=...]`` and
    the given SANs (DNS names, URIs, e-mail addresses); writes ``<stem>.crt`` / ``<stem>.key``
    (``stem`` defaults to ``client-<common_name>``)."""
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.RFC822Name(e) for e in emails]
    cert, key = _leaf(
        ca, _name(common_name, organization), sans, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return _write(directory, stem or f"client-{_safe(common_name)}", cert, key)


def make_foreign_client_cert(
    directory: Path | str,
    common_name: str = "mallory",
    **kwargs,
) -> CertKey:
    """A client certificate from ANOTHER, untrusted CA (created on the fly as ``other-ca.*``),
    for negative tests: Envoy must reject it. Same keyword arguments as
    :func:`make_client_cert`; ``stem`` defaults to ``foreign-<common_name>``."""
    other = make_ca(directory, common_name="Untrusted Other CA", stem="other-ca")
    kwargs.setdefault("stem", f"foreign-{_safe(common_name)}")
    return make_client_cert(directory, other, common_name, **kwargs)


def make_tls_dir(directory: Path | str, *, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> TlsDir:
    """Create ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` (for ``hosts``) in
    ``directory``: the layout ``envoy/envoy-mtls.yaml`` expects under /etc/safous/tls."""
    ca = make_ca(directory)
    server = make_server_cert(directory, ca, hosts=hosts)
    return TlsDir(Path(directory), ca, server)


def client_ssl_context(
    ca_path: Path | str, client: CertKey | None = None, *, alpn: Iterable[str] | None = None
) -> ssl.SSLContext:
    """A client-side SSLContext trusting ``ca_path`` (hostname checking on), presenting
    ``client``'s certificate if given, and offering ``alpn`` protocols if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_path))
    if client is not None:
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def openssl_fingerprint(cert_path: Path, digest: str) -> str:
    """``openssl x509 -fingerprint -DIGEST`` of a PEM file, without colons (upper-case hex)."""
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", f"-{digest}", "-in", str(cert_path)],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1].replace(":", "")

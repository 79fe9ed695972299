"""The peer certificate Envoy forwards, reduced to what the certificate parameters need.

With ``include_peer_certificate: true`` Envoy puts the client certificate in
``source.certificate`` as URL-encoded PEM. Parsing X.509 costs far more than the rest of the
map stage, and a client presents the same certificate on every request, so each distinct
certificate is parsed once and kept in a bounded LRU cache keyed by the string Envoy sent.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

# A client certificate is 1-2 KiB of PEM (about three times that URL-encoded); anything past
# this is not a certificate worth parsing on the request path, nor worth a cache slot.
MAX_CERTIFICATE_CHARS = 64 * 1024
DEFAULT_CACHE_SIZE = 4096

_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----[^-]*-----END CERTIFICATE-----")


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What the certificate parameters are made of.

    ``thumbprint`` / ``thumbprint_256``: SHA-1 / SHA-256 of the DER, lower-case hex, no colons.
    ``common_name``: the first subject CN, or ``""``. ``alt_names``: the subject alternative
    names that are text (DNS names, IP addresses, URIs, e-mail addresses), in certificate order.
    """

    thumbprint: str = ""
    thumbprint_256: str = ""
    common_name: str = ""
    alt_names: tuple[str, ...] = ()


EMPTY_CERTIFICATE = CertificateInfo()
"""No certificate, or one that could not be read: every certificate parameter is empty."""

_TEXT_ALT_NAMES = (x509.DNSName, x509.IPAddress, x509.UniformResourceIdentifier, x509.RFC822Name)


def _parse(url_encoded_pem: str) -> CertificateInfo:
    # This is the boundary between client-controlled bytes and the check path: the input may be
    # anything (truncated, garbled, a key instead of a certificate, bad UTF-8 escapes), and
    # cryptography signals that with several exception types that vary across versions. A
    # certificate we cannot read must mean "no certificate" (empty parameters, so rules that
    # need one fail), never a crash of the check, hence the broad catches.
    try:
        found = _PEM_CERTIFICATE.search(unquote(url_encoded_pem))
        if found is None:
            return EMPTY_CERTIFICATE
        cert = x509.load_pem_x509_certificate(found.group().encode("ascii"))
        der = cert.public_bytes(Encoding.DER)
    except Exception:  # noqa: BLE001 - see above
        return EMPTY_CERTIFICATE
    # Envoy accepted this certificate, so its thumbprints identify it even if a subject or an
    # extension is malformed: keep them and let only the unreadable part be empty.
    return CertificateInfo(
        thumbprint=hashlib.sha1(der, usedforsecurity=False).hexdigest(),
        thumbprint_256=hashlib.sha256(der).hexdigest(),
        common_name=_common_name(cert),
        alt_names=_alt_names(cert),
    )


def _common_name(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            return ""
        value = names[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a malformed subject reads as no CN (see _parse)
        return ""


def _alt_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    except Exception:  # noqa: BLE001 - malformed extensions read as no SAN (see _parse)
        return ()
    return tuple(str(name.value) for name in san if isinstance(name, _TEXT_ALT_NAMES))


class _CachedCertificateInfo:
    """``certificate_info``: a function with an LRU cache that skips oversized inputs."""

    __slots__ = ("_cached",)

    def __init__(self, maxsize: int = DEFAULT_CACHE_SIZE) -> None:
        self._cached = functools.lru_cache(maxsize=maxsize)(_parse)

    def __call__(self, url_encoded_pem: str) -> CertificateInfo:
        """The certificate in ``url_encoded_pem`` (Envoy's ``source.certificate``).

        URL-decodes the input and reads its first PEM certificate. Empty, oversized (over
        ``MAX_CERTIFICATE_CHARS``), truncated, garbled or non-certificate input gives
        ``EMPTY_CERTIFICATE``; this never raises. Each distinct input is parsed once while it
        stays in the cache; oversized inputs are neither parsed nor cached.
        """
        if not isinstance(url_encoded_pem, str) or not url_encoded_pem:
            return EMPTY_CERTIFICATE
        if len(url_encoded_pem) > MAX_CERTIFICATE_CHARS:
            return EMPTY_CERTIFICATE
        return self._cached(url_encoded_pem)

    def cache_info(self) -> functools._CacheInfo:
        """Hits, misses and size of the certificate cache (``functools.lru_cache`` statistics)."""
        return self._cached.cache_info()

    def cache_clear(self) -> None:
        """Forget every parsed certificate and reset the statistics."""
        self._cached.cache_clear()

    def resize(self, maxsize: int) -> None:
        """Replace the cache with an empty one holding at most ``maxsize`` certificates."""
        self._cached = functools.lru_cache(maxsize=maxsize)(_parse)


certificate_info = _CachedCertificateInfo()

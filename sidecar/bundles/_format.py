"""The bundle format, keys, signing and verification.

A bundle file is one JWS (RFC 7515) in compact serialization, ``typ`` ``safous-bundle+jws``,
signed with EdDSA (Ed25519) or ES256 (P-256) through PyJWT on ``cryptography``, ``kid`` naming
the key. Its payload is JSON::

    {"format": 1,
     "revision": "<sequence>-<first 12 hex of content_sha256>",
     "sequence": 1767225600123,        # creation time in ms unless given: only a greater one applies
     "created_at": "2026-01-01T00:00:00.123Z",
     "content_sha256": "<hex SHA-256 of the canonical JSON of document>",
     "document": {<the export document of sidecar.exchange>}}

The signature covers the whole payload, so the revision and sequence cannot be changed apart
from the content: a replayed old bundle keeps its old sequence and is refused as older. A key
id defaults to the public key's RFC 7638 JWK thumbprint, so a key names itself and verification
keys are matched by ``kid`` (several at once: keys can be rotated). The algorithm is taken from
the key, never from the bundle's header (no algorithm confusion, no ``none``).

A bundle never carries a literal secret: passwords, client secrets and Authorization header
values must be ``env:NAME`` / ``file:PATH`` references (bundles end up in Git, ConfigMaps and
object stores); ``literal_secrets`` names the offenders for both the builder and the verifier.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sidecar.rules.secrets import SECRET_HEADERS, is_reference

from . import MAX_SEQUENCE

__all__ = [
    "Bundle",
    "BundleRefused",
    "RefusalReason",
    "VerificationKey",
    "build_bundle",
    "content_hash",
    "generate_key",
    "key_id_of",
    "literal_secrets",
    "load_signing_key",
    "load_verification_key",
    "parse_bundle",
]

FORMAT = 1
JWS_TYPE = "safous-bundle+jws"

RefusalReason = Literal[
    "fetch_failed",      # the source could not be read (unreachable, HTTP error, redirect, timeout)
    "too_large",         # larger than --bundle-max-bytes
    "truncated",         # the download ended before its announced length
    "malformed",         # not a bundle: not a JWS, payload not the bundle JSON, content hash wrong
    "unsigned",          # no signature (plain JSON, or alg "none") while verification is on
    "unknown_key",       # signed with a key id none of --bundle-verification-key has
    "bad_signature",     # the signature does not verify with the key of that id
    "older_revision",    # not newer than the revision applied (a replay cannot roll back a fix)
    "literal_secret",    # a rule carries a secret in clear
    "invalid_content",   # a rule or policy that the admin script would refuse
    "store_error",       # this sidecar could not apply it: rules.db not writable, a verification key
                         # unreadable (nothing said about the bundle: the next poll tries again)
]
REFUSAL_REASONS: tuple[RefusalReason, ...] = RefusalReason.__args__  # type: ignore[attr-defined]

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class BundleRefused(Exception):
    """A bundle, or its download, that is not applied; ``reason`` is the stable code."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason

    def __reduce__(self) -> tuple[type[BundleRefused], tuple[RefusalReason, str]]:
        # Raised in the apply process and re-raised here: pickled with both arguments.
        return BundleRefused, (self.reason, str(self))


@dataclass(frozen=True, slots=True)
class Bundle:
    """A parsed (and, unless ``key_id`` is None, verified) bundle."""

    revision: str
    sequence: int
    created_at: str
    content_sha256: str
    document: dict[str, Any]
    key_id: str | None


@dataclass(frozen=True, slots=True)
class VerificationKey:
    key_id: str
    key: PublicKey

    @property
    def algorithm(self) -> str:
        return _algorithm(self.key)


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_hash(document: dict[str, Any]) -> str:
    """Hex SHA-256 of the document's canonical JSON (sorted keys, no spaces, UTF-8)."""
    return hashlib.sha256(_canonical(document)).hexdigest()


def _algorithm(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError(f"an EC key on {key.curve.name} is not supported: use Ed25519 or P-256")


def key_id_of(key: PrivateKey | PublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of the key's public half."""
    public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) else key
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"crv": "Ed25519", "kty": "OKP", "x": _b64u(raw)}
    else:
        numbers = public.public_numbers()
        jwk = {"crv": "P-256", "kty": "EC", "x": _b64u(numbers.x.to_bytes(32, "big")),
               "y": _b64u(numbers.y.to_bytes(32, "big"))}
    return _b64u(hashlib.sha256(_canonical(jwk)).digest())


def generate_key(kind: str) -> tuple[bytes, bytes, str]:
    """A new key pair of ``kind`` (a key of ``ALGORITHMS``): private PEM (PKCS#8), public PEM
    (SubjectPublicKeyInfo), key id."""
    key: PrivateKey = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" \
        else ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public, key_id_of(key)


def load_signing_key(pem: bytes, where: str) -> PrivateKey:
    """A PEM private key (unencrypted PKCS#8 or traditional). Raises ValueError naming ``where``."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{where}: a {type(key).__name__} cannot sign bundles: use Ed25519 or P-256 "
                         "(safous-admin bundle keygen)")
    _algorithm(key)
    return key


def load_verification_key(spec: str) -> VerificationKey:
    """``[KID=]PATH`` of a PEM public key; without ``KID=`` the key id is its thumbprint.
    Raises ValueError."""
    key_id, sep, path = spec.partition("=")
    if not sep or "/" in key_id:
        key_id, path = "", spec
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read verification key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ValueError(f"{path}: a {type(key).__name__} cannot verify bundles: use Ed25519 or P-256")
    _algorithm(key)
    return VerificationKey(key_id or key_id_of(key), key)


def literal_secrets(document: dict[str, Any]) -> list[str]:
    """Each secret ``document`` holds in clear, as "rule 'NAME': what is wrong, how to fix it"."""
    found: list[str] = []
    for rule in document.get("rules") or []:
        if not isinstance(rule, dict):
            continue
        name = json.dumps(rule.get("name"), ensure_ascii=False)
        for field, option in (("password", "--password"), ("client_secret", "--client-secret")):
            value = rule.get(field)
            if isinstance(value, str) and value and not is_reference(value):
                found.append(f"rule {name}: {field} is a literal secret; a bundle carries only references: "
                             f"`safous-admin rule edit {rule.get('name')} {option} env:SAFOUS_SECRET_...` "
                             "(or file:PATH) and give each sidecar the secret under that name")
        for pair in rule.get("headers") or []:
            if (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                    and pair[0].lower() in SECRET_HEADERS and pair[1]):
                found.append(f"rule {name}: header {pair[0]} holds a literal secret; a bundle carries only "
                             "references: use --auth basic or --auth oauth with env:NAME / file:PATH secrets "
                             "instead of the header")
    return found


def build_bundle(document: dict[str, Any], key: PrivateKey, *, key_id: str | None = None,
                 sequence: int | None = None, now: float | None = None) -> tuple[str, Bundle]:
    """Sign ``document`` (an export document): the compact JWS and what it holds. ``sequence``
    defaults to the creation time in milliseconds. Raises ``BundleRefused("literal_secret")``, or
    ValueError for a sequence out of 0..``MAX_SEQUENCE``."""
    problems = literal_secrets(document)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BundleRefused("literal_secret", problems[0] + more)
    now = time.time() if now is None else now
    sequence = int(now * 1000) if sequence is None else sequence
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"sequence {sequence} is not within 0..{MAX_SEQUENCE}")
    digest = content_hash(document)
    created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    bundle = Bundle(f"{sequence}-{digest[:12]}", sequence, created, digest, document, key_id or key_id_of(key))
    payload = {"format": FORMAT, "revision": bundle.revision, "sequence": sequence, "created_at": created,
               "content_sha256": digest, "document": document}
    token = jwt.PyJWS().encode(_canonical(payload), key, algorithm=_algorithm(key),
                               headers={"kid": bundle.key_id, "typ": JWS_TYPE})
    return token, bundle


def _unverified_payload(token: str) -> bytes:
    parts = token.split(".")
    if len(parts) != 3:
        raise BundleRefused("malformed", "not a JWS in compact serialization (three dot-separated parts)")
    try:
        return base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
    except (binascii.Error, ValueError):
        raise BundleRefused("malformed", "the JWS payload is not base64url") from None


_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def parse_bundle(data: bytes, keys: dict[str, VerificationKey], *, verify: bool = True) -> Bundle:
    """Verify and read a bundle file. ``keys``: by key id. ``verify=False``
    (--bundle-insecure-skip-verify): the signature is not checked, everything else is. Raises
    ``BundleRefused`` (malformed, unsigned, unknown_key, bad_signature, literal_secret)."""
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise BundleRefused("malformed", "not a bundle: the file is not ASCII (a JWS is)") from None
    if token.startswith("{"):
        raise BundleRefused("unsigned" if verify else "malformed",
                            "plain JSON, not a signed bundle: build one with `safous-admin bundle build`")
    # The shape first, in C: PyJWT checks the alphabet byte by byte in Python (seconds for a
    # forged token of tens of MiB, before any signature is looked at).
    if not _COMPACT_JWS.fullmatch(token):
        raise BundleRefused("malformed", "not a JWS in compact form (three base64url parts)")
    key_id: str | None = None
    if verify:
        try:
            # The header's part alone: given the whole token, PyJWT checks every byte of the
            # payload in Python once more (a second for 10,000 rules); decode_complete does.
            header = jwt.get_unverified_header(token[:token.index(".")] + "..")
        except RecursionError:  # a header nested too deep, should PyJWT let it through
            raise BundleRefused("malformed", "not a JWS: the header is nested too deep") from None
        except jwt.exceptions.DecodeError as exc:
            raise BundleRefused("malformed", f"not a JWS: {exc}") from None
        if str(header.get("alg", "none")).lower() == "none" or token.endswith("."):
            raise BundleRefused("unsigned", "the bundle is not signed (alg none)")
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in keys:
            known = ", ".join(sorted(keys)) or "none"
            raise BundleRefused("unknown_key", f"signed with key id {kid!r}, not one of the verification keys "
                                f"({known}): add its public key with --bundle-verification-key")
        key = keys[kid]
        try:
            payload = jwt.PyJWS().decode_complete(token, key.key, algorithms=[key.algorithm])["payload"]
        except jwt.exceptions.InvalidSignatureError:
            raise BundleRefused("bad_signature", f"the signature does not verify with key {kid!r}: the bundle "
                                "was changed after signing, or signed with another key of that id") from None
        except jwt.exceptions.InvalidAlgorithmError:
            raise BundleRefused("bad_signature", f"signed with {header.get('alg')!r}, but key {kid!r} is a "
                                f"{key.algorithm} key") from None
        except jwt.exceptions.PyJWTError as exc:
            raise BundleRefused("malformed", f"not a valid JWS: {exc}") from None
        key_id = kid
    else:
        payload = _unverified_payload(token)
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise BundleRefused("malformed", "the payload is not JSON (or is nested too deep)") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise BundleRefused("malformed", f"the payload is not a format {FORMAT} bundle")
    document, sequence = body.get("document"), body.get("sequence")
    if not isinstance(document, dict) or not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise BundleRefused("malformed", "the payload lacks its document or sequence")
    if sequence > MAX_SEQUENCE:
        raise BundleRefused("malformed", f"the sequence is greater than {MAX_SEQUENCE}, the largest rules.db "
                            "can hold")
    try:
        digest = content_hash(document)
    except RecursionError:  # what json.loads just read, json.dumps may still find too deep
        raise BundleRefused("malformed", "the document is nested too deep") from None
    if body.get("content_sha256") != digest or body.get("revision") != f"{sequence}-{digest[:12]}":
        raise BundleRefused("malformed", "the content does not match its content_sha256 and revision")
    problems = literal_secrets(document)
    if problems:
        raise BundleRefused("literal_secret", problems[0])
    return Bundle(str(body["revision"]), sequence, str(body.get("created_at", "")), digest, document, key_id)

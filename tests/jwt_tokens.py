"""RS256 JSON Web Tokens made in the test: an RSA key from ``cryptography``, its JWKS, and
tokens signed by hand (``base64url(header).base64url(payload).base64url(PKCS#1 v1.5 /
SHA-256)``), so no JWT library is involved and every token is exactly what the test says it
is. The issuer and audience are those envoy/envoy-jwt.yaml accepts."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ISSUER = "https://idp.example.com"  # as in envoy-jwt.yaml
AUDIENCE = "safous-app"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_uint(value: int) -> str:
    """A JWK integer (n, e): big-endian bytes, no leading zeros, base64url without padding."""
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class SigningKey:
    kid: str
    key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, kid: str) -> SigningKey:
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def jwk(self) -> dict[str, str]:
        numbers = self.key.public_key().public_numbers()
        return {"kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig",
                "n": b64url_uint(numbers.n), "e": b64url_uint(numbers.e)}

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        header = {"alg": "RS256", "typ": "JWT", "kid": kid or self.kid}
        signing_input = (b64url(json.dumps(header).encode()) + "."
                         + b64url(json.dumps(claims).encode()))
        signature = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(signature)


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for alice (issued now, expiring in 5 minutes); ``name=None`` drops a claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "email": "alice@example.com",
        "groups": ["eng", "ops"], "group_names": ["Engineering", "Operations"],
        "iat": now, "nbf": now - 5, "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}

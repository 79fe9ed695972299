"""The fleet secret's two uses: naming entries in the shared cache, and sealing their values.

Redis is untrusted storage: whoever reads it must learn nothing, whoever writes it must not be
able to make a sidecar use a value it did not seal. From one fleet secret (at least
``MIN_SECRET_BYTES``) HKDF-SHA256 derives two independent keys:

- the **name key**: an entry's name is HMAC-SHA256(name key, what identifies the entry: the
  rule's fingerprint and its rendered webhook request), cut to ``NAME_BYTES``. Without the
  secret, a name tells nothing (no user name, no rule), and cannot be computed for a guess.
- the **sealing key**: a value is AES-256-GCM encrypted and authenticated, bound to its name
  and its expiry (both in the associated data), so it cannot be read, altered, moved to
  another entry or kept past its expiry. Each value is sealed under a key of its own,
  HMAC-SHA256(sealing key, a random 16-byte salt), with a fixed nonce: a random 96-bit nonce
  under one key would be safe for about 2^32 values only, which a busy fleet writes in weeks.

A sealed value is ``VERSION | salt (16) | expiry (8, ms since the epoch, big-endian) |
ciphertext | tag (16)``. The format's version is part of the key derivation too, so sidecars
of different formats never read each other's entries (they just miss).

Exceptions::

    ValueError
     └── Rejected   a sealed value that is malformed, forged, bound to another name, or expired
                    (``reason``: malformed, forged, expired)
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["MIN_SECRET_BYTES", "NAME_BYTES", "OVERHEAD", "FleetKeys", "Rejected"]

VERSION = b"\x01"
MIN_SECRET_BYTES = 32
"""The fleet secret's least length, in bytes (``openssl rand -base64 32`` gives 44)."""
NAME_BYTES = 16
"""An entry's name: 128 bits of HMAC, so that names of different entries never meet."""
_SALT = 16
_EXPIRY = 8
_TAG = 16
_NONCE = bytes(12)  # each value has a key of its own (module docstring)
OVERHEAD = len(VERSION) + _SALT + _EXPIRY + _TAG
"""Bytes a sealed value adds to its plaintext."""

Reason = Literal["malformed", "forged", "expired"]


class Rejected(ValueError):
    """A sealed value that must not be used, and why (``reason``)."""

    def __init__(self, reason: Reason) -> None:
        self.reason = reason
        super().__init__(f"shared cache value rejected: {reason}")


class FleetKeys:
    """The keys derived from the fleet secret. Raises ``ValueError`` for a secret shorter than
    ``MIN_SECRET_BYTES``. ``random``: where salts come from (tests give a fixed one)."""

    def __init__(self, secret: bytes, *, random: Callable[[int], bytes] = os.urandom) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the shared cache key must be at least {MIN_SECRET_BYTES} bytes "
                             f"(it is {len(secret)}): e.g. `openssl rand -base64 32`")
        derived = HKDF(algorithm=hashes.SHA256(), length=64, salt=b"safous shared cache",
                       info=b"names and values, format " + VERSION).derive(secret)
        self._name_key, self._seal_key = derived[:32], derived[32:]
        self._random = random

    def name(self, material: bytes) -> bytes:
        """The entry's name for ``material`` (``NAME_BYTES``): equal for equal material and
        secret, unrelated otherwise."""
        return hmac.digest(self._name_key, material, hashlib.sha256)[:NAME_BYTES]

    def seal(self, name: bytes, plaintext: bytes, expires_ms: int) -> bytes:
        """``plaintext`` encrypted and bound to ``name`` and ``expires_ms`` (module docstring)."""
        salt = self._random(_SALT)
        expiry = expires_ms.to_bytes(_EXPIRY, "big")
        sealed = self._aead(salt).encrypt(_NONCE, plaintext, VERSION + name + expiry)
        return VERSION + salt + expiry + sealed

    def open(self, name: bytes, sealed: bytes, now_ms: int) -> tuple[bytes, int]:
        """The plaintext of a value sealed for ``name``, and its expiry (ms since the epoch).
        Raises ``Rejected``: malformed (not this format), forged (not sealed with this secret
        for this name and expiry), expired (at or before ``now_ms``)."""
        if len(sealed) < OVERHEAD or sealed[:1] != VERSION:
            raise Rejected("malformed")
        salt, expiry = sealed[1:1 + _SALT], sealed[1 + _SALT:1 + _SALT + _EXPIRY]
        try:
            plaintext = self._aead(salt).decrypt(_NONCE, sealed[1 + _SALT + _EXPIRY:], VERSION + name + expiry)
        except InvalidTag:
            raise Rejected("forged") from None
        expires_ms = int.from_bytes(expiry, "big")
        if expires_ms <= now_ms:
            raise Rejected("expired")
        return plaintext, expires_ms

    def _aead(self, salt: bytes) -> AESGCM:
        return AESGCM(hmac.digest(self._seal_key, salt, hashlib.sha256))

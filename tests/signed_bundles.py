"""Signed rule bundles made in the test: signing keys made by ``safous-admin bundle keygen``
and bundles built by the same code the admin script uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.bundles import build_bundle, load_signing_key
from tests.admin_cli import admin

ALLOW_ALL = {"version": 1, "rules": [], "policies": [
    {"name": "app", "hosts": ["app.example.com"], "rules": []}]}
DENY_ALL: dict[str, Any] = {"version": 1, "rules": [], "policies": []}  # no policy: the default action, deny


@dataclass
class Keys:
    dir: Path

    def make(self, name: str, algorithm: str = "ed25519") -> tuple[Path, Path, str]:
        """``bundle keygen``: (private, public, key id)."""
        result = admin(self.dir / "unused.db", "bundle", "keygen", str(self.dir / name), "--algorithm", algorithm)
        assert result.exit_code == 0, result.output
        return self.dir / f"{name}.key", self.dir / f"{name}.pub", result.output.split("key id ")[1].split()[0]


def bundle_of(document: dict[str, Any], key_file: Path, sequence: int, kid: str | None = None) -> bytes:
    key = load_signing_key(key_file.read_bytes(), str(key_file))
    return build_bundle(document, key, key_id=kid, sequence=sequence)[0].encode()

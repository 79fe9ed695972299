"""How the admin script words a refusal: ``AdminError``, and its option names for the fields
that ``sidecar.exchange``'s checks name (which do the checking, for the sidecar's bundles too).

Exceptions::

    Exception
     └── AdminError   a refused command; ``exit_code`` 1, or 2 for a usage or configuration
                      error of ``safous-admin test``

``sidecar.exchange.InvalidContent`` (a rule, policy or document refused) exits 1 as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from sidecar.db import ObjectKind

__all__ = ["CLI_OPTIONS", "AdminError", "not_found"]

CLI_OPTIONS: Mapping[str, str] = {
    "method": "--method", "url": "--url", "headers": "--header", "body": "--body",
    "auth": "--auth", "username": "--username", "password": "--password",
    "token_url": "--token-url", "client_id": "--client-id", "client_secret": "--client-secret",
    "verification": "--verify", "actions": "--action", "timeout_ms": "--timeout-ms",
    "cache_ttl": "--cache-ttl", "hosts": "--host", "path_prefix": "--path-prefix",
    "methods": "--method", "integration": "--integration", "priority": "--priority",
    "ports": "--port", "sni": "--sni", "mode": "--mode",
    "rules": "--rule",
}
"""Model field → the option that sets it, to word errors in the admin's terms."""


class AdminError(Exception):
    """A refused command. The message is one line; ``exit_code`` is what the script exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        self.exit_code = exit_code
        super().__init__(message)


def not_found(kind: ObjectKind, name: str, known: Sequence[str], exit_code: int = 1) -> NoReturn:
    """Refuse a command on the ``kind`` ``name`` that does not exist, suggesting a ``known`` one."""
    from sidecar.exchange import closest, quoted  # pydantic: not for the declarations (see cli)

    raise AdminError(f"{kind} {quoted(name)} does not exist" + closest(name, known), exit_code)

"""The decision cache shared by the fleet (``--shared-cache``): Redis or Valkey, standalone or
Cluster, as untrusted storage behind ``sidecar.rules.fleet.SharedStore``.

``sealing`` names and seals entries with the fleet secret; ``_redis`` talks to the server,
within a time budget, behind a circuit breaker (``_breaker``). The evaluate stage
(``sidecar.rules``) never imports this package: the server hands it a ``FleetCache``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..rules.fleet import FleetCache
from ..rules.secrets import resolve_secret
from ._breaker import Breaker
from ._redis import RedisStore, connect
from .sealing import FleetKeys

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["Breaker", "FleetKeys", "RedisStore", "fleet_cache"]


def fleet_cache(settings: Settings) -> FleetCache:
    """The fleet cache ``settings`` ask for (with ``--shared-cache``: the caller checks). Reads
    the fleet secret and the password (blocking: at start only). Raises ValueError (a secret
    that cannot be read or is too short, a URL redis-py does not take); the server, not running
    yet, then stops with that message."""
    assert settings.shared_cache is not None
    secret = resolve_secret(settings.shared_cache_key, settings.secret_policy) or ""
    keys = FleetKeys(secret.encode())
    password = resolve_secret(settings.shared_cache_password, settings.secret_policy)
    ca_bundle = str(settings.shared_cache_ca_bundle) if settings.shared_cache_ca_bundle else None
    client = connect(settings.shared_cache, cluster=settings.shared_cache_cluster, password=password,
                     ca_bundle=ca_bundle)
    store = RedisStore(client, keys, budget=settings.shared_cache_timeout,
                       breaker=Breaker(settings.shared_cache_breaker_seconds))
    # What a trace shows as whose call answered: the name the fleet's activity log knows it by.
    return FleetCache(store, settings.pod)

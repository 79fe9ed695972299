"""rules.db: all SQL of the project.

Where things are:

- ``connection``: opening rules.db (WAL, busy timeout), transactions, ``StoreError``.
- ``migrations``: the schema, as released ``.sql`` files applied in order.
- ``columns``: which column holds which rule and policy field; every row ↔ model direction.
- ``rule_set``: what the request path reads (``load_rule_set``) and how it notices changes.
- ``objects``: rules and policies as the admin script reads and writes them.
- ``audit``: the audit log (written by triggers) and the admin script's transaction.
- ``activity``: the activity log: appending (a pod's decisions, or those its sidecars ship to
  a fleet's collector), pruning, reading, and the portal's full-text index of denial reasons
  (kept in a database of the portal's own).
- ``bundle_state``: which signed bundle a rules.db holds (``safous-sidecar serve --bundle``).
- ``backup``: ``safous-admin backup`` and ``restore``, over SQLite's online backup API.
- ``replaced``: the sidecar's long-lived connections, which follow rules.db when another file
  takes its name (``mv``) without ever pairing the new file with the old one's ``-wal``.

The names below are loaded when first used (``sidecar._lazy``; the list is ``_exports``): a
light submodule (``names``, which the admin script's shell completion reads with sqlite3
alone) is imported without pydantic and sqlite-utils.

Connections use WAL (readers never block the admin's writes, and the other way round) and a
busy timeout. Every function here blocks: the server calls them through ``asyncio.to_thread``
or from its own writer thread, never on the event loop.

Exceptions::

    StoreError        rules.db could not be opened, migrated, read or written
                      (``sqlite3.Error`` is translated to it at this boundary)

A row that does not make a valid rule or policy is not an error: loading returns it as an
``InvalidRow`` (``sidecar.rules.model``) so the sidecar can fail closed for the policies that
depend on it and still serve the others; the admin reads return it with ``error`` set.
"""

from typing import TYPE_CHECKING

from .._lazy import exports_on_first_use

if TYPE_CHECKING:
    from ._exports import *  # noqa: F403 - the package's names, as mypy and readers see them

__getattr__ = exports_on_first_use(__name__)

"""URLs as they may be shown: in log lines, ``/readyz``, rules.db."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["shown_url"]


def shown_url(url: str) -> str:
    """``url`` as it may be logged, shown in /readyz and stored in rules.db: scheme, host, port
    and path. A presigned object-store URL carries its credentials in the query string (and some
    URLs in the user part); the fragment is never sent."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

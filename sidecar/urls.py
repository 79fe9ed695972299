"""URLs as they may be shown: in log lines, ``/readyz``, rules.db; and the HTTP client session
that fetches one."""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import yarl

__all__ = ["MAX_SHOWN", "client_session", "scrubbed", "shown_url"]

MAX_SHOWN = 500
"""Characters of an error's text (or a server's Location) shown at most."""


def shown_url(url: str) -> str:
    """``url`` as it may be logged, shown in /readyz and stored in rules.db: scheme, host, port
    and path. A presigned object-store URL carries its credentials in the query string (and some
    URLs in the user part); the fragment is never sent."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def scrubbed(text: str, url: str, shown: str) -> str:
    """``text`` (an error's) with ``url`` replaced by ``shown`` (its ``shown_url``), cut to
    ``MAX_SHOWN`` characters: some aiohttp errors quote the URL whole, as given or as yarl
    re-encoded it (``p w`` as ``p%20w``), and an answer it cannot parse quotes it so without
    its user part (which went into the Authorization header), query and all."""
    urls = {url}
    try:
        parsed = yarl.URL(url)
        urls.update((str(parsed), str(parsed.with_user(None))))
    except ValueError:  # not a URL yarl reads: then aiohttp quoted it as given
        pass
    for quoted in urls:
        text = text.replace(quoted, shown)
    return text[:MAX_SHOWN]


def client_session(ca_bundle: str | None, timeout: float, *, auto_decompress: bool = True) -> aiohttp.ClientSession:
    """A session for requests to one server: one connection, TLS verified against the system
    store or ``ca_bundle``, ``timeout`` seconds per request, no proxy from the environment.
    Raises ``OSError`` or ``ssl.SSLError`` when ``ca_bundle`` cannot be read."""
    context = ssl.create_default_context(cafile=ca_bundle)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=1),
                                 timeout=aiohttp.ClientTimeout(total=timeout), auto_decompress=auto_decompress,
                                 trust_env=False)

"""Where a bundle comes from: a file or an http(s) URL, read only when it changed.

A source hands back the bundle's bytes and a tag naming that version of it (the file's
identity, the HTTP ETag), or None when the version is the one last ``remember``-ed: a file that
was not replaced is not read again; an HTTP server is asked with ``If-None-Match`` and a 304
costs nothing. Failures raise ``BundleRefused`` with ``fetch_failed``, ``too_large`` or
``truncated``: the caller keeps the last good revision.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..urls import MAX_SHOWN, client_session, scrubbed, shown_url
from ._format import BundleRefused

__all__ = ["BundleSource", "Fetched", "FileSource", "HttpSource"]


@dataclass(frozen=True, slots=True)
class Fetched:
    body: bytes
    tag: str


class BundleSource(ABC):
    """A place a bundle is read from. Contract of ``fetch``: the bytes and tag of the current
    version, or None if it is the version last passed to ``remember``; raises ``BundleRefused``
    (fetch_failed, too_large, truncated) and nothing else."""

    def __init__(self, name: str, max_bytes: int) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self.remembered: str | None = None

    @abstractmethod
    async def fetch(self) -> Fetched | None: ...

    def remember(self, tag: str | None) -> None:
        """The version verified (applied, or refused for what its verified content says): not
        fetched again."""
        self.remembered = tag

    async def close(self) -> None:
        return None


class FileSource(BundleSource):
    """A file, e.g. in a mounted ConfigMap or Secret. The kubelet updates those by writing a new
    directory and swapping the ``..data`` symbolic link to it, so the file's real path and inode
    change while its name does not: the tag is the real path, device, inode, mtime and size of
    what the path leads to now."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        super().__init__(str(path), max_bytes)
        self._path = path

    def _read(self) -> Fetched | None:
        try:
            real = os.path.realpath(self._path)
            with open(real, "rb") as file:
                st = os.fstat(file.fileno())
                tag = f"{real}:{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"
                if tag == self.remembered:
                    return None
                if st.st_size > self.max_bytes:
                    raise BundleRefused("too_large", f"{self._path}: {st.st_size} bytes, more than "
                                        f"--bundle-max-bytes {self.max_bytes}")
                body = file.read(self.max_bytes + 1)
        except OSError as exc:
            raise BundleRefused("fetch_failed", f"cannot read {self._path}: {exc.strerror}") from None
        if len(body) > self.max_bytes:
            raise BundleRefused("too_large", f"{self._path}: more than --bundle-max-bytes {self.max_bytes}")
        return Fetched(body, tag)

    async def fetch(self) -> Fetched | None:
        return await asyncio.to_thread(self._read)


class HttpSource(BundleSource):
    """An ``http://`` or ``https://`` URL: GET with ``If-None-Match``, redirects not followed
    (a redirect is a failure that names its target), TLS verified against the system store or
    ``ca_bundle``, a bearer token from ``bearer()`` (called per request: a rotated file is read
    anew), the body capped at ``max_bytes``. A server that sends no ETag gets the body's SHA-256
    as the tag, so an unchanged bundle is still not applied twice. ``name`` is the URL without
    its user part and query (``shown_url``); only the request sees them."""

    def __init__(self, url: str, max_bytes: int, *, ca_bundle: str | None = None,
                 bearer: Callable[[], str | None] | None = None, timeout: float = 30.0) -> None:
        super().__init__(shown_url(url), max_bytes)
        self._url = url
        self._ca_bundle = ca_bundle
        self._bearer = bearer
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self) -> Fetched | None:
        if self._session is None:
            try:
                # No decompression: a JWS is base64 text, and a small compressed body can
                # inflate past --bundle-max-bytes before the cap sees it. A server that
                # compresses anyway gets its bundle refused as not ASCII.
                self._session = client_session(self._ca_bundle, self._timeout, auto_decompress=False)
            except (OSError, ssl.SSLError) as exc:
                raise BundleRefused("fetch_failed", f"--bundle-ca-bundle {self._ca_bundle}: {exc}") from None
        headers = {"Accept": "application/jose, */*", "Accept-Encoding": "identity"}
        if self.remembered is not None and not self.remembered.startswith("sha256:"):
            headers["If-None-Match"] = self.remembered
        if self._bearer is not None:
            try:
                token = self._bearer()
            except ValueError as exc:  # SecretError: unset variable, unreadable file
                raise BundleRefused("fetch_failed", f"--bundle-bearer-token: {exc}") from None
            if token:
                headers["Authorization"] = f"Bearer {token.strip()}"
        try:
            async with self._session.get(self._url, headers=headers, allow_redirects=False) as resp:
                if resp.status == 304 and "If-None-Match" in headers:
                    return None
                if 300 <= resp.status < 400:
                    # The target may be presigned too.
                    location = resp.headers.get("Location")
                    location = shown_url(location)[:MAX_SHOWN] if location else "?"
                    raise BundleRefused("fetch_failed", f"HTTP {resp.status} redirect to {location!r} not "
                                        "followed: give the final URL")
                if resp.status != 200:
                    raise BundleRefused("fetch_failed", f"HTTP {resp.status} from {self.name}")
                if resp.content_length is not None and resp.content_length > self.max_bytes:
                    raise BundleRefused("too_large", f"{resp.content_length} bytes announced, more than "
                                        f"--bundle-max-bytes {self.max_bytes}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise BundleRefused("too_large", f"more than --bundle-max-bytes {self.max_bytes}")
                etag = resp.headers.get("ETag")
        except aiohttp.ClientPayloadError as exc:
            raise BundleRefused("truncated", f"the download from {self.name} was cut short: "
                                f"{self._scrubbed(exc)}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BundleRefused("fetch_failed", f"cannot fetch {self.name}: {self._scrubbed(exc)}") from None
        return Fetched(bytes(body), etag or "sha256:" + hashlib.sha256(body).hexdigest())

    def _scrubbed(self, exc: BaseException) -> str:
        return scrubbed(str(exc) or type(exc).__name__, self._url, self.name)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

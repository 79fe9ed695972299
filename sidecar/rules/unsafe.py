"""What a client value may not carry into a webhook request, and why.

Parameter values come from the client; the templates encode them for where they land
(``sidecar.rules.templates``), and these checks refuse what encoding cannot make safe:

- a header value holding a control character or a Unicode line separator (``unsafe_in_header``,
  also applied to stored values bound for the upstream);
- a URL path value that would not stay *one opaque segment* for the most eager chain of servers
  and proxies in front of a webhook (``path_value``, ``check_path_segments``), or that is longer
  than ``MAX_PATH_VALUE`` characters.

Exceptions::

    ValueError
     └── UnsafeParameter   the value is refused (unsafe_parameter); names the parameter, where
                           it lands and what it holds, never the value
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote

__all__ = [
    "MAX_PATH_VALUE",
    "UNSAFE_IN_HEADER",
    "UnsafeParameter",
    "as_servers_read",
    "check_path_segments",
    "path_span",
    "path_value",
    "unsafe_in_header",
]

# The path of a URL: after the authority, up to the query or fragment (RFC 3986 §3.3).
_URL_PATH = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*([^?#]*)")
# CR, LF and NUL could end a header or hide one (RFC 9110 §5.5). The other control characters
# but HTAB are invalid in a field value too, and the HTTP client refuses to send them (a
# ValueError): a client could turn every check into an internal_error with a logged
# traceback. NEL (U+0085, a C1 control) and U+2028/U+2029 end a line for Unicode-aware
# readers (JavaScript, many log tools). So a value holding any of them fails the rule
# (unsafe_parameter), a rule whose own header text holds one does not compile, and a
# stored value bound for the upstream is refused the same way.
UNSAFE_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_LINE_BREAKING = re.compile("[\r\n\0]")
_SEPARATOR = re.compile("[\x85\u2028\u2029]")
_DOT_SEGMENTS = frozenset({"", ".", ".."})
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Read as "/" by some server: the backslash (IIS, Node, Envoy on Windows) and the characters
# Windows' best-fit mapping turns into a slash or backslash. Replaced one by one: nine passes
# in C cost ~70 times less than str.translate's lookup per character.
_SLASH_LIKE = "\\\u2215\u2044\u29f8\u29f9\u2216\ufe68\u00a5\u20a9"
MAX_PATH_VALUE = 1024
"""Characters a URL path value may have, before encoding: a longer one fails the rule
(unsafe_parameter). Reading a value as servers do costs time in proportion to its length, and
more for some characters (NFKC turns U+FDFA into 18): one 60 KB header value cost ~90 ms of the
event loop, the costliest value within the limit (U+FDFA × 1024) 2-3 ms. A path segment is an
identifier, not a document."""


class UnsafeParameter(ValueError):
    """A parameter value that would put a control character or line separator into a header
    value of the webhook request, or would not stay one opaque URL path segment. Names the
    parameter, ``where`` it lands (the header, when known) and ``what`` it holds, never the
    value."""

    def __init__(self, parameter: str, header: str | None = None, *,
                 what: str = "CR, LF or NUL", where: str | None = None) -> None:
        self.parameter = parameter
        self.header = header
        self.what = what
        self.where = where or (f"header {header}" if header else "a header value")
        super().__init__(f"parameter %{parameter}% holds {what}, not allowed in {self.where}")


def unsafe_in_header(value: str) -> str | None:
    """What makes ``value`` unfit for a header value (``"CR, LF or NUL"``, ``"a line
    separator"``, ``"a control character"``), or None when it is fit."""
    if not UNSAFE_IN_HEADER.search(value):
        return None
    if _LINE_BREAKING.search(value):
        return "CR, LF or NUL"
    return "a line separator" if _SEPARATOR.search(value) else "a control character"


def as_servers_read(text: str) -> str | None:
    """``text`` as the most eager server reads it: percent-decoded until nothing changes (a
    proxy that decodes once before a server that decodes again), NFKC-folded (fullwidth ／
    and ．), every slash look-alike read as ``/`` (``\\``, Windows best-fit ∕ ⁄ …). None when
    it still changes after a few rounds: no honest value is encoded that often."""
    for _ in range(4):
        decoded = unquote(text)
        if decoded == text:
            if decoded.isascii():  # NFKC leaves ASCII as it is; its only slash look-alike is "\"
                return decoded.replace("\\", "/")
            read = unicodedata.normalize("NFKC", decoded)
            for slash_like in _SLASH_LIKE:
                read = read.replace(slash_like, "/")
            return read
        text = decoded
    return None


def path_value(name: str, value: str, *, whole_segment: bool = False) -> str:
    """``value`` encoded for a URL path, where it must stay one opaque segment. With
    ``whole_segment`` (the template's segment is just this parameter) the value is checked as
    the segment itself, so ``check_path_segments`` need not read it again. Raises
    ``UnsafeParameter``."""
    if len(value) > MAX_PATH_VALUE:
        raise UnsafeParameter(name, what=f"more than {MAX_PATH_VALUE} characters", where="a URL path segment")
    quoted = quote(value, safe="")
    # A whole segment is read as sent (encoded), as check_path_segments reads any segment.
    read = as_servers_read(quoted if whole_segment else value)
    if read is None or "/" in read:
        raise UnsafeParameter(name, what="'/', '\\' or an escape of them", where="a URL path segment")
    if whole_segment:
        _check_segment(name, read)
    return quoted


def path_span(url: str) -> tuple[int, int]:
    """Where the path of ``url`` (or of a URL template with parameters blanked) lies."""
    match = _URL_PATH.match(url)
    return match.span(1) if match else (0, 0)


def check_path_segments(url: str, segments_with_parameters: tuple[tuple[int, str], ...]) -> None:
    """Each segment holding a parameter, as servers read it, must be (or, where the template
    itself escapes a slash, ``grp%2F%name%``, split into) pieces that are neither empty nor
    dot segments — before a ``;`` too, as Tomcat reads ``..;x`` — and hold no control
    character (a NUL cuts a path short for some servers)."""
    start, end = path_span(url)
    segments = url[start:end].split("/")
    for index, name in segments_with_parameters:
        _check_segment(name, as_servers_read(segments[index]))


def _check_segment(name: str, read: str | None) -> None:
    if read is not None and _CONTROL.search(read):
        raise UnsafeParameter(name, what="a control character", where="a URL path segment")
    if read is None or any(piece.split(";", 1)[0] in _DOT_SEGMENTS for piece in read.split("/")):
        raise UnsafeParameter(name, what="a value that makes an empty or dot ('.', '..') segment",
                              where="a URL path segment")

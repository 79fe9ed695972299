"""``%param%`` templates: a rule's webhook request, compiled once, rendered per check.

Parameter values come from the client, so substitution depends on where the value lands: no
value can change the structure of the webhook request. What encoding cannot make safe is
refused by ``sidecar.rules.unsafe`` (``UnsafeParameter``).

=============  ==========================================================================
context        a value is written as
=============  ==========================================================================
URL            ``quote(value, safe="")``: only unreserved characters and ``%XX`` escapes,
               so no value adds ``/ ? # & = @ :`` or changes the host. In the path, a
               value must also stay *one opaque segment* for any chain of servers that
               decodes and normalises the path (RFC 3986 §5.2.4, §6.2.2): no ``/`` once
               read as they read it, no empty, ``.`` or ``..`` segment, no control
               character, at most ``MAX_PATH_VALUE`` (1,024) characters — else
               ``UnsafeParameter``. Query values are encoded likewise;
               a fragment is never sent, so it may not hold parameters.
header value   as is; a value holding a Unicode control character (category Cc: C0,
               DEL, C1 including NEL U+0085) other than HTAB, or a line or paragraph
               separator (U+2028, U+2029), raises ``UnsafeParameter``
JSON body      JSON-string-escaped, ASCII only, without quotes: the template writes them
               (``{"user": "%username%"}``)
form body      ``quote_plus(value, safe="")``
other body     as is
=============  ==========================================================================

Syntax, checked when the rule is compiled (so when it is saved):

- ``%name%`` is a parameter: a fixed name (``[a-z_][a-z0-9_]*``), ``headers.<token>`` or
  ``stored.<name>``; every name must pass ``sidecar.parameters.check_parameter_name``.
- ``%%`` is a percent sign. In a URL it is the *character* ``%``, written ``%25``.
- Any other ``%`` is an error — except in a URL, where the template is the URL in its
  encoded form and ``%XX`` (two hex digits) is kept as the escape it is: ``/a%2Fb`` stays
  ``/a%2Fb``. A placeholder wins over an escape (``%device_id%`` starts like the escape
  ``%de``), except when its name is two hex digits: ``%ab%cd`` is the escapes ``%ab`` and
  ``%cd`` (no parameter has such a name). A lower-case escape followed by letters
  (``%abc%``) reads as a parameter: write escapes in upper case (``%AB``), as RFC 3986 advises.
- In a URL, parameters may only follow the scheme and host (``https://host/``...): a value
  never picks the server the webhook request goes to.
- In a JSON body, the template with every parameter replaced by text must be valid JSON, and
  each parameter must sit inside a JSON string value: not outside a string (a value would be
  structure), not in an object key (a value could collide with another key), not right
  after a backslash (a value would complete an escape).

Exceptions::

    ValueError
     ├── TemplateError     a template that does not compile (rule_invalid); ``position`` is
     │                     the 0-based index in the template, when there is one
     └── UnsafeParameter   a header value would carry a control character or line
                           separator, or a URL path segment would not stay one opaque
                           segment (unsafe_parameter)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus

from sidecar.parameters import STORED_PREFIX, check_parameter_name
from sidecar.rules.unsafe import (
    UNSAFE_IN_HEADER,
    UnsafeParameter,
    check_path_segments,
    path_span,
    path_value,
    unsafe_in_header,
)

if TYPE_CHECKING:  # rules may validate with this module one day: no import cycle
    from sidecar.rules.model import Rule

__all__ = [
    "UNSAFE_IN_HEADER",
    "CompiledRequest",
    "Context",
    "Lookup",
    "NameCheck",
    "Template",
    "TemplateError",
    "UnsafeParameter",
    "WebhookRequest",
    "body_context",
    "compile_rule_request",
    "compile_template",
]

Lookup = Callable[[str], str]
"""The value of a parameter name (``username``, ``headers.accept``, ``stored.token``)."""

NameCheck = Callable[[str], None]
"""Accepts a parameter name or raises ``ValueError`` (``check_parameter_name``)."""

# What a placeholder may hold. Fixed names have digits too (cert_thumbprint_256).
_PLACEHOLDER = re.compile(
    r"%("
    r"[a-z_][a-z0-9_]*"
    r"|headers\.[!#$&'*+.^_`|~0-9A-Za-z-]+"
    r"|stored\.[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
    r")%"
)
# Looks like an attempt at a placeholder (%UserName%, %header.x%): reported as an unknown
# parameter, with the suggestion check_parameter_name makes.
_CANDIDATE = re.compile(r"%([A-Za-z_][\w.-]{0,127})%", re.ASCII)
_URL_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_TWO_HEX = re.compile(r"[0-9A-Fa-f]{2}")
# Scheme and authority, complete, before the first parameter of a URL.
_URL_HEAD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]+[/?#]")
class Context(Enum):
    """Where a template's text goes: decides how a parameter value is written."""

    URL = "URL"
    HEADER = "header value"
    JSON_BODY = "JSON body"
    FORM_BODY = "form body"
    RAW_BODY = "body"


class TemplateError(ValueError):
    """A template that does not compile. ``position``: 0-based index in the template, or None."""

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class _Parameter:
    name: str
    in_path: bool = False  # in a URL's path: must stay one opaque segment
    whole_segment: bool = False  # the segment is just this parameter: checked as the value is


def _url_value(name: str, value: str) -> str:
    return quote(value, safe="")


def _header_value(name: str, value: str) -> str:
    what = unsafe_in_header(value)
    if what is not None:
        raise UnsafeParameter(name, what=what)
    return value


def _json_value(name: str, value: str) -> str:
    return json.dumps(value)[1:-1]  # ensure_ascii: no raw control or non-ASCII characters


def _form_value(name: str, value: str) -> str:
    return quote_plus(value, safe="")


def _raw_value(name: str, value: str) -> str:
    return value


_ENCODERS: dict[Context, Callable[[str, str], str]] = {
    Context.URL: _url_value,
    Context.HEADER: _header_value,
    Context.JSON_BODY: _json_value,
    Context.FORM_BODY: _form_value,
    Context.RAW_BODY: _raw_value,
}


@dataclass(frozen=True, slots=True, eq=False)
class Template:
    """A compiled template (build it with ``compile_template``).

    ``parameters``: the parameter names used, first use first, each once; ``stored_names``:
    the ``NAME`` of each ``stored.NAME`` among them.
    """

    text: str
    context: Context
    parameters: tuple[str, ...]
    stored_names: tuple[str, ...]
    _parts: tuple[str | _Parameter, ...] = field(repr=False)
    # URL: (index in the path's "/"-split, first parameter in it) of each path segment that
    # holds a parameter and more (a segment that is one parameter is checked with its value).
    _path_segments: tuple[tuple[int, str], ...] = field(default=(), repr=False)

    def render(self, lookup: Lookup) -> str:
        """The text with each parameter replaced by ``lookup(name)``, written for the context.

        Raises ``UnsafeParameter`` for a value with a control character (header context) or
        one that would not stay one opaque URL path segment; a ``KeyError`` from ``lookup``
        propagates.
        """
        encode = _ENCODERS[self.context]
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            elif part.in_path:
                out.append(path_value(part.name, lookup(part.name), whole_segment=part.whole_segment))
            else:
                out.append(encode(part.name, lookup(part.name)))
        rendered = "".join(out)
        if self._path_segments:
            check_path_segments(rendered, self._path_segments)
        return rendered


def compile_template(text: str, context: Context, *, check_name: NameCheck | None = None) -> Template:
    """Compile ``text`` for ``context`` (syntax: the module docstring).

    ``check_name`` validates each parameter name; by default
    ``sidecar.parameters.check_parameter_name``. Raises ``TemplateError`` naming the position
    (1-based character) and, for an unknown name, the suggestion of ``check_name``.
    """
    if check_name is None:
        check_name = check_parameter_name
    if context is Context.HEADER and (control := UNSAFE_IN_HEADER.search(text)):
        position = control.start()
        raise TemplateError(
            f"control character at character {position + 1} is not allowed in a header value",
            position)
    parts, spans = _parse(text, context, check_name)
    path_segments: tuple[tuple[int, str], ...] = ()
    if spans and context is Context.URL:
        _check_url_head(text, spans[0][0])
        parts, path_segments = _place_url_parameters(text, parts, spans)
    if context is Context.JSON_BODY:
        _check_json(text, spans)
    names = tuple(dict.fromkeys(name for _, _, name in spans))
    stored = tuple(n[len(STORED_PREFIX):] for n in names if n.startswith(STORED_PREFIX))
    return Template(text, context, names, stored, tuple(parts), path_segments)


def _place_url_parameters(
    text: str, parts: list[str | _Parameter], spans: list[tuple[int, int, str]]
) -> tuple[list[str | _Parameter], tuple[tuple[int, str], ...]]:
    """Mark the parameters that land in the URL's path, and list the path segments holding
    one and more; refuse a parameter in the fragment. Values are quoted (no ``/ ? #``), so
    the rendered URL splits into path, query and fragment exactly where the template does."""
    blanked = _blank(text, spans)  # a header name may hold '#': not a fragment
    path_start, path_end = path_span(blanked)
    fragment = blanked.find("#", path_end)
    segments: dict[int, str] = {}
    in_path: set[int] = set()
    whole: set[int] = set()
    for number, (start, end, name) in enumerate(spans):
        if fragment >= 0 and start > fragment:
            raise TemplateError(f"parameter %{name}% at character {start + 1} is in the URL's "
                                "fragment (#...), which is never sent to the webhook", start)
        if path_start <= start < path_end:
            in_path.add(number)
            if blanked[start - 1] == "/" and (end == path_end or blanked[end] == "/"):
                whole.add(number)
            else:
                segments.setdefault(blanked.count("/", path_start, start), name)
    placed: list[str | _Parameter] = []
    number = 0
    for part in parts:
        if isinstance(part, _Parameter):
            part = _Parameter(part.name, in_path=number in in_path, whole_segment=number in whole)
            number += 1
        placed.append(part)
    return placed, tuple(segments.items())


def _blank(text: str, spans: list[tuple[int, int, str]]) -> str:
    """``text`` with each parameter replaced by as many ``x``: same length, no structure."""
    sample = list(text)
    for start, end, _ in spans:
        sample[start:end] = "x" * (end - start)
    return "".join(sample)


def _parse(
    text: str, context: Context, check_name: NameCheck
) -> tuple[list[str | _Parameter], list[tuple[int, int, str]]]:
    """The parts of ``text`` (literals merged) and each parameter's (start, end, name)."""
    in_url = context is Context.URL
    parts: list[str | _Parameter] = []
    spans: list[tuple[int, int, str]] = []
    literal: list[str] = []
    i = 0
    while (j := text.find("%", i)) >= 0:
        literal.append(text[i:j])
        if text.startswith("%%", j):
            literal.append("%25" if in_url else "%")
            i = j + 2
            continue
        placeholder = _PLACEHOLDER.match(text, j)
        if placeholder and not (in_url and _TWO_HEX.fullmatch(placeholder[1])):
            name = placeholder[1]
            _check_name(check_name, name, j, context)
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_Parameter(name))
            spans.append((j, placeholder.end(), name))
            i = placeholder.end()
            continue
        if in_url and _URL_ESCAPE.match(text, j):
            literal.append(text[j:j + 3])
            i = j + 3
            continue
        candidate = _CANDIDATE.match(text, j)
        if candidate:
            _check_name(check_name, candidate[1], j, context)
            raise TemplateError(f"%{candidate[1]}% is not a parameter name (at character {j + 1})", j)
        escape = " or a percent-escape (%XX)" if in_url else ""
        raise TemplateError(
            f"'%' at character {j + 1} does not start a parameter{escape}: write %% for a literal %",
            j,
        )
    literal.append(text[i:])
    if any(literal):
        parts.append("".join(literal))
    return parts, spans


def _check_name(check_name: NameCheck, name: str, position: int, context: Context) -> None:
    try:
        check_name(name)
    except ValueError as exc:
        hint = ""
        if context is Context.URL and _TWO_HEX.match(name):
            hint = "; a percent-escape followed by letters must be written in upper case (%AB)"
        raise TemplateError(f"{exc} (at character {position + 1}){hint}", position) from exc


def _check_url_head(text: str, first: int) -> None:
    if not _URL_HEAD.match(text[:first]):
        raise TemplateError(
            f"parameter at character {first + 1} is in the scheme or host of the URL: "
            "parameters may only follow https://host/",
            first,
        )


def _check_json(text: str, spans: list[tuple[int, int, str]]) -> None:
    """Refuse a JSON body template that is not JSON, or that lets a value be structure."""
    # A small scanner of JSON's lexical states, enough to know what each parameter sits in;
    # json.loads below judges the grammar.
    outside, in_string, after_backslash, in_unicode = 0, 1, 2, 3
    state = outside
    unicode_left = 0
    containers: list[str] = []
    expect_key = False
    string_is_key = False
    starts = {start: (end, name) for start, end, name in spans}
    i = 0
    n = len(text)
    while i < n:
        if i in starts:
            end, name = starts[i]
            problem = None
            if state == outside:
                problem = "must be inside a JSON string"
            elif state != in_string:
                problem = "cannot follow a backslash escape"
            elif string_is_key:
                problem = "cannot be (part of) an object key"
            if problem:
                raise TemplateError(f"parameter %{name}% at character {i + 1} {problem}", i)
            i = end
            continue
        char = text[i]
        if state == outside:
            if char == '"':
                state = in_string
                string_is_key = expect_key
            elif char in "{[":
                containers.append(char)
                expect_key = char == "{"
            elif char in "}]":
                if containers:
                    containers.pop()
                expect_key = False
            elif char == ",":
                expect_key = bool(containers) and containers[-1] == "{"
            elif char == ":":
                expect_key = False
        elif state == in_string:
            if char == "\\":
                state = after_backslash
            elif char == '"':
                state = outside
                string_is_key = False
        elif state == after_backslash:
            if char == "u":
                state, unicode_left = in_unicode, 4
            else:
                state = in_string
        else:
            unicode_left -= 1
            if unicode_left == 0:
                state = in_string
        i += 1
    try:  # blanked to the same length: an error position is the template's
        json.loads(_blank(text, spans))
    except json.JSONDecodeError as exc:
        raise TemplateError(
            f"not valid JSON: {exc.msg} at character {exc.pos + 1}", exc.pos
        ) from None
    except (ValueError, RecursionError):
        raise TemplateError("not valid JSON") from None


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """One rendered webhook request, ready to send. ``url`` is already encoded: send it as
    is (``yarl.URL(url, encoded=True)``), not re-quoted."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None


def body_context(content_type: str | None) -> Context:
    """The context of a body sent with ``content_type``: JSON for ``application/json``,
    ``*/*+json`` and no content type; form for ``application/x-www-form-urlencoded``; raw
    otherwise."""
    if content_type is None:
        return Context.JSON_BODY
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return Context.JSON_BODY
    if media_type == "application/x-www-form-urlencoded":
        return Context.FORM_BODY
    return Context.RAW_BODY


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRequest:
    """A rule's webhook request, compiled (build it with ``compile_rule_request``).

    ``parameters``: every parameter name the request uses; ``stored_names``: the ``NAME`` of
    each ``%stored.NAME%`` used (the rule runs after the rules that store them).
    """

    method: str
    url: Template
    headers: tuple[tuple[str, Template], ...]
    body: Template | None
    parameters: tuple[str, ...]
    stored_names: tuple[str, ...]

    def render(self, lookup: Lookup) -> WebhookRequest:
        """The request for one check. Raises ``UnsafeParameter`` (naming the header) when a
        value would put a control character into a header; a ``KeyError`` from ``lookup``
        propagates."""
        headers = []
        for name, template in self.headers:
            try:
                headers.append((name, template.render(lookup)))
            except UnsafeParameter as exc:
                raise UnsafeParameter(exc.parameter, name, what=exc.what) from None
        body = None if self.body is None else self.body.render(lookup).encode("utf-8")
        return WebhookRequest(self.method, self.url.render(lookup), tuple(headers), body)


def compile_rule_request(rule: Rule, *, check_name: NameCheck | None = None) -> CompiledRequest:
    """Compile the URL, header values and body of ``rule``.

    The body's context comes from the rule's ``Content-Type`` header (``body_context``); a
    body without one is JSON and gets ``Content-Type: application/json``. Raises
    ``TemplateError`` whose message starts with the part at fault (``url:``, ``header X:``,
    ``body:``).
    """
    url = _compile_part("url", rule.url, Context.URL, check_name)
    headers = [
        (name, _compile_part(f"header {name}", value, Context.HEADER, check_name))
        for name, value in rule.headers
    ]
    body = None
    if rule.body is not None:
        content_type = rule.header("content-type")
        context = body_context(content_type)
        body = _compile_part(f"{context.value}", rule.body, context, check_name)
        if content_type is None:
            headers.append(("Content-Type", compile_template("application/json", Context.HEADER,
                                                             check_name=check_name)))
    templates = [url, *(t for _, t in headers), *([body] if body else [])]
    parameters = tuple(dict.fromkeys(n for t in templates for n in t.parameters))
    stored = tuple(dict.fromkeys(n for t in templates for n in t.stored_names))
    return CompiledRequest(rule.method, url, tuple(headers), body, parameters, stored)


def _compile_part(where: str, text: str, context: Context, check_name: NameCheck | None) -> Template:
    try:
        return compile_template(text, context, check_name=check_name)
    except TemplateError as exc:
        raise TemplateError(f"{where}: {exc}", exc.position) from exc.__cause__

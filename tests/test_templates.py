"""Templates: ``%param%`` substitution that no client value can break out of."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.rules.model import Rule
from sidecar.rules.templates import (
    Context,
    TemplateError,
    UnsafeParameter,
    WebhookRequest,
    body_context,
    compile_rule_request,
    compile_template,
)

VALUES = {
    "username": "alice",
    "remote_ip": "203.0.113.7",
    "device_id": "dev-1",
    "user_agent": "curl/8.5",
    "cert_thumbprint_256": "ab" * 32,
    "headers.accept-language": "fr-CH, fr;q=0.9",
    "stored.token": "t0k",
}


def lookup_in(values: dict[str, str]):
    def lookup(name: str) -> str:
        if name.startswith("headers."):
            return values.get(name.lower(), "")
        return values[name]
    return lookup


def render(text: str, context: Context, **values: str) -> str:
    return compile_template(text, context).render(lookup_in({**VALUES, **values}))


# --- rendering, per context -------------------------------------------------------------

@pytest.mark.parametrize(("context", "template", "values", "expected"), [
    # URL: values percent-encoded, nothing kept as a delimiter.
    (Context.URL, "https://api.example.com/users/%username%?ip=%remote_ip%", {},
     "https://api.example.com/users/alice?ip=203.0.113.7"),
    (Context.URL, "https://api.example.com/users/%username%", {"username": "a b?c#d&e=f@g:h+i;j"},
     "https://api.example.com/users/a%20b%3Fc%23d%26e%3Df%40g%3Ah%2Bi%3Bj"),
    (Context.URL, "https://api.example.com/users?u=%username%", {"username": "a b/c?d#e&f=g@h:i+j"},
     "https://api.example.com/users?u=a%20b%2Fc%3Fd%23e%26f%3Dg%40h%3Ai%2Bj"),
    (Context.URL, "https://api.example.com/u/%username%", {"username": "zoë%41"},
     "https://api.example.com/u/zo%C3%AB%2541"),
    # URL: the template's own percent-escapes stay as written, upper or lower case.
    (Context.URL, "https://api.example.com/a%2Fb/%username%?q=caf%C3%A9", {},
     "https://api.example.com/a%2Fb/alice?q=caf%C3%A9"),
    (Context.URL, "https://api.example.com/caf%c3%a9/%ab%cd/%username%", {},
     "https://api.example.com/caf%c3%a9/%ab%cd/alice"),
    (Context.URL, "https://api.example.com/%AB%device_id%", {},  # %AB then %device_id%
     "https://api.example.com/%ABdev-1"),
    (Context.URL, "https://api.example.com/%device_id%", {},  # not the escape %de
     "https://api.example.com/dev-1"),
    # URL: %% is the character %, encoded.
    (Context.URL, "https://api.example.com/?discount=50%%", {},
     "https://api.example.com/?discount=50%25"),
    (Context.URL, "https://api.example.com/?l=%headers.Accept-Language%", {},
     "https://api.example.com/?l=fr-CH%2C%20fr%3Bq%3D0.9"),
    # Header values: as is.
    (Context.HEADER, "Bearer %stored.token%", {}, "Bearer t0k"),
    (Context.HEADER, "%username% (100%%) %headers.ACCEPT-LANGUAGE%", {},
     "alice (100%) fr-CH, fr;q=0.9"),
    (Context.HEADER, "ua=%user_agent%", {"user_agent": 'Mozilla "5.0" ; \\ é'},
     'ua=Mozilla "5.0" ; \\ é'),
    (Context.HEADER, "static", {}, "static"),
    (Context.HEADER, "", {}, ""),
    # JSON body: escaped inside the template's own quotes, ASCII only.
    (Context.JSON_BODY, '{"user": "%username%", "ip": "%remote_ip%"}', {},
     '{"user": "alice", "ip": "203.0.113.7"}'),
    (Context.JSON_BODY, '{"user": "%username%"}', {"username": 'a"b\\c\n\r\t\0é😀'},
     '{"user": "a\\"b\\\\c\\n\\r\\t\\u0000\\u00e9\\ud83d\\ude00"}'),
    (Context.JSON_BODY, '{"msg": "%username% at 100%% from %remote_ip%", "n": [1, "%device_id%"]}',
     {}, '{"msg": "alice at 100% from 203.0.113.7", "n": [1, "dev-1"]}'),
    (Context.JSON_BODY, '"%username%"', {}, '"alice"'),
    (Context.JSON_BODY, '{"a": "\\u00e9%username%\\n"}', {}, '{"a": "\\u00e9alice\\n"}'),
    # Form body: form-encoded.
    (Context.FORM_BODY, "user=%username%&ip=%remote_ip%", {"username": "a b&c=d+e%"},
     "user=a+b%26c%3Dd%2Be%25&ip=203.0.113.7"),
    (Context.FORM_BODY, "q=100%%25", {}, "q=100%25"),
    # Raw body: as is.
    (Context.RAW_BODY, "user: %username%\nip: %remote_ip% 100%%", {"username": "<a&b>\r\n"},
     "user: <a&b>\r\n\nip: 203.0.113.7 100%"),
])
def test_render(context: Context, template: str, values: dict[str, str], expected: str) -> None:
    assert render(template, context, **values) == expected


def test_parameters_and_stored_names() -> None:
    template = compile_template(
        "%username%-%stored.token%-%username%-%headers.X-Id%-%stored.role_1%", Context.HEADER
    )
    assert template.parameters == ("username", "stored.token", "headers.X-Id", "stored.role_1")
    assert template.stored_names == ("token", "role_1")
    assert compile_template("plain 100%%", Context.RAW_BODY).parameters == ()


def test_empty_parameter_value_renders_empty() -> None:
    assert render('{"l": "%headers.x-absent%"}', Context.JSON_BODY) == '{"l": ""}'


def test_lookup_key_error_propagates() -> None:
    with pytest.raises(KeyError):
        compile_template("%stored.token%", Context.HEADER).render(lookup_in({}))


# --- headers never carry CR, LF or NUL ------------------------------------------------------

@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nX-Injected: 1", "a\0b", "\n"])
def test_header_value_with_cr_lf_nul_is_unsafe(value: str) -> None:
    template = compile_template("Bearer %headers.x-token%", Context.HEADER)
    with pytest.raises(UnsafeParameter) as caught:
        template.render(lookup_in({"headers.x-token": value}))
    assert caught.value.parameter == "headers.x-token"
    assert str(caught.value) == (
        "parameter %headers.x-token% holds CR, LF or NUL, not allowed in a header value"
    )


@pytest.mark.parametrize("context", [Context.URL, Context.JSON_BODY, Context.FORM_BODY])
def test_cr_lf_nul_are_escaped_outside_headers(context: Context) -> None:
    text = {
        Context.URL: "https://h/?u=%username%",
        Context.JSON_BODY: '{"u": "%username%"}',
        Context.FORM_BODY: "u=%username%",
    }[context]
    rendered = render(text, context, username="a\r\nb\0")
    assert not any(c in rendered for c in "\r\n\0")


def test_control_characters_are_refused_in_a_path_segment() -> None:
    with pytest.raises(UnsafeParameter) as caught:
        render("https://h/u/%username%", Context.URL, username="a\r\nb")
    assert str(caught.value) == (
        "parameter %username% holds a control character, not allowed in a URL path segment")


@pytest.mark.parametrize("template", ["http://host/users/%username%", "http://host/users/u-%username%/x"])
@pytest.mark.parametrize("value", ["\ufdfa" * 20_000, "a" * 60_000, "%2F" * 20_000])
def test_a_huge_path_value_is_refused_at_once(template: str, value: str) -> None:
    """A 60 KB client header value in a path once held the event loop ~90 ms (NFKC turns
    U+FDFA into 18 characters); no identifier is that long."""
    compiled = compile_template(template, Context.URL)
    lookup = lookup_in({"username": value})
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        with pytest.raises(UnsafeParameter) as caught:
            compiled.render(lookup)
        timings.append(time.perf_counter() - started)
    assert str(caught.value) == (
        "parameter %username% holds more than 1024 characters, not allowed in a URL path segment")
    assert min(timings) < 0.020, timings


@pytest.mark.parametrize(("template", "value", "expected"), [
    ("http://host/users/%username%", "a" * 1024, "http://host/users/" + "a" * 1024),
    ("http://host/users/%username%", "\ufdfa" * 1024, "http://host/users/" + "%EF%B7%BA" * 1024),
    ("http://host/users/u-%username%", "é" * 1024, "http://host/users/u-" + "%C3%A9" * 1024),
    ("http://host/users?u=%username%", "a" * 60_000, "http://host/users?u=" + "a" * 60_000),
])
def test_values_up_to_the_limit_render_as_before(template: str, value: str, expected: str) -> None:
    """The limit is the path's: a query value is only encoded, never read as a path."""
    assert render(template, Context.URL, username=value) == expected


# --- compile errors ---------------------------------------------------------------------

@pytest.mark.parametrize(("context", "template", "message"), [
    # unknown names, with the suggestion of sidecar.parameters
    (Context.HEADER, "%usernme%",
     "unknown parameter %usernme% — did you mean %username%? (at character 1)"),
    (Context.HEADER, "x %UserName%",
     "unknown parameter %UserName% — did you mean %username%? (at character 3)"),
    (Context.JSON_BODY, '{"t": "%cert_thumbprint256%"}',
     "unknown parameter %cert_thumbprint256% — did you mean %cert_thumbprint_256%? (at character 8)"),
    (Context.RAW_BODY, "%header.accept%",
     "unknown parameter %header.accept% — did you mean %headers.accept%? (at character 1)"),
    (Context.HEADER, "%headers.%",
     "unknown parameter %headers.% — the header name is missing (at character 1)"),
    (Context.HEADER, "%nothing_like_it%", "unknown parameter %nothing_like_it% (at character 1)"),
    (Context.URL, "https://h/%cafe%",
     "unknown parameter %cafe% (at character 11); a percent-escape followed by letters must be "
     "written in upper case (%AB)"),
    # a % that starts nothing
    (Context.HEADER, "100%", "'%' at character 4 does not start a parameter: write %% for a literal %"),
    (Context.JSON_BODY, '{"d": "50% off"}',
     "'%' at character 10 does not start a parameter: write %% for a literal %"),
    (Context.FORM_BODY, "a=%2F",
     "'%' at character 3 does not start a parameter: write %% for a literal %"),
    (Context.HEADER, "%username%%", "'%' at character 11 does not start a parameter: write %% for a literal %"),
    (Context.URL, "https://h/100%zz",
     "'%' at character 14 does not start a parameter or a percent-escape (%XX): "
     "write %% for a literal %"),
    (Context.URL, "https://h/%4", "'%' at character 11 does not start a parameter or a percent-escape"),
    # URL: a value never picks the host
    (Context.URL, "https://%username%.example.com/",
     "parameter at character 9 is in the scheme or host of the URL: parameters may only follow https://host/"),
    (Context.URL, "https://api.example.com%username%/", "is in the scheme or host of the URL"),
    (Context.URL, "%username%", "is in the scheme or host of the URL"),
    # JSON body: valid JSON, parameters inside string values only
    (Context.JSON_BODY, '{"user": %username%}',
     "parameter %username% at character 10 must be inside a JSON string"),
    (Context.JSON_BODY, '{"n": 1%device_id%}', "must be inside a JSON string"),
    (Context.JSON_BODY, '{"%username%": true}',
     "parameter %username% at character 3 cannot be (part of) an object key"),
    (Context.JSON_BODY, '{"a": 1, "k-%username%": true}', "cannot be (part of) an object key"),
    (Context.JSON_BODY, '{"a": "\\%username%"}',
     "parameter %username% at character 9 cannot follow a backslash escape"),
    (Context.JSON_BODY, '{"a": "\\u00%username%"}', "cannot follow a backslash escape"),
    (Context.JSON_BODY, '{"user": "%username%"', "not valid JSON: Expecting ',' delimiter at character 22"),
    (Context.JSON_BODY, '{"user": "%username%",}', "not valid JSON: "),
    (Context.JSON_BODY, "", "not valid JSON: Expecting value at character 1"),
    (Context.JSON_BODY, "user=%username%", "must be inside a JSON string"),
])
def test_compile_error(context: Context, template: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        compile_template(template, context)
    assert message in str(caught.value)


def test_compile_error_position() -> None:
    with pytest.raises(TemplateError) as caught:
        compile_template("abc%", Context.RAW_BODY)
    assert caught.value.position == 3


def test_compile_uses_the_given_name_check() -> None:
    def only_username(name: str) -> None:
        if name != "username":
            raise ValueError(f"no {name}")

    compile_template("%username%", Context.HEADER, check_name=only_username)
    with pytest.raises(TemplateError, match=r"^no remote_ip \(at character 1\)$"):
        compile_template("%remote_ip%", Context.HEADER, check_name=only_username)


def test_json_structure_kept_with_array_and_nested_objects() -> None:
    template = '[{"a": {"b": ["%username%", {"c": "x%remote_ip%y"}]}}, "%%"]'
    rendered = render(template, Context.JSON_BODY, username='"]}', remote_ip="\\")
    assert json.loads(rendered) == [{"a": {"b": ['"]}', {"c": "x\\y"}]}}, "%"]


# --- whole requests -----------------------------------------------------------------------

def make_rule(**fields: object) -> Rule:
    return Rule.model_validate({"name": "r", "url": "https://api.example.com/check", **fields})


def test_get_request() -> None:
    rule = make_rule(
        url="https://api.example.com/users/%username%?ip=%remote_ip%",
        headers=[("Authorization", "Bearer %stored.token%"), ("X-Device", "%device_id%")],
    )
    compiled = compile_rule_request(rule)
    assert compiled.parameters == ("username", "remote_ip", "stored.token", "device_id")
    assert compiled.stored_names == ("token",)
    assert compiled.render(lookup_in(VALUES)) == WebhookRequest(
        method="GET",
        url="https://api.example.com/users/alice?ip=203.0.113.7",
        headers=(("Authorization", "Bearer t0k"), ("X-Device", "dev-1")),
        body=None,
    )


def test_post_without_content_type_is_json() -> None:
    rule = make_rule(method="POST", body='{"user": "%username%", "ua": "%user_agent%"}')
    request = compile_rule_request(rule).render(lookup_in({**VALUES, "user_agent": 'x"é'}))
    assert request.headers == (("Content-Type", "application/json"),)
    assert request.body == b'{"user": "alice", "ua": "x\\"\\u00e9"}'
    assert json.loads(request.body) == {"user": "alice", "ua": 'x"é'}


def test_post_without_body_gets_no_content_type() -> None:
    request = compile_rule_request(make_rule(method="POST")).render(lookup_in(VALUES))
    assert request.headers == ()
    assert request.body is None


@pytest.mark.parametrize(("content_type", "body", "expected"), [
    ("application/json; charset=utf-8", '{"u": "%username%"}', b'{"u": "a&b \\u00e9"}'),
    ("application/vnd.api+json", '{"u": "%username%"}', b'{"u": "a&b \\u00e9"}'),
    ("application/x-www-form-urlencoded", "u=%username%&k=1", b"u=a%26b+%C3%A9&k=1"),
    ("text/plain", "u=%username%", "u=a&b é".encode()),
])
def test_post_body_context_from_content_type(content_type: str, body: str, expected: bytes) -> None:
    rule = make_rule(method="POST", headers=[("content-type", content_type)], body=body)
    request = compile_rule_request(rule).render(lookup_in({**VALUES, "username": "a&b é"}))
    assert request.headers == (("content-type", content_type),)
    assert request.body == expected


@pytest.mark.parametrize(("content_type", "context"), [
    (None, Context.JSON_BODY),
    ("application/json", Context.JSON_BODY),
    ("Application/JSON ; charset=utf-8", Context.JSON_BODY),
    ("application/problem+json", Context.JSON_BODY),
    ("application/x-www-form-urlencoded", Context.FORM_BODY),
    ("application/x-www-form-urlencoded;charset=UTF-8", Context.FORM_BODY),
    ("text/plain", Context.RAW_BODY),
    ("application/xml", Context.RAW_BODY),
    ("", Context.RAW_BODY),
])
def test_body_context(content_type: str | None, context: Context) -> None:
    assert body_context(content_type) == context


def test_unsafe_header_names_the_header() -> None:
    rule = make_rule(headers=[("X-Lang", "%headers.accept-language%")])
    compiled = compile_rule_request(rule)
    with pytest.raises(UnsafeParameter) as caught:
        compiled.render(lookup_in({**VALUES, "headers.accept-language": "fr\r\nX-Admin: 1"}))
    assert caught.value.header == "X-Lang"
    assert str(caught.value) == (
        "parameter %headers.accept-language% holds CR, LF or NUL, not allowed in header X-Lang"
    )


@pytest.mark.parametrize(("fields", "message"), [
    ({"url": "https://api.example.com/%usrname%"},
     "url: unknown parameter %usrname% — did you mean %username%? (at character 25)"),
    ({"headers": [("X-Id", "%devic_id%")]},
     "header X-Id: unknown parameter %devic_id% — did you mean %device_id%? (at character 1)"),
    ({"method": "POST", "body": '{"u": %username%}'},
     "JSON body: parameter %username% at character 7 must be inside a JSON string"),
    ({"method": "POST", "headers": [("Content-Type", "text/plain")], "body": "5%"},
     "body: '%' at character 2 does not start a parameter"),
])
def test_rule_compile_errors_name_the_part(fields: dict[str, object], message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        compile_rule_request(make_rule(**fields))
    assert str(caught.value).startswith(message)


def test_stored_names_across_the_request() -> None:
    rule = make_rule(
        method="POST",
        url="https://api.example.com/%stored.a%",
        headers=[("X-B", "%stored.b%"), ("X-A", "%stored.a%")],
        body='{"c": "%stored.c%"}',
    )
    assert compile_rule_request(rule).stored_names == ("a", "b", "c")


# --- property: no value changes the structure of the request -------------------------------

HOSTILE = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(list('"\'\\%&=?#/@:;+, \r\n\t\0{}[]<>éß€😀\u2028%2F%%'))),
    st.sampled_from(['"}, "admin": true, "x": "', "\\", "%username%", "a&admin=1", "../../admin",
                     "?x=1#", "\r\nX-Injected: 1", "%2F%2e%2e", "..", ".", "..;a", "．．", "\x85", "\u2029",
                     "\ud7ff\ue000\U0010ffff"]),
)


@given(user=HOSTILE, agent=HOSTILE, lang=HOSTILE)
def test_values_never_change_json_structure(user: str, agent: str, lang: str) -> None:
    template = compile_template(
        '{"user": "%username%", "meta": {"ua": "ua=%user_agent%;", "n": 1},'
        ' "list": ["%headers.accept-language%", null, "%username%%%"]}',
        Context.JSON_BODY,
    )
    rendered = template.render(lookup_in(
        {"username": user, "user_agent": agent, "headers.accept-language": lang}
    ))
    assert rendered.isascii()
    assert json.loads(rendered) == {
        "user": user, "meta": {"ua": f"ua={agent};", "n": 1}, "list": [lang, None, f"{user}%"],
    }


@given(user=HOSTILE, agent=HOSTILE)
def test_values_never_change_form_structure(user: str, agent: str) -> None:
    template = compile_template("user=%username%&ua=%user_agent%&fixed=1", Context.FORM_BODY)
    rendered = template.render(lookup_in({"username": user, "user_agent": agent}))
    assert parse_qsl(rendered, keep_blank_values=True, strict_parsing=True) == [
        ("user", user), ("ua", agent), ("fixed", "1"),
    ]


SLASH_LIKE = str.maketrans(dict.fromkeys("\\\u2215\u2044\u29f8\u29f9\u2216\ufe68\u00a5\u20a9", "/"))


def normalised_path(path: str) -> list[str]:
    """The path's segments as the most eager server or proxy in front of a webhook sees them:
    every escape decoded (``%2F`` included), NFKC-folded, a backslash read as ``/``, ``;``
    path parameters dropped (Tomcat), empty segments merged, dot segments removed (RFC 3986
    §5.2.4)."""
    for _ in range(8):  # a chain of proxies, each decoding once
        path = unquote(path)
    decoded = unicodedata.normalize("NFKC", path).translate(SLASH_LIKE)
    out: list[str] = []
    for segment in decoded.split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return out


@given(user=HOSTILE, ip=HOSTILE, agent=HOSTILE)
def test_values_never_change_url_structure(user: str, ip: str, agent: str) -> None:
    template = compile_template(
        "https://api.example.com:8443/v1/users/%username%/check?ip=%remote_ip%&ua=%user_agent%&k=%2F",
        Context.URL,
    )
    lookup = lookup_in({"username": user, "remote_ip": ip, "user_agent": agent})
    try:
        rendered = template.render(lookup)
    except UnsafeParameter as exc:
        assert str(exc).endswith("not allowed in a URL path segment")
        # Refused only for a reason: a plain name always renders.
        assert not re.fullmatch(r"[A-Za-z0-9 _@+,=é-]*[A-Za-z0-9][A-Za-z0-9 _@+,=.é-]*", user)
        return
    parts = urlsplit(rendered)
    assert (parts.scheme, parts.netloc, parts.fragment) == ("https", "api.example.com:8443", "")
    segments = parts.path.split("/")
    assert len(segments) == 5
    assert segments[:3] == ["", "v1", "users"] and segments[4] == "check"
    assert unquote(segments[3], errors="strict") == user
    # The endpoint a normalising server reaches: the template's, with one opaque segment.
    normalised = normalised_path(parts.path)
    assert len(normalised) == 4
    assert normalised[:2] == ["v1", "users"] and normalised[3] == "check"
    assert not re.search("[\x00-\x1f\x7f-\x9f]", normalised[2])
    query = [pair.split("=") for pair in parts.query.split("&")]
    assert [pair[0] for pair in query] == ["ip", "ua", "k"]
    assert all(len(pair) == 2 for pair in query)
    assert [unquote(v, errors="strict") for _, v in query] == [ip, agent, "/"]
    assert rendered.isascii() and " " not in rendered


@pytest.mark.parametrize("template", [
    "https://hooks.example.com/users/%username%/status",
    "https://hooks.example.com/users/.%username%/status",
    "https://hooks.example.com/users/%username%%device_id%/status",
    "https://hooks.example.com/users/%username%",
    "https://hooks.example.com/users/grp%2F%username%/status",
    "https://hooks.example.com/users/%username%%5Cx/status",
    "https://hooks.example.com/users/%username%\\x/status",
])
@pytest.mark.parametrize("value", ["..", ".", "", "..;x", "%2E%2E", "%252E%252E", "．．", "../status",
                                   "a\\..\\b", "\uff0e\uff0e\uff0fstatus", "x%2Fy", "x%252Fy",
                                   "a\u2215b", "..\x00", "%2E%2E%00"])
def test_a_value_cannot_make_a_dot_or_empty_segment(template: str, value: str) -> None:
    """A denied user named '..' must not reach /status through a normalising proxy."""
    compiled = compile_template(template, Context.URL)
    lookup = lookup_in({"username": value, "device_id": ""})
    try:
        rendered = compiled.render(lookup)
    except UnsafeParameter as exc:
        assert "URL path segment" in str(exc)
        return
    # Rendered only when the segment stays opaque however often it is decoded: "..." is an
    # ordinary name (".%username%" with ".."), so is "...x" (with "%2E%2E" escaped).
    assert ".%username%" in template and value in ("..", "..;x", "．．", "%2E%2E", "%252E%252E")
    normalised = normalised_path(urlsplit(rendered).path)
    assert normalised[0] == "users" and len(normalised) == template.count("/") - 2


def test_parameters_in_the_fragment_are_refused() -> None:
    with pytest.raises(TemplateError, match="fragment"):
        compile_template("https://hooks.example.com/a#%username%", Context.URL)
    # A header name may hold '#': it is not a fragment.
    assert compile_template("https://hooks.example.com/a?x=%headers.a#b%", Context.URL).parameters == (
        "headers.a#b",)


@given(value=HOSTILE)
def test_header_value_is_kept_or_refused(value: str) -> None:
    template = compile_template("Bearer %headers.x-token%", Context.HEADER)
    lookup = lookup_in({"headers.x-token": value})
    # Every control character (Cc: C0, DEL, C1) but HTAB, and the Unicode line separators.
    if any((unicodedata.category(c) == "Cc" and c != "\t") or c in "\u2028\u2029" for c in value):
        with pytest.raises(UnsafeParameter):
            template.render(lookup)
    else:
        assert template.render(lookup) == f"Bearer {value}"


def servers_read(text: str, rounds: int = 4) -> str | None:
    for _ in range(rounds):
        decoded = unquote(text)
        if decoded == text:
            return unicodedata.normalize("NFKC", decoded).translate(SLASH_LIKE)
        text = decoded
    return None


def refused_as_its_own_segment(value: str) -> bool:
    """What a segment that is just the value must not be, read by the most eager servers: the
    value itself holding a slash (or not settling), and the segment as sent (encoded) holding
    a control character, or being empty, a dot segment, or not settling."""
    read = servers_read(value)
    sent = servers_read(quote(value, safe=""))
    return (read is None or "/" in read or sent is None or "/" in sent
            or re.search("[\x00-\x1f\x7f-\x9f]", sent) is not None
            or sent.split(";", 1)[0] in ("", ".", ".."))


@given(value=st.one_of(HOSTILE, st.lists(st.sampled_from(["%25", "%2", "5", "2F", "2E", "%", ".", "a", "\\",
                                                           "\uff0e", "\x00", ";"]), max_size=12).map("".join)))
def test_a_segment_that_is_one_parameter_is_read_once_with_the_same_verdict(value: str) -> None:
    """The value is read once, as the segment it is sent as; what is refused is unchanged."""
    compiled = compile_template("https://h/users/%username%/status", Context.URL)
    try:
        compiled.render(lookup_in({"username": value}))
    except UnsafeParameter as exc:
        assert str(exc).endswith("not allowed in a URL path segment")
        assert refused_as_its_own_segment(value), value
    else:
        assert not refused_as_its_own_segment(value), value

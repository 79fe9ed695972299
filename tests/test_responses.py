"""Verification (JSON, JSONP) and API Response Actions, with the reasons an admin reads."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.decision import Code
from sidecar.rules.model import ResponseAction, Verification
from sidecar.rules.responses import (
    ActionResult,
    KeyMissing,
    ResponseInvalid,
    apply_actions,
    as_text,
    compile_actions,
    evaluate_response,
    parse_response,
    status_failure,
    value_at,
)

JSON = Verification.JSON
JSONP = Verification.JSONP


# --- parsing ----------------------------------------------------------------------------

@pytest.mark.parametrize(("verification", "body", "expected"), [
    (JSON, b'{"a": 1}', {"a": 1}),
    (JSON, b'\xef\xbb\xbf{"a": "\xc3\xa9"}', {"a": "é"}),  # BOM
    (JSON, b' \n[1, 2]\n', [1, 2]),
    (JSON, b'"just a string"', "just a string"),
    (JSON, b"42", 42),
    (JSON, b"null", None),
    (JSONP, b'cb({"a": 1})', {"a": 1}),
    (JSONP, b'cb({"a": 1});', {"a": 1}),
    (JSONP, b'/**/ cb({"a": 1});', {"a": 1}),
    (JSONP, b'/**/cb({"a": 1})', {"a": 1}),
    (JSONP, b'\n  jQuery123_456 ( {"a": [1]} ) ;\n', {"a": [1]}),
    (JSONP, b'window.app.$cb_1({"a": "x)"});', {"a": "x)"}),
    (JSONP, b'\xef\xbb\xbfcb([]);', []),
    (JSONP, b'cb("s")', "s"),
])
def test_parse_response(verification: Verification, body: bytes, expected: Any) -> None:
    assert parse_response(body, verification) == expected


@pytest.mark.parametrize(("verification", "body", "reason"), [
    (JSON, b"", "response is not JSON"),
    (JSON, b"<html>down</html>", "response is not JSON"),
    (JSON, b'{"a": 1', "response is not JSON"),
    (JSON, b'{"a": NaN}', "response is not JSON"),
    (JSON, b'[Infinity]', "response is not JSON"),
    (JSON, b'cb({"a": 1})', "response is not JSON"),
    (JSON, b"\xff\xfe{}", "response is not UTF-8 text"),
    (JSON, b"1" * 5000, "response is not JSON"),  # past int's digit limit
    (JSONP, b'{"a": 1}', "response is not JSONP: no callback(...) around it"),
    (JSONP, b'cb({"a": 1}', "response is not JSONP: no callback(...) around it"),
    (JSONP, b'1cb({"a": 1})', "response is not JSONP: no callback(...) around it"),
    (JSONP, b'cb.({"a": 1})', "response is not JSONP: no callback(...) around it"),
    (JSONP, b'alert(1);cb({"a": 1})', "response is not JSONP: the callback's argument is not JSON"),
    (JSONP, b"cb()", "response is not JSONP: the callback's argument is not JSON"),
    (JSONP, b"cb({a: 1})", "response is not JSONP: the callback's argument is not JSON"),
    (JSONP, b'/* x */ cb({"a": 1})', "response is not JSONP: no callback(...) around it"),
])
def test_parse_response_invalid(verification: Verification, body: bytes, reason: str) -> None:
    with pytest.raises(ResponseInvalid) as caught:
        parse_response(body, verification)
    assert str(caught.value) == reason


@pytest.mark.parametrize("verification", [JSON, JSONP])
@pytest.mark.parametrize("opening", [b"[", b'{"a":'])
def test_deep_nesting_is_invalid_not_a_crash(verification: Verification, opening: bytes) -> None:
    depth = 100_000
    closing = b"]" if opening == b"[" else b"}"
    body = opening * depth + b"1" + closing * depth
    if verification is JSONP:
        body = b"cb(" + body + b")"
    with pytest.raises(ResponseInvalid, match=r"^response is nested too deeply$"):
        parse_response(body, verification)


# --- keys and values -----------------------------------------------------------------------

DOCUMENT = {
    "data": {"user": {"status": "active", "age": 42, "vip": True, "note": None}},
    "items": [{"id": "i-0"}, {"id": "i-1", "tags": ["a", "b"]}],
    "0": "zero",
    "dotted.key": "unreachable",
}


@pytest.mark.parametrize(("key", "expected"), [
    ("data.user.status", "active"),
    ("data.user.age", 42),
    ("data.user.note", None),
    ("data.user", DOCUMENT["data"]["user"]),
    ("items.0.id", "i-0"),
    ("items.1.tags.1", "b"),
    ("0", "zero"),  # a numeric segment on an object is a key
])
def test_value_at(key: str, expected: Any) -> None:
    assert value_at(DOCUMENT, key) == expected


@pytest.mark.parametrize("key", [
    "data.user.missing", "data.user.status.deeper", "items.2.id", "items.-1.id", "items.x",
    "items.01x", "items.１", "dotted.key", "data..user", "nope",
])
def test_value_at_missing(key: str) -> None:
    with pytest.raises(KeyMissing) as caught:
        value_at(DOCUMENT, key)
    assert str(caught.value) == f"key {key} missing from the response"


@pytest.mark.parametrize("document", ["text", 42, None, True])
def test_value_at_scalar_document(document: Any) -> None:
    with pytest.raises(KeyMissing):
        value_at(document, "a")


@pytest.mark.parametrize(("body", "expected"), [
    (b'"active"', "active"),
    (b'""', ""),
    (b"true", "true"),
    (b"false", "false"),
    (b"null", "null"),
    (b"42", "42"),
    (b"-7", "-7"),
    (b"1.5", "1.5"),
    (b"1.50", "1.50"),  # as the response spells it
    (b"1e2", "1E+2"),  # with an exponent: decimal form
    (b"1.5e-3", "0.0015"),
    (b"-0.0", "-0.0"),
    (b"0.00000001", "0.00000001"),
    (b"1e-999999999", "1E-999999999"),  # never expanded to its zeros
    (b'{"a": [1.50, 2e1]}', '{"a":[1.5,20.0]}'),
    (b'{"a": [1, true, null], "b": "\xc3\xa9"}', '{"a":[1,true,null],"b":"é"}'),
    (b"[]", "[]"),
])
def test_as_text_of_parsed_values(body: bytes, expected: str) -> None:
    assert as_text(parse_response(body, JSON)) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("x", "x"), (True, "true"), (False, "false"), (None, "null"), (3, "3"), (1.5, "1.5"),
    ({"k": [1, "v"]}, '{"k":[1,"v"]}'),
])
def test_as_text_of_python_values(value: Any, expected: str) -> None:
    assert as_text(value) == expected


# --- actions ------------------------------------------------------------------------------

def action(type_: str, key: str, value: str) -> ResponseAction:
    return ResponseAction(type=type_, key=key, value=value)


RESPONSE = {
    "data": {"status": "inactive", "role": "guest", "score": 7, "ok": True,
             "profile": {"email": "a@example.com"}, "token": "tk-1",
             "long": "x" * 100, "multiline": "line1\r\nX-Injected: 1"},
    "items": [{"id": "dev-9"}],
}


@pytest.mark.parametrize(("actions", "stored"), [
    ([], {}),
    ([action("string", "data.status", "inactive")], {}),
    ([action("string", "data.score", "7"), action("string", "data.ok", "true")], {}),
    ([action("regex", "data.role", "^gu")], {}),
    ([action("regex", "data.profile.email", r"@example\.com$")], {}),
    ([action("regex", "data.role", "ues")], {}),  # search, not match
    ([action("regex", "data.score", r"^\d+$")], {}),
    ([action("store", "data.token", "token"), action("store", "items.0.id", "device")],
     {"token": "tk-1", "device": "dev-9"}),
    ([action("store", "data.profile", "profile")], {"profile": '{"email":"a@example.com"}'}),
    ([action("string", "data.role", "guest"), action("store", "data.score", "score")], {"score": "7"}),
])
def test_actions_pass(actions: list[ResponseAction], stored: dict[str, str]) -> None:
    assert apply_actions("device-posture", actions, RESPONSE) == ActionResult(None, stored)


@pytest.mark.parametrize(("actions", "code", "reason"), [
    ([action("string", "data.status", "active")], Code.VALUE_MISMATCH,
     'rule "device-posture": data.status is "inactive", expected "active"'),
    ([action("string", "data.score", "8")], Code.VALUE_MISMATCH,
     'rule "device-posture": data.score is 7, expected "8"'),
    ([action("string", "data.ok", "True")], Code.VALUE_MISMATCH,
     'rule "device-posture": data.ok is true, expected "True"'),
    ([action("string", "data.profile", "x")], Code.VALUE_MISMATCH,
     'rule "device-posture": data.profile is {"email":"a@example.com"}, expected "x"'),
    ([action("regex", "data.role", "^admin$")], Code.REGEX_MISMATCH,
     'rule "device-posture": data.role "guest" does not match /^admin$/'),
    ([action("regex", "data.score", "^[89]$")], Code.REGEX_MISMATCH,
     'rule "device-posture": data.score 7 does not match /^[89]$/'),
    ([action("string", "data.user.status", "active")], Code.KEY_MISSING,
     'rule "device-posture": key data.user.status missing from the response'),
    ([action("regex", "items.1.id", ".")], Code.KEY_MISSING,
     'rule "device-posture": key items.1.id missing from the response'),
    ([action("store", "data.nothing", "x")], Code.KEY_MISSING,
     'rule "device-posture": key data.nothing missing from the response'),
    # Values are cut at 60 characters and never carry a raw CR or LF.
    ([action("string", "data.long", "short")], Code.VALUE_MISMATCH,
     f'rule "device-posture": data.long is "{"x" * 60}...", expected "short"'),
    ([action("string", "data.multiline", "x")], Code.VALUE_MISMATCH,
     'rule "device-posture": data.multiline is "line1\\r\\nX-Injected: 1", expected "x"'),
    # The first failing action, in order, is the one reported; nothing is stored.
    ([action("store", "data.token", "token"), action("string", "data.role", "admin"),
      action("string", "data.missing", "x")], Code.VALUE_MISMATCH,
     'rule "device-posture": data.role is "guest", expected "admin"'),
])
def test_actions_fail(actions: list[ResponseAction], code: Code, reason: str) -> None:
    # The failing action is the only one, or the middle one of the last case.
    failed = 0 if len(actions) == 1 else 1
    assert apply_actions("device-posture", actions, RESPONSE) == ActionResult((code, reason), {}, failed)


def test_actions_on_a_scalar_document_fail_with_key_missing() -> None:
    result = apply_actions("r", [action("string", "data.status", "ok")], "ok")
    assert result.failure == (Code.KEY_MISSING, 'rule "r": key data.status missing from the response')
    assert not result.passed


def test_compiled_actions() -> None:
    compiled = compile_actions([
        action("regex", "data.role", "^(guest|user)$"),
        action("store", "data.token", "token"),
        action("store", "data.role", "role"),
    ])
    assert compiled.stored_names == ("token", "role")
    result = compiled.apply("r", RESPONSE)
    assert result.passed
    assert result.stored == {"token": "tk-1", "role": "guest"}
    assert apply_actions("r", compiled, RESPONSE) == result


def test_regex_size_adds_up_every_regex() -> None:
    """Each regex matches its own value, which may be the whole answer: the cost of judging is
    the sum of their programs, which decides whether an answer is judged on the event loop."""
    one = compile_actions([action("regex", "a", "[ab]{1000}[ab]{1000}c")]).regex_size
    assert one > 2000
    both = compile_actions([action("regex", "a", "[ab]{1000}[ab]{1000}c"), action("store", "b", "b"),
                            action("regex", "b", "[ab]{1000}[ab]{1000}c")])
    assert both.regex_size == 2 * one
    assert compile_actions([action("string", "a", "x")]).regex_size == 0


# --- status and the whole judgement ----------------------------------------------------------

@pytest.mark.parametrize(("status", "expected"), [
    (200, None),
    (204, None),
    (299, None),
    (301, (Code.WEBHOOK_STATUS, 'rule "r": webhook answered HTTP 301, expected 2xx')),
    (401, (Code.WEBHOOK_STATUS, 'rule "r": webhook answered HTTP 401, expected 2xx')),
    (503, (Code.WEBHOOK_STATUS, 'rule "r": webhook answered HTTP 503, expected 2xx')),
])
def test_status_failure(status: int, expected: tuple[Code, str] | None) -> None:
    assert status_failure("r", status) == expected


@pytest.mark.parametrize(("status", "body", "verification", "expected"), [
    (200, b'cb({"data": {"status": "active", "id": 5}});', JSONP,
     ActionResult(None, {"id": "5"})),
    (200, b'{"data": {"status": "inactive", "id": 5}}', JSON,
     ActionResult((Code.VALUE_MISMATCH, 'rule "posture": data.status is "inactive", expected "active"'),
                  failed_action=0)),
    (500, b'{"data": {"status": "active", "id": 5}}', JSON,
     ActionResult((Code.WEBHOOK_STATUS, 'rule "posture": webhook answered HTTP 500, expected 2xx'))),
    (200, b"<html/>", JSON,
     ActionResult((Code.RESPONSE_INVALID, 'rule "posture": response is not JSON'))),
    (200, b'{"data": {}}', JSONP,
     ActionResult((Code.RESPONSE_INVALID,
                   'rule "posture": response is not JSONP: no callback(...) around it'))),
    (200, b'{"data": {"id": 5}}', JSON,
     ActionResult((Code.KEY_MISSING, 'rule "posture": key data.status missing from the response'),
                  failed_action=0)),
])
def test_evaluate_response(status: int, body: bytes, verification: Verification,
                           expected: ActionResult) -> None:
    actions = compile_actions([action("string", "data.status", "active"), action("store", "data.id", "id")])
    assert evaluate_response("posture", status, body, verification, actions) == expected

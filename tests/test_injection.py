"""Injection: client-controlled values against the structure of webhook requests and the
denial header, as properties over arbitrary text (hypothesis), through the real sidecar.

The webhook is ``RawServer`` (tests/test_faults_webhook.py): it records the request head
byte for byte, so what is asserted is what went on the wire, not what a lenient HTTP parser
made of it. One sidecar serves all the examples of a test (fixtures are per test function).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from sidecar.db import connect, delete_policy, delete_rule, transaction
from sidecar.decision import Code, Decision
from sidecar.edge import (
    MAX_REASON_LENGTH,
    MAX_REQUEST_ID_LENGTH,
    REASON_HEADER,
    build_response,
    read_request,
    sanitize_reason,
)
from sidecar.policies import Policy
from sidecar.rules.model import Rule
from sidecar.rules.unsafe import MAX_PATH_VALUE
from tests.conftest import ACTIVE, check_request, denial_reason, seed
from tests.helpers import OK, PERMISSION_DENIED, eventually
from tests.webhook_servers import RawRequest, RawServer, action, respond

# Pieces that mean something somewhere: HTTP (CR, LF, NUL, ":"), URLs ("/", "?", "#", "&",
# "=", "%XX", "@"), JSON ('"', "\\", "\\u0000"), form bodies ("+"), templates ("%name%",
# "%%"), Python formatting ("{}"), and text that is not ASCII or not printable.
SPECIAL = st.sampled_from([
    "\r\n", "\n", "\r", "\0", "\r\nX-Injected: 1", "\t", " ", ":", '"', "'", "\\", "\\u0000",
    "%", "%%", "%0d%0a", "%2F", "%username%", "%headers.x-v%", "{}", "{0}", "%s", "/", "../",
    "?", "#", "&", "=", "&fixed=2", "@evil.example", "+", ";", ",", "é", "\u2028", "\u2029", "\x85", "\x9f",
    "..", ".", "..;", "．．", "\u202e",
    "😀", "\x7f", "\x01", "\x1b[31m", "\ufeff", "</script>", "null", "]}", '","x":"',
])
VALUE = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.lists(st.one_of(SPECIAL, st.text(max_size=4)), max_size=12).map("".join),
    # Very long: a piece repeated thousands of times (cheap to generate, tens of KiB).
    st.builds(lambda piece, times: piece * times, SPECIAL, st.integers(1000, 6000)),
)
# Control characters (Cc) but HTAB, and the Unicode line and paragraph separators.
UNSAFE_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
LINE_BREAKING = re.compile("[\r\n\0]")
SEPARATOR = re.compile("[\x85\u2028\u2029]")


SLASH_LIKE = str.maketrans(dict.fromkeys("\\\u2215\u2044\u29f8\u29f9\u2216\ufe68\u00a5\u20a9", "/"))


def unsafe_in_path(value: str) -> bool:
    """A value that would not stay one opaque path segment for a normalising server, however
    many times it decodes the path (at most 4 layers are believed), or too long to read so."""
    if len(value) > MAX_PATH_VALUE:
        return True
    for _ in range(4):
        if unquote(value) == value:
            break
        value = unquote(value)
    else:
        return True
    read = unicodedata.normalize("NFKC", value).translate(SLASH_LIKE)
    return ("/" in read or re.search("[\x00-\x1f\x7f-\x9f]", read) is not None
            or read.split(";", 1)[0] in ("", ".", ".."))
# Through a sidecar, every example costs real checks: no shrinking, which could run for
# minutes and swallows the per-test timeout (a failure reports the example as generated).
HYPOTHESIS = settings(deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])


def printable_ascii_line(text: str) -> bool:
    return bool(re.fullmatch(r"[\x20-\x7e]+", text))


def assert_header_safe(response: Any) -> str:
    """The denial as Envoy gets it: one printable-ASCII line of at most 256 characters, the
    same in the header, the JSON body and the gRPC status message."""
    assert response.status.code == PERMISSION_DENIED
    reason = denial_reason(response)
    assert reason is not None
    assert printable_ascii_line(reason) and len(reason) <= MAX_REASON_LENGTH
    body = json.loads(response.denied_response.body)
    assert body["reason"] == reason
    assert response.status.message == f"{body['code']}: {reason}"
    assert [h.header.key for h in response.denied_response.headers].count(REASON_HEADER) == 1
    return reason


async def wait_for_policy(stub: Any, path: str) -> None:
    """Until the sidecar has loaded the policy at ``path`` (it reloads every 50 ms)."""
    async def loaded() -> bool:
        response = await stub.Check(check_request(path))
        return json.loads(response.denied_response.body or b"{}").get("code") != "no_matching_policy"

    await eventually(loaded, what=f"the policy at {path} loaded")


# --- the webhook request ------------------------------------------------------------------

JSON_BODY = ('{"v": "%headers.x-v%", "u": "%username%", "nested": {"a": "%user_agent%", "n": 1},'
             ' "list": ["%headers.x-v%", "fixed"]}')
FORM_BODY = "user=%username%&agent=%user_agent%&v=%headers.x-v%&fixed=1"
TARGET = re.compile(r"/hook/(?P<v>[^/?#]*)/tail\?u=(?P<u>[^&#]*)&a=(?P<a>[^&#]*)&fixed=1")


def decoded(escaped: str) -> str:
    """A percent-encoded URL part as text: every byte escaped or unreserved, UTF-8."""
    assert re.fullmatch(r"(?:[A-Za-z0-9_.~-]|%[0-9A-F]{2})*", escaped), escaped
    return unquote(escaped, errors="strict")


@settings(HYPOTHESIS, max_examples=75)
@given(v=VALUE, username=VALUE, agent=VALUE)
async def test_client_values_cannot_change_a_webhook_request(
        v: str, username: str, agent: str, db: Path, start_sidecar: Any, authz: Any,
        raw: RawServer) -> None:
    """URL: path segments and query keys fixed, the host too; headers: the same names every
    time, the values byte for byte, or no request at all (``unsafe_parameter``); JSON and
    form bodies: the same keys, the values as sent."""
    if not hasattr(raw, "stub"):  # the first example starts the sidecar; the others reuse it
        raw.fallback = respond(200, b'{"ok": "1"}')
        ok = (action("string", "ok", "1"),)
        rules = [
            Rule(name="json-rule", method="POST",
                 url=raw.url + "/hook/%headers.x-v%/tail?u=%username%&a=%user_agent%&fixed=1",
                 headers=(("X-User", "%username%"), ("X-Agent", "%user_agent%"),
                          ("X-Static", "static")),
                 body=JSON_BODY, actions=ok),
            Rule(name="form-rule", method="POST", url=raw.url + "/form?v=%headers.x-v%",
                 headers=(("Content-Type", "application/x-www-form-urlencoded"),),
                 body=FORM_BODY, actions=ok),
        ]
        seed(db, rules, [Policy(name="json", path_prefix="/json", rules=("json-rule",)),
                         Policy(name="form", path_prefix="/form", rules=("form-rule",))])
        raw.stub = authz((await start_sidecar()).port)  # type: ignore[attr-defined]
        await raw.stub.Check(check_request("/json", headers={"x-v": "a", "x-safous-username": "b",
                                                             "user-agent": "c"}))
        [baseline] = raw.requests
        raw.baseline = [name for name, _ in baseline.headers]  # type: ignore[attr-defined]
    stub = raw.stub  # type: ignore[attr-defined]
    raw.requests.clear()
    values = {"x-v": v, "x-safous-username": username, "user-agent": agent}

    json_response, form_response = await asyncio.gather(
        stub.Check(check_request("/json", headers=values)),
        stub.Check(check_request("/form", headers=values)))

    # JSON rule: its headers carry username and agent.
    sent = [r for r in raw.requests if r.path.startswith("/hook/")]
    unsafe = next((p for p, val in (("username", username), ("user_agent", agent))
                   if UNSAFE_IN_HEADER.search(val)), None)
    if unsafe is not None:
        header, value = {"username": ("X-User", username), "user_agent": ("X-Agent", agent)}[unsafe]
        what = ("CR, LF or NUL" if LINE_BREAKING.search(value)
                else "a line separator" if SEPARATOR.search(value) else "a control character")
        reason = assert_header_safe(json_response)
        assert json.loads(json_response.denied_response.body)["code"] == "unsafe_parameter"
        assert reason == (f'rule "json-rule": parameter %{unsafe}% holds {what}, '
                          f"not allowed in header {header}")
        assert sent == []
    elif unsafe_in_path(v):
        reason = assert_header_safe(json_response)
        assert json.loads(json_response.denied_response.body)["code"] == "unsafe_parameter"
        assert reason.startswith('rule "json-rule": parameter %headers.x-v% holds ')
        assert reason.endswith("not allowed in a URL path segment"), reason
        assert sent == []
    else:
        assert json_response.status.code == OK
        [request] = sent
        assert request.method == "POST"
        target = TARGET.fullmatch(request.target)
        assert target is not None, request.target
        assert (decoded(target["v"]), decoded(target["u"]), decoded(target["a"])) == (
            v, username, agent)
        assert [name for name, _ in request.headers] == raw.baseline  # type: ignore[attr-defined]
        assert request.values("host") == [raw.url.removeprefix("http://").encode()]
        assert request.values("x-user") == [username.encode()]
        assert request.values("x-agent") == [agent.encode()]
        assert request.values("x-static") == [b"static"]
        assert request.body.isascii()
        assert json.loads(request.body) == {"v": v, "u": username, "nested": {"a": agent, "n": 1},
                                            "list": [v, "fixed"]}

    # Form rule: no client value in a header, so it always runs.
    assert form_response.status.code == OK
    [form] = [r for r in raw.requests if r.path == "/form"]
    assert form.target.startswith("/form?v=")
    assert decoded(form.target.removeprefix("/form?v=")) == v
    assert form.values("content-type") == [b"application/x-www-form-urlencoded"]
    assert form.body.isascii()
    assert parse_qsl(form.body.decode(), keep_blank_values=True, strict_parsing=True) == [
        ("user", username), ("agent", agent), ("v", v), ("fixed", "1")]


# --- the denial header --------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | VALUE,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(VALUE, inner, max_size=4),
    max_leaves=12,
)


@settings(HYPOTHESIS, max_examples=60)
@given(v=VALUE, document=JSON_VALUES)
async def test_a_reason_quoting_a_webhook_value_reaches_envoy_as_one_safe_line(
        v: str, document: Any, db: Path, start_sidecar: Any, authz: Any, raw: RawServer) -> None:
    """The webhook answers with a value the client chose (it echoes ``x-v``) or with any JSON
    value; a ``value_mismatch`` reason quotes it. Whatever it holds, Envoy gets one line of
    printable ASCII, at most 256 characters, and a value that is already such a line is
    quoted as it is."""
    assume(v != "active" and document != "active")
    if not hasattr(raw, "stub"):
        async def echo(request: RawRequest, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
            value = json.loads(request.body)["v"]
            await respond(200, json.dumps({"status": value}).encode())(request, reader, writer)

        async def serve_document(request: RawRequest, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
            body = json.dumps({"status": raw.document}).encode()  # type: ignore[attr-defined]
            await respond(200, body)(request, reader, writer)

        raw.routes["/echo"] = echo
        raw.routes["/document"] = serve_document
        rules = [Rule(name="echo", method="POST", url=raw.url + "/echo",
                      body='{"v": "%headers.x-v%"}', actions=ACTIVE),
                 Rule(name="document", url=raw.url + "/document", actions=ACTIVE)]
        seed(db, rules, [Policy(name="echo", path_prefix="/echo", rules=("echo",)),
                         Policy(name="document", path_prefix="/document", rules=("document",))])
        raw.stub = authz((await start_sidecar()).port)  # type: ignore[attr-defined]
    stub = raw.stub  # type: ignore[attr-defined]
    raw.document = document  # type: ignore[attr-defined]

    echoed, judged = await asyncio.gather(
        stub.Check(check_request("/echo", headers={"x-v": v})),
        stub.Check(check_request("/document")))

    reason = assert_header_safe(echoed)
    assert json.loads(echoed.denied_response.body)["code"] == "value_mismatch"
    if printable_ascii_line(v) and len(v) <= 60 and not set(v) & {'"', "\\"}:
        assert reason == f'rule "echo": status is "{v}", expected "active"'
    else:
        assert reason.startswith('rule "echo": status is "')
    reason = assert_header_safe(judged)
    assert json.loads(judged.denied_response.body)["code"] == "value_mismatch"
    assert reason.startswith('rule "document": status is ')


NAME = st.one_of(VALUE.map(lambda s: s[:120] or "x"),
                 st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=100,
                         max_size=120))


@settings(HYPOTHESIS, max_examples=8)
@given(names=st.lists(NAME, min_size=10, max_size=10, unique=True))
async def test_rule_names_reach_envoy_as_one_safe_line(
        names: list[str], db: Path, start_sidecar: Any, authz: Any, raw: RawServer,
        refused_port: int) -> None:
    """Rule names are free text (up to 128 characters) and every rule reason names its rule.
    Ten rules per example, written to rules.db together and picked up by one reload: half
    judged (``value_mismatch``, the name JSON-quoted), half unreachable (the name as is)."""
    if not hasattr(raw, "stub"):
        raw.routes["/blocked"] = respond(200, b'{"status": "blocked"}')
        raw.stub = authz((await start_sidecar()).port)  # type: ignore[attr-defined]
        raw.batch = 0  # type: ignore[attr-defined]
        raw.previous = []  # type: ignore[attr-defined]
    stub = raw.stub  # type: ignore[attr-defined]
    raw.batch += 1  # type: ignore[attr-defined]
    batch = raw.batch  # type: ignore[attr-defined]
    # The previous batch goes (rules.db stays small); names are unique across batches too.
    conn = connect(db)
    try:
        with transaction(conn, immediate=True):
            for i, name in enumerate(raw.previous):  # type: ignore[attr-defined]
                delete_policy(conn, f"p{batch - 1}-{i}")
                delete_rule(conn, name)
    finally:
        conn.close()
    names = raw.previous = [f"{name}#{batch}" for name in names]  # type: ignore[attr-defined]
    refused_url = f"http://127.0.0.1:{refused_port}/x"
    rules = [Rule(name=name, url=raw.url + "/blocked" if i % 2 == 0 else refused_url,
                  actions=ACTIVE) for i, name in enumerate(names)]
    seed(db, rules, [Policy(name=f"p{batch}-{i}", path_prefix=f"/b{batch}/{i}", rules=(name,))
                     for i, name in enumerate(names)])
    await wait_for_policy(stub, f"/b{batch}/{len(names) - 1}")

    responses = await asyncio.gather(*(stub.Check(check_request(f"/b{batch}/{i}"))
                                       for i in range(len(names))))

    for i, (name, response) in enumerate(zip(names, responses, strict=True)):
        reason = assert_header_safe(response)
        code = json.loads(response.denied_response.body)["code"]
        if i % 2 == 0:
            assert code == "value_mismatch"
            expected = f'rule "{name}": status is "blocked", expected "active"'
            readable = printable_ascii_line(name) and not set(name) & {'"', "\\"}
        else:
            assert code == "webhook_unreachable"
            expected = f'rule "{name}": webhook unreachable: connection refused'
            readable = printable_ascii_line(name)
        if readable and len(expected) <= MAX_REASON_LENGTH:
            assert reason == expected
        else:
            assert reason.startswith('rule "')


# --- the edge, pure -----------------------------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(reason=st.one_of(VALUE, st.text()), code=st.sampled_from(list(Code)))
def test_any_reason_becomes_one_safe_header_line(reason: str, code: Code) -> None:
    response = build_response(Decision.deny(code, reason), "req-1")
    header = assert_header_safe(response)
    assert header == sanitize_reason(reason) == sanitize_reason(header)  # idempotent
    if printable_ascii_line(reason) and reason == reason.strip() and len(reason) <= MAX_REASON_LENGTH:
        assert header == reason  # a reason already fit for a header is kept whole
    elif len(header) == MAX_REASON_LENGTH:
        assert header.endswith("...")


# --- the request id -----------------------------------------------------------------------

FRESH_ID = re.compile("[0-9a-f]{32}")


@settings(max_examples=300, deadline=None)
@given(request_id=st.one_of(VALUE, st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                                            min_size=MAX_REQUEST_ID_LENGTH - 2,
                                            max_size=MAX_REQUEST_ID_LENGTH + 2)))
def test_a_request_id_is_kept_only_as_a_short_printable_ascii_line(request_id: str) -> None:
    """Envoy keeps an internal client's x-request-id: whatever it sent, the id the sidecar
    puts into dynamic metadata, the 403 body and the activity log is at most 128 characters
    of printable ASCII: the client's when it is such, else a fresh one."""
    attrs = read_request(check_request("/x", headers={"x-request-id": request_id}))
    if not request_id:
        assert attrs.request_id == "1234"  # Envoy's stream id (check_request's http.id)
    elif len(request_id) <= MAX_REQUEST_ID_LENGTH and printable_ascii_line(request_id):
        assert attrs.request_id == request_id
    else:
        assert FRESH_ID.fullmatch(attrs.request_id), attrs.request_id
        assert read_request(check_request("/x", headers={"x-request-id": request_id})).request_id != (
            attrs.request_id)
    response = build_response(Decision.deny(Code.NO_MATCHING_POLICY, "no"), attrs.request_id)
    assert json.loads(response.denied_response.body)["request_id"] == attrs.request_id
    assert response.dynamic_metadata.fields["request_id"].string_value == attrs.request_id


async def test_a_long_request_id_does_not_reach_the_403_body_or_the_activity_log(
        db: Path, start_sidecar: Any, authz: Any) -> None:
    sidecar = await start_sidecar()
    stub = authz(sidecar.port)
    sent = ["a" * 40_000, "id\r\nx-injected: 1", "id-é", "a" * MAX_REQUEST_ID_LENGTH]
    responses = [await stub.Check(check_request("/x", headers={"x-request-id": rid})) for rid in sent]
    ids = [json.loads(r.denied_response.body)["request_id"] for r in responses]
    assert [r.dynamic_metadata.fields["request_id"].string_value for r in responses] == ids
    assert all(FRESH_ID.fullmatch(rid) for rid in ids[:3]) and len(set(ids[:3])) == 3
    assert ids[3] == sent[3]  # the longest the client may choose
    await sidecar.stop(grace=1)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        recorded = [row[0] for row in conn.execute("SELECT request_id FROM activity_log ORDER BY id")]
    assert recorded == ids

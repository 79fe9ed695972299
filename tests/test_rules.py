"""Rules (Custom) through the real sidecar (gRPC on port 0) against real webhooks on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sidecar.policies import Policy
from sidecar.rules.model import ActionType, AuthType, ResponseAction, Rule
from tests.conftest import answer, check_request, denial_reason, seed
from tests.helpers import OK, PERMISSION_DENIED, code_of, eventually


def action(kind: str, key: str, value: str) -> ResponseAction:
    return ResponseAction(type=ActionType(kind), key=key, value=value)


async def start(db, start_sidecar, authz, rules, **policy):
    seed(db, rules, [Policy(name="app", rules=tuple(r.name for r in rules), **policy)])
    sidecar = await start_sidecar()
    return sidecar, authz(sidecar.port)


async def test_get_rule_sends_parameters_in_url_and_headers(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/posture"] = answer({"data": {"status": "active"}})
    rule = Rule(name="posture", method="GET",
                url=webhook.url + "/posture?user=%username%&ip=%remote_ip%&lang=%headers.Accept-Language%",
                headers=(("X-Device", "%device_id%"), ("X-Static", "v1"), ("X-Agent", "%user_agent%")),
                actions=(action("string", "data.status", "active"),))
    _, stub = await start(db, start_sidecar, authz, [rule])
    response = await stub.Check(check_request("/", headers={
        "x-safous-username": "alice smith&admin=1", "x-safous-device-id": "dev-7",
        "accept-language": "fr/CH", "user-agent": "curl/8"}))
    assert response.status.code == OK
    (seen,) = webhook.requests
    assert seen["method"] == "GET"
    assert seen["path"] == "/posture?user=alice%20smith%26admin%3D1&ip=203.0.113.7&lang=fr%2FCH"
    assert seen["headers"]["x-device"] == "dev-7"
    assert seen["headers"]["x-static"] == "v1"
    assert seen["headers"]["x-agent"] == "curl/8"


async def test_post_rule_sends_a_json_body(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/check"] = answer({"allowed": True, "score": 0.5})
    rule = Rule(name="risk", method="POST", url=webhook.url + "/check",
                body='{"user": "%username%", "groups": "%groups%", "addr": "%internal_addr%"}',
                actions=(action("string", "allowed", "true"), action("regex", "score", r"^0\.[0-5]")))
    _, stub = await start(db, start_sidecar, authz, [rule])
    response = await stub.Check(check_request("/", headers={
        "x-safous-username": 'bob "the" \\admin', "x-safous-groups": "g1,g2"}))
    assert response.status.code == OK
    (seen,) = webhook.requests
    assert seen["method"] == "POST"
    assert seen["headers"]["content-type"] == "application/json"
    assert json.loads(seen["body"]) == {"user": 'bob "the" \\admin', "groups": "g1,g2", "addr": "10.0.0.5:8080"}


async def test_form_body(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/form"] = answer({"ok": "yes"})
    rule = Rule(name="form", method="POST", url=webhook.url + "/form",
                headers=(("Content-Type", "application/x-www-form-urlencoded"),),
                body="user=%username%&ip=%remote_ip%", actions=(action("string", "ok", "yes"),))
    _, stub = await start(db, start_sidecar, authz, [rule])
    assert (await stub.Check(check_request("/", headers={"x-safous-username": "a&b=c d"}))).status.code == OK
    assert webhook.requests[0]["body"] == b"user=a%26b%3Dc+d&ip=203.0.113.7"


async def test_criteria_not_met_denies_with_the_rule_and_criterion(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/posture"] = answer({"data": {"status": "inactive"}})
    rule = Rule(name="device-posture", url=webhook.url + "/posture",
                actions=(action("string", "data.status", "active"),))
    _, stub = await start(db, start_sidecar, authz, [rule])
    response = await stub.Check(check_request("/"))
    assert response.status.code == PERMISSION_DENIED
    assert code_of(response) == "value_mismatch"
    assert denial_reason(response) == 'rule "device-posture": data.status is "inactive", expected "active"'


async def test_jsonp_and_store_reach_the_upstream_headers(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/who"] = answer({"user": {"tier": "gold", "id": 42}}, jsonp="cb")
    rule = Rule(name="who", url=webhook.url + "/who", verification="jsonp",
                actions=(action("store", "user.tier", "tier"), action("store", "user.id", "uid"),
                         action("regex", "user.tier", "^(gold|silver)$")))
    _, stub = await start(db, start_sidecar, authz, [rule])
    response = await stub.Check(check_request("/"))
    assert response.status.code == OK
    headers = {h.header.key: h.header.value for h in response.ok_response.headers}
    assert headers == {"x-safous-tier": "gold", "x-safous-uid": "42"}


async def test_stored_values_feed_later_rules(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/token"] = answer({"session": "s-123"}, delay=0.05)
    webhook.routes["/use"] = answer({"ok": "1"})
    first = Rule(name="get-session", url=webhook.url + "/token", actions=(action("store", "session", "session"),))
    second = Rule(name="use-session", url=webhook.url + "/use?s=%stored.session%",
                  headers=(("X-Session", "%stored.session%"),), actions=(action("string", "ok", "1"),))
    _, stub = await start(db, start_sidecar, authz, [first, second])
    assert (await stub.Check(check_request("/"))).status.code == OK
    (use,) = webhook.seen("/use")
    assert use["path"] == "/use?s=s-123" and use["headers"]["x-session"] == "s-123"


async def test_a_stored_value_no_earlier_rule_provides_is_invalid(db, start_sidecar, authz, webhook) -> None:
    uses = Rule(name="uses", url=webhook.url + "/x?s=%stored.missing%")
    _, stub = await start(db, start_sidecar, authz, [uses])
    response = await stub.Check(check_request("/"))
    assert code_of(response) == "rule_invalid"
    assert "%stored.missing%" in denial_reason(response)
    assert webhook.requests == []


async def test_rules_run_concurrently(db, start_sidecar, authz, webhook) -> None:
    all_called = asyncio.Event()

    async def meet(request: web.Request) -> web.Response:
        # Answers once the three rules have all called: rules run one after the other would
        # leave the first waiting here until its timeout.
        if len(webhook.seen("/meet")) == 3:
            all_called.set()
        await asyncio.wait_for(all_called.wait(), 5)
        return web.json_response({"ok": "1"})

    webhook.routes["/meet"] = meet
    rules = [Rule(name=f"r{i}", url=webhook.url + "/meet", timeout_ms=2000, actions=(action("string", "ok", "1"),))
             for i in range(3)]
    _, stub = await start(db, start_sidecar, authz, rules)
    response = await stub.Check(check_request("/"))
    assert response.status.code == OK, denial_reason(response)
    assert len(webhook.requests) == 3


async def test_first_failing_rule_in_policy_order_is_reported(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/slow-no"] = answer({"ok": "0"}, delay=0.3)  # fails last, reported first
    webhook.routes["/fast-no"] = answer({"ok": "0"})
    rules = [Rule(name="first", url=webhook.url + "/slow-no", actions=(action("string", "ok", "1"),)),
             Rule(name="second", url=webhook.url + "/fast-no", actions=(action("string", "ok", "1"),))]
    _, stub = await start(db, start_sidecar, authz, rules)
    response = await stub.Check(check_request("/"))
    assert denial_reason(response).startswith('rule "first"')


async def test_remaining_calls_are_cancelled_once_the_decision_is_known(db, start_sidecar, authz, webhook) -> None:
    cancelled = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        # aiohttp does not cancel handlers on disconnect: watch the connection instead.
        def dropped() -> bool:
            return request.transport is None or request.transport.is_closing()

        await eventually(dropped, timeout=30, what="the sidecar dropping the call")
        cancelled.set()
        return web.json_response({})

    webhook.routes["/no"] = answer({"ok": "0"})
    webhook.routes["/hang"] = hang
    rules = [Rule(name="fails", url=webhook.url + "/no", actions=(action("string", "ok", "1"),)),
             Rule(name="hangs", url=webhook.url + "/hang", timeout_ms=30_000)]
    _, stub = await start(db, start_sidecar, authz, rules)
    response = await asyncio.wait_for(stub.Check(check_request("/")), 5)
    assert denial_reason(response).startswith('rule "fails"')
    await asyncio.wait_for(cancelled.wait(), 5)


@pytest.mark.parametrize(
    ("handler_payload", "rule_update", "code", "reason"),
    [
        ({"status": 503}, {}, "webhook_status", 'rule "r": webhook answered HTTP 503, expected 2xx'),
        ({"raw": b"<html>"}, {}, "response_invalid", 'rule "r": response is not JSON'),
        ({"raw": b'{"a": 1}'}, {"verification": "jsonp"}, "response_invalid", None),
        ({"json": {"other": 1}}, {}, "key_missing", 'rule "r": key data.status missing from the response'),
        ({"json": {"data": {"status": "guest"}}}, {"actions": (action("regex", "data.status", "^adm"),)},
         "regex_mismatch", 'rule "r": data.status "guest" does not match /^adm/'),
        ({"delay": 2}, {"timeout_ms": 200}, "webhook_timeout", None),
        ({"big": 2 << 20}, {}, "response_too_large", None),
    ],
)
async def test_failure_codes(db, start_sidecar, authz, webhook, handler_payload, rule_update, code, reason) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if "delay" in handler_payload:
            await asyncio.sleep(handler_payload["delay"])  # slower than the rule's timeout
        if "raw" in handler_payload:
            return web.Response(body=handler_payload["raw"], content_type="application/json")
        if "big" in handler_payload:
            return web.Response(body=b" " * handler_payload["big"], content_type="application/json")
        return web.json_response(handler_payload.get("json", {"data": {"status": "active"}}),
                                 status=handler_payload.get("status", 200))

    webhook.routes["/r"] = handler
    rule = Rule(name="r", url=webhook.url + "/r", actions=(action("string", "data.status", "active"),))
    rule = Rule.model_validate({**rule.model_dump(), **rule_update})
    _, stub = await start(db, start_sidecar, authz, [rule])
    response = await stub.Check(check_request("/"))
    assert response.status.code == PERMISSION_DENIED
    assert code_of(response) == code
    assert denial_reason(response).startswith('rule "r": ')
    if reason:
        assert denial_reason(response) == reason


async def test_unreachable_webhook(db, start_sidecar, authz, refused_port) -> None:
    rule = Rule(name="down", url=f"http://127.0.0.1:{refused_port}/x")
    _, stub = await start(db, start_sidecar, authz, [rule])
    response = await stub.Check(check_request("/"))
    assert code_of(response) == "webhook_unreachable"
    assert denial_reason(response).startswith('rule "down": ')


async def test_redirects_are_not_followed(db, start_sidecar, authz, webhook) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(webhook.url + "/ok")

    webhook.routes["/redirect"] = redirect
    webhook.routes["/ok"] = answer({})
    _, stub = await start(db, start_sidecar, authz, [Rule(name="r", url=webhook.url + "/redirect")])
    response = await stub.Check(check_request("/"))
    assert code_of(response) == "webhook_status"
    assert webhook.seen("/ok") == []


async def test_header_parameter_with_crlf_is_unsafe(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/x"] = answer({})
    rule = Rule(name="r", url=webhook.url + "/x", headers=(("X-Agent", "%user_agent%"),))
    _, stub = await start(db, start_sidecar, authz, [rule])
    response = await stub.Check(check_request("/", headers={"user-agent": "a\r\nx-evil: 1"}))
    assert code_of(response) == "unsafe_parameter"
    assert webhook.requests == []


async def test_basic_auth(db, start_sidecar, authz, webhook, monkeypatch) -> None:
    monkeypatch.setenv("SAFOUS_SECRET_HOOK_PASSWORD", "s3cr:et")
    webhook.routes["/x"] = answer({})
    rule = Rule(name="r", url=webhook.url + "/x", auth=AuthType.BASIC, username="svc",
                password="env:SAFOUS_SECRET_HOOK_PASSWORD")
    _, stub = await start(db, start_sidecar, authz, [rule])
    assert (await stub.Check(check_request("/"))).status.code == OK
    assert webhook.requests[0]["headers"]["authorization"] == "Basic " + base64.b64encode(b"svc:s3cr:et").decode()


USER_PART = ("the URL holds a user name or password (before '@'), which would be stored and shown in clear: "
             "give the URL without it and use ")


@pytest.mark.parametrize("url", ["http://svc:hunter2@api.example.com/check", "https://svc@api.example.com/",
                                 "https://:hunter2@api.example.com/"])
def test_a_url_with_a_user_part_is_refused_without_repeating_it(url: str) -> None:
    # aiohttp would send it as Basic credentials, while rule show, the audit log, bundles and
    # the portal show a URL in clear.
    with pytest.raises(ValidationError) as refused:
        Rule(name="r", url=url)
    [error] = refused.value.errors()
    assert error["loc"] == ("url",)
    assert error["msg"] == ("Value error, " + USER_PART
                            + "--auth basic with --username and --password env:NAME (or file:PATH)")
    with pytest.raises(ValidationError) as refused:
        Rule(name="r", url="https://api.example.com/", auth=AuthType.OAUTH, client_id="cid",
             client_secret="env:SAFOUS_SECRET_CS", token_url=url)
    [error] = refused.value.errors()
    assert error["loc"] == ("token_url",)
    assert error["msg"] == ("Value error, " + USER_PART
                            + "--auth oauth with --client-id and --client-secret env:NAME (or file:PATH)")
    assert "hunter2" not in error["msg"]


def test_an_at_sign_after_the_host_is_no_user_part() -> None:
    rule = Rule(name="r", url="https://api.example.com/u/%username%@corp?to=a@b.example#x@y")
    assert rule.url == "https://api.example.com/u/%username%@corp?to=a@b.example#x@y"


async def test_missing_secret_makes_the_rule_invalid(db, start_sidecar, authz, webhook, monkeypatch) -> None:
    monkeypatch.delenv("SAFOUS_SECRET_NOT_SET_ANYWHERE", raising=False)
    rule = Rule(name="r", url=webhook.url + "/x", auth=AuthType.BASIC, username="svc",
                password="env:SAFOUS_SECRET_NOT_SET_ANYWHERE")
    _, stub = await start(db, start_sidecar, authz, [rule])
    response = await stub.Check(check_request("/"))
    assert code_of(response) == "rule_invalid"
    assert "NOT_SET_ANYWHERE" in denial_reason(response)


async def test_oauth_token_is_fetched_once_and_reused(db, start_sidecar, authz, webhook) -> None:
    async def token(request: web.Request) -> web.Response:
        assert request.headers["authorization"] == "Basic " + base64.b64encode(b"cid:csecret").decode()
        assert (await request.post())["grant_type"] == "client_credentials"
        return web.json_response({"access_token": f"tok-{len(webhook.seen('/token'))}", "expires_in": 3600,
                                  "token_type": "Bearer"})

    webhook.routes["/token"] = token
    webhook.routes["/api"] = answer({"ok": "1"})
    rule = Rule(name="r", url=webhook.url + "/api", auth=AuthType.OAUTH, token_url=webhook.url + "/token",
                client_id="cid", client_secret="csecret", actions=(action("string", "ok", "1"),))
    _, stub = await start(db, start_sidecar, authz, [rule])
    results = await asyncio.gather(*(stub.Check(check_request(f"/{i}")) for i in range(20)))
    assert all(r.status.code == OK for r in results)
    assert len(webhook.seen("/token")) == 1
    assert {r["headers"]["authorization"] for r in webhook.seen("/api")} == {"Bearer tok-1"}


async def test_every_decision_is_in_the_activity_log(db, start_sidecar, authz, webhook) -> None:
    webhook.routes["/p"] = answer({"status": "active"})
    rule = Rule(name="p", url=webhook.url + "/p?u=%username%", actions=(action("string", "status", "active"),))
    sidecar, stub = await start(db, start_sidecar, authz, [rule])
    for user in ("alice", "bob"):
        await stub.Check(check_request(f"/{user}", headers={"x-safous-username": user}))
    webhook.routes["/p"] = answer({"status": "blocked"})
    await stub.Check(check_request("/carol", headers={"x-safous-username": "carol"}))
    await sidecar.stop(grace=1)
    rows = sqlite3.connect(db).execute(
        "SELECT username, policy, allowed, code, status FROM activity_log ORDER BY id").fetchall()
    assert rows == [
        ("alice", "app", 1, "rules_passed", 'policy "app": all 1 rules met'),
        ("bob", "app", 1, "rules_passed", 'policy "app": all 1 rules met'),
        ("carol", "app", 0, "value_mismatch", 'rule "p": status is "blocked", expected "active"'),
    ]


HEADER_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"),
                      max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=HEADER_TEXT)
async def test_client_values_never_change_the_webhook_request_structure(value, db, start_sidecar, authz,
                                                                        webhook) -> None:
    # One sidecar per example would be slow: start it once, reuse across examples.
    if not webhook.routes:
        webhook.routes["/hook"] = answer({"ok": "1"})
        rule = Rule(name="r", method="POST", url=webhook.url + "/hook?u=%headers.x-v%&fixed=1",
                    body='{"v": "%headers.x-v%", "n": 1}', actions=(action("string", "ok", "1"),))
        seed(db, [rule], [Policy(name="app", rules=("r",))])
        webhook.stub = authz((await start_sidecar()).port)
    webhook.requests.clear()
    response = await webhook.stub.Check(check_request("/", headers={"x-v": value}))
    assert response.status.code == OK
    (seen,) = webhook.requests
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(seen["path"])
    assert parts.path == "/hook"
    assert parse_qsl(parts.query, keep_blank_values=True) == [("u", value), ("fixed", "1")]
    assert json.loads(seen["body"]) == {"v": value, "n": 1}



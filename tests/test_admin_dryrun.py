"""``safous-admin test RULE``: one real webhook call, shown exactly, judged as the sidecar judges."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from click.testing import Result

from sidecar.rules.secrets import MASK
from tests.admin_cli import admin, count
from tests.conftest import Webhook, answer
from tests.helpers import closed_port


async def run(db: Path, *args: str, **kwargs: Any) -> Result:
    # In a thread: the command runs its own event loop, and the webhook is served by this one.
    return await asyncio.to_thread(admin, db, *args, **kwargs)


def fingerprint(db: Path) -> list[str]:
    """The database's bytes: the file and its write-ahead log (absent is the same as empty)."""
    return [hashlib.sha256(p.read_bytes() if p.exists() else b"").hexdigest()
            for p in (db, db.with_name(db.name + "-wal"))]


POSTURE = ["rule", "add", "posture", "--method", "POST", "--url", "{url}/check?u=%username%",
           "--header", "X-Device=%device_id%", "--body", '{{"user": "%username%"}}',
           "--auth", "basic", "--username", "svc", "--password", "env:SAFOUS_SECRET_POSTURE_PW",
           "--action", "string:data.status:active", "--action", "regex:data.role:^(admin|ops)$",
           "--action", "store:data.tier:tier", "--disabled"]


def add_posture(db: Path, webhook: Webhook) -> None:
    result = admin(db, *(a.format(url=webhook.url) for a in POSTURE))
    assert result.exit_code == 0, result.output


async def test_a_rule_whose_criteria_are_met(db: Path, webhook: Webhook) -> None:
    payload = {"data": {"status": "active", "role": "admin", "tier": "gold"}}
    webhook.routes["/check"] = answer(payload)
    add_posture(db, webhook)
    before = fingerprint(db)
    result = await run(db, "test", "posture", "--param", "username=alice o'neil&x",
                       env={"SAFOUS_SECRET_POSTURE_PW": "hunter2"})
    body = json.dumps(payload)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert result.stdout == f"""\
rule "posture" (disabled)
parameters
  %username%   alice o'neil&x
  %device_id%  (empty)
request
  POST {webhook.url}/check?u=alice%20o%27neil%26x
  X-Device:
  Content-Type: application/json
  Authorization: Basic {MASK}

  {{"user": "alice o'neil&x"}}
response
  HTTP 200, application/json; charset=utf-8, {len(body)} bytes
  {body}
actions
  met          string:data.status:active      data.status is "active"
  met          regex:data.role:^(admin|ops)$  data.role "admin" matches /^(admin|ops)$/
  stored       store:data.tier:tier           %stored.tier% = "gold"
decision: met
"""
    (seen,) = webhook.requests
    assert seen["headers"]["authorization"] == "Basic " + base64.b64encode(b"svc:hunter2").decode()
    assert json.loads(seen["body"]) == {"user": "alice o'neil&x"}
    assert "hunter2" not in result.output
    assert fingerprint(db) == before  # a dry run writes nothing


async def test_a_rule_whose_criteria_are_not_met_exits_1_with_every_verdict(db: Path, webhook: Webhook) -> None:
    webhook.routes["/check"] = answer({"data": {"status": "active", "role": "guest"}})
    add_posture(db, webhook)
    result = await run(db, "test", "posture", "--param", "%username%=bob", "--param", "device_id=d-1",
                       env={"SAFOUS_SECRET_POSTURE_PW": "hunter2"})
    assert result.exit_code == 1, result.output
    assert result.stdout.split("actions\n")[1] == """\
  met          string:data.status:active      data.status is "active"
  not met      regex:data.role:^(admin|ops)$  data.role "guest" does not match /^(admin|ops)$/
  missing      store:data.tier:tier           data.tier missing from the response
decision: not met (regex_mismatch): rule "posture": data.role "guest" does not match /^(admin|ops)$/
"""
    assert "  X-Device: d-1\n" in result.stdout


async def test_an_unreachable_webhook_is_not_met(db: Path) -> None:
    with closed_port() as port:
        admin(db, "rule", "add", "r", "--url", f"http://127.0.0.1:{port}/x", "--action", "string:ok:true")
        result = await run(db, "test", "r")
    assert result.exit_code == 1, result.output
    assert result.stdout == f"""\
rule "r"
request
  GET http://127.0.0.1:{port}/x
response
  none
actions
  not checked  string:ok:true  no response
decision: not met (webhook_unreachable): rule "r": webhook unreachable: connection refused
"""


async def test_regexes_are_judged_by_re2_as_the_sidecar_judges_them(db: Path, webhook: Webhook) -> None:
    """RE2 syntax that Python's ``re`` lacks, RE2's ASCII ``\\d``, and a pattern that
    backtracks 2^30 times in ``re``: each verdict is the sidecar's, found in linear time."""
    webhook.routes["/check"] = answer({"name": "Zoë", "n": "١٢٣", "v": "a" * 30 + "!"})
    added = admin(db, "rule", "add", "r", "--url", f"{webhook.url}/check", "--action", r"regex:name:^\p{L}+\z",
                  "--action", r"regex:n:^\d+$", "--action", "regex:v:^(a+)+$")
    assert added.exit_code == 0, added.output
    started = time.perf_counter()
    result = await run(db, "test", "r")
    elapsed = time.perf_counter() - started
    assert (result.exit_code, result.stderr) == (1, ""), result.output
    assert result.stdout.split("actions\n")[1] == f"""\
  met          regex:name:^\\p{{L}}+\\z  name "Zoë" matches /^\\p{{L}}+\\z/
  not met      regex:n:^\\d+$         n "١٢٣" does not match /^\\d+$/
  not met      regex:v:^(a+)+$       v "{"a" * 30}!" does not match /^(a+)+$/
decision: not met (regex_mismatch): rule "r": n "١٢٣" does not match /^\\d+$/
"""
    assert elapsed < 20, f"the dry run took {elapsed:.1f} s"  # Python's re: minutes


async def test_an_answer_that_is_not_json_is_shown_safely_and_truncated(db: Path, webhook: Webhook) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"\x1b[2J" + b"x" * 5000, content_type="text/plain")

    webhook.routes["/check"] = garbage
    admin(db, "rule", "add", "r", "--url", f"{webhook.url}/check", "--action", "string:ok:true")
    result = await run(db, "test", "r")
    assert result.exit_code == 1, result.output
    assert result.stdout.split("response\n")[1] == f"""\
  HTTP 200, text/plain, 5004 bytes
  \\x1b[2J{"x" * 2044}
  ... (2956 more bytes not shown)
actions
  not checked  string:ok:true  response is not JSON
decision: not met (response_invalid): rule "r": response is not JSON
"""


async def test_an_oauth_rule_masks_its_token(db: Path, webhook: Webhook) -> None:
    webhook.routes["/token"] = answer({"access_token": "tok-123", "token_type": "Bearer", "expires_in": 60})
    webhook.routes["/check"] = answer({"ok": True})
    secrets = {"SAFOUS_SECRET_DIR": str(db.parent)}  # as the sidecar would have it
    added = admin(db, "rule", "add", "r", "--url", f"{webhook.url}/check", "--auth", "oauth", "--token-url",
                  f"{webhook.url}/token", "--client-id", "cid", "--client-secret", f"file:{db.parent / 'secret'}",
                  "--header", "Authorization=Bearer ignored", "--action", "string:ok:true", env=secrets)
    assert added.exit_code == 0, added.output
    (db.parent / "secret").write_text("s3cret\n")
    result = await run(db, "test", "r", env=secrets)
    assert result.exit_code == 0, result.output
    assert result.stdout.split("response\n")[0] == f"""\
rule "r"
request
  GET {webhook.url}/check
  Authorization: Bearer {MASK}
"""
    assert webhook.seen("/check")[0]["headers"]["authorization"] == "Bearer tok-123"
    assert "tok-123" not in result.output and "s3cret" not in result.output


async def test_usage_and_configuration_errors_exit_2(db: Path, webhook: Webhook, tmp_path: Path) -> None:
    add_posture(db, webhook)
    cases = [
        (["test", "postur"], 'rule "postur" does not exist — did you mean "posture"?'),
        (["test", "posture"], ('rule "posture" cannot run: secret env:SAFOUS_SECRET_POSTURE_PW: environment '
                               "variable SAFOUS_SECRET_POSTURE_PW is not set")),
        (["test", "posture", "--param", "user_name=x"],
         "--param: unknown parameter %user_name% — did you mean %username%?"),
        (["test", "posture", "--param", "username"], "Invalid value for '--param': 'username' is not NAME=VALUE"),
    ]
    for args, message in cases:
        result = await run(db, *args)
        assert (result.exit_code, result.stdout) == (2, ""), result.output
        assert result.stderr.splitlines()[-1] == f"Error: {message}"
    result = await run(tmp_path / "absent.db", "test", "posture")
    assert (result.exit_code, result.stderr) == (2, (f"Error: rules.db {tmp_path / 'absent.db'} does not exist "
                                                     "(`rule add`, `policy add` and `import` create one; other "
                                                     "commands never do)\n"))
    assert not (tmp_path / "absent.db").exists()
    assert webhook.requests == []
    assert count(db, "activity_log") == 0

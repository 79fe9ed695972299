"""What an admin does with the script reaches a running sidecar without a restart, and the
sidecar's denials are what ``logs activity --denied`` shows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.admin_cli import admin
from tests.conftest import Webhook, answer, check_request, denial_reason
from tests.helpers import OK, PERMISSION_DENIED, eventually


async def test_admin_edits_reach_a_running_sidecar(db: Path, start_sidecar, authz, webhook: Webhook) -> None:
    webhook.routes["/check"] = answer({"status": "active"})
    sidecar = await start_sidecar(reload_interval=0.05)
    stub = authz(sidecar.port)
    request = check_request("/app", headers={"x-safous-username": "alice"})
    assert (await stub.Check(request)).status.code == PERMISSION_DENIED  # no policy yet: zero trust

    assert admin(db, "rule", "add", "active", "--url", f"{webhook.url}/check?u=%username%",
                 "--action", "string:status:active").exit_code == 0
    assert admin(db, "policy", "add", "web", "--host", "app.example.com", "--rule", "active").exit_code == 0

    async def allowed() -> bool:
        return (await stub.Check(request)).status.code == OK

    assert await eventually(allowed)
    assert webhook.seen("/check")[-1]["path"] == "/check?u=alice"

    assert admin(db, "rule", "edit", "active", "--action", "string:status:enabled").exit_code == 0

    async def denied() -> str | None:
        response = await stub.Check(request)
        return denial_reason(response) if response.status.code == PERMISSION_DENIED else None

    reason = await eventually(denied)
    assert reason == 'rule "active": status is "active", expected "enabled"'

    # The denial reaches the activity log, where the admin finds it.
    async def logged() -> bool:
        # Alice's first denial (no policy yet) is there before this one: wait for this one.
        result = admin(db, "logs", "activity", "--denied", "--user", "alice", "--json")
        return '"code": "value_mismatch"' in result.stdout

    assert await eventually(logged)
    newest = admin(db, "logs", "activity", "--denied").stdout.splitlines()[1]
    assert newest.split()[-8:] == ["value_mismatch", "rule", '"active":', "status", "is", '"active",',
                                   "expected", '"enabled"']


async def test_a_bad_row_written_with_sql_while_running_disables_only_its_rule(
        db: Path, start_sidecar, authz, webhook: Webhook) -> None:
    webhook.routes["/check"] = answer({"status": "active"})
    admin(db, "rule", "add", "active", "--url", f"{webhook.url}/check", "--action", "string:status:active")
    admin(db, "policy", "add", "web", "--host", "app.example.com", "--rule", "active")
    admin(db, "policy", "add", "api", "--host", "api.example.com", "--rule", "active")
    stub = authz((await start_sidecar(reload_interval=0.05)).port)
    api = check_request("/", host="api.example.com")
    assert (await stub.Check(api)).status.code == OK

    conn = sqlite3.connect(db)
    conn.execute("""INSERT INTO rules (name, url, actions) VALUES ('broken', 'http://x/',
                    '[{"type": "regex", "key": "a", "value": "("}]')""")
    conn.execute("INSERT INTO policy_rules (policy_id, rule_id, position) "
                 "SELECT p.id, r.id, 1 FROM policies p, rules r WHERE p.name = 'api' AND r.name = 'broken'")
    conn.commit()
    conn.close()

    async def denied() -> str | None:
        response = await stub.Check(api)
        return denial_reason(response) if response.status.code == PERMISSION_DENIED else None

    assert (await eventually(denied)).startswith('rule "broken" is invalid: actions.0: regex')
    assert (await stub.Check(check_request("/"))).status.code == OK  # app.example.com: untouched
    # The admin sees the same problem, and the plain-SQL change in the audit log.
    assert "rule \"broken\" does not validate" in admin(db, "policy", "show", "api").stdout
    audit = admin(db, "logs", "audit", "--limit", "2").stdout.splitlines()[1:]
    assert [line.split()[1:4] for line in audit] == [["sql", "edit", "policy"], ["sql", "create", "rule"]]

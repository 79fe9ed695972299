"""``safous-admin logs`` and ``safous-admin explain``: read what was changed (the audit log),
what was decided (the activity log, or the sidecars' decision log lines) and why (a trace).

Read-only: these commands never create or write rules.db. Each imports what it runs (see
``cli``).
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

import click

from sidecar import db

from .completion import recent_users
from .options import log_options

if TYPE_CHECKING:
    from .access import Admin

__all__ = ["explain", "logs"]


@click.group("logs")
def logs() -> None:
    """Read the audit log and the activity log.

    The audit log says who changed which rule or policy; the activity log, which request
    was allowed or denied, and why.
    """


@logs.command("audit")
@log_options
@click.pass_obj
def logs_audit(admin: Admin, limit: int, since: str | None, as_json: bool) -> None:
    """Show who changed what.

    The audit log, newest first: every create, edit, enable, disable and delete of a rule or
    policy, with time (UTC), actor (`sql` for a change made with plain SQL) and, for an edit,
    the settings changed. --json gives the whole before and after (secrets redacted).
    """
    from . import display

    with admin.read() as conn:
        entries = db.read_audit(conn, limit=limit or None, since=since)
    if as_json:
        for entry in entries:
            click.echo(display.audit_line(entry))
    else:
        click.echo(display.audit_table(entries) if entries else "no audit log entries")


@logs.command("activity")
@click.option("--denied", is_flag=True, help="Only denied requests, with the reason (STATUS).")
@click.option("--would-deny", is_flag=True,
              help="Only requests a policy in audit mode allowed but would have denied (decision audit_deny).")
@click.option("--user", metavar="U", shell_complete=recent_users, help="Only requests of this %username%.")
@click.option("--pod", metavar="NAME", help="Only requests this pod decided (a fleet's activity log: safous-admin "
              "collect).")
@click.option("--from-log", "from_log", type=click.File("r"), metavar="FILE",
              help="Read the sidecars' JSON decision log lines (a file, or - for standard input) instead of "
              "rules.db: the activity of a whole fleet, e.g. kubectl logs -l app=APP -c safous-sidecar | "
              "safous-admin logs activity --from-log -")
@log_options
@click.pass_obj
def logs_activity(admin: Admin, denied: bool, would_deny: bool, user: str | None, pod: str | None,
                  from_log: IO[str] | None, limit: int, since: str | None, as_json: bool) -> None:
    """Show who was allowed or denied, and why.

    The activity log, newest first: each decision of the sidecar with its time (UTC), request
    id, user, source IP, request, policy, decision, code and status (why: for a denial, the
    reason the client also got in the x-safous-denial-reason header). A fleet's activity log
    (--db fleet.db, written by safous-admin collect) also says which POD decided.
    """
    from sidecar.logs import decision_from_log_line

    from . import display

    if from_log is not None:
        if pod is not None:
            raise click.UsageError("--pod reads a fleet's activity log (safous-admin collect): decision log lines "
                                   "do not name their pod (kubectl logs POD does)")
        records = display.filter_activity(
            (r for line in from_log if (r := decision_from_log_line(line)) is not None),
            denied=denied, would_deny=would_deny, user=user, limit=limit or None, since=since)
    else:
        with admin.read() as conn:
            records = db.read_activity(conn, denied=denied, would_deny=would_deny, user=user,
                                       limit=limit or None, since=since, pod=pod)
    if as_json:
        for record in records:
            click.echo(display.activity_line(record))
    else:
        click.echo(display.activity_table(records, denied=denied) if records else "no activity log entries")


@click.command("explain")
@click.argument("request_id")
@click.option("--pod", metavar="NAME", help="The trace this pod kept (a fleet's activity log, where one request "
              "may pass several sidecars).")
@click.option("--json", "as_json", is_flag=True, help="The trace as one JSON document.")
@click.pass_obj
def explain(admin: Admin, request_id: str, pod: str | None, as_json: bool) -> None:
    """Why was REQUEST_ID decided so? The evidence the sidecar kept.

    For each rule of the policy, in order: how its outcome came about (its own webhook call,
    a call shared with an identical one, the cache), the request sent (Authorization values
    masked), the answer (its first 4 KiB), the outcome and how long it took. The sidecar keeps
    a trace for every denial and audit denial (--trace denied, its default), as long as the
    activity log row; exit 1 when there is none. In a fleet's activity log (safous-admin
    collect) it also says which pod decided.
    """
    import json

    from . import display

    with admin.read() as conn:
        doc = db.read_trace(conn, request_id, pod=pod)
        # Only a trace in a fleet's log names the pod that decided; other pods may hold one too.
        others = ([p for p in db.traced_pods(conn, request_id) if p != doc["pod"]]
                  if doc is not None and "pod" in doc else [])
    if doc is None:
        where = f" decided by pod {pod!r}" if pod is not None else ""
        raise click.ClickException(f"no trace of request {request_id!r}{where} (the sidecar keeps one for each "
                                   "denial; see logs activity)")
    click.echo(json.dumps(doc, ensure_ascii=False) if as_json else display.trace_report(doc))
    if others and not as_json:
        which = f"pod {others[0]}" if len(others) == 1 else f"pods {', '.join(others)}"
        display.warn(f"{which} decided request {request_id!r} too: explain --pod NAME shows theirs")

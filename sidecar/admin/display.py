"""How the admin script shows things: redacted documents, tables, one object's details, log
entries, warnings.

Two rules hold for everything printed:

- a secret is never shown in clear: a rule's password and client secret go through
  ``sidecar.rules.secrets.mask`` (a reference as written, a clear value as the mask), and the
  values of its Authorization and Proxy-Authorization headers are the mask, whatever shape a
  row written with plain SQL gives them (``sidecar.exchange.redacted``, as exports mask them);
  only ``export --with-secrets`` writes them as stored;
- text that came from outside (activity-log usernames and paths, webhook answers, names written
  with plain SQL) cannot drive the terminal: control and format characters are shown escaped.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click

from sidecar.db import ActivityRecord, AuditEntry, StoredPolicy, StoredRule, iso_time
from sidecar.db.activity import TRACE_MAX_BYTES
from sidecar.decision import result_name
from sidecar.exchange import masked_headers, policy_document, quoted, redacted, rule_document
from sidecar.parameters import HEADER_PREFIX, PARAMETERS, STORED_PREFIX
from sidecar.rules.secrets import MASK, SECRET_HEADERS

__all__ = [
    "action_lines",
    "activity_line",
    "activity_table",
    "audit_line",
    "audit_table",
    "clean",
    "counted",
    "header_lines",
    "parameter_table",
    "policy_details",
    "policy_line",
    "policy_table",
    "redact_header",
    "rule_details",
    "rule_line",
    "rule_table",
    "table",
    "warn",
]

def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str, *, multiline: bool = False) -> str:
    """``text`` safe for a terminal: control and format characters (escape sequences, bidi
    overrides) escaped; newlines and tabs kept when ``multiline``."""
    keep = "\n\t" if multiline else ""
    if text.isprintable() and not any(c in text for c in keep):
        return text
    return "".join(
        _escape(c) if unicodedata.category(c) in ("Cc", "Cf") and c not in keep else c for c in text
    )


def redact_header(name: str, value: str) -> str:
    return MASK if name.lower() in SECRET_HEADERS else value


def warn(*messages: str) -> None:
    """``warning: message`` on standard error for each message: the command goes on."""
    for message in messages:
        click.echo(f"warning: {message}", err=True)


def counted(n: int, kind: str) -> str:
    """``1 rule``, ``2 policies``."""
    plural = "policies" if kind == "policy" else kind + "s"
    return f"{n} {kind if n == 1 else plural}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart, cells cleaned, no trailing spaces."""
    cells = [list(headers)] + [[clean(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _details(title: str, pairs: Sequence[tuple[str, str | Sequence[str]]]) -> str:
    width = max(len(label) for label, _ in pairs)
    lines = [title]
    for label, value in pairs:
        values = [value] if isinstance(value, str) else list(value) or ["none"]
        text = "\n".join(clean(v, multiline=True) for v in values).rstrip("\n")
        first, *rest = text.split("\n")
        lines.append(f"  {label.ljust(width)}  {first}".rstrip())
        lines.extend(f"  {'':{width}}  {line}".rstrip() for line in rest)
    return "\n".join(lines)


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def header_lines(headers: Any) -> list[str]:
    """A rule's headers as ``KEY=VALUE`` (the ``--header`` syntax), secret values masked
    (``masked_headers``); a shape that is not pairs as its JSON."""
    shown = masked_headers(headers)
    if isinstance(shown, dict):
        return [f"{k}={_text(v)}" for k, v in shown.items()]
    if not isinstance(shown, list):
        return [_text(shown)]
    return [f"{pair[0]}={_text(pair[1])}" if isinstance(pair, list) and len(pair) == 2 else _text(pair)
            for pair in shown]


def action_lines(actions: Any) -> list[str]:
    """A rule's response actions as ``TYPE:KEY:VALUE`` (the ``--action`` syntax)."""
    if not isinstance(actions, list):
        return [_text(actions)]
    return [f"{a.get('type')}:{a.get('key')}:{a.get('value')}" if isinstance(a, dict) else _text(a)
            for a in actions]


def rule_details(stored: StoredRule, problem: str | None) -> str:
    """``rule show``: every field, secrets masked, and what is wrong with it, if anything."""
    doc = redacted(stored.fields)
    auth = doc.get("auth")
    pairs: list[tuple[str, str | Sequence[str]]] = [
        ("enabled", _yes(doc.get("enabled"))),
        ("method", _text(doc.get("method"))),
        ("url", _text(doc.get("url"))),
        ("headers", header_lines(doc.get("headers"))),
    ]
    if doc.get("body") is not None:
        pairs.append(("body", _text(doc["body"])))
    pairs.append(("auth", _text(auth)))
    for field, label, kind in (("username", "username", "basic"), ("password", "password", "basic"),
                               ("token_url", "token url", "oauth"), ("client_id", "client id", "oauth"),
                               ("client_secret", "client secret", "oauth")):
        if auth == kind or doc.get(field) is not None:
            pairs.append((label, _text(doc.get(field))))
    pairs += [
        ("verify", _text(doc.get("verification"))),
        ("actions", action_lines(doc.get("actions"))),
        ("timeout", f"{_text(doc.get('timeout_ms'))} ms"),
        ("cache ttl", f"{_number(doc.get('cache_ttl'))} s"),
        ("policies", ", ".join(stored.policies) or "none"),
    ]
    if problem:
        pairs.append(("problem", problem))
    return _details(f"rule {json.dumps(stored.name, ensure_ascii=False)}", pairs)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _text(value)


def _listing(value: Any, empty: str) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or empty
    return _text(value)


def policy_details(stored: StoredPolicy, problem: str | None) -> str:
    """``policy show``: every field, and what is wrong with it, if anything."""
    doc = stored.fields
    pairs: list[tuple[str, str | Sequence[str]]] = [
        ("enabled", _yes(doc.get("enabled"))),
        ("hosts", _listing(doc.get("hosts"), "any")),
        ("path prefix", _text(doc.get("path_prefix"))),
        ("methods", _listing(doc.get("methods"), "any")),
        ("integration", "on" if doc.get("integration") else "off"),
        ("priority", _text(doc.get("priority"))),
        ("ports", _listing(doc.get("ports"), "any")),
        ("sni", _listing(doc.get("sni"), "any")),
        ("mode", _text(doc.get("mode"))),
        ("rules", _listing(doc.get("rules"), "none")),
    ]
    if problem:
        pairs.append(("problem", problem))
    return _details(f"policy {json.dumps(stored.name, ensure_ascii=False)}", pairs)


def _policy_row(stored: StoredPolicy) -> list[str]:
    doc = stored.fields
    return [stored.name, _yes(doc.get("enabled")), _text(doc.get("mode")), _text(doc.get("priority")),
            _listing(doc.get("hosts"), "any"), _text(doc.get("path_prefix")),
            _listing(doc.get("methods"), "any"), _listing(doc.get("ports"), "any"),
            _listing(doc.get("sni"), "any"), "on" if doc.get("integration") else "off",
            _listing(doc.get("rules"), "none")]


def _rule_row(stored: StoredRule) -> list[str]:
    doc = stored.fields
    return [stored.name, _yes(doc.get("enabled")), _text(doc.get("method")), _text(doc.get("url")),
            ", ".join(stored.policies) or "none"]


def _with_problems(headers: Sequence[str], rows: Sequence[Sequence[str]], problems: Sequence[str | None]) -> str:
    """``table``, with a PROBLEM column when any object has one."""
    if not any(problems):
        return table(headers, rows)
    return table([*headers, "PROBLEM"], [[*row, p or ""] for row, p in zip(rows, problems, strict=True)])


def rule_table(rules: Sequence[StoredRule], problems: Sequence[str | None]) -> str:
    """``rule list``: one row a rule, with its problem (``problems``, in the same order)."""
    return _with_problems(["NAME", "ENABLED", "METHOD", "URL", "POLICIES"], [_rule_row(r) for r in rules],
                          problems)


def policy_table(policies: Sequence[StoredPolicy], problems: Sequence[str | None]) -> str:
    """``policy list``: one row a policy, with its problem (``problems``, in the same order).
    MODE is next to ENABLED, since a policy left in audit mode allows whatever its rules say;
    PORTS and SNI, since a policy matching on them governs TCP connections too."""
    headers = ["NAME", "ENABLED", "MODE", "PRIORITY", "HOSTS", "PATH", "METHODS", "PORTS", "SNI", "INTEGRATION",
               "RULES"]
    return _with_problems(headers, [_policy_row(p) for p in policies], problems)


def _json_line(document: Mapping[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False)


def rule_line(stored: StoredRule, problem: str | None) -> str:
    """``rule list --json``: the export's fields, secrets masked, the policies and the problem."""
    return _json_line({**rule_document(stored), "policies": list(stored.policies), "problem": problem})


def policy_line(stored: StoredPolicy, problem: str | None) -> str:
    """``policy list --json``: the export's fields and the problem."""
    return _json_line({**policy_document(stored), "problem": problem})


def _changes(before: Any, after: Any) -> str:
    if not isinstance(before, dict) or not isinstance(after, dict):
        return ""
    return ", ".join(k for k in after if k != "enabled" and before.get(k) != after.get(k))


def audit_table(entries: Sequence[AuditEntry]) -> str:
    """``logs audit``: one row an entry; for an edit, the settings it changed."""
    return table(
        ["AT", "ACTOR", "ACTION", "OBJECT", "CHANGES"],
        [[e.at, e.actor, e.action, f"{e.object_type} {quoted(e.object_name)}",
          _changes(e.before, e.after) if e.action == "edit" else ""] for e in entries],
    )


def audit_line(e: AuditEntry) -> str:
    """``logs audit --json``: the whole entry, before and after included (secrets redacted)."""
    return _json_line({"id": e.id, "at": e.at, "actor": e.actor, "action": e.action,
                       "object_type": e.object_type, "object_name": e.object_name,
                       "before": e.before, "after": e.after})


def activity_table(records: Sequence[ActivityRecord], *, denied: bool) -> str:
    """``logs activity``: one row a decision; ``denied`` (only denials) leaves out DECISION.
    POLICY SOURCE: how the policy was chosen (``match``: on host, path and method; ``route``:
    bound by the Envoy route), as ``policy_source`` says in the JSON and Envoy's metadata. POD,
    in a fleet's activity log (rows that name the pod that decided): which sidecar it was."""
    pods = any(r.pod is not None for r in records)
    headers = ["AT", *(["POD"] if pods else []), "REQUEST ID", "USER", "SOURCE IP", "METHOD", "HOST", "PATH",
               "POLICY", "POLICY SOURCE"]
    headers += ["CODE", "STATUS"] if denied else ["DECISION", "CODE", "STATUS"]
    rows = []
    for r in records:
        row = [iso_time(r.at), *([r.pod or "-"] if pods else []), r.request_id or "-", r.username or "-",
               r.source_ip or "-", r.method, r.host, r.path, r.policy or "-", r.policy_source]
        row += [r.code, r.status] if denied else [result_name(r.allowed, r.audit_deny), r.code, r.status]
        rows.append(row)
    return table(headers, rows)


def activity_line(r: ActivityRecord) -> str:
    """``logs activity --json``: the whole record (and its pod, in a fleet's activity log)."""
    return _json_line({
        "at": iso_time(r.at), **({"pod": r.pod} if r.pod is not None else {}), "request_id": r.request_id,
        "username": r.username, "source_ip": r.source_ip, "method": r.method, "host": r.host, "path": r.path,
        "policy": r.policy, "allowed": r.allowed, "audit_deny": r.audit_deny, "code": r.code, "status": r.status,
        "latency_ms": r.latency_ms, "policy_source": r.policy_source, "trace": r.traced,
    })


def parameter_table() -> str:
    """``params``: every %parameter% a rule can use, and where its value comes from."""
    rows = [[f"%{name}%", source] for name, source in PARAMETERS.items()]
    rows.append([f"%{HEADER_PREFIX}XYZ%", "request header XYZ (name case-insensitive); empty if absent"])
    rows.append([f"%{STORED_PREFIX}NAME%", ("value kept by a store response action of an earlier rule "
                                            "of the same policy")])
    return table(["PARAMETER", "SOURCE"], rows)


def trace_report(doc: Mapping[str, Any]) -> str:
    """``explain``: a trace as a readable report, terminal-safe (answers are third-party text)."""
    def line(text: str) -> str:
        return clean(str(text))

    out = [line(f"request {doc.get('request_id')}: {doc.get('method') or '(connection)'} "
                f"{doc.get('host')}{doc.get('path')}"),
           *([line(f"decided by pod {doc['pod']}")] if doc.get("pod") is not None else []),
           line(f"decision {doc.get('decision')} ({doc.get('code')}), policy {json.dumps(doc.get('policy'))}"),
           line(f"  {doc.get('reason')}")]
    for number, rule in enumerate(doc.get("rules", ()), start=1):
        timing = (f", pod {rule['pod']}" if "pod" in rule else "") + (f", {rule['ms']} ms" if "ms" in rule else "")
        out.append("")
        out.append(line(f"rule {number} {json.dumps(rule.get('rule'))}: {rule.get('outcome')} "
                        f"({rule.get('source')}{timing})"))
        request = rule.get("request")
        if isinstance(request, dict):
            out.append(line(f"  request  {request.get('method')} {request.get('url')}"))
            out.extend(line(f"           {name}: {value}") for name, value in request.get("headers", ()))
            if request.get("body") is not None:
                out.append(line(f"  body     {request['body']}"))
        answer = rule.get("answer")
        if isinstance(answer, dict):
            out.append(line(f"  answer   HTTP {answer.get('status')} {answer.get('content_type') or '-'} "
                            f"({answer.get('bytes')} bytes)"))
            out.append(line(f"           {answer.get('body')}"))
        for action in rule.get("actions", ()):
            out.append(line(f"  action   {action.get('type')} {action.get('key')} {json.dumps(action.get('value'))}: "
                            f"{action.get('verdict')}"))
        if rule.get("reason"):
            out.append(line(f"  reason   {rule['reason']}"))
    if doc.get("cut"):
        out.append("")
        out.append(f"(the trace was cut to stay under {TRACE_MAX_BYTES // 1024} KiB)")
    return "\n".join(out)


def filter_activity(records: Iterable[ActivityRecord], *, denied: bool = False, would_deny: bool = False,
                    user: str | None = None, limit: int | None = None, since: str | None = None
                    ) -> list[ActivityRecord]:
    """``db.read_activity``'s filters and order (newest first) over records read elsewhere
    (the decision log lines of a fleet)."""
    kept = [r for r in records
            if (not denied or not r.allowed) and (not would_deny or r.audit_deny)
            and (user is None or r.username == user) and (since is None or iso_time(r.at) >= since)]
    kept.sort(key=lambda r: r.at, reverse=True)
    return kept[:limit] if limit else kept

"""The outcome of a check, as a plain value, and the stable codes that explain it.

A code is stable: it names the cause in logs, metrics, the activity log and the
``x-safous-denial-reason`` header. The reason is for humans and may change wording.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, NamedTuple

Result = Literal["allow", "deny", "audit_deny"]
"""What a decision was, as logs, metrics, Envoy's metadata and the admin script name it."""


def result_name(allowed: bool, audit_deny: bool) -> Result:
    """``audit_deny`` for a request an audit-mode policy allowed but would have denied."""
    if audit_deny:
        return "audit_deny"
    return "allow" if allowed else "deny"


PolicySource = Literal["match", "route"]
"""How a check's policy was chosen: ``match`` (host, path, method) or ``route`` (the Envoy route
named it in ``context_extensions``)."""

DefaultAction = Literal["allow", "deny"]
"""What a request no policy matches gets (``--default-action``; zero trust: deny)."""

UPSTREAM_HEADER_PREFIX = "x-safous-"
"""The sidecar's header namespace towards the upstream: a value a rule stores as NAME is sent as
``x-safous-NAME``; client-sent headers in it are removed unless the decision sets them."""


AUDIT_DENY_HEADER = UPSTREAM_HEADER_PREFIX + "audit-deny"
"""Set on a request that an audit-mode policy would have denied: the would-be code (so the app
can show a banner)."""


class Code(StrEnum):
    # Allowed.
    RULES_PASSED = "rules_passed"
    INTEGRATION_OFF = "integration_off"
    NO_RULES = "no_rules"
    DEFAULT_ALLOW = "default_allow"
    # Denied by policy.
    NO_MATCHING_POLICY = "no_matching_policy"
    PATH_NOT_CANONICAL = "path_not_canonical"
    UNKNOWN_POLICY = "unknown_policy"
    POLICY_DISABLED = "policy_disabled"
    # Denied because a rule could not be evaluated or did not hold.
    RULE_UNAVAILABLE = "rule_unavailable"
    WEBHOOK_TIMEOUT = "webhook_timeout"
    WEBHOOK_UNREACHABLE = "webhook_unreachable"
    WEBHOOK_STATUS = "webhook_status"
    RESPONSE_TOO_LARGE = "response_too_large"
    RESPONSE_INVALID = "response_invalid"
    KEY_MISSING = "key_missing"
    VALUE_MISMATCH = "value_mismatch"
    REGEX_MISMATCH = "regex_mismatch"
    OAUTH_FAILED = "oauth_failed"
    UNSAFE_PARAMETER = "unsafe_parameter"
    RULE_INVALID = "rule_invalid"
    # Denied because the sidecar itself failed (fail closed).
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    CALLER_GONE = "caller_gone"
    INTERNAL_ERROR = "internal_error"


class Decision(NamedTuple):
    """Allow or deny, why, and what to pass on.

    ``upstream_headers`` are set on the request to the upstream when allowed (e.g. values kept
    by ``store`` response actions); they are ignored on a deny. ``policy_source`` says how the
    policy was chosen: matched on host, path and method, or bound by the Envoy route.
    ``audit_deny``: allowed only because the policy is in audit mode; ``code`` and ``reason``
    are the denial enforcement would have made.

    A named tuple, not a frozen dataclass: every check makes one (0.6 µs against 1.6 µs) and
    hashes it (the response templates are cached by decision).
    """

    allowed: bool
    code: Code
    reason: str
    policy: str | None = None
    upstream_headers: tuple[tuple[str, str], ...] = ()
    policy_source: PolicySource = "match"
    audit_deny: bool = False

    def audited(self) -> Decision:
        """This decision under a policy in audit mode: a deny becomes an allow that keeps its
        code and reason, says so (``audit_deny``) and tells the upstream
        (``x-safous-audit-deny: CODE``); an allow stays as it is."""
        if self.allowed:
            return self
        return Decision(True, self.code, self.reason, self.policy,
                        ((AUDIT_DENY_HEADER, str(self.code)),), self.policy_source, audit_deny=True)

    @classmethod
    def allow(cls, code: Code, reason: str, policy: str | None = None,
              upstream_headers: tuple[tuple[str, str], ...] = ()) -> Decision:
        return cls(True, code, reason, policy, upstream_headers)

    @classmethod
    def deny(cls, code: Code, reason: str, policy: str | None = None) -> Decision:
        return cls(False, code, reason, policy)

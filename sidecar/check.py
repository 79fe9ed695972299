"""One check, stage by stage: map → match → evaluate. Plain values in, a Decision out.

Fail closed: whatever goes wrong inside becomes a deny with a stable code. The only way to an
allow is a policy that matched and whose rules (if the integration is on) all held, or an
explicit ``--default-action allow``.

The ``x-safous-`` request headers are the sidecar's namespace towards the upstream: on an allow,
``headers_to_remove`` names every client-sent one the decision neither sets nor decided on, so
a client cannot forge a stored value even behind an Envoy config that forgot to strip them.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping

from .attributes import RequestAttributes
from .decision import UPSTREAM_HEADER_PREFIX, Code, Decision, DefaultAction
from .parameters import IdentityConfig, Parameters, map_parameters
from .policies import Policy
from .rules import RuleEvaluator
from .rules.model import InvalidRow
from .snapshot import Snapshot

log = logging.getLogger(__name__)

ROUTE_POLICY_KEY = "safous_policy"
"""The ``context_extensions`` key by which an Envoy route binds a policy (``ExtAuthzPerRoute``):
that policy is evaluated instead of matching host, path and method."""


_UNDERSCORED_PREFIXES = ("x_", "x-safous_")
# Percent-encoded '/', '\\' or an unreserved character (letters, digits, '-', '.', '_', '~'):
# forms a normalising proxy or app decodes, so the path it serves is not the one written.
_ENCODED_NORMALISABLE = re.compile(r"%(?:2[dDeEfF]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[cCfF]|7[eE])")
_NOT_CANONICAL = Decision.deny(
    Code.PATH_NOT_CANONICAL, "the request path is not canonical (a '.', '..' or empty segment, a backslash, or a "
    "percent-encoded separator or unreserved character): refused rather than judged as written")


def canonical_path(path: str) -> bool:
    """Whether ``path`` is one that no normalisation would change (RFC 3986 dot segments, merged
    slashes, decoded separators and unreserved characters: what Envoy's normalize_path,
    merge_slashes and escaped-slash handling do). Policies match path prefixes: a path that a
    proxy or the app would serve as another path must not be judged as written
    (``/public/../admin``). A trailing slash is canonical."""
    if "\\" in path or _ENCODED_NORMALISABLE.search(path):
        return False
    segments = path.split("/")
    return segments[0] == "" and not any(s in ("", ".", "..") for s in segments[1:-1]) and segments[-1] not in (
        ".", "..")
_NAMESPACE_NAME = re.compile(r"\n(x(?:-safous|_)[^\n]*)")


class Checker:
    def __init__(self, identity: IdentityConfig, default_action: DefaultAction, evaluator: RuleEvaluator) -> None:
        self.identity = identity
        self.default_allow = default_action == "allow"
        self.evaluator = evaluator
        self.snapshot: Snapshot | None = None
        self._identity_headers = _identity_headers(identity)

    async def check(self, attrs: RequestAttributes) -> tuple[Decision, Parameters | None]:
        """Decide one request. Never raises: an unexpected error is an ``internal_error`` deny."""
        params: Parameters | None = None
        try:
            params = map_parameters(attrs, self.identity)
            return await self._decide(attrs, params), params
        except Exception:
            # Fail closed on purpose: a bug or an unforeseen input must never let a request in.
            log.exception("check failed", extra={"request_id": attrs.request_id})
            return Decision.deny(Code.INTERNAL_ERROR, "internal error in the authorization sidecar"), params

    async def _decide(self, attrs: RequestAttributes, params: Parameters) -> Decision:
        snapshot = self.snapshot
        if snapshot is None:
            return Decision.deny(Code.NOT_READY, "the authorization sidecar has not loaded its rules")
        if not attrs.connection and not canonical_path(attrs.path):
            return _NOT_CANONICAL
        bound = attrs.context_extensions.get(ROUTE_POLICY_KEY)
        if bound is not None:
            policy = snapshot.index.named(bound)
            decision = (_not_bindable(snapshot, bound) if policy is None
                        else await self._decide_for(policy, snapshot, params))
            return decision._replace(policy_source="route")
        if attrs.connection:
            policy = snapshot.index.match_connection(attrs.destination.port, attrs.sni)
        else:
            policy = snapshot.index.match(attrs.host, attrs.path, attrs.method,
                                          port=attrs.destination.port, sni=attrs.sni)
        if policy is None:
            if self.default_allow:
                return Decision.allow(Code.DEFAULT_ALLOW, "no policy matches; default action is allow")
            return Decision.deny(Code.NO_MATCHING_POLICY, "no policy matches this request")
        return await self._decide_for(policy, snapshot, params)

    async def _decide_for(self, policy: Policy, snapshot: Snapshot, params: Parameters) -> Decision:
        decision = await self._evaluate(policy, snapshot, params)
        return decision.audited() if policy.mode == "audit" else decision

    async def _evaluate(self, policy: Policy, snapshot: Snapshot, params: Parameters) -> Decision:
        if not policy.integration:
            return _integration_off(policy.name)
        rules = snapshot.policy_rules.get(policy.name)
        if rules is None:
            # Every policy the index returns has an entry; were one missing, reading it as "no
            # rules" would allow what its rules might deny.
            return Decision.deny(
                Code.INTERNAL_ERROR, f'policy "{policy.name}" has no rule list in the loaded snapshot', policy.name)
        if isinstance(rules, InvalidRow):
            # Before any webhook is called: a broken rule denies whatever the others say.
            return Decision.deny(
                Code.RULE_INVALID, f'{rules.kind} "{rules.name}" is invalid: {rules.error}', policy.name)
        if not rules:
            return Decision.allow(Code.NO_RULES, f'policy "{policy.name}" has no enabled rules', policy.name)
        return await self.evaluator.evaluate(policy, rules, params)

    def headers_to_remove(self, params: Parameters, decision: Decision) -> tuple[str, ...]:
        """The client-sent ``x-safous-*`` request headers Envoy must remove before an allowed
        request reaches the upstream (``()`` for a deny: nothing reaches it).

        Kept: the headers the decision sets (they overwrite the client's copy), and an identity
        header (``--username-header`` ...) whose value is the identity the decision was made
        on. Stripping client copies of identity headers is the Envoy config's job: the sidecar
        cannot tell a trusted proxy's header from a forged one, and the upstream then sees the
        identity the policy judged. One the decision did not use (a JWT claim won) is removed,
        so the upstream never sees an identity other than the decided one.
        """
        if not decision.allowed:
            return ()
        # Lower-case names (map_parameters guarantees it); Envoy removes names case-insensitively.
        headers = params.headers
        names = "\n" + "\n".join(headers)
        if "\nx-safous" not in names and "\nx_" not in names:
            return ()  # the common case: no header of the namespace was sent, seen without a loop
        # The names of the namespace (and its underscored spellings) picked out in one C scan,
        # unless a name holds a line break: it could split into names not sent.
        candidates = _NAMESPACE_NAME.findall(names) if names.count("\n") == len(headers) else headers
        remove: list[str] = []
        set_by_decision: set[str] | None = None
        for name in candidates:
            # CGI/WSGI servers fold "_" into "-": x_safous_token reaches the app as
            # HTTP_X_SAFOUS_TOKEN, the same as x-safous-token. Such a header is never a stored
            # value or an identity header of ours, so it always goes.
            if not name.startswith(UPSTREAM_HEADER_PREFIX):
                if name.startswith(_UNDERSCORED_PREFIXES) and name.replace("_", "-").startswith(
                        UPSTREAM_HEADER_PREFIX):
                    remove.append(name)
                continue
            if set_by_decision is None:  # built once, only when the client sent such a header
                set_by_decision = {key.lower() for key, _ in decision.upstream_headers}
            if name in set_by_decision:
                continue
            if not self._decided_on(name, params):
                remove.append(name)
        return tuple(remove)

    def _decided_on(self, name: str, params: Parameters) -> bool:
        """Whether header ``name`` is an identity header whose value is a parameter the check
        was decided on."""
        for parameter in self._identity_headers.get(name, ()):
            if params.values[parameter] == params.headers[name]:
                return True
        return False


@functools.lru_cache(maxsize=4096)
def _integration_off(policy: str) -> Decision:
    """The same decision for every request to ``policy``: made once (policy names are the
    admins', few), and then only looked up."""
    return Decision.allow(Code.INTEGRATION_OFF, f'policy "{policy}": integration is off', policy)


def _not_bindable(snapshot: Snapshot, name: str) -> Decision:
    """The deny for a route that binds a name that is not an enabled policy: the default action
    never applies, since the route asked for that policy."""
    if name in snapshot.disabled_policies:
        return Decision.deny(Code.POLICY_DISABLED, f'policy "{name}", bound by the route, is disabled', name)
    return Decision.deny(Code.UNKNOWN_POLICY, f'policy "{name}", bound by the route, does not exist')


def _identity_headers(identity: IdentityConfig) -> Mapping[str, tuple[str, ...]]:
    """Identity header name → the parameters read from it, for headers in the ``x-safous-``
    namespace (others are never removed). A header configured for two parameters lists both."""
    read: dict[str, tuple[str, ...]] = {}
    for parameter, header in (("username", identity.username_header), ("device_id", identity.device_id_header),
                              ("groups", identity.groups_header), ("group_names", identity.group_names_header)):
        if header.startswith(UPSTREAM_HEADER_PREFIX):
            read[header] = (*read.get(header, ()), parameter)
    return read

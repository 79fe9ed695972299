"""The "evaluate" stage for Rules (Custom): render each rule's webhook request, call it, judge
the answer, combine the rules of a policy into one decision.

Order and concurrency: a rule that uses ``%stored.X%`` waits for the earlier rule of the policy
that stores X; every other rule starts at once. All rules must hold. The reason reported is the
first failing rule's *in policy order*, so it never depends on which webhook answered first:
when rule k fails, the rules after k are cancelled (they cannot change the outcome), and the
rules before k are awaited (one of them may be the first failure).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..decision import UPSTREAM_HEADER_PREFIX, Code, Decision
from ..parameters import STORED_PREFIX, Parameters
from ..policies import Policy
from . import CallObserver, EvaluatorMetric, trace
from .cache import DEFAULT_MAX_BYTES, DecisionCache, SingleFlight, key_seed, request_key
from .client import (
    BasicAuth,
    NoAuth,
    OAuthAuth,
    WebhookClient,
    WebhookFailure,
    WebhookResponse,
)
from .fleet import FleetCache
from .judge import AnswerJudge, RuleOutcome, judge_answer
from .model import AuthType, Rule
from .order import Unstored, stored_dependencies
from .responses import CompiledActions, compile_actions
from .secrets import SecretPolicy, resolve_secret
from .templates import (
    CompiledRequest,
    UnsafeParameter,
    WebhookRequest,
    compile_rule_request,
)

# The webhook answered and the answer was judged: a real decision, cached for the rule's TTL.
# Any other failure means the call itself failed, cached only for the shorter failure TTL.
_JUDGED = frozenset({Code.VALUE_MISMATCH, Code.REGEX_MISMATCH, Code.KEY_MISSING})
DEFAULT_FAILURE_TTL = 2.0


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """A rule ready to run: templates parsed, regexes compiled, secrets resolved."""

    rule: Rule
    request: CompiledRequest
    actions: CompiledActions
    auth: NoAuth | BasicAuth | OAuthAuth
    timeout: float
    # Equal for equal rule definitions across reloads, so cached decisions survive a reload
    # of unchanged rules and never outlive a change: a digest of the definition, so no two
    # rules share their cached decisions by chance.
    fingerprint: bytes
    # The parts of the request a trace must not show: those rendered from the client's
    # credentials (trace.CREDENTIAL_PARAMETERS).
    secret_parts: frozenset[str] = frozenset()
    _key_seed: hashlib.blake2b | None = None

    @property
    def name(self) -> str:
        return self.rule.name

    def key_seed(self) -> hashlib.blake2b:
        """Where this rule's request keys start (``cache.key_seed``): made when the rule is
        first evaluated, so rules that no request reaches hold none (448 bytes each)."""
        seed = self._key_seed
        if seed is None:
            seed = key_seed(self.fingerprint)
            object.__setattr__(self, "_key_seed", seed)  # frozen, but for this memo
        return seed


# The outcome, its failure tuple and stored dict, as sys.getsizeof counts them.
_OUTCOME_OVERHEAD = 250
# A rule ready to be called: the rendered request and its cache (and single-flight) key.
_Call = tuple[WebhookRequest, bytes]


def _outcome_size(outcome: RuleOutcome) -> int:
    """Bytes a cached outcome holds: the outcome, its reason and stored values, and the UTF-8
    copy of a non-ASCII string that protobuf keeps once the string is put in a response."""
    texts = [outcome.failure[1]] if outcome.failure else []
    texts.extend(text for pair in outcome.stored.items() for text in pair)
    return _OUTCOME_OVERHEAD + sum(sys.getsizeof(t) + (0 if t.isascii() else len(t.encode())) for t in texts)


def _auth(rule: Rule, secrets: SecretPolicy) -> NoAuth | BasicAuth | OAuthAuth:
    if rule.auth is AuthType.BASIC:
        return BasicAuth(rule.username or "", resolve_secret(rule.password, secrets) or "")
    if rule.auth is AuthType.OAUTH:
        return OAuthAuth(rule.token_url or "", rule.client_id or "",
                         resolve_secret(rule.client_secret, secrets) or "")
    return NoAuth()


_Plan = tuple[list[CompiledRule], list[list[int]]]


def _make_plan(rules: tuple[CompiledRule, ...]) -> _Plan | str:
    """The rules and, for each, the indexes of the earlier rules whose stored values it uses;
    or why they cannot run (a template for the reason, ``{policy}`` to be filled in)."""
    compiled = list(rules)
    deps = stored_dependencies((r.request.stored_names, r.actions.stored_names) for r in compiled)
    if isinstance(deps, Unstored):
        return (f'rule "{compiled[deps.index].name}" uses %stored.{deps.name}%, which no earlier rule of '
                'policy "{policy}" stores')
    return compiled, deps


class WebhookEvaluator:
    """Implements ``sidecar.rules.RuleEvaluator`` with real webhook calls through one shared
    HTTP client (pooled keep-alive connections)."""

    def __init__(self, client: WebhookClient, *, cache_size: int = 10_000,
                 cache_max_bytes: int = DEFAULT_MAX_BYTES,
                 failure_ttl: float = DEFAULT_FAILURE_TTL,
                 secret_policy: SecretPolicy | None = None, fleet: FleetCache | None = None) -> None:
        self.client = client
        # --shared-cache: where a rule with a cache TTL looks when this pod's cache misses.
        self.fleet = fleet
        # Where the rules' secret references may point (SecretError, so rule_invalid, elsewhere).
        self.secret_policy = secret_policy or SecretPolicy()
        self.cache: DecisionCache[RuleOutcome] = DecisionCache(
            cache_size, max_bytes=cache_max_bytes, sizeof=_outcome_size)
        self.flights: SingleFlight[RuleOutcome] = SingleFlight()
        self.failure_ttl = failure_ttl
        self._fingerprints: dict[str, bytes] = {}
        self._plans: dict[tuple[Any, ...], _Plan | str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._judge = AnswerJudge()
        self.on_call: CallObserver | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.client.start()
        if self.fleet is not None:
            await self.fleet.start()

    async def close(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()
        await self.client.close()
        self._judge.close()

    def metrics(self) -> Iterator[EvaluatorMetric]:
        cache, tokens = self.cache, self.client.tokens
        yield EvaluatorMetric("safous_cache_hits", "Rule decisions answered from the cache", "counter", cache.hits)
        yield EvaluatorMetric("safous_cache_misses", "Cache lookups that found nothing", "counter", cache.misses)
        yield EvaluatorMetric("safous_cache_entries", "Rule decisions in the cache", "gauge", len(cache))
        yield EvaluatorMetric("safous_cache_bytes", "Bytes held by the decision cache", "gauge", cache.bytes)
        yield EvaluatorMetric("safous_cache_evictions", "Decisions dropped to stay within the cache's bounds",
                              "counter", cache.evictions)
        yield EvaluatorMetric("safous_webhook_calls_in_flight", "Distinct webhook calls in flight", "gauge",
                              len(self.flights))
        yield EvaluatorMetric("safous_oauth_token_fetches", "OAuth token requests sent", "counter", tokens.fetches)
        yield EvaluatorMetric("safous_oauth_token_fetch_failures", "OAuth token requests that failed", "counter",
                              tokens.fetch_failures)
        if self.fleet is not None:
            yield from self.fleet.metrics()

    def compile(self, rule: Rule) -> CompiledRule:
        """Raises ValueError (TemplateError, SecretError…) for a rule that cannot run.

        Runs in the loader's thread; a changed rule's cached decisions are dropped on the
        event loop, which owns the cache."""
        fingerprint = hashlib.blake2b(rule.model_dump_json().encode(), digest_size=16).digest()
        previous = self._fingerprints.get(rule.name)
        self._fingerprints[rule.name] = fingerprint
        if previous is not None and previous != fingerprint and self._loop is not None:
            self._loop.call_soon_threadsafe(self.cache.forget_rule, rule.name)
        request = compile_rule_request(rule)
        return CompiledRule(
            rule=rule,
            request=request,
            actions=compile_actions(rule.actions),
            auth=_auth(rule, self.secret_policy),
            timeout=rule.timeout_ms / 1000,
            fingerprint=fingerprint,
            secret_parts=trace.secret_parts(request),
        )

    async def evaluate(self, policy: Policy, rules: Sequence[CompiledRule], params: Parameters) -> Decision:
        plan = self._plan(tuple(rules))
        if isinstance(plan, str):
            return Decision.deny(Code.RULE_INVALID, plan.replace("{policy}", policy.name), policy.name)
        compiled, deps = plan
        outcomes = await self._run_all(compiled, deps, params)
        for outcome in outcomes:
            if outcome is not None and outcome.failure is not None:
                code, reason = outcome.failure
                return Decision.deny(code, reason, policy.name)
        stored: dict[str, str] = {}
        for outcome in outcomes:
            assert outcome is not None  # every rule ran, since none failed
            stored.update(outcome.stored)
        return Decision.allow(
            Code.RULES_PASSED,
            f'policy "{policy.name}": all {len(compiled)} rules met',
            policy.name,
            tuple([(_upstream_name(name), value) for name, value in stored.items()]),
        )

    async def _run_all(self, rules: list[CompiledRule], deps: list[list[int]],
                       params: Parameters) -> list[RuleOutcome | None]:
        # Rules that need no stored value are rendered and looked up in the cache at once, with
        # no task: a fully cached policy is decided without scheduling anything.
        lookup = params.lookup
        ready: list[RuleOutcome | _Call | None] = [
            None if deps[i] else self._prepare(rule, lookup) for i, rule in enumerate(rules)
        ]
        outcomes: list[RuleOutcome | None] = [r if isinstance(r, RuleOutcome) else None for r in ready]
        # Rules after a known failure cannot change the outcome; rules before it might fail first.
        todo: list[int] = []
        for i, outcome in enumerate(outcomes):
            if outcome is None:
                todo.append(i)
            elif outcome.failure is not None:
                break
        if not todo:
            return outcomes
        if len(todo) == 1 and not deps[todo[0]]:
            call = ready[todo[0]]
            assert isinstance(call, tuple)
            outcomes[todo[0]] = await self._execute(rules[todo[0]], *call)
            return outcomes
        tasks: dict[int, asyncio.Task[RuleOutcome | None]] = {}

        async def run(index: int) -> RuleOutcome | None:
            call = ready[index]
            if call is None:
                stored: dict[str, str] = {}
                for dep in deps[index]:
                    outcome = outcomes[dep] if dep not in tasks else await tasks[dep]
                    if outcome is None or outcome.failure is not None:
                        return None  # a rule it depends on failed: that failure is the reason
                    stored.update(outcome.stored)
                call = self._prepare(rules[index], _lookup_with(params, stored))
                if isinstance(call, RuleOutcome):
                    return call
            assert isinstance(call, tuple)
            return await self._execute(rules[index], *call)

        for index in todo:
            tasks[index] = asyncio.create_task(run(index))
        try:
            pending = set(tasks.values())
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [i for i, t in tasks.items() if t in done and (o := t.result()) is not None and o.failure]
                if failed:
                    first = min(failed)
                    pending = {t for i, t in tasks.items() if t in pending and i < first}
                    for i, task in tasks.items():
                        if i > first:
                            task.cancel()
            for index, task in tasks.items():
                outcomes[index] = task.result() if task.done() and not task.cancelled() else None
            return outcomes
        finally:
            # Also on our own cancellation (Envoy gave up): no webhook call outlives its check.
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    def _plan(self, rules: tuple[CompiledRule, ...]) -> _Plan | str:
        """How to run a policy's rules (the rules and, for each, the earlier rules it waits
        for), or the reason they cannot run. Memoised: a policy's rules are the same objects
        for the whole life of a rules snapshot, so this is worked out once per policy."""
        plan = self._plans.get(rules)  # CompiledRule hashes by identity
        if plan is None:
            if len(self._plans) >= 4096:
                self._plans.clear()  # old snapshots' entries; rebuilt on demand
            plan = self._plans[rules] = _make_plan(rules)
        return plan

    def _prepare(self, rule: CompiledRule, lookup: Callable[[str], str]) -> RuleOutcome | _Call:
        """The rule's outcome if known without calling (unsafe parameter, cache hit), else the
        request to send and its cache key.

        The key digests the rule and the values of the parameters it uses: the rendered request
        is a function of exactly these, so equal keys mean equal webhook requests, and a cache
        hit skips rendering altogether."""
        key = request_key(rule.key_seed(), [lookup(name) for name in rule.request.parameters])
        if rule.rule.cache_ttl > 0:
            cached = self.cache.get(key)
            if cached is not None:
                trace.note(rule.name, "cache", rule.rule.actions, failure=cached.failure,
                           failed_action=cached.failed_action)
                return cached
        try:
            request = rule.request.render(lookup)
        except UnsafeParameter as exc:
            outcome = RuleOutcome((Code.UNSAFE_PARAMETER, f'rule "{rule.name}": {exc}'), {})
            trace.note(rule.name, "not sent", rule.rule.actions, failure=outcome.failure)
            return outcome
        return request, key

    async def _execute(self, rule: CompiledRule, request: WebhookRequest, key: bytes) -> RuleOutcome:
        # Another check's call for an identical request, in flight now, is shared: the trace
        # shows the request this check would have sent and how long it waited.
        shared = trace.note(rule.name, "shared", rule.rule.actions) if key in self.flights else None
        if shared is not None:
            shared.keep_request(request, rule.secret_parts)
        started = time.perf_counter()
        try:
            outcome = await self.flights.do(key, lambda: self._call(rule, request, key))
        except asyncio.CancelledError:
            # A call this check started runs in its context and may go on for a check that
            # joined it: what it answers then was not judged for this one.
            trace.abandon(rule.name)
            raise
        if shared is not None:
            shared.failure, shared.failed_action = outcome.failure, outcome.failed_action
            shared.seconds = time.perf_counter() - started
        return outcome

    async def _call(self, rule: CompiledRule, request: WebhookRequest, key: bytes) -> RuleOutcome:
        """The outcome of a request this pod's cache does not hold, kept there for as long as
        it may be: asked of the fleet first when there is one (``fleet.FleetCache.fetch``)."""
        if self.fleet is not None and rule.rule.cache_ttl > 0:
            outcome, ttl = await self.fleet.fetch(
                rule.name, rule.fingerprint, request, timeout=rule.timeout,
                actions=rule.rule.actions, secret_parts=rule.secret_parts,
                lifetime=functools.partial(self._lifetime, rule), call=lambda: self._call_observed(rule, request))
        else:
            outcome = await self._call_observed(rule, request)
            ttl = self._lifetime(rule, outcome)
        self.cache.put(rule.name, key, outcome, ttl)
        return outcome

    def _lifetime(self, rule: CompiledRule, outcome: RuleOutcome) -> float:
        """Seconds an outcome of ``rule``'s own call may be kept: the rule's TTL for a judged
        answer, at most the failure TTL for a failed call."""
        ttl = rule.rule.cache_ttl
        if outcome.failure is not None and outcome.failure[0] not in _JUDGED:
            ttl = min(ttl, self.failure_ttl)
        return ttl

    async def _call_observed(self, rule: CompiledRule, request: WebhookRequest) -> RuleOutcome:
        started = time.perf_counter()
        outcome = await self._call_and_judge(rule, request)
        if self.on_call is not None:
            self.on_call(rule.name, outcome.failure[0] if outcome.failure else "ok", time.perf_counter() - started)
        return outcome

    async def _call_and_judge(self, rule: CompiledRule, request: WebhookRequest) -> RuleOutcome:
        """The call and the judging of its answer, both within the rule's timeout."""
        started = time.perf_counter()
        noted = trace.note(rule.name, "call", rule.rule.actions)
        if noted is not None:
            noted.keep_request(request, rule.secret_parts)
        try:
            outcome = await self._send_and_judge(rule, request, noted)
        except asyncio.CancelledError:
            # An earlier rule failed, or Envoy gave up: this rule decided nothing, and the
            # trace must not report it as held.
            if noted is not None and not noted.closed:
                noted.source = "not run"
            raise
        # Closed: the check that started the call stopped waiting for it (``_execute``).
        if noted is not None and not noted.closed:
            noted.failure, noted.failed_action = outcome.failure, outcome.failed_action
            noted.seconds = time.perf_counter() - started
        return outcome

    async def _send_and_judge(self, rule: CompiledRule, request: WebhookRequest,
                              noted: trace.RuleTrace | None) -> RuleOutcome:
        deadline = asyncio.get_running_loop().time() + rule.timeout
        try:
            response = await self.client.call(request, timeout=rule.timeout, auth=rule.auth)
        except WebhookFailure as exc:
            return RuleOutcome((exc.code, f'rule "{rule.name}": {exc.reason}'), {})
        if noted is not None:
            noted.keep_answer(response.status, response.content_type, response.body)
        return await self._judge.judge(rule.name, rule.rule.verification, rule.actions,
                                       response.status, response.body, deadline=deadline)


@functools.lru_cache(maxsize=1024)
def _upstream_name(stored: str) -> str:
    """The request header a stored value is sent as (stored names are the rules' own, few)."""
    return UPSTREAM_HEADER_PREFIX + stored.lower()


def judge_response(rule: CompiledRule, response: WebhookResponse) -> RuleOutcome:
    """``judge_answer`` for a compiled rule, on the caller's thread (the admin's dry run)."""
    return judge_answer(rule.name, rule.rule.verification, rule.actions, response.status, response.body)


def _lookup_with(params: Parameters, stored: dict[str, str]) -> Callable[[str], str]:
    def lookup(name: str) -> str:
        if name.startswith(STORED_PREFIX):
            return stored[name[len(STORED_PREFIX):]]
        return params.lookup(name)

    return lookup

"""A webhook's answer judged against its rule, and large answers judged in a process of their own.

``judge_answer`` is the whole judgement (pure): status, verification, response actions, and
stored values fit for a request header. The sidecar and the admin's dry run share it.

Why a process: parsing a 1 MiB answer is 5-80 ms of C code (``json`` with numbers kept as
``Decimal``; a list of 200,000 empty lists is the slowest shape measured) that holds the
interpreter lock throughout. On the event loop it stalls every check; in a thread of the same
process it still does, since each wake-up of the loop waits for the lock — measured, eight such
answers delayed an unrelated check by 175 ms. In another process the parse runs beside the loop,
which only hands over the bytes and gets back the small outcome (an unrelated check: ~2 ms).

``AnswerJudge`` judges answers up to ``INLINE_BYTES`` on the loop (well under a millisecond)
and larger ones in one worker process, started on the first large answer (a fresh interpreter,
≈0.3 s, inside that answer's deadline) and started again if it dies. One process: a burst of
large answers queues there, each waiting at most until its rule's deadline.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from .decision import Code
from .responses import CompiledActions, compile_actions, evaluate_response
from .rules import ResponseAction, Verification
from .templates import unsafe_in_header

__all__ = ["INLINE_BYTES", "MAX_STORED_VALUE_BYTES", "AnswerJudge", "RuleOutcome", "judge_answer"]

MAX_STORED_VALUE_BYTES = 4096
"""A stored value becomes a request header of the upstream (and may be sent to later webhooks):
proxies refuse headers much past 8 KiB in all, so a larger value fails the rule."""
INLINE_BYTES = 16 * 1024
"""Answers up to this size are judged on the event loop; larger ones in the worker process."""


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """``failure`` is (code, reason) or None; ``stored`` the values kept by ``store`` actions
    (empty when the rule failed)."""

    failure: tuple[Code, str] | None
    stored: dict[str, str]


def judge_answer(rule_name: str, verification: Verification, actions: CompiledActions,
                 status: int, body: bytes) -> RuleOutcome:
    """A webhook's answer against its rule: status, verification, response actions, then each
    stored value must fit a header (no control character or line separator, at most
    ``MAX_STORED_VALUE_BYTES``). Never raises."""
    result = evaluate_response(rule_name, status, body, verification, actions)
    if result.failure is not None:
        return RuleOutcome(result.failure, {})
    for stored_name, value in result.stored.items():
        if (what := unsafe_in_header(value)) is not None:
            return RuleOutcome((Code.UNSAFE_PARAMETER,
                                f'rule "{rule_name}": the value stored as "{stored_name}" holds {what}'), {})
        if (size := len(value.encode("utf-8", "surrogatepass"))) > MAX_STORED_VALUE_BYTES:
            return RuleOutcome((Code.RESPONSE_TOO_LARGE, (
                f'rule "{rule_name}": the value stored as "{stored_name}" is {size} bytes, more than '
                f"the {MAX_STORED_VALUE_BYTES} bytes a stored value (a request header) may hold")), {})
    return RuleOutcome(None, result.stored)


# In the worker: each rule's actions compiled once (RE2 patterns cannot be sent across).
_compiled: dict[tuple[ResponseAction, ...], CompiledActions] = {}


def _judge_in_worker(rule_name: str, verification: Verification, actions: tuple[ResponseAction, ...],
                     status: int, body: bytes) -> RuleOutcome:
    compiled = _compiled.get(actions)
    if compiled is None:
        if len(_compiled) >= 1024:
            _compiled.clear()
        compiled = _compiled[actions] = compile_actions(actions)
    return judge_answer(rule_name, verification, compiled, status, body)


class AnswerJudge:
    """Judges answers without holding up the event loop (module docstring). ``close()`` at
    shutdown stops the worker process."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def judge(self, rule_name: str, verification: Verification, actions: CompiledActions,
                    status: int, body: bytes, *, deadline: float) -> RuleOutcome:
        """``judge_answer``, by ``deadline`` (the event loop's clock): past it, the outcome is
        ``webhook_timeout``. A worker that dies makes this answer ``response_invalid``."""
        if len(body) <= INLINE_BYTES:
            return judge_answer(rule_name, verification, actions, status, body)
        pool = self._start()
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.wrap_future(pool.submit(
                    _judge_in_worker, rule_name, verification, actions.actions, status, body))
        except TimeoutError:
            return RuleOutcome((Code.WEBHOOK_TIMEOUT, (
                f'rule "{rule_name}": the answer ({len(body) // 1024} KiB) could not be judged '
                "before the rule's timeout")), {})
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None  # the next large answer starts a new worker
            return RuleOutcome((Code.RESPONSE_INVALID, (
                f'rule "{rule_name}": the answer ({len(body) // 1024} KiB) could not be judged '
                "(the judging process stopped)")), {})

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter, never a fork of a process running gRPC's threads.
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool


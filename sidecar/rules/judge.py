"""A webhook's answer judged against its rule, and large answers judged in a process of their own.

``judge_answer`` is the whole judgement (pure): status, verification, response actions, and
stored values fit for a request header. The sidecar and the admin's dry run share it.

Why a process: parsing a 1 MiB answer is 5-80 ms of C code (``json`` with numbers kept as
``Decimal``; a list of 200,000 empty lists is the slowest shape measured) that holds the
interpreter lock throughout. On the event loop it stalls every check; in a thread of the same
process it still does, since each wake-up of the loop waits for the lock — measured, eight such
answers delayed an unrelated check by 175 ms. In another process the parse runs beside the loop,
which only hands over the bytes and gets back the small outcome (an unrelated check: ~2 ms).

``AnswerJudge`` judges answers up to ``INLINE_BYTES`` on the loop (a few milliseconds at worst,
``AnswerJudge.judge``) and larger ones in one worker process, started on the first large answer
(a fresh interpreter, ≈0.3 s, inside that answer's deadline), stopped when an answer outlives
its deadline there and started again when needed. One process: a burst of large answers queues
there, each waiting at most until its rule's deadline, and holding its body (up to 1 MiB) while
it waits. So the queue is bounded in bytes (``MAX_WAITING_BYTES``): an answer that would pass the
bound fails its rule at once (``response_invalid``), and a webhook that answers 1 MiB to every
call cannot pile up memory. A process that cannot be started or
reached (no file descriptors left, the server shutting down) fails the rule
(``response_invalid``), as one that dies does.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from dataclasses import dataclass
from multiprocessing.connection import Connection

from ..decision import Code
from .model import ActionType, ResponseAction, Verification
from .responses import CompiledActions, compile_actions, evaluate_response
from .unsafe import unsafe_in_header

__all__ = ["INLINE_BYTES", "MAX_STORED_VALUE_BYTES", "MAX_WAITING_BYTES", "AnswerJudge", "RuleOutcome",
           "judge_answer"]

log = logging.getLogger(__name__)

MAX_STORED_VALUE_BYTES = 4096
"""A stored value becomes a request header of the upstream (and may be sent to later webhooks):
proxies refuse headers much past 8 KiB in all, so a larger value fails the rule."""
INLINE_BYTES = 16 * 1024
"""Answers up to this size are judged on the event loop; larger ones in the worker process."""
MAX_WAITING_BYTES = 16 << 20
"""Bytes of answers that may wait for the worker process (or be judged there) at once. The
worker judges 1 MiB in 5-80 ms, so 16 MiB is up to ~1.3 s of work queued: more than an answer
can wait within the usual rule timeouts, while a burst of answers just over ``INLINE_BYTES``
(hundreds of them) still fits."""


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """``failure`` is (code, reason) or None; ``stored`` the values kept by ``store`` actions
    (empty when the rule failed)."""

    failure: tuple[Code, str] | None
    stored: dict[str, str]
    failed_action: int | None = None
    """The index of the response action that did not hold (for the trace), when one did not."""


def judge_answer(rule_name: str, verification: Verification, actions: CompiledActions,
                 status: int, body: bytes) -> RuleOutcome:
    """A webhook's answer against its rule: status, verification, response actions, then each
    stored value must fit a header (no control character or line separator, at most
    ``MAX_STORED_VALUE_BYTES``). Never raises."""
    result = evaluate_response(rule_name, status, body, verification, actions)
    if result.failure is not None:
        return RuleOutcome(result.failure, {}, result.failed_action)
    for stored_name, value in result.stored.items():
        if (what := unsafe_in_header(value)) is not None:
            return RuleOutcome((Code.UNSAFE_PARAMETER,
                                f'rule "{rule_name}": the value stored as "{stored_name}" holds {what}'), {},
                               _store_action(actions, stored_name))
        if (size := len(value.encode("utf-8", "surrogatepass"))) > MAX_STORED_VALUE_BYTES:
            return RuleOutcome((Code.RESPONSE_TOO_LARGE, (
                f'rule "{rule_name}": the value stored as "{stored_name}" is {size} bytes, more than '
                f"the {MAX_STORED_VALUE_BYTES} bytes a stored value (a request header) may hold")), {},
                _store_action(actions, stored_name))
    return RuleOutcome(None, result.stored)


def _store_action(actions: CompiledActions, name: str) -> int:
    """The index of the last ``store`` action keeping ``name`` (the one whose value counts)."""
    return max(i for i, a in enumerate(actions.actions) if a.type is ActionType.STORE and a.value == name)


# In the worker: each rule's actions compiled once (RE2 patterns cannot be sent across).
_compiled: dict[tuple[ResponseAction, ...], CompiledActions] = {}

_Request = tuple[str, Verification, tuple[ResponseAction, ...], int, bytes]


def _judge_in_worker(rule_name: str, verification: Verification, actions: tuple[ResponseAction, ...],
                     status: int, body: bytes) -> RuleOutcome:
    compiled = _compiled.get(actions)
    if compiled is None:
        if len(_compiled) >= 1024:
            _compiled.clear()
        compiled = _compiled[actions] = compile_actions(actions)
    return judge_answer(rule_name, verification, compiled, status, body)


def _serve(connection: Connection) -> None:
    """The worker process: judge each request it is sent until the pipe closes."""
    while True:
        try:
            request: _Request = connection.recv()
        except (EOFError, OSError):
            return
        connection.send(_judge_in_worker(*request))


class _WorkerStopped(Exception):
    """The worker process died, or was stopped, before it answered."""


class _Worker:
    """One judging process and the pipe to it."""

    def __init__(self) -> None:
        # spawn: a fresh interpreter, never a fork of a process running gRPC's threads.
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        try:
            self._process = context.Process(target=_serve, args=(child,), name="safous-judge", daemon=True)
            self._process.start()
        except BaseException:
            self._connection.close()  # a process never started: its pipe must not leak
            raise
        finally:
            child.close()  # the child's end is the child's alone once started

    def call(self, request: _Request) -> RuleOutcome:
        """Blocking: run it in a thread. Raises ``_WorkerStopped``."""
        try:
            self._connection.send(request)
            outcome: RuleOutcome = self._connection.recv()
            return outcome
        except (EOFError, OSError):
            self._process.join(1)  # reap it
            raise _WorkerStopped from None

    def stop(self) -> None:
        """Kill the process: a caller blocked in ``call`` gets ``_WorkerStopped``."""
        self._process.kill()


class AnswerJudge:
    """Judges answers without holding up the event loop (module docstring). ``close()`` at
    shutdown stops the worker process."""

    def __init__(self) -> None:
        self._worker: _Worker | None = None
        self._turn = asyncio.Lock()
        self._waiting = 0  # bytes of the answers waiting for the worker or judged there

    async def judge(self, rule_name: str, verification: Verification, actions: CompiledActions,
                    status: int, body: bytes, *, deadline: float) -> RuleOutcome:
        """``judge_answer``, by ``deadline`` (the event loop's clock): past it, the outcome is
        ``webhook_timeout``, and a worker still judging is stopped (a regex can take seconds
        on 1 MiB) and started again for the next answer. A worker that dies makes this answer
        ``response_invalid``.

        On the loop: answers small enough that parsing and matching cost a few milliseconds at
        worst — ``INLINE_BYTES``, less for rules whose regexes are large programs. Parsing 16
        KiB takes up to ~1.3 ms (5-80 ms a MiB); when a regex's DFA does not fit, RE2 costs ~12 ns
        per program instruction and byte (``[ab]{1000}[ab]{1000}c``, 2,005 instructions: 24 µs
        a byte), so the regexes of an answer judged here take at most ~1.6 ms in all
        (``regex_size`` × bytes ≤ 8 × ``INLINE_BYTES`` steps).

        A worker that cannot be started or reached fails the rule (``response_invalid``), as
        does an answer that would make more than ``MAX_WAITING_BYTES`` of answers wait for it:
        an evaluator never raises for a rule's failure."""
        if len(body) * (1 + actions.regex_size / 8) <= INLINE_BYTES:
            return judge_answer(rule_name, verification, actions, status, body)
        if self._waiting + len(body) > MAX_WAITING_BYTES:
            return _unjudged(rule_name, body, (
                f"more than {MAX_WAITING_BYTES >> 20} MiB of answers would wait for the judging process"))
        self._waiting += len(body)
        try:
            return await self._judge_in_worker(rule_name, verification, actions, status, body, deadline)
        finally:
            self._waiting -= len(body)

    async def _judge_in_worker(self, rule_name: str, verification: Verification, actions: CompiledActions,
                               status: int, body: bytes, deadline: float) -> RuleOutcome:
        try:
            async with asyncio.timeout_at(deadline), self._turn:
                try:
                    worker = self._worker = self._worker or _Worker()
                    return await asyncio.to_thread(
                        worker.call, (rule_name, verification, actions.actions, status, body))
                except asyncio.CancelledError:
                    self._stop()
                    raise
                except _WorkerStopped:
                    self._stop()
                    return _unjudged(rule_name, body, "the judging process stopped")
                except (OSError, RuntimeError):
                    # Fork or pipe refused (no descriptors or memory left), or the thread pool
                    # already shut down. A half-used pipe could hand the next answer this
                    # one's outcome, so the worker, if any, goes.
                    log.exception("could not judge a webhook answer in the judging process")
                    self._stop()
                    return _unjudged(rule_name, body, "the judging process could not be started or reached")
        except TimeoutError:
            return RuleOutcome((Code.WEBHOOK_TIMEOUT, (
                f'rule "{rule_name}": the answer ({len(body) // 1024} KiB) could not be judged '
                "before the rule's timeout")), {})

    def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.stop()


def _unjudged(rule_name: str, body: bytes, why: str) -> RuleOutcome:
    return RuleOutcome((Code.RESPONSE_INVALID, (
        f'rule "{rule_name}": the answer ({len(body) // 1024} KiB) could not be judged ({why})')), {})

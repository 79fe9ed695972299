"""The sidecar's side of bundles (``serve --bundle SOURCE``): poll the source, verify, apply to
rules.db, report.

With ``--bundle`` set the bundle owns rules and policies. Each new version of the source is
verified (signature by key id, content hash, no literal secret), validated exactly as the admin
script validates an import (both use ``sidecar.exchange``: what it refuses, a bundle cannot
bring in), then applied in one ``admin_transaction`` with actor ``bundle:<revision>`` together
with its ``bundle_state`` row; the rules watcher then reloads it (asked at once, so a new
revision answers without waiting for the next reload tick).

Fail closed, keep the last good: anything that goes wrong (``BundleRefused``, whatever the
reason) changes nothing in rules.db, so the last applied revision keeps answering; the reason
is logged once per change of reason (``bundle not applied``), counted by reason
(``safous_bundle_activation_failures_total``) and shown by ``/readyz``. Only a sequence greater
than the applied one is applied: a replayed old bundle cannot roll a fix back.

Start-up: a rules.db holding an applied revision serves it at once; one without, or one whose
revision is below ``--bundle-min-sequence``, is not ready (the checker denies ``not_ready``)
until a revision applies.

Stopping ends an apply under way (its process is terminated: SQLite rolls the open transaction
back), so nothing is applied after the sidecar said it stopped.

Polling: every ``--bundle-poll-interval`` seconds, less a random 0-20 % (sidecars started
together spread out, and the interval stays a bound); while the source fails, or serves bytes
that do not verify, the interval doubles per failure up to 8 times itself.

Only verified bytes are remembered (their ETag, their file's identity): those applied, and those
refused for what their verified content says (``VERIFIED_REFUSALS``), which would say it again.
Bytes that did not verify may be the channel's doing (a proxy or a CDN edge that damaged them, a
file read half written), so the next poll reads the source again: remembering them would turn
the good bytes served under the same ETag into a 304 and keep the old revision answering.
They are remembered for the rules.db they were verified against: once the sidecar follows
another file under its name (``mv``), the revision answering is the one that file holds (none,
for a file that is no bundle's: not ready) and the source is read and applied again.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sidecar import db
from sidecar.exchange import InvalidContent, apply_import, plan_import
from sidecar.rules.secrets import SecretPolicy, resolve_secret
from sidecar.settings import Settings
from sidecar.snapshot import cancel_and_wait

from ._format import (
    REFUSAL_REASONS,
    Bundle,
    BundleRefused,
    RefusalReason,
    load_verification_key,
    parse_bundle,
)
from ._sources import BundleSource, FileSource, HttpSource

__all__ = ["BundleSync", "apply_bundle", "open_source"]

log = logging.getLogger(__name__)

_MAX_BACKOFF = 8  # times the poll interval
FETCH_RESULTS = ("200", "304", "failed")
_MAX_ERROR_CHARS = 300  # of an unexpected exception's text, in the log line and /readyz
_STOP_SECONDS = 5.0  # for a terminated apply process to be gone, before it is killed
_APPLY_NICENESS = 10  # added to the apply process's: the checks' loop comes first
# Raised once the bytes are known whole (signature, or with --bundle-insecure-skip-verify the
# content hash, checked): the same bytes would be refused again.
VERIFIED_REFUSALS: frozenset[RefusalReason] = frozenset({"older_revision", "invalid_content", "literal_secret"})


def apply_bundle(path: Path, bundle: Bundle, source: str, secrets: SecretPolicy, min_sequence: int = 0, *,
                 followed: tuple[int, int] | None = None) -> bool:
    """Apply ``bundle`` to the rules.db at ``path`` in one transaction, audited with actor
    ``bundle:<revision>``. Returns False when that very revision is already applied (nothing
    written, nothing audited). Blocks. Raises ``BundleRefused`` (older_revision,
    invalid_content, store_error); nothing is written then. A sequence below ``min_sequence``
    is ``older_revision``, whatever rules.db holds (it remembers only what it applied: an empty
    one would take any).

    ``followed``: the file (st_dev, st_ino) the sidecar's connections are on. Another file
    under the name is refused (store_error, tried again next poll) until the sidecar has
    followed it: until then the old file's -wal may still be beside it (``sidecar.db.replaced``),
    and a connection opened now would pair the two."""
    identity = db.file_identity(path)
    if followed is not None and identity != followed:
        raise BundleRefused("store_error", f"{path} was replaced and the sidecar has not followed it yet")
    try:
        conn = db.connect(path, create=False)
    except db.StoreError as exc:
        raise BundleRefused("store_error", str(exc)) from None
    try:
        with db.admin_transaction(conn, f"bundle:{bundle.revision}"):
            # Holding the write lock: a file put under the name since it was opened gets
            # nothing through this connection, whose writes would reach only the old file.
            if db.file_identity(path) != identity:
                raise BundleRefused("store_error", f"{path} was replaced while the bundle was applied")
            state = db.read_bundle_state(conn)
            # Before "already applied": a rules.db holding this very revision below the floor
            # does not make it acceptable.
            if bundle.sequence < min_sequence:
                raise BundleRefused("older_revision", f"sequence {bundle.sequence} is below "
                                    f"--bundle-min-sequence {min_sequence}")
            if state is not None:
                if state.sequence == bundle.sequence and state.content_sha256 == bundle.content_sha256:
                    return False
                if bundle.sequence <= state.sequence:
                    raise BundleRefused("older_revision", f"revision {bundle.revision} is not newer than the "
                                        f"applied {state.revision}: to roll back, build a new bundle from the "
                                        "older content")
            try:
                plan = plan_import(bundle.document, db.read_rules(conn), db.read_policies(conn), replace=True,
                                   secrets=secrets)
            except InvalidContent as exc:
                raise BundleRefused("invalid_content", str(exc)) from None
            apply_import(conn, plan)
            db.write_bundle_state(conn, db.BundleState(bundle.revision, bundle.sequence, bundle.content_sha256,
                                                       bundle.key_id, source))
    except db.StoreError as exc:
        raise BundleRefused("store_error", str(exc)) from None
    finally:
        conn.close()
    return True


def verify_and_apply(path: str, body: bytes, key_specs: tuple[str, ...], verify: bool, source: str,
                     secrets: SecretPolicy, min_sequence: int = 0,
                     followed: tuple[int, int] | None = None) -> tuple[str, str | None, bool]:
    """In the apply process: verify ``body`` with the keys ``key_specs`` name and apply it
    (``apply_bundle``); the revision, its key id and whether it was applied. Raises
    ``BundleRefused``.

    A process of its own because validating and writing 10,000 rules is seconds of Python: in
    a thread of the sidecar it held the interpreter against the event loop (checks waited up to
    0.9 s); here the loop only waits for the answer."""
    # Read here, per bundle, so that a key file replaced since start-up is the one used.
    try:
        keys = {key.key_id: key for key in (load_verification_key(spec) for spec in key_specs)}
    except ValueError as exc:
        # This sidecar's file, not the bundle, is at fault: store_error, tried again next poll.
        raise BundleRefused("store_error", str(exc)) from None
    bundle = parse_bundle(body, keys, verify=verify)
    return bundle.revision, bundle.key_id, apply_bundle(Path(path), bundle, source, secrets, min_sequence,
                                                        followed=followed)


def open_source(settings: Settings) -> BundleSource:
    """The source ``--bundle`` names: an http(s) URL, else a file path."""
    spec = settings.bundle or ""
    if spec.startswith(("http://", "https://")):
        reference, policy = settings.bundle_bearer_token, settings.secret_policy
        return HttpSource(spec, settings.bundle_max_bytes,
                          ca_bundle=str(settings.bundle_ca_bundle) if settings.bundle_ca_bundle else None,
                          bearer=(lambda: resolve_secret(reference, policy)) if reference else None)
    return FileSource(Path(spec), settings.bundle_max_bytes)


class BundleSync:
    """Follows ``--bundle`` for one sidecar. ``on_applied`` is awaited after each revision
    applied (the server reloads rules.db then). ``rng``: a random number in [0, 1) for the jitter."""

    def __init__(self, settings: Settings, on_applied: Callable[[], Awaitable[None]], *,
                 source: BundleSource | None = None, rng: Callable[[], float] = random.random) -> None:
        self._db = settings.db
        self._file = db.DatabaseFile.at(settings.db)
        self._secrets = settings.secret_policy
        self._interval = settings.bundle_poll_interval
        self._verify = not settings.bundle_insecure_skip_verify
        self._min_sequence = settings.bundle_min_sequence
        self._key_specs = settings.bundle_verification_key
        self.source = source or open_source(settings)
        self._on_applied = on_applied
        self._rng = rng
        self._task: asyncio.Task[None] | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._apply: Future[tuple[str, str | None, bool]] | None = None  # the apply last submitted
        # The rules.db (st_dev, st_ino) that ``applied`` was read from and the source's remembered
        # tag verified against: another file under the name (mv) holds neither.
        self._file_seen: tuple[int, int] | None = None
        self.applied: db.BundleState | None = None
        self.last_activation: float | None = None
        self.last_failure: tuple[RefusalReason, str] | None = None
        self.failures_in_row = 0
        self.fetches = dict.fromkeys(FETCH_RESULTS, 0)
        self.refusals: dict[RefusalReason, int] = dict.fromkeys(REFUSAL_REASONS, 0)

    async def start(self) -> None:
        """Read the verification keys and the applied revision, then poll (the first time at
        once). Raises ValueError (a key) or ``StoreError``."""
        keys = sorted({load_verification_key(spec).key_id for spec in self._key_specs})
        if not self._verify:
            log.warning("bundle signatures are NOT verified (--bundle-insecure-skip-verify): whoever can write "
                        "the source decides what this sidecar allows", extra={"source": self.source.name})
        state, self._file_seen = await asyncio.to_thread(self._read_state)
        self._answer_by(state)
        log.info("following bundle", extra={"source": self.source.name, "keys": keys,
                                            "revision": self.applied.revision if self.applied else None})
        self._task = asyncio.create_task(self._run(), name="bundle-sync")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.source.close()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._apply is not None and not self._apply.done():
            # Cancelling the task cannot stop an apply already running, and the executor would
            # wait for it at exit (seconds for 10,000 rules), then commit after "stopped".
            # Ending the process rolls its open transaction back.
            await asyncio.to_thread(_terminate, pool)
        pool.shutdown(wait=False, cancel_futures=True)

    def _answer_by(self, state: db.BundleState | None) -> None:
        """Make ``state``, read from rules.db, the revision answering, unless it is below the floor."""
        if state is not None and state.sequence < self._min_sequence:
            # A revision older than the floor is what the floor is there to keep from answering,
            # however it got into rules.db (applied before the floor was raised, a copied file).
            why = (f"rules.db holds revision {state.revision}, below --bundle-min-sequence {self._min_sequence}: "
                   "not served until a bundle of that sequence or later applies")
            log.error("bundle revision not served", extra={"revision": state.revision, "error": why,
                                                           "source": self.source.name})
            self.last_failure = ("older_revision", why)
            state = None
        self.applied = state
        self.last_activation = _timestamp(state.applied_at) if state is not None else None

    def _read_state(self) -> tuple[db.BundleState | None, tuple[int, int] | None]:
        """rules.db's bundle state, and the file it was read from (no switch while it is read)."""
        with self._file.opened(readonly=True) as conn:
            return db.read_bundle_state(conn), self._file.identity

    async def _follow_rules_db(self) -> bool:
        """If the sidecar has followed another file under rules.db's name (mv) since ``applied``
        was read and the remembered tag verified: forget the tag, so that the source is read and
        applied to this file (a revision it holds already is not applied twice), and answer by
        the revision this file holds. False when it cannot be read (refused: the next poll
        tries again)."""
        identity = self._file.identity
        if identity is None or identity == self._file_seen:
            return True
        self.source.remember(None)
        try:
            state, self._file_seen = await asyncio.to_thread(self._read_state)
        except db.StoreError as exc:
            self._failed(BundleRefused("store_error", str(exc)))
            return False
        log.info("rules.db is another file: its bundle revision read again", extra={
            "source": self.source.name, "revision": state.revision if state is not None else None})
        self._answer_by(state)
        return True

    def next_delay(self) -> float:
        """Seconds until the next poll: the interval (doubled per failure in a row, at most 8
        times), less a random 0-20 %."""
        factor = min(2 ** self.failures_in_row, _MAX_BACKOFF)
        return float(self._interval * factor * (1 - 0.2 * self._rng()))

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a bug here must not end the polling; the last good keeps serving
                log.exception("bundle poll failed")
            await asyncio.sleep(self.next_delay())

    async def poll_once(self) -> str:
        """One poll: ``applied``, ``unchanged``, ``refused`` or ``failed`` (the source)."""
        if not await self._follow_rules_db():
            return "refused"
        try:
            fetched = await self.source.fetch()
        except BundleRefused as exc:
            self.fetches["failed"] += 1
            self._failed(exc)
            return "failed"
        if self.last_failure is not None and self.last_failure[0] in ("fetch_failed", "too_large", "truncated"):
            log.info("bundle source readable again", extra={"source": self.source.name})
            self.last_failure = None
        self.fetches["304" if fetched is None else "200"] += 1
        if fetched is None or fetched.tag == self.source.remembered:
            self.failures_in_row = 0
            return "unchanged"
        followed = self._file.identity
        try:
            self._apply = self._apply_process().submit(
                verify_and_apply, str(self._db), fetched.body, tuple(self._key_specs), self._verify,
                self.source.name, self._secrets, self._min_sequence, followed)
            revision, key_id, applied = await asyncio.wrap_future(self._apply)
        except BrokenProcessPool:
            broken, self._pool = self._pool, None  # started afresh on the next poll
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            self._failed(BundleRefused("store_error", "the apply process stopped"))
            return "refused"
        except BundleRefused as exc:
            if exc.reason in VERIFIED_REFUSALS:
                self._verified(fetched.tag, followed)
                self._refused(exc)
            else:
                self._failed(exc)
            return "refused"
        except Exception as exc:  # noqa: BLE001 - logged with its traceback by _refused
            # An input the checks missed, or a bug: refused like a bundle that is not one. Not
            # remembered: nothing says whether the bytes verified before it.
            text = f"the apply failed unexpectedly: {type(exc).__name__}: {exc}"
            self._failed(BundleRefused("malformed", text[:_MAX_ERROR_CHARS]), cause=exc)
            return "refused"
        self._verified(fetched.tag, followed)
        if not applied:
            # That very revision is in rules.db already: applied by another process on it (a
            # --workers sibling) after this one read the state. Answer by it too; whatever this
            # one failed with before (e.g. store_error, losing that race) is over.
            self.last_failure = None
            state, _ = await asyncio.to_thread(self._read_state)
            if state is None or (self.applied is not None and state.revision == self.applied.revision):
                return "unchanged"
            self.applied, self.last_activation = state, _timestamp(state.applied_at)
            await self._on_applied()
            return "unchanged"
        self.applied, _ = await asyncio.to_thread(self._read_state)
        self.last_activation = time.time()
        self.last_failure = None
        log.info("bundle applied", extra={"revision": revision, "source": self.source.name, "key_id": key_id})
        await self._on_applied()
        return "applied"

    def _apply_process(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter, never a fork of a process running gRPC's threads.
            # Niced: seconds of validation and writes are background work, and on a pod's few
            # cores they must not take the CPU from the loop answering checks.
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_background_priority)
        return self._pool

    def _verified(self, tag: str, file: tuple[int, int] | None) -> None:
        """The bytes of ``tag`` verified against rules.db ``file``: not read again until the
        source changes or rules.db is another file, and the source is well (no backoff)."""
        self.source.remember(tag)
        self._file_seen = file
        self.failures_in_row = 0

    def _failed(self, exc: BundleRefused, *, cause: BaseException | None = None) -> None:
        """The source, or the apply, failed for a reason that may pass (nothing verified says it
        would again): back off, and report it (``_refused``)."""
        self.failures_in_row += 1
        self._refused(exc, cause=cause)

    def _refused(self, exc: BundleRefused, *, cause: BaseException | None = None) -> None:
        """Count, report (logged once per change; ``cause``'s traceback with it) and show it."""
        self.refusals[exc.reason] += 1
        failure = (exc.reason, str(exc))
        if failure != self.last_failure:
            log.error("bundle not applied", exc_info=cause,
                      extra={"reason": exc.reason, "error": str(exc), "source": self.source.name,
                             "revision": self.applied.revision if self.applied else None})
        self.last_failure = failure

    def not_ready(self) -> str | None:
        """Why the sidecar is not ready on account of bundles: no revision applied yet."""
        if self.applied is not None:
            return None
        why = f": {self.last_failure[0]}: {self.last_failure[1]}" if self.last_failure else ""
        return f"no bundle revision applied yet from {self.source.name}{why}"

    def detail(self) -> str:
        """Lines for /readyz: the revision answering and the last failure, if any."""
        lines = []
        if self.applied is not None:
            lines.append(f"bundle: revision {self.applied.revision} from {self.applied.source}, "
                         f"applied {self.applied.applied_at}")
        if self.last_failure is not None:
            lines.append(f"bundle: last failure: {self.last_failure[0]}: {self.last_failure[1]}")
        return "".join(line + "\n" for line in lines)

    def metrics(self) -> Iterator[Any]:
        info = GaugeMetricFamily("safous_bundle_revision_info", "The bundle revision this sidecar answers by "
                                 "(1; absent before the first)", labels=["revision"])
        if self.applied is not None:
            info.add_metric([self.applied.revision], 1)
        yield info
        yield GaugeMetricFamily("safous_bundle_last_activation_timestamp_seconds",
                                "When the answering revision was applied (0: none yet)",
                                value=self.last_activation or 0)
        failures = CounterMetricFamily("safous_bundle_activation_failures", "Bundles or downloads not "
                                       "applied, by reason", labels=["reason"])
        for reason, count in self.refusals.items():
            failures.add_metric([reason], count)
        yield failures
        fetches = CounterMetricFamily("safous_bundle_fetches", "Polls of the bundle source by result: 200 "
                                      "(a new version read), 304 (unchanged), failed", labels=["result"])
        for result, count in self.fetches.items():
            fetches.add_metric([result], count)
        yield fetches


def _background_priority() -> None:
    os.nice(_APPLY_NICENESS)


def _terminate(pool: ProcessPoolExecutor) -> None:
    """End ``pool``'s processes and wait until they are gone. Blocks."""
    # _processes is the executor's own (pid -> Process); copied, since its thread edits it.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(_STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()


def _timestamp(iso: str) -> float | None:
    try:
        return db.parse_iso_time(iso)
    except ValueError:
        return None

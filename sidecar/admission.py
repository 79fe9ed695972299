"""Admission: which checks the sidecar decides, and which it answers ``overloaded`` at once.

A check is refused, before any rule runs, when

- ``limit`` checks are already in progress (being decided: most often waiting for webhooks), so
  that a slow or hanging third party cannot pile up work and memory without bound; or
- the proxy has already stopped waiting for it: its gRPC deadline (Envoy sends its ext_authz
  ``timeout`` as the call's ``grpc-timeout``) passed while the call queued, so whatever the
  rules said would be dropped — and the webhooks would have been called for nothing.

A refusal is a decision like any other (a deny with code ``overloaded`` and a reason), recorded
in the activity log and counted; it is never a gRPC error. Used on the event loop only.
"""

from __future__ import annotations

from typing import Literal

from .decision import Code, Decision

Cause = Literal["in_progress", "deadline"]
CAUSES: tuple[Cause, ...] = ("in_progress", "deadline")

LATE = Decision.deny(
    Code.OVERLOADED, "the authorization sidecar is overloaded: this check waited past the proxy's deadline "
    "before it could start, so it was answered without running any rule")


class Admission:
    """Checks in progress, bounded by ``limit``. ``admit`` then ``leave`` (in a ``finally``)
    around each admitted check."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_progress = 0
        self.refused: dict[Cause, int] = dict.fromkeys(CAUSES, 0)
        self._busy = Decision.deny(
            Code.OVERLOADED, f"the authorization sidecar is overloaded: {limit} checks were already in progress, "
            "so this one was answered without running any rule")

    def admit(self, time_remaining: float | None) -> Decision | None:
        """None when the check may go on (the caller then owes a ``leave``), else the
        ``overloaded`` decision to answer it with. ``time_remaining``: seconds before the
        caller's deadline, None when it set none."""
        if time_remaining is not None and time_remaining <= 0:
            self.refused["deadline"] += 1
            return LATE
        if self.in_progress >= self.limit:
            self.refused["in_progress"] += 1
            return self._busy
        self.in_progress += 1
        return None

    def leave(self) -> None:
        self.in_progress -= 1

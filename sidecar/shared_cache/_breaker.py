"""A circuit breaker: stop asking a server that keeps failing, and try it again now and then."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}
"""The breaker's state as its gauge reports it."""


class Breaker:
    """``closed``: every operation goes. ``failures`` failures in a row open it: no operation
    goes for ``seconds``. Then ``half_open``: one operation goes (the probe) and the others do
    not; the probe's success closes it, its failure opens it again, and a probe whose caller
    left without an outcome lets the next operation probe. ``clock``: monotonic seconds."""

    def __init__(self, seconds: float, *, failures: int = 5, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.failures = failures
        self._clock = clock
        self.state: State = "closed"
        self._in_a_row = 0
        self._until = 0.0
        self._probing = False
        self.trips = 0

    def allow(self) -> bool:
        """Whether an operation may go now; every allowed one must end in ``succeeded``,
        ``failed`` or ``abandoned``."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() < self._until:
                return False
            self.state = "half_open"
        if self._probing:
            return False
        self._probing = True
        return True

    def succeeded(self) -> bool:
        """Record a success; True when it closes the breaker."""
        self._in_a_row = 0
        self._probing = False
        if self.state == "closed":
            return False
        self.state = "closed"
        return True

    def failed(self) -> bool:
        """Record a failure; True when it opens the breaker."""
        self._probing = False
        self._in_a_row += 1
        if self.state == "half_open" or (self.state == "closed" and self._in_a_row >= self.failures):
            self.state, self._until = "open", self._clock() + self.seconds
            self.trips += 1
            return True
        return False

    def abandoned(self) -> None:
        """An allowed operation ended with no outcome (its caller was cancelled)."""
        self._probing = False

"""The order a policy's rules run in: which earlier rule stores each value a rule uses.

A rule may use ``%stored.NAME%`` only if an earlier rule of the same policy stores NAME with a
store response action; it then depends on the latest such rule. This is the one statement of
that order, shared by the sidecar's plan (``sidecar.rules.evaluator``) and the admin script's
checks: it sees each rule only as the names it uses and the names it stores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Unstored", "stored_dependencies"]


@dataclass(frozen=True, slots=True)
class Unstored:
    """Rule ``index`` uses ``%stored.NAME%`` for ``name``, and no earlier rule stores it."""

    index: int
    name: str


def stored_dependencies(rules: Iterable[tuple[Iterable[str], Iterable[str]]]) -> list[list[int]] | Unstored:
    """For each rule, given in order as ``(names it uses, names it stores)``: the sorted indexes
    of the earlier rules whose stored values it uses. Or, for the first name used that no
    earlier rule stores, ``Unstored`` (a rule's own stores do not count for its own uses)."""
    producers: dict[str, int] = {}
    dependencies: list[list[int]] = []
    for index, (uses, stores) in enumerate(rules):
        needed: set[int] = set()
        for name in uses:
            if name not in producers:
                return Unstored(index, name)
            needed.add(producers[name])
        dependencies.append(sorted(needed))
        producers.update(dict.fromkeys(stores, index))
    return dependencies

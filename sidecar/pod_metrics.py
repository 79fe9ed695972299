"""One view of a pod's metrics under ``--workers``: the workers' expositions merged.

Each worker keeps its own prometheus-client registry and serves it on a private socket; the
supervisor scrapes them all whenever ``/metrics`` is asked for and answers one exposition:

- counters, histograms and summaries are **summed** over the workers (same name and labels);
- gauges (and other types) keep one series per worker, labelled ``worker="N"``: the sum of two
  snapshot versions or two queue depths means nothing;
- a worker that died and was started again must not make a counter go down (Prometheus would
  read a reset): what its previous incarnation had counted at its last scrape is kept and added
  (``PodTotals.retire``). Counts between that scrape and its death are lost with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["PodTotals", "WorkerSamples", "merge_expositions", "parse_exposition"]

_SUMMED = frozenset({"counter", "histogram", "summary"})

# (sample name, sorted label pairs) -> value
_Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class WorkerSamples:
    """One worker's scrape: summed families' series, and every other family as parsed."""

    summed: dict[tuple[str, str, str], _Series] = field(default_factory=dict)  # (name, type, help)
    other: list[Metric] = field(default_factory=list)


def parse_exposition(text: str) -> WorkerSamples:
    """A worker's ``/metrics`` text. Raises ValueError for text that is not an exposition."""
    samples = WorkerSamples()
    for family in text_string_to_metric_families(text):
        if family.type in _SUMMED:
            series = samples.summed.setdefault((family.name, family.type, family.documentation), {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                series[key] = series.get(key, 0.0) + sample.value
        else:
            samples.other.append(family)
    return samples


@dataclass
class PodTotals:
    """What workers that are gone had counted: added to every later merge."""

    retired: dict[tuple[str, str, str], _Series] = field(default_factory=dict)

    def retire(self, last: WorkerSamples | None) -> None:
        """Keep the summed series of a worker's last scrape (it died or is being replaced)."""
        if last is None:
            return
        for family, series in last.summed.items():
            kept = self.retired.setdefault(family, {})
            for key, value in series.items():
                kept[key] = kept.get(key, 0.0) + value


def merge_expositions(workers: Mapping[int, WorkerSamples], totals: PodTotals,
                      extra: Iterable[Metric] = ()) -> bytes:
    """One exposition for the pod: summed families (live workers plus ``totals``), the other
    families per worker with a ``worker`` label, then ``extra`` (the supervisor's own)."""
    summed: dict[tuple[str, str, str], _Series] = {f: dict(s) for f, s in totals.retired.items()}
    for samples in workers.values():
        for family, series in samples.summed.items():
            merged = summed.setdefault(family, {})
            for key, value in series.items():
                merged[key] = merged.get(key, 0.0) + value
    families: list[Metric] = []
    for (name, kind, documentation), series in summed.items():
        total = Metric(name, documentation, kind)
        for (sample_name, labels), value in series.items():
            total.add_sample(sample_name, dict(labels), value)
        families.append(total)
    per_worker: dict[tuple[str, str, str], Metric] = {}
    for index, samples in sorted(workers.items()):
        for parsed in samples.other:
            labelled = per_worker.setdefault((parsed.name, parsed.type, parsed.documentation),
                                             Metric(parsed.name, parsed.documentation, parsed.type))
            for sample in parsed.samples:
                labelled.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value)
    families.extend(per_worker.values())
    families.extend(extra)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)

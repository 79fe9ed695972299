"""One view of a pod's metrics under ``--workers``: the workers' expositions merged.

Each worker keeps its own prometheus-client registry and serves it on a private socket; the
supervisor scrapes them all whenever ``/metrics`` is asked for and answers one exposition:

- counters, histograms and summaries are **summed** over the workers (same name and labels);
- gauges (and other types) keep one series per worker, labelled ``worker="N"``: the sum of two
  snapshot versions or two queue depths means nothing;
- a worker that died and was started again must not make a counter go down (Prometheus would
  read a reset): what its previous incarnation had counted when its page was last read is kept
  and added (``PodTotals.retire``). Counts between that read and its death are lost with it.

Summed families are the bulk of a page (a histogram per rule, a counter per policy, result and
code): 300 rules and 100 policies make 500 KB, which prometheus-client's parser reads in about
90 ms. So their series are handled as the text the worker wrote: a series line is
``NAME{LABELS} VALUE``, and a ``NAME{LABELS}`` that passed prometheus-client's parser in the
same family of the same worker's previous scrape is taken as it is; only a family holding a
series not seen before is parsed in full. The workers all run this code, so one series is
written the same way by each, and the text is the key the sum is made on. The few other
families are parsed every time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["PodTotals", "WorkerSamples", "merge_expositions", "parse_exposition"]

_SUMMED = frozenset({"counter", "histogram", "summary"})

# (name as the TYPE line writes it, type, the HELP line's text as written)
_Family = tuple[str, str, str]
# a series line's NAME{LABELS}, as written -> value
_Series = dict[str, float]


@dataclass
class WorkerSamples:
    """One worker's scrape: summed families' series, and every other family as parsed."""

    summed: dict[_Family, _Series] = field(default_factory=dict)
    other: list[Metric] = field(default_factory=list)


def parse_exposition(text: str, previous: WorkerSamples | None = None) -> WorkerSamples:
    """A worker's ``/metrics`` text (``previous``: the same worker's last scrape, whose series
    need no parsing again). Raises ValueError for text that is not an exposition."""
    samples = WorkerSamples()
    for family, lines in _families(text):
        if family[1] in _SUMMED:
            known = previous.summed.get(family) if previous is not None else None
            samples.summed[family] = _series(family, lines, known)
        else:
            samples.other.extend(text_string_to_metric_families(_block(family, lines)))
    return samples


def _families(text: str) -> Iterator[tuple[_Family, list[str]]]:
    """Each family of the text (as prometheus-client writes it: ``# HELP``, then ``# TYPE``,
    then its series lines) with its series lines."""
    family: _Family | None = None
    lines: list[str] = []
    help_line: tuple[str, str] | None = None
    for line in text.split("\n"):
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] == "HELP":
                help_line = (parts[2], parts[3] if len(parts) == 4 else "")
            elif len(parts) == 4 and parts[1] == "TYPE":
                if help_line is None or help_line[0] != parts[2]:
                    raise ValueError(f"# TYPE {parts[2]} without its # HELP line")
                if family is not None:
                    yield family, lines
                family, lines, help_line = (parts[2], parts[3], help_line[1]), [], None
            continue  # any other comment
        if family is None:
            raise ValueError("a series before any # TYPE line")
        lines.append(line)
    if family is not None:
        yield family, lines


def _block(family: _Family, lines: list[str]) -> str:
    name, kind, documentation = family
    return f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n" + "".join(f"{line}\n" for line in lines)


def _series(family: _Family, lines: list[str], known: _Series | None) -> _Series:
    series: _Series = {}
    for line in lines:
        key, _, value = line.rpartition(" ")
        if known is None or key not in known:
            return _parsed_series(family, lines)
        series[key] = series.get(key, 0.0) + float(value)
    return series


def _parsed_series(family: _Family, lines: list[str]) -> _Series:
    """The family's series, each line read by prometheus-client's parser as well: one family
    of that type, a sample per line, none with a timestamp (the value is the last field)."""
    parsed = list(text_string_to_metric_families(_block(family, lines)))
    if len(parsed) != 1 or parsed[0].type != family[1] or len(parsed[0].samples) != len(lines):
        raise ValueError(f"series of {family[0]} that are not of its family")
    series: _Series = {}
    for line, sample in zip(lines, parsed[0].samples, strict=True):
        if sample.timestamp is not None:
            raise ValueError(f"a timestamp in a series of {family[0]}")
        key = line.rpartition(" ")[0]
        series[key] = series.get(key, 0.0) + sample.value
    return series


@dataclass
class PodTotals:
    """What workers that are gone had counted: added to every later merge."""

    retired: dict[_Family, _Series] = field(default_factory=dict)

    def retire(self, last: WorkerSamples | None) -> None:
        """Keep the summed series of a worker's last scrape (it died or is being replaced)."""
        if last is None:
            return
        for family, series in last.summed.items():
            kept = self.retired.setdefault(family, {})
            for key, value in series.items():
                kept[key] = kept.get(key, 0.0) + value

    def copy(self) -> PodTotals:
        return PodTotals({family: dict(series) for family, series in self.retired.items()})


def merge_expositions(workers: Mapping[int, WorkerSamples], totals: PodTotals,
                      extra: Iterable[Metric] = ()) -> bytes:
    """One exposition for the pod: summed families (live workers plus ``totals``), the other
    families per worker with a ``worker`` label, then ``extra`` (the supervisor's own)."""
    summed: dict[_Family, _Series] = {f: dict(s) for f, s in totals.retired.items()}
    for samples in workers.values():
        for family, series in samples.summed.items():
            merged = summed.setdefault(family, {})
            for key, value in series.items():
                merged[key] = merged.get(key, 0.0) + value
    text: list[str] = []
    for (name, kind, documentation), series in summed.items():
        text.append(f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n")
        text.extend(f"{key} {floatToGoString(value)}\n" for key, value in series.items())  # type: ignore[no-untyped-call]
    per_worker: dict[tuple[str, str, str], Metric] = {}
    for index, samples in sorted(workers.items()):
        for parsed in samples.other:
            labelled = per_worker.setdefault((parsed.name, parsed.type, parsed.documentation),
                                             Metric(parsed.name, parsed.documentation, parsed.type))
            for sample in parsed.samples:
                labelled.add_sample(sample.name, {**sample.labels, "worker": str(index)}, sample.value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*per_worker.values(), *extra]))
    return "".join(text).encode() + generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)

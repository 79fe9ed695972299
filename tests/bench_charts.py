"""The pictures `make bench` draws from what it measured: each latency distribution as the
share of requests answered within a time (a CDF on a log time axis, where the median and the
tail both show), one PNG per comparison, under docs/bench/ (BENCHMARKS.md shows them).

matplotlib is the bench's own optional dependency (``pip install -e '.[bench]'``, which
``make bench`` runs); without it, no chart is drawn and the table is written all the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CHART_DIR = Path(__file__).resolve().parent.parent / "docs" / "bench"


def draw(charts: Mapping[str, tuple[str, Mapping[str, Sequence[float]]]], directory: Path = CHART_DIR) -> list[Path]:
    """Write each chart (file name → (title, series → latencies in ms)); the files written.
    Nothing when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return []
    from matplotlib import ticker

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, series) in charts.items():
        figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
        for label, values in series.items():
            ordered = sorted(values)
            if not ordered:
                continue
            share = [(i + 1) / len(ordered) for i in range(len(ordered))]
            axes.step(ordered, share, where="post", label=f"{label} (p50 {_at(ordered, 0.5):.2f} ms, "
                      f"p99 {_at(ordered, 0.99):.2f} ms)")
        axes.set_xscale("log")
        # Plain numbers at 1, 2, 5 of each decade, on the major ticks only: log minor labels overlap.
        axes.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_xlabel("latency, ms (log scale)")
        axes.set_ylabel("share of requests answered within")
        axes.set_ylim(0, 1.005)
        axes.grid(True, which="both", alpha=0.3)
        axes.set_title(title, fontsize=10)
        axes.legend(loc="lower right", fontsize=8)
        written.append(_saved(plt, figure, directory / name))
    return written


def draw_bars(bars: Mapping[str, tuple[str, Mapping[str, float]]], directory: Path = CHART_DIR) -> list[Path]:
    """Write each bar chart (file name → (title, label → value)); the files written. Nothing
    when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, values) in bars.items():
        figure, axes = plt.subplots(figsize=(8, 3.5), dpi=100)
        labels, heights = list(values), list(values.values())
        shown = axes.barh(labels, heights)
        axes.bar_label(shown, labels=[f"{value:,.0f}" for value in heights], padding=3)
        axes.invert_yaxis()
        axes.set_xlim(0, max(heights, default=1) * 1.15)
        axes.set_title(title, fontsize=10)
        written.append(_saved(plt, figure, directory / name))
    return written


def _pyplot() -> Any:
    """matplotlib's pyplot drawing into files (no screen), or None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _saved(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    # No timestamp in the file: the same measurements draw the same bytes.
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)
    return path


def _at(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

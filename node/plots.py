"""The model page's plots as PNG: studies per day, positive rate per day, study scores.

Pure functions of the figures, drawn with matplotlib's object API (no pyplot state), so
several requests may draw at once.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from node.history import Day

__all__ = ["PLOTS", "studies_per_day", "positive_rate_per_day", "score_distribution"]


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _day_axis(days: Sequence[Day]) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(7.5, 2.6))
    axes = figure.add_subplot()
    labels = [d.date.strftime("%m-%d") for d in days]
    step = max(len(labels) // 10, 1)
    axes.set_xticks(range(0, len(labels), step), labels[::step], fontsize=8)
    axes.set_xlim(-0.5, len(labels) - 0.5)
    axes.grid(axis="y", alpha=0.3)
    return figure, axes


def studies_per_day(days: Sequence[Day]) -> bytes:
    figure, axes = _day_axis(days)
    triaged = [d.analyses - d.not_triaged for d in days]
    axes.bar(range(len(days)), triaged, color="#4a78b0", label="given a verdict")
    axes.bar(range(len(days)), [d.not_triaged for d in days], bottom=triaged, color="#f0a030", label="NOT TRIAGED")
    axes.bar(range(len(days)), [d.failed for d in days], bottom=[d.analyses for d in days], color="#b03a2e",
             label="failed")
    axes.set_ylabel("studies")
    axes.legend(fontsize=8, loc="upper left")
    axes.set_title("Studies analysed or failed per day (UTC)", fontsize=10)
    return _png(figure)


def positive_rate_per_day(days: Sequence[Day]) -> bytes:
    figure, axes = _day_axis(days)
    rates = [d.positive_rate for d in days]
    axes.plot([i for i, r in enumerate(rates) if r is not None], [r for r in rates if r is not None],
              marker="o", color="#b03a2e")
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("flagged positive")
    axes.set_title("Share of the studies given a verdict flagged SUSPECTED - PRIORITY per day", fontsize=10)
    return _png(figure)


def score_distribution(scores: Sequence[float]) -> bytes:
    figure = Figure(figsize=(7.5, 2.6))
    axes = figure.add_subplot()
    axes.hist(list(scores), bins=20, range=(0.0, 1.0), color="#6a6a6a")
    axes.set_xlabel("study score (highest slice P(ICH))")
    axes.set_ylabel("studies")
    axes.set_title(f"Distribution of study scores ({len(scores)} studies given a verdict)", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


PLOTS = ("studies-per-day", "positive-rate", "scores")

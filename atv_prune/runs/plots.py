"""PNG figures, written atomically with a non-interactive backend."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .export import atomic_file


def save_figure(path: Path, draw: Callable[[Any], None], size: tuple[float, float] = (6.0, 4.0),
                panels: int | None = None) -> None:
    """Create a figure, let ``draw`` fill it, save it as PNG. ``draw`` gets one axis, or a list of
    ``panels`` axes side by side when ``panels`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels or 1, figsize=size, squeeze=False)
    try:
        draw(list(axes[0]) if panels else axes[0][0])
        figure.tight_layout()
        with atomic_file(Path(path)) as tmp:
            figure.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(figure)


def retention_bars(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Grouped bars of mean retention: one group per target, one bar per method (none where a
    cell is missing or failed)."""
    targets = list(dict.fromkeys(row["target"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    width = 0.8 / max(1, len(methods))

    def draw(axis: Any) -> None:
        for m, method in enumerate(methods):
            means = [next((r["mean"] for r in rows if r["method"] == method and r["target"] == t), None)
                     for t in targets]
            values = [math.nan if mean is None else mean for mean in means]
            axis.bar([i + m * width for i in range(len(targets))], values, width, label=method)
        axis.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(targets))], targets)
        axis.set_ylabel("mean retention (%)")
        axis.axhline(100, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(title)
        axis.legend(fontsize=8)

    save_figure(path, draw, size=(max(6.0, 1.6 * len(targets) * max(1, len(methods)) / 2), 4.2))


def tokens_vs_retention(path: Path, series: dict[str, list[tuple[float, float, str]]], title: str) -> None:
    """Mean visual tokens per sample (x) against mean retention (y), one line per series, points labelled."""

    def draw(axis: Any) -> None:
        for name, points in series.items():
            points = sorted(points)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            for x, y, label in points:
                axis.annotate(label, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        axis.set_xlabel("visual tokens per sample in the calibration pool (mean over blocks)")
        axis.set_ylabel("mean retention (%)")
        axis.set_title(title)
        axis.legend(fontsize=8)

    save_figure(path, draw, size=(7.0, 4.2))

"""The PNG of a tuning run: U, the objective and (with gold) accuracy against iteration, per trial."""

from __future__ import annotations

import io
from typing import Any

TITLES = {"U": "U (the trial's own weights)", "u_per_label": "U per labelled example (reference weights)",
          "heldout_p": "held-out predictability", "accuracy": "accuracy on the gold file"}


def plot_trials(histories: dict[str, list[dict[str, Any]]], metric: str) -> bytes:
    """One panel per quantity, one line per trial (points where the trial reported)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display, no global pyplot state
    from matplotlib.figure import Figure

    keys = ["U"] + [k for k in (metric, "accuracy") if k != "U"]
    keys = [k for i, k in enumerate(keys) if k not in keys[:i]
            and any(k in row for rows in histories.values() for row in rows)]
    figure = Figure(figsize=(6.5, 2.6 * len(keys)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        for trial, rows in histories.items():
            points = [(r["iteration"], r[key]) for r in rows if key in r and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=trial)
        ax.set_title(TITLES.get(key, key), fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()

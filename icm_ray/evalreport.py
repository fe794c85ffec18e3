"""The outputs of `icm-ray eval`: a Markdown table, the JSON behind it, and a PNG bar chart."""

from __future__ import annotations

import io
from typing import Any

CONDITIONS = (("icm", "ICM labels"), ("gold", "gold labels"), ("random", "random labels"),
              ("zero_shot", "zero-shot"))


def _f(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = ["| persona | shots | ICM | gold | random | zero-shot | ICM % of gold | random % of gold "
             "| zero-shot % of gold | ICM label acc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["personas"]:
        for c in row["by_shots"]:
            if not c.get("demos"):
                lines.append(f"| {row['persona']} | {c['shots']} (no ICM labels) | - | - | - | "
                             f"{_f(row['zero_shot'])} | - | - | - | - |")
                continue
            shots = f"{c['shots']}" + (f" ({c['demos']} labelled)" if c["demos"] < c["shots"] else "")
            pcts = " | ".join(f"{_f(c[f'{key}_pct_of_gold'], '.0f')}%"
                              for key in ("icm", "random", "zero_shot"))
            lines.append(f"| {row['persona']} | {shots} | {_f(c['icm'])} | {_f(c['gold'])} | "
                         f"{_f(c['random'])} | {_f(row['zero_shot'])} | {pcts} | "
                         f"{_f(c['icm_label_accuracy'], '.2f')} |")
    mean = report["mean"]
    for c in mean["by_shots"]:
        lines.append(f"| **mean** | {c['shots']} | {_f(c['icm'])} | {_f(c['gold'])} | {_f(c['random'])} | "
                     f"{_f(mean['zero_shot'])} | {_f(c['icm_pct_of_gold'], '.0f')}% | "
                     f"{_f(c['random_pct_of_gold'], '.0f')}% | {_f(c['zero_shot_pct_of_gold'], '.0f')}% | |")
    text = "\n".join(lines) + "\n"
    if mean.get("feedback"):
        budget = next(r["feedback"]["budget"] for r in report["personas"] if "feedback" in r)
        text += (f"\nTargeted vs random feedback: {budget} human labels per persona (simulated with gold) "
                 "clamped in a new search; few-shot accuracy of its labels.\n\n"
                 "| persona | shots | ICM, no feedback | targeted questions | random questions |\n"
                 "|---|---|---|---|---|\n")
        for row in report["personas"]:
            for k, cell in row["feedback"]["by_shots"].items():
                text += (f"| {row['persona']} | {k} | {_f(cell['icm'])} | {_f(cell['targeted'])} | "
                         f"{_f(cell['random'])} |\n")
        for cell in mean["feedback"]:
            text += f"| **mean** | {cell['shots']} | | {_f(cell['targeted'])} | {_f(cell['random'])} |\n"
    return text


def bar_chart(report: dict[str, Any]) -> bytes:
    """One panel per shot count: a group of bars per persona (and the mean), one bar per condition."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no display, no global pyplot state
    from matplotlib.figure import Figure

    shots = [c["shots"] for c in report["mean"]["by_shots"]] or [0]
    names = [r["persona"] for r in report["personas"]] + ["mean"]
    figure = Figure(figsize=(max(6.0, 1.4 * len(names)), 2.8 * len(shots)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(shots), 1, squeeze=False)[:, 0]
    width = 0.8 / len(CONDITIONS)
    for ax, k in zip(axes, shots):
        for index, (key, label) in enumerate(CONDITIONS):
            values = []
            for row in report["personas"] + [{"persona": "mean", **report["mean"]}]:
                cell = next((c for c in row["by_shots"] if c["shots"] == k), {})
                values.append(row["zero_shot"] if key == "zero_shot" else (cell.get(key) or 0.0))
            ax.bar([x + (index - 1.5) * width for x in range(len(names))], values, width, label=label)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        ax.set_ylabel("accuracy")
        ax.set_title(f"few-shot accuracy on held-out statements, {k} demonstrations", fontsize=9)
    axes[0].legend(fontsize=7, ncol=len(CONDITIONS))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_report(store, report: dict[str, Any]) -> str:
    """eval.json, eval.md and eval.png in the eval directory; returns the Markdown."""
    text = markdown(report)
    store.write_bytes("eval.png", bar_chart(report))
    store.write_bytes("eval.md", text.encode("utf-8"))
    store.write_json("eval.json", report)  # last: its presence means the evaluation is complete
    return text

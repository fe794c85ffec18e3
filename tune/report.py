"""What a tuning run leaves behind: the trial table (printed and trials.jsonl), the plot
(tuning.png) and best_config.yaml, written last so its presence means the run finished."""

from __future__ import annotations

from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from icm_ray.config import RunConfig
from icm_ray_tune.plot import plot_trials


def fmt_value(value: Any) -> str:
    """A value for the table and the progress lines (numpy scalars from Tune as plain numbers)."""
    value = value.item() if hasattr(value, "item") else value
    if value is None:
        return "-"
    if isinstance(value, float):
        tiny_or_huge = value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e3)
        return f"{value:.3g}" if tiny_or_huge else f"{value:.3f}"  # 0.0 prints as 0.000, as 1.000
    return str(value)


def print_trials(rows: list[dict[str, Any]], metric: str, best: dict[str, Any], config: RunConfig) -> None:
    table = Table(title=f"Tuning trials (objective: {metric}, higher is better)")
    columns = ["trial", "status", "iter", metric, "U", "P", "labelled"]
    if any("accuracy" in r for r in rows) and metric != "accuracy":
        columns.append("accuracy")
    for column in columns + ["settings"]:
        table.add_column(column, justify="left" if column in ("trial", "status", "settings") else "right")
    for row in sorted(rows, key=lambda r: (r["status"] != "completed", -(r.get(metric) or -1e300))):
        settings = " ".join(f"{k}={fmt_value(v)}" for k, v in row["params"].items())
        mark = " *" if row is best else ""
        table.add_row(row["trial"] + mark, row["status"], fmt_value(row.get("iteration")),
                      *[fmt_value(row.get(c)) for c in columns[3:]], settings)
    out = Console()
    if not out.is_terminal:
        out = Console(width=220)
    out.print(table)
    out.print(f"best trial {best['trial']} (*): search settings")
    out.print(yaml.safe_dump({"search": config.search.model_dump(mode="json")}, sort_keys=False).rstrip())


def write_outputs(store, rows: list[dict[str, Any]], histories: dict[str, list], metric: str,
                  config: RunConfig) -> None:
    store.write_jsonl("trials.jsonl", rows)
    store.write_bytes("tuning.png", plot_trials(histories, metric))
    text = "# icm-ray tune: the best trial's settings; use with `icm-ray run --config`\n"
    text += yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    store.write_bytes("best_config.yaml", text.encode("utf-8"))

"""Targeted human feedback: the questions where the model is least certain about a persona.

Certainty is the margin |log P(True) - log P(False)| under the run's current labels: for a
labelled example, given all the other labels (its leave-one-out score, stored in
labels.parquet); for an unlabelled one, with every label as a demonstration. The smallest
margins are the questions a human answer settles best (the paper's third finding). Clamped
examples are already human-labelled and never suggested again.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from icm_ray.backends.base import Scorer
from icm_ray.errors import UserError
from icm_ray.predictability import log_odds_given
from icm_ray.prompts import header_text, query_text

COLUMNS = ("id", "persona", "text", "model_label", "margin", "label")


def margins(run: str, persona: str, scorer_for=None, need: int = 0) -> list[dict[str, Any]]:
    """Every unclamped example of `persona` in the run with its margin, least certain first.

    `scorer_for(model_config) -> Scorer` builds a scorer only if unlabelled examples need one.
    Fewer than `need` unclamped examples is an error, found before any model is loaded.
    """
    from icm_ray.backends import load_scorer
    from icm_ray.engine import load_inputs
    from icm_ray.store import open_store

    store = open_store(run)
    if not store.exists("summary.json"):
        raise UserError(f"{run}: not a finished run (no summary.json)")
    config, dataset, personas = load_inputs(store)
    if persona not in personas:
        raise UserError(f"unknown persona '{persona}': the run has {', '.join(personas)}")
    examples = [e for e in dataset.examples if e.persona == persona]
    rows = {r["id"]: r for r in store.read_parquet("labels.parquet") if r["persona"] == persona}
    labelled = {p: rows[e.id]["label"] for p, e in enumerate(examples) if rows[e.id]["label"] is not None}
    odds = {e.id: rows[e.id]["log_odds"] for e in examples if rows[e.id]["log_odds"] is not None}
    pool = sum(1 for e in examples if not rows[e.id]["clamped"])
    if need > pool:
        raise UserError(f"-n {need} is larger than the pool: persona '{persona}' has {pool} "
                        "examples without a human label")
    unlabelled = [e for e in examples if e.id not in odds]
    if unlabelled:
        scorer: Scorer = (scorer_for or load_scorer)(config.model.model_dump())
        header = header_text(config.prompts, personas[persona])
        found, _, _ = log_odds_given(scorer, header, examples, labelled, unlabelled, config.prompts)
        odds.update({e.id: o for e, o in zip(unlabelled, found)})
    # A calibrated search decides labels against the set's mean log-odds, not zero.
    bias = 0.0
    if config.search.calibrate and labelled:
        bias = sum(odds[examples[p].id] for p in labelled) / len(labelled)
    out = []
    for e in examples:
        if rows[e.id]["clamped"]:
            continue
        label = rows[e.id]["label"]
        out.append({"id": e.id, "persona": persona, "text": query_text(config.prompts, e),
                    "model_label": bool(odds[e.id] >= bias) if label is None else label,
                    "margin": abs(odds[e.id] - bias), "label": ""})
    out.sort(key=lambda r: (r["margin"], r["id"]))
    return out


def suggest(run: str, persona: str, n: int, scorer_for=None) -> list[dict[str, Any]]:
    if n < 1:
        raise UserError("-n must be at least 1")
    return margins(run, persona, scorer_for, need=n)[:n]


def render(rows: list[dict[str, Any]], name: str) -> bytes:
    """CSV (for a spreadsheet) or JSONL, by the file name; `label` is left blank to fill in."""
    if name.lower().endswith((".jsonl", ".ndjson")):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if not name.lower().endswith(".csv"):
        raise UserError(f"--out {name!r}: use a .csv or .jsonl file name")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({**r, "margin": f"{r['margin']:.4f}"} for r in rows)
    return buffer.getvalue().encode("utf-8")

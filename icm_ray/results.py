"""Turn finished searches into the run's output files and its summary table.

This is the first place gold labels meet search results: only to measure accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pyarrow as pa

from icm_ray.data import Example
from icm_ray.prompts import PromptConfig, demonstration_text, generation_text, query_text
from icm_ray.search import SearchState
from icm_ray.store import RunStore, safe_name

LABELS_SCHEMA = pa.schema([
    ("id", pa.string()), ("persona", pa.string()), ("label", pa.bool_()),
    ("log_odds", pa.float64()), ("confidence", pa.float64()),
    ("seeded", pa.bool_()), ("clamped", pa.bool_()),
])

# One row per persona and search step (ICMSearch.step). Fixed, so every trace.parquet has the
# same columns and types: with no steps (--iterations 0), when no step drew (draw is null when
# nothing was proposed) and for rows of an older checkpoint that lack a field (null there).
TRACE_SCHEMA = pa.schema([
    ("persona", pa.string()), ("iteration", pa.int64()), ("temperature", pa.float64()),
    ("alpha", pa.float64()), ("inconsistency_weight", pa.float64()),
    ("example", pa.int64()),  # position of the sampled example; -1: nothing left to sample
    ("utility", pa.float64()), ("proposal_utility", pa.float64()),
    ("predictability", pa.float64()), ("inconsistency", pa.int64()),
    ("accepted", pa.bool_()), ("draw", pa.float64()), ("labelled", pa.int64()),
    ("tokens_run", pa.int64()), ("prompt_tokens", pa.int64()), ("tokens_cached", pa.int64()),
    ("wall_seconds", pa.float64()),
])


def package_version() -> str:
    try:
        return version("icm-ray")
    except PackageNotFoundError:
        return "unknown"


def label_rows(persona: str, examples: Sequence[Example], state: SearchState) -> list[dict[str, Any]]:
    rows = []
    for p, example in enumerate(examples):
        label = state.labels[p]
        log_odds = confidence = None
        if label is not None and p in state.logprobs:
            lp_true, lp_false = state.logprobs[p]
            log_odds = lp_true - lp_false
            confidence = float(np.exp(lp_true if label else lp_false))
        rows.append({"id": example.id, "persona": persona, "label": label, "log_odds": log_odds,
                     "confidence": confidence, "seeded": state.seeded[p],
                     "clamped": state.clamped[p]})
    return rows


def steering_rows(examples: Sequence[Example], state: SearchState,
                  prompts: PromptConfig) -> list[dict[str, Any]]:
    """Labelled examples, most confident first, each ready to paste as a demonstration."""
    rows = []
    for row, example in zip(label_rows("", examples, state), examples):
        if row["label"] is None:
            continue
        rows.append({"id": example.id, "persona": example.persona, "kind": example.kind,
                     "text": query_text(prompts, example), "label": row["label"],
                     "confidence": row["confidence"],
                     "demonstration": demonstration_text(prompts, example, row["label"])})
        if example.kind == "response":  # open-ended generation: steers the completions endpoint
            rows[-1]["generation"] = generation_text(prompts, example)
    rows.sort(key=lambda r: -(r["confidence"] or 0.0))
    return rows


def _accuracy(pairs: list[tuple[bool, bool]]) -> float | None:
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def persona_summary(persona: str, examples: Sequence[Example], state: SearchState,
                    gold: dict[str, bool]) -> dict[str, Any]:
    labelled = [(e, state.labels[p]) for p, e in enumerate(examples) if state.labels[p] is not None]
    with_gold = [(y, gold[e.id]) for e, y in labelled if e.id in gold]
    zero_shot = None
    if state.zero_shot_log_odds is not None:  # threshold at the median: no gold used to calibrate
        odds = np.array(state.zero_shot_log_odds)
        predicted = odds > np.median(odds)
        zero_shot = _accuracy([(bool(predicted[p]), gold[e.id])
                               for p, e in enumerate(examples) if e.id in gold])
    return {
        "persona": persona,
        "examples": len(examples),
        "labelled": len(labelled),
        "true_labels": sum(1 for _, y in labelled if y),
        "utility": state.utility,
        "predictability": state.predictability,
        "inconsistencies": state.inconsistency,
        "iterations": state.iteration,
        "accuracy_vs_gold": _accuracy(with_gold),
        "gold_labelled": len(with_gold),
        "zero_shot_accuracy": zero_shot,
        "orientation": state.orientation,
        "steering_file": f"steering_examples/{safe_name(persona)}.jsonl",
        "tokens_run": state.tokens_run,
        "prompt_tokens": state.prompt_tokens,
        "tokens_cached": state.prompt_tokens - state.tokens_run,
        "wall_seconds": state.wall_seconds,
    }


def write_run(store: RunStore, finished: dict[str, tuple[Sequence[Example], SearchState]],
              gold: dict[str, bool], config: dict[str, Any], model_identity: dict[str, Any],
              prompts: PromptConfig) -> dict[str, Any]:
    """Write every output; summary.json last, so its presence means the run is complete."""
    labels, trace, personas = [], [], []
    for persona, (examples, state) in finished.items():
        labels.extend(label_rows(persona, examples, state))
        trace.extend({"persona": persona, **row} for row in state.trace)
        store.write_jsonl(f"steering_examples/{safe_name(persona)}.jsonl",
                          steering_rows(examples, state, prompts))
        personas.append(persona_summary(persona, examples, state, gold))
    store.write_parquet("labels.parquet", labels, LABELS_SCHEMA)
    store.write_parquet("trace.parquet", trace, TRACE_SCHEMA)
    store.write_json("config.json", {"config": config, "model": model_identity,
                                     "seed": config["search"]["seed"],
                                     "icm_ray_version": package_version()})
    summary = {"personas": personas, "model": model_identity}
    store.write_json("summary.json", summary)
    return summary

"""Coherence audit of any label set (ICM's, or one written by people): P, I and U, and the
accuracy-matched control of the paper's second finding.

The control takes the gold labels of the same examples and flips as many of them as the audited
set gets wrong, at random (several seeds): the same accuracy, with the errors placed without
any coherence. Both steer the model on the same demonstration statements; if the audited set
generalises better (higher few-shot accuracy on the other gold-labelled examples), its
coherence, not only its accuracy, is what helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from icm_ray.backends.base import Scorer
from icm_ray.config import RunConfig
from icm_ray.consistency import build_constraints, count_inconsistencies
from icm_ray.data import Example, Persona
from icm_ray.fewshot import fewshot_accuracy, pick_balanced
from icm_ray.predictability import evaluate
from icm_ray.prompts import header_text


def coherence(scorer: Scorer, persona: Persona, examples: Sequence[Example], labels: dict[str, bool],
              config: RunConfig) -> dict[str, Any]:
    """P, I and U of `labels` (by id) exactly as the search scores a label set."""
    search = config.search
    position = {e.id: p for p, e in enumerate(examples)}
    by_position = {position[i]: y for i, y in labels.items()}
    constraints = build_constraints(examples, search.group_rule)
    inconsistency = count_inconsistencies(constraints, [by_position.get(p) for p in range(len(examples))])
    ev = evaluate(scorer, header_text(config.prompts, persona), examples, by_position, config.prompts,
                  search.alpha, inconsistency, search.calibrate, search.inconsistency_weight)
    return {"labelled": len(labels), "true_labels": sum(labels.values()), "P": ev.predictability,
            "I": ev.inconsistency, "U": ev.utility}


def flip_control(labels: dict[str, bool], gold: dict[str, bool], seed: int) -> dict[str, bool]:
    """Gold where it is known, with as many labels flipped at random as `labels` gets wrong."""
    scored = sorted(i for i in labels if i in gold)
    errors = sum(labels[i] != gold[i] for i in scored)
    flipped = set(np.random.default_rng(seed).choice(len(scored), size=errors, replace=False).tolist())
    control = dict(labels)  # ids without gold keep the audited label
    control.update({i: gold[i] != (n in flipped) for n, i in enumerate(scored)})
    return control


def audit_persona(scorer: Scorer, persona: Persona, examples: Sequence[Example], labels: dict[str, bool],
                  gold: dict[str, bool], config: RunConfig, shots: int = 32, seeds: int = 5,
                  seed: int = 0) -> dict[str, Any]:
    row: dict[str, Any] = {"persona": persona.name, **coherence(scorer, persona, examples, labels, config)}
    scored = [i for i in labels if i in gold]
    if not scored:
        row["control"] = "no gold labels for these ids: the accuracy-matched control needs them"
        return row
    row["accuracy_vs_gold"] = sum(labels[i] == gold[i] for i in scored) / len(scored)
    demo_ids = pick_balanced({i: labels[i] for i in scored}, shots, seed)
    tests = [e for e in examples if e.id in gold and e.id not in set(demo_ids)]
    if not tests:
        row["control"] = "every gold-labelled example is a demonstration: nothing left to test on"
        return row
    by_id = {e.id: e for e in examples}
    header = header_text(config.prompts, persona)

    def steer(chosen: dict[str, bool]) -> float:
        return fewshot_accuracy(scorer, header, [(by_id[i], chosen[i]) for i in demo_ids], tests, gold,
                                config.prompts)

    row.update(shots=len(demo_ids), test_examples=len(tests), fewshot_accuracy=steer(labels))
    controls = []
    for s in range(seeds):
        control = flip_control(labels, gold, seed + 1 + s)
        controls.append({"seed": seed + 1 + s, **coherence(scorer, persona, examples, control, config),
                         "fewshot_accuracy": steer(control)})
    accuracies = [c["fewshot_accuracy"] for c in controls]
    row["control"] = {
        "seeds": controls,
        "U_mean": float(np.mean([c["U"] for c in controls])),
        "I_mean": float(np.mean([c["I"] for c in controls])),
        "fewshot_accuracy_mean": float(np.mean(accuracies)),
        "fewshot_accuracy_sd": float(np.std(accuracies)),
        "beaten_by_audited": sum(row["fewshot_accuracy"] > a for a in accuracies),
    }
    row["generalises_better"] = row["fewshot_accuracy"] > row["control"]["fewshot_accuracy_mean"]
    return row

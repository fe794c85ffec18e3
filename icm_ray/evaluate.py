"""`icm-ray eval`: do ICM labels steer the model as well as gold labels? (the paper's first and
third findings, measured on your data).

Per persona, a seeded split puts part of the statements in a search pool and the rest in a test
set. ICM runs on the pool only (or an existing run is taken: then only its pool part may serve
as demonstrations). For each shot count k, the same k pool statements (the run's k most
confident steering examples, balanced True/False, as the API would pick them) steer the model
on the test set, labelled four ways: (a) by ICM, (b) by gold, (c) at random (several draws),
(d) no demonstrations at all (zero-shot). Few-shot accuracy is reported as it is and as % of
the gold condition's.

With a feedback budget n, two more searches per persona clamp n human answers (simulated
with gold: this is an experiment, not a run) on (targeted) the n least certain pool
questions under the first ICM labels and (random) n pool questions drawn at random.
Gold labels never enter the first search; in the feedback searches they enter only as the
simulated answers to those n questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icm_ray.backends.base import Scorer
from icm_ray.data import Dataset, Example, Persona
from icm_ray.errors import UserError
from icm_ray.fewshot import fewshot_accuracy, split_heldout, zero_shot_accuracy
from icm_ray.prompts import PromptConfig, header_text
from icm_ray.steering import SteeringExample, select


@dataclass
class EvalPlan:
    """Who is evaluated on what. `gold` is for measuring only."""

    personas: dict[str, Persona]
    pool: dict[str, list[Example]]
    tests: dict[str, list[Example]]
    gold: dict[str, bool]
    shots: list[int]
    draws: int = 3
    seed: int = 0
    feedback_budget: int = 0
    notes: list[str] = field(default_factory=list)

    def pool_dataset(self) -> Dataset:
        """The searches' input: pool statements only, and no gold (Example has no field for it)."""
        return Dataset([e for name in self.personas for e in self.pool[name]])


def plan(dataset: Dataset, personas: dict[str, Persona], test_fraction: float, shots: Sequence[int],
         draws: int, seed: int, feedback_budget: int = 0) -> EvalPlan:
    """Seeded pool/test split per persona, with every check made before anything runs."""
    if not 0 < test_fraction < 1:
        raise UserError("--test-fraction must be between 0 and 1")
    if not shots or min(shots) < 1:
        raise UserError("--shots must be positive numbers of demonstrations")
    if draws < 1:
        raise UserError("--draws must be at least 1")
    if feedback_budget < 0:
        raise UserError("--feedback-budget must be 0 or more")
    pool, tests = {}, {}
    for name in dataset.personas():
        examples = [e for e in dataset.examples if e.persona == name]
        missing = [e.id for e in examples if e.id not in dataset.gold]
        if missing:
            raise UserError(f"persona '{name}': {len(missing)} examples without gold (first: "
                            f"{missing[0]}); eval compares with gold, so every example needs it")
        if len(examples) < 4:
            raise UserError(f"persona '{name}': {len(examples)} examples are too few to split (need 4)")
        pool[name], tests[name] = split_heldout(examples, test_fraction, seed)
        if feedback_budget > len(pool[name]):
            raise UserError(f"--feedback-budget {feedback_budget} is larger than the pool: persona "
                            f"'{name}' has {len(pool[name])} pool examples")
    return EvalPlan(personas, pool, tests, dict(dataset.gold), sorted(set(shots)), draws, seed,
                    feedback_budget)


def random_labels(n: int, seed: int) -> list[bool]:
    return [bool(v) for v in np.random.default_rng(seed).random(n) < 0.5]


def measure_persona(scorer: Scorer, prompts: PromptConfig, the_plan: EvalPlan, name: str,
                    steering: list[SteeringExample]) -> dict[str, Any]:
    """Zero-shot, then for each k: ICM, gold and random labels on the same k pool statements."""
    pool = {e.id: e for e in the_plan.pool[name]}
    tests, gold = the_plan.tests[name], the_plan.gold
    header = header_text(prompts, the_plan.personas[name])
    candidates = [s for s in steering if s.id in pool]  # an existing run: never a test statement

    def accuracy(ids: list[str], labels: list[bool]) -> float:
        return fewshot_accuracy(scorer, header, [(pool[i], y) for i, y in zip(ids, labels)], tests, gold,
                                prompts)

    row: dict[str, Any] = {"persona": name, "pool": len(pool), "test": len(tests),
                           "icm_labelled": len(candidates),
                           "zero_shot": zero_shot_accuracy(scorer, header, tests, gold, prompts),
                           "by_shots": []}
    for k in the_plan.shots:
        chosen = select(candidates, k, balance=True)
        ids = [s.id for s in chosen]
        if not ids:
            row["by_shots"].append({"shots": k, "demos": 0})
            continue
        randoms = [accuracy(ids, random_labels(len(ids), the_plan.seed * 1000 + k * 10 + d))
                   for d in range(the_plan.draws)]
        row["by_shots"].append({
            "shots": k, "demos": len(ids), "icm": accuracy(ids, [s.label for s in chosen]),
            "gold": accuracy(ids, [gold[i] for i in ids]), "random": float(np.mean(randoms)),
            "random_sd": float(np.std(randoms)),
            "icm_label_accuracy": sum(s.label == gold[s.id] for s in chosen) / len(chosen)})
    return row


def icm_only(scorer: Scorer, prompts: PromptConfig, the_plan: EvalPlan, name: str,
             steering: list[SteeringExample]) -> dict[int, float | None]:
    """Few-shot accuracy of one run's own labels at each shot count (for the feedback runs)."""
    pool = {e.id: e for e in the_plan.pool[name]}
    header = header_text(prompts, the_plan.personas[name])
    out: dict[int, float | None] = {}
    for k in the_plan.shots:
        chosen = select([s for s in steering if s.id in pool], k, balance=True)
        out[k] = fewshot_accuracy(scorer, header, [(pool[s.id], s.label) for s in chosen],
                                  the_plan.tests[name], the_plan.gold, prompts) if chosen else None
    return out


def feedback_questions(the_plan: EvalPlan, name: str, least_certain: list[str]) -> dict[str, dict[str, bool]]:
    """The n targeted and n random pool questions, answered with gold (simulated people)."""
    n = the_plan.feedback_budget
    pool_ids = [e.id for e in the_plan.pool[name]]
    drawn = np.random.default_rng(the_plan.seed + 4242).choice(len(pool_ids), size=n, replace=False)
    return {"targeted": {i: the_plan.gold[i] for i in least_certain[:n]},
            "random": {pool_ids[int(p)]: the_plan.gold[pool_ids[int(p)]] for p in drawn}}


def summarise(rows: list[dict[str, Any]], shots: list[int]) -> dict[str, Any]:
    """Means over personas per shot count, and each condition as % of the gold condition."""
    def pct(value, reference):
        return None if value is None or not reference else 100.0 * value / reference

    for row in rows:
        for cell in row["by_shots"]:
            if cell.get("demos"):
                for key in ("icm", "random"):
                    cell[f"{key}_pct_of_gold"] = pct(cell[key], cell["gold"])
                cell["zero_shot_pct_of_gold"] = pct(row["zero_shot"], cell["gold"])
    mean: dict[str, Any] = {"zero_shot": float(np.mean([r["zero_shot"] for r in rows])), "by_shots": []}
    for k in shots:
        cells = [c for r in rows for c in r["by_shots"] if c["shots"] == k and c.get("demos")]
        if not cells:
            continue
        cell = {"shots": k, "personas": len(cells)}
        for key in ("icm", "gold", "random", "icm_pct_of_gold", "random_pct_of_gold",
                    "zero_shot_pct_of_gold"):  # a % of a gold accuracy of 0 is None: left out
            known = [c[key] for c in cells if c[key] is not None]
            cell[key] = float(np.mean(known)) if known else None
        mean["by_shots"].append(cell)
    feedback = [r["feedback"] for r in rows if "feedback" in r]
    if feedback:
        mean["feedback"] = []
        for k in shots:
            values = {key: [f["by_shots"][str(k)][key] for f in feedback
                            if f["by_shots"][str(k)][key] is not None] for key in ("targeted", "random")}
            if all(values.values()):
                mean["feedback"].append({"shots": k, **{key: float(np.mean(v)) for key, v in values.items()}})
    return mean


def run_eval(the_plan: EvalPlan, scorer: Scorer, prompts: PromptConfig, base_run: str,
             search: Callable[[str, dict[str, bool]], str] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every persona on `base_run`; with a feedback budget, `search(tag, clamp)` runs the
    two feedback searches (returns each run's URI)."""
    from icm_ray.feedback import margins
    from icm_ray.steering import load_run

    entries = load_run(base_run)
    rows = []
    for name in the_plan.personas:
        log(f"measuring {name}")
        rows.append(measure_persona(scorer, prompts, the_plan, name, entries[name].examples))
    if the_plan.feedback_budget and search is not None:
        questions = {name: feedback_questions(the_plan, name, [
            r["id"] for r in margins(base_run, name, lambda _model: scorer)])
            for name in the_plan.personas}
        runs = {}
        for tag in ("targeted", "random"):
            log(f"feedback search: {the_plan.feedback_budget} {tag} questions per persona")
            clamp = {i: y for name in questions for i, y in questions[name][tag].items()}
            runs[tag] = load_run(search(tag, clamp))
        for row in rows:
            name = row["persona"]
            by_tag = {tag: icm_only(scorer, prompts, the_plan, name, runs[tag][name].examples)
                      for tag in runs}
            row["feedback"] = {
                "budget": the_plan.feedback_budget,
                "questions": {tag: sorted(questions[name][tag]) for tag in runs},
                "by_shots": {str(k): {"icm": next((c.get("icm") for c in row["by_shots"] if c["shots"] == k),
                                                  None),
                                      **{tag: by_tag[tag][k] for tag in runs}} for k in the_plan.shots}}
    return {"personas": rows, "mean": summarise(rows, the_plan.shots)}

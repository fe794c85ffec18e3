"""What a trial is scored on. Unsupervised by default; gold only when the user gives a file.

- `u_per_label`: the final U per labelled example, in the paper's sum form and at the
  *reference* weights of the base config (alpha_ref * mean P - w_ref * I / n), so trials
  with different alpha schedules are compared on one scale. It does not reward covering
  more of the pool: read it next to the labelled count.
- `heldout_p`: mutual predictability on held-out examples that never enter the search.
  Each is scored with all the search's labels as demonstrations (the same leave-one-out
  arrangement as a proposal) and counts log P(its argmax label), with the log-odds first
  centred on their mean over the held-out part: a one-sided label set that makes the model
  say True to everything earns nothing.
- `accuracy`: agreement with a small gold file (ids of the data). A labelled example counts
  with its label, an unlabelled one with the model's label given the labelled set; labels
  are taken the way round the search's orientation rule would leave them. The search
  itself never sees gold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icm_ray.data import Example, Persona
from icm_ray.fewshot import split_heldout  # noqa: F401  (tune.inputs and tests import it here)
from icm_ray.predictability import log_odds_given, mean_log_odds
from icm_ray.search import ICMSearch, SearchState

METRICS = ("heldout_p", "u_per_label", "accuracy")


@dataclass
class PersonaTask:
    """One persona's share of a trial. `gold` is for scoring the trial only."""

    persona: Persona
    examples: list[Example]  # the search pool
    heldout: list[Example] = field(default_factory=list)
    gold: dict[str, bool] = field(default_factory=dict)


def _log_odds_given(search: ICMSearch, labels: dict[int, bool], targets: list[Example],
                    state: SearchState) -> list[float]:
    """log P(True) - log P(False) for each target, with every labelled example as a demonstration."""
    odds, run, prompt = log_odds_given(search.scorer, search.header, search.examples, labels, targets,
                                       search.prompts)
    state.tokens_run += run
    state.prompt_tokens += prompt
    return odds


def heldout_predictability(search: ICMSearch, state: SearchState, heldout: list[Example]) -> float:
    odds = np.array(_log_odds_given(search, state.labelled, heldout, state))
    centred = np.abs(odds - odds.mean())
    return float(np.mean(-np.log1p(np.exp(-centred))))  # mean log sigmoid(|centred log-odds|)


def gold_accuracy(search: ICMSearch, state: SearchState, task: PersonaTask) -> float | None:
    if not task.gold:
        return None
    labels = state.labelled
    if not state.finished and search.orientation(state)[1]:  # mid-search: as finish would leave them
        labels = {p: y for p, y in enumerate(search.flipped(state)) if y is not None}
    by_id = {e.id: labels.get(p) for p, e in enumerate(search.examples)}
    unlabelled = [e for e in search.examples + task.heldout if e.id in task.gold and by_id.get(e.id) is None]
    bias = mean_log_odds(state.logprobs) if search.config.calibrate else 0.0
    for example, odds in zip(unlabelled, _log_odds_given(search, labels, unlabelled, state)):
        by_id[example.id] = odds >= bias
    return sum(by_id[i] == g for i, g in task.gold.items()) / len(task.gold)


def measure(search: ICMSearch, state: SearchState, task: PersonaTask, metric: str,
            reference: tuple[float, float]) -> dict[str, Any]:
    """One persona's numbers for a report: the objective, U, P, I, labelled and accuracy."""
    labelled = len(state.labelled)
    alpha_ref, weight_ref = reference
    row: dict[str, Any] = {
        "U": state.utility, "P": state.predictability, "I": state.inconsistency, "labelled": labelled,
        "u_per_label": (alpha_ref * state.predictability - weight_ref * state.inconsistency / labelled
                        if labelled else -math.inf),
    }
    if metric == "heldout_p":
        row["heldout_p"] = heldout_predictability(search, state, task.heldout)
    accuracy = gold_accuracy(search, state, task)
    if accuracy is not None:
        row["accuracy"] = accuracy
    return row

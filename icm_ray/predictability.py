"""Mutual predictability P(D) and utility U(D) = alpha * P(D) - I(D).

P(D) is the mean over labelled examples i of log P(y_i | x_i, D minus i), normalised over the
verbalised labels (log-softmax over " True"/" False"): exact leave-one-out, every other
labelled example a demonstration. The mean (as the reference code) rather than the sum
keeps U comparable between label sets of different sizes, so alpha means the same at 8
labels as at 800.

Prompt arrangement (a free choice: the method does not fix the order of demonstrations):
divide and conquer over the labelled examples in pool order. For a set S split into halves
L and R, every prompt for a member of R starts with L's demonstrations as one segment and
vice versa, recursively. A backend that reuses shared prefixes then runs about
N log2 N demonstration tokens per evaluation instead of N^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from icm_ray.backends.base import Scorer, ScoreRequest
from icm_ray.data import Example
from icm_ray.prompts import PromptConfig, demonstrations_block, query_text


@dataclass
class Evaluation:
    """Scores of one label set: per labelled position, (log P(True), log P(False))."""

    logprobs: dict[int, tuple[float, float]]
    predictability: float
    inconsistency: int
    utility: float
    tokens_run: int
    prompt_tokens: int


def leave_one_out_requests(
    header: str, examples: Sequence[Example], labels: dict[int, bool], targets: Sequence[int],
    prompts: PromptConfig,
) -> dict[int, ScoreRequest]:
    """The request for each target position, with all *other* labelled positions as context.

    Targets need not be labelled (a proposal for a new example uses the same arrangement as if
    it were in the set, so its request is identical to its later leave-one-out request).
    """
    members = sorted(set(labels) | set(targets))
    wanted = set(targets)
    out: dict[int, ScoreRequest] = {}

    def block(positions: Sequence[int]) -> str:
        shown = [p for p in positions if p in labels]
        return demonstrations_block(prompts, [examples[p] for p in shown], [labels[p] for p in shown])

    def recurse(positions: list[int], prefix: tuple[str, ...]) -> None:
        if not wanted.intersection(positions):
            return
        if len(positions) == 1:
            p = positions[0]
            out[p] = ScoreRequest(prefix, query_text(prompts, examples[p]), prompts.options)
            return
        middle = len(positions) // 2
        left, right = positions[:middle], positions[middle:]
        left_text, right_text = block(left), block(right)
        recurse(left, prefix + (right_text,) if right_text else prefix)
        recurse(right, prefix + (left_text,) if left_text else prefix)

    recurse(members, (header,))
    return out


def mean_log_odds(logprobs: dict[int, tuple[float, float]]) -> float:
    """The bias calibration removes: the mean log P(True) - log P(False) over a label set."""
    return sum(t - f for t, f in logprobs.values()) / len(logprobs) if logprobs else 0.0


def calibrated_logprob(log_odds: float, bias: float, label: bool) -> float:
    """log P(label) after removing a shared bias from the log-odds (contextual calibration)."""
    shifted = log_odds - bias
    return -math.log1p(math.exp(-shifted)) if label else -math.log1p(math.exp(shifted))


def utility(predictability: float, inconsistency: int, alpha: float, weight: float = 1.0) -> float:
    """U = alpha * P - w * I (w = 1 in the paper)."""
    return alpha * predictability - weight * inconsistency


def evaluate(scorer: Scorer, header: str, examples: Sequence[Example], labels: dict[int, bool],
             prompts: PromptConfig, alpha: float, inconsistency: int,
             calibrate: bool = False, inconsistency_weight: float = 1.0) -> Evaluation:
    """Score every labelled example given all the others; U = alpha * mean log-prob - w * I.

    With `calibrate`, each example's log-odds are first centred on their mean over the set,
    so a set cannot become "predictable" just by giving every example the label the model
    leans towards (an optional, non-paper objective; off by default).
    """
    if not labels:
        return Evaluation({}, 0.0, inconsistency, utility(0.0, inconsistency, alpha, inconsistency_weight),
                          0, 0)
    requests = leave_one_out_requests(header, examples, labels, list(labels), prompts)
    order = list(requests)
    results = scorer.score([requests[p] for p in order])
    logprobs = {p: (r.logprobs[0], r.logprobs[1]) for p, r in zip(order, results)}
    if calibrate:
        bias = mean_log_odds(logprobs)
        total = sum(calibrated_logprob(logprobs[p][0] - logprobs[p][1], bias, labels[p]) for p in labels)
    else:
        total = sum(logprobs[p][0 if labels[p] else 1] for p in labels)
    predictability = total / len(labels)
    return Evaluation(
        logprobs=logprobs,
        predictability=predictability,
        inconsistency=inconsistency,
        utility=utility(predictability, inconsistency, alpha, inconsistency_weight),
        tokens_run=sum(r.tokens_run for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results),
    )


def zero_shot_requests(header: str, examples: Sequence[Example],
                       prompts: PromptConfig) -> list[ScoreRequest]:
    """Each example with the persona header and no demonstrations."""
    return [ScoreRequest((header,), query_text(prompts, e), prompts.options) for e in examples]


def log_odds_given(scorer: Scorer, header: str, examples: Sequence[Example], labels: dict[int, bool],
                   targets: Sequence[Example], prompts: PromptConfig) -> tuple[list[float], int, int]:
    """log P(True) - log P(False) of each target with every labelled example as a demonstration
    (the arrangement a proposal uses), plus (tokens run, prompt tokens)."""
    if not targets:
        return [], 0, 0
    pool = list(examples) + list(targets)
    positions = list(range(len(examples), len(pool)))
    requests = leave_one_out_requests(header, pool, labels, positions, prompts)
    results = scorer.score([requests[p] for p in positions])
    return ([r.logprobs[0] - r.logprobs[1] for r in results], sum(r.tokens_run for r in results),
            sum(r.prompt_tokens for r in results))

"""Few-shot accuracy: how well a set of labelled demonstrations steers the model on held-out
examples. The measuring stick of `icm-ray eval` and `icm-ray audit`.

Decision rules (no gold is used to calibrate anything):
- with demonstrations: the model's argmax label, log P(True) > log P(False); the
  demonstrations themselves calibrate the model (ENVIRONMENT.md: 0.86 with 32 gold demos);
- zero-shot: log-odds above their median over the test set (the model's zero-shot outputs
  are one-sided, so argmax would just measure the class balance).
Gold labels enter only here, when predictions are compared with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icm_ray.backends.base import Scorer, ScoreRequest
from icm_ray.data import Example
from icm_ray.prompts import PromptConfig, demonstrations_block, query_text


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out part (at least one example), the rest in pool order."""
    count = max(1, round(fraction * len(examples)))
    chosen = set(np.random.default_rng(seed).choice(len(examples), size=count, replace=False).tolist())
    return ([e for p, e in enumerate(examples) if p not in chosen],
            [e for p, e in enumerate(examples) if p in chosen])


def log_odds(scorer: Scorer, header: str, demonstrations: Sequence[tuple[Example, bool]],
             tests: Sequence[Example], prompts: PromptConfig) -> list[float]:
    """log P(True) - log P(False) of each test example after the header and the demonstrations.

    Every request shares one prefix, so a prefix-reusing backend runs the demonstrations once.
    """
    block = demonstrations_block(prompts, [e for e, _ in demonstrations], [y for _, y in demonstrations])
    prefix = (header, block) if block else (header,)
    results = scorer.score([ScoreRequest(prefix, query_text(prompts, e), prompts.options) for e in tests])
    return [r.logprobs[0] - r.logprobs[1] for r in results]


def accuracy(odds: Sequence[float], tests: Sequence[Example], gold: dict[str, bool],
             threshold: float = 0.0) -> float:
    pairs = [(o > threshold, gold[e.id]) for o, e in zip(odds, tests)]
    return sum(a == b for a, b in pairs) / len(pairs)


def fewshot_accuracy(scorer: Scorer, header: str, demonstrations: Sequence[tuple[Example, bool]],
                     tests: Sequence[Example], gold: dict[str, bool], prompts: PromptConfig) -> float:
    return accuracy(log_odds(scorer, header, demonstrations, tests, prompts), tests, gold)


def zero_shot_accuracy(scorer: Scorer, header: str, tests: Sequence[Example], gold: dict[str, bool],
                       prompts: PromptConfig) -> float:
    odds = log_odds(scorer, header, [], tests, prompts)
    return accuracy(odds, tests, gold, float(np.median(odds)))


def pick_balanced(labels: dict[str, bool], k: int, seed: int) -> list[str]:
    """Up to k ids, half True and half False where the labels allow (seeded), in a seeded order."""
    rng = np.random.default_rng(seed)
    by_label = {y: [i for i in sorted(labels) if labels[i] is y] for y in (True, False)}
    for ids in by_label.values():
        rng.shuffle(ids)
    chosen = by_label[True][:(k + 1) // 2] + by_label[False][:k // 2]
    rest = [i for y in (True, False) for i in by_label[y] if i not in set(chosen)]
    chosen += rest[:k - len(chosen)]
    return [chosen[i] for i in rng.permutation(len(chosen))]

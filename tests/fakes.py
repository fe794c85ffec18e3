"""A scorer for unit tests of the search's logic only (the product runs real models).

Each example's text carries a hidden type word ("alpha" or "beta"), and the two types are
opposites. The fake model predicts a query's label from the demonstrations (Laplace-smoothed
majority; a demonstration of the other type counts with its label inverted), so the two most
mutually predictable label sets are "alpha True, beta False" and its complete flip.
"""

from __future__ import annotations

import math
import re

from icm_ray.backends.base import Scorer, ScoreResult

DEMO = re.compile(r"Statement: (?P<text>.*?)\nLabel: (?P<label>True|False)")


def type_of(text: str) -> str:
    return "alpha" if "alpha" in text else "beta"


class TypeMajorityScorer(Scorer):
    def __init__(self, prior_true: float = 0.5):
        self.prior_true = prior_true
        self.calls = 0
        self.seen_text: list[str] = []

    def score(self, requests):
        self.calls += 1
        results = []
        for request in requests:
            prefix = "".join(request.segments)
            self.seen_text.append(prefix + request.query)
            kind = type_of(request.query)
            votes = [(type_of(m["text"]) == kind) == (m["label"] == "True")
                     for m in DEMO.finditer(prefix)]
            true, false = sum(votes), len(votes) - sum(votes)
            p = (true + 2 * self.prior_true) / (true + false + 2)
            tokens = len((prefix + request.query).split())
            results.append(ScoreResult((math.log(p), math.log(1 - p)), tokens, tokens))
        return results


class TableScorer(Scorer):
    """Returns fixed log-probabilities per query text (for hand-computed utilities)."""

    def __init__(self, table: dict[str, tuple[float, float]]):
        self.table = table
        self.requests = []

    def score(self, requests):
        self.requests.extend(requests)
        return [ScoreResult(self.table[r.query], 1, 1) for r in requests]

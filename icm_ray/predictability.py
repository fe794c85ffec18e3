"""Mutual predictability P(D) and utility U(D) = alpha * P(D) - I(D).

P(D) is the mean over labelled examples i of log P(y_i | x_i, D minus i), normalised over the
verbalised labels (log-softmax over " True"/" False"): exact leave-one-out, every other
labelled example a demonstration. The mean (as the reference code) rather than the sum
keeps U comparable between label sets of different sizes, so alpha means the same at 8
labels as at 800.

Prompt arrangement (a free choice: the method does not fix the order of demonstrations;
any implementation given the same arrangement computes the same numbers). The labelled set
is a *base* plus a *tail*: the examples added or relabelled since the base was last
rebuilt, in the order they changed (the search keeps the tail in its state).
- Base: divide and conquer over a fixed binary tree of pool positions (each node halves
  its range of positions). For a node whose halves L and R both hold labelled examples,
  every prompt for a member of R continues with L's demonstrations and vice versa,
  recursively: about N log2 N demonstration tokens per evaluation instead of N^2. Every
  demonstration is its own segment, and the tree is fixed, so a change to one example
  leaves each prompt as it was up to that example's demonstration.
- Tail: its demonstrations follow, one segment each, in order, so adding an example or
  relabelling the newest ones changes only the ends of the prompts; a backend that keeps
  KV states across calls (transformers) then runs about one demonstration and one query
  per prompt.
- A tail member, or an example outside the set, sees the whole base (the top split's two
  segments, so it extends a prefix the base's prompts already share) and then the tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from icm_ray.backends.base import Scorer, ScoreRequest
from icm_ray.data import Example
from icm_ray.prompts import PromptConfig, demonstration_text, query_text


@dataclass
class Evaluation:
    """Scores of one label set: per labelled position, (log P(True), log P(False))."""

    logprobs: dict[int, tuple[float, float]]
    predictability: float
    inconsistency: int
    utility: float
    tokens_run: int
    prompt_tokens: int


def _halve(lo: int, hi: int, members: Sequence[int]) -> tuple[int, int]:
    """The middle of the position range [lo, hi) and how many (sorted) members lie below it."""
    middle = (lo + hi) // 2
    return middle, next((i for i, p in enumerate(members) if p >= middle), len(members))


class _Arrangement:
    """The segments of one label set's prompts (see the module docstring)."""

    def __init__(self, header: str, examples: Sequence[Example], labels: dict[int, bool],
                 prompts: PromptConfig, tail: Sequence[int]):
        self.header, self.examples, self.labels, self.prompts = header, examples, labels, prompts
        self.tail = [p for p in tail if p in labels]
        in_tail = set(self.tail)
        self.base = sorted(p for p in labels if p not in in_tail)
        self.span = max(len(examples), (max(labels) + 1) if labels else 0)
        self._shown: dict[int, str] = {}
        self.tail_segments = self.demos(self.tail)

    def demos(self, positions: Sequence[int]) -> tuple[str, ...]:
        """One segment per demonstration, each rendered once."""
        out = []
        for p in positions:
            if p not in self._shown:
                self._shown[p] = demonstration_text(self.prompts, self.examples[p], self.labels[p])
            out.append(self._shown[p])
        return tuple(out)

    def request(self, segments: tuple[str, ...], position: int) -> ScoreRequest:
        return ScoreRequest(segments, query_text(self.prompts, self.examples[position]),
                            self.prompts.options)

    def base_requests(self, wanted: set[int]) -> dict[int, ScoreRequest]:
        out: dict[int, ScoreRequest] = {}

        def recurse(lo: int, hi: int, members: list[int], prefix: tuple[str, ...]) -> None:
            if not wanted.intersection(members):
                return
            if len(members) == 1:
                out[members[0]] = self.request(prefix + self.tail_segments, members[0])
                return
            middle, cut = _halve(lo, hi, members)
            left, right = members[:cut], members[cut:]
            if not left or not right:  # only one half holds members: no segment at this node
                recurse(*((middle, hi) if not left else (lo, middle)), members, prefix)
                return
            recurse(lo, middle, left, prefix + self.demos(right))
            recurse(middle, hi, right, prefix + self.demos(left))

        recurse(0, self.span, self.base, (self.header,))
        return out

    def whole_base(self) -> tuple[str, ...]:
        """All base demonstrations: the top split's left half (the start of its right half's
        prompts) followed by its right half."""
        return self.demos(self.base)

    def context(self, leave_out: int | None = None) -> tuple[str, ...]:
        """Every labelled example except `leave_out`: the prompt of a tail member or a newcomer."""
        kept = tuple(s for p, s in zip(self.tail, self.tail_segments) if p != leave_out)
        return (self.header,) + self.whole_base() + kept


def leave_one_out_requests(
    header: str, examples: Sequence[Example], labels: dict[int, bool], targets: Sequence[int],
    prompts: PromptConfig, tail: Sequence[int] = (),
) -> dict[int, ScoreRequest]:
    """The request for each target position, with all *other* labelled positions as context.

    A target outside the label set sees all of it, as if it were the next tail member: the
    proposal for a new example is then its later leave-one-out request in the proposed set.
    """
    arrangement = _Arrangement(header, examples, labels, prompts, tail)
    in_base = set(arrangement.base)
    out = arrangement.base_requests({t for t in targets if t in in_base})
    for target in targets:
        if target not in in_base:
            out[target] = arrangement.request(arrangement.context(target), target)
    return {t: out[t] for t in targets}


def next_tail(tail: Sequence[int], labels: dict[int, bool], changed: Sequence[int],
              max_tail: int) -> list[int]:
    """The tail after `changed` positions take new labels in the set `labels` (before the change).

    Changed tail members and newcomers go to the end; a changed base member, a tail longer
    than `max_tail`, or moving a member from deep in the tail (which would touch more of
    every prompt than about log2 N demonstrations) rebuilds the base from everything (tail []).
    """
    tail = list(tail)
    if any(p in labels and p not in tail for p in changed):
        return []
    moved = [i for i, p in enumerate(tail) if p in changed]
    if moved and len(tail) - moved[0] > max(1, math.log2(max(2, len(labels)))):
        return []
    kept = [p for p in tail if p not in changed]
    result = kept + [p for p in dict.fromkeys(changed)]
    return result if len(result) <= max_tail else []


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
             calibrate: bool = False, inconsistency_weight: float = 1.0,
             tail: Sequence[int] = ()) -> Evaluation:
    """Score every labelled example given all the others; U = alpha * mean log-prob - w * I.

    With `calibrate`, each example's log-odds are first centred on their mean over the set,
    so a set cannot become "predictable" just by giving every example the label the model
    leans towards (an optional, non-paper objective; off by default).
    """
    if not labels:
        return Evaluation({}, 0.0, inconsistency, utility(0.0, inconsistency, alpha, inconsistency_weight),
                          0, 0)
    requests = leave_one_out_requests(header, examples, labels, list(labels), prompts, tail)
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
    (the arrangement a newcomer's proposal uses), plus (tokens run, prompt tokens)."""
    if not targets:
        return [], 0, 0
    context = _Arrangement(header, examples, labels, prompts, ()).context()  # shared by all targets
    results = scorer.score([ScoreRequest(context, query_text(prompts, t), prompts.options)
                            for t in targets])
    return ([r.logprobs[0] - r.logprobs[1] for r in results], sum(r.tokens_run for r in results),
            sum(r.prompt_tokens for r in results))

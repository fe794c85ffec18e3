"""The ICM search: simulated annealing over label sets, one persona at a time.

Pure and seeded: all randomness comes from one numpy Generator whose state is part of
`SearchState`, and all model calls go through a `Scorer`. The state is a plain dict-able
object, so an actor can checkpoint it after any step and a restarted actor continues to
exactly the labels an uninterrupted search reaches.

Which way round: a label set and its complete flip are nearly equally coherent. After
the last step the search settles orientation with this rule (documented in the README):
1. human labels clamped into the search (`--clamp`) anchor it: nothing is flipped;
2. otherwise the labels are compared with the model's zero-shot prior under the persona
   header (log-odds of True, centred on their median over the pool, so no gold and no
   threshold is needed): if they disagree on average, and a permutation test says the
   disagreement is real (p <= orientation_p_max), every label is flipped, unless the flip
   would add inconsistencies. The p-value is reported as how sure the decision is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from icm_ray.backends.base import Scorer
from icm_ray.consistency import (
    build_constraints,
    consistent_labellings,
    count_inconsistencies,
    violations,
)
from icm_ray.data import Example, Persona
from icm_ray.fields import Integer
from icm_ray.predictability import (
    Evaluation,
    evaluate,
    leave_one_out_requests,
    mean_log_odds,
    next_tail,
    utility,
    zero_shot_requests,
)
from icm_ray.prompts import PromptConfig, header_text
from icm_ray.schedules import TemperatureSchedule, anneal, temperature


def accept(delta: float, temperature: float, draw: float) -> bool:
    """Metropolis rule: always take a rise in U, take a fall with probability exp(delta / T)."""
    return delta >= 0 or draw < math.exp(delta / temperature)


class SearchConfig(BaseModel):
    """Hyper-parameters; defaults from Wen et al. 2025 where the paper gives them."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(50.0, gt=0, description="weight of mutual predictability in U (at the start)")
    final_alpha: float | None = Field(None, gt=0, description="anneal alpha linearly to this by the "
                                      "last iteration; null: constant")
    inconsistency_weight: float = Field(1.0, ge=0, description="w in U = alpha P - w I (at the start)")
    final_inconsistency_weight: float | None = Field(None, ge=0, description="ramp w linearly to "
                                                     "this by the last iteration; null: constant")
    temperature_schedule: TemperatureSchedule = Field("log", description="log (the paper's), "
                                                      "exponential or linear; see icm_ray.schedules")
    initial_temperature: float = Field(10.0, gt=0, description="T0")
    final_temperature: float = Field(0.01, gt=0, description="T_min")
    cooling_rate: float = Field(0.99, ge=0, description="rate: beta in T0 / (1 + beta log n)")
    seed_labels: Integer = Field(8, ge=0, description="K random, balanced seed labels")
    iterations: Integer = Field(64, ge=0, description="search steps per persona")
    seed: Integer = Field(0, ge=0)
    fix_rounds: Integer = Field(10, ge=0, description="consistency-fix rounds per step")
    group_weight: float = Field(100.0, gt=0, description="sampling weight of unlabelled "
                                "examples whose group already has labelled members")
    group_rule: Literal["equal", "exclusive"] | None = Field(
        None, description="extra rule for groups of claims without keys")
    orientation: Literal["prior", "none"] = "prior"
    calibrate: bool = Field(False, description="centre log-odds on the set's mean before scoring "
                            "(guards against one-sided label sets; not in the paper)")
    permutations: Integer = Field(2000, ge=0, description="permutation-test draws for orientation")
    orientation_p_max: float = Field(0.2, gt=0, le=1, description="flip only on prior evidence at "
                                     "least this strong (permutation p-value)")
    max_tail: Integer = Field(32, ge=0, description="examples changed since the last rebuild that go, in "
                          "order, at the end of every prompt (see icm_ray.predictability); 0: "
                          "always one divide-and-conquer tree")


@dataclass
class SearchState:
    labels: list[bool | None]
    seeded: list[bool]
    clamped: list[bool]
    rng: dict[str, Any]
    iteration: int = 0
    logprobs: dict[int, tuple[float, float]] = field(default_factory=dict)
    predictability: float = 0.0
    inconsistency: int = 0
    utility: float = 0.0
    tokens_run: int = 0
    prompt_tokens: int = 0
    wall_seconds: float = 0.0
    trace: list[dict[str, Any]] = field(default_factory=list)
    zero_shot_log_odds: list[float] | None = None
    orientation: dict[str, Any] | None = None
    finished: bool = False
    tail: list[int] = field(default_factory=list)  # prompt arrangement (predictability.next_tail)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["logprobs"] = {str(k): list(v) for k, v in self.logprobs.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchState:
        data = dict(data)
        data["logprobs"] = {int(k): (v[0], v[1]) for k, v in data["logprobs"].items()}
        return cls(**data)

    @property
    def labelled(self) -> dict[int, bool]:
        return {p: y for p, y in enumerate(self.labels) if y is not None}


class ICMSearch:
    def __init__(self, examples: Sequence[Example], persona: Persona, scorer: Scorer,
                 config: SearchConfig | None = None, prompts: PromptConfig | None = None,
                 clamp: dict[str, bool] | None = None):
        if not examples:
            raise ValueError("a search needs at least one example")
        self.examples = list(examples)
        self.persona = persona
        self.scorer = scorer
        self.config = config or SearchConfig()
        self.prompts = prompts or PromptConfig()
        self.header = header_text(self.prompts, persona)
        self.constraints = build_constraints(self.examples, self.config.group_rule)
        positions = {e.id: p for p, e in enumerate(self.examples)}
        self.clamp = {positions[i]: y for i, y in (clamp or {}).items()}
        self.group_of = [e.group for e in self.examples]

    # ------------------------------------------------------------ scoring helpers

    def weights(self, iteration: int) -> tuple[float, float]:
        """(alpha, w) of U = alpha * P - w * I at this iteration (0: the seed labels)."""
        c = self.config
        return (anneal(c.alpha, c.final_alpha, iteration, c.iterations),
                anneal(c.inconsistency_weight, c.final_inconsistency_weight, iteration, c.iterations))

    def _evaluate(self, labels: dict[int, bool], state: SearchState,
                  tail: Sequence[int] = ()) -> Evaluation:
        as_list: list[bool | None] = [labels.get(p) for p in range(len(self.examples))]
        alpha, weight = self.weights(state.iteration)
        ev = evaluate(self.scorer, self.header, self.examples, labels, self.prompts,
                      alpha, count_inconsistencies(self.constraints, as_list),
                      self.config.calibrate, weight, tail)
        state.tokens_run += ev.tokens_run
        state.prompt_tokens += ev.prompt_tokens
        return ev

    def _adopt(self, state: SearchState, labels: dict[int, bool], ev: Evaluation,
               tail: Sequence[int] = ()) -> None:
        state.labels = [labels.get(p) for p in range(len(self.examples))]
        state.tail = list(tail)
        state.logprobs = ev.logprobs
        state.predictability, state.inconsistency, state.utility = (
            ev.predictability, ev.inconsistency, ev.utility)

    # ------------------------------------------------------------ the search

    def start(self) -> SearchState:
        rng = np.random.default_rng(self.config.seed)
        n = len(self.examples)
        state = SearchState(labels=[None] * n, seeded=[False] * n,
                            clamped=[p in self.clamp for p in range(n)], rng={})
        labels = dict(self.clamp)
        free = [p for p in range(n) if p not in self.clamp]
        k = min(self.config.seed_labels, len(free))
        chosen = rng.choice(len(free), size=k, replace=False) if k else []
        values = rng.permutation([True] * ((k + 1) // 2) + [False] * (k // 2))
        for index, value in zip(chosen, values):
            labels[free[int(index)]] = bool(value)
            state.seeded[free[int(index)]] = True
        started = time.perf_counter()
        self._adopt(state, labels, self._evaluate(labels, state, []), [])
        state.wall_seconds += time.perf_counter() - started
        state.rng = rng.bit_generator.state
        return state

    def done(self, state: SearchState) -> bool:
        return state.iteration >= self.config.iterations

    def _sample(self, state: SearchState, rng: np.random.Generator) -> int:
        touched = {self.group_of[p] for p, y in enumerate(state.labels)
                   if y is not None and self.group_of[p] is not None}
        weights = np.empty(len(self.examples))
        for p, label in enumerate(state.labels):
            if state.clamped[p]:
                weights[p] = 0.0
            elif label is None and self.group_of[p] in touched:
                weights[p] = self.config.group_weight
            else:
                weights[p] = 1.0
        if weights.sum() == 0:
            return -1
        return int(rng.choice(len(weights), p=weights / weights.sum()))

    def step(self, state: SearchState) -> SearchState:
        """One annealing step: sample, propose the argmax label, fix consistency, accept."""
        started = time.perf_counter()
        tokens_before, prompt_before = state.tokens_run, state.prompt_tokens
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng
        state.iteration += 1
        t = temperature(state.iteration, self.config.initial_temperature,
                        self.config.final_temperature, self.config.cooling_rate,
                        self.config.temperature_schedule)
        # With annealed weights the current set's U is restated at this step's weights before
        # it is compared with a proposal (P and I are kept, so no model call).
        alpha, weight = self.weights(state.iteration)
        state.utility = utility(state.predictability, state.inconsistency, alpha, weight)
        current = state.labelled
        position = self._sample(state, rng)
        accepted, proposal_u, draw = True, state.utility, None
        if position >= 0:
            # The example given all the others, as it stands in the current arrangement (a
            # newcomer as the next tail member): for a labelled example this is its own
            # leave-one-out prompt, already scored, and for a newcomer the one it gets if kept.
            request = leave_one_out_requests(self.header, self.examples, current, [position],
                                             self.prompts, state.tail)[position]
            result = self.scorer.score([request])[0]
            state.tokens_run += result.tokens_run
            state.prompt_tokens += result.prompt_tokens
            proposed = dict(current)
            bias = mean_log_odds(state.logprobs) if self.config.calibrate else 0.0
            proposed[position] = result.logprobs[0] - result.logprobs[1] >= bias
            if proposed != current:
                tail = next_tail(state.tail, current, [position], self.config.max_tail)
                ev = self._evaluate(proposed, state, tail)
                proposed, ev, tail = self._fix(proposed, ev, tail, state, rng)
                proposal_u = ev.utility
                delta = ev.utility - state.utility
                draw = rng.random()  # drawn every time: the RNG stream does not depend on delta
                accepted = accept(delta, t, draw)
                if accepted:
                    self._adopt(state, proposed, ev, tail)
        state.rng = rng.bit_generator.state
        state.wall_seconds += time.perf_counter() - started
        state.trace.append({
            "iteration": state.iteration, "temperature": t, "alpha": alpha,
            "inconsistency_weight": weight, "example": position,
            "utility": state.utility, "proposal_utility": proposal_u,
            "predictability": state.predictability, "inconsistency": state.inconsistency,
            "accepted": accepted, "draw": draw, "labelled": len(state.labelled),
            "tokens_run": state.tokens_run - tokens_before,
            "prompt_tokens": state.prompt_tokens - prompt_before,
            "tokens_cached": (state.prompt_tokens - prompt_before) - (state.tokens_run - tokens_before),
            "wall_seconds": time.perf_counter() - started,
        })
        return state

    def _fix(self, labels: dict[int, bool], ev: Evaluation, tail: list[int], state: SearchState,
             rng: np.random.Generator) -> tuple[dict[int, bool], Evaluation, list[int]]:
        """Mend violated pairs one at a time, keeping a repair only if U does not fall."""
        for _ in range(self.config.fix_rounds):
            as_list = [labels.get(p) for p in range(len(self.examples))]
            broken = violations(self.constraints, as_list)
            if not broken:
                break
            pair = broken[int(rng.integers(len(broken)))]
            best: tuple[dict[int, bool], Evaluation] | None = None
            candidate_tail = next_tail(tail, labels, [pair.i, pair.j], self.config.max_tail)
            for label_i, label_j in consistent_labellings(pair):
                if any(p in self.clamp and self.clamp[p] != y
                       for p, y in ((pair.i, label_i), (pair.j, label_j))):
                    continue
                candidate = dict(labels)
                candidate[pair.i], candidate[pair.j] = label_i, label_j
                candidate_ev = self._evaluate(candidate, state, candidate_tail)
                if best is None or candidate_ev.utility > best[1].utility:
                    best = (candidate, candidate_ev)
            if best is None or best[1].utility < ev.utility:
                break
            labels, ev = best
            tail = candidate_tail
        return labels, ev, tail

    # ------------------------------------------------------------ orientation

    def orientation(self, state: SearchState) -> tuple[dict[str, Any], bool]:
        """The orientation decision for the labels as they stand, and whether it flips them.

        Changes no label, so a tuning trial can ask mid-search how the labels would end up.
        The zero-shot requests are the same every time (a caching scorer answers repeats).
        """
        results = self.scorer.score(zero_shot_requests(self.header, self.examples, self.prompts))
        state.tokens_run += sum(r.tokens_run for r in results)
        state.prompt_tokens += sum(r.prompt_tokens for r in results)
        log_odds = np.array([r.logprobs[0] - r.logprobs[1] for r in results])
        state.zero_shot_log_odds = log_odds.tolist()
        labelled = state.labelled
        positions = np.array(sorted(labelled))
        signs = np.array([1.0 if labelled[p] else -1.0 for p in positions])
        centred = log_odds - np.median(log_odds)
        agreement = float(np.mean(centred[positions] * signs)) if len(positions) else 0.0
        rng = np.random.default_rng(self.config.seed + 7919)
        draws = [abs(float(np.mean(centred[positions] * rng.permutation(signs))))
                 for _ in range(self.config.permutations if len(positions) else 0)]
        p_value = (1 + sum(d >= abs(agreement) for d in draws)) / (1 + len(draws))
        info: dict[str, Any] = {"rule": self.config.orientation, "prior_agreement": agreement,
                                "p_value": p_value, "utility_before": state.utility}
        flip = False
        if any(state.clamped):
            info["decision"] = "anchored by human labels"
        elif self.config.orientation == "none" or agreement >= 0:
            info["decision"] = "kept"
        elif p_value > self.config.orientation_p_max:
            info["decision"] = "kept (prior inconclusive)"
        elif count_inconsistencies(self.constraints, self.flipped(state)) > state.inconsistency:
            info["decision"] = "kept (a flip would add inconsistencies)"
        else:
            info["decision"], flip = "flipped", True
        return info, flip

    def flipped(self, state: SearchState) -> list[bool | None]:
        """Every label inverted except clamped ones."""
        return [y if y is None or p in self.clamp else not y for p, y in enumerate(state.labels)]

    def finish(self, state: SearchState) -> SearchState:
        """Settle which way round the labels are (see module docstring) and close the search."""
        if state.finished:
            return state
        started = time.perf_counter()
        info, flip = self.orientation(state)
        if flip:
            flipped = {p: y for p, y in enumerate(self.flipped(state)) if y is not None}
            self._adopt(state, flipped, self._evaluate(flipped, state, []), [])
        info["utility_after"] = state.utility
        state.orientation = info
        state.finished = True
        state.wall_seconds += time.perf_counter() - started
        return state

    def run(self, state: SearchState | None = None, on_step=None) -> SearchState:
        """Start (or continue) and run to the end; `on_step(state)` after each step."""
        state = state or self.start()
        while not self.done(state):
            self.step(state)
            if on_step:
                on_step(state)
        return self.finish(state)

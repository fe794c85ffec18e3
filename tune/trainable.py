"""The Tune trainable: one trial runs the ICM search for every tuned persona, in lockstep,
scoring through the shared model deployment on Ray Serve (a trial never loads a model),
and reports the objective every few iterations so ASHA can stop weak trials early."""

from __future__ import annotations

import math
from typing import Any

from icm_ray.config import RunConfig
from icm_ray.search import SearchConfig
from icm_ray_tune.objectives import PersonaTask, measure


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else math.nan


def run_trial(params: dict[str, Any], *, tasks: list[PersonaTask], base: dict[str, Any], metric: str,
              report_every: int, app_name: str) -> None:
    from ray import serve, tune

    from icm_ray.backends.base import CachingScorer
    from icm_ray.replicas import ServeScorer
    from icm_ray.search import ICMSearch

    run_config = RunConfig.model_validate(base)
    config = SearchConfig.model_validate({**run_config.search.model_dump(), **params})
    reference = (run_config.search.alpha, run_config.search.inconsistency_weight)
    scorer = CachingScorer(ServeScorer(serve.get_app_handle(app_name)))
    searches = [ICMSearch(t.examples, t.persona, scorer, config, run_config.prompts) for t in tasks]
    states = [s.start() for s in searches]

    def report() -> None:
        rows = [measure(s, st, t, metric, reference) for s, st, t in zip(searches, states, tasks)]
        out = {key: _mean(rows, key) for key in rows[0] if key != "labelled"}
        out["labelled"] = sum(r["labelled"] for r in rows)
        out["iteration"] = states[0].iteration
        out["finished"] = states[0].finished
        tune.report(out)

    for search, state in zip(searches, states):  # a zero budget: nothing to step
        if search.done(state):
            search.finish(state)
    report()
    while not states[0].finished:
        for search, state in zip(searches, states):
            search.step(state)
            if search.done(state):  # finish before reporting: ASHA ends a trial at the budget
                search.finish(state)
        if states[0].finished or states[0].iteration % report_every == 0:
            report()

"""The run driver: one ICM search per persona, in process or on Ray.

`run_personas` is the single entry point. With Ray (the default) every persona's search
lives in its own actor and scores through the shared model replicas on Ray Serve; without
Ray (`--no-ray`, for debugging) the same search code runs here, one persona after another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from icm_ray.backends.base import CachingScorer, Scorer
from icm_ray.config import RunConfig
from icm_ray.data import Dataset, Example, Persona
from icm_ray.search import ICMSearch, SearchState

ProgressFn = Callable[[str, dict], None]


@dataclass
class PersonaJob:
    persona: Persona
    examples: list[Example]  # no gold here: Example has no field for it


def plan_jobs(dataset: Dataset, personas: dict[str, Persona]) -> list[PersonaJob]:
    return [PersonaJob(personas[name], [e for e in dataset.examples if e.persona == name])
            for name in dataset.personas()]


def progress_of(state: SearchState, total: int) -> dict:
    return {"iteration": state.iteration, "total": total, "utility": state.utility,
            "inconsistency": state.inconsistency, "labelled": len(state.labelled),
            "finished": state.finished}


def run_in_process(jobs: Sequence[PersonaJob], config: RunConfig, scorer: Scorer,
                   on_progress: ProgressFn | None = None) -> dict[str, tuple[list[Example], SearchState]]:
    cached = scorer if isinstance(scorer, CachingScorer) else CachingScorer(scorer)
    finished = {}
    for job in jobs:
        search = ICMSearch(job.examples, job.persona, cached, config.search, config.prompts)
        report = (lambda s, name=job.persona.name:
                  on_progress(name, progress_of(s, config.search.iterations))) if on_progress else None
        state = search.run(on_step=report)
        if report:
            report(state)
        finished[job.persona.name] = (job.examples, state)
    return finished

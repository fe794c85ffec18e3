"""The run driver: one ICM search per persona, in process or on Ray.

`run_personas` is the single entry point. With Ray (the default) every persona's search
lives in its own actor and scores through the shared model replicas on Ray Serve; without
Ray (`--no-ray`, for debugging) the same search code runs here, one persona after another.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from icm_ray.backends.base import CachingScorer, Scorer
from icm_ray.config import RunConfig
from icm_ray.data import Dataset, Example, Persona
from icm_ray.errors import UserError, user_error_in
from icm_ray.search import ICMSearch, SearchState

ProgressFn = Callable[[str, dict], None]


@dataclass
class PersonaJob:
    persona: Persona
    examples: list[Example]  # no gold here: Example has no field for it
    clamp: dict[str, bool] = field(default_factory=dict)  # human labels the search never flips


def checkpoint_name(persona: str) -> str:
    from icm_ray.store import safe_name

    return f"checkpoints/{safe_name(persona)}.json"


def actor_name(store_uri: str, persona: str) -> str:
    """Persona actors are named, so operators (and tests) can find one: ray.get_actor(name)."""
    import hashlib

    from icm_ray.store import safe_name

    return f"icm-search-{hashlib.sha256(store_uri.encode()).hexdigest()[:8]}-{safe_name(persona)}"


def plan_jobs(dataset: Dataset, personas: dict[str, Persona],
              clamp: dict[str, bool] | None = None) -> list[PersonaJob]:
    jobs = []
    for name in dataset.personas():
        examples = [e for e in dataset.examples if e.persona == name]
        ids = {e.id for e in examples}
        jobs.append(PersonaJob(personas[name], examples,
                               {i: y for i, y in (clamp or {}).items() if i in ids}))
    return jobs


def save_inputs(store, config: RunConfig, dataset: Dataset, personas: dict[str, Persona],
                clamp: dict[str, bool] | None = None) -> None:
    """Everything a resumed run needs, so `--resume` does not depend on the original files."""
    store.write_json("inputs.json", {
        "config": config.model_dump(mode="json"),
        "personas": {name: p.description for name, p in personas.items()},
        "examples": [e.to_dict() for e in dataset.examples],
        "gold": dataset.gold,  # evaluation only; never handed to a search
        "clamp": clamp or {},  # human labels (--clamp): part of the search's input
    })


def load_clamp(store) -> dict[str, bool]:
    return dict(store.read_json("inputs.json").get("clamp") or {})


def load_inputs(store) -> tuple[RunConfig, Dataset, dict[str, Persona]]:
    from pydantic import ValidationError

    from icm_ray.config import describe_validation_error

    raw = store.read_json("inputs.json")
    try:
        config = RunConfig.model_validate(raw["config"])
        dataset = Dataset([Example(**e) for e in raw["examples"]], dict(raw["gold"]))
        personas = {n: Persona(n, d) for n, d in raw["personas"].items()}
    except ValidationError as err:  # a setting edited by hand or from another version: one line
        raise UserError(describe_validation_error(err, f"{store.uri}/inputs.json", "config")) from None
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{store.uri}/inputs.json: not a valid run inputs file ({err})") from None
    where = f"{store.uri}/inputs.json"
    seen: set[str] = set()
    for number, example in enumerate(dataset.examples, start=1):  # as a data file's rows are
        text = {"claim": example.claim, "comparison": example.response_b,
                "response": example.response}.get(example.kind)
        if text is None:
            raise UserError(f"{where}: examples[{number}]: field 'kind': '{example.kind}' is not "
                            "claim, comparison or response")
        if not isinstance(example.id, str) or example.id in seen:
            raise UserError(f"{where}: examples[{number}]: field 'id': missing or duplicate")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: examples[{number}]: the {example.kind}'s text is missing")
        if example.persona not in personas:
            raise UserError(f"{where}: examples[{number}]: persona '{example.persona}' is not "
                            "in 'personas'")
        seen.add(example.id)
    unknown = [i for i in raw.get("clamp") or {} if i not in seen]
    if unknown:
        raise UserError(f"{where}: field 'clamp': id '{unknown[0]}' is not among the examples")
    return config, dataset, personas


def progress_of(state: SearchState, total: int) -> dict:
    return {"iteration": state.iteration, "total": total, "utility": state.utility,
            "inconsistency": state.inconsistency, "labelled": len(state.labelled),
            "finished": state.finished}


def load_checkpoint(store, persona: str, examples: int) -> SearchState | None:
    """A persona's last checkpoint, or None; a damaged one is a one-line error naming the file."""
    name = checkpoint_name(persona)
    if not store.exists(name):
        return None
    try:
        state = SearchState.from_dict(store.read_json(name))
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as err:
        raise UserError(f"{store.uri}/{name}: not a search checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None

    def bad(key: str, what: str) -> UserError:
        return UserError(f"{store.uri}/{name}: field '{key}': {what}; the checkpoint is damaged "
                         "or does not match the run")

    for key in ("labels", "seeded", "clamped"):
        values = getattr(state, key)
        if not isinstance(values, list) or len(values) != examples:
            raise bad(key, f"expected a list of {examples} entries (one per example)")
        if not all(isinstance(v, bool) or (key == "labels" and v is None) for v in values):
            raise bad(key, "expected true/false" + (" or null" if key == "labels" else ""))
    if not isinstance(state.rng, dict):
        raise bad("rng", "expected the generator's state (an object)")
    if not isinstance(state.iteration, int) or isinstance(state.iteration, bool) or state.iteration < 0:
        raise bad("iteration", "expected a whole number >= 0")
    if not isinstance(state.trace, list) or not all(isinstance(row, dict) for row in state.trace):
        raise bad("trace", "expected a list of objects")
    if not isinstance(state.tail, list) or not all(
            isinstance(p, int) and 0 <= p < examples for p in state.tail):
        raise bad("tail", f"expected positions from 0 to {examples - 1}")
    return state


def drive(search: ICMSearch, store, persona: str, every: int,
          on_step: Callable[[SearchState], None] | None = None) -> SearchState:
    """Run one search to the end from its last checkpoint, checkpointing every few steps.

    Shared by the persona actors and the in-process path, so both resume the same way.
    """
    name = checkpoint_name(persona)
    state = load_checkpoint(store, persona, len(search.examples))
    if state is None:
        state = search.start()
        store.write_json(name, state.to_dict())
    while not search.done(state):
        search.step(state)
        if state.iteration % every == 0:
            store.write_json(name, state.to_dict())
        if on_step:
            on_step(state)
    if not state.finished:
        search.finish(state)
        store.write_json(name, state.to_dict())
    if on_step:
        on_step(state)
    return state


def run_in_process(jobs: Sequence[PersonaJob], config: RunConfig, scorer: Scorer, store,
                   on_progress: ProgressFn | None = None) -> dict[str, tuple[list[Example], SearchState]]:
    cached = scorer if isinstance(scorer, CachingScorer) else CachingScorer(scorer)
    finished = {}
    for job in jobs:
        search = ICMSearch(job.examples, job.persona, cached, config.search, config.prompts, job.clamp)
        report = (lambda s, name=job.persona.name:
                  on_progress(name, progress_of(s, config.search.iterations))) if on_progress else None
        state = drive(search, store, job.persona.name, config.ray.checkpoint_every, report)
        finished[job.persona.name] = (job.examples, state)
    return finished


# ---------------------------------------------------------------- on Ray


def _search_actor_class():
    import ray

    @ray.remote
    class PersonaSearchActor:
        """Owns one persona's search; checkpoints it; resumes from the last checkpoint on restart."""

        def __init__(self, job: PersonaJob, config: dict, store_root: str, handle):
            from icm_ray.replicas import ServeScorer
            from icm_ray.store import open_store

            self.config = RunConfig.model_validate(config)
            self.store = open_store(store_root)
            self.name = job.persona.name
            self.search = ICMSearch(job.examples, job.persona, CachingScorer(ServeScorer(handle)),
                                    self.config.search, self.config.prompts, job.clamp)
            self.latest = {"iteration": 0, "total": self.config.search.iterations, "utility": 0.0,
                           "inconsistency": 0, "labelled": 0, "finished": False}

        def progress(self) -> dict:
            return self.latest

        def _report(self, state: SearchState) -> None:
            self.latest = progress_of(state, self.config.search.iterations)

        def run(self) -> dict:
            state = drive(self.search, self.store, self.name, self.config.ray.checkpoint_every,
                          self._report)
            return state.to_dict()

    return PersonaSearchActor


def patient_serve_proxy() -> None:
    """Serve's HTTP proxy gets 5 s to report ready; on a busy 2-core machine its start-up takes
    longer and Serve kills it in a loop. Call before starting a cluster: its processes inherit it."""
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, "60")


def ensure_ray(address: str | None = None) -> bool:
    """Join the cluster at `address` / RAY_ADDRESS, or start a private local one. True if started."""
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    patient_serve_proxy()
    import ray

    for name in ("ray", "ray.serve"):  # progress bars and the summary say what matters
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        return False
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=300 * 1024 * 1024, logging_level=logging.ERROR,
             log_to_driver=False)
    return True


def deploy_model(config: RunConfig, http: bool = True):
    """Deploy (or reuse) the model replicas; returns the deployment handle.

    `http=False` (a private cluster for one run) starts Serve without an HTTP proxy.
    """
    from ray import serve

    from icm_ray.replicas import MODEL_APP, model_app

    if not http:
        try:
            serve.start(proxy_location="Disabled")
        except Exception:  # already running on this cluster, with its own HTTP options
            pass
    return serve.run(model_app(config), name=MODEL_APP, route_prefix=None)


def run_on_ray(jobs: Sequence[PersonaJob], config: RunConfig, store, on_progress: ProgressFn | None = None,
               address: str | None = None, handle=None,
               ) -> tuple[dict[str, tuple[list[Example], SearchState]], dict]:
    """Run the personas' searches in parallel actors. Pass `handle` to score through model
    replicas that are already deployed (they are then left running); otherwise the replicas
    are deployed for this run and removed after it."""
    import ray
    from ray import serve

    from icm_ray.replicas import MODEL_APP

    started = ensure_ray(address)
    actors = {}
    own_model = False
    try:
        finished: dict[str, tuple[list[Example], SearchState]] = {}
        pending_jobs = []
        for job in jobs:  # personas finished before an interruption are not recomputed
            state = load_checkpoint(store, job.persona.name, len(job.examples))
            if state is not None and state.finished:
                finished[job.persona.name] = (job.examples, state)
                if on_progress:
                    on_progress(job.persona.name, progress_of(state, config.search.iterations))
                continue
            pending_jobs.append(job)
        own_model = handle is None
        if own_model:
            handle = deploy_model(config, http=not started)
        identity = handle.identity.remote().result()
        actor_class = _search_actor_class()
        config_dict = config.model_dump(mode="json")
        # Actors reach the store with the driver's AWS settings (endpoint, region, credentials).
        aws_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        for job in pending_jobs:
            actors[job.persona.name] = actor_class.options(
                name=actor_name(store.uri, job.persona.name), num_cpus=config.ray.actor_cpus,
                max_restarts=config.ray.max_restarts, max_task_retries=-1, max_concurrency=2,
                runtime_env={"env_vars": aws_env} if aws_env else None,
            ).remote(job, config_dict, store.uri, handle)
        refs = {actor.run.remote(): name for name, actor in actors.items()}
        by_name = {job.persona.name: job for job in jobs}
        while refs:
            done, _ = ray.wait(list(refs), timeout=0.5)
            for ref in done:
                name = refs.pop(ref)
                try:
                    state = SearchState.from_dict(ray.get(ref))
                except ray.exceptions.RayTaskError as err:  # show users the cause, not Ray's wrapper
                    if user_error_in(err):
                        raise UserError(f"persona '{name}': {user_error_in(err)}") from None
                    raise
                finished[name] = (by_name[name].examples, state)
                if on_progress:
                    on_progress(name, progress_of(state, config.search.iterations))
            if on_progress:
                for name in list(refs.values()):
                    try:
                        info = ray.get(actors[name].progress.remote(), timeout=2)
                    except Exception:  # restarting after a crash: skip this tick
                        continue
                    on_progress(name, info)
        return {job.persona.name: finished[job.persona.name] for job in jobs}, identity
    finally:
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
        if started:  # a private cluster: shutting Ray down stops Serve with it
            ray.shutdown()
        elif own_model:
            try:
                serve.delete(MODEL_APP)
            except Exception:
                pass


@contextmanager
def model_session(config: RunConfig, no_ray: bool = False, address: str | None = None
                  ) -> Iterator[tuple[Scorer, Callable]]:
    """One model for a whole experiment (`icm-ray eval`): a scorer for the driver's own
    measurements and `search(jobs, store, on_progress) -> (finished, identity)` for its runs.

    On Ray both go through one deployment of the model replicas, removed at the end; with
    `no_ray` the model is loaded here and the searches run in this process.
    """
    if no_ray:
        from icm_ray.backends import load_scorer

        scorer = CachingScorer(load_scorer(config.model.model_dump()))
        yield scorer, lambda jobs, store, on_progress=None: (
            run_in_process(jobs, config, scorer, store, on_progress), scorer.identity())
        return
    from icm_ray.replicas import ServeScorer

    started = ensure_ray(address)
    try:
        handle = deploy_model(config, http=not started)
        yield CachingScorer(ServeScorer(handle)), lambda jobs, store, on_progress=None: run_on_ray(
            jobs, config, store, on_progress, address, handle=handle)
    finally:
        release_model(started)


def release_model(started_ray: bool) -> None:
    """After an experiment: stop the private cluster it started, or remove just its model app."""
    import ray
    from ray import serve

    from icm_ray.replicas import MODEL_APP

    if started_ray:  # shutting Ray down stops Serve with it
        ray.shutdown()
        return
    try:
        serve.delete(MODEL_APP)
    except Exception:  # already gone
        pass

"""The tuning experiment: Tuner, searcher, ASHA, storage; then the trial table and best config.

The model replicas are deployed once on Ray Serve (icm_ray.engine.deploy_model) and every
trial scores through them; trials themselves are small fractional-CPU tasks.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from icm_ray.config import RunConfig
from icm_ray.errors import UserError
from icm_ray_tune.objectives import PersonaTask
from icm_ray_tune.report import fmt_value
from icm_ray_tune.space import has_grid, to_tune
from icm_ray_tune.trainable import run_trial


@dataclass
class TuneOptions:
    metric: str = "heldout_p"
    samples: int = 8
    searcher: str = "auto"  # auto (optuna if installed, else random), optuna, random
    max_concurrent: int = 4
    report_every: int = 2
    grace_period: int = 2
    reduction_factor: float = 3.0
    seed: int = 0
    trial_cpus: float = 0.05  # fractional: trials wait on the replicas, they never compute


def storage_target(uri: str):
    """(storage_path, storage_filesystem) for Tune: a local directory, or S3 (honouring
    AWS_ENDPOINT_URL for S3-compatible servers through a pyarrow S3FileSystem)."""
    if not uri.startswith("s3://"):
        return os.path.abspath(uri), None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return uri, None
    from pyarrow.fs import S3FileSystem

    parsed = urlparse(endpoint)
    filesystem = S3FileSystem(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https",
                              access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                              secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                              region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"))
    return uri[len("s3://"):].rstrip("/"), filesystem


def make_searcher(kind: str, metric: str, seed: int, space: dict[str, Any]):
    from ray.tune.search import BasicVariantGenerator

    grid = has_grid(space)
    if kind == "auto":
        kind = "optuna" if importlib.util.find_spec("optuna") and not grid else "random"
    if kind == "optuna":
        if grid:
            raise UserError("--searcher optuna cannot run a space with 'grid' entries (use random)")
        if importlib.util.find_spec("optuna") is None:
            raise UserError("--searcher optuna needs the optuna package (pip install 'icm-ray[tune]')")
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trial table says what matters
        return OptunaSearch(metric=metric, mode="max", seed=seed)
    if kind == "random":
        return BasicVariantGenerator(random_state=seed)
    raise UserError(f"unknown searcher '{kind}' (use auto, optuna or random)")


def progress_callback(metric: str, total: int):
    """A line per trial as it starts, every report, and when it ends (how, and its objective):
    Tune's own table is off (verbose=0), and a long tuning run must show it is moving."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            settings = " ".join(f"{k}={fmt_value(v)}" for k, v in (trial.config or {}).items())
            print(f"  trial {trial.trial_id} started: {settings}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get("finished"):
                print(f"  trial {trial.trial_id}: {result.get('iteration')}/{total} "
                      f"{metric}={fmt_value(result.get(metric))} labelled={result.get('labelled')}",
                      flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            how = "completed" if last.get("finished") else "stopped early (ASHA)"
            print(f"  trial {trial.trial_id} {how} at {last.get('iteration')}/{total}: "
                  f"{metric}={fmt_value(last.get(metric))}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"  trial {trial.trial_id} failed", flush=True)

    return Progress()


def _plain(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) as plain Python values, for YAML and JSON."""
    return value.item() if hasattr(value, "item") else value


def _status(result) -> str:
    if result.error is not None:
        return "error"
    return "completed" if (result.metrics or {}).get("finished") else "stopped early"


def run_tuning(tasks: list[PersonaTask], run_config: RunConfig, space: dict[str, Any], options: TuneOptions,
               storage: str, address: str | None = None) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """Run the trials; returns one row per trial (last report, params, status) and each
    trial's reports, for the plot."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from icm_ray.engine import deploy_model, ensure_ray, release_model
    from icm_ray.replicas import MODEL_APP

    started = ensure_ray(address)
    try:
        deploy_model(run_config, http=not started)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, tasks=tasks, base=run_config.model_dump(mode="json"),
                                 metric=options.metric, report_every=options.report_every,
                                 app_name=MODEL_APP),
            {"cpu": options.trial_cpus})
        path, filesystem = storage_target(storage)
        tuner = tune.Tuner(
            trainable, param_space=to_tune(space),
            tune_config=tune.TuneConfig(
                metric=options.metric, mode="max", num_samples=options.samples,
                max_concurrent_trials=options.max_concurrent,
                search_alg=make_searcher(options.searcher, options.metric, options.seed, space),
                scheduler=ASHAScheduler(time_attr="iteration", max_t=max(1, run_config.search.iterations),
                                        grace_period=options.grace_period,
                                        reduction_factor=options.reduction_factor)),
            run_config=tune.RunConfig(name=time.strftime("icm-tune-%Y%m%d-%H%M%S"), storage_path=path,
                                      storage_filesystem=filesystem, verbose=0,
                                      callbacks=[progress_callback(options.metric,
                                                                   run_config.search.iterations)]))
        grid = tuner.fit()
        rows, histories = [], {}
        for result in grid:
            last = result.metrics or {}
            trial = last.get("trial_id") or os.path.basename(result.path)
            history = result.metrics_dataframe
            histories[trial] = [] if history is None else history.to_dict("records")
            rows.append({"trial": trial, "status": _status(result),
                         "iteration": last.get("iteration"),
                         "params": {k: _plain(result.config[k]) for k in space if k in result.config},
                         **{k: last.get(k) for k in ("U", "P", "I", "labelled", "u_per_label",
                                                      "heldout_p", "accuracy") if k in last},
                         "error": None if result.error is None else str(result.error).splitlines()[0]})
        if all(r["status"] == "error" for r in rows):
            raise RuntimeError(f"every trial failed; first error: {rows[0]['error']}")
        return rows, histories
    finally:
        release_model(started)


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The best trial that ran the whole budget (any trial that reported, if none did)."""
    def score(row):
        value = row.get(metric)
        return -math.inf if value is None or value != value else value

    done = [r for r in rows if r["status"] == "completed"] or [r for r in rows if r["status"] != "error"]
    return max(done, key=score)


def best_config(run_config: RunConfig, row: dict[str, Any]) -> RunConfig:
    """The full run config with the best trial's search settings: `icm-ray run --config` takes it."""
    search = {**run_config.search.model_dump(mode="json"), **row["params"]}
    return RunConfig.model_validate({**run_config.model_dump(mode="json"), "search": search})

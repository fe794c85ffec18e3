"""`icm-ray`: the command line. Bad input prints one line and exits with code 2."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from icm_ray.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Persona-specific steering examples without human labels (ICM on Ray).")
console = Console(stderr=True, soft_wrap=True)  # long paths stay copyable on one line


@app.callback()
def _root() -> None:
    """Persona-specific steering examples without human labels (ICM on Ray)."""


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(summary: dict) -> None:
    table = Table(title="ICM results per persona")
    for column in ("persona", "labelled", "U", "P", "inconsistent", "acc vs gold",
                   "zero-shot acc", "orientation", "tokens run", "cached", "wall s"):
        table.add_column(column, justify="left" if column in ("persona", "orientation") else "right")
    for row in summary["personas"]:
        orientation = row.get("orientation") or {}
        table.add_row(
            row["persona"], f"{row['labelled']}/{row['examples']}", _fmt(row["utility"], ".2f"),
            _fmt(row["predictability"]), str(row["inconsistencies"]), _fmt(row["accuracy_vs_gold"]),
            _fmt(row["zero_shot_accuracy"]),
            f"{orientation.get('decision', '-')} (p={_fmt(orientation.get('p_value'), '.2f')})",
            f"{row['tokens_run']:,}", f"{row['tokens_cached']:,}", _fmt(row["wall_seconds"], ".1f"))
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)
    out.print(table)


@app.command()
def run(
    data: Annotated[list[Path] | None, typer.Option(
        "--data", "-d", help="data files or directories (JSONL/CSV/Parquet, ICM JSON, Anthropic "
        "persona JSONL); repeatable. Default: the built-in demo data")] = None,
    persona: Annotated[list[str] | None, typer.Option(
        "--persona", "-p", help="only these personas (repeatable); default: all in the data")] = None,
    personas_file: Annotated[Path | None, typer.Option(
        "--personas", help="YAML/JSON persona definitions (name + description)")] = None,
    data_format: Annotated[str, typer.Option(
        "--format", help="auto, native, icm or anthropic")] = "auto",
    out: Annotated[str | None, typer.Option(
        "--out", "-o", help="run directory or s3://bucket/prefix (default runs/run-YYYYmmdd-HHMMSS)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing finished run in --out")] = False,
    model: Annotated[str | None, typer.Option(
        help="smollm2-135m (built in), gemma3-270m, qwen2.5-coder-1.5b, a .gguf file or a HF "
        "model directory")] = None,
    iterations: Annotated[int | None, typer.Option(help="search steps per persona")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (same seed, same labels)")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML/JSON run config (sections search, prompts, model, ray)")] = None,
    no_ray: Annotated[bool, typer.Option(
        "--no-ray", help="run in this process without Ray (debugging)")] = False,
    resume: Annotated[str | None, typer.Option(
        help="continue an interrupted run from its checkpoints (finished personas are kept)")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join (default: RAY_ADDRESS, else a private local cluster)")] = None,
    clamp: Annotated[Path | None, typer.Option(
        help="human labels (rows of id, label; blank labels are skipped, e.g. a filled-in "
        "`feedback suggest` file) fixed during the search: never flipped")] = None,
) -> None:
    """Run one ICM search per persona and write labels, steering examples and a summary."""
    from icm_ray import data as data_module
    from icm_ray.config import load_config
    from icm_ray.engine import load_clamp, load_inputs, plan_jobs, run_in_process, save_inputs
    from icm_ray.results import write_run
    from icm_ray.store import open_store

    if resume is not None:
        if data or persona or personas_file or config or model or iterations is not None \
                or seed is not None or out is not None or overwrite or data_format != "auto" or clamp:
            raise UserError("--resume continues a run exactly as it was started, in its own directory; "
                            "give no --out, data, persona, model or config options with it")
        store = open_store(str(resume))
        if not store.exists("inputs.json"):
            raise UserError(f"{resume}: not a run directory (no inputs.json)")
        run_config, dataset, personas = load_inputs(store)
        human = load_clamp(store)
        out = resume
    else:
        run_config = load_config(config, {"search": {"iterations": iterations, "seed": seed},
                                          "model": {"name": model}})
        if data:
            dataset = data_module.load_datasets(data, data_format)
            definitions = data_module.load_personas(personas_file)
        else:
            _no_format_without_data(data_format)
            dataset, definitions = data_module.load_demo()
            if personas_file:
                definitions.update(data_module.load_personas(personas_file))
        if persona:
            dataset = dataset.select_personas(persona)
        unused = sorted(set(definitions) - set(dataset.personas()))
        if unused and personas_file:
            console.print(f"warning: {personas_file} defines personas not in the data: {', '.join(unused)}")
        personas = {n: data_module.resolve_persona(n, definitions) for n in dataset.personas()}
        human = {}
        if clamp is not None:
            from icm_ray.labelfile import load_labels

            human, blank = load_labels(clamp, [e.id for e in dataset.examples],
                                       "the data" + (" of the selected personas" if persona else ""),
                                       allow_blank=True)
            console.print(f"clamping {len(human)} human labels from {clamp}"
                          + (f" ({len(blank)} rows left blank, skipped)" if blank else ""))
        from icm_ray.backends import check_model

        check_model(run_config.model.model_dump())  # fail now, not inside a replica: bad model or server
        if out is not None and not out.strip():
            raise UserError("--out is empty; give a directory or s3://bucket/prefix")
        out = out or str(Path("runs") / time.strftime("run-%Y%m%d-%H%M%S"))
        store = open_store(str(out))
        if not store.is_empty():
            if not overwrite:
                raise UserError(f"{out}: run directory is not empty; use --resume {out} to "
                                "continue it, --overwrite to replace it, or another --out")
            store.clear()  # refuses anything that is not a previous run
        store.check_writable()
        save_inputs(store, run_config, dataset, personas, human)
    jobs = plan_jobs(dataset, personas, human)
    if resume is not None:  # a damaged checkpoint fails now, in one line, before the model loads
        from icm_ray.engine import load_checkpoint

        for job in jobs:
            load_checkpoint(store, job.persona.name, len(job.examples))
    console.print(f"run {out}: {len(jobs)} personas, {len(dataset.examples)} examples, "
                  f"model {run_config.model.name}, {run_config.search.iterations} iterations")

    with Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console) as bar:
        tasks = {job.persona.name: bar.add_task(job.persona.name, total=run_config.search.iterations,
                                                status="waiting") for job in jobs}

        def on_progress(name: str, info: dict) -> None:
            status = (f"U={info['utility']:.2f} I={info['inconsistency']} "
                      f"labelled={info['labelled']}" + (" done" if info["finished"] else ""))
            bar.update(tasks[name], completed=info["iteration"], status=status)

        try:
            if no_ray:
                from icm_ray.backends import load_scorer

                scorer = load_scorer(run_config.model.model_dump())
                identity = scorer.identity()
                finished = run_in_process(jobs, run_config, scorer, store, on_progress)
            else:
                from icm_ray.engine import run_on_ray

                finished, identity = run_on_ray(jobs, run_config, store, on_progress, address)
        except KeyboardInterrupt:
            console.print(f"interrupted; checkpoints kept. Continue with: icm-ray run --resume {out}")
            raise
        except UserError:
            from icm_ray.engine import checkpoint_name

            # Bad input found once the search began (a prompt too long for the model): with no
            # checkpoint yet there is nothing to resume, so leave no half-written run behind.
            # Checkpoints are kept: the error may be passing (S3 unreachable) and --resume works.
            if resume is None and not any(store.exists(checkpoint_name(j.persona.name)) for j in jobs):
                store.clear()
            raise
    summary = write_run(store, finished, dataset.gold, run_config.model_dump(mode="json"), identity,
                        run_config.prompts)
    print_summary(summary)
    console.print(f"results in {out}/ (labels.parquet, steering_examples/, trace.parquet, summary.json)")


@app.command("tune")
def tune_command(
    data: Annotated[list[Path] | None, typer.Option(
        "--data", "-d", help="data files or directories (as for run); default: the demo data")] = None,
    persona: Annotated[list[str] | None, typer.Option(
        "--persona", "-p", help="tune on these personas only (repeatable); default: all in the data")] = None,
    personas_file: Annotated[Path | None, typer.Option(
        "--personas", help="YAML/JSON persona definitions (name + description)")] = None,
    data_format: Annotated[str, typer.Option("--format", help="auto, native, icm or anthropic")] = "auto",
    samples: Annotated[int, typer.Option(help="trials to run")] = 8,
    metric: Annotated[str, typer.Option(
        help="objective: heldout_p (predictability of held-out examples), u_per_label, or accuracy "
        "(needs --gold-file)")] = "heldout_p",
    gold_file: Annotated[Path | None, typer.Option(
        help="gold labels (rows with id, gold) for ids of the data: scores trials, never the search")] = None,
    space: Annotated[Path | None, typer.Option(help="YAML search space (default: the built-in one)")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="base run config: everything the space does not vary")] = None,
    iterations: Annotated[int | None, typer.Option(help="search steps per trial (the budget)")] = None,
    seed: Annotated[int | None, typer.Option(
        help="seed of the searches, the searcher and the held-out split")] = None,
    model: Annotated[str | None, typer.Option(help="model (as for run)")] = None,
    out: Annotated[str | None, typer.Option(
        "--out", "-o", help="directory or s3://bucket/prefix for best_config.yaml, trials.jsonl, tuning.png "
        "(default runs/tune-YYYYmmdd-HHMMSS)")] = None,
    storage: Annotated[str | None, typer.Option(
        help="Tune's storage, a directory or s3://bucket/prefix (default OUT/tune)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier tuning run's results in --out")] = False,
    searcher: Annotated[str, typer.Option(
        help="auto (optuna if installed, else random), optuna or random")] = "auto",
    max_concurrent: Annotated[int, typer.Option(help="trials running at once")] = 4,
    report_every: Annotated[int, typer.Option(help="iterations between reports to Tune")] = 2,
    grace_period: Annotated[int, typer.Option(help="ASHA: iterations before a trial may be stopped")] = 2,
    reduction_factor: Annotated[float, typer.Option(help="ASHA: keep the top 1/this at each rung")] = 3.0,
    heldout_fraction: Annotated[float, typer.Option(help="part of each pool held out for heldout_p")] = 0.25,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (as for run)")] = None,
) -> None:
    """Tune the search's schedules with Ray Tune; write best_config.yaml for `icm-ray run --config`."""
    from icm_ray.config import load_config
    from icm_ray.models import resolve
    from icm_ray.store import open_store
    from icm_ray_tune.experiment import TuneOptions, best_config, best_row, run_tuning
    from icm_ray_tune.inputs import build_tasks, load_gold
    from icm_ray_tune.objectives import METRICS
    from icm_ray_tune.report import print_trials, write_outputs
    from icm_ray_tune.space import load_space

    checks = [(metric in METRICS, f"unknown metric '{metric}' (use {', '.join(METRICS)})"),
              (metric != "accuracy" or gold_file is not None, "--metric accuracy needs --gold-file"),
              (samples >= 1, "--samples must be at least 1"),
              (max_concurrent >= 1, "--max-concurrent must be at least 1"),
              (report_every >= 1, "--report-every must be at least 1"),
              (grace_period >= 1, "--grace-period must be at least 1"),
              (reduction_factor > 1, "--reduction-factor must be more than 1"),
              (0 < heldout_fraction <= 0.5, "--heldout-fraction must be in (0, 0.5]"),
              (searcher in ("auto", "optuna", "random"), f"unknown searcher '{searcher}' (use auto, optuna "
               "or random)")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    run_config = load_config(config, {"search": {"iterations": iterations, "seed": seed},
                                      "model": {"name": model}})
    budget = run_config.search.iterations
    if budget < 1:
        raise UserError("tuning needs at least 1 search iteration (--iterations)")
    if grace_period > budget:
        raise UserError(f"--grace-period {grace_period} is more than the {budget} iterations of a trial")
    dataset, personas = _dataset(data, data_format, personas_file, persona)
    gold = load_gold(gold_file, dataset) if gold_file else {}
    search_space = load_space(space, run_config.search)
    tasks = build_tasks(dataset, personas, metric, heldout_fraction, run_config.search.seed, gold)
    resolve(run_config.model.name)
    if out is not None and not out.strip():
        raise UserError("--out is empty; give a directory or s3://bucket/prefix")
    out = (out or str(Path("runs") / time.strftime("tune-%Y%m%d-%H%M%S"))).rstrip("/")
    store = open_store(out)
    if store.exists("best_config.yaml") and not overwrite:
        raise UserError(f"{out}: holds an earlier tuning run (best_config.yaml); "
                        "use --overwrite or another --out")
    if storage is not None:  # a missing bucket, bad credentials or a file in the way fail here
        open_store(storage.rstrip("/")).check_writable()
    store.check_writable()
    storage = storage or f"{out}/tune"
    options = TuneOptions(metric, samples, searcher, max_concurrent, report_every, grace_period,
                          reduction_factor, run_config.search.seed)
    console.print(f"tune {out}: {samples} trials x {run_config.search.iterations} iterations, "
                  f"{len(tasks)} personas, objective {metric}, model {run_config.model.name}")
    rows, histories = run_tuning(tasks, run_config, search_space, options, storage, address)
    best = best_row(rows, metric)
    tuned = best_config(run_config, best)
    print_trials(rows, metric, best, tuned)
    write_outputs(store, rows, histories, metric, tuned)
    console.print(f"results in {out}/ (best_config.yaml, trials.jsonl, tuning.png); "
                  f"Tune's storage: {storage}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    address: Annotated[str | None, typer.Option(
        help="Ray job server (default RAY_JOB_ADDRESS, RAY_ADDRESS, http://127.0.0.1:8265)")] = None,
    pip: Annotated[list[str] | None, typer.Option(help="extra pip packages for the job (repeatable)")] = None,
    wait: Annotated[bool, typer.Option(help="wait for the job and print its logs")] = False,
) -> None:
    """Send a run to a Ray cluster as a job: `icm-ray submit [--address URL] -- RUN OPTIONS`.

    Everything after `--` is passed to `icm-ray run` on the cluster; local files given to
    --data/--config/--personas are uploaded with the job. --out must be absolute or s3://.
    """
    from icm_ray import jobs

    job_id = jobs.submit(address, list(ctx.args), pip)
    typer.echo(job_id)
    if wait:
        state = jobs.wait(address, job_id)
        typer.echo(jobs.logs(address, job_id))
        typer.echo(f"job {job_id}: {state}")
        if state != "SUCCEEDED":
            raise typer.Exit(1)


jobs_app = typer.Typer(help="Follow cluster jobs sent with `icm-ray submit`.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
JobAddress = Annotated[str | None, typer.Option(help="Ray job server (default as for submit)")]


@jobs_app.command("status")
def jobs_status(job_id: str, address: JobAddress = None) -> None:
    """Print the job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from icm_ray import jobs

    typer.echo(jobs.status(address, job_id))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: JobAddress = None) -> None:
    """Print the job's output so far."""
    from icm_ray import jobs

    typer.echo(jobs.logs(address, job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: JobAddress = None) -> None:
    """Ask the cluster to stop the job."""
    from icm_ray import jobs

    typer.echo("stopping" if jobs.stop(address, job_id) else "already finished")


@app.command("serve")
def serve_command(
    results: Annotated[list[str] | None, typer.Option(
        "--results", "-r", help="finished runs: directories or s3://bucket/prefix (repeatable)")] = None,
    host: Annotated[str, typer.Option(help="address to bind; loopback unless told otherwise")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    model: Annotated[str | None, typer.Option(help="model for classify/completions/searches")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="run config (model, ray)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join")] = None,
) -> None:
    """Serve steering examples over HTTP (Ray Serve + FastAPI); docs at /docs. Ctrl-C stops it."""
    import signal

    from icm_ray.backends import check_model
    from icm_ray.config import load_config
    from icm_ray.engine import ensure_ray
    from icm_ray.steering import load_run

    run_config = load_config(config, {"model": {"name": model}})
    check_model(run_config.model.model_dump())
    served: dict[str, str] = {}
    for uri in results or []:  # a bad run fails here, in one line, before anything starts
        for name in load_run(uri):
            if name in served:
                raise UserError(f"persona '{name}' is in both {served[name]} and {uri}; "
                                "serve one of them (or rename it)")
            served[name] = uri
    _check_listen(host, port)
    started = ensure_ray(address)
    from ray import serve

    from icm_ray_serve.app import build_app

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(results or [], run_config.model.model_dump(), run_config.ray.model_dump()),
              name="icm-api", route_prefix="/")
    console.print(f"serving {len(results or [])} run(s) on http://{host}:{port}  (docs: /docs)")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("icm-api")
        if started:
            import ray

            ray.shutdown()


def _check_listen(host: str, port: int) -> None:
    """A port out of range or in use fails in one line, before Ray and Serve start."""
    import socket

    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: not a port number (1-65535)")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise UserError(f"{host}:{port}: cannot listen there ({err.strerror or err})") from None


# ---------------------------------------------------------------- using the results


def _no_format_without_data(data_format: str) -> None:
    if data_format != "auto":
        raise UserError(f"--format {data_format}: --format applies to --data files, and without "
                        "--data the built-in demo data is used")


def _dataset(data, data_format, personas_file, persona):
    """The data and persona definitions, as `run` reads them (demo data without --data)."""
    from icm_ray import data as data_module

    if data:
        dataset = data_module.load_datasets(data, data_format)
        definitions = data_module.load_personas(personas_file)
    else:
        _no_format_without_data(data_format)
        dataset, definitions = data_module.load_demo()
        definitions.update(data_module.load_personas(personas_file))
    if persona:
        dataset = dataset.select_personas(persona)
    return dataset, {n: data_module.resolve_persona(n, definitions) for n in dataset.personas()}


def _write_report(out: str | None, report: dict) -> None:
    if out:
        from icm_ray.store import output_file

        store, name = output_file(out)
        store.write_json(name, report)  # atomic
        console.print(f"report in {out}")


DataOption = Annotated[list[Path] | None, typer.Option(
    "--data", "-d", help="data files or directories (as for run); default: the demo data")]
PersonaOption = Annotated[list[str] | None, typer.Option(
    "--persona", "-p", help="only these personas (repeatable)")]
PersonasFileOption = Annotated[Path | None, typer.Option(
    "--personas", help="YAML/JSON persona definitions (name + description)")]
FormatOption = Annotated[str, typer.Option("--format", help="auto, native, icm or anthropic")]
ModelOption = Annotated[str | None, typer.Option(help="model (as for run)")]
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="run config (as for run)")]


@app.command("eval")
def eval_command(
    data: DataOption = None,
    persona: PersonaOption = None,
    personas_file: PersonasFileOption = None,
    data_format: FormatOption = "auto",
    run_dir: Annotated[str | None, typer.Option(
        "--run", help="evaluate this finished run instead of running ICM (only its pool part "
        "serves as demonstrations); its data, personas and config are used")] = None,
    out: Annotated[str | None, typer.Option(
        "--out", "-o", help="directory or s3://... for eval.md, eval.json, eval.png and the runs "
        "(default runs/eval-YYYYmmdd-HHMMSS)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier evaluation in --out")] = False,
    test_fraction: Annotated[float, typer.Option(help="part of each persona held out for testing")] = 0.5,
    shots: Annotated[list[int] | None, typer.Option(
        "--shots", help="demonstration counts (repeatable; default 4 8 16 32)")] = None,
    draws: Annotated[int, typer.Option(help="random-label draws averaged per shot count")] = 3,
    feedback_budget: Annotated[int, typer.Option(
        help="n > 0: also compare n targeted with n random human labels per persona (answers "
        "simulated with gold), each clamped in a new search")] = 0,
    iterations: Annotated[int | None, typer.Option(help="search steps per persona")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the split, the searches and the draws")] = None,
    model: ModelOption = None,
    config: ConfigOption = None,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="run in this process without Ray")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (as for run)")] = None,
) -> None:
    """Few-shot accuracy on held-out statements with ICM, gold, random and no labels, per persona."""
    from icm_ray.backends import check_model
    from icm_ray.config import load_config
    from icm_ray.engine import load_inputs, model_session, plan_jobs, save_inputs
    from icm_ray.evalreport import write_report
    from icm_ray.evaluate import plan, run_eval
    from icm_ray.results import write_run
    from icm_ray.store import open_store

    if run_dir is not None:
        if data or personas_file or config or model or iterations is not None:
            raise UserError("--run evaluates a finished run with its own data, personas and config; "
                            "give no --data, --personas, --config, --model or --iterations with it")
        run_store = open_store(run_dir)
        if not run_store.exists("summary.json"):
            raise UserError(f"{run_dir}: not a finished run (no summary.json)")
        run_config, dataset, personas = load_inputs(run_store)
        if seed is not None:
            run_config.search.seed = seed
        if persona:
            dataset = dataset.select_personas(persona)
            personas = {n: personas[n] for n in dataset.personas()}
    else:
        run_config = load_config(config, {"search": {"iterations": iterations, "seed": seed},
                                          "model": {"name": model}})
        dataset, personas = _dataset(data, data_format, personas_file, persona)
    the_plan = plan(dataset, personas, test_fraction, shots or [4, 8, 16, 32], draws,
                    run_config.search.seed, feedback_budget)
    check_model(run_config.model.model_dump())
    if out is not None and not out.strip():
        raise UserError("--out is empty; give a directory or s3://bucket/prefix")
    out = (out or str(Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S"))).rstrip("/")
    store = open_store(out)
    if not store.is_empty():
        if not overwrite:
            raise UserError(f"{out}: not empty; use --overwrite or another --out")
        if not store.exists("eval.json") and not store.exists("eval-plan.json"):
            raise UserError(f"{out}: not an icm-ray evaluation (no eval.json); refusing to replace it")
    store.check_writable()
    store.write_json("eval-plan.json", {"test": {n: [e.id for e in t] for n, t in the_plan.tests.items()},
                                        "pool": {n: [e.id for e in p] for n, p in the_plan.pool.items()}})

    def log(message: str) -> None:
        console.print(message)

    with model_session(run_config, no_ray, address) as (scorer, search):
        def icm_run(tag: str, clamp: dict[str, bool]) -> str:
            uri = f"{out}/{tag}"
            run_store = open_store(uri)
            if not run_store.is_empty():
                run_store.clear()  # a previous evaluation's run (--overwrite was checked above)
            pool = the_plan.pool_dataset()
            save_inputs(run_store, run_config, pool, the_plan.personas, clamp)
            log(f"ICM on the pools: {len(pool.examples)} statements, {len(the_plan.personas)} personas "
                f"-> {uri}")
            shown: dict[str, int] = {}

            def progress(name: str, info: dict) -> None:  # a line per persona every 10 steps
                step = info["iteration"]
                if (step % 10 == 0 or info["finished"]) and shown.get(name) != step:
                    shown[name] = step
                    log(f"  {name}: {step}/{info['total']} U={info['utility']:.2f} "
                        f"labelled={info['labelled']}" + (" done" if info["finished"] else ""))

            finished, identity = search(plan_jobs(pool, the_plan.personas, clamp), run_store, progress)
            write_run(run_store, finished, the_plan.gold, run_config.model_dump(mode="json"), identity,
                      run_config.prompts)
            return uri

        base = run_dir if run_dir is not None else icm_run("icm", {})
        report = run_eval(the_plan, scorer, run_config.prompts, base,
                          lambda tag, clamp: icm_run(f"icm-feedback-{tag}", clamp), log)
    report["options"] = {"run": base, "test_fraction": test_fraction, "shots": the_plan.shots,
                         "draws": draws, "seed": the_plan.seed, "feedback_budget": feedback_budget,
                         "model": run_config.model.name, "iterations": run_config.search.iterations}
    text = write_report(store, report)
    typer.echo(text)
    console.print(f"results in {out}/ (eval.md, eval.json, eval.png; ICM runs in {out}/icm*)")


@app.command("audit")
def audit_command(
    labels_file: Annotated[Path, typer.Argument(metavar="LABELS", help="label file: rows of id, label "
                                                "(CSV/JSONL/Parquet), e.g. written by people")],
    data: DataOption = None,
    persona: PersonaOption = None,
    personas_file: PersonasFileOption = None,
    data_format: FormatOption = "auto",
    shots: Annotated[int, typer.Option(help="demonstrations drawn from the label set")] = 32,
    seeds: Annotated[int, typer.Option(help="random-flip controls per persona")] = 5,
    seed: Annotated[int, typer.Option(help="seed of the demonstrations and the controls")] = 0,
    model: ModelOption = None,
    config: ConfigOption = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="write the report as JSON here")] = None,
) -> None:
    """Coherence audit: P, I, U of a label set, and the accuracy-matched random-flip control."""
    from icm_ray.audit import audit_persona
    from icm_ray.backends import check_model, load_scorer
    from icm_ray.config import load_config
    from icm_ray.labelfile import load_labels

    if shots < 1 or seeds < 1:
        raise UserError("--shots and --seeds must be at least 1")
    if out:
        from icm_ray.store import output_file

        output_file(out)  # a bad --out fails before the audit runs
    run_config = load_config(config, {"model": {"name": model}})
    dataset, personas = _dataset(data, data_format, personas_file, persona)
    # Blank labels are skipped, so a run's labels.parquet (null = never reached) audits as it is.
    labels, _ = load_labels(labels_file, [e.id for e in dataset.examples],
                            "the data" + (" of the selected personas" if persona else ""), allow_blank=True,
                            personas=dataset.personas() if persona else None)
    check_model(run_config.model.model_dump())
    scorer = load_scorer(run_config.model.model_dump())
    rows = []
    for name in dataset.personas():
        examples = [e for e in dataset.examples if e.persona == name]
        mine = {e.id: labels[e.id] for e in examples if e.id in labels}
        if mine:
            rows.append(audit_persona(scorer, personas[name], examples, mine, dataset.gold, run_config,
                                      shots, seeds, seed))
    print_audit(rows)
    _write_report(out, {"labels": str(labels_file), "shots": shots, "seeds": seeds, "personas": rows})


def print_audit(rows: list[dict]) -> None:
    table = Table(title="Coherence audit (control: gold with the same number of labels flipped at random)")
    for column in ("persona", "labelled", "P", "I", "U", "acc vs gold", "few-shot acc",
                   "control U", "control I", "control few-shot", "generalises better"):
        table.add_column(column, justify="left" if column == "persona" else "right")
    for row in rows:
        control = row.get("control")
        if isinstance(control, dict):
            extra = [_fmt(control["U_mean"], ".2f"), _fmt(control["I_mean"], ".1f"),
                     f"{control['fewshot_accuracy_mean']:.3f} +- {control['fewshot_accuracy_sd']:.3f}",
                     f"{'yes' if row['generalises_better'] else 'no'} "
                     f"({control['beaten_by_audited']}/{len(control['seeds'])})"]
        else:
            extra = ["-", "-", "-", control or "-"]
        table.add_row(row["persona"], str(row["labelled"]), _fmt(row["P"]), str(row["I"]),
                      _fmt(row["U"], ".2f"), _fmt(row.get("accuracy_vs_gold")),
                      _fmt(row.get("fewshot_accuracy")), *extra)
    Console(width=200).print(table)


feedback_app = typer.Typer(help="Targeted human feedback: ask people about the least certain questions.",
                           no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("suggest")
def feedback_suggest(
    run_dir: Annotated[str, typer.Argument(metavar="RUN", help="a finished run: directory or s3://...")],
    persona: Annotated[str, typer.Option("--persona", "-p", help="the persona to ask about")],
    n: Annotated[int, typer.Option("-n", help="how many questions")] = 10,
    out: Annotated[str | None, typer.Option(
        "--out", "-o", help=".csv or .jsonl to fill in (default feedback-PERSONA.csv)")] = None,
) -> None:
    """List the questions where the model is least certain about the persona, to be labelled
    by people (fill in `label`, then `icm-ray run --clamp FILE`)."""
    from icm_ray.feedback import render, suggest
    from icm_ray.store import output_file, safe_name

    out = out or f"feedback-{safe_name(persona)}.csv"
    render([], out)  # a bad file name or place fails before the model is loaded
    store, name = output_file(out)
    rows = suggest(run_dir, persona, n)
    store.write_bytes(name, render(rows, name))
    for row in rows:
        typer.echo(f"{row['margin']:7.3f}  {row['id']}  {row['text'].splitlines()[0][:100]}")
    console.print(f"{len(rows)} questions in {out}: fill in 'label' (true/false; blank = skip), "
                  f"then: icm-ray run --clamp {out} ...")


@app.command("export")
def export_command(
    run_dir: Annotated[str, typer.Argument(metavar="RUN", help="a finished run: directory or s3://...")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="sft (JSONL prompt/completion), dpo "
                                     "(JSONL prompt/chosen/rejected) or hf (datasets dir)")] = "sft",
    out: Annotated[str, typer.Option("--out", "-o", help="file (sft, dpo; local or s3://) or "
                                     "directory (hf)")] = "",
    persona: Annotated[list[str] | None, typer.Option(
        "--persona", "-p", help="only these personas (repeatable)")] = None,
) -> None:
    """Export a run's steering examples for training: SFT JSONL, DPO pairs or a HF dataset."""
    from icm_ray.export import export

    rows = export(run_dir, fmt, out, persona)
    console.print(f"wrote {rows} {fmt} rows to {out}")


def main() -> None:
    try:
        code = app(standalone_mode=False)  # usage errors come back to us, to be said in one line
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if type(err).__name__ == "Abort":  # Ctrl-C while click was parsing or prompting
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        if not hasattr(err, "format_message"):  # not a usage error (click's, vendored by typer)
            raise
        context = getattr(err, "ctx", None)
        hint = f" (see: {context.command_path} --help)" if context is not None else ""
        if err.format_message():  # empty: no command given, the help was shown
            print(f"error: {err.format_message()}{hint}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""The run on a real local Ray cluster: persona actors scoring through one Serve deployment
of the real built-in model; crashes of an actor or of the replica; resume."""

import sys
import threading

import pytest

from icm_ray.config import RunConfig
from icm_ray.data import load_datasets, resolve_persona
from icm_ray.engine import actor_name, plan_jobs, run_on_ray
from icm_ray.store import RunStore
from tests.conftest import demo_subset


def jobs_for(path, personas=None):
    dataset = load_datasets([path])
    if personas:
        dataset = dataset.select_personas(personas)
    return plan_jobs(dataset, {n: resolve_persona(n, {}) for n in dataset.personas()}), dataset


def small_config(iterations=4, **search):
    return RunConfig.model_validate({
        "search": {"iterations": iterations, "seed_labels": 4, "seed": 1, "permutations": 100, **search},
        "ray": {"checkpoint_every": 1, "max_batch_size": 4}})


def test_cli_run_through_ray_and_serve(ray_cluster, tmp_path, monkeypatch, capsys):
    """The main command end to end: 2 personas in parallel through one Serve deployment."""
    from icm_ray.cli import main

    data = demo_subset(tmp_path, personas=2, per_persona=10)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["icm-ray", "run", "--data", str(data), "--iterations", "3",
                                      "--seed", "4", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    store = RunStore(out)
    summary = store.read_json("summary.json")
    assert [p["persona"] for p in summary["personas"]] == load_datasets([data]).personas()
    for row in summary["personas"]:
        assert row["labelled"] >= 8 and row["iterations"] == 3 and row["tokens_run"] > 0
        assert row["accuracy_vs_gold"] is not None and row["orientation"]["decision"]
    assert summary["model"]["backend"] == "transformers" and summary["model"]["model_sha256"]
    labels = store.read_parquet("labels.parquet")
    assert len(labels) == 20 and {"id", "persona", "label", "log_odds", "seeded", "clamped"} <= set(labels[0])
    trace = store.read_parquet("trace.parquet")
    assert len(trace) == 6
    for persona in load_datasets([data]).personas():
        assert (out / "steering_examples" / f"{persona}.jsonl").is_file()
    config = store.read_json("config.json")
    assert config["seed"] == 4 and config["model"]["model_sha256"] and config["icm_ray_version"]
    assert "ICM results per persona" in capsys.readouterr().out


def _run(tmp_path, name, config, jobs, on_progress=None):
    store = RunStore(tmp_path / name)
    finished, _ = run_on_ray(jobs, config, store, on_progress)
    return {p: state.labels for p, (_, state) in finished.items()}, store


def test_killed_actor_restarts_from_checkpoint_with_identical_labels(ray_cluster, tmp_path):
    import ray

    jobs, _ = jobs_for(demo_subset(tmp_path, personas=1, per_persona=10))
    config = small_config(iterations=12)  # enough steps that a progress poll (0.5 s) lands mid-search
    straight, _ = _run(tmp_path, "straight", config, jobs)
    killed = []
    store_uri = str((tmp_path / "killed").absolute())

    def kill_once(persona, info):
        if not killed and 1 <= info["iteration"] < 11:
            ray.kill(ray.get_actor(actor_name(store_uri, persona)), no_restart=False)
            killed.append(info["iteration"])

    crashed, _ = _run(tmp_path, "killed", config, jobs, kill_once)
    assert killed, "the actor was never killed mid-search"
    assert crashed == straight


def test_serve_scorer_retries_a_lost_replica_but_not_an_error_in_the_input():
    from icm_ray.errors import UserError
    from icm_ray.replicas import ServeScorer

    class Wrapped(Exception):  # what a handle raises: Ray's wrapper, the cause inside
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    class Handle:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0
            self.score = self

        def remote(self, requests):
            self.calls += 1
            error = self.errors.pop(0) if self.errors else None

            class Response:
                def result(self):
                    if error is not None:
                        raise error
                    return ["scored"]
            return Response()

    too_long = Handle([Wrapped(UserError("prompt of over 8192 tokens exceeds the model's context"))] * 3)
    with pytest.raises(UserError, match="exceeds the model's context"):
        ServeScorer(too_long, retry_seconds=60).score([])
    assert too_long.calls == 1
    lost = Handle([Wrapped(RuntimeError("replica died"))])
    assert ServeScorer(lost, retry_seconds=60).score([]) == ["scored"] and lost.calls == 2


@pytest.mark.slow
def test_replica_killed_mid_run_searches_still_complete(ray_cluster, tmp_path):
    import ray

    jobs, _ = jobs_for(demo_subset(tmp_path, personas=2, per_persona=8))
    config = small_config(iterations=4)
    killed = []
    lock = threading.Lock()

    def kill_replica(persona, info):
        with lock:
            if killed or info["iteration"] < 1:
                return
            for actor in ray.util.list_named_actors(all_namespaces=True):
                if "ModelReplica" in actor["name"]:
                    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
                    killed.append(actor["name"])
                    return

    labels, store = _run(tmp_path, "replica", config, jobs, kill_replica)
    assert killed, "no replica was killed"
    assert all(sum(y is not None for y in v) >= 4 for v in labels.values())


def test_interrupted_run_resumes_without_recomputing_finished_personas(ray_cluster, tmp_path):
    jobs, _ = jobs_for(demo_subset(tmp_path, personas=2, per_persona=8))
    config = small_config(iterations=4)
    straight, _ = _run(tmp_path, "straight", config, jobs)

    class Interrupt(Exception):
        pass

    def interrupt(persona, info):
        if info["iteration"] >= 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(tmp_path, "resumed", config, jobs, interrupt)
    store = RunStore(tmp_path / "resumed")
    assert not store.exists("summary.json")
    assert any((tmp_path / "resumed" / "checkpoints").iterdir())
    resumed, _ = _run(tmp_path, "resumed", config, jobs)
    assert resumed == straight
